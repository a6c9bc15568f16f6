"""``phalanx.Executor``: a ``concurrent.futures.Executor`` on a phalanx runtime.

Runs in the driver (the :class:`Executor` object, in user threads and, for
its done callbacks, on the runtime's pump thread) and in the workers (the
two wrapper operations at the bottom, which run an initializer once per
worker process and a ``map`` chunk as one task)::

    user thread ── submit(fn, *a) ──▶ Runtime.submit(fn)             ─▶ worker: fn(*a)
                └─ map(fn, xs, chunksize=k) ─▶ one task per k items ─▶ worker: _run_chunk
    pump thread ── done callbacks: forget the future; an initializer
                   failure breaks the executor (RuntimeBrokenError)
    "phalanx-executor-shutdown" thread ── Runtime.shutdown (shutdown(wait=False))

It behaves like :class:`concurrent.futures.ProcessPoolExecutor` (same
signature, same future states, ``map`` collects its input at once and
returns a generator, ``shutdown(wait=False)`` lets queued work finish,
``cancel_futures`` cancels what has not started) except that a worker that
dies does not break it: the tasks it held are redelivered and only a task
that keeps killing its worker fails, with :class:`~phalanx.WorkerCrashedError`.

Plain module-level functions work without ``@phalanx.operation``: they are
named implicitly by ``module:qualname`` (see
:func:`phalanx.registry.operations.implicit`), and the executor's runtime
starts its workers with the ``implicit_operations`` option, so they resolve
such names. That is meant for trusted local use: an executor always runs
local workers (``listen=`` is refused).

Invariants kept: every future handed out is resolved (result, exception or
cancelled) once ``shutdown(wait=True)`` returns; a submit after ``shutdown``
raises ``RuntimeError`` and a submit after an initializer failure raises
:class:`~phalanx.RuntimeBrokenError` (a ``BrokenExecutor``), as the standard
library's executors do; no worker process outlives ``shutdown``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

from .config import OPTIONS, usable_cpus
from .errors import EncodeError, RuntimeBrokenError
from .jobs import Future
from .policy import TaskOptions
from .registry.operations import (
    Operation,
    OperationRef,
    driver_operation,
    implicit,
    name_of,
    operation,
    resolve,
)
from .runtime import JobOptions, Runtime
from .transport.codec import PickleFailed, encode
from .transport.messages import Call
from .worker import current_task

__all__ = ["Executor"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: start methods under which workers start on demand, as ProcessPoolExecutor's do (all but fork;
#: phalanx's own start method, without an mp_context, starts them all at construction)
_ON_DEMAND = frozenset({"forkserver", "spawn"})

_RUN_CALL = "phalanx.executor:_run_call"
_RUN_CHUNK = "phalanx.executor:_run_chunk"


class _InitializerFailed(RuntimeBrokenError):
    """A worker's initializer raised: the executor is broken (worker side)."""


