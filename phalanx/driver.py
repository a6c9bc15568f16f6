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
         see wait_direct)
        │  decode, dedupe, return credits, dispatch more   [lock]
        └─▶ deliver outcomes to jobs (futures, lease queues)   [no lock held]
    supervisor thread ──on_exit──▶ [lock] redeliver the dead worker's tasks

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
   A task held back for a busy local worker (see ``_pipe_send_locked``) goes
   out when that worker's next outcome is read, or after ``HOLD_MAX``. A task
   with a timeout that runs ``timeout + abort_grace`` without an outcome (it
   holds the GIL, its process is frozen) has its worker killed by the driver
   (``_expire_overdue``). Shutdown waits for work, not for frozen workers.
   Short work is not stranded behind a long task while a worker idles: the
   tasks queued behind it are taken back, unstarted (``_reclaim_locked``).
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
import re
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from typing import TYPE_CHECKING, Any

import msgspec
import psutil
import zmq

from .config import Config
from .policy import DEFAULT_TAG, FatalStrategy, RetryStrategy, TaskOptions, check_tag
from .errors import (
    ActorDiedError,
    FrameTooLargeError,
    NoWorkerError,
    ProtocolError,
    RuntimeBrokenError,
    RuntimeClosedError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerStartError,
)
from .supervisor import Supervisor
from .transport import sockets
from .transport.codec import UnpickleFailed, decode_driver, encode, error_info, salvage_results
from .transport.endpoints import Endpoints, local_endpoints, remove_stale_dirs, tcp_endpoints
from .transport.pipe import FramePipe, PipeError
from .transport.messages import PROTOCOL_VERSION, Alive, Reclaim, Reclaimed, is_inbox
from .transport.messages import (
    Call,
    Chunk,
    Err,
    Goodbye,
    Hello,
    Ok,
    Ready,
    Results,
    Retire,
    Shutdown,
    Stop,
    Sync,
    Terminate,
    Welcome,
)
from .transport.messages import (
    ActorCall,
    ActorEvent,
    ActorState,
    Heartbeat,
    InspectAnswer,
    InspectQuery,
    InspectReply,
    InspectRequest,
)
from .worker import ABORT_EXIT, WorkerSpec
from .core.outcomes import Outcomes
from .core.routing import Routing
from .core.tasks import SKIPPED, Delivery, Job, Task

if TYPE_CHECKING:
    from .broker import Broker
    from .transport.keys import RunKeys

__all__ = ["Driver", "Job", "Task", "WorkerStats", "RuntimeStats", "SKIPPED"]


#: ``(direction "in" | "out", worker identity, frame) -> frames`` (see ``Driver.frame_filter``)
FrameFilter = Callable[[str, bytes, bytes], list[bytes]]

#: seconds a dead worker's record is kept to validate its late results
DEAD_WORKER_TTL = 60.0

#: tasks-ROUTER identities whose holder the driver remembers (the oldest are forgotten)
MAX_HOLDERS = 65536

#: the names of the driver's own (local) workers: no tcp peer may use or claim them
_LOCAL_ID = re.compile(rb"w\d+\Z")

log = logging.getLogger("phalanx.driver")
auth_log = logging.getLogger("phalanx.auth")

#: seconds without a remote worker's Alive before it is declared lost (default)
REMOTE_HEARTBEAT_TIMEOUT = 10.0
#: seconds between the pump's sweeps of dead workers' records
REAP_PERIOD = 0.1
#: seconds a local worker's exit waits for the pump to read what it wrote before dying
PIPE_DRAIN_WAIT = 1.0
#: seconds the pump leaves local pipes to callers after the last one stopped waiting (wait_direct)
DIRECT_LINGER = 0.002
#: longest a lone caller in wait_direct polls without blocking (seconds): a blocked thread's
#: wake-up (an idle CPU's, on virtual machines above all) costs more than the whole reply
SPIN_WAIT = 200e-6
#: longest a task frame for a busy local worker waits to go out with the next ones (seconds);
#: normally the worker's next outcome releases it much sooner (see _pipe_send_locked)
HOLD_MAX = 0.002

#: seconds between the pump's looks for tasks queued behind a long one while a worker idles;
#: a worker's oldest task must stay the same across one look to the next to count as long
RECLAIM_PERIOD = 0.05

#: seconds past a task's ``timeout + abort_grace`` before the driver kills its worker: the
#: worker's own kill at that time comes first when it can (a planned exit either way)
EXPIRY_SLACK = 0.2

#: seconds between looks at whether the workers holding tasks are stopped, while shutdown waits
FROZEN_CHECK = 0.25
_STOPPED = (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)

#: most tags a remote worker may announce
MAX_TAGS = 64

#: states of a future after which nothing is left to wait for (phalanx.Future's too)
SETTLED = frozenset({FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED})
#: per thread: its wake-up for wait_direct
_THREAD = threading.local()


class _Wake:
    """A thread's eventfd: written when a future it waits on in wait_direct settles elsewhere."""

    __slots__ = ("fd",)

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def __del__(self) -> None:  # the thread ended
        os.close(self.fd)


class _DirectWaiter:
    """Installed in a future's waiters during wait_direct (the protocol of concurrent.futures.wait)."""

    __slots__ = ("fd", "armed", "fired", "nudged")
    #: phalanx.Future.cancel tells it (the standard library tells only its own waiters)
    wakes_on_cancel = True

    def __init__(self, fd: int) -> None:
        self.fd = fd
        #: off while the waiting thread delivers outcomes itself (it looks at the future next anyway)
        self.armed = True
        self.fired = False
        #: the pump changed the set of pipes since this thread took its snapshot (see Driver._nudge)
        self.nudged = False

    def nudge(self) -> None:
        self.nudged = True
        os.eventfd_write(self.fd, 1)

    def _fire(self, future: Any = None) -> None:
        if self.armed and not self.fired:
            self.fired = True
            os.eventfd_write(self.fd, 1)

    add_result = add_exception = add_cancelled = _fire


class WorkerStats(msgspec.Struct, frozen=True):
    """One worker as the driver sees it."""

    id: str
    pid: int
    alive: bool
    ready: bool
    inflight: int
    tasks: int
    items: int
    busy: float
    #: the host it runs on ("" for local workers)
    host: str = ""
    remote: bool = False
    #: the worker tags it serves
    tags: tuple[str, ...] = ()
    #: malformed frames the worker itself dropped (as of its last Results or inspect reply)
    frames_dropped: int = 0


class RuntimeStats(msgspec.Struct, frozen=True):
    """Counters of a runtime; see :meth:`phalanx.Runtime.stats`."""

    workers: list[WorkerStats]
    tasks_submitted: int
    tasks_completed: int
    tasks_failed: int
    items_completed: int
    retried: int
    skipped: int
    redelivered: int
    duplicates_dropped: int
    late_results_dropped: int
    frames_dropped: int
    worker_deaths: int
    worker_restarts: int
    workers_recycled: int
    jobs_open: int
    #: remote workers that joined over tcp, and those declared lost (no heartbeat)
    workers_joined: int = 0
    workers_lost: int = 0
    #: remote workers that left saying Goodbye (their host was told to stop)
    workers_left: int = 0
    #: tcp peers refused during the security handshake
    peers_refused: int = 0
    #: channel messages dropped: sent to a closed or released lease, or queued when it was released
    channel_messages_dropped: int = 0
    #: channel messages put back for redelivery (nacked, or held by a receiver closed or dead)
    channel_redelivered: int = 0
    #: tasks a busy worker gave back unstarted, for a worker that idled, and sent again
    reclaimed: int = 0


