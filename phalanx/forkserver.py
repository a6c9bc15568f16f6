"""phalanx's fork server: one single-threaded process that forks every local worker.

Created by the driver's :class:`~phalanx.supervisor.Supervisor` (start method
``"phalanx"``, the default on Linux) when a :class:`phalanx.Runtime` starts,
before the driver opens a ZeroMQ context or starts a thread of its own; the
server then runs this module's loop, alone in its process::

    driver                                             fork server (single-threaded)
    ┌───────────────────────────┐  ctl (seqpacket)     ┌──────────────────────────────┐
    │ spawn(): Spawn + the      │ ───────────────────▶ │ fork() ─▶ worker: run_worker  │
    │ worker's socketpair ends  │ ◀─────────────────── │  (pid + pidfd, or the error)  │
    │ (SCM_RIGHTS), under a lock│                      │ SIGCHLD ─▶ waitpid, sweep      │
    │ reader thread ◀── events ─│ ◀─────────────────── │  (worker id, exit code)        │
    └───────────────────────────┘                      └──────────────────────────────┘

The runtime's first workers are forked with the server (``first=``): their
specs and pipe ends are made before the server's fork, so the server forks
them first of all, before it reads any request, and each goes straight to its
start-up; the server then sends their Started replies as if they had been
asked for. Every later worker is forked on request.

Workers are copies of the server, which is a copy of the driver as it was when
the runtime started: they know ``__main__``'s functions and the modules
imported by then, on every Python version, and no fork ever happens in a
process that runs threads (unless the user's program ran threads of its own
when the runtime started: see docs/faults.md).

Invariants kept:

* **It dies with the driver and leaves nothing behind.** It asks for SIGTERM
  when the driver dies (``PR_SET_PDEATHSIG``), also ends on EOF of its ctl
  socket, and checks its parent twice a second; on any of them it gives the
  workers 0.5 s to end themselves (SIGTERM: each cleans up and kills its
  group), then SIGKILLs every process below it, reaps them and exits.
* **Child containment.** It is the child subreaper of the workers
  (``PR_SET_CHILD_SUBREAPER``): whatever a worker started that outlives its
  own parent is re-parented here, not to init. When a worker exits, for any
  cause, every such orphan that belongs to no live worker is killed with its
  descendants (:func:`_sweep`), within a second.
* **No stranger is signalled.** The server opens each worker's pidfd right
  after forking it (the first workers: after forking them all), before its
  loop can reap it, and sends it with the Started reply (SCM_RIGHTS); the
  driver signals the worker only through it and closes it when the worker's
  exit is reported, so a pid reaped here and reused meanwhile is never hit.
* **It holds none of the driver's descriptors that phalanx made for others.**
  As it starts it closes the driver's ends of every worker's pipes, the other
  fork servers' sockets, the driver's pidfds and the ZeroMQ sockets of the
  process's other runtimes (:func:`note_bound`): a worker sees EOF when its
  own driver closes its end, and a runtime that shut down leaves its ports free.
* **Exit codes reach the supervisor.** Only the server can ``waitpid`` its
  children: it reports each worker's exit code (negative: the signal) on the
  events socket, exactly once.
"""

from __future__ import annotations

import array
import contextlib
import functools
import gc
import importlib
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

import msgspec
import zmq

from .logs import install_worker_output
from .transport.endpoints import Endpoints, parse_listen
from .worker import _SIG_IGN, _SIGINT, _SIGTERM, _prctl as _libc_prctl, _set_handler, run_worker, say_greeting

__all__ = ["ForkServer", "ForkedWorker", "Pidfd", "WORKER_PID_VAR", "hold_sigint"]

#: set in each worker's environment to its own pid: processes it starts inherit it, so the
#: fork server can tell whose orphan a process is even after it left the worker's group
WORKER_PID_VAR = "PHALANX_WORKER_PID"

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
#: seconds between the server's checks that its driver is still there
_PARENT_CHECK = 0.5
#: seconds after a worker's exit at which the server sweeps for its orphans again
#: (a process being killed may have forked meanwhile)
_SWEEP_AGAIN = (0.2, 1.0)
#: seconds the workers get to end themselves (SIGTERM) when the server ends, before SIGKILL
_WORKER_GRACE = 0.5
#: largest ctl message (a Spawn request)
_MAX_REQUEST = 1 << 20
#: most descriptors a Spawn request carries (the worker's pipe and control pipe)
_MAX_FDS = 2

#: signal.pthread_sigmask's C function: the Python one turns the old mask into enum members,
#: pages the fork server would write (copy) before it forks the first workers
_sigmask: Callable[[int, Any], Any] = getattr(importlib.import_module("_signal"), "pthread_sigmask",
                                              signal.pthread_sigmask)
