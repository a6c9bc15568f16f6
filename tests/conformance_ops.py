"""Objects and functions the conformance-fix tests send to workers (importable by them by name).

Runs in the test process (to build the objects) and in worker processes (which
unpickle them, under ``local_pickle``): each object misbehaves at one moment
of its trip, as the ones in CPython's ``test_concurrent_futures.test_deadlock`` do.
"""

from __future__ import annotations

import sys
from typing import Any


def _exit() -> None:
    sys.exit(1)


class ExitAtUnpickle:
    """Loading it in a worker raises ``SystemExit`` (the worker exits)."""

    def __reduce__(self) -> Any:
        return _exit, ()
