"""Fault injection into a real :class:`phalanx.Runtime`: kill processes, drop frames.

Runs in the driver process. :func:`inject_faults` installs a
:class:`FaultInjector` as the driver's ``frame_filter`` (see
``phalanx.driver.Driver``), so the same :class:`~phalanx.testing.FaultEngine`
that drives :class:`~phalanx.testing.SimRuntime` sees every frame::

    user / pump threads ──send──▶ frame_filter("out") ──▶ tasks ROUTER ──▶ worker
    pump thread ◀── frame_filter("in") ◀── results ROUTER ◀── worker
    release thread: held frames due ──▶ Driver.inject / Driver.send_unfiltered
    KillWorker: SIGKILL through the worker's pidfd (the supervisor's), never by a pid
    PartitionHost: every frame to and from the workers of one host is held
      (remote workers: all those that joined from that host; a local one alone)

Invariant kept: the injector only ever signals the runtime's own live local
workers, through their pidfds (a process that took a dead worker's pid is
never hit), and
removing it (``close()``, or leaving the ``with`` block) restores the
unfiltered driver; frames still held then are dropped, as a lost link would.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..supervisor import signal_worker_pid
from .faults import Fault, FaultEngine, resolve_plan

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["FaultInjector", "inject_faults", "kill_worker", "kill_child"]


def kill_child(pid: int) -> bool:
    """SIGKILL ``pid`` if it is a live local worker of this process; True if signalled.

    A worker is one that a runtime's supervisor in this process started and
    still watches; the signal goes through that worker's pidfd, so a process
    that took a dead worker's pid (a reused pid) is left alone.
    """
    return signal_worker_pid(pid, signal.SIGKILL)


def kill_worker(rt: Any, index: int = 0) -> str | None:
    """Kill the ``index``-th live worker (by sorted id, modulo their number) of a runtime.

    Works on :class:`phalanx.Runtime` (a real SIGKILL) and on
    :class:`~phalanx.testing.SimRuntime`; returns the worker id, or None.
    """
    pids: dict[str, int] = rt.worker_pids()
    if not pids:
        return None
    wid = sorted(pids)[index % len(pids)]
    from .sim import SimRuntime

    if isinstance(rt, SimRuntime):
        rt.kill_worker(wid)
        return wid
    # By worker id, through its pidfd: the pid read above may be a stranger's by now.
    return wid if rt._driver._supervisor.signal(wid, signal.SIGKILL) else None


class FaultInjector:
    """A fault plan applied to a live :class:`phalanx.Runtime` (see the module docstring)."""

    def __init__(self, rt: Runtime, plan: Sequence[Fault]) -> None:
        self.rt = rt
        self.plan = list(plan)
        self._driver = rt._driver
        self.engine = FaultEngine(self.plan, host_of=self._host)
        self.kills: list[tuple[str, int]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._release_loop, name="phalanx-testing-release", daemon=True)
        self._thread.start()
        self._driver.frame_filter = self._filter

    @property
    def fired(self) -> list[tuple[Fault, str]]:
        """The steps that took effect so far, with what they did."""
        return list(self.engine.fired)

    def _pid(self, ident: bytes) -> int:
        # Read without the driver's lock: the "out" filter runs with it held.
        w = self._driver._workers.get(ident)
        return w.pid if w is not None else 0

    def _host(self, ident: bytes) -> str:
        # A remote worker's host, as it said when it joined; a local worker stands alone.
        w = self._driver._workers.get(ident)
        return w.host if w is not None and w.remote else ""

    def _kill(self, ident: bytes) -> None:
        pid = self._pid(ident)
        if pid and self._driver._supervisor.signal(ident.decode(), signal.SIGKILL):
            self.kills.append((ident.decode(), pid))

    def _filter(self, direction: str, ident: bytes, frame: bytes) -> list[bytes]:
        now = time.monotonic()
        if direction == "out":
            frames, kill = self.engine.outgoing(ident, frame, now)
        else:
            frames, kill = self.engine.incoming(ident, frame, now)
        worker = ident[:-1] if ident.endswith(b"!") else ident
        if kill == "now":
            self._kill(worker)
        elif kill == "after":
            # The pump runs this filter: let it handle the outcome first, then kill.
            for f in frames:
                self._driver._handle([ident, f], True)
            frames = []
            self._kill(worker)
        with self._wake:
            self._wake.notify_all()
        return frames

    def _release_loop(self) -> None:
        while True:
            with self._wake:
                if self._closed:
                    return
                due = self.engine.next_release()
                wait = 0.05 if due is None else max(0.0, due - time.monotonic())
                if wait > 0:
                    self._wake.wait(min(wait, 0.05))
            for direction, ident, frame in self.engine.release(time.monotonic()):
                if self.closed:
                    return
                if direction == "in":
                    self._driver.inject(ident, frame)
                else:
                    self._driver.send_unfiltered(ident, frame)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop injecting: the driver is unfiltered again; held frames are dropped."""
        if self._closed:
            return
        if self._driver.frame_filter == self._filter:
            self._driver.frame_filter = None
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(5.0)

    def __enter__(self) -> FaultInjector:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def inject_faults(rt: Runtime, faults: Any) -> FaultInjector:
    """Apply ``faults`` (a plan, a step, or a Hypothesis strategy drawn in ``@given``) to ``rt``.

    ::

        with phalanx.Runtime(workers=2) as rt, inject_faults(rt, [KillWorker(task=2)]):
            assert list(rt.map(square, range(10))) == [x * x for x in range(10)]
    """
    return FaultInjector(rt, resolve_plan(faults))
