"""SimRuntime: a deterministic, single-process stand-in for :class:`phalanx.Runtime`.

Runs entirely in the calling (test) process, on the calling thread: there are
no worker processes, no sockets and no threads. It is the second host of
:mod:`phalanx.core`: outcome resolution (dedupe, retries, fatal strategies,
crash attribution, restart intensity), the map window, the actor lifecycle
and each worker's task execution (:class:`~phalanx.core.execute.TaskRunner`,
with :class:`~phalanx.actors.host.ActorHost` for actors) are the code a real
runtime runs; what is left here is what only a simulation has: the seeded
scheduler, the virtual clock, simulated processes and links (credits and
dispatch, delivery, death notices), and the waits. Both sides exchange the
very same msgpack frames, so operations see the same arguments and callers
see the same results and exception types as on a real runtime.

::

    user thread ── submit / map / fold / spawn / calls ──▶ driver model ──▶ links ──▶ worker models
         ▲                                                      ▲           (FIFO per worker,
         └── result() / next() / join(): run the scheduler ─────┘            through the FaultEngine)

**The scheduler.** Nothing happens until the caller waits (``result()``,
iterating a map, ``fold``, ``spawn``, ``join``, ``settle()``...). Waiting
runs the scheduler: at each step it lists what could happen now -- a worker
runs the next message of its inbox, the driver receives the next frame from
a worker, a due timer fires -- and picks one with a ``random.Random`` seeded
by ``seed``. When nothing can happen now, the **virtual clock** jumps to the
next timer (retry delays, task timeouts, worker restarts, delayed frames,
heartbeat deadlines): no real sleep ever happens. Every step is appended to
:attr:`SimRuntime.trace`.

Invariant kept: **same seed, same program, same run.** Every choice comes
from the seeded generator and every collection is iterated in insertion
order, so the trace, the results and the order of actor events repeat
exactly; a failing schedule is replayed from its seed (and fault plan).

Modelling choices (documented in ``docs/testing.md``): a task runs
atomically and takes ``task_time`` virtual seconds plus whatever it passes to
:func:`phalanx.testing.sleep`; frames a worker sent before it died still
reach the driver, before its death is noticed; local workers are never
declared lost by heartbeats (set ``heartbeat_timeout`` to model remote ones).
Worker tags (``workers={"io": 2}``, ``on=``) are routed by the core's routing.
Channels (``lease``) run the core's broker state on the virtual clock
(:mod:`phalanx.testing.sim_channels`). Not modelled: remote
workers (``address``, ``wait_for_workers``); asking for them raises an error
that says so.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar, cast, overload

from ..actors.ref import ActorRef
from ..channels import ChannelKind, ExactlyOnce, Lease
from ..actors.system import ActorNode, RuntimeTree, WorkerNode
from ..config import Config
from ..directives import Directive, Fold, IndexedChain
from ..directives import Chain as _Chain
from ..core.outcomes import Outcomes
from ..core.routing import Routing
from ..core.execute import TaskRunner
from ..core.tasks import Delivery, Job, Task
from ..driver import RuntimeStats, WorkerStats
from ..errors import ProtocolError, RuntimeBrokenError, RuntimeClosedError
from ..jobs import MISSING, Future, fold_on, options_for
from ..policy import DEFAULT_TAG, FatalStrategy, RetryStrategy, TaskOptions, check_tag
from ..runtime import _routed
from ..registry.operations import driver_operation, name_of, resolve
from ..transport.codec import decode_driver, decode_inbox, encode
from ..transport.messages import ActorCall, ActorEvent, ActorState, Call, Err, Ok, Results, Stop
from .faults import Fault, FaultEngine, resolve_plan

from .sim_actors import SimActors
from .sim_channels import SimChannels
from .sim_worker import NOTICE_DELAY, SimWorker, _settle, _task_clock, sleep
from .sim_jobs import HangError, SimFuture, SimJobHandle, SimJobOptions, SimMapIterator, _FutureSink, _Lease

__all__ = ["SimRuntime", "SimJobOptions", "SimMapIterator", "SimJobHandle", "HangError", "sleep"]

A = TypeVar("A")
P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
Y = TypeVar("Y")


#: virtual seconds a replacement worker takes to start and become ready
START_DELAY = 0.01
#: steps one wait may take before the simulation is declared runaway
MAX_STEPS = 2_000_000


#: members of phalanx.Runtime a SimRuntime does not model, and why (raised as AttributeError)
_NOT_MODELLED = {
    "wait_for_workers": "simulated workers are ready at once and remote workers are not modelled",
    "address": "a SimRuntime listens nowhere: remote workers are not modelled",
    "endpoints": "a SimRuntime has no sockets",
}


# The runtime
# --------------------------------------------------------------------------- #


class SimRuntime:
    """A deterministic :class:`phalanx.Runtime` in one process; see the module docstring.

    ::

        with SimRuntime(workers=2, seed=7, faults=[KillWorker(task=3)]) as rt:
            assert rt.submit(square, 7).result() == 49
            assert list(rt.map(square, range(10))) == [x * x for x in range(10)]
            print(rt.trace[-3:])

    ``seed`` is an int or a ``random.Random`` (for example one drawn from
    ``phalanx.testing.strategies.schedules()``, which Hypothesis shrinks).
    ``faults`` is a fault plan (a list of steps) or a Hypothesis strategy of
    plans, drawn inside the running ``@given`` test. The options mean what
    they mean on :class:`phalanx.Runtime`; times are virtual seconds.
    """

    def __init__(
        self,
        workers: int | dict[str, int] = 2,
        *,
        seed: int | random.Random = 0,
        faults: Any = None,
        credits: int = 16,
        max_attempts: int = 3,
        restart_limit: int = 50,
        restart_window: float = 10.0,
        abort_grace: float = 2.0,
        heartbeat_timeout: float = -1.0,
        task_time: float = 0.001,
        record: bool = True,
        route_timeout: float = 30.0,
        actor_restart_limit: int = 3,
        actor_restart_window: float = 60.0,
        actor_timeout: float = 60.0,
    ) -> None:
        tags = {check_tag(tag): count for tag, count in workers.items()} if isinstance(workers, dict) else {}
        total = sum(tags.values()) if isinstance(workers, dict) else workers
        self.config = Config(workers=total, tags=tags, credits=credits,
                             max_attempts=max_attempts,
                             restart_limit=restart_limit, restart_window=restart_window,
                             abort_grace=abort_grace, heartbeat_timeout=heartbeat_timeout,
                             route_timeout=route_timeout, actor_restart_limit=actor_restart_limit,
                             actor_restart_window=actor_restart_window, actor_timeout=actor_timeout)
        groups = self.config.worker_groups()
        if sum(groups.values()) < 1:
            raise ValueError(f"a SimRuntime needs at least one worker, got {workers}")
        self.seed: int | None = seed if isinstance(seed, int) else None
        self._rng = seed if isinstance(seed, random.Random) else random.Random(seed)
        self.plan: list[Fault] = resolve_plan(faults)
        self.engine: FaultEngine | None = FaultEngine(self.plan) if self.plan else None
        self.task_time = task_time
        #: every scheduling step and delivery, in order (compare two runs with ``==``)
        self.trace: list[tuple[Any, ...]] = []
        self._record_on = record
        #: deliveries per (job, seq): the exactly-once ledger
        self.deliveries: Counter[tuple[int, int]] = Counter()
        #: deliveries per kind of outcome (``Ok``, ``Err``, or an exception's class name)
        self.delivered_kinds: Counter[str] = Counter()
        #: every (job, seq) given to the workers (what ``deliveries`` should end up holding once)
        self.submitted: set[tuple[int, int]] = set()
        #: the highest number of calls waiting in any actor's mailbox
        self.max_mailbox = 0
        self.now = 0.0
        self.steps = 0
        self._closed = False
        self._broken: BaseException | None = None
        self._jobs: dict[int, Job] = {}
        self._job_ids = itertools.count(1)
        self._workers: dict[bytes, SimWorker] = {}
        #: pending tasks per worker tag, live workers per tag, credits (phalanx.core.routing)
        self.routing: Routing[SimWorker] = Routing(self._jobs)
        self._live: list[SimWorker] = self.routing.live
        #: a timer for the route timeout is set
        self._route_timer = False
        self._worker_ids = itertools.count(1)
        self._pids = itertools.count(100_001)
        self._timers: list[tuple[float, int, str, Callable[[], None], list[bool]]] = []
        self._timer_order = itertools.count()
        self._counters: Counter[str] = Counter()
        #: the core's outcome resolution, crash attribution and restart intensity (phalanx.core)
        self.outcomes = Outcomes(self._jobs, max_attempts, restart_limit, restart_window)
        self._actors = SimActors(self, actor_restart_limit, actor_restart_window, actor_timeout)
        #: channels (rt.lease): the core's broker state, made at the first lease
        self._channels: SimChannels | None = None
        #: the worker running a step now (its channel ends are its own)
        self._running: SimWorker | None = None
        #: what a simulated worker does with a task: the core's, as on a real worker
        self._runner = TaskRunner(_task_clock, _settle, resolve)
        for tag, count in groups.items():
            for _ in range(count):
                self._ready(self._spawn((tag,)))

    # ---- recording ---------------------------------------------------------------

    def _record(self, *entry: Any) -> None:
        if self._record_on:
            self.trace.append((round(self.now, 9),) + entry)

    def trace_text(self, last: int | None = None) -> str:
        """The trace as text, one step a line (the last ``last`` steps)."""
        rows = self.trace if last is None else self.trace[-last:]
        return "\n".join(" ".join(str(x) for x in row) for row in rows)

    def trace_around(self, what: str = "kill", before: int = 6, after: int = 8) -> str:
        """The steps around the first ``what`` entry (a kill, by default), or the last ones."""
        for i, row in enumerate(self.trace):
            if len(row) > 1 and row[1] == what:
                rows = self.trace[max(0, i - before):i + after + 1]
                return "\n".join(" ".join(str(x) for x in r) for r in rows)
        return self.trace_text(last=before + after)

    @property
    def fired(self) -> list[tuple[Fault, str]]:
        """The fault steps that took effect, with what they did."""
        return [] if self.engine is None else list(self.engine.fired)

    def replay_hint(self) -> str:
        """How to build this runtime again, for a regression test."""
        from .faults import plan_repr

        seed = self.seed if self.seed is not None else "<the Random drawn by hypothesis>"
        workers = self.config.tags or self.config.workers
        return f"SimRuntime(workers={workers}, seed={seed}, faults={plan_repr(self.plan)})"

    def reseed(self, seed: int | random.Random) -> None:
        """Take every later scheduling decision from ``seed`` (an int or a ``random.Random``)."""
        self.seed = seed if isinstance(seed, int) else None
        self._rng = seed if isinstance(seed, random.Random) else random.Random(seed)
        self._record("reseed", self.seed)

    def add_faults(self, faults: Any) -> None:
        """Add fault steps to the plan (tasks and messages keep being counted from the start)."""
        steps = resolve_plan(faults)
        if not steps:
            return
        self.plan = self.plan + steps
        fired = self.engine.fired if self.engine is not None else []
        engine = FaultEngine(self.plan)
        if self.engine is not None:
            engine.adopt(self.engine)
        engine.fired = fired
        self.engine = engine

    # ---- the scheduler -----------------------------------------------------------

    def _timer(self, delay: float, label: str, fn: Callable[[], None]) -> list[bool]:
        """Run ``fn`` in ``delay`` virtual seconds; returns a handle for :meth:`_cancel`."""
        handle = [False]
        heapq.heappush(self._timers, (self.now + max(0.0, delay), next(self._timer_order), label, fn, handle))
        return handle

    @staticmethod
    def _cancel(handle: list[bool]) -> None:
        handle[0] = True

    def _purge_timers(self) -> None:
        timers = self._timers
        while timers and timers[0][4][0]:
            heapq.heappop(timers)

    def _choices(self) -> list[tuple[str, SimWorker | None]]:
        now = self.now
        self._purge_timers()
        choices: list[tuple[str, SimWorker | None]] = []
        for w in self._workers.values():
            if w.running and w.inbox and w.busy_until <= now:
                choices.append(("run", w))
            if w.outbox and w.outbox[0][0] <= now:
                choices.append(("recv", w))
        if self._timers and self._timers[0][0] <= now:
            choices.append(("timer", None))
        if self.engine is not None:
            due = self.engine.next_release()
            if due is not None and due <= now:
                choices.append(("release", None))
        return choices

    def _next_time(self) -> float | None:
        self._purge_timers()
        times: list[float] = []
        for w in self._workers.values():
            if w.running and w.inbox:
                times.append(w.busy_until)
            if w.outbox:
                times.append(w.outbox[0][0])
        if self._timers:
            times.append(self._timers[0][0])
        if self.engine is not None:
            due = self.engine.next_release()
            if due is not None:
                times.append(due)
        return min(times) if times else None

    def step(self, until: float | None = None) -> bool:
        """Take one scheduling step; False when nothing can happen before ``until``."""
        choices = self._choices()
        if not choices:
            nxt = self._next_time()
            if nxt is None or (until is not None and nxt > until):
                return False
            self.now = max(self.now, nxt)
            return True
        self.steps += 1
        kind, w = choices[self._rng.randrange(len(choices))] if len(choices) > 1 else choices[0]
        if kind == "run":
            assert w is not None
            self._running = w
            try:
                w.run()
            finally:
                self._running = None
        elif kind == "recv":
            assert w is not None
            _, ident, frame = w.outbox.popleft()
            self._on_frame(w, ident, frame)
        elif kind == "timer":
            _, _, label, fn, _ = heapq.heappop(self._timers)
            self._record("timer", label)
            fn()
        else:
            assert self.engine is not None
            for direction, ident, frame in self.engine.release(self.now):
                self._record("release", direction, ident.decode())
                self._released(direction, ident, frame)
        return True

    def _wait_for(self, done: Callable[[], bool], timeout: float | None, what: str) -> None:
        """Run the scheduler until ``done()``; TimeoutError at the virtual deadline, HangError when stuck."""
        deadline = None if timeout is None else self.now + timeout
        budget = MAX_STEPS
        while not done():
            if not self.step(deadline):
                if deadline is not None:
                    self.now = max(self.now, deadline)
                    if self._next_time() is not None:
                        raise TimeoutError(f"timed out after {timeout} virtual seconds waiting for {what}")
                raise HangError(
                    f"waiting for {what}, but nothing more can happen (virtual time {self.now:.6f} s, "
                    f"{self.steps} steps): on a real runtime this would hang. Replay: {self.replay_hint()}"
                )
            budget -= 1
            if budget <= 0:
                raise RuntimeError(f"the simulation ran {MAX_STEPS} steps waiting for {what} (a livelock?)")

    def settle(self, timeout: float | None = None) -> None:
        """Run until nothing more can happen (or ``timeout`` virtual seconds pass)."""
        deadline = None if timeout is None else self.now + timeout
        budget = MAX_STEPS
        while self.step(deadline):
            budget -= 1
            if budget <= 0:
                raise RuntimeError(f"the simulation ran {MAX_STEPS} steps without settling (a livelock?)")

    def run_for(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, running whatever is due meanwhile."""
        deadline = self.now + seconds
        self.settle(seconds)
        self.now = max(self.now, deadline)

    def _future(self) -> SimFuture[Any]:
        fut: SimFuture[Any] = SimFuture()
        fut._sim = self
        return fut

    # ---- workers ----------------------------------------------------------------------

    def _spawn(self, tags: tuple[str, ...] = (DEFAULT_TAG,)) -> SimWorker:
        w = SimWorker(self, f"w{next(self._worker_ids)}", next(self._pids), tags)
        self._workers[w.ident] = w
        self._record("spawn", w.id)
        return w

    def _ready(self, w: SimWorker) -> None:
        if not w.running or self._closed:
            return
        w.ready = True
        w.free = max(1, self.config.credits)
        self.routing.add_live(w)
        self._dispatch()
        self._actors.rehome()

    def _live_workers(self) -> dict[bytes, int]:
        return {w.ident: len(w.inflight) for w in self._live}

    def _is_live(self, ident: bytes) -> bool:
        w = self._workers.get(ident)
        return w is not None and w.alive and w.ready

    def kill_worker(self, worker_id: str) -> None:
        """SIGKILL (in the model) one worker; it is noticed and replaced like a real one."""
        w = self._workers.get(worker_id.encode())
        if w is not None:
            self._kill(w)

    def _kill(self, w: SimWorker, exitcode: int = -9) -> None:
        if not w.running:
            return
        self._record("kill", w.id)
        w.running = False
        w.inbox.clear()
        w.host.instances.clear()
        if self.engine is not None:
            self.engine.forget_worker(w.ident)
        self._timer(NOTICE_DELAY, f"{w.id} exit noticed", lambda: self._on_exit(w, exitcode))

    def _on_exit(self, w: SimWorker, exitcode: int | None, lost: bool = False) -> None:
        """The driver notices a worker's death (the core charges the crash, as Driver._on_exit has it do)."""
        if not w.alive:
            return
        w.alive = False
        self.routing.remove_live(w, self.now)
        if self._closed:
            return
        planned = w.retiring or w.expect_kill or lost
        if lost:
            self._counters["workers_lost"] += 1
        elif not planned:
            self._counters["worker_deaths"] += 1
        failed, requeue, broken = self.outcomes.worker_died(w.id, w.inflight.values(), exitcode, planned, self.now)
        self.routing.requeue(requeue, self.now)
        self._after_resolve()  # what a failed map chunk left to do, under Ignore
        self._record("exit", w.id, exitcode, "lost" if lost else ("planned" if planned else "crash"))
        self._dispatch()
        for job, seq, exc in failed:
            self._deliver(job, seq, exc)
        self._actors.on_worker_exit(w.id, exitcode)
        if self._channels is not None:
            self._channels.worker_exited(w.id)
        if broken is not None:
            self._break(broken)
        elif not w.retiring:
            self._counters["worker_restarts"] += 1
            fresh = self._spawn(w.tags)  # the replacement serves the same tags
            self._timer(START_DELAY, f"{fresh.id} ready", lambda: self._ready(fresh))

    def _break(self, exc: BaseException) -> None:
        if self._broken is not None:
            return
        self._broken = exc
        jobs = list(self._jobs.values())
        self._jobs.clear()
        self.routing.pending.clear()
        self.routing.unrouted.clear()
        for job in jobs:
            job.fail(exc)

    # ---- the driver: jobs and dispatch ----------------------------------------------

    def _check_open(self) -> None:
        if self._broken is not None:
            raise RuntimeBrokenError(str(self._broken)) from self._broken
        if self._closed:
            raise RuntimeClosedError("the runtime is shut down")

    def _open_job(self, op: str, deliver: Callable[[int, Delivery], None], fail: Callable[[BaseException], None],
                  on_dispatch: Callable[[], bool] | None = None, autoclose: bool = False,
                  options: TaskOptions | None = None, register: bool = True) -> Job:
        self._check_open()
        job = Job(next(self._job_ids), op, deliver, fail, on_dispatch, autoclose, options)
        if register:
            self._jobs[job.id] = job
        return job

    def _submit_tasks(self, job: Job, tasks: list[Task], register: bool = False) -> None:
        if self._broken is not None or self._closed:
            self._jobs.pop(job.id, None)
            raise RuntimeBrokenError(str(self._broken)) if self._broken else RuntimeClosedError(
                "the runtime is shut down")
        if register:
            self._jobs[job.id] = job
        for task in tasks:
            job.outstanding[task.seq] = task
            self.submitted.add((job.id, task.seq))
        if not self.routing.enqueue(job.tag, tasks):
            self.routing.unroutable(job.tag, tasks, self.now)
        self._counters["tasks_submitted"] += len(tasks)
        self._dispatch()

    def _close_job(self, job: Job, terminate: bool = False) -> None:
        self._jobs.pop(job.id, None)
        had_work = bool(job.outstanding) or job.dropped
        job.outstanding.clear()
        if terminate and had_work:
            for w in self._workers.values():
                if w.running:
                    w.terminated.add(job.id)

    def _drop_after(self, job: Job, seq: int) -> None:
        for later in [s for s in job.outstanding if s > seq]:
            del job.outstanding[later]
            job.dropped = True

    def _dispatch(self) -> None:
        """Send what the core's routing gives each worker, in the order it gave them."""
        routing = self.routing
        order: list[tuple[SimWorker, Task]] = []
        routing.dispatch(order)
        for w, task in order:
            self._record("send", w.id, type(task.msg).__name__, task.job, task.seq, task.attempt)
            self._send(w, task.frame)
        if routing.unrouted and not self._route_timer:
            due = routing.next_deadline(self.config.route_timeout)
            assert due is not None
            self._route_timer = True
            self._timer(due - self.now, "route timeout", self._expire_routes)

    def _expire_routes(self) -> None:
        """Fail work that waited ``route_timeout`` for a live worker of its tag."""
        self._route_timer = False
        failed = self.routing.expire(self.now, self.config.route_timeout)
        self.outcomes.tasks_failed += len(failed)
        self._dispatch()
        for job, seq, exc in failed:
            self._deliver(job, seq, exc)

    def _send(self, w: SimWorker, frame: bytes) -> None:
        """The driver puts a frame on ``w``'s inbox link (through the fault engine)."""
        frames: list[bytes] = [frame]
        if self.engine is not None:
            frames, kill = self.engine.outgoing(w.ident, frame, self.now)
            if kill is not None:
                self._kill(w)
            self._watch_partition(w)
        if w.running:
            w.inbox.extend(frames)

    def _send_to(self, ident: bytes, frame: bytes) -> bool:
        w = self._workers.get(ident)
        if w is None or not w.alive or self._closed:
            return False
        self._send(w, frame)
        return True

    def _submit_directed(self, job: Job, msg: ActorCall, frame: bytes, ident: bytes) -> bool:
        task = Task(msg, frame)
        w = self._workers.get(ident)
        if w is None or not w.alive or self._closed or self._broken is not None:
            return False
        job.outstanding[task.seq] = task
        w.inflight[(task.job, task.seq)] = task
        self.submitted.add((job.id, task.seq))
        self._counters["tasks_submitted"] += 1
        self._record("send", w.id, "ActorCall", msg.job, msg.seq, msg.method)
        self._send(w, frame)
        mailbox = sum(1 for _ in w.inbox)
        if mailbox > self.max_mailbox:
            self.max_mailbox = mailbox
        return True

    def _released(self, direction: str, ident: bytes, frame: bytes) -> None:
        """A frame the fault engine held is due."""
        worker = ident[:-1] if ident.endswith(b"!") else ident
        w = self._workers.get(worker)
        if w is None:
            return
        if direction == "out":
            if w.running:
                w.inbox.append(frame)
        else:
            self._on_frame(w, ident, frame)

    def _watch_partition(self, w: SimWorker) -> None:
        """With heartbeats on, a worker partitioned longer than heartbeat_timeout is declared lost."""
        timeout = self.config.heartbeat_timeout
        if timeout <= 0 or self.engine is None or w.lost:
            return
        until = self.engine.partition_until(w.ident)
        if until is None or until - self.now <= timeout:
            return
        w.lost = True

        def declare() -> None:
            self._on_exit(w, None, lost=True)

        def heal() -> None:
            # The healed worker hears it was declared lost: it stops; its host starts another.
            w.running = False
            w.inbox.clear()

        self._timer(timeout, f"{w.id} lost (no heartbeat)", declare)
        self._timer(until - self.now, f"{w.id} partition healed", heal)

    # ---- the driver: receiving -------------------------------------------------------

    def _on_frame(self, w: SimWorker, ident: bytes, frame: bytes) -> None:
        try:
            msg = decode_driver(frame)
        except ProtocolError:
            self._counters["frames_dropped"] += 1
            return
        if isinstance(msg, Results):
            self._record("recv", w.id, "Results", *[(o.job, o.seq, o.attempt, type(o).__name__)
                                                     for o in msg.outcomes])
            self._on_results(w, msg, side=ident.endswith(b"!"))
        elif isinstance(msg, (ActorEvent, ActorState)):
            self._record("recv", w.id, type(msg).__name__, msg.instance)
            if msg.worker != w.id:
                self._counters["frames_dropped"] += 1
                return
            self._actors.on_message(w.ident, msg)
        else:
            self._counters["frames_dropped"] += 1

    def _on_results(self, w: SimWorker, msg: Results, side: bool) -> None:
        deliveries: list[tuple[Job, int, Ok | Err]] = []
        if msg.worker != w.id:
            self._counters["frames_dropped"] += 1
            return
        w.busy += msg.busy
        strays = self.outcomes.take(w, msg.outcomes, deliveries)
        self._counters["frames_dropped"] += strays
        if side and strays < len(msg.outcomes):
            w.expect_kill = True  # a timeout report: the worker may end itself next
        self._after_resolve()
        self._dispatch()
        for job, seq, final in deliveries:
            self._deliver(job, seq, final)

    def _deliver(self, job: Job, seq: int, outcome: Delivery) -> None:
        self.deliveries[(job.id, seq)] += 1
        self.delivered_kinds[type(outcome).__name__] += 1
        self._record("deliver", job.id, seq, type(outcome).__name__)
        try:
            job.deliver(seq, outcome)
        except Exception as exc:  # every deliver is the runtime's own: a bug breaks it loudly
            broken = RuntimeBrokenError(f"internal error while delivering an outcome: {type(exc).__name__}: {exc}")
            broken.__cause__ = exc
            self._break(broken)
            try:
                job.fail(broken)
            except Exception:
                pass

    def _after_resolve(self) -> None:
        """Send again what the core wants sent again: at once, or after a retry delay."""
        outcomes = self.outcomes
        if outcomes.requeue:
            self.routing.requeue(outcomes.take_requeue(), self.now)
        if outcomes.later:
            for delay, task in outcomes.later:
                self._timer(delay, f"retry job {task.job} seq {task.seq}", self._fire_retries)
            outcomes.arm(self.now)

    def _fire_retries(self) -> None:
        for task in self.outcomes.due(self.now):
            job = self._jobs[task.job]
            if not self.routing.enqueue(job.tag, [task]):
                self.routing.unroutable(job.tag, [task], self.now)
        self._dispatch()

    # ---- public API: work ------------------------------------------------------------------

    def options(self, *, retry: RetryStrategy | None = None, on_fatal: FatalStrategy | None = None,
                timeout: float | None = None, on: str | None = None) -> SimJobOptions:
        """The same runtime with per-job options (see :meth:`phalanx.Runtime.options`)."""
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if on is not None:
            check_tag(on)
        return SimJobOptions(self, TaskOptions(retry=retry, on_fatal=on_fatal, timeout=timeout, on=on))

    def submit(self, fn: Callable[P, R] | str, /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Run ``fn(*args, **kwargs)`` on a simulated worker; a future of its result."""
        return self._submit(fn, args, kwargs, None)

    def _submit(self, fn: Callable[..., R] | str, args: tuple[Any, ...], kwargs: dict[str, Any],
                options: TaskOptions | None) -> Future[R]:
        op_name = name_of(fn)
        op = driver_operation(fn)
        fut: SimFuture[Any] = self._future()
        sink = _FutureSink(fut, op, self)
        job = self._open_job(op_name, sink.deliver, sink.fail, fut.set_running_or_notify_cancel, autoclose=True,
                             options=options_for(op, options), register=False)
        msg = Call(job.id, 0, 0, op_name, list(args), kwargs or None, job.timeout)
        frame = encode(msg, "the arguments of {}", op_name)
        sink.job = job
        fut._phalanx_call = sink
        self._submit_tasks(job, [Task(msg, frame)], register=True)
        return fut

    def map(self, fn: Callable[..., R] | str, /, *iterables: Iterable[Any], chunksize: int | None = None,
            ordered: bool = True, timeout: float | None = None, progress: bool = False,
            on: str | None = None) -> SimMapIterator[R]:
        """Apply ``fn`` to every item, streaming (see :meth:`phalanx.Runtime.map`)."""
        return self._map(fn, iterables, chunksize, ordered, timeout, _routed(None, on))

    def _map(self, fn: Callable[..., R] | str, iterables: tuple[Iterable[Any], ...], chunksize: int | None,
             ordered: bool, timeout: float | None, options: TaskOptions | None) -> SimMapIterator[R]:
        return SimMapIterator(self, fn, iterables, chunksize, ordered, timeout, self._workers_for(options), options)

    def _workers_for(self, options: TaskOptions | None) -> int:
        """Live workers of the tag ``options`` route to (map/fold windows and chunk sizes)."""
        tag = options.tag if options is not None else DEFAULT_TAG
        return max(1, self.routing.live_tags.get(tag, 0) or self.config.worker_groups().get(tag, 0))

    def worker_tags(self) -> dict[str, tuple[str, ...]]:
        """The tags each live worker serves."""
        return {w.id: w.tags for w in self._workers.values() if w.alive}

    def fold(self, fn: Callable[[T, T], T] | str, iterable: Iterable[T], /, *, initial: T = MISSING,
             chunksize: int | None = None, timeout: float | None = None, on: str | None = None) -> T:
        """Combine all items with the associative ``fn(lower, upper)`` in exactly n-1 calls."""
        return self._fold(fn, iterable, initial, chunksize, timeout, _routed(None, on))  # type: ignore[no-any-return]

    @overload
    def run(self, directive: Fold[T], /, *, chunksize: int | None = None,
            timeout: float | None = None) -> SimJobHandle[T, T]: ...
    @overload
    def run(self, directive: IndexedChain[T], /, *, chunksize: int | None = None,
            timeout: float | None = None) -> SimJobHandle[tuple[int, T], list[T]]: ...
    @overload
    def run(self, directive: _Chain[T], /, *, chunksize: int | None = None,
            timeout: float | None = None) -> SimJobHandle[T, list[T]]: ...

    def run(self, directive: Directive[Any], /, *, chunksize: int | None = None,
            timeout: float | None = None) -> SimJobHandle[Any, Any]:
        """Run a directive chain as one job (see :meth:`phalanx.Runtime.run`): a :class:`SimJobHandle`.

        Every map stage of an item runs in the task of its chunk, and a fold's
        chunks are reduced where they were mapped, as on real workers, so a
        fault plan counts the same tasks on both.
        """
        return SimJobHandle(self, directive, chunksize, timeout, None)

    def _fold(self, fn: Callable[..., Any] | str, iterable: Iterable[Any], initial: Any, chunksize: int | None,
              timeout: float | None, options: TaskOptions | None,
              stages: Sequence[Callable[..., Any] | str] = ()) -> Any:
        return fold_on(
            lambda op_name, resolved: _Lease(self, op_name, resolved), self._submit_tasks, self._close_job,
            lambda: self.now, fn, iterable, initial, chunksize, timeout, self._workers_for(options), options,
            stages=stages,
        )

    # ---- public API: actors -------------------------------------------------------------------

    def spawn(self, cls: type[A] | str, /, *args: Any, on: str | None = None, name: str | None = None,
              detached: bool = False, restart_policy: str = "never", checkpoint_every: int = 0,
              checkpoint_interval: float = 0.0, timeout: float | None = None, **kwargs: Any) -> ActorRef[A]:
        """Start an actor and return a :class:`phalanx.ActorRef` (see :meth:`phalanx.Runtime.spawn`)."""
        self._check_open()
        actor = self._actors.spawn(cls, args, kwargs, on=on, name=name, detached=detached,
                                   restart_policy=restart_policy, checkpoint_every=checkpoint_every,
                                   checkpoint_interval=checkpoint_interval, timeout=timeout)
        return ActorRef(cast(Any, self._actors), cast(Any, actor), self.inspect)

    def lease(self, kind: ChannelKind = ExactlyOnce, *, capacity: int = 10_000, prefetch: int = 8) -> Lease[Any]:
        """:meth:`phalanx.Runtime.lease`: the same ends, on the core's broker state and the virtual clock."""
        if self._channels is None:
            self._check_open()
            self._channels = SimChannels(self)
        return self._channels.lease(kind, capacity, prefetch)

    def get_actor(self, name: str) -> ActorRef[Any]:
        """A new ref on the running actor spawned with ``name=``."""
        return ActorRef(cast(Any, self._actors), cast(Any, self._actors.get(name)), self.inspect)

    def inspect(self, timeout: float = 1.0) -> RuntimeTree:
        """The tree of simulated workers and their actors (pids are made up)."""
        hosted = self._actors.nodes()
        workers: list[WorkerNode] = []
        for w in self._workers.values():
            if not (w.alive and w.ready):
                continue
            mailbox: Counter[int] = Counter()
            if w.running:
                for frame in w.inbox:
                    try:
                        msg = decode_inbox(frame)
                    except ProtocolError:
                        continue
                    if isinstance(msg, ActorCall):
                        mailbox[msg.instance] += 1
            actors = [ActorNode(a.id, a.name, a.cls_name, a.state, instance, mailbox.get(instance, 0),
                                w.host.instances[instance].calls if instance in w.host.instances else a.calls)
                      for a, instance in hosted.get(w.ident, [])]
            workers.append(WorkerNode(w.id, w.pid, "sim", w.running, 0.0, 0, len(w.inbox) if w.running else 0,
                                      w.tasks_done, len(w.inflight), actors))
        return RuntimeTree(workers)

    # ---- public API: state ------------------------------------------------------------------------

    @property
    def n_workers(self) -> int:
        """Number of live workers."""
        return len(self.worker_pids())

    def worker_pids(self) -> dict[str, int]:
        """Live worker ids and their (made-up) process ids."""
        return {w.id: w.pid for w in self._workers.values() if w.alive}

    def stats(self) -> RuntimeStats:
        """The same counters as :meth:`phalanx.Runtime.stats`."""
        c = self._counters
        o = self.outcomes
        ch = self._channels
        return RuntimeStats(
            workers=[WorkerStats(w.id, w.pid, w.alive, w.ready, len(w.inflight), w.tasks, w.items, w.busy, "sim",
                                 False, w.tags)
                     for w in self._workers.values()],
            tasks_submitted=c["tasks_submitted"], tasks_completed=o.tasks_completed,
            tasks_failed=o.tasks_failed, items_completed=o.items_completed, retried=o.retried,
            skipped=o.skipped, redelivered=o.redelivered, duplicates_dropped=o.duplicates_dropped,
            late_results_dropped=o.late_results_dropped,
            frames_dropped=c["frames_dropped"] + (ch.frames_dropped if ch is not None else 0),
            channel_messages_dropped=ch.channel_messages_dropped if ch is not None else 0,
            channel_redelivered=ch.channel_redelivered if ch is not None else 0,
            worker_deaths=c["worker_deaths"], worker_restarts=c["worker_restarts"],
            workers_recycled=c["workers_recycled"], jobs_open=len(self._jobs), workers_lost=c["workers_lost"],
        )

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def broken(self) -> BaseException | None:
        """Why the runtime broke (too many worker deaths), or None."""
        return self._broken

    # ---- ending ------------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, timeout: float | None = None) -> None:
        """Stop: optionally run until queued work is done, then fail what is left. Idempotent."""
        if self._closed:
            return
        if wait and self._broken is None:
            self.settle(timeout)
        self._closed = True
        jobs = list(self._jobs.values())
        self._jobs.clear()
        self.routing.pending.clear()
        self.routing.unrouted.clear()
        closed = RuntimeClosedError("the runtime was shut down before this job finished")
        for job in jobs:
            job.fail(closed)
        for w in self._workers.values():
            w.running = False
            w.alive = False
            w.inbox.clear()
        self._live.clear()
        if self._channels is not None:
            self._channels.close()
        self._record("shutdown")

    def __enter__(self) -> SimRuntime:
        return self

    if not TYPE_CHECKING:  # mypy keeps checking attribute names; users get a reason at run time

        def __getattr__(self, name: str) -> NoReturn:
            reason = _NOT_MODELLED.get(name)
            if reason is None:
                raise AttributeError(f"'SimRuntime' object has no attribute {name!r}")
            raise AttributeError(f"SimRuntime has no {name!r}: {reason} (docs/testing.md lists what "
                                 "SimRuntime models; use a real phalanx.Runtime for this)")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown(wait=exc_type is None)
