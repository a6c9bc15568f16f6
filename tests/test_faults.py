"""Each failure kind of the fault-tolerance model, with its exact error type.

Runs real worker processes. After every failure the runtime must still work:
each test ends by running a normal task on the same runtime.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import pytest

import phalanx
from fault_ops import (
    cooperative,
    exit_with,
    fail_first_then_record,
    fail_odd,
    flaky,
    flaky_connection,
    hoard,
    inc,
    pid,
    record,
    segfault,
    sigkill_self,
    sleep_then,
    stubborn,
)


def still_works(rt: phalanx.Runtime) -> None:
    assert rt.submit(inc, 41).result(timeout=30) == 42
    assert list(rt.map(inc, range(50))) == list(range(1, 51))


# ---- worker death -----------------------------------------------------------


def test_sigkill_mid_task_redelivers_exactly_once() -> None:
    with phalanx.Runtime(workers=2) as rt:
        futures = [rt.submit(sleep_then, 0.1, i) for i in range(8)]
        time.sleep(0.05)
        victim = next(iter(rt.worker_pids()))
        rt._driver.kill_worker(victim)
        assert [f.result(timeout=30) for f in futures] == list(range(8))
        stats = rt.stats()
        assert stats.redelivered >= 1
        assert stats.worker_deaths == 1
        assert victim not in rt.worker_pids()
        still_works(rt)


@pytest.mark.parametrize(
    ("op", "args", "exitcode"),
    [
        (exit_with, (7,), 7),
        (sigkill_self, (), -signal.SIGKILL),
        (segfault, (), -signal.SIGSEGV),
    ],
    ids=["os._exit", "sigkill", "segfault"],
)
def test_poison_task_fails_after_max_attempts(op: object, args: tuple[int, ...], exitcode: int) -> None:
    with phalanx.Runtime(workers=2, max_attempts=2) as rt:
        fut = rt.submit(op, *args)  # type: ignore[call-overload]
        with pytest.raises(phalanx.WorkerCrashedError) as info:
            fut.result(timeout=60)
        assert info.value.exitcode == exitcode
        assert isinstance(info.value, ChildProcessError)
        assert rt.stats().worker_deaths == 2  # max_attempts, then no endless respawn loop
        still_works(rt)


def test_poison_task_charges_only_itself() -> None:
    # One worker holds a quick task and the poison task behind it: the quick one's
    # outcome is batched when the poison kills the worker. Its redelivery must not
    # charge it again, or it fails with the poison's error (max_attempts rounds).
    with phalanx.Runtime(workers=1) as rt:
        for _ in range(3):
            before = [rt.submit(inc, i) for i in range(4)]
            poison = rt.submit(exit_with, 3)
            after = [rt.submit(inc, i) for i in range(4, 8)]
            assert [f.result(timeout=60) for f in before + after] == list(range(1, 9))
            with pytest.raises(phalanx.WorkerCrashedError) as info:
                poison.result(timeout=60)
            assert info.value.exitcode == 3
        still_works(rt)


def test_restart_intensity_breaks_runtime_for_every_caller() -> None:
    with phalanx.Runtime(workers=2, restart_limit=2, restart_window=60, max_attempts=100) as rt:
        poison = [rt.submit(exit_with, 3) for _ in range(3)]
        waiting = [rt.submit(sleep_then, 60.0, i) for i in range(4)]
        for fut in poison + waiting:
            with pytest.raises(phalanx.RuntimeBrokenError) as info:
                fut.result(timeout=60)
            assert isinstance(info.value, concurrent.futures.BrokenExecutor)
        with pytest.raises(phalanx.RuntimeBrokenError):
            rt.submit(inc, 1)


def test_worker_death_during_map_and_fold() -> None:
    with phalanx.Runtime(workers=2, max_attempts=5) as rt:
        it = rt.map(sleep_then, [0.01] * 200, range(200), chunksize=5)
        first = [next(it) for _ in range(10)]
        rt._driver.kill_worker(next(iter(rt.worker_pids())))
        assert first + list(it) == list(range(200))
        still_works(rt)


# ---- transient and fatal errors -----------------------------------------------


def test_transient_retried_immediately(tmp_path: Path) -> None:
    with phalanx.Runtime(workers=2) as rt:
        counter = str(tmp_path / "n")
        assert rt.options(retry=phalanx.Immediate(3)).submit(flaky, counter, 2).result(timeout=30) == 2
        assert rt.stats().retried == 2
        still_works(rt)


def test_transient_retried_after_delay_and_exponential(tmp_path: Path) -> None:
    with phalanx.Runtime(workers=2) as rt:
        for i, strategy in enumerate([phalanx.After(0.05, 2), phalanx.Exponential(0.01, 2.0, 0.1, 3)]):
            counter = str(tmp_path / f"n{i}")
            assert rt.options(retry=strategy).submit(flaky, counter, 2).result(timeout=30) == 2
        still_works(rt)


def test_transient_exhausted_is_fatal(tmp_path: Path) -> None:
    with phalanx.Runtime(workers=2) as rt:
        counter = str(tmp_path / "n")
        with pytest.raises(phalanx.Transient, match="attempt 2 failed"):
            rt.options(retry=phalanx.Immediate(2)).submit(flaky, counter, 10).result(timeout=30)
        assert Path(counter).read_text() == "3"  # first try + 2 retries
        still_works(rt)


def test_transient_without_strategy_is_not_retried(tmp_path: Path) -> None:
    with phalanx.Runtime(workers=2) as rt:
        counter = str(tmp_path / "n")
        with pytest.raises(phalanx.Transient):
            rt.submit(flaky, counter, 1).result(timeout=30)
        assert Path(counter).read_text() == "1"


def test_transient_exception_types_declared_on_operation(tmp_path: Path) -> None:
    with phalanx.Runtime(workers=2) as rt:
        counter = str(tmp_path / "n")
        assert rt.submit(flaky_connection, counter, 3).result(timeout=30) == 3


def test_transient_retry_resumes_map_chunk(tmp_path: Path) -> None:
    with phalanx.Runtime(workers=2) as rt:
        counter = str(tmp_path / "n")
        it = rt.options(retry=phalanx.Immediate(3)).map(flaky, [counter] * 5, [1] * 5, chunksize=5)
        # The first call fails once; the retry resumes at the failed item.
        assert list(it) == [1, 2, 3, 4, 5]


def test_fatal_terminate_fails_job_and_cancels_its_tasks(tmp_path: Path) -> None:
    log = tmp_path / "ran"
    n = 300
    with phalanx.Runtime(workers=2) as rt:
        with pytest.raises(RuntimeError, match="first item fails") as info:
            list(rt.map(fail_first_then_record, [str(log)] * n, range(n), chunksize=1))
        assert isinstance(info.value.__cause__, phalanx.RemoteTraceback)
        time.sleep(0.5)
        ran = log.read_text().split() if log.exists() else []
        assert len(ran) < n  # terminated: queued tasks were dropped
        still_works(rt)


def test_fatal_ignore_completes_and_reports_skipped() -> None:
    with phalanx.Runtime(workers=2) as rt:
        it = rt.options(on_fatal=phalanx.Ignore).map(fail_odd, range(20), chunksize=3)
        assert list(it) == list(range(0, 20, 2))
        assert [i for i, _ in it.skipped] == list(range(1, 20, 2))
        assert all(isinstance(e, ValueError) for _, e in it.skipped)
        assert rt.stats().skipped == 10
        still_works(rt)


def test_fold_rejects_ignore() -> None:
    with phalanx.Runtime(workers=1) as rt:
        with pytest.raises(ValueError, match="fold needs every item"):
            rt.options(on_fatal=phalanx.Ignore).fold(inc, [1, 2])


# ---- cancellation, abort, timeouts -------------------------------------------


def test_cancel_queued_future_never_runs(tmp_path: Path) -> None:
    log = tmp_path / "ran"
    with phalanx.Runtime(workers=1, credits=1) as rt:
        blocker = rt.submit(sleep_then, 0.5, 0)
        time.sleep(0.1)
        queued = rt.submit(record, str(log), 99)
        assert queued.cancel()
        assert blocker.result(timeout=30) == 0
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result(timeout=1)
        still_works(rt)
        assert not log.exists()


def test_running_future_cannot_be_cancelled() -> None:
    with phalanx.Runtime(workers=1) as rt:
        fut = rt.submit(sleep_then, 0.3, 5)
        time.sleep(0.1)
        assert not fut.cancel()
        assert fut.result(timeout=30) == 5


def test_closing_map_aborts_running_tasks_cooperatively(tmp_path: Path) -> None:
    flags = [str(tmp_path / f"f{i}") for i in range(2)]
    with phalanx.Runtime(workers=2, abort_grace=10) as rt:
        pids = rt.worker_pids()
        it = rt.map(cooperative, flags, [30.0, 30.0], chunksize=1)
        deadline = time.monotonic() + 10
        while rt.stats().workers[0].inflight + rt.stats().workers[1].inflight < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        it.close()
        deadline = time.monotonic() + 10
        while not all(os.path.exists(f) for f in flags) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(Path(f).read_text() == "aborted" for f in flags)
        still_works(rt)
        assert rt.worker_pids() == pids  # cooperative: nobody was killed


def test_timeout_cooperative_task(tmp_path: Path) -> None:
    flag = str(tmp_path / "flag")
    with phalanx.Runtime(workers=1, abort_grace=10) as rt:
        pids = rt.worker_pids()
        with pytest.raises(phalanx.TaskTimeoutError) as info:
            rt.options(timeout=0.2).submit(cooperative, flag, 30.0).result(timeout=30)
        assert isinstance(info.value, TimeoutError)
        deadline = time.monotonic() + 10
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert Path(flag).read_text() == "aborted"
        still_works(rt)
        assert rt.worker_pids() == pids


def test_timeout_stubborn_task_kills_its_worker() -> None:
    with phalanx.Runtime(workers=1, abort_grace=0.3) as rt:
        before = set(rt.worker_pids().values())
        with pytest.raises(phalanx.TaskTimeoutError):
            rt.options(timeout=0.2).submit(stubborn, 60.0).result(timeout=30)
        still_works(rt)
        deadline = time.monotonic() + 10
        while set(rt.worker_pids().values()) & before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not set(rt.worker_pids().values()) & before
        assert rt.stats().worker_deaths == 0  # a planned kill is not a crash


def test_operation_level_timeout() -> None:
    with phalanx.Runtime(workers=1, abort_grace=0.3) as rt:
        with pytest.raises(phalanx.TaskTimeoutError):
            rt.options(timeout=0.1).map(sleep_then, [5.0], [1]).__next__()
        still_works(rt)


# ---- recycling ----------------------------------------------------------------


def test_recycle_after_max_tasks_loses_nothing() -> None:
    with phalanx.Runtime(workers=2, max_tasks_per_worker=5) as rt:
        pids = list(rt.map(pid, range(60), chunksize=1))
        assert len(pids) == 60
        assert len(set(pids)) >= 60 // 5
        assert rt.stats().workers_recycled >= 10
        assert rt.stats().worker_deaths == 0
        still_works(rt)


def test_recycle_above_memory_limit() -> None:
    with phalanx.Runtime(workers=1, max_memory_per_worker=150 * 1024 * 1024) as rt:
        first = rt.submit(hoard, 200).result(timeout=30)
        deadline = time.monotonic() + 20
        while first in rt.worker_pids().values() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first not in rt.worker_pids().values()
        assert rt.stats().workers_recycled == 1
        still_works(rt)
