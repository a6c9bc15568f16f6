"""The actor lifecycle as data: states, the transitions between them, supervision.

No I/O, no threads, no clock: the driver's actor system
(:mod:`phalanx.actors.system`, user threads and the pump under each actor's
lock) and the simulator's (:mod:`phalanx.testing.sim`, one scheduler
thread) both move an actor through :data:`TRANSITIONS` with
:func:`advance`, decide supervised restarts with :func:`may_restart`, read
what workers say about actors with :func:`reply_of`, and place instances
with :func:`resolve_on` and :func:`least_loaded`. The record of an actor
(:class:`ActorRecord`), the table of a runtime's actors (:class:`ActorTable`)
and what happens to a call (:func:`hold_call`, :func:`flush_calls`,
:func:`worker_gone`) are the same code in both hosts; only how they wait
(threads and condition variables, or the simulator's scheduler) is theirs.

::

    starting ──started──▶ running ──stop──▶ stopping ──stopped──▶ stopped
                          │  ▲  ▲
                  restart │  │  │ started / revert (hot restart reverts)
                          ▼  │  │
                       restarting ◀──died (supervised, within intensity)── running
    any state not terminal ──failed──▶ failed        (terminal states absorb every event)

Invariants kept: a terminal actor never runs again (an event for it changes
nothing); a state changes only along the table (any other pair is a bug and
raises); supervision restarts an actor at most ``limit`` times within
``window`` seconds.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import re
import typing
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from ..actors.events import ActorEvent as Event
from ..actors.events import Failed, RestartFailed, Started, Stopped
from ..errors import ActorDiedError
from ..policy import DEFAULT_TAG, check_tag
from ..registry.actors import actor_name_of
from ..transport.codec import convert, encode, rebuild_error
from ..transport.messages import ActorCall, ActorEvent, ActorState

if typing.TYPE_CHECKING:
    from .tasks import Job

__all__ = ["STARTING", "RUNNING", "RESTARTING", "STOPPING", "STOPPED", "FAILED", "TERMINAL", "TRANSITIONS",
           "advance", "may_restart", "reply_of", "least_loaded", "return_type", "check_spawn", "end", "fail_calls",
           "died_here", "resolve_on", "route_patience", "no_live_error", "worker_gone", "lost_in_restart", "ActorRecord",
           "hold_call", "flush_calls", "note_checkpoint", "check_method", "ActorTable", "took_over", "reverted"]

#: the ids of workers a runtime starts itself ("w1", "w2", ...): never tag names
LOCAL_WORKER_ID = re.compile(r"^w[0-9]+$")

STARTING, RUNNING, RESTARTING, STOPPING, STOPPED, FAILED = (
    "starting", "running", "restarting", "stopping", "stopped", "failed")
TERMINAL = (STOPPED, FAILED)

#: (state, event) -> the next state
TRANSITIONS: dict[tuple[str, str], str] = {
    # an instance started: the first one, a hot restart's or a supervised restart's
    (STARTING, "started"): RUNNING,
    (RESTARTING, "started"): RUNNING,
    (STOPPING, "started"): STOPPING,
    # a hot restart begins: calls are held until it ends
    (RUNNING, "restart"): RESTARTING,
    # a hot restart failed: the old instance, never stopped, serves the held calls
    (RESTARTING, "revert"): RUNNING,
    # the process of the current instance died and supervision restarts it
    (RUNNING, "died"): RESTARTING,
    (RESTARTING, "died"): RESTARTING,
    (STOPPING, "died"): RESTARTING,
    (RUNNING, "stop"): STOPPING,
    **{(state, "stopped"): STOPPED for state in (STARTING, RUNNING, RESTARTING, STOPPING)},
    **{(state, "failed"): FAILED for state in (STARTING, RUNNING, RESTARTING, STOPPING)},
}


#: not looked up yet (``Any`` is a valid answer)
_UNKNOWN: Any = object()


class ActorRecord:
    """What a host records of one actor: the fields both hosts' lifecycles read and change.

    Made by ``spawn`` (which checks the options and the arguments, then takes
    the next id from ``ids``); the threaded host guards it with a lock of its
    own, the simulator's single thread needs none.
    """

    def __init__(self, ids: Iterator[int], cls: type | str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 name: str | None, detached: bool, policy: str, every: int, interval: float) -> None:
        check_spawn(policy, detached, name)
        self.cls_name = actor_name_of(cls)
        encode([list(args), kwargs], f"the arguments of {self.cls_name}")
        self.id = next(ids)
        self.cls = cls if isinstance(cls, type) else None
        self.args = list(args)
        self.kwargs = kwargs or None
        self.name = name
        self.detached = detached
        self.policy = policy
        self.every = every
        self.interval = interval
        #: the worker tag it keeps to across restarts
        self.tag = DEFAULT_TAG
        self.state = STARTING
        self.instance = 0
        self.worker = b""
        self.job: Job | None = None
        self.seqs = itertools.count()
        #: calls sent or held, by seq: (the caller's future, the method)
        self.futures: dict[int, tuple[Any, str]] = {}
        #: calls held while an instance (re)starts, sent in order once it runs
        self.held: deque[tuple[int, str, Any, dict[str, Any] | None]] = deque()
        self.events: list[Event] = []
        self.checkpoint: Any = None
        self.has_checkpoint = False
        self.restarts: deque[float] = deque()
        self.refs = 0
        self.calls = 0
        #: declared return type of each method called so far (reading annotations costs ~10 us)
        self.returns: dict[str, Any] = {}

    def convert_result(self, method: str, value: Any) -> Any:
        """A call's value as its method's declared return type says (as it came, if it does not convert)."""
        typ = self.returns.get(method, _UNKNOWN)
        if typ is _UNKNOWN:
            typ = self.returns[method] = return_type(self.cls, method)
        if typ is Any or type(value) is typ:
            return value  # nothing to check, or already of exactly that class (an int for int)
        try:
            return convert(value, typ)
        except Exception:
            return value


_R = TypeVar("_R", bound=ActorRecord)


class ActorTable(Generic[_R]):
    """The actors of one runtime, by id, by instance and by name, and the counters numbering them.

    The threaded host reads and changes it under its own lock.
    """

    def __init__(self) -> None:
        self.by_id: dict[int, _R] = {}
        self.by_instance: dict[int, _R] = {}
        self.names: dict[str, _R] = {}
        self.ids = itertools.count(1)
        self.instances = itertools.count(1)
        self.nonces = itertools.count(1)

    def add(self, actor: _R) -> None:
        """Record a new actor; ValueError if a live one already has its name."""
        if actor.name is not None:
            if actor.name in self.names and self.names[actor.name].state not in TERMINAL:
                raise ValueError(f"an actor named {actor.name!r} already exists")
            self.names[actor.name] = actor
        self.by_id[actor.id] = actor

    def named(self, name: str) -> _R:
        """The live actor named ``name`` (LookupError if none)."""
        actor = self.names.get(name)
        if actor is None or actor.state in TERMINAL:
            raise LookupError(f"no actor named {name!r}")
        return actor

    def live(self) -> list[_R]:
        """The actors not yet ended."""
        return [a for a in self.by_id.values() if a.state not in TERMINAL]

    def nodes(self) -> dict[bytes, list[tuple[_R, int]]]:
        """The live actors by the worker hosting them, with their instance (the inspect tree)."""
        out: dict[bytes, list[tuple[_R, int]]] = {}
        for a in self.live():
            out.setdefault(a.worker, []).append((a, a.instance))
        return out


def check_method(method: str) -> None:
    """AttributeError for a method no caller may reach remotely (a private one)."""
    if method.startswith("_"):
        raise AttributeError(f"actor methods starting with '_' cannot be called remotely: {method!r}")


def hold_call(actor: ActorRecord, fut: Any, method: str, a: Any, kw: dict[str, Any] | None) -> bool:
    """Queue a call until it can be sent; True if the actor runs (the host then flushes).

    A call to an ended actor fails at once with :class:`~phalanx.ActorDiedError`.
    """
    if actor.state in TERMINAL:
        fut.set_exception(ActorDiedError(f"actor {actor.id} ({actor.cls_name}) is {actor.state}"))
        return False
    seq = next(actor.seqs)
    actor.futures[seq] = (fut, method)
    actor.held.append((seq, method, a, kw))
    return actor.state == RUNNING


def flush_calls(actor: ActorRecord, submit: Callable[[Job, ActorCall, bytes, bytes], bool]) -> None:
    """Send held calls, in order, to the current instance with the host's ``submit(job, msg, frame, worker)``.

    A call its worker is gone for is held again (supervised) or failed: see :func:`worker_gone`.
    """
    job = actor.job
    assert job is not None
    while actor.held and actor.state in (RUNNING, STOPPING):
        seq, method, a, kw = actor.held.popleft()
        msg = ActorCall(job.id, seq, 0, actor.instance, method, a, kw)
        if not submit(job, msg, encode(msg), actor.worker):
            if worker_gone(actor, seq, method, a, kw):
                return  # held again: sent after the restart


def note_checkpoint(actor: ActorRecord, instance: int, worker: bytes, state: Any) -> None:
    """A periodic save of ``instance`` on ``worker`` (a live one): the checkpoint if it is still the current one."""
    if actor.instance == instance and actor.worker == worker:
        actor.checkpoint, actor.has_checkpoint = state, True


def advance(state: str, event: str) -> str:
    """The state after ``event``; a terminal state absorbs every event."""
    if state in TERMINAL:
        return state
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ValueError(f"an actor that is {state} cannot take the event {event!r}") from None


def may_restart(restarts: deque[float], now: float, limit: int, window: float) -> bool:
    """Whether supervision may restart once more (then it is recorded at ``now``)."""
    while restarts and now - restarts[0] > window:
        restarts.popleft()
    if len(restarts) >= limit:
        return False
    restarts.append(now)
    return True


def reply_of(msg: ActorEvent | ActorState) -> tuple[str, int, Any]:
    """What a worker says about an actor, as ``(what, number, value)``.

    ``("checkpoint", instance, state)`` (a periodic save; ``"nothing"`` if it failed),
    ``("stopped", instance, None)``, or the answer to a wait:
    ``("state", nonce, (state, error))`` or ``("event", instance, (kind, error))``.
    """
    if isinstance(msg, ActorState):
        if msg.nonce == 0:
            if msg.error is not None:
                return "nothing", msg.instance, None  # a periodic save that failed: keep the last one
            return "checkpoint", msg.instance, msg.state
        return "state", msg.nonce, (msg.state, rebuild_error(msg.error) if msg.error else None)
    if msg.kind == "stopped":
        return "stopped", msg.instance, None
    return "event", msg.instance, (msg.kind, rebuild_error(msg.error) if msg.error is not None else None)


def least_loaded(live: dict[bytes, int], hosting: Iterable[bytes], exclude: bytes | None) -> bytes:
    """The live worker hosting fewest actors (then holding fewest tasks), ``exclude`` only if alone."""
    counts = dict.fromkeys(live, 0)
    for worker in hosting:
        if worker in counts:
            counts[worker] += 1
    candidates = [w for w in live if w != exclude] or list(live)
    return min(candidates, key=lambda w: (counts[w], live[w]))


def return_type(cls: type | None, method: str) -> Any:
    """The return annotation of ``cls.method`` (``Any`` when absent or unreadable)."""
    fn = getattr(cls, method, None) if cls is not None else None
    if fn is None:
        return Any
    try:
        return typing.get_type_hints(fn).get("return", Any)
    except Exception:
        return Any


def check_spawn(restart_policy: str, detached: bool, name: str | None) -> None:
    """``ValueError`` for spawn options that do not go together."""
    if restart_policy not in ("never", "on-failure"):
        raise ValueError(f"restart_policy must be 'never' or 'on-failure', got {restart_policy!r}")
    if detached and not name:
        raise ValueError("a detached actor needs a name= to be found again")


class Ending(typing.Protocol):
    """What ``end`` changes of an actor's record."""

    id: int
    cls_name: str
    state: str
    futures: dict[int, tuple[Any, str]]
    held: deque[Any]


