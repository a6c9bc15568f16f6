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


def test_a_stranger_using_a_local_workers_side_channel_name_is_dropped() -> None:
    """A local worker's control thread writes to its pipe, so the name of its side channel
    (``w1!``) on the results ROUTER is free: a process of this user connecting under it
    with a well-formed result for the task the worker runs is dropped and counted, and the
    caller gets the worker's own result."""
    import time

    import zmq

    from phalanx.transport.messages import Ok, Results

    with phalanx.Runtime(workers=1) as rt:
        fut = rt.submit(sleep_then, "real", 1.0)
        worker = rt._driver._workers[b"w1"]
        deadline = time.monotonic() + 30
        while not worker.inflight:
            assert time.monotonic() < deadline, "the task never went out"
            time.sleep(0.005)
        (job, seq), task = next(iter(worker.inflight.items()))
        before = rt.stats().frames_dropped
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, b"w1!")
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(rt.endpoints[1])
            sock.send(encode(Results("w1", [Ok(job, seq, task.attempt, "forged")], 0.0, 0)))
            while rt.stats().frames_dropped == before:
                assert time.monotonic() < deadline, "the forged result was never counted"
                time.sleep(0.005)
            assert fut.result(timeout=30) == "real"
            assert rt.stats().frames_dropped == before + 1
        finally:
            ctx.destroy(linger=0)
