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
Not modelled: channels (``lease``), remote
workers (``address``, ``wait_for_workers``); asking for them raises an error
that says so.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, TypeVar, cast, overload

from .. import worker as _worker_module
from ..actors.events import ActorEvent as Event
from ..actors.host import ActorHost
from ..actors.events import Failed, RestartFailed, Started, Stopped
from ..actors.ref import ActorRef
from ..actors.system import ActorNode, RuntimeTree, WorkerNode, settle_call
from ..config import Config
from ..directives import Directive, Fold, IndexedChain
from ..directives import Chain as _Chain
from ..core.outcomes import Outcomes
from ..core.routing import Routing
from ..core.actors import TERMINAL, advance, least_loaded, may_restart, reply_of, return_type
from ..core.execute import TaskRunner
from ..core.tasks import SKIPPED, Delivery, Job, Task
from ..driver import RuntimeStats, WorkerStats
from ..errors import (
    ActorDiedError,
    EncodeError,
    ProtocolError,
    RuntimeBrokenError,
    RuntimeClosedError,
    TaskCancelledError,
    TaskTimeoutError,
    Transient,
    WorkerCrashedError,
)
from ..core.window import COMPLETE, ENDED, FAILED, READY, ChunkSizer, MapWindow, outcome_error
from ..jobs import MISSING, Future, _length, chain_options, fold_on, options_for
from ..policy import DEFAULT_TAG, FatalStrategy, RetryStrategy, TaskOptions, check_tag
from ..registry.actors import actor_name_of, actor_type_hint, resolve_actor
from ..runtime import _routed
from ..registry.operations import Operation, driver_operation, name_of, resolve
from ..transport.codec import convert, decode_driver, decode_inbox, encode, error_info, rebuild_error
from ..transport.messages import (
    ActorCall,
    ActorEvent,
    ActorState,
    Call,
    Chunk,
    Err,
    ErrorInfo,
    Ok,
    Outcome,
    Results,
    SaveActor,
    SpawnActor,
    Stop,
    StopActor,
)
from .faults import Fault, FaultEngine, resolve_plan

__all__ = ["SimRuntime", "SimJobOptions", "SimMapIterator", "SimJobHandle", "HangError", "sleep"]

A = TypeVar("A")
P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
Y = TypeVar("Y")


#: virtual seconds from a worker's death to the driver noticing it
NOTICE_DELAY = 0.0
#: virtual seconds a replacement worker takes to start and become ready
START_DELAY = 0.01
#: steps one wait may take before the simulation is declared runaway
MAX_STEPS = 2_000_000


#: members of phalanx.Runtime a SimRuntime does not model, and why (raised as AttributeError)
_NOT_MODELLED = {
    "lease": "channels (rt.lease) are not modelled",
    "wait_for_workers": "simulated workers are ready at once and remote workers are not modelled",
    "address": "a SimRuntime listens nowhere: remote workers are not modelled",
    "endpoints": "a SimRuntime has no sockets",
}


class HangError(TaskTimeoutError):
    """Nothing more can happen in the simulation and a call still waits.

    On a real runtime the same call would hang (or wait for its whole
    timeout): a violation of phalanx's "no hang" invariant, or of the
    program's own assumptions (a dropped message nobody retries).
    """


class _Elapsed:
    """Virtual time inside the task a simulated worker runs (``sleep`` adds to it)."""

    __slots__ = ("slept", "late_at", "late_values", "overran")

    def __init__(self) -> None:
        self.slept = 0.0
        #: when a call overran the task's timeout (seconds into the task; -1: none did)
        self.late_at = -1.0
        #: the values done by then (what the timeout error carries)
        self.late_values: list[Any] = []
        #: how long that call ran in all
        self.overran = 0.0


#: the tasks simulated workers run right now, innermost last (see ``sleep``)
_RUNNING: list[_Elapsed] = []


def sleep(seconds: float) -> None:
    """Sleep inside an operation: virtual time on a SimRuntime, real time elsewhere.

    Use it in operations under test instead of ``time.sleep`` so that
    timeouts and slow tasks are simulated without waiting. A call that
    sleeps past its task's per-call timeout is noticed as a real worker's
    control thread would: the timeout is reported with the values done
    before it, and the task is flagged to abort.
    """
    if not _RUNNING:
        time.sleep(seconds)
        return
    elapsed = _RUNNING[-1]
    elapsed.slept += max(0.0, seconds)
    ctx = _worker_module._current
    if ctx is None or ctx.timeout <= 0:
        return
    ran = elapsed.slept - ctx.started
    if elapsed.late_at < 0 and ran > ctx.timeout:
        elapsed.late_at = ctx.started + ctx.timeout
        elapsed.late_values = list(ctx.values)
        ctx.aborted = True
    if elapsed.late_at >= 0 and ctx.started + ctx.timeout == elapsed.late_at:
        elapsed.overran = max(elapsed.overran, ran)


# --------------------------------------------------------------------------- #
# Driver-side records (mirror phalanx.driver.Task / Job)
# --------------------------------------------------------------------------- #


class _Worker:
    """A simulated worker process and the driver's record of it."""

    def __init__(self, worker_id: str, pid: int) -> None:
        self.id = worker_id
        self.ident = worker_id.encode()
        self.pid = pid
        #: the process runs (False once killed or exited)
        self.running = True
        #: the driver's view (False once it noticed the death)
        self.alive = True
        self.ready = False
        self.free = 0
        self.inflight: dict[tuple[int, int], Task] = {}
        self.inbox: deque[bytes] = deque()
        #: frames on their way to the driver: (available at, identity, frame)
        self.outbox: deque[tuple[float, bytes, bytes]] = deque()
        self.busy_until = 0.0
        self.tasks = 0
        self.items = 0
        self.busy = 0.0
        self.tasks_done = 0
        self.dispatched = 0
        self.expect_kill = False
        self.retiring = False
        self.lost = False
        self.terminated: set[int] = set()
        #: the worker tags it serves
        self.tags: tuple[str, ...] = (DEFAULT_TAG,)
        #: the actors it hosts (phalanx.actors.host, as on a real worker; set by SimRuntime._spawn)
        self.host: ActorHost
        #: when what its actor host sends now reaches the link (virtual time)
        self.at = 0.0