def end(actor: Ending, state: str, error: BaseException | None) -> tuple[list[Any], Event]:
    """Move ``actor`` to the terminal ``state``: the futures of its calls to fail, and the event to emit.

    The host emits the event (if it emits), fails the futures with
    :func:`fail_calls` outside its locks, and closes the actor's job.
    """
    actor.state = advance(actor.state, state)
    futures = [fut for fut, _ in actor.futures.values()]
    actor.futures.clear()
    actor.held.clear()
    return futures, Stopped() if state == STOPPED else Failed(error or ActorDiedError("failed"))


def fail_calls(actor: Ending, futures: Iterable[Any], state: str) -> None:
    """Fail the calls still waiting on an actor that ended in ``state``."""
    died = ActorDiedError(f"actor {actor.id} ({actor.cls_name}) {state}")
    for fut in futures:
        if not fut.done():
            try:
                fut.set_exception(died)
            except concurrent.futures.InvalidStateError:
                pass


def died_here(actor: Ending, worker_id: str, exitcode: int | None) -> ActorDiedError:
    """The error for an actor whose process died."""
    return ActorDiedError(f"the process of actor {actor.id} ({actor.cls_name}) on worker {worker_id} died "
                          f"(exit code {exitcode})")


def resolve_on(on: str | None, tag: str, live: Container[bytes], tags_of: Mapping[str, tuple[str, ...]],
               known: Container[bytes]) -> tuple[bytes | None, str]:
    """Where ``spawn(on=...)`` / ``restart(on=...)`` places an instance, and the tag the actor keeps to.

    ``(worker, tag)`` when ``on`` names a live worker (``tags_of`` lists the
    live workers' tags); ``(None, tag)`` when a worker of that tag is to be
    found (``on`` is a tag, or None: the actor stays in ``tag``). A worker
    that died (``known``) or never was (a local worker id) is a LookupError,
    not a tag to wait for.
    """
    if on is None:
        return None, tag
    if on.encode() in live:
        held = tags_of.get(on, ())
        keep = tag if tag in held else DEFAULT_TAG if DEFAULT_TAG in held or not held else held[0]
        return on.encode(), keep
    if on.encode() in known or LOCAL_WORKER_ID.match(on):
        raise LookupError(f"worker {on!r} is not live; live: {sorted(tags_of)}")
    try:
        return None, check_tag(on)
    except ValueError:
        raise LookupError(f"no live worker or tag {on!r}; live: {sorted(tags_of)}") from None


