"""``ActorRef``: the handle a caller holds on an actor.

Runs in the driver, in user threads. Attribute access gives a callable
method proxy: ``ref.incr(2)`` sends the call and returns a
:class:`phalanx.Future` (also awaitable). Refs are counted: when the last
ref of an actor that is not ``detached`` is garbage-collected, the actor is
stopped (mesh_worker: dropping the handle stops the worker).
"""

from __future__ import annotations

import typing
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .. import collected
from ..jobs import Future
from .events import ActorEvent

if typing.TYPE_CHECKING:
    from .system import ActorSystem, RuntimeTree, _Actor

__all__ = ["ActorRef"]

A = TypeVar("A")


class ActorRef(Generic[A]):
    """A handle on a running actor of type ``A``.

    Calls from many threads and many refs are safe; calls made by one thread
    arrive in the order it made them.
    """

    # ``__dict__`` holds the method callables once made: ``ref.incr`` then finds its
    # callable without a Python-level ``__getattr__`` call (a pipelined loop asks every call).
    __slots__ = ("_system", "_actor", "_inspect", "__dict__", "__weakref__")

    def __init__(self, system: ActorSystem, actor: _Actor, inspect: Callable[[float], RuntimeTree]) -> None:
        self._system = system
        self._actor = actor
        self._inspect = inspect
        system.retain(actor)
        weakref.finalize(self, collected.run, system.release, actor)  # the collector may hold a lock

    @property
    def id(self) -> int:
        """The actor's id (stable across restarts)."""
        return self._actor.id

    @property
    def name(self) -> str | None:
        """The name it was spawned with, if any."""
        return self._actor.name

    @property
    def worker(self) -> str:
        """The worker currently hosting the actor."""
        return self._actor.worker.decode()

    @property
    def state(self) -> str:
        """starting, running, restarting, stopping, stopped or failed."""
        return self._actor.state

    def __getattr__(self, method: str) -> Callable[..., Future[Any]]:
        if method.startswith("_"):
            raise AttributeError(method)
        system, actor = self._system, self._actor

        def call(*args: Any, **kwargs: Any) -> Future[Any]:
            return system.call(actor, method, args, kwargs)

        call.__name__ = method
        self.__dict__[method] = call  # found by plain attribute lookup from now on
        return call

    def __copy__(self) -> ActorRef[A]:
        # A ref of its own (the default copy skips __init__): it keeps the actor alive too.
        return ActorRef(self._system, self._actor, self._inspect)

    def __deepcopy__(self, memo: dict[int, Any]) -> ActorRef[A]:
        return self.__copy__()

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Call ``method`` by name (for methods whose names clash with ref attributes)."""
        return self._system.call(self._actor, method, args, kwargs)

    def restart(self, on: str | None = None, timeout: float | None = None) -> bool:
        """Hot restart: hand ``save()``'s state to ``restore()`` in a new instance.

        The new instance runs on worker ``on`` (a live worker's id, or a
        worker tag the actor moves to), or on another live worker of the
        actor's tag when one exists. Calls made meanwhile reach the new
        instance, in order. If the new instance fails to start, or no live
        worker matches ``on`` (nothing waits for one), ``RestartFailed`` is
        emitted, the old instance keeps serving, and this returns False.
        If the old instance's process dies meanwhile, the restart still
        completes when the new instance starts; otherwise there is nothing
        to revert to: this returns False and the death is handled as any
        other (``Failed``, and a supervised restart under ``on-failure``).
        """
        return self._system.restart(self._actor, on, timeout)

    def stop(self) -> None:
        """Stop after the calls already made; later calls fail with ActorDiedError."""
        self._system.stop(self._actor)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the actor has stopped or failed (without stopping it)."""
        self._system.join(self._actor, timeout)

    def events(self, timeout: float | None = None) -> Iterator[ActorEvent]:
        """Started / Stopped / Failed / RestartFailed, in order, until the actor ends."""
        return self._system.events(self._actor, timeout)

    def inspect(self, timeout: float = 1.0) -> RuntimeTree:
        """The inspect tree of the worker hosting this actor."""
        tree = self._inspect(timeout)
        from .system import RuntimeTree

        return RuntimeTree([w for w in tree.workers if any(a.id == self.id for a in w.actors)])

    def __repr__(self) -> str:
        return f"<ActorRef {self._actor.id} {self._actor.cls_name} {self._actor.state} on {self.worker}>"
