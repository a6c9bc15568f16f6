"""``rt.stats()``: every counter of :class:`phalanx.RuntimeStats` moves when it should, and only then.

Runs in the test (driver) process, with real workers. Each test takes a
snapshot, makes exactly the events one counter (or a few) is about happen,
waits until the counters settle (polling, never sleeping for a guessed
time) and compares the difference with what is expected, counter by
counter, so an unexpected increment fails too. The operations live in
``tests/eco_ops.py``. Killing a worker uses the pid of a process this test's
runtime started.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

import phalanx
from eco_ops import GateError, fail_at, flaky, gated, gated_item, gated_or_fail, pid, square
from phalanx.transport.codec import encode
from phalanx.transport.messages import Results

#: generous bound on any single wait; tests finish far sooner
T = 30.0

#: the counters of RuntimeStats (``workers`` is the per-worker list)
COUNTERS = (
    "tasks_submitted",
    "tasks_completed",
    "tasks_failed",
    "items_completed",
    "retried",
    "skipped",
    "redelivered",
    "duplicates_dropped",
    "late_results_dropped",
    "frames_dropped",
    "worker_deaths",
    "worker_restarts",
    "workers_recycled",
    "jobs_open",
    # multi-host: they stay 0 here (tests/test_multihost.py makes them move)
    "workers_joined",
    "workers_lost",
    "workers_left",
    "peers_refused",
    # channels: they stay 0 here (tests/test_channels.py makes them move)
    "channel_messages_dropped",
    "channel_redelivered",
    # tasks taken back from a busy worker for an idle one (tests/test_dropin_bugs.py makes it move)
    "reclaimed",
)


def counters(rt: phalanx.Runtime) -> dict[str, int]:
    stats = rt.stats()
    return {name: getattr(stats, name) for name in COUNTERS}


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + T
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.005)


def settle(rt: phalanx.Runtime, before: dict[str, int], **moved: int) -> None:
    """Wait until every counter equals ``before`` plus ``moved`` (0 for those not named)."""
    unknown = set(moved) - set(COUNTERS)
    assert not unknown, unknown
    expected = {name: before[name] + moved.get(name, 0) for name in COUNTERS}
    deadline = time.monotonic() + T
    while True:
        now = counters(rt)
        if now == expected:
            return
        if time.monotonic() > deadline:
            diff = {k: (before[k], now[k], expected[k]) for k in COUNTERS if now[k] != expected[k]}
            pytest.fail(f"counters (before, now, expected) differ: {diff}")
        time.sleep(0.005)


class Gate:
    """A release file and per-item ``started``/``aborted`` files."""

    def __init__(self, root: Path, name: str = "gate") -> None:
        self.root, self.name = root, name
        self.release = str(root / f"{name}-release")

    def started(self, i: int = 0) -> str:
        return str(self.root / f"{self.name}-started-{i}")

    def aborted(self, i: int = 0) -> str:
        return str(self.root / f"{self.name}-aborted-{i}")

    def wait_started(self, i: int = 0) -> int:
        """Wait until item ``i`` runs; the pid of its worker."""
        path = Path(self.started(i))
        wait_until(lambda: path.exists() and path.read_text() != "", f"item {i} started")
        return int(path.read_text())

    def open(self) -> None:
        Path(self.release).touch()

    def item(self, i: int, value: Any = None) -> list[Any]:
        return [value, self.release, self.started(i), self.aborted(i)]


@pytest.fixture
def rt() -> Iterator[phalanx.Runtime]:
    with phalanx.Runtime(workers=2) as runtime:
        yield runtime


def test_the_documented_counters() -> None:
    fields = [f.name for f in msgspec.structs.fields(phalanx.RuntimeStats)]
    assert fields == ["workers", *COUNTERS]
    assert [f.name for f in msgspec.structs.fields(phalanx.WorkerStats)] == [
        "id", "pid", "alive", "ready", "inflight", "tasks", "items", "busy", "host", "remote", "tags",
        "frames_dropped",
    ]


def test_fresh_runtime(rt: phalanx.Runtime) -> None:
    assert counters(rt) == dict.fromkeys(COUNTERS, 0)
    stats = rt.stats()
    assert sorted(w.id for w in stats.workers) == sorted(rt.worker_pids())
    assert all(w.alive and w.ready and w.inflight == 0 and w.tasks == 0 and not w.remote for w in stats.workers)
    assert {w.pid for w in stats.workers} == set(rt.worker_pids().values())


def test_tasks_items_and_failures(rt: phalanx.Runtime) -> None:
    before = counters(rt)
    assert [rt.submit(square, i).result(T) for i in range(5)] == [0, 1, 4, 9, 16]
    assert list(rt.map(square, range(10), chunksize=5)) == [i * i for i in range(10)]  # 2 tasks, 10 items
    with pytest.raises(GateError):
        rt.submit(fail_at, 1, 1).result(T)
    settle(rt, before, tasks_submitted=8, tasks_completed=7, tasks_failed=1, items_completed=15)
    workers = rt.stats().workers
    assert sum(w.tasks for w in workers) == 8
    assert sum(w.items for w in workers) == 16  # the failed call counts as run
    assert all(w.busy >= 0 for w in workers) and sum(w.busy for w in workers) > 0


def test_jobs_open_while_a_map_runs(rt: phalanx.Runtime, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    before = counters(rt)
    it = rt.map(gated_item, [gate.item(0, "x")], chunksize=1)
    gate.wait_started(0)
    assert rt.stats().jobs_open == before["jobs_open"] + 1
    assert sum(w.inflight for w in rt.stats().workers) == 1
    gate.open()
    assert list(it) == ["x"]
    settle(rt, before, tasks_submitted=1, tasks_completed=1, items_completed=1)


def test_retried(rt: phalanx.Runtime, tmp_path: Path) -> None:
    ok, exhausted = tmp_path / "ok", tmp_path / "exhausted"
    ok.mkdir()
    exhausted.mkdir()
    before = counters(rt)
    assert rt.options(retry=phalanx.Immediate(3)).submit(flaky, str(ok), 2).result(T) == 3
    settle(rt, before, tasks_submitted=1, tasks_completed=1, items_completed=1, retried=2)
    before = counters(rt)
    with pytest.raises(phalanx.Transient):
        rt.options(retry=phalanx.Immediate(1)).submit(flaky, str(exhausted), 5).result(T)
    settle(rt, before, tasks_submitted=1, tasks_failed=1, retried=1)


def test_skipped(rt: phalanx.Runtime) -> None:
    before = counters(rt)
    it = rt.options(on_fatal=phalanx.Ignore).map(fail_at, range(10), [3] * 10, chunksize=1)
    assert list(it) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert [index for index, _ in it.skipped] == [3]
    # The task of the skipped item completes (the map goes on); the item is not a completed one.
    settle(rt, before, tasks_submitted=10, tasks_completed=10, items_completed=9, skipped=1)


def test_redelivered_deaths_and_restarts(rt: phalanx.Runtime, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    before = counters(rt)
    fut = rt.submit(gated, gate.release, gate.started(), "once")
    victim = gate.wait_started()
    assert victim in rt.worker_pids().values()
    Path(gate.started()).unlink()
    os.kill(victim, signal.SIGKILL)  # a worker this runtime started
    survivor = gate.wait_started()  # the task runs again, elsewhere
    assert survivor != victim
    gate.open()
    assert fut.result(T) == "once"
    wait_until(lambda: rt.n_workers == 2 and all(w.ready for w in rt.stats().workers if w.alive), "replacement")
    settle(rt, before, tasks_submitted=1, tasks_completed=1, items_completed=1, redelivered=1,
           worker_deaths=1, worker_restarts=1)
    assert victim not in rt.worker_pids().values()


def test_workers_recycled() -> None:
    with phalanx.Runtime(workers=1, max_tasks_per_worker=2) as rt:
        before = counters(rt)
        pids = {rt.submit(pid).result(T) for _ in range(5)}
        assert len(pids) == 3
        wait_until(lambda: rt.stats().workers_recycled == 2 and rt.n_workers == 1, "the last recycling")
        settle(rt, before, tasks_submitted=5, tasks_completed=5, items_completed=5, workers_recycled=2)


def test_frames_dropped(rt: phalanx.Runtime, zmq_ctx: zmq.Context[Any]) -> None:
    before = counters(rt)
    sock = zmq_ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(rt.endpoints[1])  # the results socket
    sock.send(b"\x00junk that is no message")  # does not decode
    sock.send_multipart([b"one", b"frame", b"too many"])  # wrong shape
    sock.send(encode(Results("w99", [], 0.0)))  # well formed, from nobody the driver knows
    settle(rt, before, frames_dropped=3)
    sock.close()
    assert rt.submit(square, 9).result(T) == 81  # and it keeps serving


def test_worker_frames_dropped(rt: phalanx.Runtime) -> None:
    """A malformed frame on a worker's inbox or control channel is counted by that worker and dropped.

    The driver hears each worker's running count with its next results and
    its inspect replies (``WorkerStats.frames_dropped``); its own
    ``frames_dropped`` does not move: it received nothing malformed.
    """
    driver = rt._driver
    pids = rt.worker_pids()
    ids = sorted(pids)
    before = counters(rt)

    def reported(expected: int) -> bool:
        return {w.id: w.frames_dropped for w in rt.stats().workers if w.alive} == dict.fromkeys(ids, expected)

    # The driver's own send paths, with frames no worker can decode.
    for wid in ids:
        assert driver.send_unfiltered(wid.encode(), b"\x00junk that is no message")  # the inbox
    with driver._lock:
        driver.publish_locked(b"\xc1 is never msgpack")  # every worker's control pipe (or SUB)
    # An inspect reply carries the count (from the control thread, so poll until the
    # main thread has read its inbox too).
    wait_until(lambda: bool(rt.inspect(timeout=T)) and reported(2), "both workers report 2 dropped frames")

    # A second bad inbox frame: the count rides on the worker's next results. The
    # inbox is in order, so a worker that answers a task had dropped the frame first.
    for wid in ids:
        assert driver.send_unfiltered(wid.encode(), b"\x93\x01")  # truncated msgpack
    submitted = 0

    def both_answered() -> bool:
        nonlocal submitted
        assert list(rt.map(square, range(20), chunksize=1)) == [i * i for i in range(20)]
        submitted += 20
        return reported(3)

    wait_until(both_answered, "both workers report 3 dropped frames in their results")
    assert rt.submit(square, 12).result(T) == 144
    settle(rt, before, tasks_submitted=submitted + 1, tasks_completed=submitted + 1, items_completed=submitted + 1)
    assert rt.worker_pids() == pids  # nobody died of it


def test_late_results_dropped(rt: phalanx.Runtime, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    pids = rt.worker_pids()
    before = counters(rt)
    it = rt.map(gated_item, [gate.item(i, i) for i in range(2)], chunksize=1)
    gate.wait_started(0)
    gate.wait_started(1)
    it.close()  # ends the job; both running tasks see their abort flag and return
    wait_until(lambda: Path(gate.aborted(0)).exists() and Path(gate.aborted(1)).exists(), "both aborted")
    settle(rt, before, tasks_submitted=2, late_results_dropped=2)
    assert rt.worker_pids() == pids


def test_duplicates_dropped(tmp_path: Path) -> None:
    """An outcome of a task its (still open) job no longer waits for is a duplicate.

    Ordered map, one task per item, one credit per worker: item 0 waits for
    gate A on one worker, item 1 fails at once on the other, which then
    takes item 2 (waits for gate B). The failure at item 1 means nothing
    after it is wanted, so the map forgets item 2 (and item 3, never sent)
    while it still waits for item 0; item 2's result then arrives for an
    open job that no longer expects it.
    """
    a, b = Gate(tmp_path, "a"), Gate(tmp_path, "b")
    items = [[0, a.release, a.started(), None], [1, None, None, "item 1 fails"],
             [2, b.release, b.started(), None], [3, b.release, b.started(3), None]]
    with phalanx.Runtime(workers=2, credits=1) as rt:
        before = counters(rt)
        it = rt.map(gated_or_fail, items, chunksize=1)
        got: list[Any] = []
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                got.extend(it)
            except BaseException as exc:  # the item 1 failure, raised in order
                errors.append(exc)

        consumer = threading.Thread(target=consume)
        consumer.start()
        try:
            a.wait_started()
            b.wait_started()
            job = it._lease.job  # private: wait until the map forgot the items after the failure
            wait_until(lambda: 2 not in job.outstanding and 3 not in job.outstanding, "items 2 and 3 dropped")
            b.open()
            wait_until(lambda: rt.stats().duplicates_dropped == before["duplicates_dropped"] + 1, "the duplicate")
            a.open()
            consumer.join(T)
            assert not consumer.is_alive()
        finally:
            a.open()
            b.open()
        assert got == [0]
        assert len(errors) == 1 and isinstance(errors[0], GateError)
        settle(rt, before, tasks_submitted=4, tasks_completed=1, tasks_failed=1, items_completed=1,
               duplicates_dropped=1)
        assert not Path(b.started(3)).exists()  # item 3 was never sent
