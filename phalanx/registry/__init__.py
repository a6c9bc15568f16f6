"""Operations and actor types by name.

Runs in the driver and in every worker: the driver names what it wants run,
each worker resolves the name in its own process. See
:mod:`phalanx.registry.operations` for the rules that keep a worker from
running anything it was not told to trust.
"""

from .actors import actor, actor_name_of, resolve_actor
from .operations import Operation, name_of, operation, registered, resolve

__all__ = [
    "Operation",
    "actor",
    "actor_name_of",
    "name_of",
    "operation",
    "registered",
    "resolve",
    "resolve_actor",
]
