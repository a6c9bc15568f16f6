"""Routing and credits: which worker gets which pending task, without I/O.

One :class:`Routing` per runtime, called by its host with the host's lock
held (the threaded driver) or on the scheduler's thread (the simulator).
Pending tasks wait in one queue per worker tag; each live worker holds some
tags and some free credits. ``dispatch()`` gives each task to the live
worker of its tag with the most free credits and returns, per worker, the
tasks to send (the host writes them: one pipe write per worker, or a frame
each); it reads no clock, and calls that need the time carry ``now``.

Invariants kept:

* **No hang.** Work for a tag no live worker holds waits, and
  ``expire(now, timeout)`` fails it with :class:`~phalanx.NoWorkerError`
  once it waited ``timeout`` seconds; ``next_deadline`` says when to call it.
* **One queue never holds up another.** Tags are dispatched independently,
  so work for a tag with no live worker leaves other tags' work flowing.
* **A task is sent only while its job waits for it** (cancelled or finished
  work is skipped, and a cancelled future vetoes its first dispatch).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from ..errors import NoWorkerError
from .tasks import Job, Task

__all__ = ["Routing", "Routed"]


class Routed(Protocol):
    """What routing reads and writes of a worker (the host's record of it)."""

    tags: tuple[str, ...]
    free: int
    dispatched: int
    inflight: dict[tuple[int, int], Task]


W = TypeVar("W", bound=Routed)


class Routing(Generic[W]):
    """Pending tasks per tag, live workers per tag, and credit dispatch (see the module docstring)."""

    __slots__ = ("jobs", "pending", "live", "live_tags", "unrouted", "max_tasks", "retire")

    def __init__(self, jobs: dict[int, Job], max_tasks: int = 0) -> None:
        #: the job table (shared with the host)
        self.jobs = jobs
        #: tasks waiting for a credit, one queue per worker tag (no empty queue is kept)
        self.pending: dict[str, deque[Task]] = {}
        #: workers that take new work
        self.live: list[W] = []
        #: live workers per tag
        self.live_tags: dict[str, int] = {}
        #: tags with pending tasks and no live worker -> the oldest such task's ``unrouted``
        self.unrouted: dict[str, float] = {}
        #: tasks a worker runs before it is replaced (0: no limit)
        self.max_tasks = max_tasks
        #: outbox: workers that reached ``max_tasks`` (the host retires them)
        self.retire: list[W] = []

    # ---- workers ---------------------------------------------------------------

    def add_live(self, w: W) -> None:
        """``w`` takes new work: its tags' waiting tasks have a route again."""
        self.live.append(w)
        for tag in w.tags:
            self.live_tags[tag] = self.live_tags.get(tag, 0) + 1
            if self.unrouted.pop(tag, None) is not None:
                for task in self.pending.get(tag, ()):
                    task.unrouted = -1.0

    def remove_live(self, w: W, now: float) -> None:
        """``w`` takes no new work: tags it was the last live worker of start their route wait."""
        if w not in self.live:
            return
        self.live.remove(w)
        for tag in w.tags:
            left = self.live_tags.get(tag, 0) - 1
            if left > 0:
                self.live_tags[tag] = left
                continue
            self.live_tags.pop(tag, None)
            queue = self.pending.get(tag)
            if queue:
                for task in queue:
                    if task.unrouted < 0:
                        task.unrouted = now
                self.unrouted.setdefault(tag, now)

    # ---- tasks -------------------------------------------------------------------

    def enqueue(self, tag: str, tasks: Sequence[Task], front: bool = False) -> bool:
        """Queue ``tasks`` for workers of ``tag`` (at the ``front``: redeliveries, retries).

        False if no live worker holds ``tag``: the host then calls ``unroutable`` with the time.
        """
        if not tasks:
            return True
        queue = self.pending.get(tag)
        if queue is None:
            queue = self.pending[tag] = deque()
        if front:
            queue.extendleft(reversed(tasks))
        else:
            queue.extend(tasks)
        return tag in self.live_tags

    def unroutable(self, tag: str, tasks: Sequence[Task], now: float) -> None:
        """``tasks`` of ``tag`` wait for a live worker of it from ``now`` (their route timeout runs)."""
        for task in tasks:
            if task.unrouted < 0:
                task.unrouted = now
        self.unrouted.setdefault(tag, now)

    def requeue(self, tasks: Sequence[Task], now: float) -> None:
        """Put ``tasks`` back at the front of their jobs' tag queues, in this order."""
        jobs = self.jobs
        tags = {task.job: jobs[task.job].tag for task in tasks if task.job in jobs}
        for tag in dict.fromkeys(tags.values()):
            group = [t for t in tasks if tags.get(t.job) == tag]
            if not self.enqueue(tag, group, front=True):
                self.unroutable(tag, group, now)

    def dispatch(self, order: list[tuple[W, Task]] | None = None) -> dict[W, list[Task]]:
        """Give pending tasks to live workers of their tag while credits allow; the tasks per worker.

        Each task goes to the worker with the most free credits; it is then in
        that worker's ``inflight``. A worker reaching ``max_tasks`` takes no
        more and is listed in ``retire``. ``order``, if given, also receives
        every ``(worker, task)`` in the order they were given.
        """
        batch: dict[W, list[Task]] = {}
        pending_by_tag = self.pending
        if not pending_by_tag:
            return batch
        live, live_tags = self.live, self.live_tags
        for w in live:
            if w.free > 0:
                break
        else:
            return batch  # no free credit anywhere (calls submitted faster than workers run them)
        for tag, pending in list(pending_by_tag.items()):
            if tag not in live_tags:
                continue
            # One tag among the live workers: all of them hold it (every worker has a tag).
            workers = live if len(live_tags) == 1 else [w for w in live if tag in w.tags]
            self._assign(workers, pending, batch, order)
            if not pending:
                del pending_by_tag[tag]
        return batch

    def _assign(self, workers: list[W], pending: deque[Task], batch: dict[W, list[Task]],
                order: list[tuple[W, Task]] | None) -> None:
        jobs = self.jobs
        limit = self.max_tasks
        while pending:
            best: W | None = None
            most = 0
            for w in workers:
                if w.free > most:
                    best, most = w, w.free
            if best is None:
                return
            task = pending.popleft()
            msg = task.msg  # its fields, not Task's properties: this runs once per task
            job_id, seq = msg.job, msg.seq
            job = jobs.get(job_id)
            if job is None or job.outstanding.get(seq) is not task:
                continue
            if job.on_dispatch is not None and msg.attempt == 0 and not task.claimed:
                if not job.on_dispatch():
                    del job.outstanding[seq]
                    if job.autoclose and not job.outstanding:
                        del jobs[job.id]
                    continue
                task.claimed = True
            tasks = batch.get(best)
            if tasks is None:
                batch[best] = [task]
            else:
                tasks.append(task)
            if order is not None:
                order.append((best, task))
            best.free -= 1
            best.inflight[(job_id, seq)] = task
            best.dispatched += 1
            if limit and best.dispatched >= limit:
                best.free = 0
                self.retire.append(best)

    def take_retire(self) -> list[W]:
        """Drain the ``retire`` outbox."""
        out, self.retire = self.retire, []
        return out

    def prune(self) -> None:
        """Drop queued tasks whose job is gone or no longer wants them (one pass)."""
        jobs = self.jobs
        for tag, queue in list(self.pending.items()):
            keep: deque[Task] = deque()
            for task in queue:
                job = jobs.get(task.job)
                if job is not None and job.outstanding.get(task.seq) is task:
                    keep.append(task)
            if keep:
                self.pending[tag] = keep
            else:
                del self.pending[tag]
                self.unrouted.pop(tag, None)

    # ---- route timeouts ------------------------------------------------------------

    def next_deadline(self, timeout: float) -> float | None:
        """When the oldest work with no route times out (None: all work has a route)."""
        return min(self.unrouted.values()) + timeout if self.unrouted else None

    def no_worker_error(self, tag: str, waited: float) -> NoWorkerError:
        """The error for work on ``tag`` that found no live worker within ``waited`` seconds."""
        available = tuple(sorted(self.live_tags))
        return NoWorkerError(
            f"no live worker has the tag {tag!r} (waited {waited:g} s); "
            f"tags with live workers: {', '.join(available) if available else 'none'}",
            tag, available,
        )

    def expire(self, now: float, timeout: float) -> list[tuple[Job, int, BaseException]]:
        """Take out pending tasks that waited ``timeout`` seconds for a worker of their tag.

        Returns what the host delivers: one :class:`NoWorkerError` each (the
        futures raise it in different threads).
        """
        failed: list[tuple[Job, int, BaseException]] = []
        jobs = self.jobs
        for tag, since in list(self.unrouted.items()):
            if now - since < timeout:
                continue
            keep: deque[Task] = deque()
            oldest = now
            for task in self.pending.get(tag, ()):
                job = jobs.get(task.job)
                if job is None or job.outstanding.get(task.seq) is not task:
                    continue  # cancelled meanwhile
                since = task.unrouted if task.unrouted >= 0 else now
                if now - since < timeout:
                    keep.append(task)
                    oldest = min(oldest, since)
                    continue
                del job.outstanding[task.seq]
                if job.autoclose and not job.outstanding:
                    jobs.pop(job.id, None)
                failed.append((job, task.seq, self.no_worker_error(tag, timeout)))
            if keep:
                self.pending[tag] = keep
                self.unrouted[tag] = oldest
            else:
                self.pending.pop(tag, None)
                self.unrouted.pop(tag, None)
        return failed
