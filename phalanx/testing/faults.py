"""Fault plans and the engine that applies them to the frames of a runtime.

Runs in the driver process (the test process): the same :class:`FaultEngine`
sits between the driver and its workers in :class:`~phalanx.testing.SimRuntime`
(on its virtual links) and in a real :class:`phalanx.Runtime` (through the
driver's ``frame_filter`` hook, see :mod:`phalanx.testing.inject`), so a plan
means the same thing on both.

A **fault plan** is a list of typed steps. Each step names *which* message or
task it hits by counting, never by time, so a plan is deterministic and
shrinks well::

    [KillWorker(task=3, when="during"), DropMessage(kind="result", index=0)]

The ``repr`` of every step is valid Python: a plan printed by a failing test
can be pasted back as a regression test (``from phalanx.testing import *``).

What is counted:

* **tasks**: the task frames the driver sends (``Call``, ``Chunk``,
  ``ActorCall``), in send order from 0; a redelivered task is counted again.
* **messages of a kind**: ``"task"`` (those same frames, driver -> worker),
  ``"result"`` (``Results`` frames, worker -> driver), ``"control"``
  (``SpawnActor``/``StopActor``/``SaveActor``, driver -> worker) and
  ``"event"`` (``ActorEvent``/``ActorState``, worker -> driver). Other
  frames (handshake, heartbeats, inspect replies...) are never counted nor
  hit by message steps; a partition holds them too.
* **restarts**: ``SpawnActor`` frames that restore a saved state (hot
  restarts and supervised restarts from a checkpoint).

Invariant kept: a step fires at most once, and the engine never invents a
frame -- it passes, holds, drops, repeats or (for :class:`FailRestart`)
rewrites frames the driver or a worker really produced.
"""

from __future__ import annotations

import heapq
import itertools
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

import msgspec

from ..errors import PhalanxError, ProtocolError
from ..registry.actors import actor
from ..transport.codec import decode_driver, decode_inbox, encode
from ..transport.shm import peeking
from ..transport.messages import (
    ActorCall,
    ActorEvent,
    ActorState,
    Call,
    Chunk,
    Results,
    SaveActor,
    SpawnActor,
    StopActor,
)

__all__ = [
    "Fault",
    "KillWorker",
    "DropMessage",
    "DelayMessage",
    "DuplicateMessage",
    "ReorderMessages",
    "FailRestart",
    "PartitionHost",
    "FaultPlan",
    "InjectedFault",
    "FaultEngine",
    "plan_repr",
    "resolve_plan",
    "KINDS",
    "WHENS",
]

When = Literal["before", "during", "after"]
Kind = Literal["task", "result", "control", "event"]

#: message kinds a message fault can target
KINDS: tuple[str, ...] = ("task", "result", "control", "event")
#: when a KillWorker strikes, relative to its task
WHENS: tuple[str, ...] = ("before", "during", "after")

#: seconds a ReorderMessages step holds a message at most: when no later message of
#: its kind comes on that link meanwhile, it is released in order ("released unreordered")
REORDER_HOLD = 0.05


class InjectedFault(PhalanxError, RuntimeError):
    """The error an injected fault produces (for example a failed restart)."""


class Fault(msgspec.Struct, frozen=True, kw_only=True, repr_omit_defaults=True):
    """Base of every fault step (a frozen struct whose repr is valid Python)."""

    def _check_index(self, name: str, value: int) -> None:
        if value < 0:
            raise ValueError(f"{type(self).__name__}: {name} must be >= 0, got {value}")


