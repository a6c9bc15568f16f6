"""A caller waiting in ``Future.result()`` reads its reply from the local workers' pipes itself.

The waiting thread polls the pipes while the pump leaves them alone, so a
lone call costs one wake-up fewer (``phalanx.direct.DirectReader.wait``). What must hold
whoever reads: every outcome delivered once, frames other than outcomes
(a replacement worker's Hello, actor events) handled by the pump in order,
timeouts honoured, a crash redelivered, a shutdown waking the waiter, and a
done-callback that waits on another call not deadlocking.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import phalanx

import actor_ops
import fault_ops
import ops

pytestmark = pytest.mark.timeout(90)


def test_a_waiting_caller_reads_its_own_reply(runtime: phalanx.Runtime) -> None:
    """Outcomes of calls waited on are delivered on the waiting thread (the callback shows where)."""
    threads: list[threading.Thread] = []
    for i in range(50):
        fut = runtime.submit(ops.inc, i)
        fut.add_done_callback(lambda _: threads.append(threading.current_thread()))
        assert fut.result(timeout=30) == i + 1
    assert len(threads) == 50
    # The pump may win the first race (it still polled the pipes); after that the caller reads.
    assert threads.count(threading.main_thread()) >= 25
    assert runtime.stats().frames_dropped == 0


def test_actor_calls_and_tasks_from_many_threads_beside_a_map(runtime: phalanx.Runtime) -> None:
    """Callers reading pipes hand other jobs' outcomes to the pump: nothing lost, nothing twice."""
    counter = runtime.spawn(actor_ops.Counter)
    mapped: list[int] = []
    errors: list[BaseException] = []

    def mapper() -> None:
        try:
            mapped.extend(runtime.map(ops.inc, range(20_000), chunksize=7, timeout=60))
        except BaseException as exc:  # reported below
            errors.append(exc)

    def caller(k: int) -> None:
        try:
            for i in range(150):
                assert runtime.submit(ops.add, k, i).result(timeout=30) == k + i
                counter.incr().result(timeout=30)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=mapper)] + [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert not errors
    assert mapped == [i + 1 for i in range(20_000)]
    assert counter.get().result(timeout=30) == 4 * 150
    stats = runtime.stats()
    assert stats.frames_dropped == 0 and stats.duplicates_dropped == 0


def test_a_timeout_while_reading_pipes_leaves_the_call_running(runtime: phalanx.Runtime) -> None:
    fut = runtime.submit(ops.sleep_then, 5, 1.0)
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.05)
    assert fut.result(timeout=30) == 5


def test_a_crash_under_a_waiting_caller_is_redelivered(runtime: phalanx.Runtime, tmp_path: Path) -> None:
    """The replacement's Hello arrives while the caller reads pipes: the pump still handles it."""
    started = tmp_path / "started"
    fut = runtime.submit(fault_ops.marked_sleep, str(started), 30.0, 7)
    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(fut.result(timeout=60)))
    waiter.start()
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(int(started.read_text()), signal.SIGKILL)
    waiter.join(60)
    assert result == [7]
    # A replacement joined (its Hello and Ready went through the pump) and serves calls.
    assert [runtime.submit(ops.inc, i).result(timeout=30) for i in range(20)] == list(range(1, 21))
    assert runtime.stats().worker_deaths == 1


def test_a_done_callback_on_the_reading_thread_may_wait_on_another_call(runtime: phalanx.Runtime) -> None:
    """A callback run by the caller that read the reply may wait on a new call: no lock is held then.

    (A callback run by the pump must not block, as ever: there it only submits.)
    """
    inner: list[phalanx.Future[int] | int] = []

    def callback(f: concurrent.futures.Future[int]) -> None:
        nested = runtime.submit(ops.inc, f.result())
        on_caller = threading.current_thread() is threading.main_thread()
        inner.append(nested.result(timeout=30) if on_caller else nested)

    for i in range(20):
        fut = runtime.submit(ops.inc, i)
        fut.add_done_callback(callback)
        fut.result(timeout=30)
        deadline = time.monotonic() + 30
        while len(inner) <= i and time.monotonic() < deadline:
            time.sleep(0.001)
    assert sum(isinstance(v, int) for v in inner) >= 10  # most ran (and waited) on the caller
    assert [v if isinstance(v, int) else v.result(timeout=30) for v in inner] == [i + 2 for i in range(20)]


