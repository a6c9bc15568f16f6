"""Job kinds on top of the driver: a future per call, streaming map, tree fold.

Runs in the driver: ``submit`` and the iterator/fold loops run in the user's
thread; the ``deliver`` callbacks run on the pump thread, except those of
``submit`` futures (``Job.direct``), which a caller waiting in
``Future.result()`` may run itself (``Driver.wait_direct``).

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

import asyncio
import concurrent.futures
import itertools
from concurrent.futures._base import FINISHED, PENDING
import math
import queue
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

from .driver import SETTLED, SKIPPED, Delivery, Driver, Job, Task
from .errors import TaskCancelledError, TaskTimeoutError, WorkerCrashedError
from .policy import FatalStrategy, TaskOptions
from .progress import ProgressBar, progress_bar
from .registry.operations import Operation, driver_operation, monoid_empty, name_of, pickled_call
from .transport.codec import encode, pack_message, rebuild_error
from .transport.messages import Call, Chunk, Err, Ok

__all__ = ["Future", "MapIterator", "submit", "fold", "fold_on", "FoldLease", "MISSING", "chain_options"]

T = TypeVar("T")
R = TypeVar("R")

#: guards the hand-over between ``MapIterator.__anext__`` and its thread
_ASYNC_LOCK = threading.Lock()

#: largest automatic chunk
MAX_AUTO_CHUNK = 50_000
#: a streaming chunk keeps doubling while its round trip is faster than this
RAMP_TARGET = 0.02


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

    # Lighter than the standard library's: a future costs 3 objects the garbage
    # collector tracks instead of 11 (a Condition per future is most of them), which
    # matters when a caller holds tens of thousands. All phalanx futures share one
    # lock for their state changes; a thread that waits installs a one-off waiter,
    # the mechanism concurrent.futures.wait() already uses, so completing a future
    # nobody waits on wakes no thread. The base class's methods work unchanged.
    _condition = _SHARED_CONDITION

    def __init__(self) -> None:  # noqa: D107 - the base class's, without the Condition
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
        #: the call behind this future: ``cancel()`` drops it while queued, ``abort()`` ends it while it runs
        self._phalanx_call: CallHooks | None = None
        #: the driver whose local workers a waiting thread may read its reply from
        self._phalanx_direct: Driver | None = None

    def _wait(self, timeout: float | None) -> None:
        """Wait until this future is done or cancelled, at most ``timeout`` seconds (lock not held)."""
        if self._state in SETTLED:
            return
        direct = self._phalanx_direct
        if direct is not None and direct.wait_direct(self, timeout):
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


def _outcome_error(outcome: Delivery) -> BaseException:
    if isinstance(outcome, BaseException):
        return outcome
    return rebuild_error(outcome.error)  # type: ignore[union-attr]


def _at_index(exc: BaseException, index: int) -> BaseException:
    """A map item's WorkerCrashedError, naming the item (the driver only knows its place in a chunk)."""
    if isinstance(exc, WorkerCrashedError) and exc.index is None:
        named = WorkerCrashedError(f"item {index} of the input: {exc}", exc.exitcode, index)
        named.__cause__ = exc.__cause__
        return named
    return exc


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
        return self.future.set_running_or_notify_cancel()

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
        if fut.done():
            return
        self._forget()
        try:
            if isinstance(outcome, Ok):
                op = self.result_op
                fut.set_result(outcome.value if op is None else op.convert_result(outcome.value))
            else:
                fut.set_exception(_outcome_error(outcome))
        except concurrent.futures.InvalidStateError:
            pass  # cancelled meanwhile
        except Exception as exc:  # the result did not convert to its declared type
            try:
                fut.set_exception(exc)
            except concurrent.futures.InvalidStateError:
                pass

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
    if driver.config.local_pickle:
        fn, args = pickled_call(fn, args)
    op_name = name_of(fn)
    op = driver_operation(fn)
    fut: Future[Any] = Future()
    job = _SubmitJob(driver, op_name, op, fut, options_for(op, options))
    msg = Call(job.id, 0, 0, op_name, args, kwargs or None, job.timeout)
    if driver.config.local_pickle:  # the task keeps its pickles: a retry re-encodes it as it is
        msg = pack_message(msg, True)
    frame = encode(msg, "the arguments of {}", op_name)
    fut._phalanx_direct = driver
    fut._phalanx_call = job
    driver.submit(job, [Task(msg, frame)], register=True)
    return fut