class Executor(concurrent.futures.Executor):
    """A ``ProcessPoolExecutor`` that survives its workers dying.

    ::

        def square(x):                    # a plain module-level function
            return x * x

        with phalanx.Executor(max_workers=2) as ex:
            assert ex.submit(square, 7).result() == 49
            assert list(ex.map(square, range(5), chunksize=2)) == [0, 1, 4, 9, 16]

    Parameters are those of :class:`concurrent.futures.ProcessPoolExecutor`:
    ``max_workers`` (default: usable CPUs), ``mp_context`` (only its start
    method is used), ``initializer(*initargs)`` (run once in each worker
    process, before its first task; if it raises, the executor is broken and
    every pending and later call raises :class:`~phalanx.RuntimeBrokenError`),
    ``max_tasks_per_child`` (a worker is replaced after that many tasks;
    ``ValueError`` with a fork ``mp_context``, as ``ProcessPoolExecutor``).
    Any other keyword is a :class:`phalanx.Runtime` option (``credits``
    defaults to 2 here, so that tasks wait in the driver, where they can be
    cancelled, rather than in a worker's prefetch queue; ``prefix_output``
    defaults to False, so workers' output is not prefixed; ``listen`` is
    refused: an executor runs local workers only; ``implicit_operations`` is
    always on).

    ``fn`` may be an ``@phalanx.operation`` function, its name, or a
    function defined at module level, Python, builtin or C (``pow``,
    ``time.sleep``, ``numpy.dot``; named implicitly; for trusted local use).
    Lambdas, nested functions, methods and partials raise ``TypeError`` at
    ``submit``, as do arguments msgspec cannot encode
    (:class:`~phalanx.EncodeError`), where ``ProcessPoolExecutor`` fails
    later, at ``result()``; with ``local_pickle=True`` (or
    ``PHALANX_LOCAL_PICKLE=1``) they are pickled to the local workers and
    run, as with ``ProcessPoolExecutor`` (and, as there, an argument that
    cannot be pickled fails the future, with a ``pickle.PicklingError``). Arguments and results travel as
    msgpack: a result comes back as the function's return annotation says,
    else as Python made it (tuples, sets, big ints, numpy scalars) or as
    plain data (a dataclass as a dict, unless ``local_pickle``).

    With an ``mp_context`` whose start method is spawn or forkserver,
    workers start on demand, as ``ProcessPoolExecutor`` starts them: one at
    construction, then one more each time a submit finds none idle, up to
    ``max_workers``. A task never waits for a worker that is still
    starting: it goes to the first worker ready for it. Otherwise (fork, or
    phalanx's own start method when there is no ``mp_context``) all start
    at construction.

    A task that raises ``SystemExit`` or ``KeyboardInterrupt`` fails its
    future with that exception (the worker lives on), as
    ``ProcessPoolExecutor`` reports it.

    A worker that dies mid-task is replaced and its tasks are redelivered
    (so execution is at-least-once); a task that kills its worker
    ``max_attempts`` times fails alone with :class:`~phalanx.WorkerCrashedError`.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        **options: Any,
    ) -> None:
        if max_workers is None:
            max_workers = usable_cpus()
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if mp_context is not None:
            options["start_method"] = mp_context.get_start_method()
            if max_tasks_per_child is not None and options["start_method"] == "fork":
                # As ProcessPoolExecutor: fork copies the driver's threads' state into each
                # replacement, forked while the executor's threads run.
                raise ValueError("max_tasks_per_child is incompatible with the 'fork' multiprocessing"
                                 " start method; supply a different mp_context.")
        if options.get("listen") is not None or os.environ.get(OPTIONS["listen"].env, "").strip():
            raise ValueError("phalanx.Executor runs local workers only: unset listen / PHALANX_LISTEN")
        options.setdefault("credits", 2)
        if not os.environ.get(OPTIONS["prefix_output"].env, "").strip():
            options.setdefault("prefix_output", False)  # worker output as ProcessPoolExecutor leaves it
        options["implicit_operations"] = True  # plain functions, by module:qualname
        self._max_workers = max_workers
        self._init: list[Any] | None = None
        # As ProcessPoolExecutor under spawn and forkserver: one worker at first, another each
        # time a submit finds none idle (see _take_worker_locked), up to max_workers.
        on_demand = mp_context is not None and options["start_method"] in _ON_DEMAND
        #: workers asked for (replacements of dead or recycled ones are the runtime's, not counted)
        self._started = 1 if on_demand else max_workers
        #: while workers start on demand: the futures of submits that took a worker (one each);
        #: those not done yet hold theirs
        self._busy: set[Future[Any]] = set()
        #: while workers start on demand: submits that took a worker for a task that could not be sent
        self._unsent = 0
        self._rt = Runtime(self._started, max_tasks_per_worker=max_tasks_per_child or None, **options)
        self._pickled = self._rt.config.local_pickle
        if initializer is not None:
            try:
                self._init = [uuid.uuid4().hex, self._wire_fn(initializer), list(initargs)]
                encode(Call(0, 0, 0, "", self._init), pickled=self._pickled)
            except TypeError as exc:
                self._rt.shutdown()
                raise EncodeError(f"cannot send the initializer or its initargs: {exc}") from exc
        self._lock = threading.Lock()
        self._shutdown = False
        self._broken: RuntimeBrokenError | None = None
        self._failed_pending = False
        self._pending: set[Future[Any]] = set()
        self._closer: threading.Thread | None = None
        self._pid = os.getpid()  # a forked copy (a worker forked from this process) is not ours to finish
        _finish_at_exit(self)
        logger.debug("executor started with %d workers", max_workers)

    # ---- submitting -------------------------------------------------------------

    def _wire_fn(self, fn: Callable[..., Any]) -> Any:
        """How the workers find ``fn``: its name, or (``local_pickle``) the callable itself, pickled."""
        try:
            return name_of(implicit(fn))
        except TypeError:
            if not self._pickled:
                raise
            return fn

    @property
    def _processes(self) -> dict[int, _WorkerProcess]:
        """The live worker processes by pid, as ``ProcessPoolExecutor._processes`` holds them.

        Not public API on either side, but code written for the standard
        library reaches for it (to count, join or terminate workers). A worker
        terminated this way is replaced and its task redelivered, as any worker
        that dies; its handle's ``join()`` waits for it to end. A worker
        replaced after ``max_tasks_per_child`` tasks is left out as soon as it
        takes no more work (``ProcessPoolExecutor`` drops it once it exited,
        before its replacement starts).
        """
        driver = self._rt._driver
        with driver._lock:
            return {w.pid: _WorkerProcess(w.pid) for w in driver._workers.values()
                    if w.alive and not w.retiring and not w.remote and w.pid > 0}

    @property
    def runtime(self) -> Runtime:
        """The :class:`phalanx.Runtime` underneath (stats, worker pids, ...)."""
        return self._rt

    def _check_open_locked(self) -> None:
        if self._broken is not None:
            raise RuntimeBrokenError(str(self._broken)) from self._broken
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _track_locked(self, fut: Future[Any], counted: bool) -> None:
        self._pending.add(fut)
        if counted:
            self._busy.add(fut)
        if self._init is not None:
            # Mark the executor broken *before* the future that saw the
            # initializer fail is resolved, so that a caller woken by it
            # already finds the executor broken (as ProcessPoolExecutor does).
            set_exception = fut.set_exception

            def set_exception_first_break(exc: BaseException | None) -> None:
                if isinstance(exc, _InitializerFailed):
                    self._mark_broken(exc)
                set_exception(exc)

            setattr(fut, "set_exception", set_exception_first_break)

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Run ``fn(*args, **kwargs)`` in a worker; return its future.

        Raises ``RuntimeError`` after :meth:`shutdown`,
        :class:`~phalanx.RuntimeBrokenError` once broken, ``TypeError`` for a
        function workers cannot find by name or arguments that cannot be
        encoded.
        """
        try:
            target: Any = implicit(fn)
        except TypeError:
            if not self._pickled:
                raise
            target = fn  # the runtime sends it pickled
        with self._lock:
            self._check_open_locked()
            counted, grow = self._take_worker_locked()
            try:
                if self._init is None:
                    fut: Future[Any] = self._rt.submit(target, *args, **kwargs)
                else:
                    op = driver_operation(target) if target is not fn or _named(fn) else None
                    ref = OperationRef(_RUN_CALL, op)
                    callee = name_of(target) if op is not None else fn
                    fut = self._rt.submit(ref, self._init, callee, list(args), kwargs or None)
            except PickleFailed as exc:
                # Under local_pickle, code written for ProcessPoolExecutor meets a value that
                # cannot be pickled where it expects it: at result(), as a PicklingError.
                failed: Future[Any] = Future()
                failed.set_exception(exc)
                fut, tracked = failed, False
                if counted:
                    # As ProcessPoolExecutor counts: only a worker's result gives a worker back, and
                    # this task never reached one (its test_saturation submits tasks that cannot
                    # be pickled, and expects a worker started for each).
                    self._unsent += 1
            else:
                self._track_locked(fut, counted)
                tracked = True
        if grow:
            self._grow()
        if tracked:
            fut.add_done_callback(self._on_done)
        return fut

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[R]:
        """``map(fn, *iterables)`` on the workers, like ``ProcessPoolExecutor.map``.

        The iterables are read at once and sent as tasks of ``chunksize``
        items; results are yielded in order. ``timeout`` (seconds from this
        call) bounds the wait for each result (``TimeoutError``). An
        exception is raised when its item is reached; the rest is cancelled.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else timeout + time.monotonic()
        callee = self._wire_fn(fn)
        op = driver_operation(implicit(fn)) if isinstance(callee, str) else None
        name = callee
        submitter: Runtime | JobOptions = self._rt
        if op is not None and op.options != TaskOptions():
            submitter = self._rt.options(retry=op.options.retry, timeout=op.options.timeout)
        chunk_ref = OperationRef(_RUN_CHUNK, None)
        futures: list[Future[Any]] = []
        items = zip(*iterables)
        while True:
            chunk = [list(args) for args in itertools.islice(items, chunksize)]
            if not chunk:
                break
            with self._lock:
                self._check_open_locked()
                counted, grow = self._take_worker_locked()
                fut: Future[Any] = submitter.submit(chunk_ref, self._init, name, chunk)
                self._track_locked(fut, counted)
            if grow:
                self._grow()
            fut.add_done_callback(self._on_done)
            futures.append(fut)
        return self._results(futures, op, end)

    @staticmethod
    def _results(futures: list[Future[Any]], op: Operation | None, end: float | None) -> Generator[Any, None, None]:
        convert = op is not None and op.returns not in (Any, object)
        futures.reverse()
        try:
            while futures:
                values = futures[-1].result() if end is None else futures[-1].result(end - time.monotonic())
                futures.pop()  # the future holds the chunk's values: let it go first
                values.reverse()
                # No local holds a value while the caller has it: a result it drops is freed.
                while values:
                    yield op.convert_result(values.pop()) if convert else values.pop()  # type: ignore[union-attr]
        finally:
            for fut in futures:
                fut.cancel()

    def _take_worker_locked(self) -> tuple[bool, bool]:
        """Take an idle worker for the task being submitted: (counted, start one more for it).

        As ``ProcessPoolExecutor`` decides (its idle-worker semaphore): a
        worker is idle unless a task submitted through this executor still
        holds it (or a submit took it for a task that could not be sent); a
        submit that finds none idle starts one more, up to ``max_workers``. Counted from the futures themselves, so a caller that
        saw a result finds its worker idle at its next submit, whichever
        thread settled the future and ran its callbacks. Once every worker is
        started nothing is counted (``counted`` False).
        """
        if self._started >= self._max_workers:
            return False, False
        busy = self._busy
        for fut in [f for f in busy if f.done()]:  # at most max_workers futures: one per worker taken
            busy.discard(fut)
        if len(busy) + self._unsent < self._started:
            return True, False
        self._started += 1
        if self._started >= self._max_workers:
            busy.clear()  # all started: nothing is counted from now on
            return False, True
        return True, True

    def _grow(self) -> None:
        """Start one more worker (not under the executor's lock: spawning waits for the process)."""
        try:
            self._rt._driver.lifecycle.spawn()
        except Exception as exc:  # shut down meanwhile, or no process to be had: the others serve
            logger.debug("executor could not start another worker: %s", exc)

    def _on_done(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(fut)
            self._busy.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, _InitializerFailed):
            self._mark_broken(exc)
            self._fail_pending()

    def _mark_broken(self, cause: BaseException) -> None:
        with self._lock:
            if self._broken is not None:
                return
            broken = RuntimeBrokenError(
                f"a worker failed to run the initializer; the executor is not usable anymore ({cause})"
            )
            broken.__cause__ = cause
            self._broken = broken
            self._shutdown = True
        logger.error("executor broken: %s", cause)

    def _fail_pending(self) -> None:
        """Fail every pending future with the broken error; stop the workers."""
        with self._lock:
            broken = self._broken
            if broken is None or self._failed_pending:
                return
            self._failed_pending = True
            pending = list(self._pending)
            self._pending.clear()
        for fut in pending:
            call = fut._phalanx_call  # drop the task first: it must not be dispatched once failed
            if call is not None:
                call.cancel()
            try:
                fut.set_exception(broken)
            except concurrent.futures.InvalidStateError:
                pass
        self._start_closer(wait=False)

    # ---- ending -------------------------------------------------------------------

    def _start_closer(self, wait: bool) -> threading.Thread:
        """The thread that shuts the runtime down, started once. Python 3.12 starts no thread
        while the interpreter exits (``threading._register_atexit`` hooks run then): there the
        shutdown runs on this thread instead, and the thread returned was never started."""
        with self._lock:
            closer = self._closer
            if closer is not None:
                return closer
            closer = self._closer = threading.Thread(
                target=self._close, args=(wait,), name="phalanx-executor-shutdown", daemon=False
            )
            try:
                closer.start()  # under the lock: nobody may join it before it started
                return closer
            except RuntimeError:  # "can't create new thread at interpreter shutdown"
                pass
        self._close(wait)
        return closer

    def _close(self, wait: bool) -> None:
        try:
            self._rt.shutdown(wait=wait)
        except Exception:
            logger.exception("executor shutdown failed")

    def _abort(self) -> None:
        """Cancel what has not started and stop the workers now, without waiting for running tasks.

        What joblib's ``abort_everything`` asks of a backend (loky kills its
        workers): the futures of running tasks fail with RuntimeClosedError.
        """
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        for fut in pending:
            fut.cancel()
        self._start_closer(wait=False)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more work; let queued work finish (or cancel it); stop the workers.

        ``wait=False`` returns at once while queued work still runs and the
        workers stop afterwards, in a background thread. ``cancel_futures``
        cancels every future that has not started. Idempotent.
        """
        with self._lock:
            self._shutdown = True
            cancel = list(self._pending) if cancel_futures else []
        for fut in cancel:
            fut.cancel()
        closer = self._start_closer(wait=True)
        if wait and closer.ident is not None and threading.current_thread().name != "phalanx-pump":
            closer.join()


class _WorkerProcess:
    """A local worker seen as a ``multiprocessing.Process`` (``Executor._processes``): pid, is_alive,
    join, terminate, kill; ``exitcode`` once it is known to have ended (None otherwise)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exitcode: int | None = None

    def _proc(self) -> Any:
        import psutil

        try:
            return psutil.Process(self.pid)
        except psutil.Error:
            return None

    def is_alive(self) -> bool:
        import psutil

        proc = self._proc()
        try:
            return proc is not None and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def join(self, timeout: float | None = None) -> None:
        """Wait until the worker ended (at most ``timeout`` seconds)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.is_alive():
            if end is not None and time.monotonic() >= end:
                return
            time.sleep(0.01)

    def terminate(self) -> None:
        self._signal("terminate")

    def kill(self) -> None:
        self._signal("kill")

    def _signal(self, how: str) -> None:
        import psutil

        proc = self._proc()
        try:
            if proc is not None:
                getattr(proc, how)()
        except psutil.Error:
            pass

    def __repr__(self) -> str:
        return f"<phalanx worker process pid={self.pid}>"


#: executors not shut down yet, finished at interpreter exit
_LIVE: weakref.WeakSet[Executor] = weakref.WeakSet()
_hooked = False
_hook_lock = threading.Lock()


def _finish_at_exit(ex: Executor) -> None:
    """Have ``ex``'s pending work complete when the interpreter exits, as ``ProcessPoolExecutor``'s does.

    ``threading._register_atexit`` (what concurrent.futures uses) runs before
    the interpreter joins its threads and before ``atexit`` handlers, while
    the runtime's pump thread still runs.
    """
    global _hooked
    with _hook_lock:
        _LIVE.add(ex)
        if _hooked:
            return
        try:
            threading._register_atexit(_finish_all)  # type: ignore[attr-defined]
        except RuntimeError:  # the interpreter is already exiting: the runtime's own atexit stops it
            return
        _hooked = True


def _finish_all() -> None:
    # A worker forked from this process (start method "fork") inherits this hook
    # and the executors: at its own exit it must not try to finish them.
    me = os.getpid()
    executors = [ex for ex in list(_LIVE) if ex._pid == me]
    for ex in executors:  # all start finishing at once, then each is waited for
        ex.shutdown(wait=False)
    for ex in executors:
        ex.shutdown(wait=True)


# --------------------------------------------------------------------------- #
# Worker side
# --------------------------------------------------------------------------- #

#: executor token -> (pid that ran its initializer, the error it raised)
_INITIALIZED: dict[str, tuple[int, BaseException | None]] = {}


def _ensure_initialized(init: list[Any]) -> None:
    """Run the executor's initializer once in this worker process."""
    token, init_fn, initargs = init
    init_name = init_fn if isinstance(init_fn, str) else repr(init_fn)
    pid = os.getpid()
    state = _INITIALIZED.get(token)
    if state is not None and state[0] == pid:
        if state[1] is None:
            return
        failure: BaseException = state[1]
    else:
        try:
            op = _callee(init_fn)
            args, _ = op.convert_args(list(initargs), None)
            op.fn(*args)
        except BaseException as exc:  # the initializer's failure breaks the executor
            _INITIALIZED[token] = (pid, exc)
            failure = exc
        else:
            _INITIALIZED[token] = (pid, None)
            return
    raise _InitializerFailed(
        f"the initializer {init_name} failed in worker pid {pid}: {type(failure).__name__}: {failure}"
    ) from failure


def _named(fn: Any) -> bool:
    return isinstance(fn, str) or isinstance(getattr(fn, "__phalanx_operation__", None), str)


def _callee(fn: Any) -> Operation:
    """The operation named ``fn``, or (``local_pickle``) the callable ``fn`` as one (worker side)."""
    if isinstance(fn, str):
        return resolve(fn)
    if not callable(fn):
        raise TypeError(f"{type(fn).__name__} is not callable")
    return Operation(repr(fn), fn)


@operation
def _run_call(init: list[Any], fn_name: Any, args: list[Any], kwargs: dict[str, Any] | None) -> Any:
    """Run one call after the executor's initializer (worker side)."""
    _ensure_initialized(init)
    op = _callee(fn_name)
    a, kw = op.convert_args(args, kwargs)
    return op.fn(*a, **kw)


@operation
def _run_chunk(init: list[Any] | None, fn_name: Any, items: list[list[Any]]) -> list[Any]:
    """Run ``fn(*args)`` for each item of one ``map`` chunk (worker side)."""
    if init is not None:
        _ensure_initialized(init)
    op = _callee(fn_name)
    ctx = current_task()
    out: list[Any] = []
    for args in items:
        ctx.check()
        a, _ = op.convert_args(args, None)
        out.append(op.fn(*a))
    return out


@operation
def _run_calls(calls: list[Any]) -> list[Any]:
    """Run ``[fn_name, args, kwargs]`` calls in order; their results (worker side).

    What the joblib backend sends for one batch.
    """
    ctx = current_task()
    out: list[Any] = []
    for fn_name, args, kwargs in calls:
        ctx.check()
        op = _callee(fn_name)
        a, kw = op.convert_args(args, kwargs)
        out.append(op.fn(*a, **kw))
    return out
