"""The pump thread: the driver's one loop over its sockets, pipes and deadlines.

Each round waits (``zmq.Poller``) for input or the next deadline the state
asks for (retry timers, route timeouts, frames held back, callers reading
the pipes, a handshake under way), then: reads local workers' pipes
(:mod:`phalanx.pipes`) and the results ROUTER, hands each frame to
``Driver._handle``, lets the collaborators do their periodic work
(membership heartbeats and Sync, reaping, overdue tasks, reclaiming, owed
replacements, inspect answers, the channel broker's sends) and, last,
delivers the outcomes resolved this round, just before it blocks again.
In a runtime that does not listen, the pump also makes the driver's ZeroMQ
sockets, ``SOCKETS_AFTER`` the first workers are ready, and polls the results
socket from then on (or from when another thread made it for a lease); at
that time it also runs what the runtime left for after its start
(``Pump.later``).

Runs on the thread ``phalanx-pump`` alone (``Driver._pump_thread``). Locks:
the pump takes the driver's lock only inside the calls it makes (each says
what it guards); it reads the results ROUTER, the wake pipe and the
poller without one, being their only reader.

Invariants kept:

* **No hang.** The pump's death, whatever ends it, breaks the runtime:
  every pending caller gets :class:`~phalanx.errors.RuntimeBrokenError`;
  the outcomes already resolved are delivered and the pipes closed first.
* **Bad input never kills.** A frame under a local worker's name on the
  ROUTER, or from a tcp peer under an identity its key does not own, is
  counted in ``frames_dropped``; an exception from the runtime's own
  handling is an internal error (it breaks the runtime), never a counter.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from . import collected
from .direct import DIRECT_LINGER
from .errors import RuntimeBrokenError

if TYPE_CHECKING:
    from .driver import Driver

__all__ = ["Pump", "REAP_PERIOD", "SOCKETS_AFTER"]

log = logging.getLogger("phalanx.driver")

#: seconds between the pump's sweeps of dead workers' records
REAP_PERIOD = 0.1
#: seconds after the first workers are ready when the pump makes the driver's ZeroMQ sockets, if
#: nothing needed them before (Driver.make_sockets), and runs Pump.later: not while the
#: first tasks run
SOCKETS_AFTER = 0.05


class Pump:
    """The pump thread's loop (see the module docstring).

    What it uses of the driver: the results ROUTER and wake pipe, ``_handle``,
    the collaborators' periodic calls, ``outcomes.timers`` and the routing's
    waits (``_fire_timers``, ``_expire_routes``), ``_deliver_ready``,
    ``internal_error``/``break_runtime``, ``frames_dropped``.
    """

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        #: what the start leaves for later: run SOCKETS_AFTER the first workers are ready, not
        #: on the way to the first result (see after_start)
        self.later: list[Callable[[], object]] = []

    def run(self) -> None:
        """The pump thread's body: its loop until shutdown; its death breaks the runtime."""
        driver = self.driver
        poller = zmq.Poller()
        if driver._results is not None:  # a listening runtime's (see Driver.make_sockets)
            poller.register(driver._results, zmq.POLLIN)
        poller.register(driver._wake_r, zmq.POLLIN)
        for mon in driver.membership.monitors:
            poller.register(mon, zmq.POLLIN)
        # Collections hand their work over while this runtime runs (its thread starts after the
        # start, from self.later, and ends with the last runtime's pump).
        collected.hold()
        try:
            self.loop(poller)
        except BaseException as exc:  # never silently: every caller learns at once
            log.critical("the pump thread died", exc_info=True)
            broken = RuntimeBrokenError(f"the runtime's pump thread died: {exc!r}")
            broken.__cause__ = exc
            try:
                driver.break_runtime(broken)
            except BaseException:
                log.exception("failing the jobs of a broken runtime")
        finally:
            try:
                driver._deliver_ready()
            except BaseException:
                log.exception("delivering the last outcomes")
            try:
                driver.pipes.end_all()
            finally:
                collected.release()

    def after_start(self) -> None:
        """Run what the start left for later (:attr:`later`: the fork server's exit reports
        read, the sweep of /dev/shm, the finalize thread started); never if the runtime ends
        first (its shutdown reads and sweeps; the last pump's end makes the finalize thread do
        what was handed over). House-keeping: one that fails is logged, it does not break the
        runtime."""
        for fn in self.later:
            try:
                fn()
            except Exception:
                log.warning("start-up work left for later failed", exc_info=True)
        self.later.clear()

    def loop(self, poller: zmq.Poller) -> None:
        """Rounds: wait for input or the next deadline, read, resolve, send, deliver."""
        driver = self.driver
        results = driver._results
        pipes = driver.pipes
        direct = driver.direct
        membership = driver.membership
        lifecycle = driver.lifecycle
        inspection = driver.inspection
        reclaimer = driver.reclaimer
        listening = driver.address is not None
        interval = driver.config.heartbeat_interval
        last_reap = time.monotonic()  # nothing to reap or expire while the first workers start
        timed = False
        # when the work left for after the start is done (the sockets made, self.later run),
        # once the first workers are ready (0.0: not yet known), and whether it was
        later_at = 0.0
        later = False
        while True:
            if results is None and driver._results is not None:  # made by another thread (a lease)
                results = driver._results
                poller.register(results, zmq.POLLIN)
            handshaking = membership.handshaking()
            wait = 1.0 if handshaking else min(100.0, interval * 1000)
            if driver.outcomes.timers:
                wait = min(wait, max(0.0, (driver.outcomes.timers[0][0] - time.monotonic()) * 1000))
            if driver._unrouted:
                with driver._lock:  # user threads change it
                    due = min(driver._unrouted.values(), default=0.0) + driver.config.route_timeout
                wait = min(wait, max(0.0, (due - time.monotonic()) * 1000))
            # While callers read the pipes (phalanx.direct), or a thread submitting (LocalPipes.help),
            # the pump does not, and looks again when they would be its.
            now = time.monotonic()
            helping = pipes.helping(now)
            reads = not helping and not direct.active(now)
            if not reads:
                wait = min(wait, max(DIRECT_LINGER, helping) * 1000)
            wait = pipes.before_poll(poller, wait, reads)
            piped = len(pipes.by_fd)
            if timed:
                wait = min(wait, REAP_PERIOD * 1000)
            if later_at and not later:
                wait = min(wait, max(0.0, (later_at - now) * 1000))
            events = dict(poller.poll(int(wait) + (1 if wait else 0)))
            if driver._wake_r in events:
                if b"x" in os.read(driver._wake_r, 4096):
                    return
            pipes.after_poll(poller, events, reads)
            if len(pipes.by_fd) < piped and not later:
                # A local worker's pipe ended before the fork server's exit reports were read
                # (see Lifecycle.start_workers): they are from now on, its exit among them.
                driver._supervisor.watch()
            if results is not None and results in events:
                for _ in range(4096):
                    origin = None
                    try:
                        if listening:
                            frames = results.recv_multipart(zmq.NOBLOCK, copy=False)
                            origin = membership.origin(frames[-1])
                            parts = [f.bytes for f in frames]
                        else:
                            parts = results.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except zmq.ZMQError:
                        return
                    ident = parts[0]
                    sender = driver._workers.get(ident[:-1] if ident.endswith(b"!") else ident)
                    if sender is not None and sender.pipe is not None:
                        # A local worker speaks on its pipe only (its control thread too): this is
                        # someone else using its name, or its side channel's.
                        driver.frames_dropped += 1
                        continue
                    if origin is not None and not membership.admit(parts[0], origin):
                        driver.frames_dropped += 1
                        continue
                    try:
                        driver._handle(parts, origin=origin)
                    except Exception as exc:  # bad input is counted where it is checked: this is a bug
                        driver.internal_error(exc, "handling a frame")
            if membership.monitors:
                for mon in membership.monitors:
                    if mon in events:
                        membership.on_monitor(mon)
            if listening:
                membership.drain_tasks()
            if driver.outcomes.timers:
                driver._fire_timers()
            if driver._unrouted:
                driver._expire_routes(time.monotonic())
            if inspection.outgoing:
                inspection.send_outgoing()
            if driver.channels is not None:
                driver.channels.flush()
            while driver._injected:
                ident, frame = driver._injected.popleft()
                driver._handle([ident, frame], True)
            if lifecycle.owed:
                lifecycle.spawn_owed()
            now = time.monotonic()
            membership.tick(now, handshaking)
            if now - last_reap >= REAP_PERIOD:
                last_reap = now
                membership.reap_dead()
                timed = lifecycle.expire_overdue(now)
            reclaimer.tick(now)
            if driver._deliveries:
                driver._deliver_ready()
            if not later and lifecycle.started:
                # The sockets are made, and what waits for after the start is done, SOCKETS_AFTER
                # the first workers are ready, not on the way to the first result (see
                # Driver.make_sockets); the sockets are polled from the next round.
                if not later_at:
                    later_at = now + SOCKETS_AFTER
                elif now >= later_at:
                    later = True
                    if results is None:
                        driver.make_sockets()
                        results = driver._results
                        if results is not None:
                            poller.register(results, zmq.POLLIN)
                    self.after_start()
