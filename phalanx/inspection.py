"""The driver's answers about itself: worker inspection, ``phalanx top`` queries, counters.

:class:`Inspection` asks every worker for its state (an InspectRequest on
the control PUB; replies come back on the workers' side channels), answers
clients such as ``phalanx top`` (an InspectQuery on the results ROUTER) with
the tree the runtime builds, and takes the snapshot of the counters
(:class:`RuntimeStats`).

Threads: :meth:`Inspection.inspect` and :meth:`Inspection.stats` run on any
user thread; :meth:`Inspection.on_reply`, :meth:`Inspection.on_query` and
:meth:`Inspection.send_outgoing` on the pump thread; a query's tree is built
on a helper thread (it waits on workers, which the pump must keep serving).

Locks: ``replies`` is guarded by the driver's lock (its condition wakes the
inspecting thread); ``outgoing`` is a deque appended to by helper threads and
emptied by the pump alone; the results ROUTER is the pump's.

Invariant kept: bad input never kills. A late or unasked reply, a reply in
another worker's name, a query from a worker or over CURVE are counted in
``frames_dropped`` and dropped.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import msgspec
import zmq

from .transport.codec import encode
from .transport.messages import InspectAnswer, InspectQuery, InspectReply, InspectRequest

if TYPE_CHECKING:
    from .driver import Driver

__all__ = ["Inspection", "WorkerStats", "RuntimeStats"]


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



class Inspection:
    """What the driver tells about its workers and itself (see the module docstring).

    What it uses of the driver: its lock and condition, the worker table, the
    control PUB and results ROUTER, ``inspect_provider``, the counters.
    """

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.nonces = itertools.count(1)
        #: replies to the inspections under way, by nonce (under the driver's lock)
        self.replies: dict[int, dict[str, InspectReply]] = {}
        #: answers to queries, for the pump to send: (client identity, frame)
        self.outgoing: deque[tuple[bytes, bytes]] = deque()

    def inspect(
        self, timeout: float,
    ) -> tuple[dict[str, InspectReply], list[tuple[str, int, int, str, tuple[str, ...]]]]:
        """Ask every worker for its state; (replies by worker, [(id, pid, in flight, host, tags)] of live workers)."""
        driver = self.driver
        nonce = next(self.nonces)
        deadline = time.monotonic() + timeout
        with driver._changed:
            replies: dict[str, InspectReply] = {}
            self.replies[nonce] = replies
            here = driver.config.host_name or socket.gethostname()
            live = [(w.id, w.pid, len(w.inflight), w.host or here, w.tags)
                    for w in driver._workers.values() if w.alive and w.ready]
            driver.publish_locked(encode(InspectRequest(nonce)))
            while len(replies) < len(live):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                driver._changed.wait(remaining)
            del self.replies[nonce]
        return dict(replies), live

    def on_reply(self, ident: bytes, msg: InspectReply) -> None:
        """A worker's reply, on its side channel as ``ident`` (pump thread)."""
        driver = self.driver
        if msg.worker.encode() != ident or ident not in driver._workers:
            driver.frames_dropped += 1
            return
        with driver._changed:
            w = driver._workers.get(ident)
            if w is not None:
                w.frames_dropped = max(w.frames_dropped, msg.frames_dropped)
            replies = self.replies.get(msg.nonce)
            if replies is None:
                driver.frames_dropped += 1  # a late or unasked reply
            else:
                replies[msg.worker] = msg
                driver._changed.notify_all()

    def on_query(self, ident: bytes, query: InspectQuery, origin: bytes | None) -> None:
        """A client asks for the inspect tree (pump thread): a helper thread builds it."""
        driver = self.driver
        # (phalanx top speaks no CURVE: a query with a key comes from a worker host)
        if driver.inspect_provider is None or ident in driver._workers or origin:
            driver.frames_dropped += 1
            return
        threading.Thread(target=self.answer, args=(ident, query), daemon=True, name="phalanx-inspect").start()

    def answer(self, ident: bytes, query: InspectQuery) -> None:
        """A helper thread: build the tree (it waits on workers), let the pump send it."""
        driver = self.driver
        provide = driver.inspect_provider() if driver.inspect_provider is not None else None
        if provide is None:
            return  # the runtime was collected
        try:
            tree = provide(max(0.05, min(query.timeout, 10.0)))
            frame = encode(InspectAnswer(query.nonce, tree))
        except Exception:
            return
        self.outgoing.append((ident, frame))
        try:
            os.write(driver._wake_w, b"o")
        except OSError:
            pass

    def send_outgoing(self) -> None:
        """Send the answers built (pump thread)."""
        results = self.driver._results
        if results is None:  # (never: every query came on it)
            self.outgoing.clear()
            return
        while self.outgoing:
            ident, frame = self.outgoing.popleft()
            try:
                results.send_multipart([ident, frame], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the client went away

    def stats(self) -> RuntimeStats:
        """A snapshot of the driver's counters (any thread)."""
        driver = self.driver
        with driver._lock:
            workers = [
                WorkerStats(w.id, w.pid, w.alive, w.ready, len(w.inflight), w.tasks, w.items, w.busy,
                            w.host, w.remote, w.tags, w.frames_dropped)
                for w in driver._workers.values()
            ]
            return RuntimeStats(
                workers=workers,
                tasks_submitted=driver.tasks_submitted,
                tasks_completed=driver.outcomes.tasks_completed,
                tasks_failed=driver.outcomes.tasks_failed,
                items_completed=driver.outcomes.items_completed,
                retried=driver.outcomes.retried,
                skipped=driver.outcomes.skipped,
                redelivered=driver.outcomes.redelivered,
                duplicates_dropped=driver.outcomes.duplicates_dropped,
                late_results_dropped=driver.outcomes.late_results_dropped,
                frames_dropped=driver.frames_dropped,
                worker_deaths=driver.worker_deaths,
                worker_restarts=driver.worker_restarts,
                workers_recycled=driver.workers_recycled,
                jobs_open=len(driver._jobs),
                workers_joined=driver.workers_joined,
                workers_lost=driver.workers_lost,
                workers_left=driver.workers_left,
                peers_refused=driver.peers_refused,
                channel_messages_dropped=driver.channel_messages_dropped,
                channel_redelivered=driver.channel_redelivered,
                reclaimed=driver.reclaimer.reclaimed,
            )

