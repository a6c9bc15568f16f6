"""``phalanx.AsyncRuntime`` and ``phalanx.AsyncActorRef``: a runtime and actor refs for asyncio code.

Runs in the driver, on the event loop's thread. Nothing here blocks the
loop: calls that wait (starting the workers, ``fold``, ``spawn``,
``inspect``, ``shutdown``; an actor's ``restart``, ``stop``, ``join``,
``events`` and ``inspect``) run in the loop's default executor; ``submit``
and actor method calls only encode and queue (as their
:class:`phalanx.Runtime` counterparts do) and return an awaitable
:class:`phalanx.Future`; ``map`` returns the usual
:class:`phalanx.MapIterator`, whose ``__anext__`` waits off the loop::

    event loop ── submit, ref.method() ──▶ Future ◀── pump thread sets it ──▶ loop wakes (wrap_future)
               ── async for ──▶ MapIterator.__anext__, ref.events() ──▶ default executor: next()
               ── await start / fold / spawn / inspect / shutdown ──▶ default executor
               ── await ref.restart / stop / join / inspect ──▶ default executor

Invariant kept: cancelling an awaiting task never leaves work or a thread
behind for long: a cancelled ``await fut`` removes the call if it is still
queued and aborts it on its worker if it runs, a cancelled ``async for`` ends
its map job (its running tasks see their abort flag) and wakes its thread,
and a cancelled ``start()`` shuts the runtime down once it is up. A
cancelled ``await rt.fold(...)`` stops waiting but the fold runs on (up to
its ``timeout``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar

from .actors.events import ActorEvent
from .actors.ref import ActorRef
from .actors.system import RuntimeTree
from .channels import ChannelKind, ExactlyOnce, Lease
from .driver import RuntimeStats
from .jobs import MISSING, Future, MapIterator
from .policy import FatalStrategy, RetryStrategy, TaskOptions
from .runtime import JobOptions, Runtime, _RunsDirectives

__all__ = ["AsyncRuntime", "AsyncJobOptions", "AsyncActorRef"]

logger = logging.getLogger(__name__)

A = TypeVar("A")
P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class _AsyncWork(_RunsDirectives):
    """``submit``, ``map``, ``fold`` and ``run`` for asyncio, over a runtime or a runtime with job options."""

    __slots__ = ()

    def _work(self) -> Runtime | JobOptions:
        raise NotImplementedError

    def submit(self, fn: Callable[P, R] | str, /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Queue ``fn(*args, **kwargs)``; ``await`` the returned future for its result.

        Cancelling the awaiting task cancels the call: removed if it has not
        started, else aborted on its worker (the future then fails with
        :class:`~phalanx.TaskCancelledError`). Keyword arguments all go to
        ``fn``: route with ``rt.options(on="io").submit(...)``.
        """
        return self._work().submit(fn, *args, **kwargs)

    def map(
        self,
        fn: Callable[..., R] | str,
        /,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        progress: bool = False,
        on: str | None = None,
    ) -> MapIterator[R]:
        """:meth:`phalanx.Runtime.map`, to be read with ``async for``."""
        return self._work().map(
            fn, *iterables, chunksize=chunksize, ordered=ordered, timeout=timeout, progress=progress, on=on
        )

    async def fold(
        self,
        fn: Callable[[T, T], T] | str,
        iterable: Iterable[T],
        /,
        *,
        initial: T = MISSING,
        chunksize: int | None = None,
        timeout: float | None = None,
        on: str | None = None,
    ) -> T:
        """:meth:`phalanx.Runtime.fold`, waited for in a thread.

        A cancelled ``await`` stops waiting at once, but the fold itself runs
        on until it completes or its ``timeout`` passes.
        """
        work = self._work()
        return await asyncio.to_thread(
            work.fold, fn, iterable, initial=initial, chunksize=chunksize, timeout=timeout, on=on
        )

    def _runtime_and_options(self) -> tuple[Runtime, TaskOptions | None]:
        return self._work()._runtime_and_options()


