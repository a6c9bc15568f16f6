"""Actor types (and helpers) the actor tests use.

Imported by the test (driver) process and, by name, by every worker process
(``tests/`` is on ``sys.path`` in both), so everything here is module-level
and importing it has no side effects.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import msgspec

import phalanx

# --------------------------------------------------------------------------- #
# Values
# --------------------------------------------------------------------------- #


class ActorOpsError(Exception):
    """Raised by actor methods; rebuilt by name in the driver."""


class Vec(msgspec.Struct, frozen=True):
    x: int
    y: int


class Shape(msgspec.Struct, frozen=True):
    name: str
    points: list[Vec]


class CounterState(msgspec.Struct, frozen=True):
    n: int
    #: the next restore() from this state raises (a deterministic failing hot restart)
    fail_restore: bool = False
    #: the instance's save() raises while set (not part of the state that survives)
    generation: int = 0


class BigState(msgspec.Struct, frozen=True):
    data: bytes
    tag: int


class RecorderState(msgspec.Struct, frozen=True):
    entries: list[tuple[int, int]]
    #: restore() from this state raises (a deterministic failing hot restart)
    fail_restore: bool = False


class HandoverState(msgspec.Struct, frozen=True):
    n: int
    flags: str
    fail_restore: bool


# --------------------------------------------------------------------------- #
# Actors
# --------------------------------------------------------------------------- #


@phalanx.actor
class Counter:
    """A counter with save/restore hooks and knobs to make them fail."""

    def __init__(self, start: int = 0, *, step: int = 1) -> None:
        self.n = start
        self.step = step
        self.fail_restore = False
        self.fail_save = False
        self.generation = 0

    # ---- calls ---------------------------------------------------------------

    def incr(self, k: int | None = None) -> int:
        self.n += self.step if k is None else k
        return self.n

    async def aincr(self, k: int = 1) -> int:
        await asyncio.sleep(0.001)
        self.n += k
        return self.n

    def get(self) -> int:
        return self.n

    def info(self) -> dict[str, Any]:
        return {"n": self.n, "pid": os.getpid(), "generation": self.generation}

    def pid(self) -> int:
        return os.getpid()

    def add_kw(self, a: int, *, b: int = 0, c: int = 0) -> int:
        return a + 10 * b + 100 * c

    def boom(self, text: str) -> int:
        raise ActorOpsError(f"boom: {text}")

    def sleep(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.n

    def hold(self, release: str) -> int:
        """Block until the file ``release`` exists (at most 60 s), then return the count."""
        deadline = time.monotonic() + 60.0
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.n

    def set_fail_restore(self, flag: bool) -> bool:
        self.fail_restore = flag
        return flag

    def set_fail_save(self, flag: bool) -> bool:
        self.fail_save = flag
        return flag

    def _secret(self) -> int:
        return 42

    # ---- hot restart hooks ------------------------------------------------------

    def save(self) -> CounterState:
        if self.fail_save:
            raise ActorOpsError("save failed on purpose")
        return CounterState(self.n, self.fail_restore, self.generation)

    @classmethod
    def restore(cls, state: CounterState) -> Counter:
        if state.fail_restore:
            raise ActorOpsError("restore failed on purpose")
        obj = cls(state.n)
        obj.generation = state.generation + 1
        return obj


@phalanx.actor
class Geometry:
    """Methods taking and returning msgspec Structs, typed by annotations."""

    def scale(self, shape: Shape, k: int) -> Shape:
        assert isinstance(shape, Shape), type(shape)
        return Shape(shape.name + "*", [Vec(p.x * k, p.y * k) for p in shape.points])

    def norm1(self, v: Vec) -> int:
        assert isinstance(v, Vec), type(v)
        return abs(v.x) + abs(v.y)

    def origin(self) -> Vec:
        return Vec(0, 0)


@phalanx.actor
class Recorder:
    """Appends (caller, i) and returns how many entries it holds."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, int]] = []
        self.fail_restore = False

    def append(self, caller: int, i: int) -> int:
        self.entries.append((caller, i))
        return len(self.entries)

    def log(self) -> list[tuple[int, int]]:
        return self.entries

    def pid(self) -> int:
        return os.getpid()

    def set_fail_restore(self, flag: bool) -> bool:
        self.fail_restore = flag
        return flag

    def save(self) -> RecorderState:
        return RecorderState(self.entries, self.fail_restore)

    @classmethod
    def restore(cls, state: RecorderState) -> Recorder:
        if state.fail_restore:
            raise ActorOpsError("restore failed on purpose")
        obj = cls()
        obj.entries = list(state.entries)
        return obj


