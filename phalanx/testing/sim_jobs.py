"""Futures, map iterators and job handles of a SimRuntime: they run its scheduler while they wait.

Runs in the calling (test) process, on the thread that waits: ``result()``,
``next()``, ``join()``... step the :class:`~phalanx.testing.SimRuntime`'s
seeded scheduler until what they wait for happened, so nothing happens
behind the caller's back. The contracts are those of :class:`phalanx.Future`,
:class:`phalanx.MapIterator` and :class:`phalanx.JobHandle`; the map window
and fold are the core's (:mod:`phalanx.core.window`, :func:`phalanx.jobs.fold_on`).

Invariant kept: **no hang.** A wait that can never finish raises
:class:`HangError` at once instead of waiting.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from ..directives import Directive, Fold, IndexedChain
from ..core.tasks import Delivery, Job, Task
from ..errors import TaskCancelledError, TaskTimeoutError
from ..jobs import MISSING, Future, _WindowedMap, chain_options, settle
from ..policy import FatalStrategy, TaskOptions
from ..registry.operations import Operation, driver_operation

if TYPE_CHECKING:
    from .sim import SimRuntime

__all__ = ["SimFuture", "SimMapIterator", "SimJobHandle", "SimJobOptions", "HangError"]

A = TypeVar("A")
P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
Y = TypeVar("Y")


class HangError(TaskTimeoutError):
    """Nothing more can happen in the simulation and a call still waits.

    On a real runtime the same call would hang (or wait for its whole
    timeout): a violation of phalanx's "no hang" invariant, or of the
    program's own assumptions (a dropped message nobody retries).
    """



# Futures and iterators that run the scheduler while they wait
# --------------------------------------------------------------------------- #


class SimFuture(Future[T]):
    """A :class:`phalanx.Future` whose waits run the simulation."""

    _sim: SimRuntime | None = None

    def result(self, timeout: float | None = None) -> T:
        if not self.done() and self._sim is not None:
            self._sim._wait_for(self.done, timeout, "a future")
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done() and self._sim is not None:
            self._sim._wait_for(self.done, timeout, "a future")
        return super().exception(timeout=0)

    def __await__(self) -> Generator[Any, None, T]:
        yield from ()
        return self.result()


class _FutureSink:
    __slots__ = ("future", "op", "job", "sim")

    def __init__(self, future: SimFuture[Any], op: Operation | None, sim: SimRuntime) -> None:
        self.future = future
        self.op = op
        self.job: Job | None = None
        self.sim = sim

    def cancel(self) -> None:
        if self.job is not None:
            self.sim._close_job(self.job)

    def abort(self) -> None:
        """A simulated call is never aborted while it runs (no worker process to flag)."""

    def deliver(self, seq: int, outcome: Delivery) -> None:
        fut = self.future
        if fut.done():
            return
        settle(fut, outcome, self.op)

    def fail(self, exc: BaseException) -> None:
        try:
            if not self.future.done():
                self.future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass


class _Lease:
    """A job whose outcomes queue up for one consumer (phalanx.jobs._Lease, waiting on the scheduler)."""

    def __init__(self, sim: SimRuntime, op_name: str, options: TaskOptions | None) -> None:
        self.sim = sim
        self.queue: deque[tuple[int, Delivery]] = deque()
        self.job = sim._open_job(op_name, self._deliver, self._fail, options=options)

    def _deliver(self, seq: int, outcome: Delivery) -> None:
        self.queue.append((seq, outcome))

    def _fail(self, exc: BaseException) -> None:
        self.queue.append((-1, exc))

    def get(self, deadline: float | None) -> tuple[int, Delivery]:
        if not self.queue:
            timeout = None if deadline is None else max(0.0, deadline - self.sim.now)
            try:
                self.sim._wait_for(lambda: bool(self.queue), timeout, "results")
            except HangError:
                raise
            except TimeoutError:
                raise TaskTimeoutError("timed out waiting for results") from None
        return self.queue.popleft()


class SimMapIterator(_WindowedMap[R]):
    """Results of :meth:`SimRuntime.map` (the same contract as :class:`phalanx.MapIterator`).

    Everything but the clock, the lease and the job table is
    :class:`phalanx.jobs._WindowedMap`'s, on the core's window: the same code as a real map's.
    """

    def __init__(self, sim: SimRuntime, fn: Callable[..., R] | str, iterables: tuple[Iterable[Any], ...],
                 chunksize: int | None, ordered: bool, timeout: float | None, workers: int,
                 options: TaskOptions | None = None, stages: Sequence[Callable[..., Any] | str] = (),
                 indexed: bool = False) -> None:
        self._sim = sim
        self._start(fn, iterables, chunksize, ordered, timeout, workers, options, stages, indexed)
        self._begin()

    def _now(self) -> float:
        return self._sim.now

    def _open_lease(self, op_name: str, options: TaskOptions | None) -> _Lease:
        return _Lease(self._sim, op_name, options)

    def _submit(self, tasks: list[Task]) -> None:
        self._sim._submit_tasks(self._lease.job, tasks)

    def _drop_after(self, seq: int) -> None:
        self._sim._drop_after(self._lease.job, seq)

    def _close_job(self, terminate: bool) -> None:
        self._sim._close_job(self._lease.job, terminate=terminate)

    def __iter__(self) -> SimMapIterator[R]:
        return self


class SimJobHandle(Generic[Y, R]):
    """What :meth:`SimRuntime.run` returns: the :class:`phalanx.JobHandle` contract, simulated.

    Iterate it for the results (a chain's in input order, an indexed
    chain's ``(index, result)`` pairs as they finish, a fold's one value),
    or call ``result()`` for all of them; not both. ``cancel()``, ``done()``,
    ``cancelled()``, ``with`` and ``await`` work as on a real handle. As
    everywhere on a SimRuntime, nothing runs until it is waited on, and
    ``timeout`` is virtual; a ``result(timeout)`` that expires ends the job
    (a real handle's job runs on).
    """

    def __init__(self, sim: SimRuntime, directive: Directive[Any], chunksize: int | None, timeout: float | None,
                 options: TaskOptions | None) -> None:
        if not isinstance(directive, Directive):
            raise TypeError(f"run() needs a directive (Literal(...).map(...)...), got {type(directive).__name__}")
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize}")
        sim._check_open()
        items, stages = directive._items, directive._stages
        self._indexed = isinstance(directive, IndexedChain)
        self._timeout = timeout
        self._it: Iterator[Any] | None = None
        self._fold: Callable[[float | None], Any] | None = None
        self._has_result = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._ended = False
        self._iterated = False
        self._fold_yielded = False
        if isinstance(directive, Fold):
            monoid = directive._monoid
            resolved = chain_options([*(driver_operation(st) for st in stages), driver_operation(monoid)], options)
            if resolved is not None and resolved.on_fatal is FatalStrategy.IGNORE:
                raise ValueError("fold needs every item: on_fatal=Ignore is for map")
            self._fold = lambda limit: sim._fold(monoid, items, MISSING, chunksize, limit, options, stages=stages)
        elif stages:
            self._it = SimMapIterator(sim, stages[-1], (items,), chunksize, not self._indexed, timeout,
                                      sim.config.workers, options, stages=stages[:-1], indexed=self._indexed)
        else:
            self._it = enumerate(items) if self._indexed else iter(items)

    def done(self) -> bool:
        """True once the job has ended: every result received, or failed, or cancelled."""
        return self._has_result or self._ended or self._cancelled or self._error is not None

    def cancelled(self) -> bool:
        """True if :meth:`cancel` ended the job."""
        return self._cancelled

    def cancel(self) -> bool:
        """End the job (its queued tasks are dropped); False if it had already ended."""
        if self.done():
            return False
        self._cancelled = True
        if isinstance(self._it, SimMapIterator):
            self._it.close()
        return True

    def _raise_if_over(self) -> None:
        if self._error is not None:
            raise self._error
        if self._cancelled:
            raise TaskCancelledError("the job was cancelled")

    def result(self, timeout: float | None = None) -> R:
        """Run the simulation until the job is done; its result (the list, or the folded value)."""
        if self._has_result:
            return self._result  # type: ignore[no-any-return]
        self._raise_if_over()
        if self._iterated:
            raise RuntimeError("some results were already consumed by iterating over the job: "
                               "iterate over it to the end, or call result() without iterating")
        try:
            if self._fold is not None:
                limits = [t for t in (timeout, self._timeout) if t is not None]
                limit = min(limits) if limits else None
                value: Any = self._fold(limit)
            else:
                assert self._it is not None
                if timeout is not None and isinstance(self._it, SimMapIterator):
                    deadline = self._it._sim.now + timeout
                    old = self._it._deadline
                    self._it._deadline = deadline if old is None else min(old, deadline)
                value = list(self._it)
                if self._indexed:
                    value = [v for _, v in sorted(value, key=lambda pair: pair[0])]
        except Exception as exc:
            self._error = exc
            raise
        self._has_result, self._result = True, value
        return value  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[Y]:
        if self._has_result and self._fold is None:
            done: Iterable[Any] = enumerate(self._result) if self._indexed else self._result
            return iter(done)
        return self

    def __next__(self) -> Y:
        if self._fold is not None:
            if self._fold_yielded:
                raise StopIteration
            value = self.result()
            self._fold_yielded = True
            return value  # type: ignore[return-value]
        if self._has_result or self._ended:
            raise StopIteration
        self._raise_if_over()
        assert self._it is not None
        try:
            item = next(self._it)
        except StopIteration:
            self._ended = True
            raise
        except Exception as exc:
            self._error = exc
            raise
        self._iterated = True
        return item  # type: ignore[no-any-return]

    def __await__(self) -> Generator[Any, None, R]:
        yield from ()
        return self.result()

    def __enter__(self) -> SimJobHandle[Y, R]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.done():
            self.cancel()


class SimJobOptions:
    """A :class:`SimRuntime` seen through per-job options; see :meth:`SimRuntime.options`."""

    __slots__ = ("_rt", "_options")

    def __init__(self, rt: SimRuntime, options: TaskOptions) -> None:
        self._rt = rt
        self._options = options

    def submit(self, fn: Callable[P, R] | str, /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """:meth:`SimRuntime.submit` with these options."""
        return self._rt._submit(fn, args, kwargs, self._options)

    def map(self, fn: Callable[..., R] | str, /, *iterables: Iterable[Any], chunksize: int | None = None,
            ordered: bool = True, timeout: float | None = None, progress: bool = False) -> SimMapIterator[R]:
        """:meth:`SimRuntime.map` with these options."""
        return self._rt._map(fn, iterables, chunksize, ordered, timeout, self._options)

    def fold(self, fn: Callable[[T, T], T] | str, iterable: Iterable[T], /, *, initial: T = MISSING,
             chunksize: int | None = None, timeout: float | None = None) -> T:
        """:meth:`SimRuntime.fold` with these options."""
        return self._rt._fold(fn, iterable, initial, chunksize, timeout, self._options)  # type: ignore[no-any-return]

    def run(self, directive: Directive[Any], /, *, chunksize: int | None = None,
            timeout: float | None = None) -> SimJobHandle[Any, Any]:
        """:meth:`SimRuntime.run` with these options."""
        return SimJobHandle(self._rt, directive, chunksize, timeout, self._options)
