"""Local workers hear control messages on their own control pipe, not on ZeroMQ.

Runs in the test process (the driver) against real worker processes: their
threads are read from the process table, a worker is frozen with SIGSTOP.
"""

from __future__ import annotations

import os
import signal

import psutil
import pytest

import phalanx
from phalanx.transport.codec import encode
from phalanx.transport.messages import Heartbeat

from ops import sleep_then, square


@pytest.mark.parametrize("start_method", ["phalanx", "spawn"])
def test_a_local_worker_runs_two_threads_and_no_zeromq(start_method: str) -> None:
    """Its main thread and its control thread (which also watches the driver): no ZeroMQ
    I/O or reaper thread, no watchdog thread of its own. Each thread a worker starts costs
    its start-up time."""
    with phalanx.Runtime(workers=1, start_method=start_method) as rt:
        assert rt.submit(square, 3).result(timeout=30) == 9
        (worker,) = rt.worker_pids().values()
        assert psutil.Process(worker).num_threads() == 2
        # Its control thread still serves: the inspect reply comes from it.
        (node,) = rt.inspect(timeout=30).workers
        assert node.pid == worker and node.resolved


def test_a_task_on_a_local_worker_still_times_out_and_its_worker_still_serves() -> None:
    """The control thread enforces a running task's timeout (it reports it on the pipe)."""
    with phalanx.Runtime(workers=1) as rt:
        with pytest.raises(phalanx.TaskTimeoutError):
            rt.options(timeout=0.2).submit(sleep_then, 1, 0.5).result(timeout=30)
        assert rt.submit(square, 4).result(timeout=30) == 16


def test_control_messages_for_a_frozen_local_worker_never_block_the_driver() -> None:
    """A worker that reads nothing (SIGSTOP) while the driver sends it control messages
    (heartbeats, inspect requests, terminations: here far more than its control pipe holds):
    the driver drops what the pipe cannot take, as the PUB does at its high-water mark, and
    goes on serving; the worker, continued, serves again."""
    with phalanx.Runtime(workers=2) as rt:
        driver = rt._driver
        pids = rt.worker_pids()
        frozen = pids["w1"]
        os.kill(frozen, signal.SIGSTOP)
        try:
            for i in range(20000):
                with driver._lock:
                    driver.publish_locked(encode(Heartbeat(i)))
            assert rt.stats().workers  # the driver's lock is free: nothing waits on the frozen worker
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert list(rt.map(square, range(40), chunksize=1)) == [i * i for i in range(40)]
        assert rt.worker_pids() == pids  # nobody died of it
