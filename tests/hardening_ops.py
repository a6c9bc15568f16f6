"""Operations and an actor the driver-hardening tests run in worker processes."""

from __future__ import annotations

import os
import re
import time
from typing import Any

import phalanx


@phalanx.operation
def blob(size: int) -> bytes:
    return b"x" * size


@phalanx.operation
def blob_at(i: int, at: int, size: int) -> bytes:
    return b"x" * (size if i == at else 8)


@phalanx.operation
def self_ref() -> Any:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@phalanx.operation
def deep(n: int) -> Any:
    value: list[Any] = []
    for _ in range(n):
        value = [value]
    return value


@phalanx.operation
def catastrophic() -> bool:
    # Exponential backtracking inside the regex engine: holds the GIL, never sees its abort flag.
    return re.match(r"(a+)+$", "a" * 31 + "b") is not None


@phalanx.operation
def nap(seconds: float, value: int = 0) -> int:
    time.sleep(seconds)
    return value


@phalanx.operation
def getpid(_: int = 0) -> int:
    return os.getpid()


@phalanx.operation
def exit_on(i: int, at: int) -> int:
    if i == at:
        os._exit(1)
    time.sleep(0.0005)
    return i


@phalanx.operation
def short(i: int) -> int:
    time.sleep(0.002)
    return i


@phalanx.actor
class Hoard:
    """An actor whose method returns as many bytes as asked."""

    def give(self, size: int) -> bytes:
        return b"y" * size

    def take(self, data: bytes) -> int:
        return len(data)


@phalanx.operation
def rogue(size: int) -> int:
    """Write a frame above max_frame straight onto this worker's pipe, as a buggy worker would."""
    import gc

    from phalanx.worker import _Loop

    loop = next(o for o in gc.get_objects() if isinstance(o, _Loop))
    assert loop.pipe is not None
    loop.pipe.send_blocking(b"z" * size)
    time.sleep(30)
    return 0


@phalanx.operation
def size_of(data: bytes) -> int:
    return len(data)


@phalanx.operation
def terminate_a_forked_child() -> list[int]:
    """Fork a child as multiprocessing's fork context does, SIGTERM it; [its exit code, this pid]."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    child.terminate()
    child.join(10)
    return [child.exitcode if child.exitcode is not None else 0, os.getpid()]
