"""Operations (and, later, actor types) by name.

Runs in the driver and in every worker: the driver names what it wants run,
each worker resolves the name in its own process. See
:mod:`phalanx.registry.operations` for the rules that keep a worker from
running anything it was not told to trust.
"""

from .operations import Operation, name_of, operation, registered, resolve

__all__ = ["Operation", "name_of", "operation", "registered", "resolve"]
