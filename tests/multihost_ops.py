"""Operations and an actor for the multi-host tests.

Imported by the test (driver) process and, through ``phalanx worker --import
multihost_ops``, by remote worker processes; ``PHX_HOST`` in a worker's
environment names the host it stands for, so results say where they ran.
"""

from __future__ import annotations

import os
import sys
import time

import phalanx


def host() -> str:
    return os.environ.get("PHX_HOST", "local")


@phalanx.operation
def where(x: int) -> tuple[int, str]:
    return x * 2, host()


@phalanx.operation
def slow_where(x: int, delay: float) -> tuple[int, str]:
    time.sleep(delay)
    return x * 2, host()


@phalanx.operation
def add(a: int, b: int) -> int:
    return a + b


@phalanx.operation
def noop() -> None:
    return None


@phalanx.actor
class Tally:
    def __init__(self, start: int = 0) -> None:
        self.n = start

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def where(self) -> str:
        return host()


@phalanx.operation
def touch(path: str) -> str:
    """Write the host name into ``path`` (a marker: proof the operation ran)."""
    with open(path, "w") as f:
        f.write(host())
    return host()


@phalanx.operation
def pid() -> int:
    return os.getpid()


@phalanx.operation
def stuck_on(x: int, stuck_host: str, delay: float) -> tuple[int, str]:
    """``slow_where``, except that on host ``stuck_host`` it never returns (its worker must be stopped)."""
    time.sleep(3600 if host() == stuck_host else delay)
    return x * 2, host()


@phalanx.operation
def say(text: str) -> str:
    """Print ``text`` on the worker's stdout and stderr (a host's output reaches the driver's)."""
    print(f"{text} on {host()}", flush=True)
    print(f"{text} on {host()} (stderr)", file=sys.stderr, flush=True)
    return host()
