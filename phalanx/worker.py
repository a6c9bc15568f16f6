"""The worker process: a small loop that runs tasks and sends their outcomes.

Runs in every worker process (started by :mod:`phalanx.supervisor`)::

    driver ROUTER "tasks"  ──▶ inbox DEALER ──▶ main thread: run task ─▶ outbox DEALER ──▶ driver ROUTER "results"
      (a local worker: one socketpair, "the pipe", both ways instead; see phalanx.transport.pipe)
    driver PUB "control"   ──▶ SUB ──▶ control thread: Sync, Terminate, Shutdown, Reclaim,
                                       task timeouts ─▶ side DEALER ("<id>!") ──▶ driver ROUTER "results"
      (a local worker: a second socketpair, "the control pipe", in place of the SUB; the control
       thread writes to the pipe under a lock shared with the main thread, in place of the side
       DEALER. A local worker makes no ZeroMQ context at all)

The main thread owns the inbox and outbox (or reads the pipe) and runs user code through
:class:`phalanx.core.execute.TaskRunner` (the code simulated workers run too); while it
runs a task with outcomes batched, the "phalanx-flush" thread may send them (``_Flusher``;
the main thread's writes and its hold ``send_lock``); the control
thread owns the SUB and side sockets, so a task that never returns still sees
its abort flag set, still has its timeout reported, and is still killed after
the grace period.

Invariants kept:

* **Bad input never kills.** A malformed frame is counted and dropped (the
  running count rides on every ``Results`` and ``InspectReply``: the driver
  shows it as ``WorkerStats.frames_dropped``); an
  unknown operation, an argument that does not convert, an exception (even
  ``SystemExit``) in user code, or a result that cannot be encoded
  (``EncodeError``, or whatever its pickling raised, ``SystemExit`` too) or would make a frame above ``max_frame``
  (``FrameTooLargeError``) becomes an ``Err`` outcome for that task, and the
  loop goes on. A map chunk's values that fit only in part go in part (the
  driver runs the rest again).
* **One outcome per task.** Every ``Call``/``Chunk`` received gets exactly one
  ``Ok`` or ``Err`` (from the main thread, or from the control thread when it
  timed out or its job was terminated while it ran), which returns its
  credit to the driver. A task that ignores its abort flag for
  ``abort_grace`` seconds ends the worker with exit status ``ABORT_EXIT``,
  which the driver counts as a planned replacement, not a crash.
* **No orphans.** The worker asks the kernel for SIGTERM when its parent dies
  (Linux ``PR_SET_PDEATHSIG``), runs in its own process group, and a watchdog
  thread also checks the parent every 100 ms; either way it kills its whole
  process group, so anything user code spawned goes with it.
* **A remote worker told to leave says so.** :data:`LEAVE_SIGNAL` (SIGUSR1)
  from ``phalanx worker`` stopping makes a worker spawned with ``goodbye`` send
  Goodbye and wait up to :data:`GOODBYE_WAIT` for the driver's Stop before it
  kills its group, so the driver redelivers its tasks at once instead of
  after ``heartbeat_timeout``. SIGTERM (the parent-death signal, the host
  going down hard) never says goodbye: silence, and the heartbeat timeout, as
  for a lost host. A signal of its own, because the parent-death SIGTERM can
  arrive while ``getppid()`` still names the dying parent (the kernel first
  re-parents a child to another thread of the same process).
* **A local worker is Ready early, never falsely.** Its start (:func:`run_worker`):
  orphan guard (the parent-death signal is armed before anything else), prefixed
  output (which runs the inherited logging handlers' code), then Hello and Ready
  in one write on its pipe, then the rest of its set-up (limits, shared memory,
  the loop and its control thread) while the driver's Welcome, first tasks and
  control messages wait in its two socketpairs, read in order once it serves.
  What can fail a start for the user's reasons (a handler that raises, an
  ``imports`` module: such a worker says Hello and Ready only after importing)
  happens before the Ready, so a failed start is reported as one.
* **Lone calls are not delayed.** Outcomes are batched only while more tasks
  are already waiting and the previous one was quick; a batched outcome waits
  at most ``BATCH_HOLD`` for the task after it (the "phalanx-flush" thread
  sends it if that task runs longer), never for the whole of a long task.
  A slow task's outcome goes out before the driver is read again; the driver
  is read when the queue runs dry, or to decide whether a quick task's
  outcome may wait.
"""

from __future__ import annotations

import _thread
import ctypes
import importlib
import os
import select
import signal
import socket as _socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from . import channels
from .actors.host import ActorHost
from .core.execute import TaskRunner, abort
from .errors import EncodeError, FrameTooLargeError, ProtocolError, TaskCancelledError, TaskTimeoutError
from .logs import install_worker_output
from .registry import operations
from .registry.operations import resolve
from .transport import shm, sockets
from .transport.codec import (
    DECODE_ERRORS,
    PickleFailed,
    UnpickleFailed,
    decode_control,
    decode_inbox,
    encode,
    error_info,
    inbox_decoder,
    pack,
    salvage_inbox,
)
from .transport.endpoints import Endpoints
from .transport.pipe import FramePipe, PipeError, as_written
from .transport.messages import (
    ActorCall,
    ActorState,
    Alive,
    Call,
    Chunk,
    Err,
    ErrorInfo,
    Goodbye,
    Hello,
    InspectReply,
    InspectRequest,
    Reclaim,
    Reclaimed,
    Ok,
    Outcome,
    Ready,
    Results,
    Retire,
    SaveActor,
    Shutdown,
    SpawnActor,
    Stop,
    StopActor,
    Sync,
    Terminate,
    Welcome,
    new_inbox,
)

if TYPE_CHECKING:
    import asyncio
from .transport.messages import Heartbeat as _Heartbeat

__all__ = ["WorkerSpec", "TaskContext", "current_task", "guard_against_orphaning", "run_worker",
           "start_watchdog",
           "worker_spec"]

#: outcomes sent in one Results message at most
BATCH_MAX = 256
#: a task quicker than this lets the next outcome share a message
QUICK_TASK = 0.0002
#: seconds a batched outcome waits for the task after it before it goes alone (that task may be long)
BATCH_HOLD = 0.005
#: seconds the flush thread goes on checking for a batch to flush after the last task that armed it,
#: before it sleeps until the next arm wakes it (see _Flusher._run)
FLUSH_IDLE = 0.1
#: seconds to wait for batched outcomes to leave before running a redelivered task
SENT_WAIT = 1.0
#: seconds between watchdog checks of the parent
WATCHDOG_PERIOD = 0.1
#: longest a control thread without heartbeats to send or check sleeps: its messages wake it,
#: and timeouts and kills are timed exactly; each wake costs its worker the GIL and ~0.1 ms
CONTROL_IDLE = WATCHDOG_PERIOD
#: seconds a terminated job id is remembered (paladin keeps its map as long)
TERMINATED_TTL = 60.0
#: seconds a leaving worker waits for the driver to acknowledge its Goodbye
GOODBYE_WAIT = 1.0
#: largest control frame read from a local worker's control pipe (one SOCK_SEQPACKET message)
_CONTROL_MAX = 1 << 20
#: exit status of a worker that ended itself because its task ignored the abort flag
#: for ``abort_grace`` seconds: the driver replaces it without counting a crash
ABORT_EXIT = 111


