"""The actor system of a SimRuntime: phalanx.actors.system's waits, on the scheduler.

Runs in the calling (test) process, on the scheduler's thread. Placement,
the lifecycle's transitions, supervision's restart intensity and what workers
say about actors are :mod:`phalanx.core.actors`, the code the threaded
:class:`~phalanx.actors.system.ActorSystem` runs; what is left here is how
the simulation waits for a start, a save or a death (callbacks and timers on
the virtual clock instead of threads and condition variables).

Invariants kept (as on a real runtime): calls are sent in the order they are
made and held while an instance (re)starts; a hot restart reverts if the new
instance fails; calls in flight when an actor's process dies fail with
:class:`~phalanx.ActorDiedError`; a spawn or supervised restart waits up to
``route_timeout`` virtual seconds for a live worker of the actor's tag (a
supervised restart as a timer, since the scheduler's thread cannot block).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..actors.events import ActorEvent as Event
from ..actors.events import Failed, Started
from ..actors.system import settle_call
from ..core import actors as core
from ..core.tasks import Delivery
from ..errors import ActorDiedError, TaskTimeoutError
from ..policy import DEFAULT_TAG
from ..transport.codec import encode
from ..transport.messages import ActorEvent, ActorState, SaveActor, SpawnActor, StopActor

from .sim_jobs import HangError, SimFuture

if TYPE_CHECKING:
    from .sim import SimRuntime

__all__ = ["SimActors"]

# --------------------------------------------------------------------------- #
# Actors (driver side): phalanx.actors.system's waits, on the scheduler;
# the lifecycle, supervision and placement are phalanx.core.actors'
# --------------------------------------------------------------------------- #

_TERMINAL = core.TERMINAL


class _SimActor(core.ActorRecord):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        #: the death of the old instance's process, seen during a hot restart
        self.lost: ActorDiedError | None = None
        self.stop_when_running = False
        #: a supervised restart waiting for a worker of its tag gives up when this fires
        self.route_timer = [True]

    def take_lost(self) -> ActorDiedError | None:
        """The death of the old instance's process noted during a hot restart (then cleared)."""
        lost, self.lost = self.lost, None
        return lost


