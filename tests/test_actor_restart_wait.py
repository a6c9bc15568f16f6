"""A call made after a supervised actor's worker died waits for the restart.

Runs in the test (driver) process against real workers that the test
SIGKILLs. A call the dead worker never received cannot have run: it is held
and sent to the restarted instance, where ``ActorDiedError`` would otherwise
reach a caller who only called after the death.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

import phalanx
from actor_ops import Counter

T = 30.0


def _dead(pid: int) -> bool:
    """Reaped: every thread gone, its files (its pipe's end) closed."""
    return not psutil.pid_exists(pid)


def test_call_after_the_worker_died_waits_for_the_restart() -> None:
    with phalanx.Runtime(workers=2, actor_timeout=T, actor_restart_limit=10) as rt:
        ref = rt.spawn(Counter, 0, restart_policy="on-failure", checkpoint_every=1)
        assert ref.incr(1).result(timeout=T) == 1
        for expected in (2, 3, 4, 5, 6):
            pid = ref.pid().result(timeout=T)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + T
            while not _dead(pid):
                assert time.monotonic() < deadline
                time.sleep(0.001)
            # Called once the process is reaped, before or after the driver handled its exit.
            assert ref.incr(1).result(timeout=T) == expected
            assert rt.wait_for_workers(2, timeout=T) == 2