class WorkerSpec(msgspec.Struct, frozen=True):
    """What a worker process needs to know, given to it at spawn."""

    worker_id: str
    endpoints: Endpoints
    credits: int
    parent_pid: int
    imports: list[str] = []
    #: seconds an aborted or timed-out task may keep running before the worker is killed
    abort_grace: float = 2.0
    #: RSS in bytes above which the worker retires between tasks (0: no limit)
    max_memory: int = 0
    #: seconds without a driver heartbeat before the worker gives up (0: never)
    heartbeat_timeout: float = 0.0
    #: on a lost driver, keep waiting for it instead of exiting
    reconnect: bool = False
    #: seconds between this worker's Alive heartbeats to the driver (sent when
    #: ``heartbeat_timeout`` is set, i.e. over tcp)
    heartbeat_interval: float = 0.5
    #: CURVE client keys for tcp endpoints (None: plaintext or ipc)
    curve: sockets.Curve | None = None
    #: prefix this worker's output lines with "[<worker id>] "
    prefix_output: bool = True
    #: the worker tags it serves: only work routed to one of them is sent to it
    tags: tuple[str, ...] = ("default",)
    #: its sockets' high-water mark and largest accepted frame
    limits: sockets.Limits = sockets.Limits()
    #: seconds it polls for its next task before blocking (0: blocks at once)
    spin: float = 0.0
    #: level of a stderr handler on its ``phalanx`` loggers (None: none added)
    log_level: str | None = None
    #: it also runs unregistered module-level functions named ``module:qualname``
    implicit_operations: bool = False
    #: a local worker of a ``local_pickle`` runtime: its pipe carries pickles both ways
    local_pickle: bool = False
    #: the host name it reports in Hello and inspect replies ("": ``socket.gethostname()``)
    host: str = ""
    #: on LEAVE_SIGNAL from its parent, tell the driver it leaves (Goodbye) before exiting
    goodbye: bool = False
    #: bytes from which a local worker sends arrays in results through shared memory (0: never)
    shm_threshold: int = 0
    #: a local worker's Hello and Ready, framed for its pipe by the driver, its pid left to fill
    #: in (:func:`greeting`): a worker forked by the fork server sends them before it builds
    #: anything of its own ("": the worker makes them itself)
    greeting: bytes = b""


class TaskContext:
    """The task an operation is running in; see :func:`current_task`.

    ``aborted`` becomes true when the task's job is cancelled or terminated,
    or its timeout passes. A cooperative operation checks it (or calls
    :meth:`check`) and returns early; one that ignores it is killed with its
    worker after the abort grace period.
    """

    __slots__ = ("job", "seq", "attempt", "timeout", "started", "aborted", "timed_out", "answered", "values", "rest")

    def __init__(self, job: int, seq: int, attempt: int, timeout: float) -> None:
        self.job = job
        self.seq = seq
        self.attempt = attempt
        self.timeout = timeout
        self.started = time.monotonic()
        self.aborted = False
        self.timed_out = False
        #: the control thread already sent this task's outcome (timed out, or its job terminated)
        self.answered = False
        self.values: list[Any] = []
        #: what the map loop has yet to call (see phalanx.core.execute.abort)
        self.rest: Iterator[Any] | None = None

    def check(self) -> None:
        """Raise :class:`~phalanx.TaskCancelledError` if the task was aborted."""
        if self.aborted:
            raise TaskCancelledError(f"task {self.seq} of job {self.job} was aborted")


_LOCAL = TaskContext(0, 0, 0, 0.0)
_current: TaskContext | None = None


def current_task() -> TaskContext:
    """The context of the task running in this worker.

    Outside a worker (an operation called locally) it returns a context that
    is never aborted.
    """
    return _current if _current is not None else _LOCAL


def _kill_own_group() -> None:
    try:
        shm.release_orphaned()  # the driver died: what it never read is ours to remove
    except Exception:
        pass
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(1)


def _abandon_task() -> None:
    """End this worker (and what its tasks spawned) because a task ignored its abort flag.

    Exits with :data:`ABORT_EXIT`, not a signal, so that the driver can tell
    this planned end from a crash (any other exit, a SIGKILL included).
    """
    try:
        _end_own_group()
    finally:
        os._exit(ABORT_EXIT)


#: the signal ``phalanx worker`` sends its workers when it leaves (SIGTERM: die silently)
LEAVE_SIGNAL = signal.SIGUSR1
#: says Goodbye to the driver (main thread); set when the spec asks for it
_goodbye: Callable[[], None] | None = None
_leaving = False


def _on_sigterm(signum: int, frame: Any) -> None:
    _kill_own_group()


#: held (blocked) across a fork, so one that comes in between reaches the child's default action
_WORKER_SIGNALS = {signal.SIGTERM, LEAVE_SIGNAL}


def _hold_worker_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)


def _release_worker_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)


def _forget_worker_signals() -> None:
    """In a process forked from a worker: SIGTERM and the leave signal act as by default."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(LEAVE_SIGNAL, signal.SIG_DFL)
    _release_worker_signals()


def _on_leave(signum: int, frame: Any) -> None:
    global _leaving
    hook = _goodbye
    if hook is not None and not _leaving:  # a second request, or a SIGTERM, ends the wait
        _leaving = True
        try:
            hook()
        except BaseException:
            pass
    _kill_own_group()


def _end_own_group() -> None:
    """SIGKILL every other process in this worker's group (what its tasks spawned).

    Runs when the worker exits on its own (Stop, Shutdown, retirement): a
    process a task started must not outlive the worker, even daemonised.
    """
    me = os.getpid()
    try:
        if os.getpgrp() != me:
            return  # not our own group (setpgid failed): not ours to clean
    except OSError:
        return
    # getpgid over /proc's pids: psutil.process_iter() would read every process's stat
    # file first, milliseconds at each worker's exit on a busy host.
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:  # no /proc (not Linux)
        import psutil

        pids = psutil.pids()
    members = []
    for pid in pids:
        try:
            if pid != me and os.getpgid(pid) == me:
                members.append(pid)
        except OSError:
            continue
    if not members:
        return
    import psutil  # imported late: only a worker whose tasks left processes behind pays for it

    for pid in members:
        try:
            proc = psutil.Process(pid)
            if os.getpgid(pid) == me:  # still ours (psutil.Process names one process, not a reused pid)
                proc.kill()
        except (OSError, psutil.Error):
            pass


def _find_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


#: ``signal.signal`` without its wrapper (the C function it wraps, given plain ints), which turns
#: the old handler into an enum member: in a worker just forked, that enum machinery cost
#: ~0.2 ms of page faults for the three handlers the orphan guard sets
_set_handler: Callable[[int, Any], Any] = getattr(importlib.import_module("_signal"), "signal", signal.signal)
_SIG_IGN = int(signal.SIG_IGN)
_SIGINT, _SIGTERM, _LEAVE = int(signal.SIGINT), int(signal.SIGTERM), int(LEAVE_SIGNAL)

#: libc's prctl, found once at import (in the driver): a worker inherits it, where loading
#: libc again would cost each worker ~0.3 ms of its start-up (ctypes makes a class per library)
_prctl = _find_prctl()

#: whether the driver (and the parent) still live, for the control thread to check when the
#: guard started no watchdog thread of its own (None: not guarded, or it did)
_driver_alive: Callable[[], bool] | None = None
#: the driver's pid and the parent's as the guard was armed (see _parents_alive)
_guarded = (0, 0)


def _parents_alive() -> bool:
    """The parent the worker had when guarded is still its parent, and the driver lives."""
    parent_pid, initial_ppid = _guarded
    if os.getppid() != initial_ppid:
        return False
    if parent_pid != initial_ppid:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return True


def guard_against_orphaning(parent_pid: int, watchdog: bool = True) -> None:
    """Die, with everything this worker spawned, when the parent dies.

    Called once per worker process, by :func:`run_worker`.
    ``watchdog=False``: no thread checks the parent; the caller checks
    :data:`_driver_alive` itself (a worker's control thread does, every
    :data:`WATCHDOG_PERIOD`; until it runs, the parent-death signal covers).
    """
    global _driver_alive, _guarded
    try:
        os.setpgid(0, 0)  # own group: the driver's Ctrl-C is the driver's to handle (a no-op if it is)
    except OSError:
        pass  # a session leader (EPERM) leads its own group already
    _set_handler(_SIGINT, _SIG_IGN)
    _set_handler(_SIGTERM, _on_sigterm)
    _set_handler(_LEAVE, _on_leave)
    # A process a task forks (multiprocessing's fork context, os.fork) is not a worker: a
    # SIGTERM to it must end it alone, not kill this worker's whole group from inside.
    os.register_at_fork(before=_hold_worker_signals, after_in_parent=_release_worker_signals,
                        after_in_child=_forget_worker_signals)
    if _prctl is not None:
        _prctl(1, _SIGTERM)  # PR_SET_PDEATHSIG (a plain int: no enum member touched)
    # Under a fork server the parent is the fork server, not the driver: watch both. (A function
    # of the module, not a closure: a worker just forked makes no function object to start.)
    _guarded = (parent_pid, os.getppid())
    if not _parents_alive():  # the parent died before prctl took effect
        _kill_own_group()
    _driver_alive = _parents_alive
    if watchdog:
        start_watchdog()


#: a watchdog thread runs (see start_watchdog)
_watching = False


def start_watchdog() -> None:
    """Check every :data:`WATCHDOG_PERIOD` that the driver lives, on a thread of its own
    (once; after :func:`guard_against_orphaning`)."""
    global _watching
    alive = _driver_alive
    if _watching or alive is None:
        return
    _watching = True

    def watchdog() -> None:
        while True:
            if not alive():
                _kill_own_group()
            time.sleep(WATCHDOG_PERIOD)

    # Not threading.Thread: its start() waits until the new thread runs, a wait the worker's
    # start-up need not take (the parent-death signal covers it meanwhile).
    _thread.start_new_thread(watchdog, ())


class _Side:
    """Where the control thread sends (timeouts, aborts, Reclaimed, inspect replies, Alive).

    A remote worker: its side DEALER (identity ``<id>!``). A local worker: its
    pipe, under the write lock it shares with the main thread, so frames of the
    two threads never interleave.
    """

    __slots__ = ("loop", "sock")

    def __init__(self, loop: _Loop, sock: zmq.Socket[bytes] | None) -> None:
        self.loop = loop
        self.sock = sock

    def send(self, frame: bytes, block: bool = True) -> None:
        if self.sock is not None:
            try:
                self.sock.send(frame, 0 if block else zmq.NOBLOCK)
            except zmq.Again:
                if block:
                    raise
            return
        loop = self.loop
        assert loop.pipe is not None
        with loop.write_lock:
            try:
                loop.pipe.send_blocking(frame)
            except PipeError:
                loop.stopping = True  # the driver is gone


def _reraise_exit(exc: BaseException) -> None:
    """Raise ``exc`` again if it is this worker's own interpreter exiting, not a failure to encode a result."""
    if sys.is_finalizing():
        raise exc