class SimActors:
    """The actor system of a SimRuntime; duck-types ``phalanx.actors.system.ActorSystem`` for ``ActorRef``."""

    def __init__(self, sim: SimRuntime, max_restarts: int = 3, restart_window: float = 60.0,
                 call_timeout: float = 60.0) -> None:
        self.sim = sim
        #: virtual seconds a spawn, restart or save may take before it fails (``actor_timeout``)
        self.timeout = call_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.table: core.ActorTable[_SimActor] = core.ActorTable()
        #: (kind, number) -> (worker it waits on, callback)
        self.waiting: dict[tuple[str, int], tuple[bytes, Callable[[Any], None]]] = {}
        self.homeless: deque[_SimActor] = deque()

    # ---- spawning ---------------------------------------------------------------

    def spawn(self, cls: type | str, args: tuple[Any, ...], kwargs: dict[str, Any], *, on: str | None,
              name: str | None, detached: bool, restart_policy: str, checkpoint_every: int,
              checkpoint_interval: float, timeout: float | None) -> _SimActor:
        actor = _SimActor(self.table.ids, cls, args, kwargs, name, detached, restart_policy, checkpoint_every,
                          checkpoint_interval)
        cls_name = actor.cls_name
        self.table.add(actor)
        actor.job = self.sim._open_job(f"{cls_name} (actor {actor.id})", self._deliver_for(actor),
                                       functools.partial(self._end, actor, "failed", emit=False))
        try:
            worker, actor.tag = self._place(on, None, DEFAULT_TAG, timeout)
        except BaseException as exc:
            self._end(actor, "failed", exc)
            raise
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
            self.sim._wait_for(lambda: bool(box), self.timeout if timeout is None else timeout, what)
        except TimeoutError:
            pass
        if not box:
            box.append(TaskTimeoutError(f"timed out waiting for {what}"))

    def _live_of(self, tag: str) -> dict[bytes, int]:
        return {w.ident: len(w.inflight) for w in self.sim._live if tag in w.tags}

    def _hosting(self) -> list[bytes]:
        return [a.worker for a in self.table.live()]

    def _place(self, on: str | None, exclude: bytes | None, tag: str, timeout: float | None,
               wait: bool = True) -> tuple[bytes, str]:
        """A live worker for an instance and the tag the actor keeps to (as ``ActorSystem._place``).

        A tag with no live worker is waited for on the virtual clock, up to
        ``route_timeout`` (or ``timeout``), then NoWorkerError; without ``wait``
        (a hot restart) it is a LookupError at once.
        """
        sim = self.sim
        worker, tag = core.resolve_on(on, tag, sim._live_workers(), sim.worker_tags(), sim._workers)
        if worker is not None:
            return worker, tag
        if not self._live_of(tag):
            if not wait:
                raise core.no_live_error(tag, sim.worker_tags())
            patience = core.route_patience(sim.config.route_timeout, self.timeout, timeout)
            expired: list[bool] = []
            timer = sim._timer(patience, f"route timeout of tag {tag!r}", lambda: expired.append(True))
            sim._wait_for(lambda: bool(expired or self._live_of(tag)), None, f"a live worker of tag {tag!r}")
            sim._cancel(timer)
            if not self._live_of(tag):
                raise sim.routing.no_worker_error(tag, patience)
        return core.least_loaded(self._live_of(tag), self._hosting(), exclude), tag

    def _start(self, actor: _SimActor, worker: bytes, restored: bool, state: Any,
               done: Callable[[BaseException | None], None], timeout: float | None) -> None:
        """Create a new instance on ``worker``; ``done(None)`` once started, else ``done(error)``."""
        instance = next(self.table.instances)
        key = ("event", instance)
        self.table.by_instance[instance] = actor
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
            actor.state = core.advance(actor.state, "started")
            if old_instance and old_worker:
                self.sim._send_to(old_worker, encode(StopActor(old_instance, quiet=True)))
            done(None)

        self.waiting[key] = (worker, answer)
        msg = SpawnActor(instance, actor.cls_name, actor.args, actor.kwargs, state, restored,
                         actor.every, actor.interval)
        if not self.sim._send_to(worker, encode(msg, f"the state of actor {actor.id}")):
            answer(("failed", ActorDiedError(f"worker {worker.decode()} is gone")))
            return
        limit = self.timeout if timeout is None else timeout
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

    def call(self, actor: _SimActor, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> SimFuture[Any]:
        core.check_method(method)
        fut: SimFuture[Any] = self.sim._future()
        fut.set_running_or_notify_cancel()
        a, kw = list(args), kwargs or None
        encode([a, kw], f"the arguments of {actor.cls_name}.{method}")
        if core.hold_call(actor, fut, method, a, kw):
            self._flush(actor)
        return fut

    def _flush(self, actor: _SimActor) -> None:
        core.flush_calls(actor, self.sim._submit_directed)
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
        actor.state = core.advance(actor.state, "restart")
        actor.lost = None
        old_worker, old_instance = actor.worker, actor.instance
        nonce = next(self.table.nonces)
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
                target, tag = self._place(on, old_worker, actor.tag, timeout, wait=False)
            except BaseException as exc:
                error = exc
            else:
                box: list[BaseException | None] = []
                self._start(actor, target, True, state, box.append, timeout)
                self._wait(box, timeout, f"actor {actor.id} to start")
                error = box[0]
                if error is None:
                    actor.lost = None  # the new instance took over: the old one is moot
                    self._emit(actor, core.took_over(actor, target, tag, state))
                    self._flush(actor)
                    return True
        died = actor.take_lost()
        if died is None:
            if actor.state == "restarting" and self.sim._is_live(old_worker):
                self._emit(actor, core.reverted(actor, error))
                self._flush(actor)
                return False
            self._end(actor, "failed", error)
            return False
        # The old instance's process died meanwhile: nothing to revert to; supervise that death.
        self._instance_died(actor, core.lost_in_restart(died, error))
        self.rehome()
        return False

    # ---- ending -------------------------------------------------------------------

    def stop(self, actor: _SimActor) -> None:
        if actor.state in _TERMINAL or actor.state == "stopping":
            return
        if actor.state != "running":
            try:
                self.sim._wait_for(lambda: actor.state not in ("starting", "restarting"), self.timeout,
                                   f"actor {actor.id} to be running")
            except TimeoutError:
                return
        if actor.state != "running":
            return
        self._stop_now(actor)

    def _stop_now(self, actor: _SimActor) -> None:
        self._flush(actor)
        actor.state = core.advance(actor.state, "stop")
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
        futures, event = core.end(actor, state, error)
        if emit:
            self._emit(actor, event)
        core.fail_calls(actor, futures, state)
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
        return self.table.named(name)

    # ---- messages from workers ------------------------------------------------------

    def on_message(self, worker: bytes, msg: ActorEvent | ActorState) -> None:
        what, number, value = core.reply_of(msg)
        if what in ("checkpoint", "stopped", "nothing"):
            actor = self.table.by_instance.get(number)
            if actor is None:
                return
            if what == "stopped":
                self._end(actor, "stopped", None)
            elif what == "checkpoint" and self.sim._is_live(worker):
                core.note_checkpoint(actor, number, worker, value)
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
        hosted = [a for a in self.table.live() if a.worker == ident]
        for actor in hosted:
            died = core.died_here(actor, worker_id, exitcode)
            if actor.state == "restarting":
                actor.lost = died  # a hot restart in progress settles the loss itself
                continue
            self._instance_died(actor, died)
        self.rehome()

    def _instance_died(self, actor: _SimActor, died: ActorDiedError) -> None:
        """Queue a supervised restart of ``actor``, or end it as failed (then call :meth:`rehome`).

        As on a real runtime, the restart waits up to ``route_timeout`` for a
        live worker of the actor's tag (a replacement), then fails it with
        NoWorkerError.
        """
        if actor.policy != "on-failure" or not core.may_restart(
                actor.restarts, self.sim.now, self.max_restarts, self.restart_window):
            self._end(actor, "failed", died)
            return
        actor.state = core.advance(actor.state, "died")
        self._emit(actor, Failed(died, final=False))
        patience = core.route_patience(self.sim.config.route_timeout, self.timeout, None)

        def give_up() -> None:
            if actor in self.homeless:
                self.homeless.remove(actor)
                self._end(actor, "failed", self.sim.routing.no_worker_error(actor.tag, patience))

        actor.route_timer = self.sim._timer(patience, f"actor {actor.id} route timeout", give_up)
        self.homeless.append(actor)

    def rehome(self) -> None:
        """Start supervised actors whose worker died on a live worker of their tag, if one is there."""
        for actor in list(self.homeless):
            live = self._live_of(actor.tag)
            if not live:
                continue  # waits for one (a replacement) until its route timer fires
            self.homeless.remove(actor)
            self.sim._cancel(actor.route_timer)
            worker = core.least_loaded(live, self._hosting(), None)

            def done(error: BaseException | None, actor: _SimActor = actor, worker: bytes = worker) -> None:
                if error is not None:
                    self._end(actor, "failed", error)
                    return
                self._emit(actor, Started(worker.decode(), restored=actor.has_checkpoint))
                self._flush(actor)

            self._start(actor, worker, actor.has_checkpoint, actor.checkpoint, done, None)

    # ---- inspect ----------------------------------------------------------------------

    def nodes(self) -> dict[bytes, list[tuple[_SimActor, int]]]:
        return self.table.nodes()

    def convert_result(self, actor: _SimActor, method: str, value: Any) -> Any:
        return actor.convert_result(method, value)


# --------------------------------------------------------------------------- #