class AsyncRuntime(_AsyncWork):
    """A :class:`phalanx.Runtime` whose calls never block the event loop.

    ::

        async with phalanx.AsyncRuntime(workers=2) as rt:
            assert await rt.submit(square, 7) == 49
            async for y in rt.map(square, range(10)):
                ...
            total = await rt.fold(add, range(101))

    Arguments are those of :class:`phalanx.Runtime`. The workers start in
    ``async with`` (or ``await rt.start()``), not in the constructor.
    """

    def __init__(self, workers: int | dict[str, int] | None = None, **options: Any) -> None:
        self._workers = workers
        self._options = options
        self._rt: Runtime | None = None

    # ---- life cycle -------------------------------------------------------------

    async def start(self) -> AsyncRuntime:
        """Start the workers (in a thread); returns ``self``. Idempotent."""
        if self._rt is not None:
            return self
        starting = asyncio.ensure_future(asyncio.to_thread(Runtime, self._workers, **self._options))
        try:
            self._rt = await asyncio.shield(starting)
        except asyncio.CancelledError:
            starting.add_done_callback(_shut_down_when_started)
            raise
        return self

    async def shutdown(self, wait: bool = True, *, timeout: float | None = None) -> None:
        """Stop the runtime (in a thread); see :meth:`phalanx.Runtime.shutdown`."""
        rt = self._rt
        if rt is not None:
            await asyncio.to_thread(rt.shutdown, wait, timeout=timeout)

    async def __aenter__(self) -> AsyncRuntime:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown(wait=exc_type is None)

    @property
    def runtime(self) -> Runtime:
        """The started :class:`phalanx.Runtime` (for blocking use from threads)."""
        if self._rt is None:
            raise RuntimeError("the AsyncRuntime is not started: use `async with` or `await rt.start()`")
        return self._rt

    # ---- work ----------------------------------------------------------------------

    def _work(self) -> Runtime:
        return self.runtime

    def options(
        self,
        *,
        retry: RetryStrategy | None = None,
        on_fatal: FatalStrategy | None = None,
        timeout: float | None = None,
        on: str | None = None,
    ) -> AsyncJobOptions:
        """Per-job options, as :meth:`phalanx.Runtime.options` (``on``: the worker tag to run on)."""
        return AsyncJobOptions(self.runtime.options(retry=retry, on_fatal=on_fatal, timeout=timeout, on=on))

    async def spawn(self, cls: type[A] | str, /, *args: Any, **kwargs: Any) -> AsyncActorRef[A]:
        """:meth:`phalanx.Runtime.spawn` in a thread; ``await ref.method(...)`` calls the actor."""
        rt = self.runtime
        return AsyncActorRef(await asyncio.to_thread(rt.spawn, cls, *args, **kwargs))

    def get_actor(self, name: str) -> AsyncActorRef[Any]:
        """A new ref on the running actor spawned with ``name=`` (never blocks)."""
        return AsyncActorRef(self.runtime.get_actor(name))

    async def inspect(self, timeout: float = 1.0) -> RuntimeTree:
        """:meth:`phalanx.Runtime.inspect` in a thread."""
        rt = self.runtime
        return await asyncio.to_thread(rt.inspect, timeout)

    def lease(
        self, kind: ChannelKind = ExactlyOnce, *, capacity: int = 10_000, prefetch: int = 8
    ) -> Lease[Any]:
        """:meth:`phalanx.Runtime.lease` (never blocks): read with ``async for``, send with ``await tx.asend(x)``."""
        return self.runtime.lease(kind, capacity=capacity, prefetch=prefetch)

    # ---- state (never blocks) --------------------------------------------------------

    @property
    def n_workers(self) -> int:
        """Number of live workers."""
        return self.runtime.n_workers

    def worker_pids(self) -> dict[str, int]:
        """Live worker ids and their process ids."""
        return self.runtime.worker_pids()

    def worker_tags(self) -> dict[str, tuple[str, ...]]:
        """Live worker ids and the tags each one serves."""
        return self.runtime.worker_tags()

    def stats(self) -> RuntimeStats:
        """Counters; see :meth:`phalanx.Runtime.stats`."""
        return self.runtime.stats()


