"""Actors: stateful objects that live in one worker process.

Runs in the driver (refs) and in workers (the actor host). This package holds
the base types until the actor runtime lands; see ``../shared/DESIGN.md``
(mesh_worker's model: Parameters and State, Stop / Restart / Inspect, events
Started / Stopped / Failed / RestartFailed, hot restart with revert).
"""

from __future__ import annotations

__all__: list[str] = []
