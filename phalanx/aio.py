"""``phalanx.AsyncRuntime``: a :class:`phalanx.Runtime` for asyncio code.

Runs in the driver, on the event loop's thread. Nothing here blocks the
loop: calls that wait (starting the workers, ``fold``, ``spawn``,
``shutdown``) run in the loop's default executor; ``submit`` only encodes
and queues (as :meth:`phalanx.Runtime.submit` does) and returns an awaitable
:class:`phalanx.Future`; ``map`` returns the usual
:class:`phalanx.MapIterator`, whose ``__anext__`` waits off the loop::

    event loop ── submit ──▶ Future ◀── pump thread sets it ──▶ loop wakes (wrap_future)
               ── async for ──▶ MapIterator.__anext__ ──▶ default executor: next()
               ── await start / fold / spawn / shutdown ──▶ default executor

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
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from .actors.ref import ActorRef
from .channels import ChannelKind, ExactlyOnce, Lease
from .driver import RuntimeStats
from .jobs import MISSING, Future, MapIterator
from .policy import FatalStrategy, RetryStrategy, TaskOptions
from .runtime import JobOptions, Runtime, _RunsDirectives

__all__ = ["AsyncRuntime", "AsyncJobOptions"]

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

    async def spawn(self, cls: type[A] | str, /, *args: Any, **kwargs: Any) -> ActorRef[A]:
        """:meth:`phalanx.Runtime.spawn` in a thread; ``await ref.method(...)`` calls it."""
        rt = self.runtime
        return await asyncio.to_thread(rt.spawn, cls, *args, **kwargs)

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