def route_patience(route_timeout: float, call_timeout: float, timeout: float | None) -> float:
    """How long a spawn or supervised restart waits for a live worker of its tag."""
    return min(route_timeout, call_timeout if timeout is None else timeout)


def no_live_error(tag: str, tags_of: Mapping[str, tuple[str, ...]]) -> LookupError:
    """A hot restart found no live worker of ``tag`` (it does not wait: the old instance serves on)."""
    return LookupError(f"no live worker or worker of tag {tag!r}; live: {sorted(tags_of.items())}")


class Holding(Ending, typing.Protocol):
    """What :func:`worker_gone` changes of an actor's record."""

    policy: str


def worker_gone(actor: Holding, seq: int, method: str, a: Any, kw: dict[str, Any] | None) -> bool:
    """Call ``seq`` could not be sent: its worker is gone (under the host's actor lock).

    The call never reached the dead worker, so a supervised actor's call
    waits (held, at the front) for the restart the worker's exit brings;
    True then. Otherwise it fails with :class:`~phalanx.ActorDiedError`.
    """
    if actor.policy == "on-failure":
        actor.held.appendleft((seq, method, a, kw))
        return True
    entry = actor.futures.pop(seq, None)
    if entry is not None and not entry[0].done():
        try:
            entry[0].set_exception(ActorDiedError(f"the worker of actor {actor.id} is gone"))
        except concurrent.futures.InvalidStateError:
            pass
    return False


def took_over(actor: ActorRecord, target: bytes, tag: str, state: Any) -> Started:
    """A hot restart's new instance on ``target`` took over: the actor keeps to ``tag``, ``state`` is its checkpoint.

    Returns the event to emit (the host then sends the held calls).
    """
    actor.tag = tag
    actor.checkpoint, actor.has_checkpoint = state, True
    return Started(target.decode(), restored=True)


def reverted(actor: ActorRecord, error: BaseException | None) -> RestartFailed:
    """A hot restart failed with ``error`` and the old instance, never stopped, serves on: the event to emit."""
    actor.state = advance(actor.state, "revert")
    return RestartFailed(error or ActorDiedError("the hot restart failed"))


def lost_in_restart(lost: ActorDiedError, error: BaseException | None) -> ActorDiedError:
    """The death to supervise when the old instance's process died during a hot restart that failed."""
    died = ActorDiedError(f"{lost}, during a hot restart that could not take over: {error}")
    died.__cause__ = error
    return died
