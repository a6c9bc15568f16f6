"""Actor lifecycle events (mesh_worker's ``WorkerEvent``).

Runs in the driver: the actor system appends one of these to an actor's
event log whenever an instance starts, stops or fails, and ``ref.events()``
yields them in order. ``Stopped`` and a final ``Failed`` end the log.
"""

from __future__ import annotations

from typing import Union

import msgspec

__all__ = ["Started", "Stopped", "Failed", "RestartFailed", "ActorEvent"]


class Started(msgspec.Struct, frozen=True):
    """An instance started (first spawn, hot restart, or supervised restart)."""

    worker: str
    restored: bool = False


class Stopped(msgspec.Struct, frozen=True):
    """The actor stopped on request; no call reaches it any more."""


class Failed(msgspec.Struct, frozen=True):
    """The instance failed (its process died, or it could not be restored).

    ``final`` is true when no restart follows (policy, intensity, or none).
    """

    error: BaseException
    final: bool = True


class RestartFailed(msgspec.Struct, frozen=True):
    """A hot restart failed; the old instance keeps serving."""

    error: BaseException


ActorEvent = Union[Started, Stopped, Failed, RestartFailed]
