"""Operations and actors the phalanx.testing tests run, on SimRuntime and on real workers.

Imported by the test (driver) process and, by name, by every worker process
(``tests/`` is on ``sys.path`` in both), so everything here is module-level
and importing it has no side effects beyond registering operations.
"""

from __future__ import annotations

import msgspec

import phalanx
from phalanx.testing import sleep


class HarnessError(Exception):
    """Raised by operations on request; rebuilt by name in the driver."""


@phalanx.operation
def square(x: int) -> int:
    return x * x


@phalanx.operation
def add(a: int, b: int) -> int:
    return a + b


@phalanx.operation
def concat(a: str, b: str) -> str:
    """Associative but not commutative: a fold that reorders shows."""
    return a + b


@phalanx.operation
def tagged(tag: str, x: int) -> list[object]:
    """``[tag, x]``: which job a result belongs to travels with it."""
    return [tag, x]


@phalanx.operation
def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise HarnessError(f"bad item {x}")
    return x


@phalanx.operation
def fail_on_3(x: int) -> int:
    """One argument (a directive stage) that fails on 3."""
    return fail_on(x, 3)


@phalanx.operation
def nap(seconds: float) -> float:
    """Sleeps (virtual time on a SimRuntime)."""
    sleep(seconds)
    return seconds


_attempts: dict[str, int] = {}


@phalanx.operation(retry=phalanx.Exponential(0.5, 2.0, 10.0, 5))
def flaky(key: str, failures: int) -> int:
    """Fails transiently ``failures`` times per key in this process, then succeeds."""
    n = _attempts.get(key, 0)
    _attempts[key] = n + 1
    if n < failures:
        raise phalanx.Transient(f"{key}: attempt {n} fails")
    return n


class Point(msgspec.Struct, frozen=True):
    x: int
    y: int


@phalanx.operation
def flip(p: Point) -> Point:
    return Point(p.y, p.x)


class LogState(msgspec.Struct, frozen=True):
    entries: list[tuple[str, int]]


@phalanx.actor
class Log:
    """Appends what callers send; the order it saw them in is what it returns."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, int]] = []

    def append(self, caller: str, n: int) -> int:
        self.entries.append((caller, n))
        return len(self.entries)

    def read(self) -> list[tuple[str, int]]:
        return list(self.entries)

    def save(self) -> LogState:
        return LogState(list(self.entries))

    @classmethod
    def restore(cls, state: LogState) -> Log:
        log = cls()
        log.entries = [tuple(e) for e in state.entries]  # type: ignore[misc]
        return log


@phalanx.actor
class Counter:
    def __init__(self, start: int = 0) -> None:
        self.n = start

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def boom(self) -> None:
        raise HarnessError("boom")

    def nap(self, seconds: float) -> int:
        """Sleeps (virtual time on a SimRuntime): calls sent meanwhile wait in its mailbox."""
        sleep(seconds)
        return self.n

    def save(self) -> int:
        return self.n

    @classmethod
    def restore(cls, n: int) -> Counter:
        return cls(n)


@phalanx.actor
class Fragile:
    """Saves its count but cannot be restored from it: a hot restart's new instance fails."""

    def __init__(self, start: int = 0) -> None:
        self.n = start

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def save(self) -> int:
        return self.n

    @classmethod
    def restore(cls, n: int) -> Fragile:
        raise HarnessError(f"cannot restore {n}")


@phalanx.operation
def int_unless_3(x: int) -> int:
    """Declared to return an int, returns a str for 3: the result fails conversion in the driver."""
    return "three" if x == 3 else x  # type: ignore[return-value]


@phalanx.operation
def transient_once(key: str) -> str:
    """Fails transiently the first time it runs for ``key`` in this process."""
    n = _attempts.get(key, 0)
    _attempts[key] = n + 1
    if n == 0:
        raise phalanx.Transient(f"{key}: first attempt fails")
    return key


@phalanx.actor
class Holder:
    """A channel receiver in an actor: takes messages and holds them unacked until told."""

    def __init__(self, rx: phalanx.Receiver[int]) -> None:
        self.rx = rx
        self.held: list[phalanx.Message[int]] = []

    def take(self, n: int) -> list[int]:
        msgs = [self.rx.recv_message(timeout=30) for _ in range(n)]
        self.held += msgs
        return [m.value for m in msgs]

    def settle(self, ack: bool) -> int:
        for m in self.held:
            if ack:
                m.ack()
            else:
                m.nack()
        n, self.held = len(self.held), []
        return n


@phalanx.operation
def drain(rx: phalanx.Receiver[int], n: int) -> list[int]:
    return [rx.recv(timeout=5) for _ in range(n)]


@phalanx.operation
def fill(tx: phalanx.Sender[int], n: int) -> int:
    for i in range(n):
        tx.send(i)
    return n