def test_shutdown_wakes_a_caller_reading_pipes(tmp_path: Path) -> None:
    rt = phalanx.Runtime(workers=2)
    try:
        fut = rt.submit(ops.sleep_then, 1, 30.0)
        failed: list[BaseException] = []

        def wait() -> None:
            try:
                fut.result(timeout=60)
            except BaseException as exc:
                failed.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.2)  # let it start waiting (either way the outcome is the same)
    finally:
        rt.shutdown(wait=False)
    waiter.join(30)
    assert not waiter.is_alive()
    assert len(failed) == 1 and isinstance(failed[0], phalanx.RuntimeClosedError)


def test_actor_events_follow_the_outcomes_a_caller_read(runtime: phalanx.Runtime) -> None:
    """Calls made before stop() get their results, then the actor is stopped (events in order)."""
    for _ in range(10):
        counter = runtime.spawn(actor_ops.Counter)
        futures = [counter.incr() for _ in range(20)]
        assert futures[-1].result(timeout=30) == 20
        counter.stop()
        assert [f.result(timeout=30) for f in futures] == list(range(1, 21))
        counter.join(timeout=30)
        assert counter.state == "stopped"


def test_calls_to_a_checkpointing_actor(runtime: phalanx.Runtime) -> None:
    """Each reply follows a saved state (a frame left to the pump): the caller must see the reply after it."""
    counter = runtime.spawn(actor_ops.Counter, 0, checkpoint_every=1)
    for i in range(300):
        assert counter.incr().result(timeout=30) == i + 1
    counter.stop()
    counter.join(timeout=30)


def test_a_burst_of_actor_calls_is_answered_in_order_and_before_a_stop(runtime: phalanx.Runtime) -> None:
    """Calls issued while the actor's worker is busy wait to go out together: none lost, none reordered.

    The stop is sent after them and must not overtake them.
    """
    counter = runtime.spawn(actor_ops.Counter)
    start = counter.get().result(timeout=30)
    pending = [counter.incr() for _ in range(5000)]
    counter.stop()
    assert [p.result(timeout=60) for p in pending] == list(range(start + 1, start + 5001))


def test_a_task_queued_behind_one_that_times_out_still_runs() -> None:
    """A task held for a busy worker goes out when the running one's timeout is reported instead of its outcome."""
    with phalanx.Runtime(workers=1, abort_grace=0.5) as rt:
        slow = rt.options(timeout=0.2).submit(fault_ops.sleep_then, 3.0, 1)
        time.sleep(0.05)  # the slow task is running: what follows is for a busy worker
        quick = [rt.submit(ops.inc, i) for i in range(20)]
        with pytest.raises(phalanx.TaskTimeoutError):
            slow.result(timeout=30)
        assert [q.result(timeout=30) for q in quick] == list(range(1, 21))


def test_a_replacement_is_greeted_while_the_caller_polls_a_busy_worker(tmp_path: Path) -> None:
    """The pipes change under a waiting caller: it polls the new set, not the one it started with.

    While a caller reads the pipes the pump does not, so a replacement's Hello on
    a pipe the caller had not seen stayed unread until the busy worker it polled
    answered (here 30 s; under load, a closed pipe whose number was reused made
    ``result()`` wait its whole timeout, and a crash loop never broke the runtime).
    """
    started = tmp_path / "started"
    with phalanx.Runtime(workers=2, credits=1) as rt:
        busy = rt.submit(fault_ops.marked_sleep, str(started), 30.0, 1)
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        busy_pid = int(started.read_text())
        (idle,) = [w.pid for w in rt.stats().workers if w.alive and w.pid != busy_pid]
        os.kill(idle, signal.SIGKILL)
        began = time.monotonic()
        assert rt.submit(ops.inc, 1).result(timeout=25) == 2
        assert time.monotonic() - began < 20  # the replacement served it, not the busy worker
        os.kill(busy_pid, signal.SIGKILL)  # its redelivery returns at once
        assert busy.result(timeout=30) == 1
