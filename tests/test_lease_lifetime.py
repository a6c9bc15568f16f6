"""Lease lifetime: leases whose ends are closed or collected are freed in the driver.

Runs real worker processes (the test process is the driver). What is checked:

* A lease closed and consumed (``tx.send; rx.recv; tx.close``), thousands of
  times over, in a driver process of its own: the broker's lease count
  returns to zero and the driver's memory stays flat (what Python allocated
  is measured: RSS moves in allocator steps whatever the code does).
* A lease whose ends never left the driver is freed once they are all
  closed or garbage collected, whatever they did (nothing, sent, received,
  held a message unacked, subscribed); what it still queued is counted as
  dropped.
* Ends passed to operations and actors and closed there (the sender closed
  by a producer, the receivers drained by consumers) free their lease.
* Nothing is freed while it can still be used: a lease whose receiver went
  to an operation keeps working after the driver dropped its own copy;
  late ends of a closed and freed lease still hear "closed", and a
  subscription made then ends quietly.

Counts and memory are read after the loops; waits have generous deadlines,
never asserted on.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import phalanx

import channel_ops

T = 60.0  # seconds: generous waits, never asserted on
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def rt() -> Iterator[phalanx.Runtime]:
    runtime = phalanx.Runtime(workers=2)
    try:
        yield runtime
    finally:
        runtime.shutdown()


def open_leases(rt: phalanx.Runtime) -> int:
    broker = rt._driver.channels
    return 0 if broker is None else broker.state.open_leases


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + T
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        gc.collect()
        time.sleep(0.01)


def settle(rt: phalanx.Runtime, base: int) -> None:
    gc.collect()
    wait_until(lambda: open_leases(rt) <= base, f"leases back to {base} (now {open_leases(rt)})")


@pytest.mark.timeout(300)
def test_closed_leases_are_freed_and_memory_stays_flat() -> None:
    """5000 cycles of lease, send, recv, close, in a driver process of its own (lease_loop.py)."""
    done = subprocess.run([sys.executable, str(TESTS / "lease_loop.py"), "5000"], capture_output=True,
                          text=True, timeout=240, cwd=TESTS)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["leases"] == 0 and result["ends"] == 0, result
    kept = result["kept"]  # RSS moves in allocator steps: what Python allocated says what phalanx kept
    assert kept < 256 << 10, f"the driver kept {kept / 2**20:.1f} MiB over 5000 leases"


@pytest.mark.timeout(300)
def test_leases_whose_ends_are_collected_are_freed(rt: phalanx.Runtime) -> None:
    base = open_leases(rt)
    dropped = rt.stats().channel_messages_dropped
    for i in range(300):
        tx, rx = rt.lease()  # used: one message each way, nothing closed
        tx.send(i)
        assert rx.recv(timeout=T) == i
        tx, rx = rt.lease()  # never used
        tx, rx = rt.lease()  # sent, never received: dropped with the lease
        tx.send(i)
        tx.flush()
        tx, rx = rt.lease()  # a message held unacked when the receiver goes
        tx.send(i)
        assert rx.recv_message(timeout=T).value == i
        tx, rx = rt.lease(phalanx.Broadcast)  # subscriptions, one read
        sub = rx.subscribe()
        tx.send(i)
        assert sub.recv(timeout=T) == i
        del tx, rx, sub
    settle(rt, base)
    assert rt.stats().channel_messages_dropped >= dropped + 300
    with rt.lease() as (tx, rx):  # still serving
        tx.send("after")
        assert rx.recv(timeout=T) == "after"


@pytest.mark.timeout(300)
def test_ends_closed_in_operations_and_actors_free_their_lease(rt: phalanx.Runtime) -> None:
    base = open_leases(rt)
    sink = rt.spawn(channel_ops.Sink)
    try:
        for i in range(40):
            tx, rx = rt.lease()  # the producer closes its copy of the sender
            job = rt.submit(channel_ops.produce, tx, i, 3)
            assert list(rx) == [i, i + 1, i + 2]
            assert job.result(timeout=T) == 3
            tx, rx = rt.lease()  # consumers in operations and in an actor drain it
            jobs = [rt.submit(channel_ops.collect, rx), rt.submit(channel_ops.collect, rx)]
            drained = sink.drain(rx)
            for x in range(10):
                tx.send(x)
            tx.close()
            got = sorted([x for j in jobs for x in j.result(timeout=T)] + drained.result(timeout=T))
            assert got == list(range(10))
            del tx, rx
        settle(rt, base)
    finally:
        sink.stop()


@pytest.mark.timeout(120)
def test_a_lease_still_in_use_is_not_freed(rt: phalanx.Runtime) -> None:
    tx, rx = rt.lease()
    job = rt.submit(channel_ops.collect, rx)
    del rx  # the operation still has its copy
    gc.collect()
    for x in range(5):
        tx.send(x)
    tx.close()
    assert job.result(timeout=T) == list(range(5))

    tx, rx = rt.lease()
    job = rt.submit(channel_ops.produce, tx, 0, 5, False)  # sends, flushes, does not close
    del tx
    gc.collect()
    assert [rx.recv(timeout=T) for _ in range(5)] == list(range(5))
    assert job.result(timeout=T) == 5

    tx, rx = rt.lease()  # closed and drained: freed, but late ends still hear "closed"
    copy = rt.submit(channel_ops.return_receiver, rx).result(timeout=T)
    tx.send(1)
    assert rx.recv(timeout=T) == 1
    tx.close()
    with pytest.raises(phalanx.ChannelClosedError) as info:
        copy.recv(timeout=T)
    assert info.value.reason == "closed"
    with pytest.raises(phalanx.ChannelClosedError) as info:
        tx.send(2)
    assert info.value.reason == "end closed"

    tx, rx = rt.lease(phalanx.Broadcast)
    tx.send(1)
    assert rx.recv(timeout=T) == 1
    tx.close()
    late = rx.subscribe(timeout=T)
    assert list(late) == [] and list(rx) == []
