"""Operations and an actor the asyncio, logging and stats tests run on workers.

Imported by the test (driver) process and, by name, by every worker process
(``tests/`` is on ``sys.path`` in both), so everything here is module-level
and importing it has no side effects.

Tasks that must stay busy wait for a file the test creates (``release``),
and tell the test they run (and in which process) by writing their pid to a
``started`` file, so no test sleeps for a guessed duration. While they wait
they watch their abort flag (``phalanx.current_task().aborted``) and leave an
``aborted`` file when it is set, which is how a test sees that cancelling in
the driver reached the worker.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import phalanx

#: seconds a gated task waits for its release file before it gives up (a test bug)
WAIT_LIMIT = 30.0

logger = logging.getLogger("eco_ops")


class GateError(Exception):
    """Raised by operations on purpose; rebuilt by name in the driver."""


def _wait(release: str, started: str | None, aborted: str | None) -> bool:
    """Wait for ``release``; False (after touching ``aborted``) if the task was aborted first."""
    if started is not None:  # which process runs it; renamed into place, so never read half-written
        Path(f"{started}.tmp").write_text(str(os.getpid()))
        os.replace(f"{started}.tmp", started)
    ctx = phalanx.current_task()
    deadline = time.monotonic() + WAIT_LIMIT
    while not os.path.exists(release):
        if ctx.aborted:
            if aborted is not None:
                Path(aborted).touch()
            return False
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.005)
    return True


@phalanx.operation
def gated(release: str, started: str | None = None, value: Any = None, aborted: str | None = None) -> Any:
    """Return ``value`` once ``release`` exists; stop early (aborted) if told to."""
    if not _wait(release, started, aborted):
        phalanx.current_task().check()
    return value


@phalanx.operation
def gated_item(item: list[Any]) -> Any:
    """``gated`` for ``map``: the item is ``[value, release, started, aborted]``."""
    value, release, started, aborted = item
    if not _wait(release, started, aborted):
        phalanx.current_task().check()
    return value


@phalanx.operation
def gated_or_fail(item: list[Any]) -> Any:
    """``gated_item``, except that an item ``[value, None, None, message]`` fails at once."""
    value, release, started, message = item
    if release is None:
        raise GateError(message)
    _wait(release, started, None)
    return value


@phalanx.operation
def gated_sum(lower: list[Any], upper: list[Any]) -> list[Any]:
    """A fold of ``[number, release]`` pairs that waits for ``release`` at every combine."""
    _wait(lower[1], None, None)
    return [lower[0] + upper[0], lower[1]]


@phalanx.operation
def square(x: int) -> int:
    return x * x


@phalanx.operation
def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise GateError(f"bad item {x}")
    return x


@phalanx.operation
def raise_key_error(key: str) -> None:
    raise KeyError(key)


@phalanx.operation
def flaky(marker_dir: str, failures: int) -> int:
    """Raise ``phalanx.Transient`` ``failures`` times (counted in files), then return the attempts."""
    done = len(os.listdir(marker_dir))
    if done < failures:
        Path(marker_dir, f"attempt-{done}").touch()
        raise phalanx.Transient(f"attempt {done} fails on purpose")
    return done + 1


@phalanx.operation
def pid() -> int:
    return os.getpid()


@phalanx.operation
def say(text: str) -> int:
    """Print to stdout and stderr, log a warning and an info record; return the worker's pid."""
    print(f"out: {text}")
    print(f"err: {text}", file=sys.stderr)
    print(f"two\nlines: {text}")
    sys.stdout.write("partial ")
    sys.stdout.write(f"line: {text}\n")
    logger.warning("log: %s", text)
    logger.info("info: %s", text)
    return os.getpid()


@phalanx.operation
def worker_options() -> dict[str, Any]:
    """The options this worker runs under, as the worker's own code sees them (configuration tests)."""
    from phalanx.registry.operations import implicit_allowed
    from phalanx.transport.sockets import default_limits
    from phalanx.worker import worker_spec

    spec = worker_spec()
    assert spec is not None
    limits = default_limits()
    return {
        "spin": spec.spin,
        "hwm": limits.hwm,
        "max_frame": limits.max_frame,
        "implicit_operations": implicit_allowed(),
        "log_level": logging.getLevelName(logging.getLogger("phalanx").getEffectiveLevel()),
        "prefix_output": spec.prefix_output,
        "abort_grace": spec.abort_grace,
        "credits": spec.credits,
    }


@phalanx.actor
class Gatekeeper:
    """An actor whose calls can wait for a file, and fail on purpose."""

    def __init__(self, start: int = 0, release: str | None = None) -> None:
        if release is not None:
            _wait(release, None, None)  # a slow start-up
        self.n = start

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def wait(self, release: str) -> int:
        _wait(release, None, None)
        return self.n

    def boom(self, text: str) -> int:
        raise GateError(text)

    def save(self) -> int:
        return self.n

    @classmethod
    def restore(cls, n: int) -> Gatekeeper:
        return cls(n)
