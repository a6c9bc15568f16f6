"""Operations the test suite runs on workers.

Imported by the test (driver) process and, by name, by every worker process
(``tests/`` is on ``sys.path`` in both), so everything here is module-level
and importing it has no side effects.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

import phalanx

# --------------------------------------------------------------------------- #
# Values
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Point:
    x: int
    y: int
    label: str = ""


class Box(msgspec.Struct, frozen=True):
    name: str
    items: list[int]
    when: datetime.datetime | None = None


class CustomError(Exception):
    """An exception class workers raise and the driver can rebuild by name."""


class TwoArgError(Exception):
    """An exception whose ``args`` do not fit its constructor."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


# --------------------------------------------------------------------------- #
# Plain operations
# --------------------------------------------------------------------------- #


@phalanx.operation
def square(x: int) -> int:
    return x * x


@phalanx.operation
def square_after(x: int, release: str) -> int:
    """``x * x``; item 0 is a straggler: it first waits (30 s at most) until the file ``release`` exists."""
    deadline = time.monotonic() + 30.0
    while x == 0 and not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.005)
    return x * x


@phalanx.operation
def inc(x: Any) -> Any:
    return x + 1


@phalanx.operation
def add(a: Any, b: Any) -> Any:
    return a + b


@phalanx.operation
def add3(a: Any, b: Any, c: Any) -> Any:
    return a + b + c


@phalanx.operation
def identity(x: Any) -> Any:
    return x


@phalanx.operation
def scaled(x: Any, *, factor: Any = 1, offset: Any = 0) -> Any:
    return x * factor + offset


@phalanx.operation
def tag(thread: Any, i: Any) -> Any:
    """Return a value that says which caller and item it answers."""
    return [thread, i, thread * 1_000_000 + i]


@phalanx.operation
def counted_add(a: Any, b: Any) -> Any:
    """Fold pairs ``[value, combines]``: counts the combines that happened."""
    return [a[0] + b[0], a[1] + b[1] + 1]


@phalanx.operation
def concat(a: Any, b: Any) -> Any:
    """Associative, not commutative."""
    return a + b


@phalanx.operation
def pid(x: Any = None) -> int:
    return os.getpid()


# --------------------------------------------------------------------------- #
# Typed operations
# --------------------------------------------------------------------------- #


@phalanx.operation
def next_day(d: datetime.datetime) -> datetime.datetime:
    assert isinstance(d, datetime.datetime), type(d)
    return d + datetime.timedelta(days=1)


@phalanx.operation
def uuid_version(u: uuid.UUID) -> uuid.UUID:
    assert isinstance(u, uuid.UUID), type(u)
    return uuid.UUID(int=u.int ^ 1)


@phalanx.operation
def bytes_reverse(b: bytes) -> bytes:
    assert isinstance(b, bytes), type(b)
    return b[::-1]


@phalanx.operation
def move(p: Point, dx: int) -> Point:
    assert isinstance(p, Point), type(p)
    return Point(p.x + dx, p.y, p.label + "!")


@phalanx.operation
def grow(box: Box, extra: int) -> Box:
    assert isinstance(box, Box), type(box)
    return Box(box.name.upper(), [*box.items, extra], box.when)


@phalanx.operation
def typed_int(x: int) -> int:
    return x


# --------------------------------------------------------------------------- #
# Failing operations
# --------------------------------------------------------------------------- #


@phalanx.operation
def boom_value_error(*args: Any) -> Any:
    raise ValueError("boom")


@phalanx.operation
def raise_custom(msg: str) -> Any:
    raise CustomError(msg)


@phalanx.operation
def raise_two_arg(x: Any = None) -> Any:
    raise TwoArgError("left", "right")


@phalanx.operation
def return_unencodable(x: Any = None) -> Any:
    return object()


@phalanx.operation
def call_sys_exit(code: int) -> Any:
    sys.exit(code)


@phalanx.operation
def fail_at(x: Any, k: Any) -> Any:
    if x == k:
        raise ValueError(f"fail at {x}")
    return x * 10


@phalanx.operation
def slow_fail_at(x: Any, k: Any, slow: Any) -> Any:
    """Item ``k`` fails at once; items before it take ``slow`` seconds."""
    if x == k:
        raise ValueError(f"fail at {x}")
    if x < k:
        time.sleep(slow)
    return x * 10


@phalanx.operation
def record_then_fail(x: Any, k: Any, directory: Any, delay: Any) -> Any:
    """Leave a file per executed item. Items before ``k`` return at once;
    item ``k`` and later ones take ``delay`` seconds, and ``k`` then fails."""
    Path(directory, str(x)).touch()
    if x < k:
        return x
    time.sleep(delay)
    if x == k:
        raise ValueError(f"fail at {x}")
    return x


def not_an_operation(x: Any) -> Any:
    return x


@phalanx.operation
def sleep_then(x: Any, seconds: Any) -> Any:
    time.sleep(seconds)
    return x


# --------------------------------------------------------------------------- #
# map chunks run in one C loop (phalanx.core.execute.TaskRunner._map_all)
# --------------------------------------------------------------------------- #


@phalanx.operation
def triple_unless_negative(x: int) -> int:
    """``3 * x``; raises ValueError naming ``x`` when it is negative."""
    if x < 0:
        raise ValueError(f"negative item {x}")
    return 3 * x


async def _double_later(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative awaited item {x}")
    return 2 * x


@phalanx.operation
def double_sometimes_awaitable(x: int) -> Any:
    """``2 * x``, returned as a coroutine (a sync function returning an awaitable) for every
    third item and for a negative one, whose coroutine raises."""
    if x % 3 == 0 or x < 0:
        return _double_later(x)
    return 2 * x


class Seven:
    """An awaitable with no fields at all (it refers to nothing but its class): its result is 7."""

    __slots__ = ()

    def __await__(self) -> Any:
        return 7
        yield  # a generator: awaiting it returns 7 at once


@phalanx.operation
def seven_when_awaited_at(x: int) -> Any:
    """``x`` itself, except a field-less awaitable (:class:`Seven`) for the item 1234."""
    return Seven() if x == 1234 else x


@phalanx.operation
def log_then_wait_at_gate(item: str) -> int:
    """Item ``"<log>\\n<gate>\\n<i>\\n<k>"``: append ``i`` to ``log``; item ``k`` then waits for ``gate``.

    It never reads the abort flag itself: whether the calls after ``k`` run
    is up to the worker's map loop.
    """
    log, gate, i, k = item.split("\n")
    with open(log, "a") as f:
        f.write(f"{i}\n")
    if i == k:
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.005)
    return int(i)


async def _log_then_wait_at_gate(item: str) -> int:
    return log_then_wait_at_gate(item)


@phalanx.operation
def log_then_wait_at_gate_when_awaited(item: str) -> Any:
    """:func:`log_then_wait_at_gate`, done by the coroutine it returns (a sync function
    returning an awaitable): nothing is logged until the worker awaits it."""
    return _log_then_wait_at_gate(item)


@phalanx.operation
def exit_on_negative(x: int) -> int:
    """``x + 1``; a negative item kills the worker (no exception, no outcome)."""
    if x < 0:
        os._exit(3)
    return x + 1


@phalanx.operation
def inc_unless_multiple_of_97(x: int) -> int:
    """``x + 1``; a multiple of 97 (0 included) raises ValueError naming it."""
    if x % 97 == 0:
        raise ValueError(f"item {x} is a multiple of 97")
    return x + 1
