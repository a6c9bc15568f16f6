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
import functools
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import msgspec

from ..direct import SETTLED
from ..errors import ActorDiedError, TaskTimeoutError
from ..jobs import Future
from ..policy import DEFAULT_TAG
from ..transport.codec import convert, encode, rebuild_error
from ..transport.messages import ActorCall, ActorEvent, ActorState, Err, Ok, SaveActor, SpawnActor, StopActor
from ..core.actors import (
    TERMINAL,
    ActorRecord,
    ActorTable,
    advance,
    check_method,
    flush_calls,
    hold_call,
    note_checkpoint,
    died_here,
    end,
    fail_calls,
    least_loaded,
    lost_in_restart,
    may_restart,
    no_live_error,
    reply_of,
    resolve_on,
    reverted,
    route_patience,
    took_over,
    worker_gone,
)
from .events import ActorEvent as Event
from .events import Failed, Started

if typing.TYPE_CHECKING:
    from ..core.tasks import Delivery, Job
    from ..driver import Driver

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


class _StateWait(concurrent.futures.Future[Any]):
    """A wait for a saved state (answered with ``(state, error)``)."""


class _Actor(ActorRecord):
    """Driver-side record of one actor (guarded by ``lock``)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        #: guards the fields; ``lock`` is a Condition over it (the hot path takes the bare RLock)
        self.mutex = threading.RLock()
        self.lock = threading.Condition(self.mutex)
        #: a hot restart is under way: its thread, not the worker-exit listener, settles a death
        self.hot = False
        #: (worker, error): a death the exit listener left to the hot restart under way
        self.lost: tuple[bytes, ActorDiedError] | None = None
        #: what an encoding error of a call names, "{}" being the method (built once, not per call)
        self.args_what = f"the arguments of {self.cls_name}.{{}}"

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
    if fut._state in SETTLED:  # fut.done(), without the call
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
        #: the actors by id, instance and name (guarded by ``_lock``)
        self._table: ActorTable[_Actor] = ActorTable()
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
        actor = _Actor(self._table.ids, cls, args, kwargs, name, detached, restart_policy, checkpoint_every,
                       checkpoint_interval)
        cls_name = actor.cls_name
        with self._lock:
            self._table.add(actor)
        many = self._deliver_for(actor)
        actor.job = self.driver.open_job(f"{cls_name} (actor {actor.id})", lambda seq, outcome: many([(seq, outcome)]),
                                         functools.partial(self._end, actor, "failed", emit=False))
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
        worker, tag = resolve_on(on, tag, self.driver.live_workers(), self.driver.worker_tags(),
                                 self.driver._workers)
        if worker is not None:
            return worker, tag
        live = self.driver.live_workers(tag)
        if not live:
            if not wait:
                raise no_live_error(tag, self.driver.worker_tags())
            patience = route_patience(self.driver.config.route_timeout, self.timeout, timeout)
            if not self.driver.wait_route(tag, patience):
                raise self.driver.no_worker_error(tag, patience)
            live = self.driver.live_workers(tag)
            if not live:  # it left again meanwhile
                raise self.driver.no_worker_error(tag, patience)
        with self._lock:
            hosting = [a.worker for a in self._table.live()]
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
        instance = next(self._table.instances)
        fut = self._request(("event", instance), worker)
        with self._lock:
            self._table.by_instance[instance] = actor
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
            convert = _Actor.convert_result  # the record's own: (actor, method, value), one call fewer per reply
            returns = actor.returns
            for entry, (_, outcome) in zip(entries, batch):
                if entry is None:
                    continue
                fut, method = entry
                if outcome.__class__ is Ok:
                    # settle_call inline for the usual reply, a value of its declared type (or of
                    # a method declaring none): two Python calls fewer per reply.
                    value = outcome.value
                    typ = returns.get(method)  # None until the method's first reply went through convert
                    if (typ is Any or type(value) is typ) and fut._state not in SETTLED:
                        try:
                            fut.set_result(value)
                        except concurrent.futures.InvalidStateError:
                            pass
                        continue
                settle_call(fut, outcome, convert, actor, method)

        return deliver

    def call(self, actor: _Actor, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        if method[:1] == "_":
            check_method(method)  # it raises
        driver = self.driver
        fut: Future[Any] = Future()
        fut._state = RUNNING  # an actor call cannot be withdrawn once made (nobody sees it yet)
        fut._phalanx_direct = driver.direct
        a, kw = args, kwargs or None
        with actor.mutex:
            if actor.state == "running" and not actor.held:
                # The usual case: encode the message once, here, so bad arguments fail this call.
                job = actor.job
                assert job is not None
                seq = next(actor.seqs)
                msg = ActorCall(job.id, seq, 0, actor.instance, method, a, kw)
                frame = encode(msg, actor.args_what, method)
                if len(frame) > driver.limits.max_frame:
                    driver.check_frame(frame, actor.args_what.format(method))  # it raises
                actor.futures[seq] = (fut, method)
                if not driver.submit_directed(job, msg, frame, actor.worker):
                    worker_gone(actor, seq, method, a, kw)
                return fut
        # Starting, restarting or stopped: check the arguments now, send when it runs.
        self.driver.check_frame(encode([a, kw], "the arguments of {}", f"{actor.cls_name}.{method}"),
                                f"the arguments of {actor.cls_name}.{method}")
        with actor.mutex:
            if hold_call(actor, fut, method, a, kw):
                self._flush_locked(actor)
        return fut

    def _flush_locked(self, actor: _Actor) -> None:
        """Send held calls to the current instance (actor lock held)."""
        flush_calls(actor, self.driver.submit_directed)

    # ---- restart ------------------------------------------------------------------

    def restart(self, actor: _Actor, on: str | None, timeout: float | None) -> bool:
        """Hot restart; True if a new instance took over, False if it reverted."""
        with actor.lock:
            if actor.state != "running":
                raise ActorDiedError(f"actor {actor.id} is {actor.state}; only a running actor restarts")
            actor.state = advance(actor.state, "restart")  # new calls are held from here on
            actor.hot, actor.lost = True, None
            old_worker, old_instance = actor.worker, actor.instance
        nonce = next(self._table.nonces)
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
                        actor.emit(took_over(actor, target, tag, state))
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
                    actor.emit(reverted(actor, error))  # the old instance was never stopped
                    self._flush_locked(actor)
                # Otherwise the actor ended meanwhile, or its old worker died and that
                # worker's exit listener, still to run, finds it (restarting, on the dead
                # worker) and supervises it as any other death.
                return False
        # The old instance's process died while this restart owned the actor, and the
        # new instance did not take over: nothing to revert to. Supervise that death.
        self._instance_died(actor, lost_in_restart(lost[1], error))
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
            return self._table.named(name)

    # ---- events from workers ------------------------------------------------------------

    def _on_message(self, worker: bytes, msg: ActorEvent | ActorState) -> None:
        """Pump thread: an actor event or a saved state arrived."""
        what, number, value = reply_of(msg)
        if what in ("checkpoint", "stopped", "nothing"):
            with self._lock:
                actor = self._table.by_instance.get(number)
            if actor is None:
                return
            if what == "stopped":
                self._end(actor, "stopped", None)
            elif what == "checkpoint" and self.driver.is_live(worker):
                # A checkpoint still in flight from a worker already declared dead
                # is older news than the restart under way: ignore it.
                with actor.lock:
                    note_checkpoint(actor, number, worker, value)
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
            actors = self._table.live()
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
            return self._table.nodes()

    def convert_result(self, actor: _Actor, method: str, value: Any) -> Any:
        return actor.convert_result(method, value)
