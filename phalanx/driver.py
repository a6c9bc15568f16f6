"""The threaded host of the core: worker table, credit-based dispatch, the result pump.

What outcomes mean (resolution, retries, Ignore/Terminate, crash attribution,
restart intensity, retry timers) is decided by :mod:`phalanx.core`, without
I/O, under this module's lock; :mod:`phalanx.testing.sim` runs the same core
on a virtual clock. This module moves the bytes and keeps the time.

Runs in the driver process. Threads and what they own::

    user threads ──submit──▶ [lock] pending deque ──▶ tasks ROUTER ──▶ worker inbox
                                  ▲          (send under the lock, never polled)
    pump thread  ◀── results ROUTER ◀── worker outbox   (only the pump reads it)
        (local workers: one socketpair each, "the pipe", in place of both
         ROUTERs; written under the lock, flushed by the pump, read by the
         pump or, while one waits in Future.result(), by the waiting caller:
         see phalanx.direct; or by a thread submitting behind every free
         credit: see LocalPipes.help)
        │  decode, dedupe, return credits, dispatch more   [lock]
        └─▶ deliver outcomes to jobs (futures, lease queues)   [no lock held]
    supervisor thread ──on_exit──▶ [lock] redeliver the dead worker's tasks

The driver holds collaborators, each with its own state and module:
:mod:`phalanx.pipes` (local workers' pipes: writing, holding back, flushing,
reading), :mod:`phalanx.direct` (a caller reading its own reply),
:mod:`phalanx.membership` (worker records, handshake, joins, heartbeats, tcp
security), :mod:`phalanx.lifecycle` (spawning, retiring, stopping, exits),
:mod:`phalanx.pump` (the pump thread's loop), :mod:`phalanx.reclaim`
(tasks taken back from a busy worker) and
:mod:`phalanx.inspection` (inspect, ``phalanx top``, counters). The driver's
lock (``_lock``, with its condition ``_changed``) guards the job table, the
routing, the worker records and every send on the tasks ROUTER, the control
PUB and the pipes, for all of them.

The ZeroMQ context and sockets are made in the constructor only by a runtime
that listens; one that does not (its workers use pipes) makes them after its
start, or when a lease or ``rt.endpoints`` needs them first
(:meth:`Driver.make_sockets`): until then they are None.

Remote workers (``listen="tcp://..."``) say Hello on the tcp endpoints, which
demand CURVE keys from ``authorized_keys`` (ZAP, in the authenticator
thread); local workers keep using the private ipc endpoints of the same
sockets. A remote worker sends Alive heartbeats; when they stop for
``heartbeat_timeout`` the pump declares it lost and its tasks are redelivered
exactly as for a local crash. A remote worker whose host is told to stop
says Goodbye first: the same redelivery happens at once, and the driver
acknowledges with Stop.

Dispatch is credit-based (the zguide's load-balancing pattern) rather than
PUSH/PULL: a worker announces how many tasks it may hold, and each task goes
to the live worker with the most free credits among those holding the tag its
job is routed to (``on=``; "default" otherwise). So the driver always knows
which worker holds which task, which is what redelivery after a crash, poison
task attribution, removal of queued tasks on cancel, and routing need; PUSH
would drop whatever sat in a dead peer's pipe without saying what.

Routing: pending tasks wait in one queue per worker tag, so work for a tag
with no live worker never holds up other tags' work. Such work waits (a
worker may join or be replaced) and fails with
:class:`~phalanx.NoWorkerError` once it has waited ``route_timeout`` seconds
with no eligible worker; the pump checks these deadlines. A replacement for
a dead local worker gets the dead worker's tags.

Invariants kept:

1. **Exactly-once delivery.** A task's outcome is delivered only if its
   ``(job, seq)`` is still outstanding; the entry is removed as it is
   delivered, so a duplicate (from a redelivered task) is dropped and counted.
   Execution is at-least-once.
2. **Lease isolation.** Each job is its own channel: outcomes are routed by
   job id, and an outcome for a job that is gone is dropped and counted
   (``late_results_dropped``). A closed or terminated job is forgotten at
   once (job ids are never reused, so no record of it is needed); what a dead
   worker held is kept ``dead_worker_ttl`` seconds to validate its late
   results, then reaped. A worker may only answer for tasks the driver sent
   to *it*.
3. **No hang.** Breaking or closing the runtime fails every open job at once;
   so does the pump thread's death, whatever ends it (it breaks the runtime).
   A task held back for a busy local worker (see ``LocalPipes.send_locked``) goes
   out when that worker's next outcome is read, or after ``HOLD_MAX``. A task
   with a timeout that runs ``timeout + abort_grace`` without an outcome (it
   holds the GIL, its process is frozen) has its worker killed by the driver
   (``Lifecycle.expire_overdue``). Shutdown waits for work, not for frozen workers.
   Short work is not stranded behind a long task while a worker idles: the
   tasks queued behind it are taken back, unstarted (:mod:`phalanx.reclaim`).
6. **Bad input never kills.** Undecodable frames, frames from unknown
   identities and outcomes for unknown tasks are counted and dropped. An
   exception escaping the runtime's own code is not bad input: it breaks the
   runtime (``internal_error``), never a counter. A local worker that sends
   a frame above ``max_frame`` (workers never do: see ``Welcome.max_frame``)
   is killed and replaced.

A crash is charged to one task: the first one its worker held. A map chunk
of several items is split instead (``Task.split``), down to the one item that
crashes, so ``Ignore`` skips just that item and ``WorkerCrashedError`` names it.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from .config import Config
from .policy import DEFAULT_TAG, TaskOptions
from .errors import FrameTooLargeError, NoWorkerError, ProtocolError, RuntimeBrokenError, RuntimeClosedError
from .forkserver import hold_sigint, note_bound
from .supervisor import Supervisor
from .transport import sockets
from .transport.codec import UnpickleFailed, decode_driver, distrust_exits, encode, salvage_results
from .transport.endpoints import Endpoints, local_endpoints, remove_stale_dirs, tcp_endpoints
from .transport.pipe import PipeError
from .transport.messages import Alive, Err, Goodbye, Hello, Ok, Ready, Reclaimed, Results, Retire
from .transport.messages import Shutdown, Terminate
from .transport.messages import (
    ActorCall,
    ActorEvent,
    ActorState,
    InspectQuery,
    InspectReply,
)
from .core.outcomes import Outcomes
from .core.routing import Routing
from .core.tasks import SKIPPED, Delivery, Job, Task
from .direct import SETTLED, DirectReader
from .inspection import Inspection, RuntimeStats, WorkerStats
from .lifecycle import Lifecycle
from .membership import Membership, _Worker
from .pipes import LocalPipes
from .pump import Pump
from .reclaim import Reclaimer

if TYPE_CHECKING:
    from .broker import Broker
    from .transport.keys import RunKeys

__all__ = ["Driver", "Job", "Task", "WorkerStats", "RuntimeStats", "SKIPPED", "SETTLED"]


#: ``(direction "in" | "out", worker identity, frame) -> frames`` (see ``Driver.frame_filter``)
FrameFilter = Callable[[str, bytes, bytes], list[bytes]]

#: seconds a dead worker's record is kept to validate its late results
DEAD_WORKER_TTL = 60.0
#: actor calls held back for one busy local worker that go out at once, without waiting for
#: its next outcome to be read: a thread issuing calls in a loop keeps the pump from the GIL
#: for milliseconds, and the worker would idle meanwhile (see submit_directed)
DIRECTED_HELD_MAX = 128

log = logging.getLogger("phalanx.driver")


class Driver:
    """Sockets, workers and jobs of one runtime (see the module docstring)."""

    def __init__(self, config: Config, run_keys: RunKeys | None = None) -> None:
        self.config = config
        #: the keys of a runtime that starts its own hosts (hosts=, slurm=True), held in memory
        self.run_keys = run_keys
        #: tcp endpoints remote workers connect to, when listening
        self.address: Endpoints | None = tcp_endpoints(config.listen) if config.listen else None
        #: starting, stopping and losing workers (phalanx.lifecycle)
        self.lifecycle = Lifecycle(self)
        # Under start method "phalanx" the first request (in _build, before ZeroMQ's I/O
        # threads or any of ours exist) forks the fork server, a copy of this process that
        # forks the workers: the first ones at once, which start up while this process
        # builds the rest of itself.
        self._supervisor = Supervisor(config.start_method, self.lifecycle.on_exit)
        try:
            self._build(config)
        except BaseException:  # KeyboardInterrupt too: no process, directory, socket or fd is left
            self._unbuild()
            raise

    def _build(self, config: Config) -> None:
        """The driver, its first workers asked for first (see __init__)."""
        #: private ipc endpoints (local workers)
        self.endpoints: Endpoints = local_endpoints()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._workers: dict[bytes, _Worker] = {}
        #: the sockets' high-water mark and largest frame (the hwm and max_frame options)
        self.limits = sockets.Limits(config.hwm, config.max_frame)
        #: the runtime's first local workers, asked for here: their groups, and the function
        #: that waits until they are forked and returns their ids (see start_workers)
        self._first: tuple[dict[str, int], Callable[[], list[str]]] | None = None
        # The first workers are asked for as soon as their specs can be written, before the
        # rest of the driver is built: the fork server is forked with them, and they start up
        # while this process builds the rest.
        groups = config.worker_groups()
        self._first = (groups, self.lifecycle.request_workers(groups, config.start_timeout))
        self._jobs: dict[int, Job] = {}
        self._job_ids = itertools.count(1)
        #: pending tasks per tag, live workers per tag, credit dispatch (phalanx.core.routing)
        self.routing: Routing[_Worker] = Routing(self._jobs, config.max_tasks_per_worker)
        # The routing's own containers, under the names this module reads them by.
        self._pending = self.routing.pending
        self._live = self.routing.live
        self._live_tags = self.routing.live_tags
        self._unrouted = self.routing.unrouted
        self._closed = False
        self._broken: BaseException | None = None
        #: seconds a dead worker's record (and what it held) is kept; lowered by tests
        self.dead_worker_ttl = DEAD_WORKER_TTL
        # counters
        self.tasks_submitted = 0
        self.frames_dropped = 0
        self.worker_deaths = 0
        self.worker_restarts = 0
        self.workers_recycled = 0
        self.workers_joined = 0
        self.workers_lost = 0
        self.workers_left = 0
        self.peers_refused = 0
        self.channel_messages_dropped = 0
        self.channel_redelivered = 0
        #: the channel broker (set by the first ``rt.lease``): the pump hands it every frame
        #: from an identity with "~" (a channel end) and lets it send once per round
        self.channels: Broker | None = None
        #: outcome resolution, crash attribution, restart intensity and retry timers (no I/O)
        self.outcomes = Outcomes(self._jobs, config.max_attempts, config.restart_limit, config.restart_window,
                                 config.abort_grace)
        #: pump thread: ActorEvent / ActorState from a worker
        self.actor_listener: Callable[[bytes, ActorEvent | ActorState], None] | None = None
        #: supervisor thread, after redelivery: (worker id, exit code)
        self.exit_listeners: list[Callable[[str, int | None], None]] = []
        #: pump thread: a worker became ready
        self.ready_listeners: list[Callable[[str], None]] = []
        #: builds the inspect tree for clients such as ``phalanx top`` (set by the Runtime): a weak
        #: reference (the pump holds the driver; the runtime must stay collectable), called to get it
        self.inspect_provider: Callable[[], Callable[[float], Any] | None] | None = None
        #: tasks taken back unstarted from a busy worker for an idle one (phalanx.reclaim)
        self.reclaimer = Reclaimer(self)
        #: worker inspection, phalanx top's queries, the counters' snapshot (phalanx.inspection)
        self.inspection = Inspection(self)
        #: fault injection (phalanx.testing), None otherwise: ``frame_filter("in", ident, frame)``
        #: for each frame the pump receives, ``("out", ident, frame)`` for each frame sent to a
        #: worker's inbox; it returns the frames to handle or send instead ([]: drop, two: repeat).
        #: Unset it costs one ``is None`` test per frame. Held frames come back through ``inject``.
        self.frame_filter: FrameFilter | None = None
        self._injected: deque[tuple[bytes, bytes]] = deque()
        #: outcomes resolved this round, delivered at its end (the pump's; phalanx.direct adds under the lock)
        self._deliveries: list[tuple[Job, int, Ok | Err]] = []
        #: local workers' pipes: writing, holding back, flushing, reading (phalanx.pipes)
        self.pipes = LocalPipes(self)
        #: callers reading their own replies from those pipes (phalanx.direct)
        self.direct = DirectReader(self, self.pipes)
        with hold_sigint():  # no descriptor made and lost to a Ctrl-C before it is stored
            self._wake_r, self._wake_w = os.pipe()
        #: the handshake, remote joins, heartbeats, tcp security (phalanx.membership)
        self.membership = Membership(self)
        # ZeroMQ: made now by a runtime that listens, after its start by one that does not (make_sockets).
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._tasks = self._results = self._control = None  # type: zmq.Socket[bytes] | None
        self._sockets_lock = threading.Lock()  # held while they are made, and by shutdown to close them
        if self.address is not None:
            self.make_sockets()
        #: the pump thread's loop (phalanx.pump)
        self.pump = Pump(self)
        self._pump_thread = threading.Thread(target=self.pump.run, name="phalanx-pump", daemon=True)

    def make_sockets(self) -> None:
        """Make the ZeroMQ context and bind the three sockets, unless made or shut down (any thread,
        never under the driver's lock): in the constructor of a runtime that listens, otherwise
        ``pump.SOCKETS_AFTER`` after the first workers are ready (by the pump) or for a lease or
        ``rt.endpoints`` if sooner, not on the way to the first result (~1 ms of CPU). ZeroMQ
        connects asynchronously: a peer connecting before the bind (``phalanx top``) gets through after."""
        # Ctrl-C held (on the main thread) until they are stored: none is made and lost to it.
        with self._sockets_lock, hold_sigint():
            if self._results is not None or self._closed:
                return
            ctx: zmq.Context[zmq.Socket[bytes]] | None = None
            made: list[zmq.Socket[bytes]] = []
            try:
                ctx = zmq.Context()
                note_bound(ctx, self.endpoints, self.address)  # before its sockets: no fork server copies them
                curve = self.membership.secure_tcp(ctx)
                monitors = sockets.driver_sockets(ctx, self.endpoints, self.address, curve, self.limits, made)
            except BaseException:  # nothing half-made is left
                sockets.close(*made)
                self.membership.close_security()
                if ctx is not None:
                    ctx.destroy(linger=0)
                raise
            self.membership.monitors.update(monitors)
            with self._lock:  # published whole: senders under the lock see none or all three
                self._ctx = ctx
                self._tasks, self._results, self._control = made
        self.wake()  # the pump polls the results socket from the next round

    def _unbuild(self) -> None:
        """Undo what :meth:`_build` made before it failed (or was interrupted), and the fork server."""
        made = self.__dict__
        if "membership" in made:
            self.membership.close_security()
        ctx = made.get("_ctx")
        if ctx is not None:
            ctx.destroy(linger=0)
        self._supervisor.stop(0.0)
        for fd in (made.get("_wake_r"), made.get("_wake_w")):
            if fd is not None:
                os.close(fd)
        if "endpoints" in made:
            self.endpoints.remove()
        self.lifecycle.close_unpiped()

    # ---- workers -------------------------------------------------------------

    def wait_idle(self, timeout: float | None, frozen_after: float | None = None) -> bool:
        """Wait until no task is pending or in flight (see :meth:`Lifecycle.wait_idle`)."""
        return self.lifecycle.wait_idle(timeout, frozen_after)

    def start_workers(self, n: int | dict[str, int], timeout: float) -> None:
        """Spawn ``n`` workers (or so many per tag), start the pump, wait until each is ready.

        The configuration's workers (``config.worker_groups()``) were asked for when the
        driver was made: given the same ``n``, this takes them instead of spawning more.
        """
        groups = {DEFAULT_TAG: n} if isinstance(n, int) else n
        first, self._first = self._first, None
        if first is not None and first[0] != groups:
            first[1]()  # those asked for at first join the runtime too
            first = None
        self.lifecycle.start_workers(groups, timeout, first[1] if first is not None else None)

    def kill_worker(self, worker_id: str) -> None:
        """SIGKILL one worker (tests and fault injection); it is replaced."""
        self._supervisor.kill(worker_id)

    def worker_pids(self) -> dict[str, int]:
        """Live worker ids and pids."""
        with self._lock:
            return {w.id: w.pid for w in self._workers.values() if w.alive and w.pid}

    def worker_tags(self) -> dict[str, tuple[str, ...]]:
        """Live worker ids and the tags each serves."""
        with self._lock:
            return {w.id: w.tags for w in self._workers.values() if w.alive and w.pid}

    # ---- routing ---------------------------------------------------------------

    def _add_live_locked(self, w: _Worker) -> None:
        """``w`` takes new work: its tags' waiting tasks have a route again."""
        self.routing.add_live(w)

    def _remove_live_locked(self, w: _Worker) -> None:
        """``w`` takes no new work: tags it was the last live worker of start their route wait."""
        self.routing.remove_live(w, time.monotonic())

    def _enqueue_locked(self, tag: str, tasks: list[Task], front: bool = False) -> None:
        """Queue ``tasks`` for workers of ``tag`` (at the ``front``: redeliveries, retries)."""
        if not self.routing.enqueue(tag, tasks, front):
            self.routing.unroutable(tag, tasks, time.monotonic())

    def no_worker_error(self, tag: str, waited: float) -> NoWorkerError:
        """The error for work on ``tag`` that found no live worker within ``waited`` seconds."""
        with self._lock:
            return self.routing.no_worker_error(tag, waited)

    def wait_route(self, tag: str, timeout: float) -> bool:
        """Wait until a live worker holds ``tag``; False on timeout or when the runtime ends."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while tag not in self._live_tags:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed or self._broken is not None:
                    return False
                self._changed.wait(min(remaining, 0.1))
            return True

    def _expire_routes(self, now: float) -> None:
        """Fail pending tasks that waited ``route_timeout`` for a worker of their tag (pump)."""
        with self._lock:
            failed = self.routing.expire(now, self.config.route_timeout)
            if failed:
                self.outcomes.tasks_failed += len(failed)
                self._changed.notify_all()
        self._deliver(failed)

    # ---- jobs ----------------------------------------------------------------

    def check_open(self) -> None:
        if self._broken is not None:
            raise RuntimeBrokenError(str(self._broken)) from self._broken
        if self._closed:
            raise RuntimeClosedError("the runtime is shut down")

    def open_job(
        self,
        op: str,
        deliver: Callable[[int, Delivery], None],
        fail: Callable[[BaseException], None],
        on_dispatch: Callable[[], bool] | None = None,
        autoclose: bool = False,
        options: TaskOptions | None = None,
    ) -> Job:
        """Lease a new result channel."""
        self.check_open()
        job = self.new_job(op, deliver, fail, on_dispatch, autoclose, options)
        with self._lock:
            self._jobs[job.id] = job
        return job

    def new_job(
        self,
        op: str,
        deliver: Callable[[int, Delivery], None],
        fail: Callable[[BaseException], None],
        on_dispatch: Callable[[], bool] | None = None,
        autoclose: bool = False,
        options: TaskOptions | None = None,
    ) -> Job:
        """A job not yet registered: :meth:`submit` with ``register=True`` does it."""
        return Job(self.new_job_id(), op, deliver, fail, on_dispatch, autoclose, options)

    def new_job_id(self) -> int:
        """The id for a new job (a :class:`Job` subclass builds itself around it)."""
        self.check_open()
        return next(self._job_ids)

    def submit(self, job: Job, tasks: list[Task], register: bool = False) -> None:
        """Queue tasks of ``job`` (registering it first) and dispatch what credits allow."""
        limit = self.limits.max_frame
        for task in tasks:
            if len(task.frame) > limit:
                self.check_frame(task.frame, f"the arguments of {getattr(task.msg, 'op', '?')}", task.items)
        with self._lock:
            if self._broken is not None or self._closed:
                self._jobs.pop(job.id, None)
                raise RuntimeBrokenError(str(self._broken)) if self._broken else RuntimeClosedError(
                    "the runtime is shut down"
                )
            if register:
                self._jobs[job.id] = job
            outstanding = job.outstanding
            for task in tasks:
                outstanding[task.seq] = task
            routing = self.routing
            if not routing.enqueue(job.tag, tasks):
                routing.unroutable(job.tag, tasks, time.monotonic())
            self.tasks_submitted += len(tasks)
            self._dispatch_locked()
            queued = register and bool(self._pending)
        if queued:  # submitted faster than the workers run tasks: read their outcomes here
            self.pipes.help()

    def check_frame(self, frame: bytes, what: str, items: int = 1) -> None:
        """Raise :class:`FrameTooLargeError` if ``frame`` is above ``max_frame`` (a worker would refuse it)."""
        limit = self.limits.max_frame
        if len(frame) > limit:
            hint = f" ({items} items at once: a smaller chunksize sends fewer)" if items > 1 else ""
            raise FrameTooLargeError(
                f"{what} are {len(frame)} bytes encoded, larger than max_frame={limit}{hint}", len(frame), limit)

    def close_job(self, job: Job, terminate: bool = False) -> None:
        """Release ``job``'s channel; later outcomes for it are dropped.

        With ``terminate``, workers drop its queued tasks (PUB broadcast).
        """
        with self._lock:
            self._jobs.pop(job.id, None)
            had_work = bool(job.outstanding) or job.dropped
            job.outstanding.clear()
            if terminate and had_work:
                self.publish_locked(encode(Terminate(job.id)))

    # ---- directed messages (actors) ---------------------------------------------

    def wait_workers(self, n: int, timeout: float | None) -> int:
        """Wait until at least ``n`` workers are ready; return how many are."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while len(self._live) < n and not self._closed and self._broken is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._changed.wait(0.1 if remaining is None else min(remaining, 0.1))
            return len(self._live)

    def worker_count(self, tag: str = DEFAULT_TAG) -> int:
        """Workers of ``tag`` to size map/fold windows and chunks for: the live ones (remote too), at least 1."""
        return max(1, self._live_tags.get(tag, 0) or self.config.worker_groups().get(tag, 0))

    def live_workers(self, tag: str | None = None) -> dict[bytes, int]:
        """Ready workers that take new work (of ``tag``, if given), with the number of tasks each holds."""
        with self._lock:
            return {w.ident: len(w.inflight) for w in self._live if tag is None or tag in w.tags}

    def is_live(self, ident: bytes) -> bool:
        w = self._workers.get(ident)
        return w is not None and w.alive and w.ready

    def send_to(self, ident: bytes, frame: bytes) -> bool:
        """Send one message to one worker's inbox; False if it is gone."""
        return self._send_if_alive(ident, frame, self._send_task_locked)

    def send_unfiltered(self, ident: bytes, frame: bytes) -> bool:
        """:meth:`send_to` past ``frame_filter`` (fault injection: a held frame released)."""
        return self._send_if_alive(ident, frame, self._send_unfiltered_locked)

    def _send_unfiltered_locked(self, ident: bytes, frame: bytes) -> None:
        self._send_raw_locked(ident, frame, filtered=True)

    def _send_if_alive(self, ident: bytes, frame: bytes, send: Callable[[bytes, bytes], None]) -> bool:
        with self._lock:
            w = self._workers.get(ident)
            if w is None or not w.alive or self._closed or (self._tasks is not None and self._tasks.closed):
                return False
            try:
                send(ident, frame)
            except zmq.ZMQError:
                return False
            return True

    def _send_raw_locked(self, ident: bytes, frame: bytes, filtered: bool = False) -> None:
        """Send ``frame`` to worker ``ident``'s inbox (lock held); raises zmq.ZMQError.

        Through ``frame_filter`` unless ``filtered``: fault injection sits on the link,
        below batching, so a runtime with faults sends the way one without does.
        """
        w = self._workers.get(ident)
        if w is not None and w.pipe is not None:
            try:
                self.pipes.send_locked(w, w.pipe, (frame,), filtered=filtered)
            except PipeError:
                raise zmq.ZMQError(errno.EPIPE, f"worker {w.id} is gone") from None
            return
        tasks = self._tasks
        if w is None or not w.inbox or tasks is None:
            raise zmq.ZMQError(errno.EHOSTUNREACH, f"no inbox known for {ident!r}")
        frames = (frame,) if self.frame_filter is None or filtered else self.frame_filter("out", ident, frame)
        for out in frames:
            tasks.send(w.inbox, zmq.SNDMORE | zmq.NOBLOCK)
            # A large frame (an array) is handed to ZeroMQ without a copy; bytes are immutable.
            tasks.send(out, zmq.NOBLOCK, copy=len(out) < sockets.ZERO_COPY_MIN)

    def _send_task_locked(self, ident: bytes, frame: bytes) -> None:
        """Send work to ``ident`` (lock held; through ``frame_filter`` when one is set)."""
        self._send_raw_locked(ident, frame)

    def inject(self, ident: bytes, frame: bytes) -> None:
        """Have the pump handle ``frame`` as if ``ident`` had just sent it, past ``frame_filter``."""
        self._injected.append((ident, frame))
        try:
            os.write(self._wake_w, b"i")
        except OSError:
            pass  # shut down

    def submit_directed(self, job: Job, msg: ActorCall, frame: bytes, ident: bytes) -> bool:
        """Send a call to one worker outside the credit scheme; False if it is gone."""
        task = Task(msg, frame)
        with self._lock:
            w = self._workers.get(ident)
            if w is None or not w.alive or self._closed or self._broken is not None:
                return False
            try:
                if w.pipe is not None:
                    self.pipes.send_locked(w, w.pipe, (frame,), hold=bool(w.inflight))
                    if len(w.held) >= DIRECTED_HELD_MAX:
                        # A burst of calls: the worker gets them now, in one write (it may have
                        # answered the earlier ones long ago, unread while this thread runs).
                        self.pipes.release_locked(w)
                else:
                    self._send_task_locked(ident, frame)
            except (zmq.ZMQError, PipeError):
                return False
            seq = msg.seq
            job.outstanding[seq] = task
            if not w.inflight:
                w.head_since = time.monotonic()
            w.inflight[(msg.job, seq)] = task
            self.tasks_submitted += 1
            return True

    def drop_after(self, job: Job, seq: int) -> None:
        """Forget ``job``'s tasks numbered above ``seq`` (their outcomes are dropped)."""
        with self._lock:
            for later in [s for s in job.outstanding if s > seq]:
                del job.outstanding[later]
                job.dropped = True

    def _dispatch_locked(self) -> None:
        """Send what the core's routing gives each worker: one pipe write per local worker."""
        if not self._pending:
            return
        routing = self.routing
        batch = routing.dispatch()
        if batch:
            self._send_batch_locked(batch)
        if routing.retire:
            for w in routing.take_retire():
                self.lifecycle.retire_locked(w)

    def _send_batch_locked(self, batch: dict[_Worker, list[Task]]) -> None:
        now = 0.0
        for w, tasks in batch.items():
            if len(w.inflight) == len(tasks):  # it held nothing before: its first task starts now
                w.head_since = now = now or time.monotonic()
            sent = 0
            try:
                if w.pipe is not None:
                    # Held if the worker already had tasks before these (they were added to inflight).
                    self.pipes.send_locked(w, w.pipe, [t.frame for t in tasks],
                                            hold=len(w.inflight) > len(tasks))
                    continue
                for task in tasks:
                    self._send_task_locked(w.ident, task.frame)
                    sent += 1
            except (PipeError, zmq.ZMQError):
                # Unroutable (EHOSTUNREACH), full, or its pipe closed: the worker is going
                # away. Take back what was not sent, in order; it gets nothing more.
                unsent = tasks[sent:]
                for t in unsent:
                    w.inflight.pop((t.job, t.seq), None)
                w.dispatched -= len(unsent)
                w.free = 0
                self.routing.requeue(unsent, time.monotonic())
                self._remove_live_locked(w)

    # ---- the pump --------------------------------------------------------------

    def _fire_timers(self) -> None:
        now = time.monotonic()
        with self._lock:
            for task in self.outcomes.due(now):
                self._enqueue_locked(self._jobs[task.job].tag, [task])
            self._dispatch_locked()

    def send_from_pump(self, ident: bytes, frame: bytes) -> bool:
        """Send ``frame`` to ``ident`` on the results ROUTER (pump thread only); False if unreachable."""
        results = self._results
        if results is None:
            return False
        try:
            results.send(ident, zmq.SNDMORE | zmq.NOBLOCK)
            results.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def publish_locked(self, frame: bytes, to: _Worker | None = None) -> None:
        """Send a control frame (Terminate, Shutdown, Reclaim, InspectRequest, Heartbeat) to
        every worker, or only ``to``: remote workers on the control PUB, each local worker on
        its control pipe. Never blocks: a frame a full pipe cannot take is dropped, as the PUB
        drops at its high-water mark (under the lock)."""
        pub = self._control  # None until made: no remote worker can have subscribed
        if (to is None or to.control is None) and pub is not None and not pub.closed:
            try:
                pub.send(frame, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for w in (self._workers.values() if to is None else (to,)):
            control = w.control
            if control is not None and w.alive:
                try:
                    control.send(frame)
                except OSError:
                    pass  # full (a frozen worker) or gone (its exit is being handled)

    def wake(self) -> None:
        """Make the pump run a round now (another thread queued something for it to send)."""
        try:
            os.write(self._wake_w, b"c")
        except OSError:
            pass  # shut down

    def _handle(self, parts: list[bytes], filtered: bool = False, origin: bytes | None = None,
                local: bool = False) -> None:
        """Handle a message from the results ROUTER; ``origin``: see :meth:`Membership.origin`;
        ``local``: from a local worker's pipe (where local_pickle applies)."""
        if self.frame_filter is not None and not filtered and len(parts) == 2:
            for frame in self.frame_filter("in", parts[0], parts[1]):
                self._handle([parts[0], frame], True, origin, local)
            return
        if len(parts) != 2:
            self.frames_dropped += 1
            return
        ident, frame = parts
        try:
            msg = decode_driver(frame, local and self.config.local_pickle)
        except ProtocolError as exc:
            salvaged = salvage_results(frame) if isinstance(exc.__cause__, UnpickleFailed) else None
            if salvaged is not None:  # a result that failed to unpickle: that task's error
                self._on_results(ident, salvaged)
                return
            if self.channels is not None and b"~" in ident:
                self.channels.handle(ident, frame)  # a channel end (phalanx.channels)
                return
            self.frames_dropped += 1
            return
        if not local:
            msg = distrust_exits(msg)  # a host cannot make a caller's result() exit
        side = ident.endswith(b"!")
        if side or (local and isinstance(msg, (Alive, Reclaimed, InspectReply))):
            # A worker's control thread (a local one's writes on its pipe): timed-out tasks,
            # inspect replies, heartbeats.
            base = ident[:-1] if side else ident
            if isinstance(msg, Alive):
                self.membership.on_alive(base, msg)
            elif isinstance(msg, Results):
                self._on_results(base, msg)
            elif isinstance(msg, Reclaimed):
                self.reclaimer.on_reclaimed(base, msg)
            elif isinstance(msg, InspectReply):
                self.inspection.on_reply(base, msg)
            else:
                self.frames_dropped += 1
            return
        if isinstance(msg, InspectQuery):
            self.inspection.on_query(ident, msg, origin)
            return
        if isinstance(msg, (ActorEvent, ActorState)):
            if self._deliveries:
                self._deliver_ready()  # outcomes the worker sent before this event come first
            w = self._workers.get(ident)
            if w is None or msg.worker != w.id or self.actor_listener is None:
                self.frames_dropped += 1
                return
            self.actor_listener(ident, msg)
            return
        if isinstance(msg, Results):
            self._on_results(ident, msg)
        elif isinstance(msg, Retire):
            with self._lock:
                w = self._workers.get(ident)
                if w is None or msg.worker != w.id:
                    self.frames_dropped += 1
                    return
                self.lifecycle.retire_locked(w)
        elif isinstance(msg, Goodbye):
            self.membership.on_goodbye(ident, msg)
        elif isinstance(msg, Hello):
            self.membership.on_hello(ident, msg, origin)
        elif isinstance(msg, Ready):
            self.membership.on_ready(ident, msg)
        else:  # e.g. Alive or InspectReply not from a worker's side channel
            self.frames_dropped += 1

    def _on_results(self, ident: bytes, msg: Results, direct: list[tuple[Job, int, Ok | Err]] | None = None) -> None:
        """Resolve a worker's outcomes; deliveries go to the pump's round, or to ``direct`` (see phalanx.direct)."""
        deliveries: list[tuple[Job, int, Ok | Err]] = []
        with self._lock:
            w = self._workers.get(ident)
            if w is None or msg.worker != w.id:
                self.frames_dropped += 1
                return
            if w.remote:
                w.seen = time.monotonic()
            if msg.dropped > w.frames_dropped:
                w.frames_dropped = msg.dropped
            head = next(iter(w.inflight), None)
            w.busy += msg.busy
            outcomes = self.outcomes
            # Dedupe, late results, credits back, resolution: the core's (phalanx.core.outcomes).
            strays = outcomes.take(w, msg.outcomes, deliveries)
            if strays:
                self.frames_dropped += strays  # outcomes for tasks this worker does not hold
            if outcomes.requeue:
                self._requeue_locked()
            if outcomes.later:
                outcomes.arm(time.monotonic())
            inflight = w.inflight
            if inflight and next(iter(inflight)) != head:
                w.head_since = time.monotonic()  # it runs the next task it holds now
            if w.retiring and not w.inflight and w.alive:
                self.lifecycle.stop_locked(w)
            if self._pending:
                self._dispatch_locked()
            if w.held:  # the worker answered: what waited for it goes out now, with this round's dispatch
                self.pipes.release_locked(w)
            if not self._pending and self._changed._waiters:  # type: ignore[attr-defined]
                # (notify_all is three Python-level calls even when nobody waits: once per reply)
                self._changed.notify_all()
            # Delivered at the end of the pump's round, just before it blocks: a woken
            # caller then finds the interpreter free instead of waiting for the round.
            if direct is None:
                self._deliveries.extend(deliveries)
            else:
                for entry in deliveries:
                    (direct if entry[0].direct else self._deliveries).append(entry)
                if self._deliveries:
                    self.wake()

    def _requeue_locked(self) -> None:
        """Tasks the core sends again at once (retries, the rest of a chunk after a skip)."""
        for task in self.outcomes.take_requeue():
            self._enqueue_locked(self._jobs[task.job].tag, [task], front=True)

    def _deliver_ready(self) -> None:
        """Hand the outcomes resolved this round to their jobs (pump thread, no lock held)."""
        with self._lock:  # a caller reading directly may add some
            ready, self._deliveries = self._deliveries, []
        self._deliver(ready)

    # ---- a caller reading its own reply ------------------------------------------------

    def _deliver(self, ready: Sequence[tuple[Job, int, Delivery]]) -> None:
        """Hand outcomes to their jobs, in order: every delivery of the driver goes through here.

        Every ``deliver`` is the runtime's own (futures, lease queues, actor
        replies): one that raises is a bug, which breaks the runtime (see
        ``internal_error``) once the other outcomes are delivered.
        """
        i, end = 0, len(ready)
        failed: list[tuple[Job, Exception]] | None = None
        interrupt: BaseException | None = None
        while i < end:
            job, seq, final = ready[i]
            many = job.deliver_many
            try:
                if many is None:
                    i += 1
                    job.deliver(seq, final)
                    continue
                # A run of one job's outcomes (an actor's replies) goes in one call.
                j = i + 1
                while j < end and ready[j][0] is job:
                    j += 1
                batch: list[tuple[int, Delivery]] = [(entry[1], entry[2]) for entry in ready[i:j]]
                i = j
                many(batch)
            except Exception as exc:
                if failed is None:
                    failed = []
                failed.append((job, exc))
            except BaseException as exc:
                # A done-callback run here raised KeyboardInterrupt (a signal handler, on a caller
                # delivering what it read): the others are delivered first, or they were lost.
                if interrupt is None:
                    interrupt = exc
        if failed:
            broken = self.internal_error(failed[0][1], "delivering an outcome")
            for job, _ in failed:
                try:
                    job.fail(broken)
                except Exception:
                    pass  # its caller already has the runtime's error through every other path
        if interrupt is not None:
            raise interrupt

    # ---- ending ----------------------------------------------------------------

    def internal_error(self, exc: BaseException, where: str) -> RuntimeBrokenError:
        """An exception escaped the runtime's own code: a bug, never bad input (not counted as such).

        The runtime breaks loudly: it is logged, and every pending caller gets
        :class:`RuntimeBrokenError` with the internal traceback as its cause.
        """
        log.error("internal error while %s: the runtime is broken", where, exc_info=exc)
        broken = RuntimeBrokenError(f"internal error while {where}: {type(exc).__name__}: {exc}")
        broken.__cause__ = exc
        self.break_runtime(broken)
        return broken

    def break_runtime(self, exc: BaseException) -> None:
        """Fail every open job with ``exc``; the runtime accepts no more work."""
        with self._lock:
            if self._broken is not None:
                return
            self._broken = exc
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self._pending.clear()
            self._unrouted.clear()
            self._changed.notify_all()
        for job in jobs:
            try:
                job.fail(exc)
            except BaseException:  # a callback: the other jobs are still told
                log.exception("failing a job of a broken runtime")

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work, optionally wait for it, stop workers, free everything."""
        with self._lock:
            if self._closed:
                return
        first, self._first = self._first, None
        if first is not None:  # workers asked for, never started (start_workers was not called)
            try:
                first[1]()
            except Exception:
                pass  # the supervisor ends whatever was started
        if not self.lifecycle.supervising:
            # A start that failed or was interrupted before the supervisor started: it reports
            # exits from now on, or stopping would wait shutdown_timeout for each worker in vain.
            self.lifecycle.supervising = True
            self._supervisor.start()
        self._supervisor.watch()  # exits are read from now on, if the start left that for later
        if wait and self._broken is None:
            # Waits for the work, but not for workers frozen (SIGSTOP) shutdown_timeout or more.
            self.wait_idle(timeout, self.config.shutdown_timeout)
        with self._lock:
            self._closed = True
            frozen = [w for w in self._workers.values() if w.alive and w.stopped_since]
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self._pending.clear()
            self._unrouted.clear()
            for w in self._workers.values():
                if w.alive:
                    self.lifecycle.stop_locked(w)
            self.publish_locked(encode(Shutdown()))
            self._changed.notify_all()
        closed = RuntimeClosedError("the runtime was shut down before this job finished")
        for job in jobs:
            job.fail(closed)
        for w in frozen:  # it cannot obey Stop: not worth waiting shutdown_timeout again
            self._supervisor.kill(w.id)
        # Workers of a start that failed or was interrupted are not waited for: they hold no work.
        self._supervisor.stop(self.config.shutdown_timeout if self.lifecycle.started else 0.0)
        with self._lock:
            for w in self._workers.values():
                w.alive = False
                w.close_control()
            self._live.clear()
            self._live_tags.clear()
        os.write(self._wake_w, b"x")
        if self._pump_thread.is_alive():
            self._pump_thread.join(5.0)
        elif self._pump_thread.ident is None:  # a start that failed before the pump ran: its ends are ours
            self.pipes.end_all()
        self.lifecycle.close_unpiped()
        with self._sockets_lock:  # sockets being made (a lease on another thread) are closed too
            with self._lock:
                sockets.close(self._tasks, self._results, self._control)
            self.membership.close_security()
            if self._ctx is not None:
                self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.endpoints.remove()
        remove_stale_dirs()
        if self.channels is not None:
            self.channels.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    def stats(self) -> RuntimeStats:
        """A snapshot of the counters."""
        return self.inspection.stats()

    def inspect(
        self, timeout: float,
    ) -> tuple[dict[str, InspectReply], list[tuple[str, int, int, str, tuple[str, ...]]]]:
        """Ask every worker for its state (see :meth:`Inspection.inspect`)."""
        return self.inspection.inspect(timeout)