# --------------------------------------------------------------------------- #
# Futures and iterators that run the scheduler while they wait
# --------------------------------------------------------------------------- #


class SimFuture(Future[T]):
    """A :class:`phalanx.Future` whose waits run the simulation."""

    _sim: SimRuntime | None = None

    def result(self, timeout: float | None = None) -> T:
        if not self.done() and self._sim is not None:
            self._sim._wait_for(self.done, timeout, "a future")
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done() and self._sim is not None:
            self._sim._wait_for(self.done, timeout, "a future")
        return super().exception(timeout=0)

    def __await__(self) -> Generator[Any, None, T]:
        yield from ()
        return self.result()


class _FutureSink:
    __slots__ = ("future", "op", "job", "sim")

    def __init__(self, future: SimFuture[Any], op: Operation | None, sim: SimRuntime) -> None:
        self.future = future
        self.op = op
        self.job: Job | None = None
        self.sim = sim

    def cancel(self) -> None:
        if self.job is not None:
            self.sim._close_job(self.job)

    def abort(self) -> None:
        """A simulated call is never aborted while it runs (no worker process to flag)."""

    def deliver(self, seq: int, outcome: Delivery) -> None:
        fut = self.future
        if fut.done():
            return
        try:
            if isinstance(outcome, Ok):
                fut.set_result(outcome.value if self.op is None else self.op.convert_result(outcome.value))
            else:
                fut.set_exception(outcome_error(outcome))
        except concurrent.futures.InvalidStateError:
            pass
        except Exception as exc:
            try:
                fut.set_exception(exc)
            except concurrent.futures.InvalidStateError:
                pass

    def fail(self, exc: BaseException) -> None:
        try:
            if not self.future.done():
                self.future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass


class _Lease:
    """A job whose outcomes queue up for one consumer (phalanx.jobs._Lease, waiting on the scheduler)."""

    def __init__(self, sim: SimRuntime, op_name: str, options: TaskOptions | None) -> None:
        self.sim = sim
        self.queue: deque[tuple[int, Delivery]] = deque()
        self.job = sim._open_job(op_name, self._deliver, self._fail, options=options)

    def _deliver(self, seq: int, outcome: Delivery) -> None:
        self.queue.append((seq, outcome))

    def _fail(self, exc: BaseException) -> None:
        self.queue.append((-1, exc))

    def get(self, deadline: float | None) -> tuple[int, Delivery]:
        if not self.queue:
            timeout = None if deadline is None else max(0.0, deadline - self.sim.now)
            try:
                self.sim._wait_for(lambda: bool(self.queue), timeout, "results")
            except HangError:
                raise
            except TimeoutError:
                raise TaskTimeoutError("timed out waiting for results") from None
        return self.queue.popleft()


