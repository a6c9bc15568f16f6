"""Operations and an actor for the routing tests: each result says which process ran it.

Imported by the test (driver) process and, by name, by every worker process
(``tests/`` is on ``sys.path`` in both), so everything here is module-level
and importing it has no side effects.
"""

from __future__ import annotations

import os
import time

import phalanx


@phalanx.operation
def where(x: int) -> tuple[int, int]:
    """``(x, pid of the worker that ran it)``."""
    return x, os.getpid()


@phalanx.operation
def slow_where(x: int, delay: float) -> tuple[int, int]:
    time.sleep(delay)
    return x, os.getpid()


@phalanx.operation
def merge_pids(lower: list[int], upper: list[int]) -> list[int]:
    """Fold combine: the pids of every worker that combined anything so far (sorted, unique)."""
    return sorted({*lower, *upper, os.getpid()})


@phalanx.actor
class Where:
    """An actor that says where it runs, and counts."""

    def __init__(self, start: int = 0) -> None:
        self.n = start

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def pid(self) -> int:
        return os.getpid()

    def save(self) -> int:
        return self.n

    @classmethod
    def restore(cls, state: int) -> Where:
        return cls(state)
