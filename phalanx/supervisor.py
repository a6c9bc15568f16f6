"""Spawning, watching and killing worker processes.

Runs in the driver (one :class:`Supervisor` per :class:`phalanx.Runtime`) and,
for remote hosts, under ``phalanx worker --connect``. It knows processes, not
tasks: it starts workers through phalanx's fork server (start method
``"phalanx"``, :mod:`phalanx.forkserver`, forked by the first request, with
the workers it asks for) or a multiprocessing context (``"spawn"``, ``"forkserver"``, ``"fork"``), tells
its owner when one exits (``on_exit(worker_id, exitcode)``) from a watcher
thread (the fork server's reader thread under ``"phalanx"``), and stops them
in layers::

    Stop message (sent by the owner) -> join(timeout) -> SIGTERM -> SIGKILL of the tree

Invariants kept:

* **No orphans.** Every process it started is gone when :meth:`Supervisor.stop`
  returns, including anything those processes spawned; workers also kill
  themselves when their parent dies (see :mod:`phalanx.worker`), which covers
  a SIGKILLed driver.
* **No stranger is signalled.** Workers are signalled only through pidfds
  (:class:`~phalanx.forkserver.Pidfd`), never by pid: a worker reaped by
  another process (a fork server) or thread may have left its pid to anyone.
  Under ``"phalanx"`` the fork server opens each pidfd before it can reap the
  worker; under the multiprocessing methods the supervisor opens it right
  after the start and keeps it only if the worker was not reaped by then.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

import psutil

from . import forkserver
from .errors import RuntimeClosedError
from .transport import pipe
from .worker import WorkerSpec, run_worker

__all__ = ["Supervisor", "kill_process_tree", "signal_worker_pid"]

#: every supervisor of this process, for :func:`signal_worker_pid`
_supervisors: weakref.WeakSet[Supervisor] = weakref.WeakSet()


def kill_process_tree(pid: int, include_parent: bool = True, timeout: float = 2.0) -> None:
    """SIGKILL ``pid`` and all its descendants.

    Waits up to ``timeout`` for the descendants to vanish, but never reaps
    ``pid`` itself: its parent must be the one to ``waitpid`` it, or the parent
    would lose its exit code. ``pid`` must name the process meant (an unreaped
    child of the caller): workers are killed by :meth:`Supervisor.kill`, through
    their pidfds, instead.
    """
    try:
        parent = psutil.Process(pid)
        descendants = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    victims = [*descendants, parent] if include_parent else descendants
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    mine = {p.pid for p in psutil.Process().children()}
    others = [p for p in descendants if p.pid not in mine]
    if others:
        psutil.wait_procs(others, timeout=timeout)


def _kill_worker_tree(proc: Any, timeout: float = 2.0) -> bool:
    """SIGKILL a worker (a :class:`~phalanx.forkserver.ForkedWorker` or :class:`_Child`)
    and its descendants; False if the worker was gone already.

    Its descendants are read by pid, then kept only if the worker is still
    running: then that pid still was the worker's when they were read. Each
    is killed by psutil, which checks the process it names is still the one
    it read; the worker itself through its pidfd.
    """
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if not proc.running():
        # Exited (its children went to the fork server, which sweeps them), or reaped: then
        # the pid may be a stranger's, and so may that list.
        return bool(proc.send_signal(signal.SIGKILL))
    for child in descendants:
        try:
            child.kill()
        except psutil.Error:
            pass
    delivered = bool(proc.send_signal(signal.SIGKILL))
    mine = {p.pid for p in psutil.Process().children()}
    others = [p for p in descendants if p.pid not in mine]
    if others:
        psutil.wait_procs(others, timeout=timeout)
    return delivered


class _Child:
    """A worker started by a multiprocessing context, with the pidfd the supervisor signals
    it through (the ``"phalanx"`` method's :class:`~phalanx.forkserver.ForkedWorker` twin).

    The pidfd is opened right after the start; it is kept only if the worker
    was not reaped by then (``exitcode`` still None): under ``"fork"`` and
    ``"spawn"`` this process is the parent and nobody but multiprocessing
    here reaps it, so the pidfd names the worker. Under ``"forkserver"``
    multiprocessing's server reaps it and reports that on the sentinel a few
    instructions later; a pid reused in that instant is the one case left
    (see docs/faults.md).
    """

    def __init__(self, proc: BaseProcess) -> None:
        assert proc.pid is not None
        self.proc = proc
        self.pid: int = proc.pid
        self.sentinel = proc.sentinel
        self._pidfd = forkserver.Pidfd.open(proc.pid)
        if proc.exitcode is not None:  # reaped before the pidfd was opened: it may name a stranger
            self._pidfd.close()

    @property
    def exitcode(self) -> int | None:
        return self.proc.exitcode

    def join(self, timeout: float | None = None) -> None:
        self.proc.join(timeout)
        if self.proc.exitcode is not None:
            self._pidfd.close()

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    def send_signal(self, sig: int) -> bool:
        return self._pidfd.send_signal(sig)

    def running(self) -> bool:
        return self._pidfd.running()

    def terminate(self) -> None:
        self._pidfd.send_signal(signal.SIGTERM)

    def close(self) -> None:
        self._pidfd.close()
        self.proc.close()


def signal_worker_pid(pid: int, sig: int) -> bool:
    """Send ``sig`` to the local worker whose pid is ``pid``, through its pidfd, if a
    supervisor of this process started and still watches it; True if delivered.

    A process that took a reaped worker's pid is not a worker of any
    supervisor here: it is left alone.
    """
    for sup in list(_supervisors):
        if sup.signal_pid(pid, sig):
            return True
    return False


class Supervisor:
    """Starts worker processes and reports their exits."""

    def __init__(
        self,
        start_method: str,
        on_exit: Callable[[str, int | None], None],
        server: forkserver.ForkServer | None = None,
    ) -> None:
        """``server``: a fork server its owner made earlier and keeps (``phalanx worker``,
        whose supervisors come and go with drivers); else the first request forks one, with
        the workers it asks for (see :class:`~phalanx.forkserver.ForkServer`): its owner makes
        that request before it starts any thread."""
        self._on_exit = on_exit
        #: workers' exits are reported only once start() ran (the owner is ready for them)
        self._started = threading.Event()
        #: the fork server (start method "phalanx"; None until the first request if ours)
        self._server: forkserver.ForkServer | None = server
        #: multiprocessing's context (its start methods), None under "phalanx"
        self._ctx: Any = None
        self._own_server = server is None
        if start_method == "phalanx":
            if server is not None:
                server.on_exit = self._on_server_exit
        else:
            self._ctx = multiprocessing.get_context(start_method)
        self._procs: dict[str, Any] = {}  # _Child, or ForkedWorker
        self._lock = threading.Lock()
        #: held while a process starts, so stop() sees every process spawn() started
        self._spawn_lock = threading.RLock()  # spawn_piped holds it around _start
        self._closing = False
        # The watcher and its wake-up pipe serve multiprocessing's methods only (the fork
        # server's reader thread reports exits): not made for nothing on the first workers' path.
        self._watcher: threading.Thread | None = None
        self._wake_r: multiprocessing.connection.Connection | None = None
        self._wake_w: multiprocessing.connection.Connection | None = None
        if self._ctx is not None:
            self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
            self._watcher = threading.Thread(target=self._watch, name="phalanx-supervisor", daemon=True)
        _supervisors.add(self)

    def start(self, watch: bool = True) -> None:
        """Start reporting exits (after the first spawns: forking before threads exist is safe).

        ``watch=False``: the fork server's exit reports are read only from :meth:`watch` on
        (its reader thread is started then, not on the way to the first result); its owner
        calls it once a worker's pipe ends, or soon after the start, and :meth:`stop` does.
        """
        self._started.set()
        if self._server is not None:
            if watch:
                self._server.start()
        elif self._watcher is not None and not self._watcher.is_alive():
            self._watcher.start()

    def watch(self) -> None:
        """Read the fork server's exit reports from now on (idempotent; see :meth:`start`).
        Exits that came before wait in its socket until then, and are reported in order."""
        server = self._server
        if server is not None:
            server.start()

    def spawn(self, spec: WorkerSpec) -> int:
        """Start one worker process for ``spec``; return its pid."""
        return self._start(spec, None)

    def spawn_piped(self, spec: WorkerSpec) -> tuple[int, socket.socket, socket.socket]:
        """Start a local worker that talks over socketpairs; (its pid, the driver's end of its
        pipe, the driver's end of its control pipe).

        The pairs are made under the spawn lock, so no other worker forked
        meanwhile inherits the worker's ends: the driver's end sees EOF exactly
        when this worker (and what it forked) is gone.
        """
        started = self.spawn_piped_many([spec])[0]
        if isinstance(started, BaseException):
            raise started
        return started

    def spawn_piped_many(
        self, specs: list[WorkerSpec]
    ) -> list[tuple[int, socket.socket, socket.socket] | OSError]:
        """:meth:`spawn_piped` for several workers; per spec (pid, the driver's ends) or why not.

        The fork server gets every request at once and forks the workers back to back.
        """
        return self.request_piped(specs)()

    def request_piped(
        self, specs: list[WorkerSpec],
        on_ends: Callable[[list[tuple[socket.socket, socket.socket]]], None] | None = None,
        deadline: float | None = None,
        watch: bool = True,
    ) -> Callable[[], list[tuple[int, socket.socket, socket.socket] | OSError]]:
        """Ask for the workers of :meth:`spawn_piped_many` without waiting for them.

        Returns the function that returns what ``spawn_piped_many`` would; the
        fork server's replies (the pids) are read only then, so its caller can
        do other work while the workers are forked. Call it exactly once,
        before any other spawn. ``on_ends``: given each worker's (pipe, control)
        ends here, as soon as the requests are sent (before the pids); the
        caller then owns them, those of a worker that failed to start included.
        ``deadline`` (``time.monotonic()``): if this request forks the fork server, the
        function raises TimeoutError when the server has not replied by then.
        ``watch=False``: the fork server's exit reports are not read yet (see :meth:`start`).
        """
        with self._spawn_lock, forkserver.fork_lock:
            pairs = [pipe.socketpair() for _ in specs]
            controls: list[tuple[socket.socket, socket.socket]] = []
            try:
                # The control pipe: one message per control frame, never blocking the driver.
                controls.extend(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in specs)
                forkserver.note_driver_ends(ours for ours, _ in (*pairs, *controls))
                theirs: list[tuple[socket.socket, ...] | None] = [(t, c) for (_, t), (_, c) in zip(pairs, controls)]
                if self._ctx is not None:
                    started: list[int | OSError] = [self._start(spec, ends) for spec, ends in zip(specs, theirs)]

                    def collect() -> list[int | OSError]:
                        return started
                else:
                    collect = self._request_served(specs, theirs, [ours for ours, _ in (*pairs, *controls)],
                                                   deadline)
            except BaseException:
                for ours, their in (*pairs, *controls):
                    ours.close()
                    their.close()
                raise
        if on_ends is not None:
            for control, _ in controls:
                control.setblocking(False)
            on_ends([(ours, control) for (ours, _), (control, _) in zip(pairs, controls)])

        def finish() -> list[tuple[int, socket.socket, socket.socket] | OSError]:
            if self._server is not None and watch:
                # Its reader thread starts while the server forks and replies, not after the
                # replies: a thread's start waits until the thread runs, which on a busy
                # machine can be a scheduler slice away (its exits wait for start() anyway).
                self._server.start()
            try:
                pids = collect()
            except BaseException:
                if on_ends is None:
                    for ours, _ in (*pairs, *controls):
                        ours.close()
                raise
            out: list[tuple[int, socket.socket, socket.socket] | OSError] = []
            for pid, (ours, _), (control, _) in zip(pids, pairs, controls):
                if isinstance(pid, OSError):
                    if on_ends is None:
                        ours.close()
                        control.close()
                    out.append(pid)
                else:
                    control.setblocking(False)
                    out.append((pid, ours, control))
            return out

        return finish

    def _start_served(self, specs: list[WorkerSpec],
                      pipes: list[tuple[socket.socket, ...] | None]) -> list[int | OSError]:
        """Start workers through the fork server; per spec its pid, or why not."""
        return self._request_served(specs, pipes)()

    def _request_served(self, specs: list[WorkerSpec], pipes: list[tuple[socket.socket, ...] | None],
                        ours: list[socket.socket] | None = None,
                        deadline: float | None = None) -> Callable[[], list[int | OSError]]:
        """Send the fork server requests for workers; the function that reads its replies
        (per spec its pid, or why not). The first request forks the server with its workers
        (``ours``: the driver's ends of their pipes, which the server must not hold), whose
        replies are waited for until ``deadline`` (see :meth:`request_piped`)."""
        with self._spawn_lock:
            try:
                if self._closing:
                    raise RuntimeClosedError("the supervisor is stopping: no new workers")
                with self._lock:
                    # Registered first: an exit may be reported before spawn_many() returns.
                    for spec in specs:
                        self._procs[spec.worker_id] = None
                requests: list[tuple[str, Any, forkserver._Pipes]] = [
                    (spec.worker_id, spec, theirs) for spec, theirs in zip(specs, pipes)]
                replies: Callable[[], list[forkserver.ForkedWorker | OSError]]
                try:
                    if self._server is None:
                        # No request to send: the workers are forked with the server, before it
                        # serves, and go straight to their start-up.
                        self._server = forkserver.ForkServer(self._on_server_exit, start=False, first=requests,
                                                             drivers_ends=tuple(ours or ()))
                        replies = functools.partial(self._server.first_replies, deadline)
                    else:
                        replies = self._server.send_spawns(requests)
                except BaseException:
                    with self._lock:
                        for spec in specs:
                            self._procs.pop(spec.worker_id, None)
                    raise
            finally:
                for ends in pipes:
                    for end in ends or ():
                        end.close()  # the server forks the worker with its copy

        def collect() -> list[int | OSError]:
            try:
                started = replies()
            except BaseException:
                with self._lock:
                    for spec in specs:
                        self._procs.pop(spec.worker_id, None)
                raise
            pids: list[int | OSError] = []
            with self._lock:
                for spec, handle in zip(specs, started):
                    if isinstance(handle, OSError):
                        self._procs.pop(spec.worker_id, None)
                        pids.append(handle)
                    else:
                        if spec.worker_id in self._procs:
                            self._procs[spec.worker_id] = handle
                        assert handle.pid is not None
                        pids.append(handle.pid)
            return pids

        return collect

    def _start(self, spec: WorkerSpec, theirs: tuple[socket.socket, ...] | None) -> int:
        if self._ctx is None:
            started = self._start_served([spec], [theirs])[0]
            if isinstance(started, OSError):
                raise started
            return started
        proc: BaseProcess = self._ctx.Process(
            target=run_worker, args=(spec, *(theirs or ())), name=f"phalanx-{spec.worker_id}", daemon=False
        )
        with self._spawn_lock:
            try:
                if self._closing:
                    raise RuntimeClosedError("the supervisor is stopping: no new workers")
                proc.start()
            finally:
                for end in theirs or ():
                    end.close()  # the child has its copy (inherited, or passed by multiprocessing)
            child = _Child(proc)
            with self._lock:
                self._procs[spec.worker_id] = child
        self._wake()
        return child.pid

    def _on_server_exit(self, worker_id: str, exitcode: int | None) -> None:
        """The fork server reported a worker's exit (its reader thread)."""
        self._started.wait()
        with self._lock:
            known = worker_id in self._procs
            self._procs.pop(worker_id, None)
            closing = self._closing
        if known and not closing:
            self._on_exit(worker_id, exitcode)

    def pids(self) -> dict[str, int]:
        """Live worker ids and their pids."""
        with self._lock:
            return {wid: p.pid for wid, p in self._procs.items() if p is not None and p.pid is not None}

    def kill(self, worker_id: str) -> bool:
        """SIGKILL one worker and its descendants (its exit is reported as usual); False if
        it was gone already (nothing else is signalled: see the module docstring)."""
        with self._lock:
            proc = self._procs.get(worker_id)
        if proc is None or proc.pid is None:
            return False
        return _kill_worker_tree(proc)

    def signal(self, worker_id: str, sig: int) -> bool:
        """Send ``sig`` to one worker alone, through its pidfd; False if it is gone."""
        with self._lock:
            proc = self._procs.get(worker_id)
        return proc is not None and bool(proc.send_signal(sig))

    def signal_pid(self, pid: int, sig: int) -> bool:
        """Send ``sig`` to the live worker of this supervisor whose pid is ``pid``; False if none."""
        with self._lock:
            procs = [p for p in self._procs.values() if p is not None and p.pid == pid]
        return any(proc.send_signal(sig) for proc in procs)

    def _wake(self) -> None:
        if self._wake_w is None:
            return
        try:
            self._wake_w.send_bytes(b"x")
        except OSError:
            pass

    def _watch(self) -> None:
        while True:
            try:
                if not self._watch_once():
                    return
            except Exception:  # the watcher must outlive any surprise
                time.sleep(0.01)

    def _watch_once(self) -> bool:
        """Wait for exits once; False when the supervisor is closing."""
        with self._lock:
            if self._closing:
                return False
            sentinels: dict[Any, str] = {p.sentinel: wid for wid, p in self._procs.items()}
        assert self._wake_r is not None
        ready = multiprocessing.connection.wait([*sentinels, self._wake_r], timeout=1.0)
        for obj in ready:
            if obj is self._wake_r:
                try:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                except (EOFError, OSError):
                    return False
                continue
            wid = sentinels.get(obj)
            if wid is None:
                continue
            with self._lock:
                proc = self._procs.pop(wid, None)
                closing = self._closing
            if proc is None:
                continue
            proc.join(0.5)
            exitcode = proc.exitcode
            try:
                proc.close()
            except ValueError:
                pass
            if not closing:
                self._on_exit(wid, exitcode)
        return True

    def stop(self, timeout: float, leave_signal: int | None = None) -> None:
        """Wait up to ``timeout`` for workers told to stop, then terminate, then kill.

        ``leave_signal``: send them this signal at once instead (``phalanx
        worker`` leaving: its workers say Goodbye to the driver, then exit).
        """
        with self._spawn_lock, self._lock:
            self._closing = True
            procs = [p for p in self._procs.values() if p is not None]
            self._procs.clear()
        self._started.set()
        self._wake()
        if procs:
            self.watch()  # their exits are what join() waits for
        if leave_signal is not None:
            for proc in procs:
                if proc.is_alive():
                    proc.send_signal(leave_signal)
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for proc in alive:
            proc.terminate()  # the worker's SIGTERM handler kills its process group
            proc.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) worker handles it too
        for proc in alive:
            proc.join(1.0)
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                _kill_worker_tree(proc)
                proc.join(1.0)
        for proc in procs:
            try:
                proc.close()
            except ValueError:
                pass
        if self._server is not None and self._own_server:
            self._server.close()  # it kills anything still below it
        if self._watcher is not None and self._watcher.is_alive():
            self._watcher.join(2.0)
        for end in (self._wake_r, self._wake_w):
            if end is not None:
                end.close()

    @property
    def my_pid(self) -> int:
        """The pid workers are told is their parent."""
        return os.getpid()
