"""Actors: stateful objects that live in one worker process.

Runs in the driver (:mod:`.system`, :mod:`.ref`) and in workers
(:mod:`.host`). The model is mesh_worker's: a named actor type with
parameters and state, controlled with stop / restart / inspect, reporting
events Started / Stopped / Failed / RestartFailed; a hot restart hands the old
instance's state to a new one and reverts to the old one if the new one fails
to start; dropping the last ref stops the actor; ``join`` waits without
stopping. On top of that, supervision restarts an actor whose process died
from its last checkpoint.
"""

from ..registry.actors import actor
from .events import ActorEvent, Failed, RestartFailed, Started, Stopped

# The driver side (.system, .ref) is imported from its modules, not here: the
# worker imports .host, and must not pull the driver in with it.
__all__ = ["ActorEvent", "Failed", "RestartFailed", "Started", "Stopped", "actor"]