def _sending_error(exc: BaseException, what: str) -> BaseException:
    """The error a task fails with when encoding its result (``what``) raised ``exc``.

    An ``EncodeError`` (a ``PickleFailed`` stays a ``PicklingError``) naming
    what could not be sent; any other ``BaseException`` (a ``SystemExit`` or
    ``KeyboardInterrupt`` a ``__reduce__`` raised while pickling it) is that
    exception itself, as ``ProcessPoolExecutor`` reports it: user code, not
    this worker, raised it (the worker's own exits are ``os._exit``, and it
    ignores SIGINT), so the worker lives on.
    """
    if not isinstance(exc, Exception):
        return exc
    kind = PickleFailed if isinstance(exc, PickleFailed) else EncodeError  # a PicklingError stays one
    return kind(f"{what} cannot be sent: {exc.__cause__ or exc}")


def _special_error(job: int, exc: BaseException) -> ErrorInfo:
    info = error_info(exc)
    return ErrorInfo(type=info.type, message=info.message, args=info.args, traceback="")


class _Terminated:
    """Ids of terminated jobs, each forgotten ``ttl`` seconds after its Terminate.

    A task of such a job still queued here (or arriving after the broadcast)
    is answered with ``TaskCancelledError`` instead of being run. Entries
    are kept in the order they were added, so reaping by age only looks at
    the oldest. ``add`` and ``reap`` run on the control thread; the main
    thread only tests membership.
    """

    __slots__ = ("ttl", "clock", "_since")

    def __init__(self, ttl: float = TERMINATED_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._since: dict[int, float] = {}

    def add(self, job: int) -> None:
        now = self.clock()
        self._since.pop(job, None)  # re-added: moves to the young end
        self._since[job] = now
        self.reap(now)

    def reap(self, now: float | None = None) -> None:
        """Forget every job terminated more than ``ttl`` seconds ago."""
        since = self._since
        if not since:
            return
        cutoff = (self.clock() if now is None else now) - self.ttl
        while since:
            oldest = next(iter(since))
            if since[oldest] > cutoff:
                return
            del since[oldest]

    def __contains__(self, job: object) -> bool:
        return job in self._since

    def __len__(self) -> int:
        return len(self._since)


#: one step of a directive chain on the worker: (operation, its function, its argument converter)


class _Flusher:
    """Sends batched outcomes that waited ``BATCH_HOLD`` while the main thread runs a task.

    The main thread arms it before running a task while outcomes are batched
    and disarms it after; the "phalanx-flush" thread (started at the first
    arm) flushes once the hold is over. Every write to the driver holds the
    worker's ``send_lock``; the flush thread takes it (without waiting)
    before it lets go of its condition, so once ``disarm()`` returns no flush
    of it is under way and the main thread owns the batch again.
    """

    def __init__(self, worker: _Loop) -> None:
        self.worker = worker
        self.cond = threading.Condition(threading.Lock())
        #: when the batch is due (0: disarmed), and when it last was (not reset by disarm)
        self.due = self.last_due = 0.0
        #: the flush thread sleeps until notified (it rechecks no deadline by itself)
        self.waiting = False
        self.thread: threading.Thread | None = None
        #: what a flush of the flush thread raised: the main thread raises it (see disarm)
        self.error: BaseException | None = None

    def arm(self) -> None:
        with self.cond:
            self.due = self.last_due = time.monotonic() + BATCH_HOLD
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="phalanx-flush", daemon=True)
                self.thread.start()
            elif self.waiting:  # asleep without a deadline; one already sleeping to a deadline rechecks it
                self.cond.notify()

    def disarm(self) -> None:
        """Stop the hold; raise what a flush of the flush thread raised (as the main thread's would)."""
        with self.cond:
            self.due = 0.0
        with self.worker.send_lock:  # a flush that started before is over
            error, self.error = self.error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        cond, worker = self.cond, self.worker
        with cond:
            while True:
                if not self.due:
                    if time.monotonic() - self.last_due < FLUSH_IDLE:
                        # Tasks are flowing: look again after BATCH_HOLD rather than be woken by
                        # the next arm (a thread wake-up per task). A wait this long that began
                        # before an arm ends before that arm's deadline, so no flush is late.
                        cond.wait(BATCH_HOLD)
                        continue
                    self.waiting = True
                    cond.wait()
                    self.waiting = False
                    continue
                left = self.due - time.monotonic()
                if left > 0:
                    cond.wait(left)
                    continue
                if not worker.send_lock.acquire(blocking=False):
                    cond.wait(BATCH_HOLD)  # the main thread is writing (never wait for it holding cond)
                    continue
                self.due = 0.0
                cond.release()
                try:
                    worker.flush()
                except BaseException as exc:  # noqa: B036 - the main thread raises it
                    self.error = exc
                finally:
                    worker.send_lock.release()
                    cond.acquire()