class _Worker:
    __slots__ = (
        "id", "ident", "pid", "hello", "welcomed", "ready", "alive", "free", "inflight",
        "tasks", "items", "busy", "died_at", "retiring", "dispatched",
        "remote", "host", "seen", "stop_sent", "tags", "frames_dropped", "pipe", "pipe_done",
        "reader", "leftover", "broken", "delivering", "deferred", "held", "held_at",
        "head_since", "expired", "stopped_since", "key", "oldest", "reclaiming", "inbox", "credits",
    )

    def __init__(self, worker_id: str, tags: tuple[str, ...] = (DEFAULT_TAG,)) -> None:
        self.id = worker_id
        #: work routed to one of these tags may go to it
        self.tags = tags
        self.ident = worker_id.encode()
        self.pid = 0
        self.hello = False
        self.welcomed = False
        self.ready = False
        self.alive = True
        self.free = 0
        #: the tasks it takes at once (its Ready's credits)
        self.credits = 0
        self.inflight: dict[tuple[int, int], Task] = {}
        self.tasks = 0
        self.items = 0
        self.busy = 0.0
        self.died_at = 0.0
        self.retiring = False
        self.dispatched = 0
        #: joined over tcp (not ours to spawn, watch or replace)
        self.remote = False
        self.host = ""
        #: a remote worker's CURVE key (z85; b"" on an insecure runtime): only frames
        #: under its identities (plain, "!", "~...") that this key sent are its own
        self.key: bytes | None = None
        #: a remote worker's secret routing identity on the tasks ROUTER, from its Hello (see
        #: messages.Hello): its tasks go there, never to ``ident``, which other hosts can know
        self.inbox = b""
        #: last time anything arrived from it (remote workers' liveness)
        self.seen = 0.0
        self.stop_sent = 0.0
        #: malformed frames the worker reports it dropped (a running total)
        self.frames_dropped = 0
        #: a local worker's socketpair (None: ZeroMQ, remote workers)
        self.pipe: FramePipe | None = None
        #: set by the pump once it read the pipe to its end (everything the worker wrote is handled)
        self.pipe_done = threading.Event()
        #: held while reading the pipe and handling what was read (the pump, or a caller in wait_direct)
        self.reader = threading.Lock()
        #: frames a caller read but left to the pump (anything but outcomes), handled before the next read
        self.leftover: list[bytes] = []
        #: a caller's read found a frame above max_frame (the pump then ends the pipe)
        self.broken = False
        #: callers delivering outcomes they read here: frames after them wait (see wait_direct)
        self.delivering = 0
        #: the pump passed this pipe by while callers delivered: the last of them calls it back
        self.deferred = False
        #: task frames for this (busy) local worker not yet written, and since when (monotonic)
        self.held: list[bytes] = []
        self.held_at = 0.0
        #: since when the first task in ``inflight`` (the one it runs: tasks run in order) is first
        self.head_since = 0.0
        #: (job, seq) of the task it was killed for, having overrun timeout + abort_grace
        self.expired: tuple[int, int] | None = None
        #: since when shutdown found its process stopped (SIGSTOP), 0.0: not stopped
        self.stopped_since = 0.0
        #: its oldest task in flight at the pump's last look, and whether a Reclaim awaits its answer
        self.oldest: tuple[int, int] | None = None
        self.reclaiming = False


