"""Operations the directive tests (``tests/test_directives.py``) run on workers.

Imported by the test (driver) process and, by name, by every worker process
(``tests/`` is on ``sys.path`` in both), so everything here is module-level
and importing it has no side effects.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec

import phalanx

# --------------------------------------------------------------------------- #
# Maps over ints (the pool the property test draws chains from)
# --------------------------------------------------------------------------- #


@phalanx.operation
def inc(x: int) -> int:
    return x + 1


@phalanx.operation
def double(x: int) -> int:
    return 2 * x


@phalanx.operation
def negate(x: int) -> int:
    return -x


@phalanx.operation
def square_mod(x: int) -> int:
    return (x * x) % 1009


@phalanx.operation
def as_text(x: int) -> str:
    """The stage before a string monoid: ``"<x>;"``."""
    return f"{x};"


@phalanx.operation
def as_list(x: int) -> list[int]:
    return [x]


@phalanx.operation
def length(s: str) -> int:
    return len(s)


# --------------------------------------------------------------------------- #
# Monoids: associative, not commutative, so order bugs show
# --------------------------------------------------------------------------- #


@phalanx.operation(empty=str)
def concat(lower: str, upper: str) -> str:
    return lower + upper


@phalanx.operation(empty=list)
def concat_lists(lower: list[int], upper: list[int]) -> list[int]:
    return lower + upper


@phalanx.operation(empty="")
def concat_immutable_empty(lower: str, upper: str) -> str:
    return lower + upper


@phalanx.operation
def concat_plain(lower: str, upper: str) -> str:
    """Not a monoid (no empty=): a fold of nothing raises TypeError."""
    return lower + upper


# --------------------------------------------------------------------------- #
# Counting combines: the count travels in the value and every call is logged
# --------------------------------------------------------------------------- #


@phalanx.operation
def tagged(item: list[Any]) -> list[Any]:
    """``[log path, i] -> [log path, "<i>,", 0]``: a leaf of the counting monoid."""
    path, i = item
    return [path, f"{i},", 0]


@phalanx.operation(empty=lambda: ["", "", 0])
def counted_concat(lower: list[Any], upper: list[Any]) -> list[Any]:
    """Concatenate and count: ``[path, a + b, na + nb + 1]``; each call appends a byte to ``path``."""
    assert lower[0] == upper[0], (lower[0], upper[0])
    fd = os.open(lower[0], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"c")
    finally:
        os.close(fd)
    return [lower[0], lower[1] + upper[1], lower[2] + upper[2] + 1]


# --------------------------------------------------------------------------- #
# Typed values
# --------------------------------------------------------------------------- #


class Record(msgspec.Struct, frozen=True):
    name: str
    count: int


@phalanx.operation
def record_count(rec: Record) -> int:
    """Takes a Struct: a record whose ``count`` is not an int fails validation on the worker."""
    return rec.count


@phalanx.operation
def bad_record(x: int) -> Record:
    """Declares a Record but returns one whose ``count`` is a string: fails in the driver."""
    return {"name": "r", "count": "not a number"}  # type: ignore[return-value]


@phalanx.operation
def make_record(x: int) -> Record:
    return Record(f"r{x}", x)


@phalanx.operation(empty=lambda: Record("", 0))
def merge_records(lower: Record, upper: Record) -> Record:
    return Record(lower.name + upper.name, lower.count + upper.count)


# --------------------------------------------------------------------------- #
# Slow, blocking and cooperative operations
# --------------------------------------------------------------------------- #


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@phalanx.operation
def wait_for_abort(item: list[Any]) -> str:
    """``[dir, i]``: marks itself started, runs until aborted (marks that too) or 30 s pass."""
    folder, i = item
    _write_atomically(os.path.join(folder, f"started-{i}"), "started")
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        if phalanx.current_task().aborted:
            _write_atomically(os.path.join(folder, f"aborted-{i}"), "aborted")
            return "aborted"
        time.sleep(0.005)
    return "not aborted"


@phalanx.operation
def held_back(item: list[Any]) -> int:
    """``[release file, i]``: item 0 waits until the release file exists (at most 30 s)."""
    release, i = item
    if i == 0:
        deadline = time.monotonic() + 30.0
        while not os.path.exists(release):
            if time.monotonic() > deadline:
                raise TimeoutError("never released")
            if phalanx.current_task().aborted:
                return -1
            time.sleep(0.005)
    return int(i) * 10


# --------------------------------------------------------------------------- #
# Failures
# --------------------------------------------------------------------------- #


@phalanx.operation
def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"item {x} fails")
    return x


@phalanx.operation(transient=(ConnectionError,))
def flaky_once(item: list[Any]) -> int:
    """``[dir, i]``: the first call for each ``i`` raises ConnectionError (transient), later ones return ``i``."""
    folder, i = item
    marker = os.path.join(folder, f"tried-{i}")
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return int(i)
    os.close(fd)
    raise ConnectionError(f"first try of {i}")
