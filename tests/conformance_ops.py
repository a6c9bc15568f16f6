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


def _raise_unpickling_error() -> None:
    import pickle

    raise pickle.UnpicklingError("refused to load")


class ErrorAtPickle:
    """Pickling it raises ``pickle.PicklingError``."""

    def __reduce__(self) -> Any:
        import pickle

        raise pickle.PicklingError("refused to pickle")


class ErrorAtUnpickle:
    """Loading it raises ``pickle.UnpicklingError``."""

    def __reduce__(self) -> Any:
        return _raise_unpickling_error, ()


def make(cls: type) -> Any:
    """An instance of ``cls``, made in the worker (a result that misbehaves on its way back)."""
    return cls()


class Plain:
    """An object only pickle carries."""


def _interrupt() -> None:
    raise KeyboardInterrupt


class ExitAtPickle:
    """Pickling it (a worker sending it back as a result) raises ``SystemExit``."""

    def __reduce__(self) -> Any:
        sys.exit(2)


class InterruptAtPickle:
    """Pickling it raises ``KeyboardInterrupt``."""

    def __reduce__(self) -> Any:
        raise KeyboardInterrupt


def exit_with(code: int) -> None:
    """A task that calls ``sys.exit(code)``."""
    sys.exit(code)


def interrupt(x: Any = None) -> None:
    """A task that raises ``KeyboardInterrupt``."""
    raise KeyboardInterrupt


class MyExit(SystemExit):
    """A subclass of SystemExit (never rebuilt as itself in the driver)."""


def wait_for(path: str) -> int:
    """A task that waits (at most a minute) until ``path`` exists; its worker's pid."""
    import os
    import time

    end = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)
    return os.getpid()