class _ChunkSizer:
    """Chunk sizes: fixed, or from the input length, or ramping up while quick."""

    def __init__(self, chunksize: int | None, length: int | None, workers: int) -> None:
        if chunksize is not None:
            if chunksize < 1:
                raise ValueError(f"chunksize must be >= 1, got {chunksize}")
            self.size, self.ramp = chunksize, False
        elif length is not None:
            self.size = min(MAX_AUTO_CHUNK, max(1, math.ceil(length / (4 * max(1, workers)))))
            self.ramp = False
        else:
            self.size, self.ramp = 1, True

    def observe(self, round_trip: float) -> None:
        if self.ramp and round_trip < RAMP_TARGET and self.size < 4096:
            self.size *= 2


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


class MapIterator(Iterator[R], Generic[R]):
    """Results of :meth:`phalanx.Runtime.map`, streamed as they arrive.

    The input is read lazily, ``window`` chunks at a time. ``close()`` or
    ``cancel()`` (or dropping the iterator) ends the job and cancels its
    queued tasks; running ones see their abort flag. Under ``on_fatal=Ignore`` failed items are left
    out and listed in :attr:`skipped`. A result that does not convert to the
    operation's declared return type fails the map with
    :class:`~phalanx.ValidationError` at its position.

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
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        self._op_name = name_of(fn)
        self._op = driver_operation(fn)
        self._stages = [name_of(stage) for stage in stages]
        self._indexed = indexed
        self._done = True  # until the job exists, close() has nothing to do
        self._star = len(iterables) > 1
        self._input: Iterator[Any] = zip(*iterables) if self._star else iter(iterables[0])
        self._sizer = _ChunkSizer(chunksize, _length(iterables), workers)
        self._ordered = ordered
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._window = 4 * max(1, workers) + 2
        resolved = chain_options([*(driver_operation(stage) for stage in stages), self._op], options)
        self._lease = _Lease(driver, self._op_name, resolved)
        self._driver = driver
        self._seqs = itertools.count()
        self._starts: dict[int, int] = {}
        self._read = 0
        self._sent_at: dict[int, float] = {}
        self._next = 0
        self._buffer: dict[int, tuple[list[Any], BaseException | None]] = {}
        self._ready: deque[Any] = deque()
        self._pending_error: BaseException | None = None
        self._exhausted = False
        self._progress: ProgressBar | None = (
            progress_bar(_length(iterables), self._op_name) if progress else None
        )
        self._done = False
        try:
            self._fill()
        except BaseException:
            self.close()
            raise

    def _fill(self) -> None:
        tasks: list[Task] = []
        job = self._lease.job
        # Chunks received but held for an earlier, slower one count too: an ordered
        # map waiting on a straggler reads no further than the window.
        held = len(self._sent_at) + len(self._buffer)
        while not self._exhausted and held + len(tasks) < self._window:
            items = list(itertools.islice(self._input, self._sizer.size))
            if not items:
                self._exhausted = True
                break
            if self._star:
                items = [list(item) for item in items]
            seq = next(self._seqs)
            self._starts[seq] = self._read
            self._read += len(items)
            msg = Chunk(job.id, seq, 0, self._op_name, items, self._star, False, job.timeout, self._stages)
            if self._driver.config.local_pickle:
                msg = pack_message(msg, True)
            tasks.append(Task(msg, encode(msg, "the arguments of {}", self._op_name), len(items)))
        if tasks:
            now = time.monotonic()
            for task in tasks:
                self._sent_at[task.seq] = now
            self._driver.submit(job, tasks)

    def _convert(self, values: list[Any], seq: int) -> tuple[list[Any], BaseException | None]:
        """The chunk's results as yielded, and the error of the first one that does not convert."""
        op = self._op
        convert = None if op is None or op.returns is Any or op.returns is object else op.convert_result
        skipped = self._lease.job.skipped is not None
        if not self._indexed:
            if skipped:
                values = [v for v in values if v is not SKIPPED]
            if convert is None:
                return values, None
            assert op is not None
            bulk = op.convert_results(values)
            if bulk is not None:
                return bulk, None
            out: list[Any] = []
            try:
                for v in values:
                    out.append(convert(v))
            except Exception as exc:  # ValidationError: the result is not of the declared type
                return out, exc
            return out, None
        start = self._starts.get(seq, 0)
        pairs: list[Any] = []
        try:
            for i, v in enumerate(values):
                if skipped and v is SKIPPED:
                    continue
                pairs.append((start + i, v if convert is None else convert(v)))
        except Exception as exc:
            return pairs, exc
        return pairs, None

    @property
    def skipped(self) -> list[tuple[int, BaseException]]:
        """``(input index, error)`` of every item dropped under ``on_fatal=Ignore``."""
        return sorted(
            ((self._starts.get(seq, 0) + index, _at_index(rebuild_error(info), self._starts.get(seq, 0) + index))
             for seq, index, info in self._lease.job.skipped or ()),
            key=lambda pair: pair[0],
        )

    def _item_error(self, outcome: Err, seq: int) -> BaseException:
        """The error of a chunk's failed item, naming its input index when the driver raised it."""
        return _at_index(rebuild_error(outcome.error), self._starts.get(seq, 0) + outcome.index)

    def __iter__(self) -> MapIterator[R]:
        return self

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
        if self._ready:
            return self._ready.popleft()  # type: ignore[no-any-return]
        if self._done and self._pending_error is None:
            raise StopAsyncIteration
        with _ASYNC_LOCK:
            self._async_running = True
        pending = asyncio.get_running_loop().run_in_executor(None, self._next_in_thread)
        try:
            more, value = await pending
        except asyncio.CancelledError:
            with _ASYNC_LOCK:
                running = self._async_running
                self._async_cancelled = True
            if running:  # wake the thread; it ends the job when it returns
                self._lease.queue.put((-1, TaskCancelledError("the map's consumer was cancelled")))
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

    @property
    def items_read(self) -> int:
        """Items read from the input so far (all of them once the map has ended)."""
        return self._read

    def take_ready(self) -> list[R]:
        """The results already received and due next, without waiting (after a ``next()``)."""
        ready = list(self._ready)
        self._ready.clear()
        return ready

    def abort(self, exc: BaseException) -> None:
        """End the job from any thread: the consumer's next wait raises ``exc``.

        Queued tasks are dropped and running ones see their abort flag.
        """
        self._lease.queue.put((-1, exc))
        self._driver.close_job(self._lease.job, terminate=True)

    def __next__(self) -> R:
        while True:
            if self._ready:
                return self._ready.popleft()  # type: ignore[no-any-return]
            if self._pending_error is not None:
                failure, self._pending_error = self._pending_error, None
                self.close()
                raise failure
            if self._done:
                raise StopIteration
            if self._ordered and self._next in self._buffer:
                buffered, self._pending_error = self._buffer.pop(self._next)
                self._next += 1
                self._ready.extend(buffered)
                if not self._exhausted:
                    self._fill()  # the window has room again
                continue
            if self._exhausted and not self._sent_at and not self._buffer:
                self._finish()
                continue
            try:
                seq, outcome = self._lease.get(self._deadline)
            except BaseException:
                self.close()
                raise
            if seq < 0:
                self._done = True
                raise _outcome_error(outcome)
            sent = self._sent_at.pop(seq, None)
            if sent is not None:
                self._sizer.observe(time.monotonic() - sent)
            exc: BaseException | None
            if isinstance(outcome, Ok):
                values, exc = self._convert(outcome.value, seq)
            elif isinstance(outcome, BaseException):
                values, exc = [], outcome
            else:
                values, exc = self._convert(outcome.partial or [], seq)
                exc = exc or self._item_error(outcome, seq)
            if self._progress is not None:
                self._progress.update(len(values))
            if self._ordered:
                if exc is not None:
                    # Nothing after the failure will be yielded: stop feeding, forget
                    # later chunks, but still wait for the earlier ones.
                    self._exhausted = True
                    self._driver.drop_after(self._lease.job, seq)
                    for later in [s for s in self._sent_at if s > seq]:
                        del self._sent_at[later]
                    for later in [s for s in self._buffer if s > seq]:
                        del self._buffer[later]
                if seq >= self._next:
                    self._buffer[seq] = (values, exc)
            else:
                self._ready.extend(values)
                self._pending_error = exc
                if exc is not None:
                    self._exhausted = True
                    self._sent_at.clear()
            if not self._exhausted:
                self._fill()

    def _finish(self) -> None:
        self._done = True
        self._driver.close_job(self._lease.job)
        self._end_progress()

    def _end_progress(self) -> None:
        bar = getattr(self, "_progress", None)
        if bar is not None:
            self._progress = None
            bar.close()

    def close(self) -> None:
        """Stop the job: queued tasks are dropped, running ones told to abort."""
        if not self._done:
            self._done = True
            self._exhausted = True
            self._ready.clear()
            self._buffer.clear()
            self._driver.close_job(self._lease.job, terminate=True)
        self._end_progress()

    def cancel(self) -> bool:
        """:meth:`close`, named like ``Future.cancel()`` and ``JobHandle.cancel()``.

        Returns True if the map was still running (it is ended now), False
        if it had already ended. Iterating afterwards yields nothing more.
        """
        running = not self._done
        self.close()
        return running

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


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
    sizer = _ChunkSizer(chunksize, _length((iterable,)), workers)
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
                raise _outcome_error(outcome)
            span = inflight.pop(seq, None)
            if span is None:
                continue
            if not isinstance(outcome, Ok):
                raise _outcome_error(outcome)
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
                raise _outcome_error(outcome)
            value, remote = outcome.value, True
        if remote and op is not None:
            value = op.convert_result(value)
        return value
    finally:
        close_job(job, terminate=True)
