"""Who the driver's workers are: the record kept of each (local or remote).

Runs in the driver process; the records are read and changed under the
driver's lock by the pump, user threads and the supervisor thread (the
fields a caller's direct read touches are guarded by the worker's own
``reader`` lock: see :mod:`phalanx.direct`).

Invariant kept: one record per worker identity; a remote worker's
identities belong to the CURVE key it joined with (``key``).
"""

from __future__ import annotations

import threading

from .core.tasks import Task
from .policy import DEFAULT_TAG
from .transport.pipe import FramePipe

__all__ = ["_Worker"]


class _Worker:
    __slots__ = (
        "id", "ident", "pid", "hello", "welcomed", "ready", "alive", "free", "inflight",
        "tasks", "items", "busy", "died_at", "retiring", "dispatched",
        "remote", "host", "seen", "stop_sent", "tags", "frames_dropped", "pipe", "pipe_done",
        "reader", "leftover", "broken", "delivering", "deferred", "held", "held_at",
        "head_since", "expired", "stopped_since", "key", "oldest", "reclaiming",
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
        #: last time anything arrived from it (remote workers' liveness)
        self.seen = 0.0
        self.stop_sent = 0.0
        #: malformed frames the worker reports it dropped (a running total)
        self.frames_dropped = 0
        #: a local worker's socketpair (None: ZeroMQ, remote workers)
        self.pipe: FramePipe | None = None
        #: set by the pump once it read the pipe to its end (everything the worker wrote is handled)
        self.pipe_done = threading.Event()
        #: held while reading the pipe and handling what was read (the pump, or a caller: phalanx.direct)
        self.reader = threading.Lock()
        #: frames a caller read but left to the pump (anything but outcomes), handled before the next read
        self.leftover: list[bytes] = []
        #: a caller's read found a frame above max_frame (the pump then ends the pipe)
        self.broken = False
        #: callers delivering outcomes they read here: frames after them wait (see phalanx.direct)
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


