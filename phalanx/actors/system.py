"""The driver side of actors: placement, calls, hot restart, supervision, inspect.

Runs in the driver. User threads call :meth:`ActorSystem.spawn`,
:meth:`ActorSystem.call`, :meth:`ActorSystem.restart`...; the pump thread
delivers call outcomes and actor events; the supervisor thread reports dead
workers. Lock order: an actor's lock, then the driver's lock.

Each actor is a leased job: every method call is a task ``(job, seq)``
addressed to the worker that hosts the current instance, so results reach
the caller exactly once and in-flight calls are known when a worker dies.

An actor keeps to a worker tag (``spawn(on="gpu")``; "default" otherwise):
hot restarts without ``on`` and supervised restarts place it only on live
workers of that tag. Spawning and supervised restarts wait up to
``route_timeout`` for one to appear (then NoWorkerError); a hot restart does
not wait (LookupError, and the old instance keeps serving).

Invariants kept:

* **Per-caller order.** Calls are sent in the order they are made, to one
  inbox; calls made while an instance is (re)starting are held and sent, in
  order, to the instance that results: none is lost or reordered.
* **Hot restart reverts.** The old instance is only told to stop once the new
  one has started; if ``save()`` or the new instance fails, ``RestartFailed``
  is emitted and the old instance keeps serving the held calls.
* **One owner, one instance.** While a hot restart is under way its thread
  owns the actor: the worker-exit listener only notes a death of the old
  instance's process (``lost``), and the restart either completes the move or,
  when nothing is left to revert to, supervises that death itself; so a death
  never starts a second instance beside the one the restart starts. A started
  instance is recorded as the actor's only if its worker is still live, under
  the actor's lock, under which the exit listener also looks for the actors a
  dead worker hosted: a death is never missed between "started" and the record.
* **No hang.** Calls in flight when an actor's process dies fail with
  :class:`~phalanx.ActorDiedError`; every wait has a timeout.
"""

from __future__ import annotations

import concurrent.futures
from concurrent.futures._base import RUNNING
import itertools
import re
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import msgspec

from ..errors import ActorDiedError, TaskTimeoutError
from ..jobs import Future
from ..policy import DEFAULT_TAG, check_tag
from ..registry.actors import actor_name_of
from ..transport.codec import convert, encode, rebuild_error
from ..transport.messages import ActorCall, ActorEvent, ActorState, Err, Ok, SaveActor, SpawnActor, StopActor
from ..core.actors import (
    TERMINAL,
    advance,
    check_spawn,
    died_here,
    end,
    fail_calls,
    least_loaded,
    may_restart,
    reply_of,
    return_type,
)
from .events import ActorEvent as Event
from .events import Failed, RestartFailed, Started

if typing.TYPE_CHECKING:
    from ..core.tasks import Delivery, Job
    from ..driver import Driver

#: the ids of workers a runtime starts itself ("w1", "w2", ...): never tag names
_LOCAL_WORKER_ID = re.compile(r"^w[0-9]+$")

__all__ = ["ActorSystem", "ActorNode", "WorkerNode", "RuntimeTree"]


class ActorNode(msgspec.Struct, frozen=True):
    """One actor in an inspect tree."""

    id: int
    name: str | None
    cls: str
    state: str
    instance: int
    mailbox: int
    calls: int


class WorkerNode(msgspec.Struct, frozen=True):
    """One worker in an inspect tree; ``resolved`` is false if it did not answer in time."""

    id: str
    pid: int
    host: str
    resolved: bool
    cpu_percent: float
    rss: int
    queued: int
    tasks_done: int
    inflight: int
    actors: list[ActorNode]
    #: the worker tags it serves
    tags: tuple[str, ...] = ()