#: what the server and a new worker use before the first forks and as they leave the server, as
#: plain ints and C functions: each object a process just forked touches is a page it copies
#: (its reference count is written)
_SIGCHLD = int(signal.SIGCHLD)
_SIG_DFL = int(signal.SIG_DFL)
_SIG_UNBLOCK = int(signal.SIG_UNBLOCK)
_SIG_BLOCK = int(signal.SIG_BLOCK)
_SIG_SETMASK = int(signal.SIG_SETMASK)
_AF_UNIX = int(socket.AF_UNIX)
_SOCK_STREAM = int(socket.SOCK_STREAM)
_SOCK_SEQPACKET = int(socket.SOCK_SEQPACKET)
#: whether os.fork() warns in a process that runs threads (a DeprecationWarning)
_FORK_WARNS = sys.version_info >= (3, 12)
#: serialises making fork servers with making/sending workers' socketpair ends, so a
#: fork server never inherits another runtime's worker end (its EOF would come late)
fork_lock = threading.RLock()
#: driver-side sockets of every live fork server in this process (closed in new servers)
_clients: weakref.WeakSet[ForkServer] = weakref.WeakSet()
#: every Pidfd of this process holding a descriptor (closed in new fork servers: another
#: runtime's workers, even multiprocessing's, are none of theirs nor their workers')
_pidfds: weakref.WeakSet[Pidfd] = weakref.WeakSet()
#: the driver's ends of every local worker's pipes in this process (fork_lock keeps it): a
#: new fork server closes them, so each worker sees EOF when its own driver closes its end
_driver_ends: weakref.WeakSet[socket.socket] = weakref.WeakSet()
#: what the ZeroMQ sockets of each runtime of this process bind to (its ipc directory, its
#: tcp ports), by the runtime's context: a new fork server closes every socket bound or
#: accepted there while that context is open (see note_bound)
_bound: weakref.WeakKeyDictionary[zmq.Context[Any], tuple[str | None, frozenset[int]]] = weakref.WeakKeyDictionary()
#: held from a pidfd's arrival (opened, or received) until a Pidfd in _pidfds holds it, and
#: around the fork of a fork server, so no new server inherits a pidfd it cannot close
_pidfd_lock = threading.Lock()


class _Spawn(msgspec.Struct, frozen=True, tag="spawn"):
    worker_id: str
    #: the msgpack-encoded WorkerSpec
    spec: bytes


class _Started(msgspec.Struct, frozen=True, tag="started"):
    pid: int


class _Failed(msgspec.Struct, frozen=True, tag="failed"):
    error: str


class _Exited(msgspec.Struct, frozen=True, tag="exited"):
    worker_id: str
    exitcode: int


_Reply = _Started | _Failed
#: a worker's ends of its pipes, as spawn() takes them
_Pipes = socket.socket | tuple[socket.socket, ...] | None


def _fds(pipes: _Pipes) -> list[int]:
    if pipes is None:
        return []
    if isinstance(pipes, socket.socket):
        return [pipes.fileno()]
    return [p.fileno() for p in pipes][:_MAX_FDS]


