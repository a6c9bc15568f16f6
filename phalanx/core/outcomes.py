"""Outcome resolution, crash attribution and restart intensity, without I/O.

One :class:`Outcomes` per runtime, called by its host with the host's lock
held (the threaded driver) or on the one scheduler thread (the simulator);
it reads no clock: calls that need the time carry ``now``. What it decides
comes out as return values and an outbox the host drains:

* ``take(worker, outcomes, out)``: credits back, late results and
  duplicates dropped (counted), the rest resolved into ``out``.
* ``resolve(job, task, outcome)``: the final outcome to deliver, or None
  when the task goes again (``requeue``: to the front of its tag's queue at
  once; ``later``: after a retry delay, armed into timers by ``arm(now)``).
* ``worker_died(...)``: what a dead worker held is redelivered, charged a
  crash, or failed (actor calls, tasks out of attempts); too many unplanned
  deaths within ``restart_window`` break the runtime.
* ``next_deadline()`` / ``due(now)``: when the host must wake for a retry,
  and the retries whose time came.

Invariants kept: **exactly-once delivery** (an outcome resolves only a seq
still outstanding, and takes it out as it is delivered; a retry or a
redelivered task replaces the entry, so an older attempt's result is a
duplicate) and **lease isolation** (a job's entry goes when its last task
does, for autoclose jobs; late results then find no job).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Protocol

from ..errors import ActorDiedError, RuntimeBrokenError, TaskTimeoutError, WorkerCrashedError
from ..policy import FatalStrategy
from ..transport.codec import error_info
from ..transport.messages import ActorCall, Chunk, Err, Ok
from .tasks import SKIPPED, Delivery, Job, Task

__all__ = ["Outcomes", "Death", "Holder"]


class Holder(Protocol):
    """What outcome resolution reads and writes of a worker (the host's record of it)."""

    alive: bool
    retiring: bool
    free: int
    tasks: int
    items: int
    inflight: dict[tuple[int, int], Task]

#: what a worker's death means: (failed (job, seq, what to deliver)), tasks to redeliver in order, the break
Death = tuple[list[tuple[Job, int, Delivery]], list[Task], "BaseException | None"]


class Outcomes:
    """What outcomes and deaths mean for the jobs of ``jobs`` (see the module docstring)."""

    __slots__ = (
        "jobs", "max_attempts", "restart_limit", "restart_window", "requeue", "later", "timers",
        "_timer_ids", "restarts", "tasks_completed", "items_completed", "tasks_failed", "retried",
        "skipped", "redelivered", "late_results_dropped", "duplicates_dropped", "abort_grace",
    )

    def __init__(self, jobs: dict[int, Job], max_attempts: int, restart_limit: int,
                 restart_window: float, abort_grace: float = 0.0) -> None:
        #: the job table (shared with the host, which opens and closes jobs)
        self.jobs = jobs
        self.max_attempts = max_attempts
        self.restart_limit = restart_limit
        self.restart_window = restart_window
        #: seconds a task may overrun its timeout before the driver kills its worker (for messages)
        self.abort_grace = abort_grace
        #: outbox: tasks to put at the front of their job's tag queue, in this order
        self.requeue: list[Task] = []
        #: outbox: (delay, task) retries not yet armed (see ``arm``)
        self.later: list[tuple[float, Task]] = []
        #: armed retries: (due, order, task)
        self.timers: list[tuple[float, int, Task]] = []
        self._timer_ids = itertools.count()
        #: times of recent unplanned worker deaths (the restart intensity)
        self.restarts: deque[float] = deque()
        self.tasks_completed = 0
        self.items_completed = 0
        self.tasks_failed = 0
        self.retried = 0
        self.skipped = 0
        self.redelivered = 0
        self.late_results_dropped = 0
        self.duplicates_dropped = 0

    # ---- outcomes ----------------------------------------------------------------

    def take(self, w: Holder, outcomes: Sequence[Ok | Err], out: list[tuple[Job, int, Ok | Err]]) -> int:
        """Outcomes worker ``w`` sent: each one it holds frees its credit and is resolved.

        What is final goes to ``out`` as ``(job, seq, outcome)``. An outcome for
        a job that is gone is a late result, one for a seq no longer
        outstanding a duplicate (both counted and dropped). Returns how many
        were for tasks ``w`` does not hold: bad input, for the host to count.
        """
        jobs = self.jobs
        inflight = w.inflight
        resolve = self.resolve
        strays = 0
        credits = w.alive and not w.retiring
        for outcome in outcomes:
            seq = outcome.seq
            task = inflight.pop((outcome.job, seq), None)
            if task is None:
                strays += 1  # not a task this worker holds
                continue
            msg = task.msg
            kind = msg.__class__
            if credits and kind is not ActorCall:  # a directed call took no credit
                w.free += 1
            w.tasks += 1
            w.items += task.items
            job = jobs.get(outcome.job)
            if job is None:
                self.late_results_dropped += 1
                continue
            outstanding = job.outstanding
            if seq not in outstanding:
                self.duplicates_dropped += 1
                continue
            if kind is not Chunk and outcome.__class__ is Ok and task.prefix is None and task.rest is None:
                # The common case, resolve()'s first branch without the call: a call's value.
                del outstanding[seq]
                if job.autoclose and not outstanding:
                    jobs.pop(job.id, None)
                self.tasks_completed += 1
                self.items_completed += task.items
                out.append((job, seq, outcome))
                continue
            final = resolve(job, task, outcome)
            if final is not None:
                out.append((job, seq, final))
        return strays

    def resolve(self, job: Job, task: Task, outcome: Ok | Err) -> Ok | Err | None:
        """What ``outcome`` of ``task`` (outstanding in ``job``) means: deliver, retry or skip."""
        seq = outcome.seq
        prefix = task.prefix
        msg = task.msg
        if isinstance(outcome, Ok):
            if task.rest is not None or (
                type(msg) is Chunk and not msg.fold and isinstance(outcome.value, list)
                and len(outcome.value) < task.items
            ):
                # Part of a map chunk: split after a crash, or the values that fit in one frame.
                # The chunk goes on after them (a fresh count of crashes and retries: new items).
                done = outcome.value
                self.items_completed += len(done)
                more = task.resume(len(done), done)
                more.crashes = more.retries = 0
                job.outstanding[seq] = more
                self.requeue.append(more)
                return None
            del job.outstanding[seq]
            if job.autoclose and not job.outstanding:
                self.jobs.pop(job.id, None)
            self.tasks_completed += 1
            self.items_completed += task.items
            if prefix:
                return Ok(outcome.job, seq, outcome.attempt, prefix + outcome.value)
            return outcome
        is_map = isinstance(msg, Chunk) and not msg.fold
        if outcome.transient and job.retry is not None:
            delay = job.retry.delay(task.retries + 1)
            if delay is not None:
                retry = task.resume(outcome.index, outcome.partial or []) if is_map else task.retry()
                retry.retries = task.retries + 1
                job.outstanding[seq] = retry
                self.retried += 1
                if delay <= 0:
                    self.requeue.append(retry)
                else:
                    self.later.append((delay, retry))
                return None
        if is_map and job.on_fatal is FatalStrategy.IGNORE:
            assert isinstance(msg, Chunk)
            done = (outcome.partial or []) + [SKIPPED]
            if job.skipped is None:
                job.skipped = []
            job.skipped.append((seq, len(prefix or []) + outcome.index, outcome.error))
            self.skipped += 1
            if outcome.index + 1 >= len(msg.items) and not task.rest:
                del job.outstanding[seq]
                if job.autoclose and not job.outstanding:
                    self.jobs.pop(job.id, None)
                self.tasks_completed += 1
                return Ok(outcome.job, seq, outcome.attempt, (prefix or []) + done)
            rest = task.resume(outcome.index + 1, done)
            rest.retries = rest.crashes = 0
            job.outstanding[seq] = rest
            self.requeue.append(rest)
            return None
        del job.outstanding[seq]
        if job.autoclose and not job.outstanding:
            self.jobs.pop(job.id, None)
        self.tasks_failed += 1
        if prefix:
            return Err(outcome.job, seq, outcome.attempt, outcome.error,
                       len(prefix) + outcome.index, prefix + (outcome.partial or []), outcome.transient)
        return outcome

    def take_requeue(self) -> list[Task]:
        """Drain the ``requeue`` outbox."""
        out, self.requeue = self.requeue, []
        return out

    # ---- timers ------------------------------------------------------------------

    def arm(self, now: float) -> None:
        """Turn the retries resolved since the last call into timers due ``delay`` after ``now``."""
        for delay, task in self.later:
            heapq.heappush(self.timers, (now + delay, next(self._timer_ids), task))
        self.later.clear()

    def next_deadline(self) -> float | None:
        """When the host must call ``due`` next (None: no retry waits)."""
        return self.timers[0][0] if self.timers else None

    def due(self, now: float) -> list[Task]:
        """The retries whose time came and that are still wanted (their job waits for them)."""
        timers = self.timers
        out: list[Task] = []
        while timers and timers[0][0] <= now:
            task = heapq.heappop(timers)[2]
            job = self.jobs.get(task.job)
            if job is not None and job.outstanding.get(task.seq) is task:
                out.append(task)
        return out

    # ---- deaths ------------------------------------------------------------------

    def fail(self, job: Job, task: Task, exc: BaseException) -> Delivery | None:
        """What a task the driver fails itself delivers (its worker died too often, or overran its timeout).

        A map chunk's failure goes through the map's rules, as the worker's own
        errors do: ``Ignore`` skips the item, ``Terminate`` keeps the values before it.
        """
        msg = task.msg
        if isinstance(msg, Chunk) and not msg.fold:
            return self.resolve(job, task, Err(msg.job, msg.seq, msg.attempt, error_info(exc)))
        del job.outstanding[task.seq]
        if job.autoclose and not job.outstanding:
            self.jobs.pop(job.id, None)
        return exc

    def worker_died(self, worker_id: str, held: Iterable[Task], exitcode: int | None, planned: bool,
                    now: float, expired: tuple[int, int] | None = None) -> Death:
        """A worker that held ``held`` (in the order it got them) is gone.

        A crash is charged only to the task it was running, the first it held
        (workers run tasks in order), and only if the death was not planned
        (retired, lost, left, ended itself); a map chunk of several items is
        split instead, until the crash is one item's. ``expired``: the task
        the driver killed the worker for (it overran ``timeout + abort_grace``)
        fails with :class:`TaskTimeoutError`. An actor call is not idempotent:
        it fails with :class:`ActorDiedError`, never runs twice. A task
        charged ``max_attempts`` crashes fails with :class:`WorkerCrashedError`.
        Failures of map chunks go through ``resolve`` (``Ignore`` skips the
        item), which may leave tasks in ``requeue``.
        """
        failed: list[tuple[Job, int, Delivery]] = []
        requeue: list[Task] = []
        jobs = self.jobs
        first = True
        for task in held:
            head, first = first, False
            job = jobs.get(task.job)
            if job is None or job.outstanding.get(task.seq) is not task:
                continue
            if task.directed:
                del job.outstanding[task.seq]
                failed.append((job, task.seq, ActorDiedError(
                    f"the worker {worker_id} running this call died (exit code {exitcode})")))
                continue
            overran = expired == (task.job, task.seq)
            if head and (overran or not planned) and task.splits:
                retry = task.split()
            elif overran:
                final = self.fail(job, task, TaskTimeoutError(
                    f"task {task.seq} of job {task.job} ({job.op}) ran longer than its timeout of "
                    f"{getattr(task.msg, 'timeout', 0.0):g} s and abort_grace of {self.abort_grace:g} s: "
                    f"its worker {worker_id} was killed"))
                if final is not None:
                    failed.append((job, task.seq, final))
                continue
            else:
                retry = task.retry()
                if head and not planned:
                    retry.crashes += 1
            if retry.crashes >= self.max_attempts:
                final = self.fail(job, task, WorkerCrashedError(
                    f"the worker running task {task.seq} of job {task.job} ({job.op}) died "
                    f"{retry.crashes} times; last exit code {exitcode}"
                    + (f" (signal {-exitcode})" if exitcode is not None and exitcode < 0 else ""),
                    exitcode))
                if final is not None:
                    failed.append((job, task.seq, final))
                continue
            job.outstanding[task.seq] = retry
            requeue.append(retry)
        self.redelivered += len(requeue)
        broken: BaseException | None = None
        if not planned:
            restarts = self.restarts
            restarts.append(now)
            while restarts and now - restarts[0] > self.restart_window:
                restarts.popleft()
            if len(restarts) > self.restart_limit:
                broken = RuntimeBrokenError(
                    f"{len(restarts)} worker deaths within {self.restart_window:g} s "
                    f"(restart_limit={self.restart_limit}); last: {worker_id} exit code {exitcode}")
        return failed, requeue, broken
