"""Operations the benchmark workers run: tiny tasks, a no-op, a CPU spin, a counter, a state holder.

Imported by the child measuring process (driver side) and by every worker
process of every runner: phalanx workers resolve ``benchmarks.ops:inc`` by
importing this module; multiprocessing / loky workers unpickle the functions
by reference. ``@phalanx.operation`` returns each function unchanged, so the
very same functions run on every runner.

Keep this module cheap to import (no numpy): its import time is part of the
W6 start-up figure for runners whose workers import it lazily.
"""

from __future__ import annotations

import os
import time
import zlib

import msgspec

import phalanx

__all__ = ["inc", "noop", "spin", "spin_checksum", "Counter", "Holder", "HolderState", "square", "add",
           "digit_counts", "merge_counts"]

#: modulus of the spin loop's checksum (keeps the integers small)
_MOD = 1_000_003


@phalanx.operation
def inc(x: int) -> int:
    """The tiny task of W1 and W7: ``x + 1``."""
    return x + 1


@phalanx.operation
def square(x: int) -> int:
    """The map stage of D1 (``benchmarks.directives``): ``x * x``."""
    return x * x


@phalanx.operation(empty=0)
def add(lower: int, upper: int) -> int:
    """The monoid of D1: integer addition, whose empty is 0."""
    return lower + upper


@phalanx.operation
def digit_counts(x: int) -> dict[str, int]:
    """A map stage of D1 (a word count over the digits of ``x``): ``{digit: occurrences}``."""
    counts: dict[str, int] = {}
    for digit in str(x):
        counts[digit] = counts.get(digit, 0) + 1
    return counts


@phalanx.operation(empty=dict)
def merge_counts(lower: dict[str, int], upper: dict[str, int]) -> dict[str, int]:
    """The monoid of D1's word count: add up two histograms (a new dict; neither is changed)."""
    out = dict(lower)
    for key, n in upper.items():
        out[key] = out.get(key, 0) + n
    return out


@phalanx.operation
def sleep_ms(ms: float) -> float:
    """Sleep ``ms`` milliseconds (W8: many workers, each mostly waiting); returns it."""
    time.sleep(ms / 1000.0)
    return ms


@phalanx.operation
def noop() -> None:
    """The round trip of W2: does nothing."""
    return None


def spin_checksum(n: int) -> int:
    """A pure-Python loop of ``n`` iterations; returns a checksum of its work."""
    acc = 0
    for i in range(n):
        acc = (acc + i * i) % _MOD
    return acc


@phalanx.operation
def spin(n: int) -> tuple[int, float]:
    """The CPU-bound task of W4: ``(checksum, CPU seconds this task used)``.

    CPU time is measured inside the worker with :func:`time.process_time`, so
    the driver can compare the CPU the tasks got with the wall time it waited.
    """
    start = time.process_time()
    checksum = spin_checksum(n)
    return checksum, time.process_time() - start


@phalanx.actor
class Counter:
    """The actor of W3: a counter incremented one call at a time.

    Used through a :mod:`multiprocessing.managers` proxy, a Ray actor, and a
    phalanx actor (``@phalanx.actor`` returns the class unchanged).
    """

    def __init__(self) -> None:
        self.value = 0

    def incr(self) -> int:
        self.value += 1
        return self.value

    def get(self) -> int:
        return self.value


class HolderState(msgspec.Struct, frozen=True):
    data: bytes
    moves: int


@phalanx.actor
class Holder:
    """The actor of ``benchmarks.restart``: ``size`` random bytes carried across hot restarts."""

    def __init__(self, size: int) -> None:
        self.data = os.urandom(size)
        self.moves = 0

    def digest(self) -> tuple[int, int, int]:
        """(size, crc32, hot restarts so far): what must survive each move."""
        return len(self.data), zlib.crc32(self.data), self.moves

    def save(self) -> HolderState:
        return HolderState(self.data, self.moves)

    @classmethod
    def restore(cls, state: HolderState) -> Holder:
        obj = cls.__new__(cls)
        obj.data, obj.moves = state.data, state.moves + 1
        return obj