def _recv_reply(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One reply from the server and the descriptors it carries (close-on-exec)."""
    # Not socket.recv_fds: it never hands its flags to recvmsg (3.11-3.13), so it cannot ask
    # for MSG_CMSG_CLOEXEC, and a pidfd would be inheritable until this thread marked it.
    fds = array.array("i")
    raw, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize),
                                      socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return raw, list(fds)


#: decoders of Spawn requests and their WorkerSpec, made by the server at its first request:
#: msgspec builds a type's decoding information on first use (it evaluates the annotations,
#: ~0.3-0.7 ms), which the first workers, forked with their spec, never wait for
_decoders: tuple[msgspec.msgpack.Decoder[_Spawn], msgspec.msgpack.Decoder[Any]] | None = None


def _spawn_decoders() -> tuple[msgspec.msgpack.Decoder[_Spawn], msgspec.msgpack.Decoder[Any]]:
    global _decoders
    if _decoders is None:
        from .worker import WorkerSpec

        _decoders = (msgspec.msgpack.Decoder(_Spawn), msgspec.msgpack.Decoder(WorkerSpec))
    return _decoders


def _fork_may_warn() -> bool:
    """Whether ``os.fork()`` here may warn that the process runs threads: Python >= 3.12
    does when the kernel counts more than one thread in it, which this reads the same way."""
    if not _FORK_WARNS:
        return False
    try:
        return len(os.listdir("/proc/self/task")) > 1
    except OSError:
        return True


def _fork() -> tuple[int, list[Pidfd]]:
    """``os.fork()`` for a fork server (see ForkServer.__init__), under ``_pidfd_lock``; and
    the pidfds this process held as it forked (which the server closes)."""
    if _fork_may_warn():
        with warnings.catch_warnings():
            # Python >= 3.12 warns when forking a process that runs threads. This fork is the
            # documented exception (the user's program ran threads when the runtime started;
            # docs/faults.md): the server runs no code that takes their locks.
            warnings.filterwarnings("ignore", message=r"This process .* is multi-threaded",
                                    category=DeprecationWarning)
            with _pidfd_lock:
                held = list(_pidfds)
                return os.fork(), held
    # No filter to set and restore: restoring it after the fork would write (copy) the
    # warnings module's pages, which the server now shares.
    with _pidfd_lock:
        held = list(_pidfds)  # listed here: a weak set's iteration is Python code, costly after a fork
        return os.fork(), held


def note_driver_ends(ends: Iterable[socket.socket]) -> None:
    """The driver's ends of new workers' pipes, as they are made (under fork_lock): no fork
    server made from now on holds them (see _driver_ends)."""
    _driver_ends.update(ends)


def note_bound(ctx: zmq.Context[Any], local: Endpoints, address: Endpoints | None) -> None:
    """A runtime's driver, before it makes its ZeroMQ sockets in ``ctx``: fork servers made
    while ``ctx`` is open close, as they start, every socket bound to or accepted on
    ``local``'s ipc directory or ``address``'s tcp ports. A fork server is a copy of the
    driver: one holding another runtime's sockets would keep its ports taken, and its
    connections open (their peers never see them close), after that runtime shut down."""
    ports = () if address is None else (parse_listen(a)[1] for a in (address.tasks, address.results, address.control))
    with fork_lock:
        _bound[ctx] = (local.ipc_dir, frozenset(ports))


def _close_bound(bound: list[tuple[str | None, frozenset[int]]]) -> None:
    """In a new fork server: close the sockets of the driver's runtimes (see note_bound)."""
    dirs = tuple(d + "/" for d, _ in bound if d)
    ports = frozenset().union(*(p for _, p in bound))
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue  # the listing's own descriptor, closed by now
        try:
            if sock.family == socket.AF_UNIX:
                names: list[Any] = [sock.getsockname()]
                with contextlib.suppress(OSError):
                    names.append(sock.getpeername())
                theirs = any(isinstance(n, str) and n.startswith(dirs) for n in names)
            elif sock.family in (socket.AF_INET, socket.AF_INET6):
                theirs = sock.getsockname()[1] in ports
            else:
                theirs = False
        except OSError:
            theirs = False
        finally:
            sock.detach()
        if theirs:
            os.close(fd)


@contextlib.contextmanager
def hold_sigint() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back for the block, on the main thread (the only one Python runs
    signal handlers on): its KeyboardInterrupt comes when the block ends, never between a
    call that made a process or a descriptor and the statement that stores it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = _sigmask(_SIG_BLOCK, (_SIGINT,))
    try:
        yield
    finally:
        _sigmask(_SIG_SETMASK, held)


def _prctl(option: int, arg: int) -> bool:
    # libc's prctl as the driver found it at import (inherited): loading libc again here
    # would cost the server ~0.3 ms before it forks the first worker
    return _libc_prctl is not None and _libc_prctl(option, arg, 0, 0, 0) == 0


class Pidfd:
    """One process's pidfd, for signalling it: a signal reaches that process or nobody.

    A pid names whichever process holds it now: once a worker is reaped (by the
    fork server, or by multiprocessing) its pid may belong to a stranger, and
    ``os.kill`` would hit the stranger. A pidfd names one process for good:
    after that process is gone, signals fail with ESRCH (nothing to do). Safe
    to use from several threads; closed at most once.

    ``fd`` None: the kernel offers no pidfds (Linux < 5.3): signals go by
    ``pid``, as they did before pidfds existed.
    """

    def __init__(self, fd: int | None, pid: int) -> None:
        self.pid = pid
        self._fd = fd
        self._open = True
        self._lock = threading.Lock()
        #: the process whose descriptor this is (a forked copy of this object holds none)
        self._owner = os.getpid()
        if fd is not None:
            _pidfds.add(self)

    def __del__(self, _getpid: Callable[[], int] = os.getpid, _close: Callable[[int], None] = os.close) -> None:
        # Dropped unclosed: nothing can signal through it any more, and once out of _pidfds
        # it would be left open in every fork server made from now on. (os's functions bound
        # here: this may run while the interpreter tears its modules down.)
        fd = self._fd
        if fd is not None and self._owner == _getpid():
            self._fd = None
            try:
                _close(fd)
            except OSError:
                pass

    @classmethod
    def open(cls, pid: int) -> Pidfd:
        """Open ``pid``'s pidfd now. The caller must know ``pid`` still names its process
        (an unreaped child), or check afterwards that it did (see the supervisor)."""
        try:
            with _pidfd_lock:
                return cls(os.pidfd_open(pid), pid)
        except ProcessLookupError:
            gone = cls(None, pid)
            gone._open = False
            return gone
        except (AttributeError, OSError):
            return cls(None, pid)  # no pidfds on this kernel (or none left): by pid

    def send_signal(self, sig: int) -> bool:
        """Send ``sig`` to the process; False if it is gone (reaped) or this was closed."""
        with self._lock:
            if not self._open:
                return False
            try:
                if self._fd is None:
                    os.kill(self.pid, sig)
                else:
                    signal.pidfd_send_signal(self._fd, sig)
            except ProcessLookupError:
                return False
            return True

    def running(self) -> bool:
        """Whether the process has not exited yet (a zombie has); False once closed."""
        with self._lock:
            if not self._open:
                return False
            if self._fd is None:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    return False
                return True
            # A pidfd turns readable when its process exits (poll: select stops at fd 1023).
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            return not poller.poll(0)

    def close(self) -> None:
        """Close the descriptor (idempotent): no signal is sent through it afterwards."""
        with self._lock:
            self._open = False
            fd, self._fd = self._fd, None
        if fd is not None:
            _pidfds.discard(self)
            os.close(fd)

    def _close_in_child(self) -> None:
        # In a process just forked from the driver: one thread, the lock may have been held.
        self._open = False
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


class ForkedWorker:
    """A worker process forked by the fork server (the driver's view of it).

    Offers what the supervisor uses of ``multiprocessing.Process``: ``pid``,
    ``exitcode``, ``join``, ``is_alive``, ``terminate``, ``close``; and
    signals it only through the pidfd the server opened right after forking
    it, before it could reap it (``send_signal``, ``running``), closed when its
    exit is reported.
    """

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.pid: int | None = None
        self.exitcode: int | None = None
        self._done = threading.Event()
        self._pidfd: Pidfd | None = None
        self._pidfd_lock = threading.Lock()

    def _started(self, pid: int, pidfd: Pidfd) -> None:
        """The server's Started reply: the pid, and its pidfd (fd None: the server had none)."""
        self.pid = pid
        with self._pidfd_lock:
            self._pidfd = pidfd
            if self._done.is_set():  # its exit was reported before the reply was read
                pidfd.close()

    def _exited(self, exitcode: int | None) -> None:
        self.exitcode = exitcode
        with self._pidfd_lock:
            self._done.set()
            pidfd = self._pidfd
        if pidfd is not None:
            pidfd.close()

    def send_signal(self, sig: int) -> bool:
        """Send ``sig`` to the worker; False if it is gone (or not started)."""
        pidfd = self._pidfd
        return pidfd is not None and pidfd.send_signal(sig)

    def running(self) -> bool:
        """Whether the worker has not exited yet (False once its exit was reported)."""
        pidfd = self._pidfd
        return pidfd is not None and pidfd.running()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def close(self) -> None:
        pass


class ForkServer:
    """The driver's end of one fork server (see the module docstring).

    ``on_exit(worker_id, exitcode)`` is called from the reader thread for each
    worker that exits (``exitcode`` None for every worker still running if the
    server itself died).
    """

    def __init__(self, on_exit: Callable[[str, int | None], None], start: bool = True,
                 first: list[tuple[str, Any, _Pipes]] | None = None, drivers_ends: tuple[socket.socket, ...] = ()) -> None:
        """``start=False``: the reader thread starts only at :meth:`start` (its owner first
        reads the first replies, while the workers boot and the thread starts).
        ``first``: ``(worker_id, spec, pipes)`` of workers the server forks first of all, as
        :meth:`spawn_many` would (their handles: :meth:`first_replies`, called exactly once);
        ``drivers_ends``: the driver's ends of their pipes, which the server must not hold."""
        #: called from the reader thread for each worker's exit (its owner may replace it)
        self.on_exit = on_exit
        self._workers: dict[str, ForkedWorker] = {}
        self._lock = threading.Lock()
        self._request_lock = threading.Lock()
        self._closed = False
        first = first or []
        #: the first workers' handles, until first_replies() reads their replies
        self._first = [ForkedWorker(worker_id) for worker_id, _, _ in first]
        for handle in self._first:
            self._workers[handle.worker_id] = handle
        if self._first:
            self._request_lock.acquire()  # no request before the first replies are read
        made: list[socket.socket] = []
        pid = -1
        with fork_lock:
            try:
                # Ctrl-C waits until the pairs and the server's pid are stored: an interrupt right
                # after socketpair() or fork() returned would leave descriptors, or a server no
                # one reaps; from then on this handler ends what was made.
                with hold_sigint():
                    ctl, self._ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    made += [ctl, self._ctl]
                    events, self._events = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    made += [events, self._events]
                    driver = os.getpid()
                    for stream in (sys.stdout, sys.stderr):  # else the copies would print it again
                        try:
                            stream.flush()
                        except (AttributeError, OSError, ValueError):
                            pass
                    # What the server closes, listed before the fork (after it, each object
                    # touched is a page copied): the driver's ends, other servers' sockets
                    # (fork_lock keeps that set) and pidfds (listed under their lock, in _fork).
                    theirs = (self._ctl, self._events, *drivers_ends, *_driver_ends,
                              *(sock for other in _clients for sock in (other._ctl, other._events)))
                    # Descriptors, not sockets: a worker closes its siblings' by number.
                    born = [(wid, spec, _fds(pipes)) for wid, spec, pipes in first]
                    bound = [where for ctx, where in _bound.items() if not ctx.closed]  # (fork_lock keeps it)
                    pid, pidfds = _fork()
                    self.pid = pid
                    if pid == 0:  # the fork server
                        try:
                            # What the driver had is never collected here nor in the workers: a
                            # collection in a worker would otherwise write to (copy) every page
                            # of it (O(1) call).
                            gc.freeze()
                            for sock in theirs:
                                sock.close()
                            for pidfd in pidfds:
                                pidfd._close_in_child()
                            if bound:  # another runtime runs here: none of its sockets is ours
                                _close_bound(bound)
                            _serve(ctl, events, driver, born)
                        finally:
                            os._exit(70)
                ctl.close()
                events.close()
                self._owner = driver
                _clients.add(self)
            except BaseException:
                for sock in made:
                    sock.close()
                if pid > 0:  # ends with its ctl socket; reaped here, as no one else would
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    os.waitpid(pid, 0)
                raise
        #: made at start(): off the constructor, which the first workers wait for
        self._reader: threading.Thread | None = None
        if start:
            self.start()

    def first_replies(self, deadline: float | None = None) -> list[ForkedWorker | OSError]:
        """What :meth:`spawn_many` would return for the workers forked with the server
        (``first=``); call exactly once, before any other request.

        ``deadline`` (``time.monotonic()``): a server that has not replied by then raises
        TimeoutError (a server stopped or stuck: the start must not wait for it for ever),
        and takes no request after it."""
        handles, self._first = self._first, []
        if not handles:
            return []
        try:
            return self._read_replies(handles, deadline)
        finally:
            self._request_lock.release()

    def start(self) -> None:
        """Start reading the server's exit reports (idempotent; exits wait in its socket until then)."""
        with self._lock:
            if self._reader is None:
                self._reader = threading.Thread(target=self._read_events, name="phalanx-forkserver", daemon=True)
                self._reader.start()

    def _close_sockets(self) -> None:
        self._ctl.close()
        self._events.close()

    def spawn(self, worker_id: str, spec: Any, pipe: _Pipes) -> ForkedWorker:
        """Fork one worker running ``run_worker(spec, *pipes)``; its handle, with its pid."""
        result = self.spawn_many([(worker_id, spec, pipe)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def spawn_many(
        self, requests: list[tuple[str, Any, _Pipes]]
    ) -> list[ForkedWorker | OSError]:
        """Fork one worker per ``(worker_id, spec, pipes)``; per request its handle, or why not.

        ``pipes``: the worker's ends of its pipe and control pipe (a socket alone: its pipe;
        None: neither, a ZeroMQ worker).

        Every request is sent before the first reply is read: the server forks
        the workers back to back, not one driver round trip apart.
        """
        return self.send_spawns(requests)()

    def send_spawns(
        self, requests: list[tuple[str, Any, _Pipes]]
    ) -> Callable[[], list[ForkedWorker | OSError]]:
        """Send the requests of :meth:`spawn_many`; the function that reads the server's
        replies and returns what ``spawn_many`` would. No other request is sent until it
        ran: call it exactly once (the server forks the workers meanwhile)."""
        handles = [ForkedWorker(worker_id) for worker_id, _, _ in requests]
        with self._lock:
            if self._closed:
                raise OSError("the fork server is closed")
            for handle in handles:
                self._workers[handle.worker_id] = handle
        self._request_lock.acquire()
        try:
            for worker_id, spec, pipe in requests:
                request = msgspec.msgpack.encode(_Spawn(worker_id, msgspec.msgpack.encode(spec)))
                socket.send_fds(self._ctl, [request], _fds(pipe))
        except BaseException:
            self._request_lock.release()
            with self._lock:
                for handle in handles:
                    self._workers.pop(handle.worker_id, None)
            raise

        def replies() -> list[ForkedWorker | OSError]:
            try:
                return self._read_replies(handles)
            finally:
                self._request_lock.release()

        return replies

    def _read_replies(self, handles: list[ForkedWorker], deadline: float | None = None) -> list[ForkedWorker | OSError]:
        results: list[ForkedWorker | OSError] = []
        pidfd: Pidfd | None = None
        try:
            for handle in handles:
                # Waited for without the lock (the server may take a while to fork); read under
                # it, so a fork server forked meanwhile never inherits the pidfd it carries.
                waiting = select.poll()
                waiting.register(self._ctl, select.POLLIN)
                # (In slices: a deadline far off is no timeout poll() takes.)
                while not waiting.poll(None if deadline is None
                                       else 1000 * min(1.0, max(0.0, deadline - time.monotonic()))):
                    if deadline is not None and time.monotonic() >= deadline:
                        with self._lock:
                            self._closed = True  # its late replies would answer the next request
                        raise TimeoutError(f"the fork server did not start {handle.worker_id} in time")
                with _pidfd_lock:
                    raw, fds = _recv_reply(self._ctl)
                    try:
                        if not raw:
                            raise OSError("the fork server is gone")
                        reply = msgspec.msgpack.decode(raw, type=_Reply)
                    except BaseException:
                        for fd in fds:
                            os.close(fd)
                        raise
                    for fd in fds[1:]:
                        os.close(fd)
                    pidfd = None
                    if isinstance(reply, _Failed):
                        if fds:
                            os.close(fds[0])
                    else:
                        try:
                            pidfd = Pidfd(fds[0] if fds else None, reply.pid)
                        except BaseException:  # KeyboardInterrupt: the descriptor is not left open
                            if fds:
                                os.close(fds[0])
                            raise
                if isinstance(reply, _Failed):
                    results.append(OSError(f"the fork server could not start {handle.worker_id}: {reply.error}"))
                else:
                    assert pidfd is not None
                    handle._started(reply.pid, pidfd)
                    results.append(handle)
                    pidfd = None
        except BaseException:
            # Replies not read: the server may have forked those workers; the owner ends the
            # runtime, and the server ends whatever is below it when it closes. A pidfd read
            # for a worker not returned (an interrupt) is closed: nothing else would close it.
            if pidfd is not None:
                pidfd.close()
            with self._lock:
                for handle in handles[len(results):]:
                    self._workers.pop(handle.worker_id, None)
            raise
        finally:
            with self._lock:
                for result, handle in zip(results, handles):
                    if isinstance(result, OSError):
                        self._workers.pop(handle.worker_id, None)
        return results

    def _read_events(self) -> None:
        decoder = msgspec.msgpack.Decoder(_Exited)
        while True:
            try:
                raw = self._events.recv(4096)
            except OSError:
                raw = b""
            if not raw:
                break
            try:
                event = decoder.decode(raw)
            except msgspec.DecodeError:
                continue
            with self._lock:
                handle = self._workers.pop(event.worker_id, None)
            if handle is not None:
                handle._exited(event.exitcode)
                self.on_exit(event.worker_id, event.exitcode)
        # The server is gone: every worker it had is gone too (parent-death signal).
        with self._lock:
            self._closed = True
            left, self._workers = self._workers, {}
        for wid, handle in left.items():
            handle._exited(None)
            self.on_exit(wid, None)

    def close(self, timeout: float = 2.0) -> None:
        """Tell the server to end (it kills what is left below it), reap it; idempotent."""
        with self._lock:
            self._closed = True
        if os.getpid() != self._owner:
            # A copy of the driver (the user forked it): the server is not ours to end, and
            # shutting the shared socket down would end it for the driver too.
            self._close_sockets()
            return
        try:
            self._ctl.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        # A pidfd becomes readable when the server exits: no polling delay on shutdown's path.
        # (A Pidfd: a fork server another thread forks meanwhile closes its copy.)
        server = Pidfd.open(self.pid)
        waiting = None
        if server._fd is not None:
            waiting = select.poll()  # not select: a driver may hold descriptors past 1023
            waiting.register(server._fd, select.POLLIN)
        try:
            while True:
                try:
                    pid, _ = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid:
                    break
                if time.monotonic() > deadline:
                    try:
                        os.kill(self.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    deadline = float("inf")
                if waiting is None:
                    time.sleep(0.005)
                else:
                    waiting.poll(1000 * min(1.0, max(0.0, deadline - time.monotonic())))
        finally:
            server.close()
        reader = self._reader
        if reader is not None and reader.is_alive() and reader is not threading.current_thread():
            reader.join(timeout)
        with self._lock:
            left = list(self._workers.values())
        for handle in left:  # exits never read (the reader never ran): their processes are gone
            if handle._pidfd is not None:
                handle._pidfd.close()
        self._close_sockets()
        _clients.discard(self)


# --------------------------------------------------------------------------- #
# The server process
# --------------------------------------------------------------------------- #


def _serve(ctl: socket.socket, events: socket.socket, driver: int,
           first: list[tuple[str, Any, list[int]]]) -> NoReturn:
    """The fork server's loop (runs alone in its process until the driver goes).

    ``first``: ``(worker_id, spec, descriptors)`` of the workers it forks before anything
    else (the runtime's first ones; see ``ForkServer(first=)``)."""
    _set_handler(_SIGINT, _SIG_IGN)  # Ctrl-C is the driver's to handle
    _sigmask(_SIG_UNBLOCK, (_SIGINT,))  # held by the driver around the fork (hold_sigint)
    stop = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = stop or os.getppid() != driver  # a parent-death SIGTERM; any other one is ignored

    # signal.signal's C function (as in _leave_server): no enum conversions before the forks
    _set_handler(_SIGTERM, on_term)
    _set_handler(_SIGCHLD, _ignore)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    # Before the first workers exist: a subreaper set later reaches them only on kernels
    # that pass it down to existing children (Linux >= 4.11).
    _prctl(_PR_SET_PDEATHSIG, _SIGTERM)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    #: what each worker closes once it said Ready (numbers: see _leave_server)
    server_fds = (ctl.fileno(), events.fileno(), wake_r, wake_w)
    me = os.getpid()
    # The runtime's first workers, forked back to back before anything else runs here (each
    # page this process writes after a fork is copied, which delays the next one): they start
    # up while the driver builds the rest of itself, and need no request.
    forked: list[int | OSError] = []
    for i, (_, spec, fds) in enumerate(first):
        try:
            pid = os.fork()
        except OSError as exc:
            forked.append(exc)
            continue
        if pid == 0:
            siblings = [fd for j, (_, _, theirs) in enumerate(first) if j != i for fd in theirs]
            _worker(spec, fds, me, (*server_fds, *siblings))
        forked.append(pid)
    workers: dict[int, str] = {}  # pid -> worker id
    encoder = msgspec.msgpack.Encoder()
    for (worker_id, _, fds), born in zip(first, forked):
        for fd in fds:
            os.close(fd)
        if isinstance(born, OSError):
            reply: _Reply = _Failed(f"{type(born).__name__}: {born}")
        else:
            workers[born] = worker_id
            reply = _Started(born)
        if not _reply(ctl, encoder, reply):
            stop = True
    sweeps: list[float] = []
    next_check = 0.0
    waiting = select.poll()  # not select: the driver may have held descriptors past 1023
    waiting.register(ctl.fileno(), select.POLLIN)
    waiting.register(wake_r, select.POLLIN)
    while not stop:
        now = time.monotonic()
        if now >= next_check:
            if os.getppid() != driver:
                break
            next_check = now + _PARENT_CHECK
        timeout = min([next_check, *sweeps]) - now
        try:
            ready: list[int] = [fd for fd, _ in waiting.poll(1000 * max(0.0, timeout))]
        except InterruptedError:
            ready = []
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        # Reap every child that ended (workers, and orphans re-parented here).
        died = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            wid = workers.pop(pid, None)
            if wid is not None:
                died = True
                try:
                    events.send(encoder.encode(_Exited(wid, os.waitstatus_to_exitcode(status))))
                except OSError:
                    stop = True
        now = time.monotonic()
        if died:
            sweeps = [now + d for d in _SWEEP_AGAIN]
            _sweep(set(workers))
        elif sweeps and now >= sweeps[0]:
            sweeps.pop(0)
            _sweep(set(workers))
        if ctl.fileno() in ready:
            try:
                raw, fds, _, _ = socket.recv_fds(ctl, _MAX_REQUEST, _MAX_FDS)
            except OSError:
                break
            if not raw:
                break  # the driver closed (or died)
            try:
                decoder, spec_decoder = _spawn_decoders()
                request = decoder.decode(raw)
                spec = spec_decoder.decode(request.spec)
                pid = os.fork()
                if pid == 0:
                    _worker(spec, fds, me, server_fds)
                workers[pid] = request.worker_id
                reply = _Started(pid)
            except Exception as exc:  # a bad request or no fork: the driver reports it
                reply = _Failed(f"{type(exc).__name__}: {exc}")
            finally:
                for fd in fds:
                    os.close(fd)
            if not _reply(ctl, encoder, reply):
                break
    _end_all(list(workers))
    os._exit(0)


def _reply(ctl: socket.socket, encoder: msgspec.msgpack.Encoder, reply: _Reply) -> bool:
    """Send one reply to the driver, with the pidfd of the worker it reports; False if the
    driver is gone.

    The pidfd is opened before the server's loop reaps again, so it names this worker: the
    driver signals it through it, never by a pid that may be reused once it is reaped."""
    pidfd = -1
    if isinstance(reply, _Started):
        try:
            pidfd = os.pidfd_open(reply.pid)
        except (AttributeError, OSError):
            pidfd = -1  # no pidfds on this kernel: the driver signals by pid
    try:
        socket.send_fds(ctl, [encoder.encode(reply)], [pidfd] if pidfd >= 0 else [])
    except OSError:
        return False
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return True


_set_wakeup_fd = signal.set_wakeup_fd


def _ignore(signum: int, frame: Any) -> None:
    """SIGCHLD's handler in the server: the signal only wakes its loop (wakeup fd)."""


def _leave_server(server_fds: tuple[int, ...]) -> None:
    """In a new worker that said Ready: close the server's descriptors, and mark the
    processes it will start as its own.

    By number: the server's socket objects stay referenced by its frames, under this
    worker's, until the worker's os._exit, so none is ever freed here to close a number
    again that the worker has reused meanwhile."""
    for fd in server_fds:
        os.close(fd)
    os.environ[WORKER_PID_VAR] = str(os.getpid())


def _worker(spec: Any, fds: list[int], server: int, server_fds: tuple[int, ...]) -> NoReturn:
    """In a new worker (out of the server's state): run the worker, exit with its status.

    Only what must come first happens before the worker says Ready (``run_worker`` calls
    :func:`_leave_server` then): it dies with ``server``, its parent, and takes none of the
    server's signal handlers (SIGINT stays ignored: Ctrl-C is the driver's)."""
    code = 1
    try:
        # From here a server that dies takes this worker with it; one that died before is
        # no longer its parent (the worker would run on with no one to reap or report it).
        _prctl(_PR_SET_PDEATHSIG, _SIGTERM)
        if os.getppid() != server:
            os._exit(1)
        _set_wakeup_fd(-1)
        _set_handler(_SIGCHLD, _SIG_DFL)
        _set_handler(_SIGTERM, _SIG_DFL)
        # A worker with no module of the user's to import is Ready once its output is installed
        # (which runs the user's inherited logging handlers: one that raises fails the start): it
        # says so with the greeting the driver encoded for it, before it builds anything else.
        try:
            greeted = bool(fds) and bool(spec.greeting) and not spec.imports
            if greeted:
                install_worker_output(spec.worker_id, spec.prefix_output, spec.log_level)
                say_greeting(fds[0], spec.greeting)
            # Their kinds given: no system calls to ask the kernel (see Supervisor.request_piped)
            pipe = socket.socket(_AF_UNIX, _SOCK_STREAM, 0, fds[0]) if fds else None
            control = socket.socket(_AF_UNIX, _SOCK_SEQPACKET, 0, fds[1]) if len(fds) > 1 else None
            run_worker(spec, pipe, control, functools.partial(_leave_server, server_fds), greeted)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)


def _owner(proc: Any, workers: set[int]) -> int | None:
    """The worker ``proc`` belongs to: its process group, else the variable it inherited."""
    try:
        pgid = os.getpgid(proc.pid)
    except OSError:
        return None
    if pgid in workers:
        return pgid
    try:
        marker = proc.environ().get(WORKER_PID_VAR)
    except Exception:
        return None
    try:
        return int(marker) if marker else None
    except ValueError:
        return None


def _child_pids(pid: int) -> list[int] | None:
    """The children of ``pid``, from ``/proc/<pid>/task/*/children`` (one read per thread
    instead of psutil's read of every process's stat file: ~4 ms on a busy host, at each
    worker's exit); None where the kernel does not offer it."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    pids: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                pids.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            if tid == str(pid):
                return None  # no such file (CONFIG_PROC_CHILDREN off), or pid is gone
        except (OSError, ValueError):
            return None
    return pids


def _sweep(workers: set[int]) -> None:
    """SIGKILL every orphan here (with its descendants) that belongs to no live worker."""
    mine = _child_pids(os.getpid())
    if mine is not None and workers.issuperset(mine):
        return  # only workers below us: no orphan (the usual case)
    import psutil

    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    victims = []
    for child in children:
        if child.pid in workers:
            continue
        if _owner(child, workers) in workers:
            continue  # a live worker's daemon: it goes when that worker goes
        try:
            victims.extend([child, *child.children(recursive=True)])
        except psutil.Error:
            victims.append(child)
    for proc in victims:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _end_all(workers: list[int]) -> None:
    """SIGTERM the workers (each cleans up and kills its group), then SIGKILL everything below; reap (bounded)."""
    import psutil

    for pid in workers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    grace = time.monotonic() + _WORKER_GRACE
    while workers and time.monotonic() < grace:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid in workers:
            workers.remove(pid)
        elif not pid:
            time.sleep(0.005)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if _child_pids(os.getpid()) == []:
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:  # zombies are not in the children file
                    pass
            except ChildProcessError:
                return  # nothing below us
        try:
            below = psutil.Process().children(recursive=True)
        except psutil.Error:
            below = []
        for proc in below:
            try:
                proc.kill()
            except psutil.Error:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.01)
