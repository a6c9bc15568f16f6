"""Job kinds on top of the driver: a future per call, streaming map, tree fold.

Runs in the driver: ``submit`` and the iterator/fold loops run in the user's
thread; the ``deliver`` callbacks run on the pump thread, except those of
``submit`` futures (``Job.direct``), which a caller waiting in
``Future.result()`` may run itself (:mod:`phalanx.direct`).

Invariants kept:

* **Bounded memory.** ``map`` and ``fold`` read their input lazily and keep at
  most ``window`` chunks in flight; ordered ``map`` buffers at most those.
* **Exactly n-1 combines.** ``fold`` reduces chunks on workers with
  ``len(chunk) - 1`` calls each, then combines adjacent partial results in
  order, each combine removing one partial: ``n - 1`` calls overall, and
  ``combine(lower, upper)`` is always called with ``lower`` before ``upper``.
* **Lease isolation.** Each call to ``submit``/``map``/``fold`` leases its own
  job; ending or abandoning it releases the lease and terminates its tasks.

Directive chains (:mod:`phalanx.directives`) run on the same two loops:
``MapIterator`` and ``fold_on`` take ``stages``, operations every item goes
through on its worker (``Chunk.stages``) before the map or the fold's
reduction; a fold of an empty input returns the monoid's ``empty()``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
import queue
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

from . import collected
from .core.tasks import SKIPPED, Delivery, Job, Task
from .core.window import ENDED, FAILED, COMPLETE, MAX_MAP_CHUNK, READY, ChunkSizer, MapWindow, outcome_error
from .direct import SETTLED, DirectReader
from .driver import Driver
from .errors import TaskCancelledError, TaskTimeoutError
from .policy import FatalStrategy, TaskOptions
from .progress import ProgressBar, progress_bar
from .registry.operations import Operation, driver_operation, monoid_empty, name_of, named_operation, pickled_call
from .transport.codec import encode, pack_message
from .transport.messages import Call, Chunk, Ok

__all__ = ["Future", "MapIterator", "submit", "fold", "fold_on", "FoldLease", "MISSING", "chain_options"]

T = TypeVar("T")
R = TypeVar("R")

#: guards the hand-over between ``MapIterator.__anext__`` and its thread
_ASYNC_LOCK = threading.Lock()



class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


#: the lock of every phalanx Future's state (``_SHARED_CONDITION`` wraps it for the base class)
_SHARED_LOCK = threading.RLock()
#: the same lock as a Condition, as the base class expects; nobody waits on it (see Future)
_SHARED_CONDITION = threading.Condition(_SHARED_LOCK)


class _Waiter:
    """A thread waiting in ``Future.result()``: released when the future settles."""

    __slots__ = ("lock",)
    #: Future.cancel tells it (the standard library tells only its own waiters)
    wakes_on_cancel = True

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()

    def _release(self, future: Any = None) -> None:
        try:
            self.lock.release()
        except RuntimeError:
            # Released already: a cancelled future tells its waiters twice, from
            # Future.cancel here and from set_running_or_notify_cancel in the base class.
            pass

    add_result = add_exception = add_cancelled = _release


class CallHooks(Protocol):
    """What a :class:`Future` asks of the call behind it."""

    def cancel(self) -> None:
        """Drop the call if it is still queued."""

    def abort(self) -> None:
        """End the call even while it runs; its future fails."""


class Future(concurrent.futures.Future[T]):
    """A :class:`concurrent.futures.Future` that is also awaitable.

    ``cancel()`` succeeds while the task is still queued in the driver and
    removes it; once a worker holds the task it returns ``False``, as the
    standard library's futures do.

    ``await future`` waits without blocking the event loop. Cancelling the
    awaiting asyncio task cancels the call: a queued one is removed (the
    future is cancelled); a running one of :meth:`phalanx.Runtime.submit` is
    aborted on its worker (``current_task().aborted``, then the worker is
    replaced after ``abort_grace`` if the call ignores it) and the future
    fails with :class:`~phalanx.TaskCancelledError`.

    Done callbacks run on the thread that settles the future: the runtime's
    pump thread, or a thread blocked in ``result()`` that read the reply from
    a local worker itself. They must not block on the pump.
    """

    # Slots, so no attribute dict: one object fewer for the garbage collector per future.
    __slots__ = ("_state", "_result", "_exception", "_waiters", "_done_callbacks", "_phalanx_call",
                 "_phalanx_direct")

    # Lighter than the standard library's: a future costs 2 objects the garbage
    # collector tracks instead of 11 (a Condition per future is most of them), which
    # matters when a caller holds tens of thousands. All phalanx futures share one
    # lock for their state changes; a thread that waits installs a one-off waiter,
    # the mechanism concurrent.futures.wait() already uses, so completing a future
    # nobody waits on wakes no thread. The base class's methods work unchanged.
    _condition = _SHARED_CONDITION
    #: the lock under the Condition, for this module's and phalanx.direct's hot paths
    #: (``with`` on the Condition itself costs two Python-level calls)
    _phalanx_lock = _SHARED_LOCK

    def __init__(self) -> None:  # noqa: D107 - the base class's, without the Condition
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        #: a list once a callback is added (add_done_callback): most futures never get one
        self._done_callbacks: list[Any] | tuple[()] = ()
        #: the call behind this future: ``cancel()`` drops it while queued, ``abort()`` ends it while it runs
        self._phalanx_call: CallHooks | None = None
        #: the driver's direct read: a waiting thread may read its reply from local workers' pipes
        self._phalanx_direct: DirectReader | None = None

    def _wait(self, timeout: float | None) -> None:
        """Wait until this future is done or cancelled, at most ``timeout`` seconds (lock not held)."""
        if self._state in SETTLED:
            return
        direct = self._phalanx_direct
        if direct is not None and direct.wait(self, timeout):
            return
        with self._condition:
            if self._state in SETTLED:
                return
            waiter = _Waiter()
            self._waiters.append(waiter)
        try:
            waiter.lock.acquire(True, -1 if timeout is None else max(0.0, timeout))
        finally:
            with self._condition:
                self._waiters.remove(waiter)

    def result(self, timeout: float | None = None) -> T:
        if self._state not in SETTLED:  # (a gather finds most settled: no call then)
            self._wait(timeout)
        if self._state == FINISHED and self._exception is None:
            return self._result  # type: ignore[no-any-return]
        return super().result(0)

    # The base class's, without notify_all(): no thread waits on the shared Condition
    # (waiting threads install waiters, see _wait), and without building a set per call.
    # A pump settles thousands of futures a second; these two are on its path.
    def set_result(self, result: T) -> None:
        with _SHARED_LOCK:
            if self._state in SETTLED:
                raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._state = FINISHED
            for waiter in self._waiters:
                waiter.add_result(self)
        if self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]  # the base class's

    def set_exception(self, exception: BaseException | None) -> None:
        with _SHARED_LOCK:
            if self._state in SETTLED:
                raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
            self._exception = exception
            self._state = FINISHED
            for waiter in self._waiters:
                waiter.add_exception(self)
        if self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]  # the base class's

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[T]], object]) -> None:
        with _SHARED_LOCK:
            if not self._done_callbacks:
                self._done_callbacks = []
        super().add_done_callback(fn)

    def set_running_or_notify_cancel(self) -> bool:
        # The base class's, under the shared lock without the Condition's Python-level enter/exit:
        # the driver calls it once per call it dispatches.
        with _SHARED_LOCK:
            state = self._state
            if state == PENDING:
                self._state = RUNNING
                return True
            if state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                return False
        return super().set_running_or_notify_cancel()  # any other state: the base class logs and raises

    def done(self) -> bool:
        # One attribute read is atomic: no need for the lock the base class takes (and a list it builds).
        return self._state in SETTLED

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return super().exception(0)

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        with self._condition:  # the base class wakes only Condition waiters on cancel
            for waiter in self._waiters:
                if getattr(waiter, "wakes_on_cancel", False):
                    waiter.add_cancelled(self)
        call = self._phalanx_call
        if call is not None:
            call.cancel()
        return True

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait_async().__await__()

    async def _wait_async(self) -> T:
        import asyncio  # only ever awaited under a running event loop: imported by then

        try:
            return await asyncio.wrap_future(self)
        except asyncio.CancelledError:
            # The awaiting task was cancelled (or this future was): a queued
            # call is removed, a running one is aborted on its worker.
            if not self.cancel():
                call = self._phalanx_call
                if call is not None:
                    call.abort()
            raise


def settle(fut: concurrent.futures.Future[Any], outcome: Delivery, op: Operation | None) -> None:
    """Settle a call's future with its outcome (the result converted to ``op``'s declared type)."""
    try:
        if isinstance(outcome, Ok):
            fut.set_result(outcome.value if op is None else op.convert_result(outcome.value))
        else:
            fut.set_exception(outcome_error(outcome))
    except concurrent.futures.InvalidStateError:
        pass  # cancelled meanwhile
    except Exception as exc:  # the result did not convert to its declared type
        try:
            fut.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass


class _SubmitJob(Job):
    """The job of one ``submit``, settling its future itself.

    One object where a job, a sink and four bound methods used to be: with
    tens of thousands of calls in flight, every object the garbage collector
    tracks makes each of its full passes longer.
    """

    __slots__ = ("future", "result_op", "driver")

    def __init__(self, driver: Driver, op_name: str, op: Operation | None, future: Future[Any],
                 options: TaskOptions | None) -> None:
        self.setup(driver.new_job_id(), op_name, True, options)
        self.direct = True  # it only settles the future: any thread may deliver
        self.future = future
        self.result_op = op
        self.driver: Driver | None = driver

    # deliver, fail and on_dispatch are methods here, where Job keeps callables in slots:
    # found first on this class, they shadow those slots (which stay unset).
    def on_dispatch(self) -> bool:
        fut = self.future
        with _SHARED_LOCK:  # the usual transition of set_running_or_notify_cancel, without its call
            if fut._state == PENDING:
                fut._state = RUNNING
                return True
        return fut.set_running_or_notify_cancel()

    def cancel(self) -> None:
        driver = self.driver
        if driver is not None:
            driver.close_job(self)

    def abort(self) -> None:
        """End a running call: its worker sees the abort flag; the future fails."""
        driver = self.driver
        if self.future.done() or driver is None:
            return
        driver.close_job(self, terminate=True)
        self.fail(TaskCancelledError("the call was aborted: the task awaiting it was cancelled"))

    def _forget(self) -> None:
        """The future is settled: it no longer keeps this job alive, and cancel/abort do nothing."""
        self.future._phalanx_call = None
        self.driver = None

    def deliver(self, seq: int, outcome: Delivery) -> None:
        fut = self.future
        if fut._state in SETTLED:
            return
        fut._phalanx_call = None  # _forget(), inline: this runs once per call
        self.driver = None
        op = self.result_op
        if outcome.__class__ is Ok:
            value = outcome.value
            # settle(), without its calls when the value needs no conversion (convert_result's test).
            if op is None or (returns := op.returns) is Any or returns is object or type(value) is returns:
                try:
                    fut.set_result(value)
                except concurrent.futures.InvalidStateError:
                    pass  # cancelled meanwhile
                return
        settle(fut, outcome, op)

    def fail(self, exc: BaseException) -> None:
        try:
            if not self.future.done():
                self._forget()
                self.future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass


def options_for(op: Operation | None, over: TaskOptions | None) -> TaskOptions | None:
    """The operation's own options with the job's overrides applied."""
    if op is None:
        return over
    return op.options.merged(over)


def chain_options(ops: Sequence[Operation | None], over: TaskOptions | None) -> TaskOptions | None:
    """The options of a chain of operations (a directive's stages, then its map or fold).

    Each operation's own options apply, a later operation's overriding an
    earlier one's, and the job's (``over``) override them all. One operation
    gives what :func:`options_for` gives.
    """
    resolved = over
    for op in reversed(ops):
        resolved = options_for(op, resolved)
    return resolved


def submit(
    driver: Driver,
    fn: Callable[..., Any] | str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: TaskOptions | None = None,
) -> Future[Any]:
    """Run ``fn(*args, **kwargs)`` once on some worker."""
    local_pickle = driver.config.local_pickle
    if local_pickle:
        fn, args = pickled_call(fn, args)
    op_name, op = named_operation(fn)
    fut: Future[Any] = Future()
    job = _SubmitJob(driver, op_name, op, fut, options if op is None else op.options.merged(options))
    msg = Call(job.id, 0, 0, op_name, args, kwargs or None, job.timeout)
    if local_pickle:  # the task keeps its pickles: a retry re-encodes it as it is
        msg = pack_message(msg, True)
    frame = encode(msg, "the arguments of {}", op_name)
    fut._phalanx_direct = driver.direct
    fut._phalanx_call = job
    driver.submit(job, [Task(msg, frame)], register=True)
    return fut


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


class _Lease:
    """A job whose outcomes go to a queue read by one consumer thread."""

    def __init__(self, driver: Driver, op_name: str, options: TaskOptions | None) -> None:
        self.queue: queue.SimpleQueue[tuple[int, Delivery]] = queue.SimpleQueue()
        self.job: Job = driver.open_job(op_name, self._deliver, self._fail, options=options)
        self.driver = driver

    def _deliver(self, seq: int, outcome: Delivery) -> None:
        self.queue.put((seq, outcome))

    def _fail(self, exc: BaseException) -> None:
        self.queue.put((-1, exc))

    def get(self, deadline: float | None) -> tuple[int, Delivery]:
        if deadline is None:
            return self.queue.get()
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                return self.queue.get_nowait()
            return self.queue.get(timeout=remaining)
        except queue.Empty:
            raise TaskTimeoutError("timed out waiting for results") from None


class _WindowedMap(Iterator[R], Generic[R]):
    """A streaming map's consumer on one host: the core's window, the host's clock and lease.

    :class:`MapIterator` (threads, the driver) and the simulator's
    ``SimMapIterator`` (the scheduler, the virtual clock) share everything
    but the five hooks: ``_now``, ``_open_lease``, ``_submit``, ``_drop_after``
    and ``_close_job``.
    """

    _progress: ProgressBar | None = None
    _done = True  # until the job exists, close() has nothing to do
    _cur: Iterator[Any] = iter(())  # the values being handed out (none until the job exists)

    def _start(self, fn: Callable[..., R] | str, iterables: tuple[Iterable[Any], ...], chunksize: int | None,
               ordered: bool, timeout: float | None, workers: int, options: TaskOptions | None,
               stages: Sequence[Callable[..., Any] | str], indexed: bool) -> None:
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        self._op_name = name_of(fn)
        op = driver_operation(fn)
        star = len(iterables) > 1
        first = iterables[0]
        source: Iterator[Any] | list[Any] = zip(*iterables) if star else first if type(first) is list else iter(first)
        sizer = ChunkSizer(chunksize, _length(iterables), workers, MAX_MAP_CHUNK)
        self._deadline = None if timeout is None else self._now() + timeout
        resolved = chain_options([*(driver_operation(stage) for stage in stages), op], options)
        self._lease = self._open_lease(self._op_name, resolved)
        convert = None if op is None or op.returns is Any or op.returns is object else op.convert_result
        #: the core's window: what to send, buffer and yield (phalanx.core.window)
        self._w = MapWindow(self._lease.job, self._op_name, [name_of(stage) for stage in stages], source, star,
                            sizer, workers, ordered, indexed, convert,
                            None if op is None or convert is None else op.convert_results, self._pickled())
        #: the window's values due now, a list per chunk (the same deque)
        self._ready = self._w.ready
        #: the values being handed out, taken from ``_ready`` a chunk at a time
        self._cur: Iterator[Any] = iter(())

    def _begin(self) -> None:
        self._done = False
        try:
            self._w.fill(self._now())
            self._send()
        except BaseException:
            self.close()
            raise

    # ---- the host's hooks ---------------------------------------------------------------

    def _now(self) -> float:
        raise NotImplementedError

    def _pickled(self) -> bool:
        """Whether chunks go to local workers of a ``local_pickle`` runtime."""
        return False

    def _open_lease(self, op_name: str, options: TaskOptions | None) -> FoldLease:
        raise NotImplementedError

    def _submit(self, tasks: list[Task]) -> None:
        raise NotImplementedError

    def _drop_after(self, seq: int) -> None:
        raise NotImplementedError

    def _close_job(self, terminate: bool) -> None:
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------

    def _send(self) -> None:
        if self._w.outbox:
            self._submit(self._w.take())

    @property
    def skipped(self) -> list[tuple[int, BaseException]]:
        """``(input index, error)`` of every item dropped under ``on_fatal=Ignore``."""
        return self._w.skipped()

    @property
    def items_read(self) -> int:
        """Items read from the input so far (all of them once the map has ended)."""
        return self._w.read

    def __iter__(self) -> Iterator[R]:
        # Chunk by chunk: ``for`` and ``list()`` run over each chunk's list in C,
        # with no Python call per item. ``next(it)`` reads the same ``_cur``, so
        # the two can be mixed.
        return itertools.chain.from_iterable(self._chunks())

    def _chunks(self) -> Iterator[Iterator[R]]:
        cur = self._cur
        while True:
            yield cur
            # ``cur`` is used up unless ``next(it)`` or ``take_ready()`` moved on meanwhile.
            if self._cur is cur and not self._refill():
                return
            cur = self._cur

    def __next__(self) -> R:
        for value in self._cur:
            return value  # type: ignore[no-any-return]
        while self._refill():
            for value in self._cur:
                return value  # type: ignore[no-any-return]
        raise StopIteration

    def _take(self) -> None:
        """The next chunk's values due now become ``_cur``."""
        self._cur = iter(self._ready.popleft())

    def _refill(self) -> bool:
        """Wait until values are due and make them ``_cur``; False once the map has ended.

        Raises the map's failure (after every value before it was handed out).
        """
        ready = self._ready
        w = self._w
        while True:
            if ready:
                self._take()
                return True
            state = w.step(self._now())
            self._send()
            if state == READY:
                continue
            if state == FAILED:
                failure = w.take_error()
                self.close()
                raise failure
            if state == ENDED:
                self._done = True
                return False
            if state == COMPLETE:
                self._finish()
                return False
            try:
                seq, outcome = self._lease.get(self._deadline)
            except BaseException:
                self.close()
                raise
            if seq < 0:
                self._done = w.done = True
                raise outcome_error(outcome)
            count, drop = w.received(seq, outcome, self._now())
            if drop is not None:
                self._drop_after(drop)
            if self._progress is not None:
                self._progress.update(count)
            self._send()

    def _finish(self) -> None:
        self._done = True
        self._close_job(False)
        self._end_progress()

    def _end_progress(self) -> None:
        bar = self._progress
        if bar is not None:
            self._progress = None
            bar.close()

    def close(self) -> None:
        """Stop the job: queued tasks are dropped, running ones told to abort."""
        # Use up the chunk being handed out: a ``for`` over this map stops too.
        deque(self._cur, maxlen=0)
        if not self._done:
            self._done = True
            self._w.close()
            self._close_job(True)
        self._end_progress()

    def __del__(self) -> None:
        try:
            collected.run(self.close)  # the collector may run this under the driver's lock
        except Exception:
            pass


class MapIterator(_WindowedMap[R]):
    """Results of :meth:`phalanx.Runtime.map`, streamed as they arrive.

    The input is read lazily, ``window`` chunks at a time. ``close()`` or
    ``cancel()`` (or dropping the iterator) ends the job and cancels its
    queued tasks; running ones see their abort flag. Under ``on_fatal=Ignore`` failed items are left
    out and listed in :attr:`skipped`. A result that does not convert to the
    operation's declared return type fails the map with
    :class:`~phalanx.ValidationError` at its position.

    ``iter(it)`` (what ``for`` and ``list()`` call) is not ``it`` itself: it
    hands out the results a received chunk at a time, with no Python call per
    item. ``next(it)``, ``take_ready()`` and any number of loops over ``it``
    read the same results, so they can be mixed: each result is handed out once.

    Directive chains (:mod:`phalanx.directives`) reuse it: ``stages`` are
    operations each item goes through on the worker before ``fn``, and
    ``indexed`` yields ``(input index, result)`` pairs.
    """

    def __init__(
        self,
        driver: Driver,
        fn: Callable[..., R] | str,
        iterables: tuple[Iterable[Any], ...],
        chunksize: int | None,
        ordered: bool,
        timeout: float | None,
        workers: int,
        options: TaskOptions | None = None,
        progress: bool = False,
        stages: Sequence[Callable[..., Any] | str] = (),
        indexed: bool = False,
    ) -> None:
        self._driver = driver
        self._start(fn, iterables, chunksize, ordered, timeout, workers, options, stages, indexed)
        #: the lease's queue (an async consumer's cancellation wakes the waiting thread through it)
        self._queue = typing.cast(_Lease, self._lease).queue
        self._progress = progress_bar(_length(iterables), self._op_name) if progress else None
        self._begin()

    def _now(self) -> float:
        return time.monotonic()

    def _pickled(self) -> bool:
        return self._driver.config.local_pickle

    def _open_lease(self, op_name: str, options: TaskOptions | None) -> _Lease:
        return _Lease(self._driver, op_name, options)

    def _submit(self, tasks: list[Task]) -> None:
        self._driver.submit(self._lease.job, tasks)

    def _drop_after(self, seq: int) -> None:
        self._driver.drop_after(self._lease.job, seq)

    def _close_job(self, terminate: bool) -> None:
        self._driver.close_job(self._lease.job, terminate=terminate)

    # ---- asyncio: ``async for x in rt.map(...)`` ----------------------------------

    _async_running = False
    _async_cancelled = False

    def __aiter__(self) -> MapIterator[R]:
        return self

    async def __anext__(self) -> R:
        """The next result, without blocking the event loop.

        Results already received are returned at once; otherwise the wait
        runs in the loop's default executor. Cancelling the awaiting task
        ends the map (its tasks are terminated) and frees that thread.
        """
        for value in self._cur:
            return value  # type: ignore[no-any-return]
        if self._ready:
            self._take()
            return next(self._cur)  # type: ignore[no-any-return]
        if self._done and self._w.error is None:
            raise StopAsyncIteration
        with _ASYNC_LOCK:
            self._async_running = True
        import asyncio

        pending = asyncio.get_running_loop().run_in_executor(None, self._next_in_thread)
        try:
            more, value = await pending
        except asyncio.CancelledError:
            with _ASYNC_LOCK:
                running = self._async_running
                self._async_cancelled = True
            if running:  # wake the thread; it ends the job when it returns
                self._queue.put((-1, TaskCancelledError("the map's consumer was cancelled")))
            else:
                self._cancel_from_async()
            raise
        if not more:
            raise StopAsyncIteration
        return value  # type: ignore[no-any-return]

    def _next_in_thread(self) -> tuple[bool, Any]:
        try:
            return True, next(self)
        except StopIteration:
            return False, None
        finally:
            with _ASYNC_LOCK:
                self._async_running = False
                cancelled = self._async_cancelled
            if cancelled:
                self._cancel_from_async()

    def _cancel_from_async(self) -> None:
        self.close()
        self._driver.close_job(self._lease.job, terminate=True)

    def take_ready(self) -> list[R]:
        """The results already received and due next, without waiting (after a ``next()``)."""
        ready = list(self._cur)
        for values in self._ready:
            ready.extend(values)
        self._ready.clear()
        return ready

    def abort(self, exc: BaseException) -> None:
        """End the job from any thread: the consumer's next wait raises ``exc``.

        Queued tasks are dropped and running ones see their abort flag.
        """
        self._queue.put((-1, exc))
        self._driver.close_job(self._lease.job, terminate=True)

    def cancel(self) -> bool:
        """:meth:`close`, named like ``Future.cancel()`` and ``JobHandle.cancel()``.

        Returns True if the map was still running (it is ended now), False
        if it had already ended. Iterating afterwards yields nothing more.
        """
        running = not self._done
        self.close()
        return running

def fold(
    driver: Driver,
    fn: Callable[..., Any] | str,
    iterable: Iterable[Any],
    initial: Any,
    chunksize: int | None,
    timeout: float | None,
    workers: int,
    options: TaskOptions | None = None,
) -> Any:
    """Reduce ``iterable`` with the associative ``fn`` in exactly n-1 calls."""
    return fold_on(
        lambda op_name, resolved: _Lease(driver, op_name, resolved), driver.submit, driver.close_job,
        time.monotonic, fn, iterable, initial, chunksize, timeout, workers, options,
        pickled=driver.config.local_pickle,
    )


class FoldLease(typing.Protocol):
    """What :func:`fold_on` reads outcomes from (``_Lease`` here, the simulation's own there)."""

    job: Any

    def get(self, deadline: float | None) -> tuple[int, Delivery]: ...


def fold_on(
    open_lease: Callable[[str, TaskOptions | None], FoldLease],
    submit_tasks: Callable[[Any, list[Task]], None],
    close_job: Callable[..., None],
    clock: Callable[[], float],
    fn: Callable[..., Any] | str,
    iterable: Iterable[Any],
    initial: Any,
    chunksize: int | None,
    timeout: float | None,
    workers: int,
    options: TaskOptions | None = None,
    *,
    stages: Sequence[Callable[..., Any] | str] = (),
    on_items: Callable[[int], None] | None = None,
    pickled: bool = False,
) -> Any:
    """The fold tree, for any runtime that submits tasks and leases their outcomes.

    Chunks are folded on the workers; adjacent partial results are combined
    as soon as both are known, so the whole fold makes exactly n-1 calls.
    ``clock`` measures ``timeout`` (the real or a virtual clock).

    ``stages`` (a directive's maps) are applied to every item on the
    workers, in the chunk that folds it, before it is combined; so even a
    one-item chunk goes to a worker then. ``on_items(k)`` is told each time
    ``k`` more items are folded into a partial result. An empty input gives
    ``initial``, else the monoid's ``empty()`` (``@operation(empty=...)``),
    else ``TypeError``.
    """
    op_name = name_of(fn)
    op = driver_operation(fn)
    stage_names = [name_of(stage) for stage in stages]
    resolved = chain_options([*(driver_operation(stage) for stage in stages), op], options)
    if resolved is not None and resolved.on_fatal is FatalStrategy.IGNORE:
        raise ValueError("fold needs every item: on_fatal=Ignore is for map")
    sizer = ChunkSizer(chunksize, _length((iterable,)), workers)
    deadline = None if timeout is None else clock() + timeout
    window = 4 * max(1, workers) + 2
    lease = open_lease(op_name, resolved)
    job = lease.job
    seqs = itertools.count()
    it = iter(iterable)
    ready_lo: dict[int, tuple[int, Any, bool]] = {}  # lo -> (hi, value, decoded from a worker)
    lo_of_hi: dict[int, int] = {}
    inflight: dict[int, tuple[int, int, bool]] = {}  # seq -> (lo, hi, a chunk of items)
    pos = 0
    exhausted = False

    def combine(lo: int, hi: int, lower: Any, upper: Any) -> None:
        seq = next(seqs)
        msg = Call(job.id, seq, 0, op_name, [lower, upper], None, job.timeout)
        inflight[seq] = (lo, hi, False)
        msg = pack_message(msg, pickled) if pickled else msg
        submit_tasks(job, [Task(msg, encode(msg, "the partial results of {}", op_name))])

    def add_ready(lo: int, hi: int, value: Any, remote: bool) -> None:
        left = lo_of_hi.pop(lo, None)
        if left is not None:
            _, lower, _ = ready_lo.pop(left)
            combine(left, hi, lower, value)
            return
        right = ready_lo.pop(hi, None)
        if right is not None:
            rhi, upper, _ = right
            del lo_of_hi[rhi]
            combine(lo, rhi, value, upper)
            return
        ready_lo[lo] = (hi, value, remote)
        lo_of_hi[hi] = lo

    try:
        while True:
            tasks: list[Task] = []
            while not exhausted and len(inflight) + len(tasks) < window:
                items = list(itertools.islice(it, sizer.size))
                if not items:
                    exhausted = True
                    break
                lo, pos = pos, pos + len(items)
                if len(items) == 1 and not stage_names:
                    add_ready(lo, pos, items[0], False)
                    if on_items is not None:
                        on_items(1)
                    continue
                seq = next(seqs)
                msg = Chunk(job.id, seq, 0, op_name, items, False, True, job.timeout, stage_names)
                inflight[seq] = (lo, pos, True)
                msg = pack_message(msg, pickled) if pickled else msg
                tasks.append(Task(msg, encode(msg, "the items of {}", op_name), len(items)))
            if tasks:
                submit_tasks(job, tasks)
            if exhausted and not inflight:
                break
            seq, outcome = lease.get(deadline)
            if seq < 0:
                raise outcome_error(outcome)
            span = inflight.pop(seq, None)
            if span is None:
                continue
            if not isinstance(outcome, Ok):
                raise outcome_error(outcome)
            lo, hi, leaf = span
            if leaf and on_items is not None:
                on_items(hi - lo)
            add_ready(lo, hi, outcome.value, True)
        if pos == 0:
            if initial is MISSING:
                make_empty = monoid_empty(fn)
                if make_empty is None:
                    raise TypeError("fold() of an empty iterable with no initial value "
                                    "(give initial=, or declare the operation a monoid with empty=)")
                return make_empty()
            return initial
        ((_, value, remote),) = ready_lo.values()
        if initial is not MISSING:
            combine(-1, pos, initial, value)
            seq, outcome = lease.get(deadline)
            if not isinstance(outcome, Ok):
                raise outcome_error(outcome)
            value, remote = outcome.value, True
        if remote and op is not None:
            value = op.convert_result(value)
        return value
    finally:
        close_job(job, terminate=True)
