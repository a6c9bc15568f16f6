"""Taking back tasks a busy worker prefetched, unstarted, for a worker that idles.

Credits let a worker hold several tasks; when the first one turns out long,
the tasks queued behind it would wait while another worker of their tag
idles. :class:`Reclaimer` asks such a worker (Reclaim, on the control PUB)
for the tasks it has not started, and queues those it gives back again at
the front of their tag's queue.

Threads: the pump thread, every ``RECLAIM_PERIOD`` (:meth:`Reclaimer.tick`)
and when a worker answers (:meth:`Reclaimer.on_reclaimed`). Locks: the
driver's lock around both (worker records, the job table, the routing);
each worker's ``oldest`` and ``reclaiming`` are read and written only here.

Invariant kept: **exactly once.** A worker gives back only tasks it will
then never run (see the worker's ``_give_back``), and an answer is acted on
only if the driver asked that worker and still holds those very attempts;
anything else is bad input, counted in ``frames_dropped``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import zmq

from .core.tasks import Task
from .transport.codec import encode
from .transport.messages import Reclaim, Reclaimed

if TYPE_CHECKING:
    from .driver import Driver

__all__ = ["Reclaimer", "RECLAIM_PERIOD"]

#: seconds between the pump's looks for tasks queued behind a long one while a worker idles;
#: a worker's oldest task must stay the same across one look to the next to count as long
RECLAIM_PERIOD = 0.05


class Reclaimer:
    """Tasks queued behind a long one, sent to an idle worker instead (see the module docstring).

    What it uses of the driver: its lock, the live workers and job table, the
    control PUB, ``_enqueue_locked``/``_dispatch_locked``, ``frames_dropped``.
    """

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        #: tasks taken back unstarted from a busy worker and dispatched again
        self.reclaimed = 0
        #: the last look (the first one a period after the start: no task is queued before it)
        self.last = time.monotonic()

    def tick(self, now: float) -> None:
        """Look at busy workers, every ``RECLAIM_PERIOD`` (pump thread)."""
        if now - self.last >= RECLAIM_PERIOD:
            self.last = now
            with self.driver._lock:
                self.reclaim_locked()

    def reclaim_locked(self) -> None:
        """Take back tasks a busy worker prefetched, unstarted, while a worker of their tag idles.

        A worker whose oldest task is the same as at the last look is asked
        (Reclaim, on the control PUB) for the tasks queued behind it, as many
        as idle workers have credits for. It gives back only tasks it will
        then never run (see the worker's ``_give_back``); its answer puts them
        back at the front of their queue (:meth:`on_reclaimed`), so each still
        runs once. Pump thread, every ``RECLAIM_PERIOD``; off the hot path.
        """
        driver = self.driver
        idle = [w for w in driver._live if not w.inflight and w.free > 0]
        room: dict[str, int] = {}
        for w in driver._live:
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
                job = driver._jobs.get(task.job)
                if key == oldest or task.directed or job is None:
                    continue
                free = room.get(job.tag)
                if free is None:
                    free = sum(i.free for i in idle if job.tag in i.tags)
                if free > 0:
                    wanted.append([task.job, task.seq, task.attempt])
                room[job.tag] = free - 1 if free > 0 else 0
            if wanted:
                if driver._control is not None and driver._control.closed:  # shut down
                    continue
                driver.publish_locked(encode(Reclaim(w.id, [running.job, running.seq, running.attempt], wanted)), w)
                w.reclaiming = True

    def on_reclaimed(self, ident: bytes, msg: Reclaimed) -> None:
        """A worker gave back tasks it will never run: queue them again, at the front (pump thread)."""
        driver = self.driver
        with driver._lock:
            w = driver._workers.get(ident)
            if w is None or msg.worker != w.id or not w.reclaiming:
                driver.frames_dropped += 1  # unasked: never ours to act on
                return
            w.reclaiming = False
            w.oldest = None
            back: dict[str, list[Task]] = {}
            for entry in msg.tasks:
                if len(entry) != 3:
                    driver.frames_dropped += 1
                    continue
                job_id, seq, attempt = entry
                task = w.inflight.get((job_id, seq))
                if task is None or task.attempt != attempt:
                    continue  # already redelivered (its worker died)
                del w.inflight[(job_id, seq)]
                if w.alive and not w.retiring:
                    w.free += 1
                job = driver._jobs.get(job_id)
                if job is not None and job.outstanding.get(seq) is task:
                    back.setdefault(job.tag, []).append(task)
                    self.reclaimed += 1
            for tag, tasks in back.items():
                driver._enqueue_locked(tag, tasks, front=True)
            driver._dispatch_locked()