class RuntimeTree(msgspec.Struct, frozen=True):
    """What ``rt.inspect()`` returns; ``str()`` renders it as a tree."""

    workers: list[WorkerNode]

    def hosts(self) -> dict[str, list[WorkerNode]]:
        """The workers grouped by host, hosts in order of first appearance."""
        grouped: dict[str, list[WorkerNode]] = {}
        for w in self.workers:
            grouped.setdefault(w.host or "?", []).append(w)
        return grouped

    def __str__(self) -> str:
        lines = ["runtime"]
        hosts = self.hosts()
        for h, (host, workers) in enumerate(hosts.items()):
            last_host = h == len(hosts) - 1
            lines.append(f"{'└── ' if last_host else '├── '}host {host}: {len(workers)} workers")
            indent = "    " if last_host else "│   "
            for i, w in enumerate(workers):
                last = i == len(workers) - 1
                head = indent + ("└── " if last else "├── ")
                pad = indent + ("    " if last else "│   ")
                tags = f" [{','.join(w.tags)}]" if w.tags and w.tags != (DEFAULT_TAG,) else ""
                if w.resolved:
                    lines.append(
                        f"{head}worker {w.id}{tags} pid {w.pid}: cpu {w.cpu_percent:.0f}% "
                        f"rss {w.rss / 2**20:.1f} MiB, queued {w.queued}, in flight {w.inflight}, "
                        f"done {w.tasks_done}"
                    )
                else:
                    lines.append(f"{head}worker {w.id}{tags} pid {w.pid}: unresolved (no answer in time)")
                for j, a in enumerate(w.actors):
                    branch = "└── " if j == len(w.actors) - 1 else "├── "
                    label = f"{a.name} " if a.name else ""
                    lines.append(
                        f"{pad}{branch}actor {a.id} {label}({a.cls}) {a.state}: "
                        f"mailbox {a.mailbox}, calls {a.calls}"
                    )
        return "\n".join(lines)


_TERMINAL = TERMINAL


#: not looked up yet (``Any`` is a valid answer)
_UNKNOWN: Any = object()


class _StateWait(concurrent.futures.Future[Any]):
    """A wait for a saved state (answered with ``(state, error)``)."""


class _Actor:
    """Driver-side record of one actor (guarded by ``lock``)."""

    def __init__(self, actor_id: int, cls_name: str, cls: type | None, args: list[Any],
                 kwargs: dict[str, Any] | None, name: str | None, detached: bool,
                 policy: str, every: int, interval: float) -> None:
        self.id = actor_id
        self.cls_name = cls_name
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.name = name
        self.detached = detached
        self.policy = policy
        #: the worker tag it keeps to across restarts
        self.tag = DEFAULT_TAG
        self.every = every
        self.interval = interval
        #: guards the fields below; ``lock`` is a Condition over it (the hot path takes the bare RLock)
        self.mutex = threading.RLock()
        self.lock = threading.Condition(self.mutex)
        self.state = "starting"
        self.instance = 0
        self.worker = b""
        self.job: Job | None = None
        self.seqs = itertools.count()
        self.futures: dict[int, tuple[Future[Any], str]] = {}
        self.held: deque[tuple[int, str, Sequence[Any], dict[str, Any] | None]] = deque()
        self.events: list[Event] = []
        self.checkpoint: Any = None
        self.has_checkpoint = False
        self.restarts: deque[float] = deque()
        #: a hot restart is under way: its thread, not the worker-exit listener, settles a death
        self.hot = False
        #: (worker, error): a death the exit listener left to the hot restart under way
        self.lost: tuple[bytes, ActorDiedError] | None = None
        self.refs = 0
        self.calls = 0
        #: declared return type of each method called so far (reading annotations costs ~10 us)
        self.returns: dict[str, Any] = {}

    def take_lost(self) -> tuple[bytes, ActorDiedError] | None:
        """The death noted during a hot restart, as (worker, error) (then cleared)."""
        lost, self.lost = self.lost, None
        return lost

    def emit(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)
            self.lock.notify_all()


_ActorT = TypeVar("_ActorT")


def settle_call(fut: Future[Any], outcome: Delivery, convert: Callable[[_ActorT, str, Any], Any],
                actor: _ActorT, method: str) -> None:
    """Settle an actor call's future with its outcome (a value passes through ``convert(actor, method, value)``)."""
    if fut.done():
        return
    try:
        if isinstance(outcome, Ok):
            fut.set_result(convert(actor, method, outcome.value))
        elif isinstance(outcome, Err):
            fut.set_exception(rebuild_error(outcome.error))
        else:
            fut.set_exception(outcome)
    except concurrent.futures.InvalidStateError:
        pass