class _Control:
    """The control thread: owns the SUB and side sockets (or the control pipe): control
    broadcasts, aborts, timeouts; also the orphan watchdog (see guard_against_orphaning)."""

    def __init__(self, loop: _Loop) -> None:
        self.loop = loop
        #: held while the thread runs (a bare lock: a worker makes no Event, no Condition, to start)
        self._done = _thread.allocate_lock()
        self._started = False
        self.kill_at = 0.0
        self.heard = time.monotonic()
        self.lost = False
        self.side: _Side | None = None
        #: malformed control frames dropped (this thread's own count: no shared +=)
        self.frames_dropped = 0

    def start(self) -> None:
        # Not threading.Thread: its start() waits until the new thread runs (a hand-off
        # between threads the worker's start-up need not wait for).
        if not self._started:
            self._started = True
            self._done.acquire()
            _thread.start_new_thread(self._main, ())

    def join(self, timeout: float | None = None) -> None:
        if self._started and self._done.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._done.release()

    def _main(self) -> None:
        try:
            self.run()
        except BaseException:
            if not self.loop.stopping:
                import traceback

                traceback.print_exc()
                _kill_own_group()  # no control thread: no timeouts, aborts or watchdog
        finally:
            self._done.release()

    def run(self) -> None:
        loop = self.loop
        spec = loop.spec
        local = loop.control_in
        alive = None if _watching else _driver_alive
        next_watch = time.monotonic() + WATCHDOG_PERIOD
        sub: zmq.Socket[bytes] | None = None
        poller = select.poll()
        if loop.pipe is None:
            sub, dealer = loop._control_sockets()
            side = _Side(loop, dealer)
        else:
            side = _Side(loop, None)
            if local is not None:
                poller.register(local.fileno(), select.POLLIN)
        self.side = side
        beats = 0
        next_beat = 0.0
        try:
            while not loop.stopping:
                if sub is not None:
                    if sub.poll(self._next_wait()):
                        self._drain(self._sub_frames(sub))
                elif local is not None:
                    if poller.poll(self._next_wait()):
                        frames = self._pipe_frames(local)
                        if frames is None:  # the driver closed it: its pipe says the rest
                            poller.unregister(local.fileno())
                            local = None
                        else:
                            self._drain(frames)
                else:
                    time.sleep(self._next_wait() / 1000)
                if loop.inbox_monitor is not None and sockets.events(loop.inbox_monitor):
                    loop.inbox_back = True
                # (Each check called only when it may have something to do: a worker's first
                # task is usually done before this thread first ran them all.)
                if loop.current is not None or self.kill_at:  # read again under the lock there
                    self._check_timers(side)
                if spec.heartbeat_timeout > 0:
                    self._check_driver()
                if alive is not None and time.monotonic() >= next_watch:
                    next_watch = time.monotonic() + WATCHDOG_PERIOD
                    if not alive():
                        _kill_own_group()
                if loop.terminated._since:
                    loop.terminated.reap()
                if spec.heartbeat_timeout > 0 and loop.welcomed and time.monotonic() >= next_beat:
                    # Over tcp the driver cannot see this process die: tell it we live. Only
                    # once welcomed: before, the driver has no record of this worker (the Alive
                    # and the Hello travel on different connections), and counts it as bad input.
                    next_beat = time.monotonic() + spec.heartbeat_interval
                    beats += 1
                    try:
                        side.send(encode(Alive(spec.worker_id, beats)), block=False)
                    except zmq.ZMQError:
                        pass
        finally:
            sockets.close(sub, side.sock, loop.inbox_monitor)
            if loop.control_in is not None:
                loop.control_in.close()

    def _next_wait(self) -> int:
        ctx = self.loop.current
        spec = self.loop.spec
        idle = CONTROL_IDLE * 1000
        waits = [idle if spec.heartbeat_timeout <= 0 else min(50.0, spec.heartbeat_interval * 1000)]
        now = time.monotonic()
        if ctx is not None and ctx.timeout > 0 and not ctx.answered:
            waits.append((ctx.started + ctx.timeout - now) * 1000)
        if self.kill_at:
            waits.append((self.kill_at - now) * 1000)
        return max(1, int(min(waits)) + 1)

    @staticmethod
    def _sub_frames(sub: zmq.Socket[bytes]) -> list[bytes]:
        frames = []
        while True:
            try:
                frames.append(sub.recv(zmq.NOBLOCK))
            except zmq.Again:
                return frames

    @staticmethod
    def _pipe_frames(control: _socket.socket) -> list[bytes] | None:
        """What arrived on a local worker's control pipe (one message per frame); None at its end."""
        frames: list[bytes] = []
        while True:
            try:
                frame = control.recv(_CONTROL_MAX)
            except (BlockingIOError, InterruptedError):
                return frames
            except OSError:
                return None if not frames else frames
            if not frame:
                return None if not frames else frames
            frames.append(frame)

    def _drain(self, frames: list[bytes]) -> None:
        loop = self.loop
        for frame in frames:
            try:
                msg = decode_control(frame)
            except ProtocolError:
                self.frames_dropped += 1
                continue
            self.heard = time.monotonic()
            if self.lost:
                self.lost = False
                print(f"phalanx worker {loop.spec.worker_id}: driver is back", file=sys.stderr)
            if isinstance(msg, _Heartbeat):
                continue
            if isinstance(msg, InspectRequest):
                self._inspect(msg.nonce)
                continue
            if isinstance(msg, Sync):
                loop.synced = True
                loop.synced_event.set()
            elif isinstance(msg, Terminate):
                loop.terminate(msg.job)
                self._abort(msg.job)
            elif isinstance(msg, Shutdown):
                loop.stopping = True
            elif isinstance(msg, Reclaim) and msg.worker == loop.spec.worker_id:
                self._give_back(msg)

    def _give_back(self, msg: Reclaim) -> None:
        """Give the driver back prefetched tasks this worker will then never run.

        Granted only while the main thread runs ``msg.running``, the oldest
        task the driver gave it: tasks run in the order sent, so every task
        sent after it is unstarted. The main thread skips a task given back
        when it reaches it (see ``_Loop.run``), under the same lock.
        """
        loop = self.loop
        with loop.state_lock:
            ctx = loop.current
            granted = ctx is not None and [ctx.job, ctx.seq, ctx.attempt] == msg.running
            if granted:
                given = loop.given_back
                for job, seq, attempt in msg.tasks:
                    key = (job, seq, attempt)
                    given[key] = given.get(key, 0) + 1  # a task sent here again, then given back again: twice
        assert self.side is not None
        self.side.send(encode(Reclaimed(loop.spec.worker_id, msg.tasks if granted else [])))

    def _abort(self, job: int) -> None:
        """The running task's job was terminated: set its abort flag, answer for it now.

        The driver forgot the job before broadcasting Terminate, so the
        outcome is only dropped there; sent now (as for a timeout) it tells
        the driver that killing this worker after the grace is planned, not
        a crash. Whatever the task returns later is not sent.
        """
        loop = self.loop
        with loop.state_lock:
            ctx = loop.current
            if ctx is None or ctx.job != job or ctx.aborted:
                return
            abort(ctx)
            if not ctx.answered:
                ctx.answered = True
                err = TaskCancelledError(f"task {ctx.seq} of job {job} was aborted: its job was terminated")
                outcome = Err(ctx.job, ctx.seq, ctx.attempt, _special_error(job, err))
                assert self.side is not None
                self.side.send(encode(Results(loop.spec.worker_id, [outcome], 0.0, loop.dropped())))
            self._arm_kill()

    def _inspect(self, nonce: int) -> None:
        loop = self.loop
        try:
            import psutil

            me = psutil.Process()
            cpu, rss = me.cpu_percent(None), me.memory_info().rss
        except Exception:
            cpu, rss = 0.0, 0
        queued = list(loop.todo)
        reply = InspectReply(
            loop.spec.worker_id, nonce, os.getpid(), loop.host, cpu, rss,
            len(queued), loop.tasks_done, actors.info(queued) if (actors := loop._actors) is not None else [],
            loop.dropped(),
        )
        assert self.side is not None
        self.side.send(encode(reply))

    def _check_driver(self) -> None:
        timeout = self.loop.spec.heartbeat_timeout
        if timeout <= 0 or self.lost or time.monotonic() - self.heard < timeout:
            return
        wid = self.loop.spec.worker_id
        if self.loop.spec.reconnect:
            self.lost = True
            print(f"phalanx worker {wid}: no heartbeat for {timeout:g} s; waiting for the driver",
                  file=sys.stderr)
            return
        print(f"phalanx worker {wid}: no heartbeat for {timeout:g} s; driver lost, exiting",
              file=sys.stderr)
        _kill_own_group()

    def _arm_kill(self) -> None:
        deadline = time.monotonic() + self.loop.spec.abort_grace
        if not self.kill_at or deadline < self.kill_at:
            self.kill_at = deadline

    def _check_timers(self, side: _Side) -> None:
        loop = self.loop
        now = time.monotonic()
        with loop.state_lock:
            ctx = loop.current
            if ctx is None:
                self.kill_at = 0.0
                return
            if ctx.timeout > 0 and not ctx.timed_out and not ctx.answered and now - ctx.started > ctx.timeout:
                ctx.timed_out = True
                ctx.answered = True
                abort(ctx)
                err = TaskTimeoutError(
                    f"task {ctx.seq} of job {ctx.job} ran longer than its timeout of {ctx.timeout:g} s"
                )
                outcome = Err(ctx.job, ctx.seq, ctx.attempt, _special_error(ctx.job, err),
                              len(ctx.values), list(ctx.values))
                side.send(encode(Results(loop.spec.worker_id, [outcome], 0.0, loop.dropped())))
                self._arm_kill()
        if self.kill_at and now >= self.kill_at and loop.current is ctx:
            _abandon_task()  # the task ignored its abort flag