@phalanx.actor
class BadInit:
    def __init__(self, why: str) -> None:
        raise ActorOpsError(f"cannot start: {why}")


@phalanx.actor
class Big:
    """Holds a large bytes state across hot restarts."""

    def __init__(self, size: int) -> None:
        self.data = os.urandom(size)
        self.tag = 0

    def digest(self) -> tuple[int, int, int]:
        import zlib

        return (len(self.data), zlib.crc32(self.data), self.tag)

    def pid(self) -> int:
        return os.getpid()

    def save(self) -> BigState:
        return BigState(self.data, self.tag)

    @classmethod
    def restore(cls, state: BigState) -> Big:
        obj = cls.__new__(cls)
        obj.data = state.data
        obj.tag = state.tag + 1
        return obj


def _await_flag(path: str, timeout: float = 30.0) -> None:
    """Wait (in a worker, polling) until the test creates ``path``; bounded, so never a hang."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


def _mark(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


@phalanx.actor
class Handover:
    """Hot restarts paused at a chosen point until the test says go (flag files in ``flags``).

    ``hold="save"``: ``save()`` creates ``flags/saving`` and waits for
    ``flags/go`` (the state never leaves); ``hold="restore"``: ``restore()``
    creates ``flags/restoring`` (the state was taken and handed over), waits
    for ``flags/go``, then raises if ``fail_restore``. Every instance that
    starts appends its pid to ``flags/instances``.
    """

    def __init__(self, flags: str, hold: str, fail_restore: bool = False) -> None:
        self.n = 0
        self.flags = flags
        self.hold = hold
        self.fail_restore = fail_restore
        _mark(os.path.join(flags, "instances"), f"init {os.getpid()}")

    def incr(self) -> int:
        self.n += 1
        return self.n

    def pid(self) -> int:
        return os.getpid()

    def save(self) -> HandoverState:
        if self.hold == "save":
            _mark(os.path.join(self.flags, "saving"), str(os.getpid()))
            _await_flag(os.path.join(self.flags, "go"))
        return HandoverState(self.n, self.flags, self.fail_restore)

    @classmethod
    def restore(cls, state: HandoverState) -> Handover:
        _mark(os.path.join(state.flags, "restoring"), str(os.getpid()))
        _await_flag(os.path.join(state.flags, "go"))
        if state.fail_restore:
            raise ActorOpsError("restore failed on purpose")
        obj = cls.__new__(cls)
        obj.n, obj.flags, obj.hold, obj.fail_restore = state.n, state.flags, "restore", False
        _mark(os.path.join(state.flags, "instances"), f"restore {os.getpid()}")
        return obj


@phalanx.operation
def triple(x: int) -> int:
    return 3 * x


# --------------------------------------------------------------------------- #
# A multiprocessing.managers baseline for the benchmark
# --------------------------------------------------------------------------- #


class PlainCounter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n


# --------------------------------------------------------------------------- #
# Helpers (driver side)
# --------------------------------------------------------------------------- #


def wait_settled(rt: phalanx.Runtime, workers: int = 2, deaths: int = 0, timeout: float = 20.0) -> None:
    """Wait until ``deaths`` worker deaths were seen and ``workers`` workers are alive and ready."""
    from chaos_ops import wait_settled as settle  # test process only: workers never call it

    settle(rt, workers=workers, deaths=deaths, timeout=timeout)