class ActorSystem:
    """All actors of one runtime."""

    def __init__(self, driver: Driver, call_timeout: float = 60.0,
                 max_restarts: int = 3, restart_window: float = 60.0) -> None:
        self.driver = driver
        self.timeout = call_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self._lock = threading.Lock()
        self._actors: dict[int, _Actor] = {}
        self._by_instance: dict[int, _Actor] = {}
        self._names: dict[str, _Actor] = {}
        self._ids = itertools.count(1)
        self._instances = itertools.count(1)
        self._nonces = itertools.count(1)
        self._waiting: dict[tuple[str, int], concurrent.futures.Future[Any]] = {}
        self._waiting_on: dict[tuple[str, int], bytes] = {}
        self._homeless: deque[_Actor] = deque()
        driver.actor_listener = self._on_message
        driver.exit_listeners.append(self._on_worker_exit)
        driver.ready_listeners.append(self._on_worker_ready)

    # ---- spawning -------------------------------------------------------------

    def spawn(self, cls: type | str, args: tuple[Any, ...], kwargs: dict[str, Any], *, on: str | None,
              name: str | None, detached: bool, restart_policy: str, checkpoint_every: int,
              checkpoint_interval: float, timeout: float | None) -> _Actor:
        check_spawn(restart_policy, detached, name)
        cls_name = actor_name_of(cls)
        encode([list(args), kwargs], f"the arguments of {cls_name}")
        actor = _Actor(next(self._ids), cls_name, cls if isinstance(cls, type) else None, list(args),
                       kwargs or None, name, detached, restart_policy, checkpoint_every, checkpoint_interval)
        with self._lock:
            if name is not None:
                if name in self._names and self._names[name].state not in _TERMINAL:
                    raise ValueError(f"an actor named {name!r} already exists")
                self._names[name] = actor
            self._actors[actor.id] = actor
        many = self._deliver_for(actor)
        actor.job = self.driver.open_job(f"{cls_name} (actor {actor.id})", lambda seq, outcome: many([(seq, outcome)]),
                                         self._fail_for(actor))
        actor.job.deliver_many = many
        actor.job.direct = True  # its deliver only settles futures: a waiting caller may run it
        try:
            worker, actor.tag = self._place(on, None, DEFAULT_TAG, timeout)
        except BaseException as exc:
            self._end(actor, "failed", exc)
            raise
        error = self._start(actor, worker, restored=False, state=None, timeout=timeout)
        if error is not None:
            self._end(actor, "failed", error)
            raise error
        with actor.lock:
            actor.emit(Started(worker.decode()))
            self._flush_locked(actor)
        return actor

    def _place(self, on: str | None, exclude: bytes | None, tag: str,
               timeout: float | None, wait: bool = True) -> tuple[bytes, str]:
        """A live worker for an instance and the tag the actor keeps to from then on.

        ``on`` names a live worker (placed there), else a tag; without it the
        actor stays in ``tag``. A tag with no live worker is waited for, up to
        ``route_timeout`` (or ``timeout``, if shorter), then NoWorkerError;
        without ``wait`` (a hot restart: calls are held meanwhile, and the old
        instance can go on serving) it is a LookupError at once.
        """
        if on is not None:
            if on.encode() in self.driver.live_workers():
                held = self.driver.worker_tags().get(on, ())
                keep = tag if tag in held else DEFAULT_TAG if DEFAULT_TAG in held or not held else held[0]
                return on.encode(), keep
            if on.encode() in self.driver._workers or _LOCAL_WORKER_ID.match(on):
                # A worker that died (or never was): not a tag to wait for.
                raise LookupError(f"worker {on!r} is not live; live: {sorted(self.driver.worker_tags())}")
            try:
                tag = check_tag(on)
            except ValueError:
                raise LookupError(f"no live worker or tag {on!r}; live: "
                                  f"{sorted(self.driver.worker_tags())}") from None
        live = self.driver.live_workers(tag)
        if not live:
            if not wait:
                raise LookupError(f"no live worker or worker of tag {tag!r}; live: "
                                  f"{sorted(self.driver.worker_tags().items())}")
            patience = min(self.driver.config.route_timeout, self.timeout if timeout is None else timeout)
            if not self.driver.wait_route(tag, patience):
                raise self.driver.no_worker_error(tag, patience)
            live = self.driver.live_workers(tag)
            if not live:  # it left again meanwhile
                raise self.driver.no_worker_error(tag, patience)
        with self._lock:
            hosting = [a.worker for a in self._actors.values() if a.state not in _TERMINAL]
        return least_loaded(live, hosting, exclude), tag

    def _request(self, key: tuple[str, int], worker: bytes) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = _StateWait() if key[0] == "state" else concurrent.futures.Future()
        with self._lock:
            self._waiting[key] = fut
            self._waiting_on[key] = worker
        return fut

    def _wait(self, key: tuple[str, int], fut: concurrent.futures.Future[Any], timeout: float | None,
              what: str) -> Any:
        try:
            return fut.result(timeout=self.timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            raise TaskTimeoutError(f"timed out waiting for {what}") from None
        finally:
            with self._lock:
                self._waiting.pop(key, None)
                self._waiting_on.pop(key, None)

    def _start(self, actor: _Actor, worker: bytes, restored: bool, state: Any,
               timeout: float | None) -> BaseException | None:
        """Create a new instance on ``worker``; None on success, else the error."""
        instance = next(self._instances)
        fut = self._request(("event", instance), worker)
        with self._lock:
            self._by_instance[instance] = actor
        msg = SpawnActor(instance, actor.cls_name, actor.args, actor.kwargs, state, restored,
                         actor.every, actor.interval)
        if not self.driver.send_to(worker, encode(msg, f"the state of actor {actor.id}")):
            return ActorDiedError(f"worker {worker.decode()} is gone")
        try:
            kind, error = self._wait(("event", instance), fut, timeout, f"actor {actor.id} to start")
        except BaseException as exc:
            return exc
        if kind != "started":
            return error if error is not None else ActorDiedError("the actor failed to start")
        with actor.lock:
            # Checked under the actor's lock, as the exit listener checks which actors a
            # dead worker hosted: either it finds the actor there, or this sees the death.
            if not self.driver.is_live(worker):
                return ActorDiedError(f"worker {worker.decode()} died as actor {actor.id} started there")
            old_worker, old_instance = actor.worker, actor.instance
            actor.worker, actor.instance = worker, instance
            actor.state = advance(actor.state, "started")
        if old_instance and old_worker:
            self.driver.send_to(old_worker, encode(StopActor(old_instance, quiet=True)))
        return None

    # ---- calls ------------------------------------------------------------------

    def _deliver_for(self, actor: _Actor) -> Callable[[list[tuple[int, Delivery]]], None]:
        def deliver(batch: list[tuple[int, Delivery]]) -> None:
            # One lock round per batch: the caller thread issuing calls holds this lock
            # often, and waiting on it per reply cost a context switch per reply.
            with actor.mutex:
                pop = actor.futures.pop
                entries = [pop(seq, None) for seq, _ in batch]
                actor.calls += len(batch)
            convert = self.convert_result
            for entry, (_, outcome) in zip(entries, batch):
                if entry is not None:
                    settle_call(entry[0], outcome, convert, actor, entry[1])

        return deliver

    def _fail_for(self, actor: _Actor) -> Callable[[BaseException], None]:
        def fail(exc: BaseException) -> None:
            self._end(actor, "failed", exc, emit=False)

        return fail

    def call(self, actor: _Actor, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        if method.startswith("_"):
            raise AttributeError(f"actor methods starting with '_' cannot be called remotely: {method!r}")
        fut: Future[Any] = Future()
        fut._state = RUNNING  # an actor call cannot be withdrawn once made (nobody sees it yet)
        fut._phalanx_direct = self.driver
        a, kw = args, kwargs or None
        with actor.mutex:
            if actor.state == "running" and not actor.held:
                # The usual case: encode the message once, here, so bad arguments fail this call.
                job = actor.job
                assert job is not None
                seq = next(actor.seqs)
                msg = ActorCall(job.id, seq, 0, actor.instance, method, a, kw)
                frame = encode(msg, "the arguments of {}", f"{actor.cls_name}.{method}")
                self.driver.check_frame(frame, f"the arguments of {actor.cls_name}.{method}")
                actor.futures[seq] = (fut, method)
                if not self.driver.submit_directed(job, msg, frame, actor.worker):
                    self._worker_gone(actor, seq, method, a, kw)
                return fut
        # Starting, restarting or stopped: check the arguments now, send when it runs.
        self.driver.check_frame(encode([a, kw], "the arguments of {}", f"{actor.cls_name}.{method}"),
                                f"the arguments of {actor.cls_name}.{method}")
        with actor.mutex:
            if actor.state in _TERMINAL:
                fut.set_exception(ActorDiedError(f"actor {actor.id} ({actor.cls_name}) is {actor.state}"))
                return fut
            seq = next(actor.seqs)
            actor.futures[seq] = (fut, method)
            actor.held.append((seq, method, a, kw))
            if actor.state == "running":
                self._flush_locked(actor)
        return fut

    def _worker_gone(self, actor: _Actor, seq: int, method: str, a: Sequence[Any],
                     kw: dict[str, Any] | None) -> bool:
        """Call ``seq`` could not be sent: its worker is gone (actor lock held).

        The call never reached the dead worker, so a supervised actor's call
        waits (held, at the front) for the restart the worker's exit brings;
        True then. Otherwise it fails with :class:`~phalanx.ActorDiedError`.
        """
        if actor.policy == "on-failure":
            actor.held.appendleft((seq, method, a, kw))
            return True
        entry = actor.futures.pop(seq, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(ActorDiedError(f"the worker of actor {actor.id} is gone"))
        return False

    def _flush_locked(self, actor: _Actor) -> None:
        """Send held calls to the current instance (actor lock held)."""
        job = actor.job
        assert job is not None
        while actor.held and actor.state in ("running", "stopping"):
            seq, method, a, kw = actor.held.popleft()
            msg = ActorCall(job.id, seq, 0, actor.instance, method, a, kw)
            if not self.driver.submit_directed(job, msg, encode(msg), actor.worker):
                if self._worker_gone(actor, seq, method, a, kw):
                    return  # held again: sent after the restart

    # ---- restart ------------------------------------------------------------------

    def restart(self, actor: _Actor, on: str | None, timeout: float | None) -> bool:
        """Hot restart; True if a new instance took over, False if it reverted."""
        with actor.lock:
            if actor.state != "running":
                raise ActorDiedError(f"actor {actor.id} is {actor.state}; only a running actor restarts")
            actor.state = advance(actor.state, "restart")  # new calls are held from here on
            actor.hot, actor.lost = True, None
            old_worker, old_instance = actor.worker, actor.instance
        nonce = next(self._nonces)
        fut = self._request(("state", nonce), old_worker)
        error: BaseException | None = None
        state: Any = None
        if not self.driver.send_to(old_worker, encode(SaveActor(old_instance, nonce))):
            error = ActorDiedError(f"worker {old_worker.decode()} is gone")
        else:
            try:
                state, error = self._wait(("state", nonce), fut, timeout, f"actor {actor.id} to save")
            except BaseException as exc:
                error = exc
        if error is None:
            try:
                target, tag = self._place(on, old_worker, actor.tag, timeout, wait=False)
            except BaseException as exc:
                error = exc
            else:
                error = self._start(actor, target, restored=True, state=state, timeout=timeout)
                if error is None:
                    with actor.lock:
                        actor.hot = False
                        # A death of the old instance's process meanwhile cost only the
                        # calls it held (failed by the driver); one of the new instance's
                        # (it started, then died before this) is supervised as any other.
                        lost = actor.take_lost()
                        died_here = lost[1] if lost is not None and lost[0] == actor.worker else None
                        actor.tag = tag
                        actor.checkpoint, actor.has_checkpoint = state, True
                        actor.emit(Started(target.decode(), restored=True))
                        if died_here is None:
                            self._flush_locked(actor)
                        else:
                            actor.state = advance(actor.state, "died")  # hold calls for what follows the death
                    if died_here is not None:
                        self._instance_died(actor, died_here)
                        self._rehome()
                    return True
        with actor.lock:
            actor.hot = False
            lost = actor.take_lost()  # (the old worker: the actor never left it)
            if lost is None:
                if actor.state == "restarting" and self.driver.is_live(old_worker):
                    actor.state = advance(actor.state, "revert")  # the old instance was never stopped
                    actor.emit(RestartFailed(error))
                    self._flush_locked(actor)
                # Otherwise the actor ended meanwhile, or its old worker died and that
                # worker's exit listener, still to run, finds it (restarting, on the dead
                # worker) and supervises it as any other death.
                return False
        # The old instance's process died while this restart owned the actor, and the
        # new instance did not take over: nothing to revert to. Supervise that death.
        died = ActorDiedError(f"{lost[1]}, during a hot restart that could not take over: {error}")
        died.__cause__ = error
        self._instance_died(actor, died)
        self._rehome()
        return False

    # ---- ending ----------------------------------------------------------------------

    def stop(self, actor: _Actor) -> None:
        with actor.lock:
            if actor.state in _TERMINAL or actor.state == "stopping":
                return
            if actor.state != "running":
                actor.lock.wait_for(lambda: actor.state not in ("starting", "restarting"), timeout=self.timeout)
            if actor.state != "running":
                return
            self._flush_locked(actor)
            actor.state = advance(actor.state, "stop")
            instance, worker = actor.instance, actor.worker
        if not self.driver.send_to(worker, encode(StopActor(instance))):
            self._end(actor, "stopped", None)

    def join(self, actor: _Actor, timeout: float | None) -> None:
        with actor.lock:
            if not actor.lock.wait_for(lambda: actor.state in _TERMINAL, timeout=timeout):
                raise TaskTimeoutError(f"actor {actor.id} is still {actor.state}")

    def _end(self, actor: _Actor, state: str, error: BaseException | None, emit: bool = True) -> None:
        with actor.lock:
            if actor.state in _TERMINAL:
                return
            futures, event = end(actor, state, error)
            if emit:
                actor.emit(event)
            actor.lock.notify_all()
        fail_calls(actor, futures, state)
        if actor.job is not None:
            self.driver.close_job(actor.job)

    def events(self, actor: _Actor, timeout: float | None) -> Iterator[Event]:
        index = 0
        while True:
            with actor.lock:
                ok = actor.lock.wait_for(lambda: len(actor.events) > index or actor.state in _TERMINAL,
                                         timeout=timeout)
                if not ok:
                    raise TaskTimeoutError(f"no event from actor {actor.id} within {timeout} s")
                batch = actor.events[index:]
                done = actor.state in _TERMINAL
            for event in batch:
                yield event
            index += len(batch)
            if done and index >= len(actor.events):
                return

    def retain(self, actor: _Actor) -> None:
        with actor.lock:
            actor.refs += 1

    def release(self, actor: _Actor) -> None:
        with actor.lock:
            actor.refs -= 1
            drop = actor.refs <= 0 and not actor.detached
        if drop and not self.driver.closed:
            try:
                self.stop(actor)
            except Exception:
                pass

    def get(self, name: str) -> _Actor:
        with self._lock:
            actor = self._names.get(name)
        if actor is None or actor.state in _TERMINAL:
            raise LookupError(f"no actor named {name!r}")
        return actor

    # ---- events from workers ------------------------------------------------------------

    def _on_message(self, worker: bytes, msg: ActorEvent | ActorState) -> None:
        """Pump thread: an actor event or a saved state arrived."""
        what, number, value = reply_of(msg)
        if what in ("checkpoint", "stopped", "nothing"):
            with self._lock:
                actor = self._by_instance.get(number)
            if actor is None:
                return
            if what == "stopped":
                self._end(actor, "stopped", None)
            elif what == "checkpoint" and self.driver.is_live(worker):
                # A checkpoint still in flight from a worker already declared dead
                # is older news than the restart under way: ignore it.
                with actor.lock:
                    if actor.instance == number and actor.worker == worker:
                        actor.checkpoint, actor.has_checkpoint = value, True
            return
        key = (what, number)
        with self._lock:
            fut = self._waiting.get(key)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _on_worker_exit(self, worker_id: str, exitcode: int | None) -> None:
        """Supervisor thread: the worker hosting some actors died."""
        ident = worker_id.encode()
        gone = ActorDiedError(f"worker {worker_id} died (exit code {exitcode})")
        with self._lock:
            stranded = [f for key, f in self._waiting.items() if self._waiting_on.get(key) == ident]
        for fut in stranded:
            if not fut.done():
                fut.set_result(("failed", gone) if not isinstance(fut, _StateWait) else (None, gone))
        with self._lock:
            actors = [a for a in self._actors.values() if a.state not in _TERMINAL]
        for actor in actors:
            died = died_here(actor, worker_id, exitcode)
            with actor.lock:  # (where it lives changes only under this lock: see _start)
                if actor.worker != ident or actor.state in _TERMINAL:
                    continue
                if actor.hot:
                    # Its hot restart owns it: that thread either finishes the move (the
                    # old instance is moot) or supervises this death; never both of us.
                    actor.lost = (ident, died)
                    continue
            self._instance_died(actor, died)
        self._rehome()

    def _instance_died(self, actor: _Actor, died: ActorDiedError) -> None:
        """The process hosting ``actor`` died: queue a supervised restart, or end it as failed.

        The caller then runs :meth:`_rehome`.
        """
        with actor.lock:
            again = actor.policy == "on-failure" and may_restart(
                actor.restarts, time.monotonic(), self.max_restarts, self.restart_window)
            if again:
                actor.state = advance(actor.state, "died")
                actor.emit(Failed(died, final=False))
        if not again:
            self._end(actor, "failed", died)
            return
        with self._lock:
            self._homeless.append(actor)

    def _on_worker_ready(self, worker_id: str) -> None:
        self._rehome()

    def _rehome(self) -> None:
        """Restart supervised actors whose worker died, each in a thread that waits for its tag."""
        while True:
            with self._lock:
                if not self._homeless:
                    return
                actor = self._homeless.popleft()
            threading.Thread(target=self._restart_supervised, args=(actor,), daemon=True,
                             name=f"phalanx-actor-{actor.id}-restart").start()

    def _restart_supervised(self, actor: _Actor) -> None:
        try:
            worker, _ = self._place(None, None, actor.tag, None)
        except BaseException as exc:
            self._end(actor, "failed", exc)
            return
        error = self._start(actor, worker, restored=actor.has_checkpoint, state=actor.checkpoint, timeout=None)
        if error is not None:
            self._end(actor, "failed", error)
            return
        with actor.lock:
            actor.emit(Started(worker.decode(), restored=actor.has_checkpoint))
            self._flush_locked(actor)

    # ---- inspect ----------------------------------------------------------------------------

    def nodes(self) -> dict[bytes, list[tuple[_Actor, int]]]:
        with self._lock:
            actors = [a for a in self._actors.values() if a.state not in _TERMINAL]
        out: dict[bytes, list[tuple[_Actor, int]]] = {}
        for a in actors:
            out.setdefault(a.worker, []).append((a, a.instance))
        return out

    def convert_result(self, actor: _Actor, method: str, value: Any) -> Any:
        typ = actor.returns.get(method, _UNKNOWN)
        if typ is _UNKNOWN:
            typ = actor.returns[method] = return_type(actor.cls, method)
        if typ is Any:
            return value
        try:
            return convert(value, typ)
        except Exception:
            return value
