"""Each failure kind of the fault-tolerance model, with its exact error type.

Runs real worker processes. After every failure the runtime must still work:
each test ends by running a normal task on the same runtime.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import phalanx
from fault_ops import (
    cooperative,
    exit_with,
    fail_first_then_record,
    fail_odd,
    fail_or_wait,
    flaky,
    flaky_connection,
    flaky_stamped,
    gated_record,
    hoard,
    inc,
    pid,
    record,
    segfault,
    sigkill_self,
    sleep_then,
    stubborn,
    stubborn_marked,
)
from phalanx.testing import DelayMessage, DeliveryLog, DuplicateMessage
from phalanx.worker import _Terminated

#: generous bound on any single wait; tests finish far sooner
T = 30.0


def still_works(rt: phalanx.Runtime) -> None:
    assert rt.submit(inc, 41).result(timeout=30) == 42
    assert list(rt.map(inc, range(50))) == list(range(1, 51))


def wait_until(predicate: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + T
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.005)


# ---- worker death -----------------------------------------------------------


def test_sigkill_mid_task_redelivers_exactly_once(tmp_path: Path) -> None:
    release = tmp_path / "release"
    with phalanx.Runtime(workers=2) as rt:
        # The tasks run until released: the victim still holds its tasks when it is killed,
        # however late this thread runs (tasks that only slept 0.1 s could all be done by then).
        futures = [rt.submit(gated_record, str(tmp_path / "ran"), str(release), i) for i in range(8)]
        holding: list[str] = []
        wait_until(lambda: holding.extend(w.id for w in rt.stats().workers if w.inflight) or holding,
                   "a worker holds tasks")
        victim = holding[0]
        rt._driver.kill_worker(victim)
        release.touch()
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


@pytest.mark.parametrize(
    ("strategy", "delays"),
    [(phalanx.After(0.15, 3), [0.15, 0.15, 0.15]),
     (phalanx.Exponential(0.05, 2.0, 0.15, 4), [0.05, 0.1, 0.15, 0.15])],
    ids=["After", "Exponential"],
)
def test_retry_waits_its_delay_between_attempts(
    tmp_path: Path, strategy: phalanx.RetryStrategy, delays: list[float]
) -> None:
    """Each attempt stamps the time it started: consecutive ones are at least the delay apart."""
    stamps = tmp_path / "stamps"
    with phalanx.Runtime(workers=2) as rt:
        fut = rt.options(retry=strategy).submit(flaky_stamped, str(stamps), len(delays))
        assert fut.result(timeout=30) == len(delays)
        times = [float(t) for t in stamps.read_text().split()]
        assert len(times) == len(delays) + 1
        gaps = [b - a for a, b in zip(times, times[1:])]
        # A lower bound only: the delay starts once the failure reached the driver,
        # after the attempt's stamp, so no gap can be shorter than its delay.
        assert all(gap >= delay for gap, delay in zip(gaps, delays)), (gaps, delays)
        assert rt.stats().retried == len(delays)
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
        still_works(rt)


def test_transient_exception_types_declared_on_operation(tmp_path: Path) -> None:
    with phalanx.Runtime(workers=2) as rt:
        counter = str(tmp_path / "n")
        assert rt.submit(flaky_connection, counter, 3).result(timeout=30) == 3
        still_works(rt)


def test_transient_retry_resumes_map_chunk(tmp_path: Path) -> None:
    with phalanx.Runtime(workers=2) as rt:
        counter = str(tmp_path / "n")
        it = rt.options(retry=phalanx.Immediate(3)).map(flaky, [counter] * 5, [1] * 5, chunksize=5)
        # The first call fails once; the retry resumes at the failed item.
        assert list(it) == [1, 2, 3, 4, 5]
        still_works(rt)


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


def test_fatal_terminate_aborts_the_jobs_task_running_on_the_other_worker(tmp_path: Path) -> None:
    """Item 0 fails fatally while item 1 runs on the other worker: item 1 sees its abort flag.

    One credit per worker puts the two items on two workers. The map fails
    with item 0's error; the Terminate broadcast reaches the other worker,
    whose task marks that it saw ``current_task().aborted`` and returns; that
    late result of the terminated job is dropped and counted.
    """
    started = [str(tmp_path / f"started{i}") for i in range(2)]
    aborted = str(tmp_path / "aborted")
    items = [["fail", started[0], started[1], aborted], ["wait", started[1], "", aborted]]
    with phalanx.Runtime(workers=2, credits=1, abort_grace=10) as rt:
        pids = rt.worker_pids()
        before = rt.stats()
        with pytest.raises(RuntimeError, match="fatal: the first item fails") as info:
            list(rt.map(fail_or_wait, *zip(*items), chunksize=1))
        assert isinstance(info.value.__cause__, phalanx.RemoteTraceback)
        assert Path(started[0]).read_text() != Path(started[1]).read_text()  # two workers
        wait_until(lambda: os.path.exists(aborted), "the running task saw its abort flag")
        assert Path(aborted).read_text() == "aborted"
        wait_until(lambda: rt.stats().late_results_dropped == before.late_results_dropped + 1,
                   "the aborted task's late result dropped and counted")
        after = rt.stats()
        assert after.tasks_failed == before.tasks_failed + 1
        assert after.duplicates_dropped == before.duplicates_dropped
        assert after.jobs_open == 0
        still_works(rt)
        assert rt.worker_pids() == pids  # cooperative: nobody was killed


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
        still_works(rt)


# ---- cancellation, abort, timeouts -------------------------------------------


def test_cancel_queued_future_never_runs(tmp_path: Path) -> None:
    log = tmp_path / "ran"
    release = tmp_path / "release"
    with phalanx.Runtime(workers=1, credits=1) as rt:
        # The blocker holds the worker's one credit until released, however late this thread runs
        # (a blocker that only slept let the queued call start first under load).
        blocker = rt.submit(gated_record, str(tmp_path / "blocker"), str(release), 0)
        queued = rt.submit(record, str(log), 99)
        assert queued.cancel()
        release.touch()
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
        still_works(rt)


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


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_ending_a_map_kills_a_stubborn_task_after_the_grace(tmp_path: Path, how: str) -> None:
    started = str(tmp_path / "started")
    with phalanx.Runtime(workers=1, abort_grace=0.3) as rt:
        before = set(rt.worker_pids().values())
        it = rt.map(stubborn_marked, [started], [60.0], chunksize=1)
        wait_until(lambda: os.path.exists(started), "the task runs")
        if how == "cancel":
            assert it.cancel() is True
            assert it.cancel() is False  # already ended
        else:
            it.close()
        assert list(it) == []
        wait_until(lambda: rt.worker_pids() and not set(rt.worker_pids().values()) & before,
                   "the worker is killed after abort_grace and replaced")
        still_works(rt)
        stats = rt.stats()
        assert stats.worker_deaths == 0  # a planned kill is not a crash
        assert stats.worker_restarts == 1


def test_map_cancel_drops_queued_tasks(tmp_path: Path) -> None:
    """One worker holding one task: ``cancel()`` drops what waits in the driver; only that task ran."""
    log, release = tmp_path / "ran", tmp_path / "release"
    n = 20
    with phalanx.Runtime(workers=1, credits=1) as rt:
        it = rt.map(gated_record, [str(log)] * n, [str(release)] * n, range(n), chunksize=1)
        wait_until(lambda: log.exists() and log.read_text() == "0\n", "item 0 runs")
        assert it.items_read > 1  # more items were queued in the driver
        assert it.cancel() is True
        release.touch()
        assert list(it) == []
        wait_until(lambda: rt.stats().jobs_open == 0 and all(w.inflight == 0 for w in rt.stats().workers),
                   "the job ended")
        still_works(rt)
        assert log.read_text() == "0\n"  # the queued items never ran
        assert rt.stats().late_results_dropped == 1  # item 0, aborted, came back late


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


# ---- late results, duplicates, terminated-job bookkeeping ----------------------


def test_duplicated_result_frame_is_dropped_and_counted() -> None:
    """A result frame that arrives twice: its outcomes are delivered once.

    The second copy answers tasks the worker no longer holds, so the driver
    drops it as a bad frame (``frames_dropped``): it cannot tell a repeated
    frame from a forged one. ``duplicates_dropped`` counts the other kind,
    below: a result of a task that was redelivered.
    """
    with phalanx.Runtime(workers=2, faults=[DuplicateMessage(kind="result", index=0)]) as rt:
        log = DeliveryLog(rt)
        assert rt.submit(inc, 1).result(timeout=T) == 2  # the first Results frame
        wait_until(lambda: rt.stats().frames_dropped == 1, "the copy dropped")
        assert [step for step, _ in rt.faults.fired] == [DuplicateMessage(kind="result", index=0)]
        still_works(rt)
        log.check()
        stats = rt.stats()
        assert (stats.frames_dropped, stats.duplicates_dropped, stats.late_results_dropped) == (1, 0, 0)


def test_result_of_a_redelivered_task_is_a_counted_duplicate() -> None:
    """The worker's result is held on the way; the worker is SIGKILLed; the task is redelivered.

    Both the held original and the redelivered task's result then reach the
    driver while the map is still open: one is delivered, the other dropped
    and counted in ``duplicates_dropped`` (whichever comes first wins).
    """
    hold = DelayMessage(kind="result", index=0, seconds=1.0)
    with phalanx.Runtime(workers=1, faults=[hold]) as rt:
        log = DeliveryLog(rt)
        it = rt.map(inc, [41], chunksize=1)
        wait_until(lambda: rt.faults.fired, "the result is held")
        victim = next(iter(rt.worker_pids()))
        rt._driver.kill_worker(victim)
        assert next(it) == 42
        # Not yet at the end: the job stays open until the held frame came back.
        wait_until(lambda: rt.stats().duplicates_dropped == 1, "the second result dropped as a duplicate")
        assert list(it) == []
        log.check()
        stats = rt.stats()
        assert (stats.redelivered, stats.worker_deaths, stats.duplicates_dropped) == (1, 1, 1)
        assert (stats.late_results_dropped, stats.frames_dropped) == (0, 0)
        still_works(rt)


def test_terminated_job_ids_are_reaped_after_the_ttl() -> None:
    """The worker forgets a terminated job ``ttl`` seconds after its Terminate (a virtual clock)."""
    now = [0.0]
    jobs = _Terminated(ttl=60.0, clock=lambda: now[0])
    assert _Terminated().ttl == 60.0  # the default: paladin keeps its map as long
    jobs.add(1)
    now[0] = 30.0
    jobs.add(2)
    now[0] = 59.9
    jobs.reap()
    assert 1 in jobs and 2 in jobs
    now[0] = 60.0
    jobs.reap()
    assert 1 not in jobs and 2 in jobs and len(jobs) == 1
    now[0] = 70.0
    jobs.add(3)
    now[0] = 80.0
    jobs.add(2)  # terminated again: remembered from now on
    now[0] = 131.0
    jobs.add(4)  # adding reaps too
    assert 3 not in jobs and 2 in jobs and 4 in jobs
    now[0] = 140.5
    jobs.reap()
    assert 2 not in jobs and 4 in jobs and len(jobs) == 1


def test_dead_worker_record_is_reaped_after_the_ttl() -> None:
    """The driver keeps a dead worker's record ``dead_worker_ttl`` seconds (60 by default), then drops it."""
    with phalanx.Runtime(workers=1) as rt:
        assert rt._driver.dead_worker_ttl == 60.0
        victim = next(iter(rt.worker_pids()))
        rt._driver.kill_worker(victim)
        wait_until(lambda: any(w.id == victim and not w.alive for w in rt.stats().workers),
                   "the death noticed, the record kept")
        # Shortened only now: a record kept 0.3 s could be gone before a late test thread looked.
        rt._driver.dead_worker_ttl = 0.3
        wait_until(lambda: all(w.id != victim for w in rt.stats().workers), "the record reaped")
        still_works(rt)
        assert [w.alive for w in rt.stats().workers] == [True]


def test_a_crash_after_an_abort_is_still_a_crash(tmp_path: Path) -> None:
    """Only a worker that ends itself for ignoring its abort flag (``ABORT_EXIT``) is a planned replacement.

    Its cooperative task aborted and answered, the worker lives on; a SIGKILL
    later is a crash like any other, and counts towards ``restart_limit``.
    """
    started, aborted = str(tmp_path / "started"), str(tmp_path / "aborted")
    with phalanx.Runtime(workers=1, abort_grace=10) as rt:
        it = rt.map(fail_or_wait, ["wait"], [started], [""], [aborted], chunksize=1)
        wait_until(lambda: os.path.exists(started), "the task runs")
        assert it.cancel() is True
        wait_until(lambda: os.path.exists(aborted), "the task saw its abort flag")
        rt._driver.kill_worker(next(iter(rt.worker_pids())))
        wait_until(lambda: rt.stats().worker_deaths == 1, "the kill counted as a crash")
        still_works(rt)
        assert rt.stats().worker_restarts == 1