class SimMapIterator(Iterator[R], Generic[R]):
    """Results of :meth:`SimRuntime.map` (the same contract as :class:`phalanx.MapIterator`).

    The window, the ordered buffer and conversion are the core's
    (:class:`phalanx.core.window.MapWindow`), the same code as a real map's.
    """

    def __init__(self, sim: SimRuntime, fn: Callable[..., R] | str, iterables: tuple[Iterable[Any], ...],
                 chunksize: int | None, ordered: bool, timeout: float | None, workers: int,
                 options: TaskOptions | None = None, stages: Sequence[Callable[..., Any] | str] = (),
                 indexed: bool = False) -> None:
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        self._op_name = name_of(fn)
        op = driver_operation(fn)
        self._done = True
        star = len(iterables) > 1
        source: Iterator[Any] = zip(*iterables) if star else iter(iterables[0])
        sizer = ChunkSizer(chunksize, _length(iterables), workers)
        self._sim = sim
        self._deadline = None if timeout is None else sim.now + timeout
        self._lease = _Lease(sim, self._op_name,
                             chain_options([*(driver_operation(stage) for stage in stages), op], options))
        convert = None if op is None or op.returns is Any or op.returns is object else op.convert_result
        self._w = MapWindow(self._lease.job, self._op_name, [name_of(stage) for stage in stages], source, star,
                            sizer, workers, ordered, indexed, convert,
                            None if op is None or convert is None else op.convert_results)
        self._done = False
        try:
            self._w.fill(sim.now)
            self._send()
        except BaseException:
            self.close()
            raise

    def _send(self) -> None:
        if self._w.outbox:
            self._sim._submit_tasks(self._lease.job, self._w.take())

    @property
    def skipped(self) -> list[tuple[int, BaseException]]:
        """``(input index, error)`` of every item dropped under ``on_fatal=Ignore``."""
        return self._w.skipped()

    @property
    def items_read(self) -> int:
        """Items read from the input so far (all of them once the map has ended)."""
        return self._w.read

    def __iter__(self) -> SimMapIterator[R]:
        return self

    def __next__(self) -> R:
        w = self._w
        while True:
            if w.ready:
                return w.ready.popleft()  # type: ignore[no-any-return]
            state = w.step(self._sim.now)
            self._send()
            if state == READY:
                continue
            if state == FAILED:
                failure = w.take_error()
                self.close()
                raise failure
            if state == ENDED:
                self._done = True
                raise StopIteration
            if state == COMPLETE:
                self._done = True
                self._sim._close_job(self._lease.job)
                raise StopIteration
            try:
                seq, outcome = self._lease.get(self._deadline)
            except BaseException:
                self.close()
                raise
            if seq < 0:
                self._done = w.done = True
                raise outcome_error(outcome)
            _, drop = w.received(seq, outcome, self._sim.now)
            if drop is not None:
                self._sim._drop_after(self._lease.job, drop)
            self._send()

    def close(self) -> None:
        """Stop the job: queued tasks are dropped."""
        if not self._done:
            self._done = True
            self._w.close()
            self._sim._close_job(self._lease.job, terminate=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class SimJobHandle(Generic[Y, R]):
    """What :meth:`SimRuntime.run` returns: the :class:`phalanx.JobHandle` contract, simulated.

    Iterate it for the results (a chain's in input order, an indexed
    chain's ``(index, result)`` pairs as they finish, a fold's one value),
    or call ``result()`` for all of them; not both. ``cancel()``, ``done()``,
    ``cancelled()``, ``with`` and ``await`` work as on a real handle. As
    everywhere on a SimRuntime, nothing runs until it is waited on, and
    ``timeout`` is virtual; a ``result(timeout)`` that expires ends the job
    (a real handle's job runs on).
    """

    def __init__(self, sim: SimRuntime, directive: Directive[Any], chunksize: int | None, timeout: float | None,
                 options: TaskOptions | None) -> None:
        if not isinstance(directive, Directive):
            raise TypeError(f"run() needs a directive (Literal(...).map(...)...), got {type(directive).__name__}")
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize}")
        sim._check_open()
        items, stages = directive._items, directive._stages
        self._indexed = isinstance(directive, IndexedChain)
        self._timeout = timeout
        self._it: Iterator[Any] | None = None
        self._fold: Callable[[float | None], Any] | None = None
        self._has_result = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._ended = False
        self._iterated = False
        self._fold_yielded = False
        if isinstance(directive, Fold):
            monoid = directive._monoid
            resolved = chain_options([*(driver_operation(st) for st in stages), driver_operation(monoid)], options)
            if resolved is not None and resolved.on_fatal is FatalStrategy.IGNORE:
                raise ValueError("fold needs every item: on_fatal=Ignore is for map")
            self._fold = lambda limit: sim._fold(monoid, items, MISSING, chunksize, limit, options, stages=stages)
        elif stages:
            self._it = SimMapIterator(sim, stages[-1], (items,), chunksize, not self._indexed, timeout,
                                      sim.config.workers, options, stages=stages[:-1], indexed=self._indexed)
        else:
            self._it = enumerate(items) if self._indexed else iter(items)

    def done(self) -> bool:
        """True once the job has ended: every result received, or failed, or cancelled."""
        return self._has_result or self._ended or self._cancelled or self._error is not None

    def cancelled(self) -> bool:
        """True if :meth:`cancel` ended the job."""
        return self._cancelled

    def cancel(self) -> bool:
        """End the job (its queued tasks are dropped); False if it had already ended."""
        if self.done():
            return False
        self._cancelled = True
        if isinstance(self._it, SimMapIterator):
            self._it.close()
        return True

    def _raise_if_over(self) -> None:
        if self._error is not None:
            raise self._error
        if self._cancelled:
            raise TaskCancelledError("the job was cancelled")

    def result(self, timeout: float | None = None) -> R:
        """Run the simulation until the job is done; its result (the list, or the folded value)."""
        if self._has_result:
            return self._result  # type: ignore[no-any-return]
        self._raise_if_over()
        if self._iterated:
            raise RuntimeError("some results were already consumed by iterating over the job: "
                               "iterate over it to the end, or call result() without iterating")
        try:
            if self._fold is not None:
                limits = [t for t in (timeout, self._timeout) if t is not None]
                limit = min(limits) if limits else None
                value: Any = self._fold(limit)
            else:
                assert self._it is not None
                if timeout is not None and isinstance(self._it, SimMapIterator):
                    deadline = self._it._sim.now + timeout
                    old = self._it._deadline
                    self._it._deadline = deadline if old is None else min(old, deadline)
                value = list(self._it)
                if self._indexed:
                    value = [v for _, v in sorted(value, key=lambda pair: pair[0])]
        except Exception as exc:
            self._error = exc
            raise
        self._has_result, self._result = True, value
        return value  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[Y]:
        if self._has_result and self._fold is None:
            done: Iterable[Any] = enumerate(self._result) if self._indexed else self._result
            return iter(done)
        return self

    def __next__(self) -> Y:
        if self._fold is not None:
            if self._fold_yielded:
                raise StopIteration
            value = self.result()
            self._fold_yielded = True
            return value  # type: ignore[return-value]
        if self._has_result or self._ended:
            raise StopIteration
        self._raise_if_over()
        assert self._it is not None
        try:
            item = next(self._it)
        except StopIteration:
            self._ended = True
            raise
        except Exception as exc:
            self._error = exc
            raise
        self._iterated = True
        return item  # type: ignore[no-any-return]

    def __await__(self) -> Generator[Any, None, R]:
        yield from ()
        return self.result()

    def __enter__(self) -> SimJobHandle[Y, R]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.done():
            self.cancel()


# --------------------------------------------------------------------------- #
# Actors (driver side): phalanx.actors.system's waits, on the scheduler;
# the lifecycle, supervision and placement are phalanx.core.actors'
# --------------------------------------------------------------------------- #

_TERMINAL = TERMINAL
#: virtual seconds a spawn, restart or save may take before it fails
ACTOR_TIMEOUT = 60.0