class Driver:
    """Sockets, workers and jobs of one runtime (see the module docstring)."""

    def __init__(self, config: Config, run_keys: RunKeys | None = None) -> None:
        self.config = config
        #: the keys of a runtime that starts its own hosts (hosts=, slurm=True), held in memory
        self.run_keys = run_keys
        #: private ipc endpoints (local workers)
        self.endpoints: Endpoints = local_endpoints()
        #: tcp endpoints remote workers connect to, when listening
        self.address: Endpoints | None = tcp_endpoints(config.listen) if config.listen else None
        # Before ZeroMQ's I/O threads or any of ours exist: under start method "phalanx"
        # this forks the fork server, a copy of this process that forks the workers (the
        # first ones at once: they start up while this process sets up its sockets).
        try:
            self._supervisor = Supervisor(config.start_method, self._on_exit,
                                          standby=sum(config.worker_groups().values()))
        except BaseException:
            self.endpoints.remove()
            raise
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._jobs: dict[int, Job] = {}
        self._job_ids = itertools.count(1)
        self._workers: dict[bytes, _Worker] = {}
        #: pending tasks per tag, live workers per tag, credit dispatch (phalanx.core.routing)
        self.routing: Routing[_Worker] = Routing(self._jobs, config.max_tasks_per_worker)
        # The routing's own containers, under the names this module reads them by.
        self._pending = self.routing.pending
        self._live = self.routing.live
        self._live_tags = self.routing.live_tags
        self._unrouted = self.routing.unrouted
        self._worker_ids = itertools.count(1)
        self._start_failures: list[str] = []
        self._closed = False
        self._broken: BaseException | None = None
        self._sync_nonce = itertools.count()
        #: seconds a dead worker's record (and what it held) is kept; lowered by tests
        self.dead_worker_ttl = DEAD_WORKER_TTL
        # counters
        self.tasks_submitted = 0
        #: tasks taken back unstarted from a busy worker and dispatched again (see _reclaim_locked)
        self.reclaimed = 0
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
        #: tags of retired workers whose replacements the pump still has to start
        self._spawn_owed: deque[tuple[str, ...]] = deque()
        #: pump thread: ActorEvent / ActorState from a worker
        self.actor_listener: Callable[[bytes, ActorEvent | ActorState], None] | None = None
        #: supervisor thread, after redelivery: (worker id, exit code)
        self.exit_listeners: list[Callable[[str, int | None], None]] = []
        #: pump thread: a worker became ready
        self.ready_listeners: list[Callable[[str], None]] = []
        self._inspect_nonces = itertools.count(1)
        #: builds the inspect tree for clients such as ``phalanx top`` (set by the Runtime): a weak
        #: reference (the pump holds the driver; the runtime must stay collectable), called to get it
        self.inspect_provider: Callable[[], Callable[[float], Any] | None] | None = None
        self._outgoing: deque[tuple[bytes, bytes]] = deque()
        self._inspect_replies: dict[int, dict[str, InspectReply]] = {}
        #: fault injection (phalanx.testing), None otherwise: ``frame_filter("in", ident, frame)``
        #: for each frame the pump receives, ``("out", ident, frame)`` for each frame sent to a
        #: worker's inbox; it returns the frames to handle or send instead ([]: drop, two: repeat).
        #: Unset it costs one ``is None`` test per frame. Held frames come back through ``inject``.
        self.frame_filter: FrameFilter | None = None
        self._injected: deque[tuple[bytes, bytes]] = deque()
        #: outcomes resolved this round, delivered at its end (the pump's; wait_direct adds under the lock)
        self._deliveries: list[tuple[Job, int, Ok | Err]] = []
        #: local workers' pipes the pump does not poll yet (it registers them)
        self._new_pipes: deque[_Worker] = deque()
        #: pipes holding a backlog the pump must flush when they become writable
        self._backlogged: set[_Worker] = set()
        #: local workers with task frames held back (see _pipe_send_locked)
        self._holding: set[_Worker] = set()
        #: local workers whose pipes the pump polls (replaced, never changed: callers read it unlocked)
        self._piped: tuple[_Worker, ...] = ()
        #: threads in wait_direct now, and when the last one left (under _direct_mutex)
        self._direct_waiters = 0
        #: their waiters, told when the pipes change (under _direct_mutex)
        self._direct_set: set[_DirectWaiter] = set()
        self._direct_left = 0.0
        self._direct_mutex = threading.Lock()
        #: a moving average of how long a wait_direct took (seconds): spin only while short
        self._direct_typical = 0.0
        #: the pump reads pipes itself (False while callers read them: see wait_direct)
        self._pump_reads_pipes = True
        #: pipes a caller needs the pump to read even so (frames left to it, the end, a bad frame)
        self._pipe_attention: deque[_Worker] = deque()

        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._auth: Any = None
        self._monitors: dict[zmq.Socket[bytes], str] = {}
        #: inbox identities on the tasks ROUTER -> the key whose Hello arrived there under it
        self._holders: dict[bytes, bytes] = {}
        self.remote_timeout = config.heartbeat_timeout if config.heartbeat_timeout > 0 else REMOTE_HEARTBEAT_TIMEOUT
        #: the sockets' high-water mark and largest frame (the hwm and max_frame options)
        self.limits = sockets.Limits(config.hwm, config.max_frame)
        try:
            curve = self._secure_tcp()
            tcp = self.address
            limits = self.limits
            self._tasks = sockets.router(self._ctx, self.endpoints.tasks, send_only=True,
                                         tcp=tcp.tasks if tcp else None, curve=curve, limits=limits)
            self._results = sockets.router(self._ctx, self.endpoints.results,
                                           tcp=tcp.results if tcp else None, curve=curve, limits=limits)
            self._control = sockets.publisher(self._ctx, self.endpoints.control,
                                              tcp=tcp.control if tcp else None, curve=curve, limits=limits)
            if tcp is not None:
                for sock, ep in ((self._tasks, tcp.tasks), (self._results, tcp.results), (self._control, tcp.control)):
                    self._monitors[sockets.monitor(sock, sockets.HANDSHAKE_FAILURES)] = ep
        except BaseException:
            self._close_security()
            self._ctx.destroy(linger=0)
            self._supervisor.stop(0.0)
            self.endpoints.remove()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._pump_thread = threading.Thread(target=self._pump, name="phalanx-pump", daemon=True)

    def _close_security(self) -> None:
        """Close the handshake monitors and stop the authenticator (before the context ends)."""
        for mon in self._monitors:
            mon.close(linger=0)
        self._monitors.clear()
        auth, self._auth = self._auth, None
        if auth is not None:
            auth.stop()

    def _secure_tcp(self) -> sockets.Curve | None:
        """Start the authenticator and load the server key (None: ipc only, or insecure)."""
        config = self.config
        if self.address is None:
            return None
        if config.insecure:
            message = (f"phalanx: WARNING: listening on {config.listen} WITHOUT CURVE (insecure=True): "
                       "anyone who can reach it can run registered operations and read results")
            log.warning(message)
            print(message, file=sys.stderr, flush=True)
            return None
        from .transport import keys

        run = self.run_keys
        if run is not None and config.server_key is None:
            public, secret = run.server
        else:
            assert config.server_key is not None
            public, secret = keys.load_secret(config.server_key)
        assert config.authorized_keys is not None or run is not None
        self._auth = keys.Authenticator(self._ctx, config.authorized_keys, run)
        self._auth.start()
        return sockets.Curve(public, secret)

    # ---- workers -------------------------------------------------------------

    def start_workers(self, n: int | dict[str, int], timeout: float) -> None:
        """Spawn ``n`` workers (or so many per tag) and wait until each is connected and ready.

        The first workers are started before any phalanx thread exists, so
        that forking them is safe; the watcher and the pump start after.
        """
        groups = {DEFAULT_TAG: n} if isinstance(n, int) else n
        ids = self._spawn_many([(tag,) for tag, count in groups.items() for _ in range(count)])
        n = len(ids)
        self._supervisor.start()
        self._pump_thread.start()
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if self._start_failures:
                    raise WorkerStartError(
                        "worker failed to start: " + "; ".join(self._start_failures)
                        + " (does the main module start a Runtime outside "
                        "`if __name__ == \"__main__\":`?)"
                    )
                ready = sum(1 for i in ids if self._workers[i.encode()].ready)
                if ready == n:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerStartError(
                        f"only {ready} of {n} workers connected within {timeout:.1f} s"
                    )
                self._changed.wait(min(remaining, 0.1))

    def _spawn(self, tags: tuple[str, ...] = (DEFAULT_TAG,)) -> str:
        return self._spawn_many([tags])[0]

    def _spawn_many(self, groups: list[tuple[str, ...]]) -> list[str]:
        """Start one local worker per tags tuple (the fork server gets every request at once); their ids."""
        workers: list[_Worker] = []
        specs: list[WorkerSpec] = []
        for tags in groups:
            wid = f"w{next(self._worker_ids)}"
            worker = _Worker(wid, tags)
            with self._lock:
                self._workers[worker.ident] = worker
            spec = WorkerSpec(
                worker_id=wid,
                endpoints=self.endpoints,
                credits=self.config.credits,
                parent_pid=os.getpid(),
                abort_grace=self.config.abort_grace,
                max_memory=self.config.max_memory_per_worker,
                heartbeat_timeout=max(0.0, self.config.heartbeat_timeout),
                heartbeat_interval=self.config.heartbeat_interval,
                reconnect=self.config.reconnect,
                prefix_output=self.config.prefix_output,
                host=self.config.host_name or "",
                tags=tags,
                limits=self.limits,
                spin=self.config.spin,
                log_level=self.config.log_level,
                implicit_operations=self.config.implicit_operations,
                shm_threshold=self.config.shm_threshold,
                local_pickle=self.config.local_pickle,
            )
            workers.append(worker)
            specs.append(spec)
        started = self._supervisor.spawn_piped_many(specs)
        failed: OSError | None = None
        for worker, result in zip(workers, started):
            if isinstance(result, OSError):
                failed = failed or result
                continue
            worker.pid, end = result
            worker.pipe = FramePipe(end, self.limits.max_frame)
            self._new_pipes.append(worker)
        self.wake()
        if failed is not None:
            raise failed
        return [w.id for w in workers]

    def _on_exit(self, worker_id: str, exitcode: int | None, lost: bool = False, left: bool = False) -> None:
        """A worker process exited (supervisor thread): redeliver, replace, or break.

        ``lost``: a remote worker whose heartbeats stopped (pump, via a helper
        thread). Its tasks are redelivered without charging them a crash, it
        does not count towards the restart intensity, and it is not replaced
        here (its own host's ``phalanx worker`` does that). ``left``: the same
        for a remote worker that said Goodbye.
        """
        failed: list[tuple[Job, int, Delivery]] = []
        broken: BaseException | None = None
        pending_worker = self._workers.get(worker_id.encode())
        if pending_worker is not None and pending_worker.pipe is not None and self._pump_thread.is_alive():
            # Handle what it wrote before it died first, so a finished task is never
            # redelivered nor charged the crash (bounded: a process it forked may hold the pipe).
            pending_worker.pipe_done.wait(PIPE_DRAIN_WAIT)
        with self._lock:
            worker = self._workers.get(worker_id.encode())
            if worker is None or not worker.alive:
                return
            worker.alive = False
            worker.died_at = time.monotonic()
            self._remove_live_locked(worker)
            if self._closed:
                return
            # ABORT_EXIT: it ended itself, its task having ignored the abort flag for abort_grace;
            # expired: the driver killed it for that (a task holding the GIL, a frozen process).
            expired = worker.expired
            planned = worker.retiring or lost or left or exitcode == ABORT_EXIT or expired is not None
            if lost:
                self.workers_lost += 1
            elif left:
                self.workers_left += 1
            elif not planned:
                self.worker_deaths += 1
            if not worker.ready and not planned and self.worker_deaths == 1 and not self._live:
                self._start_failures.append(f"{worker_id} exited with code {exitcode}")
                self._changed.notify_all()
            # Redeliver everything it held; the core charges the crash (or splits the map
            # chunk it ran, until the crash is one item's) and counts the deaths.
            failed, requeue, broken = self.outcomes.worker_died(
                worker_id, worker.inflight.values(), exitcode, planned, worker.died_at, expired)
            if self.outcomes.requeue:
                self._requeue_locked()  # a failed map chunk's rest, under Ignore
            # Back to the front of its tag's queue, in the order the worker held them.
            tags = {task.job: self._jobs[task.job].tag for task in requeue}
            for tag in dict.fromkeys(tags.values()):
                self._enqueue_locked(tag, [t for t in requeue if tags[t.job] == tag], front=True)
            respawn = broken is None and not worker.retiring and not self._start_failures and not worker.remote
            self._dispatch_locked()
            self._changed.notify_all()
        self._deliver(failed)
        for listener in self.exit_listeners:
            try:
                listener(worker_id, exitcode)
            except Exception:
                pass
        if broken is not None:
            self.break_runtime(broken)
        elif respawn:
            with self._lock:
                self.worker_restarts += 1
            try:
                self._spawn(worker.tags)  # the replacement serves the same tags
            except RuntimeClosedError:
                pass  # shutdown() won the race: it stops everything spawn() started
            except Exception as exc:  # cannot start processes any more
                self.break_runtime(RuntimeBrokenError(f"cannot respawn a worker: {exc}"))

    def _retire_locked(self, w: _Worker) -> None:
        """Send ``w`` nothing more, start its replacement, Stop it once idle."""
        if w.retiring or not w.alive:
            return
        w.retiring = True
        w.free = 0
        self._remove_live_locked(w)
        self.workers_recycled += 1
        if not w.remote:
            self._spawn_owed.append(w.tags)  # a remote worker's own host starts its replacement
        if not w.inflight:
            self._stop_locked(w)
        os.write(self._wake_w, b"s")

    def _stop_locked(self, w: _Worker) -> None:
        w.stop_sent = time.monotonic()
        try:
            self._send_raw_locked(w.ident, encode(Stop()))
        except zmq.ZMQError:
            pass
        if w.remote and w.retiring and not w.inflight and w.alive:
            # Nobody watches a remote process: it is gone once told to stop idle.
            w.alive = False
            w.died_at = time.monotonic()

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
            if terminate and had_work and not self._control.closed:
                self._control.send(encode(Terminate(job.id)))

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
            if w is None or not w.alive or self._closed or self._tasks.closed:
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
                self._pipe_send_locked(w, w.pipe, (frame,), filtered=filtered)
            except PipeError:
                raise zmq.ZMQError(errno.EPIPE, f"worker {w.id} is gone") from None
            return
        if w is None or not w.inbox:
            raise zmq.ZMQError(errno.EHOSTUNREACH, f"no inbox known for {ident!r}")
        frames = (frame,) if self.frame_filter is None or filtered else self.frame_filter("out", ident, frame)
        for out in frames:
            self._tasks.send(w.inbox, zmq.SNDMORE | zmq.NOBLOCK)
            # A large frame (an array) is handed to ZeroMQ without a copy; bytes are immutable.
            self._tasks.send(out, zmq.NOBLOCK, copy=len(out) < sockets.ZERO_COPY_MIN)

    def _pipe_send_locked(self, w: _Worker, pipe: FramePipe, frames: tuple[bytes, ...] | list[bytes],
                          hold: bool = False, filtered: bool = False) -> None:
        """Write frames to a local worker's pipe; the pump flushes what the kernel did not take.

        ``hold``: these are tasks for a worker that still owes an outcome, so they wait in
        ``w.held`` and go out in one write with the next ones when that outcome is read
        (:meth:`_on_results`), or after :data:`HOLD_MAX` at the latest. A busy worker could
        not start them sooner; writing each at once costs a system call and a wake-up of
        the worker per task. A task for an idle worker is never held. Each frame
        passes ``frame_filter`` (fault injection) here, unless ``filtered``.
        """
        if self.frame_filter is not None and not filtered:
            frames = [out for frame in frames for out in self.frame_filter("out", w.ident, frame)]
        if hold:
            if not w.held:
                w.held_at = time.monotonic()
                self._holding.add(w)
            w.held.extend(frames)
            return
        if w.held:  # anything else goes out behind what is held, in order
            frames = [*w.held, *frames]
            w.held = []
            self._holding.discard(w)
        if pipe.send_many(frames) and w not in self._backlogged:
            self._backlogged.add(w)
            self.wake()

    def _release_locked(self, w: _Worker) -> None:
        """Write the task frames held for ``w`` (lock held); a closed pipe's are redelivered with its tasks."""
        assert w.pipe is not None  # only local workers' frames are held; their pipe stays set
        try:
            self._pipe_send_locked(w, w.pipe, ())
        except PipeError:
            # The worker is going away: no new work for it; its reader sees the pipe's end
            # and redelivers its in-flight tasks, these among them.
            self._remove_live_locked(w)

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
                    self._pipe_send_locked(w, w.pipe, (frame,), hold=bool(w.inflight))
                else:
                    self._send_task_locked(ident, frame)
            except (zmq.ZMQError, PipeError):
                return False
            job.outstanding[task.seq] = task
            if not w.inflight:
                w.head_since = time.monotonic()
            w.inflight[(task.job, task.seq)] = task
            self.tasks_submitted += 1
            return True

    def inspect(
        self, timeout: float,
    ) -> tuple[dict[str, InspectReply], list[tuple[str, int, int, str, tuple[str, ...]]]]:
        """Ask every worker for its state; (replies by worker, [(id, pid, in flight, host, tags)] of live workers)."""
        nonce = next(self._inspect_nonces)
        deadline = time.monotonic() + timeout
        with self._changed:
            replies: dict[str, InspectReply] = {}
            self._inspect_replies[nonce] = replies
            here = self.config.host_name or socket.gethostname()
            live = [(w.id, w.pid, len(w.inflight), w.host or here, w.tags)
                    for w in self._workers.values() if w.alive and w.ready]
            if not self._control.closed:
                self._control.send(encode(InspectRequest(nonce)), zmq.NOBLOCK)
            while len(replies) < len(live):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            del self._inspect_replies[nonce]
        return dict(replies), live

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
                self._retire_locked(w)

    def _send_batch_locked(self, batch: dict[_Worker, list[Task]]) -> None:
        now = 0.0
        for w, tasks in batch.items():
            if len(w.inflight) == len(tasks):  # it held nothing before: its first task starts now
                w.head_since = now = now or time.monotonic()
            sent = 0
            try:
                if w.pipe is not None:
                    # Held if the worker already had tasks before these (they were added to inflight).
                    self._pipe_send_locked(w, w.pipe, [t.frame for t in tasks], hold=len(w.inflight) > len(tasks))
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

    def _reclaim_locked(self) -> None:
        """Take back tasks a busy worker prefetched, unstarted, while a worker of their tag idles.

        A worker whose oldest task is the same as at the last look is asked
        (Reclaim, on the control PUB) for the tasks queued behind it, as many
        as idle workers have credits for. It gives back only tasks it will
        then never run (see the worker's ``_give_back``); its answer puts them
        back at the front of their queue (``_on_reclaimed``), so each still
        runs once. Pump thread, every ``RECLAIM_PERIOD``; off the hot path.
        """
        idle = [w for w in self._live if not w.inflight and w.free > 0]
        room: dict[str, int] = {}
        for w in self._live:
            if not idle or w.reclaiming or len(w.inflight) < 2:
                w.oldest = None
                continue
            oldest = next(iter(w.inflight))
            if w.oldest != oldest:
                w.oldest = oldest  # it may be quick: look again next period
                continue
            running = w.inflight[oldest]
            if running.directed:
                continue
            wanted: list[list[int]] = []
            for key, task in w.inflight.items():
                job = self._jobs.get(task.job)
                if key == oldest or task.directed or job is None:
                    continue
                free = room.get(job.tag)
                if free is None:
                    free = sum(i.free for i in idle if job.tag in i.tags)
                if free > 0:
                    wanted.append([task.job, task.seq, task.attempt])
                room[job.tag] = free - 1 if free > 0 else 0
            if wanted:
                try:
                    self._control.send(encode(Reclaim(w.id, [running.job, running.seq, running.attempt], wanted)),
                                       zmq.NOBLOCK)
                except zmq.ZMQError:
                    continue
                w.reclaiming = True

    def _on_reclaimed(self, ident: bytes, msg: Reclaimed) -> None:
        """A worker gave back tasks it will never run: queue them again, at the front (pump thread)."""
        with self._lock:
            w = self._workers.get(ident)
            if w is None or msg.worker != w.id or not w.reclaiming:
                self.frames_dropped += 1  # unasked: never ours to act on
                return
            w.reclaiming = False
            w.oldest = None
            back: dict[str, list[Task]] = {}
            for entry in msg.tasks:
                if len(entry) != 3:
                    self.frames_dropped += 1
                    continue
                job_id, seq, attempt = entry
                task = w.inflight.get((job_id, seq))
                if task is None or task.attempt != attempt:
                    continue  # already redelivered (its worker died)
                del w.inflight[(job_id, seq)]
                if w.alive and not w.retiring:
                    w.free += 1
                job = self._jobs.get(job_id)
                if job is not None and job.outstanding.get(seq) is task:
                    back.setdefault(job.tag, []).append(task)
                    self.reclaimed += 1
            for tag, tasks in back.items():
                self._enqueue_locked(tag, tasks, front=True)
            self._dispatch_locked()

    def wait_idle(self, timeout: float | None, frozen_after: float | None = None) -> bool:
        """Wait until no task is pending or in flight.

        ``frozen_after``: stop waiting (False) once every worker holding tasks
        has been stopped (SIGSTOP) that many seconds: they make no progress.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        looked = 0.0
        with self._changed:
            while self._pending or any(w.inflight for w in self._workers.values() if w.alive):
                if frozen_after is not None and time.monotonic() - looked >= FROZEN_CHECK:
                    looked = time.monotonic()
                    if self._frozen_locked(looked, frozen_after):
                        return False
                if any(tag not in self._live_tags for tag in self._pending):
                    # Cancelled work waits for no worker; the rest fails at its route timeout.
                    self.routing.prune()
                    if not self._pending and not any(w.inflight for w in self._workers.values() if w.alive):
                        break
                if self._broken is not None:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def _frozen_locked(self, now: float, after: float) -> bool:
        """Some local workers hold tasks, and every one that does was stopped ``after`` s ago or more."""
        holders = [w for w in self._workers.values() if w.alive and w.inflight]
        for w in holders:  # every one looked at: each one's clock starts now
            try:
                stopped = not w.remote and psutil.Process(w.pid).status() in _STOPPED
            except psutil.Error:
                stopped = False
            w.stopped_since = (w.stopped_since or now) if stopped else 0.0
        return bool(holders) and all(w.stopped_since and now - w.stopped_since >= after for w in holders)

    # ---- the pump --------------------------------------------------------------

    def _pump(self) -> None:
        poller = zmq.Poller()
        poller.register(self._results, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        for mon in self._monitors:
            poller.register(mon, zmq.POLLIN)
        #: local workers' pipes by file descriptor
        pipes: dict[int, _Worker] = {}
        try:
            self._pump_loop(poller, pipes)
        except BaseException as exc:  # never silently: every caller learns at once
            log.critical("the pump thread died", exc_info=True)
            broken = RuntimeBrokenError(f"the runtime's pump thread died: {exc!r}")
            broken.__cause__ = exc
            try:
                self.break_runtime(broken)
            except BaseException:
                log.exception("failing the jobs of a broken runtime")
        finally:
            try:
                self._deliver_ready()
            except BaseException:
                log.exception("delivering the last outcomes")
            for w in [*pipes.values(), *self._new_pipes]:
                with w.reader, self._lock:  # not while a caller reads it (wait_direct)
                    self._end_pipe_locked(w)

    def _pump_loop(self, poller: zmq.Poller, pipes: dict[int, _Worker]) -> None:
        results = self._results
        listening = self.address is not None
        last_sync = 0.0
        last_beat = 0.0
        beats = itertools.count()
        interval = self.config.heartbeat_interval
        last_reap = 0.0
        last_reclaim = 0.0
        timed = False
        while True:
            handshaking = self._handshaking()
            wait = 1.0 if handshaking else min(100.0, interval * 1000)
            if self.outcomes.timers:
                wait = min(wait, max(0.0, (self.outcomes.timers[0][0] - time.monotonic()) * 1000))
            if self._unrouted:
                with self._lock:  # user threads change it
                    due = min(self._unrouted.values(), default=0.0) + self.config.route_timeout
                wait = min(wait, max(0.0, (due - time.monotonic()) * 1000))
            while self._new_pipes:
                w = self._new_pipes.popleft()
                if w.pipe is not None:
                    pipes[w.pipe.fileno()] = w
                    poller.register(w.pipe.fileno(), self._pipe_events(w))
                    self._piped = tuple(pipes.values())
                    self._nudge()
            if self._direct_waiters or self._direct_left > time.monotonic() - DIRECT_LINGER:
                wait = min(wait, DIRECT_LINGER * 1000)
                reads = False
            else:
                reads = True
            if reads != self._pump_reads_pipes:
                self._pump_reads_pipes = reads
                for w in pipes.values():
                    poller.register(w.pipe.fileno(), self._pipe_events(w))  # type: ignore[union-attr]
            if self._holding:
                wait = min(wait, self._release_stale() * 1000)
            if timed:
                wait = min(wait, REAP_PERIOD * 1000)
            if self._backlogged:
                self._flush_pipes(poller)
            events = dict(poller.poll(int(wait) + (1 if wait else 0)))
            if self._wake_r in events:
                if b"x" in os.read(self._wake_r, 4096):
                    return
            if reads:
                for fd, w in list(pipes.items()):
                    if fd in events:
                        self._read_pipe(poller, pipes, fd, w)
            while self._pipe_attention:
                w = self._pipe_attention.popleft()
                if w.pipe is not None and pipes.get(w.pipe.fileno()) is w:
                    self._read_pipe(poller, pipes, w.pipe.fileno(), w)
            if results in events:
                for _ in range(4096):
                    origin = None
                    try:
                        if listening:
                            frames = results.recv_multipart(zmq.NOBLOCK, copy=False)
                            origin = self._origin(frames[-1])
                            parts = [f.bytes for f in frames]
                        else:
                            parts = results.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except zmq.ZMQError:
                        return
                    sender = self._workers.get(parts[0])
                    if sender is not None and sender.pipe is not None:
                        # A local worker speaks on its pipe only: this is someone else using its name.
                        self.frames_dropped += 1
                        continue
                    if origin is not None and not self._admit(parts[0], origin):
                        self.frames_dropped += 1
                        continue
                    try:
                        self._handle(parts, origin=origin)
                    except Exception as exc:  # bad input is counted where it is checked: this is a bug
                        self.internal_error(exc, "handling a frame")
            if self._monitors:
                for mon in self._monitors:
                    if mon in events:
                        self._on_monitor(mon)
            if listening:
                self._drain_tasks()
            if self.outcomes.timers:
                self._fire_timers()
            if self._unrouted:
                self._expire_routes(time.monotonic())
            if self._outgoing:
                self._send_outgoing()
            if self.channels is not None:
                self.channels.flush()
            while self._injected:
                ident, frame = self._injected.popleft()
                self._handle([ident, frame], True)
            while self._spawn_owed:
                with self._lock:
                    if self._closed or self._broken is not None:
                        break
                    tags = self._spawn_owed.popleft()
                try:
                    self._spawn(tags)
                except Exception as exc:
                    self.break_runtime(RuntimeBrokenError(f"cannot start a worker: {exc}"))
            now = time.monotonic()
            if now - last_beat >= interval:
                last_beat = now
                with self._lock:
                    if not self._control.closed:
                        self._control.send(encode(Heartbeat(next(beats))), zmq.NOBLOCK)
                if self.address is not None:
                    self._check_remote(now)
            if handshaking:
                if now - last_sync > 0.001:
                    last_sync = now
                    self._greet()
            if now - last_reap >= REAP_PERIOD:
                last_reap = now
                self._reap_dead()
                timed = self._expire_overdue(now)
            if now - last_reclaim >= RECLAIM_PERIOD:
                last_reclaim = now
                with self._lock:
                    self._reclaim_locked()
            if self._deliveries:
                self._deliver_ready()

    def _read_pipe(self, poller: zmq.Poller, pipes: dict[int, _Worker], fd: int, w: _Worker) -> None:
        """Handle what a local worker wrote; at its end, stop polling it (pump thread)."""
        with w.reader:
            assert w.pipe is not None
            if w.delivering:
                # A caller is delivering outcomes it read from this pipe: what follows them
                # waits (it asks for this pipe again when done); meanwhile do not poll it.
                poller.register(fd, zmq.POLLOUT if w in self._backlogged else 0)
                w.deferred = True
                return
            poller.register(fd, self._pipe_events(w))
            frames: list[bytes] | None
            frames, w.leftover = w.leftover, []
            self._handle_pipe_frames(w, frames, filtered=True)  # a caller's read passed them through
            try:
                if w.broken:
                    raise PipeError("a caller read a frame above max_frame")
                frames = w.pipe.recv()
            except PipeError:
                # A worker never sends one (it turns a result too large into an error): a bug or
                # an attack. Its stream cannot be trusted past it: kill it; its tasks are settled
                # by the crash rules, and it is replaced.
                log.warning("worker %s sent a frame above max_frame: killing it", w.id)
                self.frames_dropped += 1
                self._kill_soon(w)
                frames = None
            except OSError:
                frames = None
            if frames is None:
                poller.register(fd, 0)  # unregisters
                del pipes[fd]
                self._piped = tuple(pipes.values())
                self._nudge()  # before the close: a caller polling this fd looks again
                with self._lock:
                    self._end_pipe_locked(w)
                return
            self._handle_pipe_frames(w, frames)

    def _kill_soon(self, w: _Worker) -> None:
        """SIGKILL a local worker from a helper thread (killing its tree may wait for it)."""
        threading.Thread(target=self._supervisor.kill, args=(w.id,), daemon=True, name="phalanx-kill").start()

    def _expire_overdue(self, now: float) -> bool:
        """Kill workers whose running task overran ``timeout + abort_grace`` (pump thread).

        The worker enforces a task's timeout itself, but cannot when the task
        holds the GIL in C code or the process is frozen (SIGSTOP): then the
        driver does. A worker runs the tasks it holds in order, so only the
        first one runs; its clock starts when it became first (at the latest
        when it started). Its outcome is TaskTimeoutError (see ``_on_exit``);
        the other tasks the worker held are redelivered uncharged. True while
        a task with a timeout is in flight (the pump then looks often).
        """
        grace = self.config.abort_grace
        timed = False
        overdue: list[_Worker] = []
        with self._lock:
            for w in self._workers.values():
                if not w.alive or w.expired is not None or not w.inflight:
                    continue
                task = next(iter(w.inflight.values()))
                timeout = getattr(task.msg, "timeout", 0.0)
                if timeout <= 0:
                    continue
                timed = True
                if now - w.head_since < timeout * task.items + grace + EXPIRY_SLACK:
                    continue
                w.expired = (task.job, task.seq)
                w.free = 0
                self._remove_live_locked(w)
                if w.remote:
                    self._stop_locked(w)
                overdue.append(w)
        for w in overdue:
            log.warning("worker %s ran a task past its timeout and abort_grace: killing it", w.id)
            if w.remote:  # not ours to kill: it is told to stop, and lost for the driver
                threading.Thread(target=self._on_exit, args=(w.id, None, True), daemon=True,
                                 name="phalanx-lost").start()
            else:
                self._kill_soon(w)
        return timed

    def _handle_pipe_frames(self, w: _Worker, frames: list[bytes], filtered: bool = False) -> None:
        ident = w.ident
        for frame in frames:
            try:
                self._handle([ident, frame], filtered, local=True)
            except Exception as exc:  # bad input is counted where it is checked: this is a bug
                self.internal_error(exc, "handling a frame")

    def _end_pipe_locked(self, w: _Worker) -> None:
        """Close a local worker's pipe (its reader saw the end, or the runtime is shutting down)."""
        if w.pipe is not None:
            w.pipe.close()
        self._backlogged.discard(w)
        self._holding.discard(w)
        w.held = []
        w.pipe_done.set()

    def _release_stale(self) -> float:
        """Write frames held :data:`HOLD_MAX` or longer; seconds until the next are due (pump thread)."""
        now = time.monotonic()
        due = HOLD_MAX
        with self._lock:
            for w in list(self._holding):
                if now - w.held_at >= HOLD_MAX:
                    self._release_locked(w)
                else:
                    due = min(due, HOLD_MAX - (now - w.held_at))
        return due

    def _flush_pipes(self, poller: zmq.Poller) -> None:
        """Write pipes' backlogs; poll those still holding some for writability (pump thread)."""
        with self._lock:
            for w in list(self._backlogged):
                pipe = w.pipe
                try:
                    done = pipe is None or pipe.flush()
                except PipeError:
                    done = True  # the worker is gone: its reader sees the end
                if done:
                    self._backlogged.discard(w)
                if pipe is not None and not pipe.closed:
                    poller.register(pipe.fileno(), self._pipe_events(w))

    def _pipe_events(self, w: _Worker) -> int:
        """What the pump polls a pipe for: readable unless callers read it, writable while backlogged."""
        return (zmq.POLLIN if self._pump_reads_pipes else 0) | (zmq.POLLOUT if w in self._backlogged else 0)

    def _on_monitor(self, mon: zmq.Socket[bytes]) -> None:
        """Log peers refused during the handshake on a tcp endpoint (wrong, no or plaintext key)."""
        for code in sockets.handshake_failures(mon):
            self.peers_refused += 1
            if code == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                kind = "its CURVE key is not authorized"
            elif code == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                kind = "protocol error (a plaintext or mismatched peer?)"
            else:
                kind = "the security handshake failed (a peer without the right keys?)"
            auth_log.warning("refused a peer on %s: %s", self._monitors[mon], kind)

    def _origin(self, frame: zmq.Frame) -> bytes | None:
        """Who sent ``frame`` to a listening runtime: None over ipc (our own processes),
        else the CURVE key that ZAP accepted (z85), or b"" over insecure tcp."""
        try:
            return str(frame.get("User-Id")).encode()
        except zmq.ZMQError:  # no ZAP: ipc, or tcp without CURVE
            pass
        if self._auth is None and not str(frame.get("Peer-Address")).startswith("localhost:"):
            return b""  # tcp peers carry their address; ipc ones "localhost:uid:gid:pid"
        return None

    def _admit(self, ident: bytes, origin: bytes) -> bool:
        """Whether a tcp peer whose key is ``origin`` may speak as ``ident`` (pump thread).

        A worker's identities (``X``, its side channel ``X!``, its channel ends
        ``X~N``) belong to the key that said Hello as ``X``; local workers' belong
        to none. A stranger may use a plain identity outside the local workers'
        names (to join with Hello; on an insecure runtime also to inspect).
        """
        base = ident.partition(b"~")[0]
        if base.endswith(b"!"):
            base = base[:-1]
        w = self._workers.get(base)
        if w is None:
            return base == ident and _LOCAL_ID.match(ident) is None
        return w.remote and w.key == origin

    def _drain_tasks(self) -> None:
        """Read what peers wrote to the tasks ROUTER, so its tcp connections' input never
        stops (see transport/sockets.py). Pump thread.

        A remote worker writes one frame there, its Hello, when its inbox connects
        under the secret identity the Hello names (``inbox``): the key that sent it
        holds the identity tasks for that worker go to, and the worker is welcomed
        (given anything) only if that is the key it joined with. Everything else is
        dropped and counted.
        """
        with self._lock:
            tasks = self._tasks
            for _ in range(4096):
                if tasks.closed:
                    return
                try:
                    frames = tasks.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.ZMQError:
                    return
                origin = self._origin(frames[-1])
                if len(frames) == 2 and origin is not None:
                    ident = frames[0].bytes
                    try:
                        msg = decode_driver(frames[1].bytes)
                    except ProtocolError:
                        msg = None
                    if isinstance(msg, Hello) and msg.inbox.encode() == ident and is_inbox(ident):
                        if ident not in self._holders:
                            self._holders[ident] = origin
                            if len(self._holders) > MAX_HOLDERS:
                                self._holders.pop(next(iter(self._holders)))
                            continue
                        if self._holders[ident] == origin:
                            self._inbox_back_locked(ident, origin)
                            continue
                self.frames_dropped += 1

    def _inbox_back_locked(self, inbox: bytes, key: bytes) -> None:
        """A remote worker's inbox said Hello again, having reconnected: if a send to it
        failed meanwhile (it then takes no new work), it takes work again."""
        for w in self._workers.values():
            if w.inbox == inbox and w.key == key:
                if (w.alive and w.ready and not w.retiring and not w.stop_sent and w.expired is None
                        and not self._closed and w not in self._live):
                    w.free = max(0, w.credits - sum(not t.directed for t in w.inflight.values()))
                    self._add_live_locked(w)
                    self._dispatch_locked()
                return

    def _check_remote(self, now: float) -> None:
        """Declare remote workers lost whose heartbeats stopped (pump thread)."""
        lost = []
        with self._lock:
            for w in self._workers.values():
                if w.remote and w.alive and now - w.seen > self.remote_timeout:
                    lost.append(w.id)
        for wid in lost:
            log.warning("remote worker %s lost: no heartbeat for %.1f s; redelivering its tasks",
                        wid, self.remote_timeout)
            # A helper thread: exit listeners (actor supervision) may wait on the pump.
            threading.Thread(target=self._on_exit, args=(wid, None, True), daemon=True,
                             name="phalanx-lost").start()

    def _fire_timers(self) -> None:
        now = time.monotonic()
        with self._lock:
            for task in self.outcomes.due(now):
                self._enqueue_locked(self._jobs[task.job].tag, [task])
            self._dispatch_locked()

    def _answer_query(self, ident: bytes, query: InspectQuery) -> None:
        """A helper thread: build the tree (it waits on workers), let the pump send it."""
        provide = self.inspect_provider() if self.inspect_provider is not None else None
        if provide is None:
            return  # the runtime was collected
        try:
            tree = provide(max(0.05, min(query.timeout, 10.0)))
            frame = encode(InspectAnswer(query.nonce, tree))
        except Exception:
            return
        self._outgoing.append((ident, frame))
        try:
            os.write(self._wake_w, b"o")
        except OSError:
            pass

    def send_from_pump(self, ident: bytes, frame: bytes) -> bool:
        """Send ``frame`` to ``ident`` on the results ROUTER (pump thread only); False if unreachable."""
        try:
            self._results.send(ident, zmq.SNDMORE | zmq.NOBLOCK)
            self._results.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def wake(self) -> None:
        """Make the pump run a round now (another thread queued something for it to send)."""
        try:
            os.write(self._wake_w, b"c")
        except OSError:
            pass  # shut down

    def _send_outgoing(self) -> None:
        while self._outgoing:
            ident, frame = self._outgoing.popleft()
            try:
                self._results.send_multipart([ident, frame], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the client went away

    def _handshaking(self) -> bool:
        return any(w.alive and not w.ready for w in list(self._workers.values()))

    def _greet(self) -> None:
        """Welcome workers that said Hello; publish Sync until they are Ready."""
        with self._lock:
            if self._control.closed:
                return
            self._control.send(encode(Sync(next(self._sync_nonce))))
            for w in self._workers.values():
                if w.alive and w.hello and not w.welcomed:
                    self._welcome_locked(w)

    def _welcome_locked(self, w: _Worker) -> None:
        if w.remote and self._holders.get(w.inbox) != w.key:
            return  # its tasks connection is not shown to be its own (yet): _greet retries
        if self._closed:
            # A replacement that connected after shutdown sent Stop and Shutdown:
            # answer its Hello with Stop, so it exits now rather than at the timeout.
            self._stop_locked(w)
            return
        try:
            self._send_raw_locked(w.ident, encode(Welcome(w.id, self.limits.max_frame)))
        except zmq.ZMQError:
            return  # the inbox is not connected yet: _greet retries
        w.welcomed = True

    def _reap_dead(self) -> None:
        now = time.monotonic()
        with self._lock:  # the supervisor thread adds replacements meanwhile
            ttl = self.dead_worker_ttl
            dead = [k for k, w in self._workers.items() if not w.alive and now - w.died_at > ttl]
            for k in dead:
                self._workers.pop(k, None)

    def _handle(self, parts: list[bytes], filtered: bool = False, origin: bytes | None = None,
                local: bool = False) -> None:
        """Handle a message from the results ROUTER; ``origin``: see :meth:`_origin`;
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
        if ident.endswith(b"!"):
            # A worker's control thread: timed-out tasks, inspect replies, heartbeats.
            if isinstance(msg, Alive):
                self._on_alive(ident[:-1], msg)
            elif isinstance(msg, Results):
                self._on_results(ident[:-1], msg)
            elif isinstance(msg, Reclaimed):
                self._on_reclaimed(ident[:-1], msg)
            elif isinstance(msg, InspectReply) and msg.worker.encode() == ident[:-1] and ident[:-1] in self._workers:
                with self._changed:
                    w = self._workers.get(ident[:-1])
                    if w is not None:
                        w.frames_dropped = max(w.frames_dropped, msg.frames_dropped)
                    replies = self._inspect_replies.get(msg.nonce)
                    if replies is None:
                        self.frames_dropped += 1  # a late or unasked reply
                    else:
                        replies[msg.worker] = msg
                        self._changed.notify_all()
            else:
                self.frames_dropped += 1
            return
        if isinstance(msg, InspectQuery):
            # (phalanx top speaks no CURVE: a query with a key comes from a worker host)
            if self.inspect_provider is None or ident in self._workers or origin:
                self.frames_dropped += 1
                return
            threading.Thread(target=self._answer_query, args=(ident, msg), daemon=True,
                             name="phalanx-inspect").start()
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
                self._retire_locked(w)
        elif isinstance(msg, Goodbye):
            self._on_goodbye(ident, msg)
        elif isinstance(msg, Hello):
            self._on_hello(ident, msg, origin)
        elif isinstance(msg, Ready):
            self._on_ready(ident, msg)
        else:  # e.g. Alive or InspectReply not from a worker's side channel
            self.frames_dropped += 1

    def _on_alive(self, ident: bytes, msg: Alive) -> None:
        with self._lock:
            w = self._workers.get(ident)
            if w is None or msg.worker != w.id:
                self.frames_dropped += 1
                return
            now = time.monotonic()
            w.seen = now
            if not w.alive and w.remote and now - w.stop_sent > 1.0:
                # Declared lost, but back (a healed partition): its tasks went
                # elsewhere; tell it to stop, its host starts a fresh worker.
                self._stop_locked(w)

    def _on_goodbye(self, ident: bytes, msg: Goodbye) -> None:
        """A remote worker leaves: send it nothing more, acknowledge, redeliver what it held now."""
        with self._lock:
            w = self._workers.get(ident)
            if w is None or msg.worker != w.id or not w.remote:
                self.frames_dropped += 1
                return
            self._stop_locked(w)  # the acknowledgement the worker waits for before it exits
            if not w.alive:
                return
            w.free = 0
            self._remove_live_locked(w)
            held = len(w.inflight)
        log.info("remote worker %s left; redelivering the %d tasks it held", w.id, held)
        # A helper thread, as for a lost worker: exit listeners may wait on the pump.
        threading.Thread(target=self._on_exit, args=(w.id, None), kwargs={"left": True}, daemon=True,
                         name="phalanx-left").start()

    def _join_locked(self, ident: bytes, msg: Hello, origin: bytes | None) -> _Worker | None:
        """A remote worker's first Hello: add it, owned by the key ``origin`` (listening runtimes only)."""
        if (
            self.address is None
            or self._closed
            or msg.worker.encode() != ident
            or not msg.worker
            or b"!" in ident
            or b"~" in ident
            or _LOCAL_ID.match(ident) is not None
            or msg.version != PROTOCOL_VERSION
            or len(msg.tags) > MAX_TAGS
            or not is_inbox(msg.inbox.encode())
            or any(v.inbox == msg.inbox.encode() for v in self._workers.values())
        ):
            return None
        try:
            tags = tuple(dict.fromkeys(check_tag(t) for t in msg.tags)) or (DEFAULT_TAG,)
        except ValueError:
            return None  # a malformed tag: refuse the worker rather than guess
        w = _Worker(msg.worker, tags)
        w.remote = True
        w.key = origin
        w.inbox = msg.inbox.encode()
        w.host = msg.host
        w.seen = time.monotonic()
        self._workers[ident] = w
        self.workers_joined += 1
        log.info("remote worker %s joined from %s (pid %d, tags %s)", msg.worker, msg.host, msg.pid,
                 ",".join(tags))
        return w

    def _on_hello(self, ident: bytes, msg: Hello, origin: bytes | None = None) -> None:
        with self._lock:
            w = self._workers.get(ident)
            if w is None:
                w = self._join_locked(ident, msg, origin)
            if w is None or msg.worker != w.id or not w.alive or w.hello:
                self.frames_dropped += 1
                return
            w.pid = msg.pid
            w.hello = True
            self._welcome_locked(w)
            if w.welcomed and w.pipe is not None and not self._control.closed:
                # Its SUB connected early in its start-up (usually by now): a Sync at once
                # spares the local worker the wait for the next one the pump publishes.
                try:
                    self._control.send(encode(Sync(next(self._sync_nonce))), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the pump publishes the next one within 1 ms

    def _on_ready(self, ident: bytes, msg: Ready) -> None:
        with self._lock:
            w = self._workers.get(ident)
            if w is None or msg.worker != w.id or not w.alive or not w.welcomed or w.ready:
                self.frames_dropped += 1
                return
            w.ready = True
            w.free = w.credits = max(1, msg.credits)
            self._add_live_locked(w)
            self._dispatch_locked()
            self._changed.notify_all()
        for listener in self.ready_listeners:
            try:
                listener(w.id)
            except Exception:
                pass

    def _on_results(self, ident: bytes, msg: Results, direct: list[tuple[Job, int, Ok | Err]] | None = None) -> None:
        """Resolve a worker's outcomes; deliveries go to the pump's round, or to ``direct`` (see wait_direct)."""
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
                self._stop_locked(w)
            if self._pending:
                self._dispatch_locked()
            if w.held:  # the worker answered: what waited for it goes out now, with this round's dispatch
                self._release_locked(w)
            if not self._pending:
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
        with self._lock:  # a caller in wait_direct may add some
            ready, self._deliveries = self._deliveries, []
        self._deliver(ready)

    # ---- a caller reading its own reply ------------------------------------------------

    def wait_direct(self, fut: Any, timeout: float | None) -> bool:
        """Wait for ``fut`` on this thread, reading local workers' pipes itself; False: not here.

        A lone call then costs one wake-up fewer: the worker's reply wakes the
        waiting caller, which reads it, resolves it and returns, instead of
        waking the pump, which wakes the caller. While a caller polls the pipes
        (and ``DIRECT_LINGER`` after), the pump does not, so it does not wake
        for them; a worker's ``reader`` lock makes sure frames are read once
        and handled in order. Only outcomes of ``direct`` jobs are delivered
        here (no lock held, as the pump would); every other frame is left to
        the pump, which handles it only once the outcomes read before it are
        delivered. If the future settles elsewhere (a remote worker answered,
        the runtime broke) the thread's eventfd wakes it. A lone caller whose
        waits have been short polls without blocking for up to ``SPIN_WAIT``
        first: a reply then costs no wake-up on this side at all. Returns True
        once ``fut`` settled or ``timeout`` passed.
        """
        if self._closed or threading.current_thread() is self._pump_thread:
            return False
        wake: _Wake | None = getattr(_THREAD, "wake", None)
        if wake is None:
            wake = _THREAD.wake = _Wake()
        waiter = _DirectWaiter(wake.fd)
        with fut._condition:
            if fut._state in SETTLED:
                return True
            fut._waiters.append(waiter)
        deadline = None if timeout is None else time.monotonic() + timeout
        began = time.perf_counter()
        try:
            while True:
                # Counted (and told of pipe changes) before the snapshot, so no change is missed.
                with self._direct_mutex:
                    self._direct_waiters += 1
                    self._direct_set.add(waiter)
                by_fd: dict[int, _Worker] = {}
                held = False
                for w in self._piped:
                    if w.pipe is None or w.pipe.closed:
                        continue
                    if w.leftover:
                        # Frames left to the pump: until it took them this pipe reads as empty, so
                        # it is not polled (it may be readable), but looked at again within 1 ms.
                        held = True
                        continue
                    by_fd[w.pipe.fileno()] = w
                direct: list[tuple[Job, int, Ok | Err]] = []
                read: list[_Worker] = []
                try:
                    if not by_fd and not held and not waiter.fired:
                        return False  # no local worker: the plain wait does
                    if self._pump_reads_pipes:
                        self.wake()  # it stops polling the pipes
                    poller = select.poll()
                    poller.register(wake.fd, select.POLLIN)
                    for fd in by_fd:
                        poller.register(fd, select.POLLIN)
                    # A lone caller whose replies have been quick spins briefly before blocking.
                    spin = self._direct_waiters == 1 and self._direct_typical < SPIN_WAIT
                    events = self._spin(poller, time.perf_counter() + SPIN_WAIT) if spin else []
                    if not events:
                        ms = -1.0 if deadline is None else max(0.0, (deadline - time.monotonic()) * 1000) + 0.5
                        if held and (ms < 0 or ms > 1.0):
                            ms = 1.0  # look again soon at the pipe left out above
                        events = poller.poll(ms)
                    for fd, _ in events:
                        ready = by_fd.get(fd)
                        if ready is not None and self._read_direct(ready, direct):
                            read.append(ready)
                        elif fd == wake.fd and waiter.nudged:
                            waiter.nudged = False  # then a new snapshot
                            try:
                                os.eventfd_read(wake.fd)
                            except BlockingIOError:
                                pass
                finally:
                    with self._direct_mutex:
                        self._direct_waiters -= 1
                        self._direct_set.discard(waiter)
                        self._direct_left = time.monotonic()
                if read:
                    self._deliver_direct(read, direct, waiter)
                if fut._state in SETTLED:
                    # How long replies take decides whether the next wait spins first.
                    self._direct_typical += (time.perf_counter() - began - self._direct_typical) * 0.25
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return True
        finally:
            with fut._condition:
                fut._waiters.remove(waiter)
            if waiter.fired or waiter.nudged:
                try:
                    os.eventfd_read(wake.fd)
                except BlockingIOError:
                    pass

    @staticmethod
    def _spin(poller: Any, until: float) -> list[tuple[int, int]]:
        """Poll without blocking until something is readable or ``until`` (perf_counter) passed."""
        while True:
            events: list[tuple[int, int]] = poller.poll(0)
            if events or time.perf_counter() >= until:
                return events

    def _read_direct(self, w: _Worker, direct: list[tuple[Job, int, Ok | Err]]) -> bool:
        """Read a local worker's pipe on a waiting caller's thread; True: ``w.delivering`` was raised."""
        with w.reader:  # if the pump holds it, wait for it, then take what is left
            pipe = w.pipe
            if pipe is None or pipe.closed or w.leftover or w.broken:
                return False
            try:
                frames = pipe.recv()
            except PipeError:
                w.broken = True
                frames = None
            except OSError:
                frames = None
            if frames is None:  # the end (or a bad frame): the pump ends the pipe
                self._need_pump(w)
                return False
            ident = w.ident
            if self.frame_filter is not None:  # fault injection sits on the link, below this read
                frames = [out for frame in frames for out in self.frame_filter("in", ident, frame)]
            if not frames:
                return False
            for i, frame in enumerate(frames):
                try:
                    msg = decode_driver(frame, self.config.local_pickle)
                except ProtocolError as exc:
                    # A result that failed to unpickle (local_pickle) is that task's error.
                    msg = salvage_results(frame) if isinstance(exc.__cause__, UnpickleFailed) else None  # type: ignore[assignment]
                if not isinstance(msg, Results):
                    # Left to the pump, in order, before its next read of this pipe, and
                    # once the outcomes read before it are delivered (see _deliver_direct).
                    w.leftover = frames[i:]
                    break
                try:
                    self._on_results(ident, msg, direct)
                except Exception as exc:  # bad input is counted where it is checked: this is a bug
                    self.internal_error(exc, "handling a frame")
            w.delivering += 1
            return True

    def _deliver_direct(self, read: list[_Worker], direct: list[tuple[Job, int, Ok | Err]],
                        waiter: _DirectWaiter) -> None:
        """Deliver what a caller read, then let the pump handle what came after it."""
        waiter.armed = False  # the caller looks at its future next anyway
        try:
            self._deliver(direct)
        finally:
            waiter.armed = True
            for w in read:
                with w.reader:
                    w.delivering -= 1
                    if not w.delivering and (w.leftover or w.deferred):
                        w.deferred = False
                        self._need_pump(w)

    def _nudge(self) -> None:
        """The pipes changed (pump thread): every caller polling a snapshot of them takes a new one.

        Without it a caller would poll a closed pipe's number (perhaps reused by
        another file) or miss a new worker's Hello, which the pump does not read
        while callers read the pipes: a wait as long as the caller's timeout.
        """
        with self._direct_mutex:
            for waiter in self._direct_set:
                waiter.nudge()

    def _need_pump(self, w: _Worker) -> None:
        """Have the pump read ``w``'s pipe even while callers read the pipes."""
        self._pipe_attention.append(w)
        self.wake()

    def _deliver(self, ready: Sequence[tuple[Job, int, Delivery]]) -> None:
        """Hand outcomes to their jobs, in order: every delivery of the driver goes through here.

        Every ``deliver`` is the runtime's own (futures, lease queues, actor
        replies): one that raises is a bug, which breaks the runtime (see
        ``internal_error``) once the other outcomes are delivered.
        """
        i, end = 0, len(ready)
        failed: list[tuple[Job, Exception]] | None = None
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
        if failed:
            broken = self.internal_error(failed[0][1], "delivering an outcome")
            for job, _ in failed:
                try:
                    job.fail(broken)
                except Exception:
                    pass  # its caller already has the runtime's error through every other path

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
                    self._stop_locked(w)
            try:
                self._control.send(encode(Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._changed.notify_all()
        closed = RuntimeClosedError("the runtime was shut down before this job finished")
        for job in jobs:
            job.fail(closed)
        for w in frozen:  # it cannot obey Stop: not worth waiting shutdown_timeout again
            self._supervisor.kill(w.id)
        self._supervisor.stop(self.config.shutdown_timeout)
        with self._lock:
            for w in self._workers.values():
                w.alive = False
            self._live.clear()
            self._live_tags.clear()
        os.write(self._wake_w, b"x")
        if self._pump_thread.is_alive():
            self._pump_thread.join(5.0)
        with self._lock:
            sockets.close(self._tasks, self._results, self._control)
        self._close_security()
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
        with self._lock:
            workers = [
                WorkerStats(w.id, w.pid, w.alive, w.ready, len(w.inflight), w.tasks, w.items, w.busy,
                            w.host, w.remote, w.tags, w.frames_dropped)
                for w in self._workers.values()
            ]
            return RuntimeStats(
                workers=workers,
                tasks_submitted=self.tasks_submitted,
                tasks_completed=self.outcomes.tasks_completed,
                tasks_failed=self.outcomes.tasks_failed,
                items_completed=self.outcomes.items_completed,
                retried=self.outcomes.retried,
                skipped=self.outcomes.skipped,
                redelivered=self.outcomes.redelivered,
                duplicates_dropped=self.outcomes.duplicates_dropped,
                late_results_dropped=self.outcomes.late_results_dropped,
                frames_dropped=self.frames_dropped,
                worker_deaths=self.worker_deaths,
                worker_restarts=self.worker_restarts,
                workers_recycled=self.workers_recycled,
                jobs_open=len(self._jobs),
                workers_joined=self.workers_joined,
                workers_lost=self.workers_lost,
                workers_left=self.workers_left,
                peers_refused=self.peers_refused,
                channel_messages_dropped=self.channel_messages_dropped,
                channel_redelivered=self.channel_redelivered,
                reclaimed=self.reclaimed,
            )