#: the ``synced_event`` of every local worker: set from the start (see _Loop)
_SYNCED = threading.Event()
_SYNCED.set()


class _Loop:
    """The worker's state: sockets, queued tasks, outcomes not yet sent."""

    def __init__(self, spec: WorkerSpec, pipe: FramePipe | None = None,
                 control: _socket.socket | None = None, ready_sent: bool = False, host: str = "") -> None:
        """``pipe``: a local worker's (None: ZeroMQ); ``ready_sent``: it said Hello and Ready on it
        already; ``host``: the name it gave (default: the spec's, else this machine's)."""
        self.spec = spec
        self.ident = spec.worker_id.encode()
        self.host = host or spec.host or _socket.gethostname()
        # A local worker talks to the driver over its pipe and hears control messages on its
        # control pipe: it needs no ZeroMQ (a context costs two threads and a connection per
        # socket); a remote one uses ZeroMQ for everything.
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None if pipe is not None else zmq.Context()
        #: a local worker's control pipe (the control thread's; None: a remote worker's SUB)
        self.control_in: _socket.socket | None = None
        if pipe is not None and control is not None:
            control.setblocking(False)
            self.control_in = control
        #: serialises the main and control threads' writes to the pipe (a local worker)
        self.write_lock = threading.Lock()
        self.pipe = pipe
        #: a remote worker's routing identity on the driver's tasks ROUTER ("": a local worker)
        self.inbox_id = ""
        self.inbox_monitor: zmq.Socket[bytes] | None = None
        #: set by the control thread when the inbox reconnected: the main thread says Hello on it again
        self.inbox_back = False
        self.inbox: zmq.Socket[bytes] | None = None
        self.outbox: zmq.Socket[bytes] | None = None
        #: pickles cross its pipe (local_pickle); never a ZeroMQ socket's, whatever the spec says
        self.pickled = spec.local_pickle and pipe is not None
        self._decode = inbox_decoder(self.pickled)
        if pipe is not None:
            self._pipe_poll = select.poll()
            self._pipe_poll.register(pipe.fileno(), select.POLLIN)
        else:
            # A remote worker's inbox identity is a secret it tells only the driver (in Hello),
            # so no other host can connect under it and receive its tasks (see Hello).
            self.inbox_id = new_inbox()
            assert self.ctx is not None
            self.inbox = sockets.dealer(self.ctx, spec.endpoints.tasks, self.inbox_id.encode(), spec.curve,
                                        watch=zmq.EVENT_HANDSHAKE_SUCCEEDED)
            # Its connections, seen by the control thread: on each (a reconnect too) the inbox
            # says Hello again, and the driver, which stops routing to an inbox it could not
            # reach, resumes.
            self.inbox_monitor = sockets.monitor(self.inbox, zmq.EVENT_HANDSHAKE_SUCCEEDED)
            self.outbox = sockets.dealer(self.ctx, spec.endpoints.results, self.ident, spec.curve)
        self.todo: deque[Any] = deque()
        self.tasks_done = 0
        #: runs the tasks (phalanx.core.execute: the same code as a simulated worker's)
        self.runner = TaskRunner(time.monotonic, self._settle, resolve)
        #: the actors living here (made by the first actor message: see ``actors``)
        self._actors: ActorHost | None = None
        self.out: list[Outcome] = []
        #: the largest frame it sends: its own max_frame, or the driver's if smaller (see Welcome)
        self.max_send = spec.limits.max_frame
        #: per outcome in ``out``: its operation's name, and whether it is a map chunk's
        self.out_ops: list[tuple[str, bool]] = []
        self.busy = 0.0
        #: held by the main thread's writes to the driver and the flush thread's (_Flusher); the pipe's
        #: write_lock, which the control thread shares, is taken inside it
        self.send_lock = _thread.RLock()  # (threading.RLock is a Python function around it)
        self._flusher: _Flusher | None = None
        self.terminated = _Terminated()
        self.state_lock = threading.Lock()
        self.current: TaskContext | None = None
        #: (job, seq, attempt) of tasks given back to the driver -> how many of their frames to skip
        #: when they come (under state_lock)
        self.given_back: dict[tuple[int, int, int], int] = {}
        self.welcomed = False
        #: a local worker hears control messages on its own pipe from the start: no Sync to wait for
        self.synced = self.control_in is not None
        #: set with ``synced``: a welcomed worker waits on it, so it says Ready as soon as the Sync comes
        #: (a local worker's is set already: one made at import, not a Condition made by each worker)
        self.synced_event = _SYNCED if self.synced else threading.Event()
        self.ready_sent = ready_sent
        self.stopping = False
        self.retiring = False
        #: malformed inbox frames dropped (main thread; the control thread counts its own)
        self.frames_dropped = 0
        self.memory_checked = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.control = _Control(self)

    @property
    def actors(self) -> ActorHost:
        """The actor host (main thread); made by the first actor message, not at start-up."""
        actors = self._actors
        if actors is None:
            actors = self._actors = ActorHost(self.spec.worker_id, self.send_after_outcomes, self.runner.call)
        return actors

    @property
    def flusher(self) -> _Flusher:
        """Sends held outcomes (see _Flusher); made when the first batch is held, not at start-up
        (its Condition cost each worker ~0.15 ms of page faults as it started)."""
        flusher = self._flusher
        if flusher is None:
            flusher = self._flusher = _Flusher(self)
        return flusher

    def _control_sockets(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        spec = self.spec
        assert self.ctx is not None
        return (sockets.subscriber(self.ctx, spec.endpoints.control, spec.curve),
                sockets.dealer(self.ctx, spec.endpoints.results, self.ident + b"!", spec.curve))

    def dropped(self) -> int:
        """Malformed frames dropped so far, on the inbox and the control SUB (reported to the driver)."""
        return self.frames_dropped + self.control.frames_dropped

    # ---- receiving ---------------------------------------------------------

    def poll(self, timeout_ms: int) -> bool:
        """Wait up to ``timeout_ms`` for something from the driver; True if it came."""
        if self.pipe is not None:
            return bool(self._pipe_poll.poll(timeout_ms))
        assert self.inbox is not None
        return bool(self.inbox.poll(timeout_ms))

    def _frames(self) -> list[bytes]:
        """What the driver sent that arrived whole (does not wait)."""
        if self.pipe is not None:
            try:
                frames = self.pipe.recv()
            except PipeError:
                frames = None  # the driver would never send that: treat it as gone
            if frames is None:
                self.stopping = True  # the driver is gone (the watchdog ends the group)
                return []
            return frames
        assert self.inbox is not None
        out = []
        while True:
            try:
                out.append(self.inbox.recv(zmq.NOBLOCK))
            except zmq.Again:
                return out

    def drain_inbox(self) -> None:
        decode = self._decode
        for frame in self._frames():
            try:
                msg = decode(frame)
            except DECODE_ERRORS as exc:  # bad input, or a local_pickle task whose pickle did not load
                if isinstance(exc, UnpickleFailed) and self._unpicklable(frame, exc):
                    continue
                self.frames_dropped += 1
                continue
            if isinstance(msg, (Call, Chunk, ActorCall, SpawnActor, StopActor, SaveActor)):
                self.todo.append(msg)
            elif isinstance(msg, Welcome):
                self.welcomed = True
                if 0 < msg.max_frame < self.max_send:
                    self.max_send = max(4096, msg.max_frame)
            elif isinstance(msg, Stop):
                self.stopping = True

    def _unpicklable(self, frame: bytes, exc: UnpickleFailed) -> bool:
        """A task whose pickle failed to load (local_pickle) fails with that error; False: not a task."""
        task = salvage_inbox(frame)
        if not isinstance(task, (Call, Chunk)):
            return False
        self.out.append(Err(task.job, task.seq, task.attempt, error_info(exc)))
        self.out_ops.append((task.op, False))
        return True

    def terminate(self, job: int) -> None:
        self.terminated.add(job)

    # ---- running -----------------------------------------------------------

    def run(self, task: Call | Chunk) -> Outcome | None:
        """Run one task; None when its outcome was already sent (timed out, or its job terminated)."""
        global _current
        if self.given_back:
            with self.state_lock:
                key = (task.job, task.seq, task.attempt)
                left = self.given_back.pop(key, 0)
                if left:
                    if left > 1:
                        self.given_back[key] = left - 1
                    return None  # another worker runs it (see _Control._give_back)
        if task.job in self.terminated._since:  # its dict: no __contains__ call per task
            return Err(task.job, task.seq, task.attempt,
                       _special_error(task.job, TaskCancelledError(f"job {task.job} was terminated")))
        ctx = TaskContext(task.job, task.seq, task.attempt, task.timeout)
        # No lock to start it (one assignment: the control thread sees None or ctx); ending it
        # takes the lock, so an outcome the control thread sent for it is seen (``answered``).
        self.current = ctx
        _current = ctx
        try:
            outcome = self.runner.execute(task, ctx)
        finally:
            _current = None
            with self.state_lock:
                self.current = None
                answered = ctx.answered
        return None if answered else outcome

    def _settle(self, value: Any) -> Any:
        """The result of an awaitable an operation returned (on this worker's own event loop)."""
        if self.loop is None:
            import asyncio  # for operations that return awaitables only

            self.loop = asyncio.new_event_loop()
        return self.loop.run_until_complete(value)

    def check_memory(self) -> None:
        now = time.monotonic()
        if self.retiring or now - self.memory_checked < 0.1:
            return
        self.memory_checked = now
        try:
            import psutil

            rss = psutil.Process().memory_info().rss
        except Exception:
            return
        if rss > self.spec.max_memory:
            self.retiring = True
            self.send(Retire(self.spec.worker_id, f"rss {rss} > max_memory {self.spec.max_memory}"))

    # ---- sending -----------------------------------------------------------

    def flush(self, sent: bool = False) -> None:
        """Send the batched outcomes; ``sent``: return only once they left this process."""
        if not self.out:
            return
        with self.send_lock:
            self._flush(sent)

    def _flush(self, sent: bool) -> None:
        if not self.out:
            return
        outcomes, ops, busy = self.out, self.out_ops, self.busy
        self.out, self.out_ops, self.busy = [], [], 0.0
        frames = self._result_frames(outcomes, ops, busy)
        pipe = self.pipe
        if pipe is not None:
            # A pipe's frame is in the kernel once written: it reaches the driver even if this process dies.
            with self.write_lock:  # the control thread writes to the pipe too
                try:
                    for frame in frames:
                        pipe.send_blocking(frame)
                except PipeError:
                    self.stopping = True  # the driver is gone
            return
        for frame in frames[:-1]:
            self._send_frame(frame)
        frame = frames[-1]
        if not sent:
            self._send_frame(frame)
            return
        assert self.outbox is not None
        # ZeroMQ sends from its I/O thread: a process that dies right after send()
        # may take the frame with it. The tracker fires once ZeroMQ let go of the
        # frame (an explicit Frame, as pyzmq copies small bytes and tracks nothing).
        data = zmq.Frame(frame, copy=False, track=True)
        tracker = self.outbox.send(data, 0, copy=False, track=True)
        del data  # our reference would keep the frame "in use"
        try:
            tracker.wait(SENT_WAIT)
        except zmq.NotDone:
            pass

    def _result_frames(self, outcomes: list[Outcome], ops: list[tuple[str, bool]], busy: float) -> list[bytes]:
        """The Results frames for ``outcomes``: one, unless it would be too large or fails to encode.

        Then each outcome goes in a frame of its own, and one that cannot be
        sent (unencodable, or above ``max_frame``) becomes an error outcome,
        so the driver always gets exactly one outcome per task and the worker
        lives on.
        """
        dropped = self.frames_dropped + self.control.frames_dropped  # dropped(), inline: once per flush
        try:
            frame = encode(Results(self.spec.worker_id, outcomes, busy, dropped), pickled=self.pickled)
        except BaseException as exc:  # noqa: B036 - RecursionError: a self-referencing or very deep value
            _reraise_exit(exc)
        else:
            if len(frame) <= self.max_send:
                return [frame]
        return [self._outcome_frame(outcome, op, splits, busy if i == 0 else 0.0, dropped)
                for i, (outcome, (op, splits)) in enumerate(zip(outcomes, ops))]

    def _outcome_frame(self, outcome: Outcome, op: str, splits: bool, busy: float, dropped: int) -> bytes:
        """One outcome's Results frame; an error outcome in its place if it cannot be sent.

        ``splits``: a map chunk's, whose values may go in part: the driver
        runs the items after a shorter ``Ok`` again (see phalanx.core.outcomes),
        and an item whose own value is too large fails alone.
        """
        wid, limit = self.spec.worker_id, self.max_send
        try:
            frame = encode(Results(wid, [outcome], busy, dropped), pickled=self.pickled)
        except BaseException as exc:  # noqa: B036 - see _sending_error
            _reraise_exit(exc)
            if splits:
                return self._split_frame(outcome, op, busy, dropped)
            err = _sending_error(exc, f"the result of {op}")
        else:
            if len(frame) <= limit:
                return frame
            if splits:
                return self._split_frame(outcome, op, busy, dropped)
            err = FrameTooLargeError(
                f"the result of {op} is {len(frame)} bytes encoded, larger than max_frame={limit}",
                len(frame), limit)
        failed = Err(outcome.job, outcome.seq, outcome.attempt, error_info(err))
        return encode(Results(wid, [failed], busy, dropped))

    def _split_frame(self, outcome: Outcome, op: str, busy: float, dropped: int) -> bytes:
        """A map chunk's outcome that cannot go whole: the values that fit, or the first one's error."""
        wid, limit = self.spec.worker_id, self.max_send
        values = outcome.value if isinstance(outcome, Ok) else (outcome.partial or [])
        room = limit - len(encode(Results(wid, [Ok(outcome.job, outcome.seq, outcome.attempt, [])], busy, dropped)))
        room -= 64  # headers of the list and of the error, when there is one
        used = 0
        for index, value in enumerate(values):
            err: BaseException | None = None
            try:
                size = len(encode(pack(value, self.pickled)))
            except BaseException as exc:  # noqa: B036 - see _sending_error
                _reraise_exit(exc)
                err = _sending_error(exc, f"the result of {op} for item {index} of its chunk")
            else:
                if used + size <= room:
                    used += size
                    continue
                if index:
                    # The values before it fit: they go, the driver runs the rest of the chunk again.
                    return encode(Results(wid, [Ok(outcome.job, outcome.seq, outcome.attempt, values[:index])],
                                          busy, dropped), pickled=self.pickled)
                if size > room:
                    err = FrameTooLargeError(
                        f"the result of {op} is {size} bytes encoded, larger than max_frame={limit}", size, limit)
            assert err is not None
            failed = Err(outcome.job, outcome.seq, outcome.attempt, error_info(err), index, values[:index])
            return encode(Results(wid, [failed], busy, dropped))
        # Every value fits: the error itself was too large (its message, arguments or traceback).
        if isinstance(outcome, Err):
            info = outcome.error
            short = ErrorInfo(info.type, info.message[:1000], None, info.traceback[-10000:])
            return encode(Results(wid, [msgspec.structs.replace(outcome, error=short)], busy, dropped))
        err = EncodeError(f"the result of {op} cannot be sent")
        return encode(Results(wid, [Err(outcome.job, outcome.seq, outcome.attempt, error_info(err))], busy, dropped))

    def _send_frame(self, frame: bytes) -> None:
        if self.pipe is not None:
            with self.write_lock:  # the control thread writes to the pipe too
                try:
                    self.pipe.send_blocking(frame)
                except PipeError:
                    self.stopping = True  # the driver is gone
            return
        assert self.outbox is not None
        self.outbox.send(frame, 0, copy=len(frame) < sockets.ZERO_COPY_MIN)

    def send(self, msg: Any) -> None:
        try:
            frame = encode(msg)
        except RecursionError as exc:  # a value that contains itself, or nests too deep
            raise EncodeError(f"cannot encode {type(msg).__name__}: {exc}") from exc
        if len(frame) > self.max_send:  # the driver would take it for an attack
            limit = self.max_send
            raise FrameTooLargeError(f"a {type(msg).__name__} of {len(frame)} bytes is larger than "
                                     f"max_frame={limit}", len(frame), limit)
        with self.send_lock:
            self._send_frame(frame)

    def goodbye(self) -> None:
        """Tell the driver this worker leaves; wait up to GOODBYE_WAIT for its Stop.

        Runs in the SIGTERM handler, on the main thread, which owns the inbox
        and outbox; the process is killed right after.
        """
        if not self.welcomed or self.inbox is None or self.outbox is None:
            return  # the driver has given it nothing (or it is local: leaving is for remote workers)
        flusher = self._flusher  # none made yet: no batch was ever held, nothing to stop
        try:
            if flusher is not None:
                flusher.disarm()  # the outbox is this thread's alone from here
        except BaseException:  # noqa: B036 - leaving anyway; the driver redelivers what it holds
            pass
        try:
            self.outbox.send(encode(Goodbye(self.spec.worker_id)), zmq.NOBLOCK)
        except zmq.ZMQError:
            return
        deadline = time.monotonic() + GOODBYE_WAIT
        while (left := deadline - time.monotonic()) > 0:
            if not self.inbox.poll(int(left * 1000) + 1):
                return
            try:
                msg = decode_inbox(self.inbox.recv(zmq.NOBLOCK))
            except (zmq.Again, ProtocolError):
                continue
            if isinstance(msg, Stop):
                return

    def send_after_outcomes(self, msg: Any) -> None:
        """Send ``msg`` after the outcomes already batched (keeps their order)."""
        self.flush()
        try:
            self.send(msg)
        except (EncodeError, FrameTooLargeError) as exc:  # e.g. a save() state msgpack cannot carry
            if isinstance(msg, ActorState):
                err = EncodeError(f"the state of actor instance {msg.instance} cannot be sent: {exc}")
                self.send(ActorState(msg.worker, msg.instance, msg.nonce, error=error_info(err)))
            else:
                raise

    # ---- main loop -----------------------------------------------------------

    def serve(self) -> None:
        hello = None
        if self.pipe is not None:
            # A local worker: its control pipe exists already, nothing is missed until it is
            # read, so it is Ready at once; the driver welcomes it on reading the Hello, before
            # the Ready that follows it. Most said both as they started (see run_worker).
            if not self.ready_sent:
                _say_ready(self.pipe, self.spec, self.host)
                self.ready_sent = True
            self.control.start()
        else:
            hello = Hello(self.spec.worker_id, os.getpid(), self.host, tags=list(self.spec.tags),
                          inbox=self.inbox_id)
            self.control.start()  # it makes a remote worker's control sockets
            # Over tcp the same Hello on the inbox shows the driver that this key holds the
            # inbox identity tasks are sent to (see Membership.drain_tasks).
            assert self.inbox is not None
            self.inbox.send(encode(hello), zmq.NOBLOCK)
            self.send(hello)
        poll = self.poll
        perf_counter = time.perf_counter
        #: tasks run since this loop last waited for the driver
        ran = 0
        while not self.stopping:
            if self.inbox_back and hello is not None and self.inbox is not None:
                self.inbox_back = False
                try:
                    self.inbox.send(encode(hello), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # gone again: the next connect sets the flag again
            if not self.todo:
                if self.out:
                    self.flush()
                if ran > 1 and self.pipe is not None:
                    # Work is flowing: the tasks the driver sent for the last outcomes are most
                    # likely in the pipe already. One read, no poll before it (a lone call,
                    # ran == 1, waits at once; ZeroMQ's poll returns at once when one waits).
                    ran = 0
                    self.drain_inbox()
                    if self.todo or self.stopping:
                        continue
                ran = 0
                if self.ready_sent and self.spec.spin > 0:
                    # Spin briefly before blocking: waking a blocked process costs far
                    # more than a short spin, and the next task of a round trip is near.
                    deadline = time.perf_counter() + self.spec.spin
                    while not poll(0) and time.perf_counter() < deadline:
                        pass
                if not self.ready_sent and self.welcomed and not self.synced:
                    self.synced_event.wait(0.001)  # the control thread sets it when the Sync comes
                    if poll(0):
                        self.drain_inbox()
                elif poll(200 if self.ready_sent else 1):
                    self.drain_inbox()
                if not self.ready_sent and self.welcomed and self.synced:
                    self.send(Ready(self.spec.worker_id, self.spec.credits))
                    self.ready_sent = True
                continue
            task = self.todo.popleft()
            ran += 1
            kind = task.__class__  # decoded messages are of exactly their class
            if kind is Call or kind is Chunk:
                if self.out and task.attempt:
                    # A redelivered task may be the one that killed its last worker: get what
                    # is batched out first, so if it kills this one too the driver charges
                    # the crash to it, not to a finished task whose outcome died unsent.
                    self.flush(sent=True)
            elif kind is not ActorCall:
                self.actors.handle(task)
                continue
            held = bool(self.out)
            if held:  # this task may be long: what is batched goes alone after BATCH_HOLD
                self.flusher.arm()
            started = perf_counter()
            if kind is ActorCall:
                outcome: Outcome | None = self.actors.call(task)
                op_name, splits = task.method, False
            else:
                outcome = self.run(task)
                op_name, splits = task.op, kind is Chunk and not task.fold
            elapsed = perf_counter() - started
            if held:
                self.flusher.disarm()
            self.busy += elapsed
            self.tasks_done += 1
            if kind is ActorCall and self.actors.checkpoint_due(task.instance):
                # Checkpoint before the reply: a caller told "done" must never see the
                # effect lost to a restart from an older checkpoint.
                self.actors.save(task.instance, 0)
            if outcome is not None:
                self.out.append(outcome)
                self.out_ops.append((op_name, splits))
            # Drop the task now, not when the next one comes: channel ends among its
            # arguments are collected, and what they held goes back to their lease.
            del task, outcome
            # Batch only under load: more work waiting and this task was quick. The driver is
            # read only when that decides something: tasks already queued here say it at once,
            # and a slow task's outcome goes out before anything else (the queue is read when
            # it runs dry).
            if elapsed < QUICK_TASK and not self.todo and self.out and poll(0):
                self.drain_inbox()  # (a poll: a lone call's outcome waits for no failed read)
            if not self.todo or elapsed >= QUICK_TASK or len(self.out) >= BATCH_MAX:
                self.flush()
            if self.spec.max_memory:
                self.check_memory()
        self.flush()

    def close(self) -> None:
        self.stopping = True
        self.control.join(1.0)
        sockets.close(self.inbox, self.outbox)
        if self.pipe is not None:
            self.pipe.close()
        if self.ctx is not None:
            self.ctx.destroy(linger=0)


_spec: WorkerSpec | None = None


#: the pid a greeting carries until its worker writes its own in: msgpack's uint32 0xfffffff0, a
#: number no pid reaches, in bytes that no string of the message can hold (0xff is never UTF-8)
_PID_SLOT = b"\xce\xff\xff\xff\xf0"


def greeting(worker_id: str, host: str, tags: tuple[str, ...], credits: int) -> bytes:
    """A local worker's Hello and Ready, framed for its pipe (``WorkerSpec.greeting``), made by
    the driver before the fork: the worker that sends them (:func:`say_greeting`) only writes
    its pid in, where encoding them itself cost it page faults before it was Ready."""
    hello = encode(Hello(worker_id, 0xFFFFFFF0, host, tags=list(tags)))
    if hello.count(_PID_SLOT) != 1:  # (see _PID_SLOT: only the pid can hold it, and only once)
        raise RuntimeError(f"a Hello holds the pid placeholder {hello.count(_PID_SLOT)} times")
    return as_written([hello, encode(Ready(worker_id, credits))])


def say_greeting(fd: int, greeting: bytes) -> None:
    """Send a :func:`greeting`, this process's pid written in, on the pipe ``fd`` (non-blocking;
    the first bytes on it: its buffer is empty). A driver already gone is seen by the loop."""
    data = greeting.replace(_PID_SLOT, b"\xce" + os.getpid().to_bytes(4, "big"), 1)
    try:
        sent = os.write(fd, data)
    except BlockingIOError:  # (not on an empty buffer; but should it be full, it waits for room)
        sent = 0
    except OSError:
        return  # a closed pipe: the loop sees it
    if sent < len(data):  # the rest, waiting for room
        waiting = select.poll()
        waiting.register(fd, select.POLLOUT)
        view = memoryview(data)[sent:]
        while view:
            waiting.poll()
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
            except OSError:
                return


def _say_ready(pipe: FramePipe, spec: WorkerSpec, host: str) -> None:
    """A local worker's Hello and Ready, in that order, in one write on its pipe (main thread,
    before any other thread of the worker writes there): the greeting the driver made for it,
    or one made here (a spec from elsewhere). A driver already gone is seen by the loop."""
    say_greeting(pipe.fileno(), spec.greeting or greeting(spec.worker_id, host, spec.tags, spec.credits))


def worker_spec() -> WorkerSpec | None:
    """The spec this worker process runs under (None outside a worker)."""
    return _spec


def run_worker(spec: WorkerSpec, pipe: _socket.socket | None = None,
               control: _socket.socket | None = None, leave: Callable[[], None] | None = None,
               greeted: bool = False) -> None:
    """Entry point of a worker process (the target given to multiprocessing).

    ``pipe``: a local worker's end of its socketpair to the driver (None: ZeroMQ);
    ``control``: its end of its control pipe (a SOCK_SEQPACKET socketpair);
    ``leave``: what a worker forked by phalanx's fork server does to leave it, called once
    it said Ready and before any user module is imported; ``greeted``: it installed its
    output and sent its greeting already (:func:`say_greeting`).
    """
    global _spec
    _spec = spec
    # Before any user module runs: its prints and logs are prefixed "[<worker id>] ". (It runs
    # code of the user's too, inherited logging handlers': one that raises fails the start.)
    install_worker_output(spec.worker_id, spec.prefix_output, spec.log_level)
    framed = FramePipe(pipe, spec.limits.max_frame) if pipe is not None else None
    # A local worker with no module of the user's to import has no user code left to fail its
    # start: it says Hello and Ready now, so the driver's handshake and first task overlap the
    # rest of its start-up (they wait in its pipes; it reads them once it serves). One that
    # imports modules says them only after: a module that raises ends it before it was ever
    # Ready, a failed start as the driver reports it.
    early = greeted or (framed is not None and not spec.imports)
    host = spec.host or _socket.gethostname()
    if early and not greeted:
        assert framed is not None
        _say_ready(framed, spec, host)
    # Leaving the fork server and the orphan guard are not the user's code: they cannot fail
    # the start, so a worker that said Ready runs them after, while the driver's handshake and
    # first task are on their way (before any module of the user's is imported).
    if leave is not None:
        leave()
    guard_against_orphaning(spec.parent_pid, watchdog=False)
    if spec.imports or pipe is None:
        # User modules may take long to import, a remote worker to connect: a thread watches
        # meanwhile (otherwise the control thread does, from its start).
        start_watchdog()
    # This process serves one runtime: its options are the process's defaults.
    sockets.set_default_limits(spec.limits)
    operations.set_implicit(spec.implicit_operations)
    for module in spec.imports:
        __import__(module)
    # Shared memory only with a driver on this host, over the pipe; a remote worker never.
    shm.set_worker(spec.parent_pid if pipe is not None else None, spec.shm_threshold)
    loop = _Loop(spec, framed, control, ready_sent=early, host=host)
    if spec.goodbye:
        global _goodbye
        _goodbye = loop.goodbye
    # Channel ends used here reach the driver's broker as "<worker id>~<n>"; they stop
    # waiting once the worker is told to shut down.
    channels.set_worker_location(spec.endpoints.results, spec.curve, spec.worker_id, lambda: not loop.stopping)
    try:
        loop.serve()
    finally:
        channels.close_all()
        loop.close()
        _end_own_group()