def _check_kind(step: Fault, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{type(step).__name__}: kind must be one of {KINDS}, got {kind!r}")


class KillWorker(Fault, frozen=True, kw_only=True, repr_omit_defaults=True):
    """SIGKILL the worker that receives task number ``task``.

    ``when="before"``: it dies before running the task (the task frame is
    lost with it). ``"during"``: it runs the task -- side effects happen --
    and dies before its outcome, or anything it sends after, reaches the
    driver. ``"after"``: it dies once the outcome was sent.
    """

    task: int
    when: When = "during"

    def __post_init__(self) -> None:
        self._check_index("task", self.task)
        if self.when not in WHENS:
            raise ValueError(f"KillWorker: when must be one of {WHENS}, got {self.when!r}")


class DropMessage(Fault, frozen=True, kw_only=True, repr_omit_defaults=True):
    """Lose message number ``index`` of ``kind`` for good."""

    kind: Kind = "result"
    index: int

    def __post_init__(self) -> None:
        _check_kind(self, self.kind)
        self._check_index("index", self.index)


class DelayMessage(Fault, frozen=True, kw_only=True, repr_omit_defaults=True):
    """Hold message number ``index`` of ``kind`` for ``seconds``; later ones overtake it."""

    kind: Kind = "result"
    index: int
    seconds: float = 0.05

    def __post_init__(self) -> None:
        _check_kind(self, self.kind)
        self._check_index("index", self.index)
        if self.seconds < 0:
            raise ValueError(f"DelayMessage: seconds must be >= 0, got {self.seconds}")


class DuplicateMessage(Fault, frozen=True, kw_only=True, repr_omit_defaults=True):
    """Deliver message number ``index`` of ``kind`` twice."""

    kind: Kind = "result"
    index: int

    def __post_init__(self) -> None:
        _check_kind(self, self.kind)
        self._check_index("index", self.index)


class ReorderMessages(Fault, frozen=True, kw_only=True, repr_omit_defaults=True):
    """Deliver message number ``index`` of ``kind`` after the next one on the same link.

    The message is held until the next message of that kind on the same
    link (the same worker, the same direction) passes, for at most
    ``REORDER_HOLD`` (50 ms, virtual on a SimRuntime). If none comes
    meanwhile it is released in order, and ``fired`` says "released
    unreordered" rather than "reordered".
    """

    kind: Kind = "result"
    index: int

    def __post_init__(self) -> None:
        _check_kind(self, self.kind)
        self._check_index("index", self.index)


class FailRestart(Fault, frozen=True, kw_only=True, repr_omit_defaults=True):
    """Make actor restart number ``restart`` fail to start (its new instance raises)."""

    restart: int

    def __post_init__(self) -> None:
        self._check_index("restart", self.restart)


class PartitionHost(Fault, frozen=True, kw_only=True, repr_omit_defaults=True):
    """Cut the host of the worker that receives task ``task`` off for ``seconds``.

    Every frame to or from that worker -- tasks, results, events, heartbeats,
    any kind -- from that task on, is held and delivered in order when the
    partition heals. On a real runtime the cut covers every worker of that
    worker's host (remote workers, grouped by the host name they joined
    with); a local worker, or a :class:`~phalanx.testing.SimRuntime` worker,
    is cut off alone. A worker whose heartbeats stop for
    ``heartbeat_timeout`` is declared lost meanwhile and its tasks are
    redelivered: remote workers of a real runtime, and every worker of a
    ``SimRuntime`` built with ``heartbeat_timeout``. The driver's broadcasts
    (its own heartbeats, ``Terminate``) are not held.
    """

    task: int
    seconds: float = 0.2

    def __post_init__(self) -> None:
        self._check_index("task", self.task)
        if self.seconds < 0:
            raise ValueError(f"PartitionHost: seconds must be >= 0, got {self.seconds}")


FaultStep = Union[KillWorker, DropMessage, DelayMessage, DuplicateMessage, ReorderMessages, FailRestart, PartitionHost]

FaultPlan = list[FaultStep]
"""A fault plan: a list of steps (any sequence of :class:`Fault` is accepted)."""


def plan_repr(plan: Sequence[Fault]) -> str:
    """``[KillWorker(task=1), ...]``: valid Python once ``phalanx.testing``'s names are imported."""
    return "[" + ", ".join(repr(step) for step in plan) + "]"


def resolve_plan(faults: Any) -> list[Fault]:
    """A plan from ``faults=``: None, a sequence of steps, or a hypothesis strategy.

    A strategy is drawn from the running ``@given`` test's own data (so the
    plan shrinks with the example, and is printed with it through
    ``hypothesis.note``); outside a Hypothesis test it is an error.
    """
    if faults is None:
        return []
    if isinstance(faults, Fault):
        return [faults]
    strategies = sys.modules.get("hypothesis.strategies")
    if strategies is not None and isinstance(faults, strategies.SearchStrategy):
        from hypothesis import note
        from hypothesis.control import current_build_context
        from hypothesis.errors import InvalidArgument

        try:
            context = current_build_context()
        except InvalidArgument:
            raise TypeError(
                "faults= a hypothesis strategy draws its plan from the running @given test; "
                "outside one, pass a list of fault steps (or use phalanx.testing.find_failing_plan)"
            ) from None
        drawn = context.data.draw(faults)
        plan = resolve_plan(drawn)
        note(f"faults={plan_repr(plan)}")
        return plan
    plan = list(faults)
    for step in plan:
        if not isinstance(step, Fault):
            raise TypeError(f"a fault plan holds fault steps (KillWorker, DropMessage, ...), got {step!r}")
    return plan


# --------------------------------------------------------------------------- #
# The engine
# --------------------------------------------------------------------------- #

#: an actor class the engine substitutes for a restart it makes fail
FAILED_RESTART_CLS = "phalanx.testing.faults:InjectedRestartFailure"


@actor
class InjectedRestartFailure:
    """Stands in for an actor whose restart a :class:`FailRestart` step makes fail."""

    def __init__(self, reason: str) -> None:
        raise InjectedFault(reason)


def _out_kind(msg: Any) -> str | None:
    if isinstance(msg, (Call, Chunk, ActorCall)):
        return "task"
    if isinstance(msg, (SpawnActor, StopActor, SaveActor)):
        return "control"
    return None


def _in_kind(msg: Any) -> str | None:
    if isinstance(msg, Results):
        return "result"
    if isinstance(msg, (ActorEvent, ActorState)):
        return "event"
    return None


#: the engine's answer about a frame: the frames to pass now, and a kill
#: (None; "now": kill the worker; "after": kill it once these frames were handled)
Verdict = tuple[list[bytes], str | None]


class FaultEngine:
    """Applies one fault plan to the frames between a driver and its workers.

    ``outgoing(ident, frame, now)`` is asked about every frame the driver
    sends to worker ``ident``, ``incoming(ident, frame, now)`` about every
    frame the driver receives from it; each returns the frames to pass now
    (none: dropped or held; two: duplicated) and whether to kill that
    worker. Held frames come back from ``release(now)`` once due. ``fired``
    lists the steps that took effect, in order. ``host_of(ident)``, if
    given, names the host a worker runs on ("" for none): a
    :class:`PartitionHost` then cuts off every worker of that host.
    Thread-safe.
    """

    def __init__(self, plan: Sequence[Fault], host_of: Callable[[bytes], str] | None = None) -> None:
        self.plan: list[Fault] = list(plan)
        #: the host a worker runs on ("": none known, it is cut off alone)
        self._host_of = host_of
        self.fired: list[tuple[Fault, str]] = []
        self._lock = threading.Lock()
        self._tasks = 0
        self._restarts = 0
        self._counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        #: (job, seq, attempt) of a watched task -> its KillWorker step
        self._watched: dict[tuple[int, int, int], KillWorker] = {}
        #: workers a "during" kill struck: nothing more from them passes
        self._dead: set[bytes] = set()
        #: worker -> time its partition heals; host -> the same, for whole hosts
        self._partitions: dict[bytes, float] = {}
        self._host_partitions: dict[str, float] = {}
        #: held frames: (release time, order, direction, worker, frame)
        self._held: list[tuple[float, int, str, bytes, bytes]] = []
        self._order = itertools.count()
        #: a frame held by ReorderMessages: (kind, worker) -> (heap entry, its step, what it is)
        self._reorder: dict[tuple[str, bytes], tuple[tuple[float, int, str, bytes, bytes], Fault, str]] = {}
        self._by_kind: dict[str, list[Fault]] = {}
        self._kills_by_task: dict[int, KillWorker] = {}
        self._partition_by_task: dict[int, PartitionHost] = {}
        self._restart_steps: dict[int, FailRestart] = {}
        for step in self.plan:
            if isinstance(step, KillWorker):
                self._kills_by_task.setdefault(step.task, step)
            elif isinstance(step, PartitionHost):
                self._partition_by_task.setdefault(step.task, step)
            elif isinstance(step, FailRestart):
                self._restart_steps.setdefault(step.restart, step)
            else:
                kind = getattr(step, "kind")
                self._by_kind.setdefault(kind, []).append(step)

    def adopt(self, other: FaultEngine) -> None:
        """Continue counting where ``other`` (an engine this one replaces) stopped."""
        with other._lock:
            self._tasks, self._restarts = other._tasks, other._restarts
            self._counts = dict(other._counts)
            self._watched.update(other._watched)
            self._dead |= other._dead
            self._partitions.update(other._partitions)
            self._host_partitions.update(other._host_partitions)
            self._held = list(other._held)
            self._reorder = dict(other._reorder)
            self._order = other._order

    @property
    def active(self) -> bool:
        """Whether the plan has any step at all."""
        return bool(self.plan)

    def _fire(self, step: Fault, note: str) -> None:
        self.fired.append((step, note))

    # ---- per-message steps ----------------------------------------------------

    def _message_steps(self, kind: str, index: int) -> list[Fault]:
        return [s for s in self._by_kind.get(kind, ()) if getattr(s, "index") == index]

    def _apply_message(self, direction: str, kind: str, ident: bytes, frame: bytes, now: float) -> list[bytes]:
        index = self._counts[kind]
        self._counts[kind] = index + 1
        frames = [frame]
        reordered = self._reorder.pop((kind, ident), None)
        steps = self._message_steps(kind, index)
        for step in steps:
            note = f"{kind} message {index} ({direction} {ident.decode(errors='replace')})"
            if isinstance(step, DropMessage):
                self._fire(step, "dropped " + note)
                frames = []
            elif isinstance(step, DuplicateMessage) and frames:
                self._fire(step, "duplicated " + note)
                frames = frames + [frame]
            elif isinstance(step, DelayMessage) and frames:
                self._fire(step, f"delayed {note} by {step.seconds:g} s")
                for f in frames:
                    heapq.heappush(self._held, (now + step.seconds, next(self._order), direction, ident, f))
                frames = []
            elif isinstance(step, ReorderMessages) and frames and len(frames) == 1:
                # Fires once resolved: when the next message passes, or at the deadline.
                entry = (now + REORDER_HOLD, next(self._order), direction, ident, frame)
                heapq.heappush(self._held, entry)
                self._reorder[(kind, ident)] = (entry, step, note)
                frames = []
        if reordered is not None:
            entry, step, held = reordered
            try:
                self._held.remove(entry)
            except ValueError:
                pass  # already released by its deadline (and reported then)
            else:
                heapq.heapify(self._held)
                if frames:
                    self._fire(step, f"reordered {held}: delivered after {kind} message {index}")
                else:
                    self._fire(step, f"released {held} unreordered: {kind} message {index}, "
                                     "the next one, was itself dropped or held")
                # The held message goes right after this one.
                frames = frames + [entry[4]]
        return frames

    def _partition_of(self, worker: bytes) -> tuple[bytes | str, float] | None:
        """The partition ``worker`` is in: (its key, when it heals), or None."""
        until = self._partitions.get(worker)
        if until is not None:
            return worker, until
        if self._host_partitions and self._host_of is not None:
            host = self._host_of(worker)
            until = self._host_partitions.get(host) if host else None
            if until is not None:
                return host, until
        return None

    def _partition(self, ident: bytes, seconds: float, now: float) -> str:
        """Cut off ``ident`` (and every worker of its host, if it has one); says which."""
        host = self._host_of(ident) if self._host_of is not None else ""
        if host:
            self._host_partitions[host] = now + seconds
            return f"host {host} (every worker of it, {ident.decode()} first)"
        self._partitions[ident] = now + seconds
        return ident.decode()

    def _partitioned(self, direction: str, worker: bytes, ident: bytes, frames: list[bytes],
                     now: float) -> list[bytes]:
        cut = self._partition_of(worker)
        if cut is None:
            return frames
        key, until = cut
        if now >= until:
            if isinstance(key, bytes):
                del self._partitions[key]
            else:
                del self._host_partitions[key]
            return frames
        for f in frames:
            heapq.heappush(self._held, (until, next(self._order), direction, ident, f))
        return []

    # ---- the two directions ----------------------------------------------------

    def outgoing(self, ident: bytes, frame: bytes, now: float) -> Verdict:
        """A frame the driver sends to worker ``ident``."""
        with self._lock:
            try:
                with peeking():  # looked at, not received: an array's segment stays for the worker
                    msg = decode_inbox(frame)
            except ProtocolError:
                msg = None
            kind = _out_kind(msg)
            if kind is None:  # not counted, but a partition holds it too
                return self._partitioned("out", ident, ident, [frame], now), None
            kill: str | None = None
            if kind == "task":
                assert isinstance(msg, (Call, Chunk, ActorCall))
                number = self._tasks
                self._tasks += 1
                step = self._kills_by_task.get(number)
                if step is not None:
                    if step.when == "before":
                        self._fire(step, f"killed {ident.decode()} before task {number}")
                        self._counts[kind] += 1
                        return [], "now"
                    self._watched[(msg.job, msg.seq, msg.attempt)] = step
                part = self._partition_by_task.get(number)
                if part is not None:
                    what = self._partition(ident, part.seconds, now)
                    self._fire(part, f"partitioned {what} for {part.seconds:g} s from task {number}")
            elif isinstance(msg, SpawnActor) and msg.restored:
                number = self._restarts
                self._restarts += 1
                failing = self._restart_steps.get(number)
                if failing is not None:
                    self._fire(failing, f"made restart {number} (instance {msg.instance}) fail")
                    frame = encode(SpawnActor(msg.instance, FAILED_RESTART_CLS,
                                              [f"restart {number} failed (injected by FailRestart)"], None))
            frames = self._apply_message("out", kind, ident, frame, now)
            return self._partitioned("out", ident, ident, frames, now), kill

    def incoming(self, ident: bytes, frame: bytes, now: float) -> Verdict:
        """A frame the driver receives from worker ``ident`` (``b"w1!"``: its control thread)."""
        worker = ident[:-1] if ident.endswith(b"!") else ident
        with self._lock:
            if worker in self._dead:
                return [], None
            try:
                with peeking():
                    msg = decode_driver(frame)
            except ProtocolError:
                msg = None
            kind = _in_kind(msg)
            if kind is None:  # heartbeats, inspect replies...: not counted, but a partition holds them
                return self._partitioned("in", worker, ident, [frame], now), None
            kill: str | None = None
            if isinstance(msg, Results) and self._watched:
                for outcome in msg.outcomes:
                    step = self._watched.pop((outcome.job, outcome.seq, outcome.attempt), None)
                    if step is None:
                        continue
                    self._fire(step, f"killed {worker.decode()} {step.when} task "
                                     f"(job {outcome.job}, seq {outcome.seq}, attempt {outcome.attempt})")
                    if step.when == "during":
                        self._dead.add(worker)
                        self._counts[kind] += 1
                        return [], "now"
                    kill = "after"
            frames = self._apply_message("in", kind, ident, frame, now)
            return self._partitioned("in", worker, ident, frames, now), kill

    # ---- held frames ---------------------------------------------------------------

    def next_release(self) -> float | None:
        """When the earliest held frame is due (None: nothing held)."""
        with self._lock:
            return self._held[0][0] if self._held else None

    def release(self, now: float) -> list[tuple[str, bytes, bytes]]:
        """Held frames now due, in order: ``(direction, worker, frame)``."""
        out: list[tuple[str, bytes, bytes]] = []
        with self._lock:
            while self._held and self._held[0][0] <= now:
                entry = heapq.heappop(self._held)
                for key, (held, step, note) in list(self._reorder.items()):
                    if held is entry:
                        del self._reorder[key]
                        self._fire(step, f"released {note} unreordered: no later {key[0]} message on "
                                         f"that link within {REORDER_HOLD * 1000:g} ms")
                out.append((entry[2], entry[3], entry[4]))
        return out

    def partition_until(self, ident: bytes) -> float | None:
        """When worker ``ident``'s partition heals (None: it is not partitioned)."""
        with self._lock:
            cut = self._partition_of(ident)
            return None if cut is None else cut[1]

    def forget_worker(self, ident: bytes) -> None:
        """Worker ``ident`` is gone: drop its partition (its held frames still release)."""
        with self._lock:
            self._partitions.pop(ident, None)

    def report(self) -> str:
        """What fired, one line per step."""
        return "\n".join(f"{step!r}: {note}" for step, note in self.fired) or "(no fault fired)"