class AsyncActorRef(Generic[A]):
    """An :class:`phalanx.ActorRef` for asyncio: nothing it does blocks the event loop.

    ``await ref.method(...)`` (or ``await ref.call("method", ...)``) calls
    the actor: the call is queued at once and the returned
    :class:`phalanx.Future` is awaited. ``restart``, ``stop``, ``join`` and
    ``inspect`` are coroutines that wait in a thread; ``events`` is an async
    iterator. :attr:`sync` is the blocking ref, for use from threads. As with
    an ``ActorRef``, dropping the last ref of an actor that is not
    ``detached`` stops it.
    """

    __slots__ = ("_ref",)

    def __init__(self, ref: ActorRef[A]) -> None:
        self._ref = ref

    @property
    def sync(self) -> ActorRef[A]:
        """The blocking :class:`phalanx.ActorRef` this wraps."""
        return self._ref

    @property
    def id(self) -> int:
        """The actor's id (stable across restarts)."""
        return self._ref.id

    @property
    def name(self) -> str | None:
        """The name it was spawned with, if any."""
        return self._ref.name

    @property
    def worker(self) -> str:
        """The worker currently hosting the actor."""
        return self._ref.worker

    @property
    def state(self) -> str:
        """starting, running, restarting, stopping, stopped or failed."""
        return self._ref.state

    def __getattr__(self, method: str) -> Callable[..., Future[Any]]:
        if method.startswith("_"):
            raise AttributeError(method)
        return self._ref.__getattr__(method)  # the method proxy, whatever the name

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Call ``method`` by name (for methods whose names clash with ref attributes)."""
        return self._ref.call(method, *args, **kwargs)

    async def restart(self, on: str | None = None, timeout: float | None = None) -> bool:
        """:meth:`phalanx.ActorRef.restart` (a hot restart), waited for in a thread."""
        return await asyncio.to_thread(self._ref.restart, on, timeout)

    async def stop(self) -> None:
        """:meth:`phalanx.ActorRef.stop` in a thread (it waits while the actor is starting)."""
        await asyncio.to_thread(self._ref.stop)

    async def join(self, timeout: float | None = None) -> None:
        """Wait, in a thread, until the actor has stopped or failed (without stopping it)."""
        await asyncio.to_thread(self._ref.join, timeout)

    async def events(self, timeout: float | None = None) -> AsyncIterator[ActorEvent]:
        """Started / Stopped / Failed / RestartFailed, in order, until the actor ends (``async for``).

        Each event is waited for in a thread; ``timeout`` is that of
        :meth:`phalanx.ActorRef.events`.
        """
        events = self._ref.events(timeout)
        while True:
            event = await asyncio.to_thread(next, events, None)
            if event is None:
                return
            yield event

    async def inspect(self, timeout: float = 1.0) -> RuntimeTree:
        """:meth:`phalanx.ActorRef.inspect` in a thread."""
        return await asyncio.to_thread(self._ref.inspect, timeout)

    def __repr__(self) -> str:
        return f"<AsyncActorRef {self._ref!r}>"


class AsyncJobOptions(_AsyncWork):
    """An :class:`AsyncRuntime` seen through per-job options."""

    __slots__ = ("_options",)

    def __init__(self, options: JobOptions) -> None:
        self._options = options

    def _work(self) -> JobOptions:
        return self._options


def _shut_down_when_started(starting: asyncio.Future[Runtime]) -> None:
    """A cancelled ``start()``: stop the runtime that came up anyway, off the loop."""
    if starting.cancelled() or starting.exception() is not None:
        return
    rt = starting.result()
    logger.debug("AsyncRuntime.start() was cancelled; shutting the new runtime down")
    threading.Thread(target=rt.shutdown, kwargs={"wait": False}, name="phalanx-aio-shutdown").start()
