"""Operations the fault-tolerance tests run in worker processes."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import time

import phalanx


@phalanx.operation
def inc(x: int) -> int:
    return x + 1


@phalanx.operation
def pid(_: int = 0) -> int:
    return os.getpid()


@phalanx.operation
def sleep_then(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


@phalanx.operation
def exit_with(code: int) -> int:
    os._exit(code)


@phalanx.operation
def sigkill_self() -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


@phalanx.operation
def segfault() -> int:
    # A deliberate crash: no "Fatal Python error" dump (faulthandler, inherited from pytest) in the log.
    faulthandler.disable()
    ctypes.memset(0, 0, 1)  # writes to address 0: SIGSEGV
    return 0


def _count(path: str) -> int:
    """Increment a counter file and return its previous value."""
    n = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(n + 1))
    return n


@phalanx.operation
def flaky(path: str, failures: int) -> int:
    n = _count(path)
    if n < failures:
        raise phalanx.Transient(f"attempt {n} failed")
    return n


@phalanx.operation(transient=(ConnectionError,), retry=phalanx.Immediate(5))
def flaky_connection(path: str, failures: int) -> int:
    n = _count(path)
    if n < failures:
        raise ConnectionError(f"attempt {n} refused")
    return n


@phalanx.operation
def fail_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


@phalanx.operation
def record(path: str, x: int) -> int:
    with open(path, "a") as f:
        f.write(f"{x}\n")
    time.sleep(0.02)
    return x


@phalanx.operation
def fail_first_then_record(path: str, x: int) -> int:
    if x == 0:
        raise RuntimeError("first item fails")
    return record(path, x)


@phalanx.operation
def cooperative(path: str, seconds: float) -> str:
    """Runs until aborted (writes 'aborted' to path) or ``seconds`` pass."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if phalanx.current_task().aborted:
            # Write then rename: the test polls for the file and must never see it empty.
            with open(path + ".tmp", "w") as f:
                f.write("aborted")
            os.replace(path + ".tmp", path)
            return "aborted"
        time.sleep(0.005)
    return "done"


@phalanx.operation
def stubborn(seconds: float) -> str:
    """Ignores its abort flag (busy loop)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        pass
    return "done"


_HOARD: list[bytes] = []


@phalanx.operation
def hoard(megabytes: int) -> int:
    _HOARD.append(b"x" * (megabytes * 1024 * 1024))
    return os.getpid()


@phalanx.operation
def flaky_stamped(path: str, failures: int) -> int:
    """Append this attempt's ``time.monotonic()`` to ``path``; fail transiently the first ``failures`` times.

    The monotonic clock is the system's (CLOCK_MONOTONIC): stamps written by
    different worker processes compare.
    """
    with open(path, "a") as f:
        f.write(f"{time.monotonic()!r}\n")
    with open(path) as f:
        n = len(f.read().split())
    if n <= failures:
        raise phalanx.Transient(f"attempt {n - 1} failed")
    return n - 1


def _mark(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (the test polls for the file)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


@phalanx.operation
def fail_or_wait(role: str, started: str, other: str, aborted: str) -> str:
    """Two items of one map on two workers.

    ``role="wait"``: mark ``started`` (with this pid), then run until the task
    is aborted and mark ``aborted``. ``role="fail"``: mark ``started``, wait
    until the other item marked ``other``, then fail fatally.
    """
    _mark(started, str(os.getpid()))
    task = phalanx.current_task()
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        if role == "fail" and os.path.exists(other):
            raise RuntimeError("fatal: the first item fails")
        if role == "wait" and task.aborted:
            _mark(aborted, "aborted")
            return "aborted"
        time.sleep(0.005)
    return "timed out"


@phalanx.operation
def stubborn_marked(started: str, seconds: float) -> str:
    """Mark ``started``, then ignore the abort flag (busy loop) for ``seconds``."""
    _mark(started, str(os.getpid()))
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        pass
    return "done"


@phalanx.operation
def gated_record(log: str, release: str, x: int) -> int:
    """Append ``x`` to ``log``, then wait for ``release`` (or the abort flag); return ``x``."""
    with open(log, "a") as f:
        f.write(f"{x}\n")
    task = phalanx.current_task()
    deadline = time.monotonic() + 30.0
    while not os.path.exists(release) and not task.aborted and time.monotonic() < deadline:
        time.sleep(0.005)
    return x


@phalanx.operation
def marked_sleep(started: str, seconds: float, value: int) -> int:
    """Mark ``started`` with this pid; the first attempt then sleeps ``seconds``; return ``value``."""
    _mark(started, str(os.getpid()))
    if phalanx.current_task().attempt == 0:
        time.sleep(seconds)
    return value
