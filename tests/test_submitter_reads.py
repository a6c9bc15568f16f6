"""A thread submitting behind every free credit reads the local workers' outcomes itself.

While one thread submits faster than the workers run tasks, the pump would
contend with it for the interpreter on every pipe it reads and task it
writes, and the workers ran dry (``phalanx.pipes.LocalPipes.help``). The
submitting thread reads and resolves what is ready instead (credits back,
the next tasks written); the pump delivers. What must hold whoever reads:
every outcome delivered once, a worker dying mid-batch redelivered with no
hang, its replacement's Hello handled, and no done-callback run inside
``submit`` (its caller may hold a lock the callback takes).
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import phalanx

import fault_ops
import ops
from pump_hold import PumpHeld

pytestmark = pytest.mark.timeout(120)


def _count_once(done: collections.Counter[int], i: int) -> object:
    def callback(_: object) -> None:
        done[i] += 1
    return callback


def _each_called_back_once(done: collections.Counter[int], n: int) -> None:
    """Wait (30 s at most) for the done-callbacks the pump runs: each of the ``n`` ran exactly once."""
    deadline = time.monotonic() + 30
    while len(done) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(done.values()) == {1} and len(done) == n


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_a_thread_submitting_behind_every_credit_keeps_the_workers_fed(tmp_path: Path) -> None:
    """With the pump stuck (in a done-callback), the submitting thread still reads outcomes and
    sends the queued tasks; before, nothing past the first credits ran until the pump came back."""
    log = tmp_path / "ran"
    done: collections.Counter[int] = collections.Counter()
    with phalanx.Runtime(workers=2, credits=1) as rt:
        pump = PumpHeld(rt)
        futures = []
        try:
            for i in range(5000):
                fut = rt.submit(fault_ops.record, str(log), i)
                fut.add_done_callback(_count_once(done, i))
                futures.append(fut)
                if _lines(log) >= 10:
                    break
                time.sleep(0.002)
            ran = _lines(log)
        finally:
            pump.release()
        assert ran >= 10  # 2 (one credit per worker) with only the pump to read outcomes
        assert pump.first.result(timeout=30) == 1
        assert [f.result(timeout=60) for f in futures] == list(range(len(futures)))
        _each_called_back_once(done, len(futures))
        assert rt.stats().frames_dropped == 0 and rt._driver.broken is None


def test_a_worker_killed_while_the_submitter_reads_its_pipe_is_redelivered() -> None:
    """SIGKILL a worker in the middle of a batch the submitting thread reads: each outcome once, no hang."""
    done: collections.Counter[int] = collections.Counter()
    with phalanx.Runtime(workers=2, credits=4) as rt:
        victim = next(iter(rt.worker_pids().values()))
        futures = []
        for i in range(6000):
            if i == 2000:
                os.kill(victim, signal.SIGKILL)
            fut = rt.submit(ops.inc, i)
            fut.add_done_callback(_count_once(done, i))
            futures.append(fut)
        assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(6000)]
        _each_called_back_once(done, 6000)
        assert rt.stats().worker_deaths == 1 and rt._driver.broken is None
        # Its replacement said Hello and Ready (whoever read them, the pump handled them) and serves.
        deadline = time.monotonic() + 30
        while len(rt.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert victim not in rt.worker_pids().values() and len(rt.worker_pids()) == 2
        assert [f.result(timeout=30) for f in [rt.submit(ops.inc, i) for i in range(200)]] == list(range(1, 201))


def test_a_done_callback_never_runs_inside_submit() -> None:
    """A caller submitting under its own lock, with done-callbacks taking that lock (as
    concurrent.futures' executors do): no deadlock, every callback runs once."""
    lock = threading.Lock()
    done: collections.Counter[int] = collections.Counter()

    def callback(i: int) -> object:
        def run(_: object) -> None:
            with lock:
                done[i] += 1
        return run

    with phalanx.Runtime(workers=2, credits=1) as rt:
        futures = []
        for i in range(3000):
            with lock:
                fut = rt.submit(ops.inc, i)
                fut.add_done_callback(callback(i))
            futures.append(fut)
        assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(3000)]
        _each_called_back_once(done, 3000)
        assert rt._driver.broken is None


def test_threads_submitting_behind_every_credit_at_once_all_succeed() -> None:
    """Eight threads submit at once while every credit is taken: each may find the pipes to read,
    but only one reads at a time (a poll object is one thread's); before, the others' submit
    raised ``RuntimeError: concurrent poll() invocation``."""
    errors: list[BaseException] = []

    def submit_many(rt: phalanx.Runtime) -> None:
        try:
            futures = [rt.submit(ops.inc, i) for i in range(2000)]
            assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(2000)]
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    with phalanx.Runtime(workers=2) as rt:
        for _ in range(3):
            threads = [threading.Thread(target=submit_many, args=(rt,)) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(90)
            assert not any(t.is_alive() for t in threads)
    assert errors == []
