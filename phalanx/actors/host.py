"""The worker side of actors: instances, their calls, save and restore.

Runs in worker processes, on the main thread (the same loop that runs
tasks), and in :class:`~phalanx.testing.SimRuntime`'s simulated workers (with
the virtual clock), so an actor handles one message at a time, in the order its worker's
inbox received them: calls, saves and stops of one actor never overtake each
other.

Invariants kept: an unknown actor type is ``UnsupportedActorError`` in an
``ActorEvent(failed)``; an exception in ``__init__``, ``restore``, a method or
``save`` is reported to the driver and the worker keeps serving; only public
methods can be called.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ..registry.actors import actor_type_hint, resolve_actor
from ..registry.operations import Operation
from ..transport.codec import convert, error_info
from ..transport.messages import (
    ActorCall,
    ActorEvent,
    ActorInfo,
    ActorState,
    Err,
    Ok,
    Outcome,
    SaveActor,
    SpawnActor,
    StopActor,
)

__all__ = ["ActorHost"]


class _Instance:
    __slots__ = ("id", "cls_name", "obj", "ops", "calls", "since_save", "saved_at", "every", "interval")

    def __init__(self, msg: SpawnActor, obj: Any, now: float) -> None:
        self.id = msg.instance
        self.cls_name = msg.cls
        self.obj = obj
        self.ops: dict[str, Operation] = {}
        self.calls = 0
        self.since_save = 0
        self.saved_at = now
        self.every = msg.checkpoint_every
        self.interval = msg.checkpoint_interval


class ActorHost:
    """Actor instances living in this worker process."""

    def __init__(
        self,
        worker_id: str,
        send: Callable[[Any], None],
        call: Callable[[Operation, Sequence[Any], dict[str, Any] | None], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker_id = worker_id
        #: when checkpoints were taken (a simulated worker passes its virtual clock)
        self.clock = clock
        self.send = send  # sends a message on the outbox, after pending outcomes
        self.call_op = call
        self.instances: dict[int, _Instance] = {}

    def spawn(self, msg: SpawnActor) -> None:
        try:
            cls = resolve_actor(msg.cls)
            if msg.restored:
                restore = getattr(cls, "restore", None)
                if restore is None:
                    raise TypeError(f"actor {msg.cls} has no restore() classmethod to resume from state")
                obj = restore(convert(msg.state, actor_type_hint(cls, "restore")))
            else:
                obj = self.call_op(Operation(msg.cls, cls), msg.args, msg.kwargs)
        except BaseException as exc:  # user code may raise anything; the worker survives
            self.send(ActorEvent(self.worker_id, msg.instance, "failed", error_info(exc)))
            return
        self.instances[msg.instance] = _Instance(msg, obj, self.clock())
        self.send(ActorEvent(self.worker_id, msg.instance, "started"))

    def _method(self, inst: _Instance, name: str) -> Operation:
        op = inst.ops.get(name)
        if op is None:
            fn = getattr(inst.obj, name, None) if not name.startswith("_") else None
            if fn is None or not callable(fn):
                raise AttributeError(f"actor {inst.cls_name} has no public method {name!r}")
            op = inst.ops[name] = Operation(f"{inst.cls_name}.{name}", fn)
        return op

    def call(self, msg: ActorCall) -> Outcome:
        inst = self.instances.get(msg.instance)
        try:
            if inst is None:
                raise LookupError(f"actor instance {msg.instance} is not on worker {self.worker_id}")
            op = inst.ops.get(msg.method) or self._method(inst, msg.method)  # (a method called before: no call)
            value = self.call_op(op, msg.args, msg.kwargs)
        except BaseException as exc:
            outcome: Outcome = Err(msg.job, msg.seq, msg.attempt, error_info(exc))
        else:
            outcome = Ok(msg.job, msg.seq, msg.attempt, value)
        if inst is not None:
            inst.calls += 1
            inst.since_save += 1
        return outcome

    def checkpoint_due(self, instance: int) -> bool:
        inst = self.instances.get(instance)
        if inst is None:
            return False
        return (inst.every > 0 and inst.since_save >= inst.every) or (
            inst.interval > 0 and self.clock() - inst.saved_at >= inst.interval and inst.since_save > 0
        )

    def save(self, instance: int, nonce: int) -> None:
        inst = self.instances.get(instance)
        try:
            if inst is None:
                raise LookupError(f"actor instance {instance} is not on worker {self.worker_id}")
            saver = getattr(inst.obj, "save", None)
            if saver is None:
                raise TypeError(f"actor {inst.cls_name} has no save() method to take its state")
            state = saver()
        except BaseException as exc:
            self.send(ActorState(self.worker_id, instance, nonce, error=error_info(exc)))
            return
        inst.since_save = 0
        inst.saved_at = self.clock()
        self.send(ActorState(self.worker_id, instance, nonce, state))

    def handle(self, msg: SpawnActor | StopActor | SaveActor) -> None:
        if isinstance(msg, SpawnActor):
            self.spawn(msg)
        elif isinstance(msg, SaveActor):
            self.save(msg.instance, msg.nonce)
        elif isinstance(msg, StopActor):
            inst = self.instances.pop(msg.instance, None)
            if not msg.quiet:
                self.send(ActorEvent(self.worker_id, msg.instance, "stopped"))
            del inst

    def info(self, queued: list[Any]) -> list[ActorInfo]:
        mailbox: dict[int, int] = {}
        for msg in queued:
            if isinstance(msg, ActorCall):
                mailbox[msg.instance] = mailbox.get(msg.instance, 0) + 1
        return [
            ActorInfo(inst.id, inst.cls_name, mailbox.get(inst.id, 0), inst.calls)
            for inst in list(self.instances.values())
        ]