class _SimActor:
    def __init__(self, actor_id: int, cls_name: str, cls: type | None, args: list[Any],
                 kwargs: dict[str, Any] | None, name: str | None, detached: bool, policy: str,
                 every: int, interval: float) -> None:
        self.id = actor_id
        self.cls_name = cls_name
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.name = name
        self.detached = detached
        self.policy = policy
        self.every = every
        self.interval = interval
        self.state = "starting"
        #: the worker tag it keeps to across restarts
        self.tag = DEFAULT_TAG
        self.instance = 0
        self.worker = b""
        self.job: Job | None = None
        self.seqs = itertools.count()
        self.futures: dict[int, tuple[SimFuture[Any], str]] = {}
        self.held: deque[tuple[int, str, list[Any], dict[str, Any] | None]] = deque()
        self.events: list[Event] = []
        self.checkpoint: Any = None
        self.has_checkpoint = False
        self.restarts: deque[float] = deque()
        #: the death of the old instance's process, seen during a hot restart
        self.lost: ActorDiedError | None = None
        self.refs = 0
        self.calls = 0
        self.stop_when_running = False

    def take_lost(self) -> ActorDiedError | None:
        """The death of the old instance's process noted during a hot restart (then cleared)."""
        lost, self.lost = self.lost, None
        return lost


class _Actors:
    """The actor system of a SimRuntime; duck-types ``phalanx.actors.system.ActorSystem`` for ``ActorRef``."""

    def __init__(self, sim: SimRuntime, max_restarts: int = 3, restart_window: float = 60.0) -> None:
        self.sim = sim
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.actors: dict[int, _SimActor] = {}
        self.by_instance: dict[int, _SimActor] = {}
        self.names: dict[str, _SimActor] = {}
        self.ids = itertools.count(1)
        self.instances = itertools.count(1)
        self.nonces = itertools.count(1)
        #: (kind, number) -> (worker it waits on, callback)
        self.waiting: dict[tuple[str, int], tuple[bytes, Callable[[Any], None]]] = {}
        self.homeless: deque[_SimActor] = deque()

    # ---- spawning ---------------------------------------------------------------

    def spawn(self, cls: type | str, args: tuple[Any, ...], kwargs: dict[str, Any], *, on: str | None,
              name: str | None, detached: bool, restart_policy: str, checkpoint_every: int,
              checkpoint_interval: float, timeout: float | None) -> _SimActor:
        if restart_policy not in ("never", "on-failure"):
            raise ValueError(f"restart_policy must be 'never' or 'on-failure', got {restart_policy!r}")
        if detached and not name:
            raise ValueError("a detached actor needs a name= to be found again")
        cls_name = actor_name_of(cls)
        encode([list(args), kwargs], f"the arguments of {cls_name}")
        actor = _SimActor(next(self.ids), cls_name, cls if isinstance(cls, type) else None, list(args),
                          kwargs or None, name, detached, restart_policy, checkpoint_every, checkpoint_interval)
        if name is not None:
            if name in self.names and self.names[name].state not in _TERMINAL:
                raise ValueError(f"an actor named {name!r} already exists")
            self.names[name] = actor
        self.actors[actor.id] = actor
        actor.job = self.sim._open_job(f"{cls_name} (actor {actor.id})", self._deliver_for(actor),
                                       self._fail_for(actor))
        worker = self._place(on, exclude=None)
        held = self.sim._workers[worker].tags
        actor.tag = on if on is not None and on in held else DEFAULT_TAG if DEFAULT_TAG in held else held[0]
        box: list[BaseException | None] = []
        self._start(actor, worker, False, None, box.append, timeout)
        self._wait(box, timeout, f"actor {actor.id} to start")
        error = box[0]
        if error is not None:
            self._end(actor, "failed", error)
            raise error
        self._emit(actor, Started(worker.decode()))
        self._flush(actor)
        return actor

    def _wait(self, box: list[Any], timeout: float | None, what: str) -> None:
        try:
            self.sim._wait_for(lambda: bool(box), ACTOR_TIMEOUT if timeout is None else timeout, what)
        except TimeoutError:
            pass
        if not box:
            box.append(TaskTimeoutError(f"timed out waiting for {what}"))

    def _place(self, on: str | None, exclude: bytes | None, tag: str = DEFAULT_TAG) -> bytes:
        """A live worker: the one named ``on``, else one of the tag ``on`` (or ``tag``), least loaded."""
        live = self.sim._live_workers()
        if on is not None and on.encode() in live:
            return on.encode()
        tag = on if on is not None else tag
        live = {w.ident: len(w.inflight) for w in self.sim._live if tag in w.tags}
        if not live:
            raise LookupError(f"no live worker or worker of tag {tag!r}; live: {self.sim.worker_tags()}")
        return least_loaded(live, [a.worker for a in self.actors.values() if a.state not in _TERMINAL], exclude)

    def _start(self, actor: _SimActor, worker: bytes, restored: bool, state: Any,
               done: Callable[[BaseException | None], None], timeout: float | None) -> None:
        """Create a new instance on ``worker``; ``done(None)`` once started, else ``done(error)``."""
        instance = next(self.instances)
        key = ("event", instance)
        self.by_instance[instance] = actor
        finished: list[bool] = []
        timer: list[list[bool]] = []

        def answer(value: Any) -> None:
            if finished:
                return
            finished.append(True)
            if timer:
                self.sim._cancel(timer[0])
            self.waiting.pop(key, None)
            kind, error = value
            if kind != "started":
                done(error if error is not None else ActorDiedError("the actor failed to start"))
                return
            old_worker, old_instance = actor.worker, actor.instance
            actor.worker, actor.instance = worker, instance
            actor.state = advance(actor.state, "started")
            if old_instance and old_worker:
                self.sim._send_to(old_worker, encode(StopActor(old_instance, quiet=True)))
            done(None)

        self.waiting[key] = (worker, answer)
        msg = SpawnActor(instance, actor.cls_name, actor.args, actor.kwargs, state, restored,
                         actor.every, actor.interval)
        if not self.sim._send_to(worker, encode(msg, f"the state of actor {actor.id}")):
            answer(("failed", ActorDiedError(f"worker {worker.decode()} is gone")))
            return
        limit = ACTOR_TIMEOUT if timeout is None else timeout
        timer.append(self.sim._timer(
            limit, f"actor {actor.id} start timeout",
            lambda: answer(("failed", TaskTimeoutError(f"timed out waiting for actor {actor.id} to start")))))

    # ---- calls ------------------------------------------------------------------

    def _deliver_for(self, actor: _SimActor) -> Callable[[int, Delivery], None]:
        def deliver(seq: int, outcome: Delivery) -> None:
            entry = actor.futures.pop(seq, None)
            actor.calls += 1
            if entry is not None:
                fut, method = entry
                settle_call(fut, outcome, self.convert_result, actor, method)

        return deliver

    def _fail_for(self, actor: _SimActor) -> Callable[[BaseException], None]:
        def fail(exc: BaseException) -> None:
            self._end(actor, "failed", exc, emit=False)

        return fail

    def call(self, actor: _SimActor, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> SimFuture[Any]:
        if method.startswith("_"):
            raise AttributeError(f"actor methods starting with '_' cannot be called remotely: {method!r}")
        fut: SimFuture[Any] = self.sim._future()
        fut.set_running_or_notify_cancel()
        a, kw = list(args), kwargs or None
        encode([a, kw], f"the arguments of {actor.cls_name}.{method}")
        if actor.state in _TERMINAL:
            fut.set_exception(ActorDiedError(f"actor {actor.id} ({actor.cls_name}) is {actor.state}"))
            return fut
        seq = next(actor.seqs)
        actor.futures[seq] = (fut, method)
        actor.held.append((seq, method, a, kw))
        if actor.state == "running":
            self._flush(actor)
        return fut

    def _flush(self, actor: _SimActor) -> None:
        job = actor.job
        assert job is not None
        while actor.held and actor.state in ("running", "stopping"):
            seq, method, a, kw = actor.held.popleft()
            msg = ActorCall(job.id, seq, 0, actor.instance, method, a, kw)
            if not self.sim._submit_directed(job, msg, encode(msg), actor.worker):
                entry = actor.futures.pop(seq, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_exception(ActorDiedError(f"the worker of actor {actor.id} is gone"))
        if actor.stop_when_running and actor.state == "running":
            actor.stop_when_running = False
            self._stop_now(actor)

    def _emit(self, actor: _SimActor, event: Event) -> None:
        actor.events.append(event)
        self.sim._record("event", actor.id, type(event).__name__)

    # ---- restart --------------------------------------------------------------------

    def restart(self, actor: _SimActor, on: str | None, timeout: float | None) -> bool:
        if actor.state != "running":
            raise ActorDiedError(f"actor {actor.id} is {actor.state}; only a running actor restarts")
        actor.state = advance(actor.state, "restart")
        actor.lost = None
        old_worker, old_instance = actor.worker, actor.instance
        nonce = next(self.nonces)
        saved: list[tuple[Any, BaseException | None]] = []
        key = ("state", nonce)
        self.waiting[key] = (old_worker, saved.append)
        if not self.sim._send_to(old_worker, encode(SaveActor(old_instance, nonce))):
            saved.append((None, ActorDiedError(f"worker {old_worker.decode()} is gone")))
        else:
            self._wait(saved, timeout, f"actor {actor.id} to save")
        self.waiting.pop(key, None)
        first = saved[0]
        state, error = first if isinstance(first, tuple) else (None, first)
        if error is None:
            try:
                target = self._place(on, exclude=old_worker, tag=actor.tag)
            except BaseException as exc:
                error = exc
            else:
                box: list[BaseException | None] = []
                self._start(actor, target, True, state, box.append, timeout)
                self._wait(box, timeout, f"actor {actor.id} to start")
                error = box[0]
                if error is None:
                    actor.lost = None  # the new instance took over: the old one is moot
                    actor.checkpoint, actor.has_checkpoint = state, True
                    self._emit(actor, Started(target.decode(), restored=True))
                    self._flush(actor)
                    return True
        died = actor.take_lost()
        if died is None:
            if actor.state == "restarting" and self.sim._is_live(old_worker):
                actor.state = advance(actor.state, "revert")
                self._emit(actor, RestartFailed(error))
                self._flush(actor)
                return False
            self._end(actor, "failed", error)
            return False
        # The old instance's process died meanwhile: nothing to revert to; supervise that death.
        lost = ActorDiedError(f"{died}, during a hot restart that could not take over: {error}")
        lost.__cause__ = error
        self._instance_died(actor, lost)
        self.rehome()
        return False

    # ---- ending -------------------------------------------------------------------

    def stop(self, actor: _SimActor) -> None:
        if actor.state in _TERMINAL or actor.state == "stopping":
            return
        if actor.state != "running":
            try:
                self.sim._wait_for(lambda: actor.state not in ("starting", "restarting"), ACTOR_TIMEOUT,
                                   f"actor {actor.id} to be running")
            except TimeoutError:
                return
        if actor.state != "running":
            return
        self._stop_now(actor)

    def _stop_now(self, actor: _SimActor) -> None:
        self._flush(actor)
        actor.state = advance(actor.state, "stop")
        if not self.sim._send_to(actor.worker, encode(StopActor(actor.instance))):
            self._end(actor, "stopped", None)

    def join(self, actor: _SimActor, timeout: float | None) -> None:
        try:
            self.sim._wait_for(lambda: actor.state in _TERMINAL, timeout, f"actor {actor.id} to end")
        except HangError:
            raise
        except TimeoutError:
            raise TaskTimeoutError(f"actor {actor.id} is still {actor.state}") from None

    def _end(self, actor: _SimActor, state: str, error: BaseException | None, emit: bool = True) -> None:
        if actor.state in _TERMINAL:
            return
        actor.state = advance(actor.state, state)
        futures = [fut for fut, _ in actor.futures.values()]
        actor.futures.clear()
        actor.held.clear()
        if emit:
            self._emit(actor, Stopped() if state == "stopped" else Failed(error or ActorDiedError("failed")))
        died = ActorDiedError(f"actor {actor.id} ({actor.cls_name}) {state}")
        for fut in futures:
            if not fut.done():
                try:
                    fut.set_exception(died)
                except concurrent.futures.InvalidStateError:
                    pass
        if actor.job is not None:
            self.sim._close_job(actor.job)

    def events(self, actor: _SimActor, timeout: float | None) -> Iterator[Event]:
        index = 0
        while True:
            if len(actor.events) <= index and actor.state not in _TERMINAL:
                try:
                    self.sim._wait_for(lambda: len(actor.events) > index or actor.state in _TERMINAL, timeout,
                                       f"an event from actor {actor.id}")
                except TimeoutError:
                    raise TaskTimeoutError(f"no event from actor {actor.id} within {timeout} s") from None
            batch = actor.events[index:]
            done = actor.state in _TERMINAL
            yield from batch
            index += len(batch)
            if done and index >= len(actor.events):
                return

    def retain(self, actor: _SimActor) -> None:
        actor.refs += 1

    def release(self, actor: _SimActor) -> None:
        actor.refs -= 1
        if actor.refs <= 0 and not actor.detached and not self.sim._closed:
            if actor.state == "running":
                self._stop_now(actor)
            elif actor.state in ("starting", "restarting"):
                actor.stop_when_running = True

    def get(self, name: str) -> _SimActor:
        actor = self.names.get(name)
        if actor is None or actor.state in _TERMINAL:
            raise LookupError(f"no actor named {name!r}")
        return actor

    # ---- messages from workers ------------------------------------------------------

    def on_message(self, worker: bytes, msg: ActorEvent | ActorState) -> None:
        what, number, value = reply_of(msg)
        if what in ("checkpoint", "stopped", "nothing"):
            actor = self.by_instance.get(number)
            if actor is None:
                return
            if what == "stopped":
                self._end(actor, "stopped", None)
            elif what == "checkpoint" and self.sim._is_live(worker):
                if actor.instance == number and actor.worker == worker:
                    actor.checkpoint, actor.has_checkpoint = value, True
            return
        key = (what, number)
        waiting = self.waiting.pop(key, None)
        if waiting is not None:
            waiting[1](value)

    def on_worker_exit(self, worker_id: str, exitcode: int | None) -> None:
        ident = worker_id.encode()
        gone = ActorDiedError(f"worker {worker_id} died (exit code {exitcode})")
        for key, (on, callback) in list(self.waiting.items()):
            if on == ident:
                del self.waiting[key]
                callback((None, gone) if key[0] == "state" else ("failed", gone))
        hosted = [a for a in self.actors.values() if a.worker == ident and a.state not in _TERMINAL]
        for actor in hosted:
            died = ActorDiedError(
                f"the process of actor {actor.id} ({actor.cls_name}) on worker {worker_id} died "
                f"(exit code {exitcode})"
            )
            if actor.state == "restarting":
                actor.lost = died  # a hot restart in progress settles the loss itself
                continue
            self._instance_died(actor, died)
        self.rehome()

    def _instance_died(self, actor: _SimActor, died: ActorDiedError) -> None:
        """Queue a supervised restart of ``actor``, or end it as failed (then call :meth:`rehome`)."""
        if actor.policy != "on-failure" or not may_restart(
                actor.restarts, self.sim.now, self.max_restarts, self.restart_window):
            self._end(actor, "failed", died)
            return
        actor.state = advance(actor.state, "died")
        self._emit(actor, Failed(died, final=False))
        self.homeless.append(actor)

    def rehome(self) -> None:
        while self.homeless and self.sim._live_workers():
            actor = self.homeless.popleft()
            try:
                worker = self._place(None, exclude=None, tag=actor.tag)
            except BaseException as exc:
                self._end(actor, "failed", exc)
                continue

            def done(error: BaseException | None, actor: _SimActor = actor, worker: bytes = worker) -> None:
                if error is not None:
                    self._end(actor, "failed", error)
                    return
                self._emit(actor, Started(worker.decode(), restored=actor.has_checkpoint))
                self._flush(actor)

            self._start(actor, worker, actor.has_checkpoint, actor.checkpoint, done, None)

    # ---- inspect ----------------------------------------------------------------------

    def nodes(self) -> dict[bytes, list[tuple[_SimActor, int]]]:
        out: dict[bytes, list[tuple[_SimActor, int]]] = {}
        for a in self.actors.values():
            if a.state not in _TERMINAL:
                out.setdefault(a.worker, []).append((a, a.instance))
        return out

    def convert_result(self, actor: _SimActor, method: str, value: Any) -> Any:
        typ = return_type(actor.cls, method)
        if typ is Any:
            return value
        try:
            return convert(value, typ)
        except Exception:
            return value


# --------------------------------------------------------------------------- #
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
    ) -> None:
        tags = {check_tag(tag): count for tag, count in workers.items()} if isinstance(workers, dict) else {}
        total = sum(tags.values()) if isinstance(workers, dict) else workers
        self.config = Config(workers=total, tags=tags, credits=credits,
                             max_attempts=max_attempts,
                             restart_limit=restart_limit, restart_window=restart_window,
                             abort_grace=abort_grace, heartbeat_timeout=heartbeat_timeout,
                             route_timeout=route_timeout)
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
        self._workers: dict[bytes, _Worker] = {}
        #: pending tasks per worker tag, live workers per tag, credits (phalanx.core.routing)
        self.routing: Routing[_Worker] = Routing(self._jobs)
        self._live: list[_Worker] = self.routing.live
        #: a timer for the route timeout is set
        self._route_timer = False
        self._worker_ids = itertools.count(1)
        self._pids = itertools.count(100_001)
        self._timers: list[tuple[float, int, str, Callable[[], None], list[bool]]] = []
        self._timer_order = itertools.count()
        self._counters: Counter[str] = Counter()
        #: the core's outcome resolution, crash attribution and restart intensity (phalanx.core)
        self.outcomes = Outcomes(self._jobs, max_attempts, restart_limit, restart_window)
        self._actors = _Actors(self)
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

    def _choices(self) -> list[tuple[str, _Worker | None]]:
        now = self.now
        self._purge_timers()
        choices: list[tuple[str, _Worker | None]] = []
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
            self._run(w)
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

    def _spawn(self, tags: tuple[str, ...] = (DEFAULT_TAG,)) -> _Worker:
        w = _Worker(f"w{next(self._worker_ids)}", next(self._pids))
        w.tags = tags
        w.host = ActorHost(w.id, lambda msg: self._host_send(w, msg), self._runner.call, lambda: self.now)
        self._workers[w.ident] = w
        self._record("spawn", w.id)
        return w

    def _ready(self, w: _Worker) -> None:
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

    def _kill(self, w: _Worker, exitcode: int = -9) -> None:
        if not w.running:
            return
        self._record("kill", w.id)
        w.running = False
        w.inbox.clear()
        w.host.instances.clear()
        if self.engine is not None:
            self.engine.forget_worker(w.ident)
        self._timer(NOTICE_DELAY, f"{w.id} exit noticed", lambda: self._on_exit(w, exitcode))

    def _on_exit(self, w: _Worker, exitcode: int | None, lost: bool = False) -> None:
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
        self._record("exit", w.id, exitcode, "lost" if lost else ("planned" if planned else "crash"))
        self._dispatch()
        for job, seq, exc in failed:
            self._deliver(job, seq, exc)
        self._actors.on_worker_exit(w.id, exitcode)
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
        order: list[tuple[_Worker, Task]] = []
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

    def _send(self, w: _Worker, frame: bytes) -> None:
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

    def _watch_partition(self, w: _Worker) -> None:
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

    def _on_frame(self, w: _Worker, ident: bytes, frame: bytes) -> None:
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

    def _on_results(self, w: _Worker, msg: Results, side: bool) -> None:
        deliveries: list[tuple[Job, int, Ok | Err]] = []
        if msg.worker != w.id:
            self._counters["frames_dropped"] += 1
            return
        w.busy += msg.busy
        for outcome in msg.outcomes:
            task = w.inflight.pop((outcome.job, outcome.seq), None)
            if task is None:
                self._counters["frames_dropped"] += 1
                continue
            if side:
                w.expect_kill = True
            if w.alive and not w.retiring and not task.directed:
                w.free += 1
            w.tasks += 1
            w.items += task.items
            job = self._jobs.get(outcome.job)
            if job is None:
                self._counters["late_results_dropped"] += 1
                continue
            if outcome.seq not in job.outstanding:
                self._counters["duplicates_dropped"] += 1
                continue
            final = self.outcomes.resolve(job, task, outcome)
            if final is not None:
                deliveries.append((job, outcome.seq, final))
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

    # ---- the worker model ----------------------------------------------------------------

    def _worker_send(self, w: _Worker, msg: Any, at: float, side: bool = False) -> str | None:
        """A worker sends ``msg`` to the driver; returns the engine's kill verdict."""
        frame = encode(msg)
        ident = w.ident + b"!" if side else w.ident
        frames = [frame]
        kill: str | None = None
        if self.engine is not None:
            frames, kill = self.engine.incoming(ident, frame, self.now)
        for f in frames:
            w.outbox.append((at, ident, f))
        return kill


    def _run(self, w: _Worker) -> None:
        """Worker ``w`` handles the next message of its inbox (the core runs its tasks, ActorHost its actors)."""
        frame = w.inbox.popleft()
        try:
            msg = decode_inbox(frame)
        except ProtocolError:
            self._counters["frames_dropped"] += 1
            return
        start = self.now
        if isinstance(msg, (Call, Chunk)):
            self._record("run", w.id, type(msg).__name__, msg.job, msg.seq, msg.attempt)
            outcome, elapsed = self._execute(w, msg)
            duration = elapsed.slept + self.task_time * max(1, _calls(msg, outcome))
            if elapsed.late_at >= 0:
                self._timed_out(w, msg, elapsed, start, duration)
            else:
                self._finish(w, msg, outcome, start, duration)
        elif isinstance(msg, ActorCall):
            self._record("run", w.id, "ActorCall", msg.job, msg.seq, msg.method)
            _RUNNING.append(_Elapsed())
            try:
                outcome = w.host.call(msg)
            finally:
                duration = _RUNNING.pop().slept + self.task_time
            # As a real worker does: the checkpoint goes out before the reply.
            if w.running and w.host.checkpoint_due(msg.instance):
                w.at = start + duration
                w.host.save(msg.instance, 0)
            kill = self._finish(w, msg, outcome, start, duration, defer_kill=True)
            if kill == "after":
                self._doom(w, start + duration)
        elif isinstance(msg, (SpawnActor, SaveActor, StopActor)):
            self._record("run", w.id, type(msg).__name__, msg.instance)
            w.at = self.now + self.task_time
            w.host.handle(msg)
        elif isinstance(msg, Stop):
            w.running = False
            self._timer(NOTICE_DELAY, f"{w.id} exit noticed", lambda: self._on_exit(w, 0))

    def _finish(self, w: _Worker, msg: Call | Chunk | ActorCall, outcome: Outcome, start: float,
                duration: float, defer_kill: bool = False) -> str | None:
        w.tasks_done += 1
        w.busy_until = start + duration
        try:
            encode(outcome)
        except EncodeError as exc:
            name = msg.method if isinstance(msg, ActorCall) else msg.op
            err2 = EncodeError(f"result of {name} cannot be sent: {exc.__cause__ or exc}")
            outcome = Err(outcome.job, outcome.seq, outcome.attempt, error_info(err2))
        kill = self._worker_send(w, Results(w.id, [outcome], duration), start + duration)
        if kill == "now":
            self._kill(w)
            return None
        if kill == "after" and not defer_kill:
            self._doom(w, start + duration)
            return None
        return kill

    def _doom(self, w: _Worker, at: float) -> None:
        """Kill ``w`` once the task it runs is over and sent (it runs nothing else meanwhile)."""
        w.busy_until = math.inf
        self._timer(at - self.now, f"{w.id} killed after its task", lambda: self._kill(w))

    def _execute(self, w: _Worker, task: Call | Chunk) -> tuple[Outcome, _Elapsed]:
        """Run ``task`` with the core's TaskRunner (the same code as a real worker's)."""
        elapsed = _Elapsed()
        if task.job in w.terminated:
            info = error_info(TaskCancelledError(f"job {task.job} was terminated"))
            info = ErrorInfo(type=info.type, message=info.message, args=info.args, traceback="")
            return Err(task.job, task.seq, task.attempt, info), elapsed
        ctx = _worker_module.TaskContext(task.job, task.seq, task.attempt, task.timeout)
        ctx.started = 0.0  # seconds into the task: the runner's clock (see _task_clock)
        previous = _worker_module._current
        _worker_module._current = ctx
        _RUNNING.append(elapsed)
        try:
            outcome = self._runner.execute(task, ctx)
        finally:
            _RUNNING.pop()
            _worker_module._current = previous
        return outcome, elapsed

    def _timed_out(self, w: _Worker, msg: Call | Chunk, elapsed: _Elapsed, start: float, duration: float) -> None:
        """A call of ``msg`` overran its timeout: the control thread's report, then the abort or the kill."""
        w.tasks_done += 1
        w.busy_until = start + duration
        err = TaskTimeoutError(f"task {msg.seq} of job {msg.job} ran longer than its timeout of {msg.timeout:g} s")
        info = error_info(err)
        info = ErrorInfo(type=info.type, message=info.message, args=info.args, traceback="")
        values = elapsed.late_values
        late = Err(msg.job, msg.seq, msg.attempt, info, len(values), values)
        kill = self._worker_send(w, Results(w.id, [late]), start + elapsed.late_at, side=True)
        if kill == "now":
            self._kill(w)
        elif elapsed.overran > msg.timeout + self.config.abort_grace:
            # The call ignored its abort flag for abort_grace: the worker ends itself.
            w.expect_kill = True
            self._timer(elapsed.late_at + self.config.abort_grace, f"{w.id} killed (task ignored its timeout)",
                        lambda: self._kill(w))

    # ---- the worker model: actors --------------------------------------------------------

    def _host_send(self, w: _Worker, msg: ActorEvent | ActorState) -> None:
        """What a simulated worker's actor host sends (an actor event, a checkpoint)."""
        try:
            self._worker_send(w, msg, w.at)
        except EncodeError as exc:
            if not isinstance(msg, ActorState):
                raise
            err = EncodeError(f"the state of actor instance {msg.instance} cannot be sent: {exc}")
            self._worker_send(w, ActorState(w.id, msg.instance, msg.nonce, None, error_info(err)), w.at)

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
        return RuntimeStats(
            workers=[WorkerStats(w.id, w.pid, w.alive, w.ready, len(w.inflight), w.tasks, w.items, w.busy, "sim",
                                 False, w.tags)
                     for w in self._workers.values()],
            tasks_submitted=c["tasks_submitted"], tasks_completed=o.tasks_completed,
            tasks_failed=o.tasks_failed, items_completed=o.items_completed, retried=o.retried,
            skipped=o.skipped, redelivered=o.redelivered, duplicates_dropped=c["duplicates_dropped"],
            late_results_dropped=c["late_results_dropped"], frames_dropped=c["frames_dropped"],
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


async def _awaited(value: Any) -> Any:
    return await value


def _task_clock() -> float:
    """Seconds into the task a simulated worker runs (when each call of a chunk starts)."""
    return _RUNNING[-1].slept if _RUNNING else 0.0


def _settle(value: Any) -> Any:
    import asyncio

    return asyncio.run(_awaited(value))


def _calls(task: Call | Chunk, outcome: Outcome) -> int:
    """Operation calls a task made (its virtual duration is ``task_time`` each)."""
    if isinstance(task, Call):
        return 1
    n = len(task.items)
    if isinstance(outcome, Err) and not task.fold:
        n = outcome.index + 1  # a map chunk stops at the failing item
    if task.fold:
        return n * len(task.stages) + max(0, n - 1)
    return n * (len(task.stages) + 1)


class SimJobOptions:
    """A :class:`SimRuntime` seen through per-job options; see :meth:`SimRuntime.options`."""

    __slots__ = ("_rt", "_options")

    def __init__(self, rt: SimRuntime, options: TaskOptions) -> None:
        self._rt = rt
        self._options = options

    def submit(self, fn: Callable[P, R] | str, /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """:meth:`SimRuntime.submit` with these options."""
        return self._rt._submit(fn, args, kwargs, self._options)

    def map(self, fn: Callable[..., R] | str, /, *iterables: Iterable[Any], chunksize: int | None = None,
            ordered: bool = True, timeout: float | None = None, progress: bool = False) -> SimMapIterator[R]:
        """:meth:`SimRuntime.map` with these options."""
        return self._rt._map(fn, iterables, chunksize, ordered, timeout, self._options)

    def fold(self, fn: Callable[[T, T], T] | str, iterable: Iterable[T], /, *, initial: T = MISSING,
             chunksize: int | None = None, timeout: float | None = None) -> T:
        """:meth:`SimRuntime.fold` with these options."""
        return self._rt._fold(fn, iterable, initial, chunksize, timeout, self._options)  # type: ignore[no-any-return]

    def run(self, directive: Directive[Any], /, *, chunksize: int | None = None,
            timeout: float | None = None) -> SimJobHandle[Any, Any]:
        """:meth:`SimRuntime.run` with these options."""
        return SimJobHandle(self._rt, directive, chunksize, timeout, self._options)

