"""phalanx.Future: the standard library's Future contract, with a shared lock.

The future is built lighter than concurrent.futures.Future (no Condition of
its own), so every way a thread can wait on one is checked here: result and
exception with and without timeouts, cancel from another thread,
concurrent.futures.wait / as_completed, callbacks and asyncio; and that a
settled call's future no longer holds its job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import signal
import threading
import time

import pytest

import phalanx
from phalanx.jobs import Future

import ops

pytestmark = pytest.mark.timeout(30)


def later(delay: float, fn: object, *args: object) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), fn(*args)))  # type: ignore[operator]
    thread.start()
    return thread


def test_result_waits_for_another_thread() -> None:
    fut: Future[int] = Future()
    t = later(0.05, fut.set_result, 7)
    assert fut.result(timeout=10) == 7
    assert fut.done() and not fut.cancelled()
    t.join()


def test_exception_is_raised_and_returned() -> None:
    fut: Future[int] = Future()
    t = later(0.05, fut.set_exception, KeyError("k"))
    with pytest.raises(KeyError):
        fut.result(timeout=10)
    assert isinstance(fut.exception(timeout=0), KeyError)
    t.join()


def test_timeouts_raise_timeout_error() -> None:
    fut: Future[int] = Future()
    with pytest.raises(concurrent.futures.TimeoutError):
        fut.result(timeout=0.01)
    with pytest.raises(concurrent.futures.TimeoutError):
        fut.exception(timeout=0)
    assert not fut._waiters, "a timed-out waiter must be removed"
    fut.set_result(1)
    assert fut.result(timeout=0) == 1


def test_cancel_wakes_a_waiting_thread() -> None:
    fut: Future[int] = Future()
    t = later(0.05, fut.cancel)
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result(timeout=10)
    t.join()


@pytest.mark.parametrize("cls", [Future, concurrent.futures.Future], ids=["phalanx", "stdlib"])
def test_set_running_or_notify_cancel_keeps_the_standard_contract(cls: type) -> None:
    """phalanx.Future's own set_running_or_notify_cancel (the driver's per-dispatch call)
    does what the standard library's does in every state."""
    fut = cls()
    assert fut.set_running_or_notify_cancel() is True and fut.running()
    assert not fut.cancel(), "a running future cannot be cancelled"
    # cancelled before it ran: False, and a thread in concurrent.futures.wait wakes
    fut = cls()
    fut.cancel()
    waited: list[set[object]] = []
    waiter = threading.Thread(target=lambda: waited.append(concurrent.futures.wait([fut], timeout=10)[0]))
    waiter.start()
    time.sleep(0.05)
    assert fut.set_running_or_notify_cancel() is False
    waiter.join(10)
    assert waited == [{fut}] and fut.cancelled()
    # settled or already running: the standard library's RuntimeError
    for settle in (lambda f: f.set_result(1), lambda f: f.set_running_or_notify_cancel()):
        fut = cls()
        settle(fut)
        with pytest.raises(RuntimeError):
            fut.set_running_or_notify_cancel()


def test_many_waiters_on_one_future_and_one_waiter_each_on_many() -> None:
    futs: list[Future[int]] = [Future() for _ in range(50)]
    got: list[int] = []
    lock = threading.Lock()

    def wait_all(f: Future[int]) -> None:
        value = f.result(timeout=10)
        with lock:
            got.append(value)

    threads = [threading.Thread(target=wait_all, args=(f,)) for f in futs for _ in range(2)]
    for t in threads:
        t.start()
    for i, f in enumerate(futs):
        f.set_result(i)
    for t in threads:
        t.join(10)
    assert sorted(got) == sorted(list(range(50)) * 2)


def test_wait_and_as_completed_from_the_standard_library() -> None:
    futs: list[Future[int]] = [Future() for _ in range(5)]
    threads = [later(0.01 * (5 - i), f.set_result, i) for i, f in enumerate(futs)]
    done, not_done = concurrent.futures.wait(futs, timeout=10, return_when=concurrent.futures.FIRST_COMPLETED)
    assert done and len(done) + len(not_done) == 5
    assert sorted(f.result() for f in concurrent.futures.as_completed(futs, timeout=10)) == list(range(5))
    for t in threads:
        t.join()


def test_callbacks_run_once_even_when_added_late() -> None:
    fut: Future[int] = Future()
    seen: list[int] = []
    fut.add_done_callback(lambda f: seen.append(f.result()))
    fut.set_result(3)
    fut.add_done_callback(lambda f: seen.append(f.result() * 10))
    assert seen == [3, 30]


def test_await_in_asyncio() -> None:
    fut: Future[str] = Future()

    async def main() -> str:
        later(0.02, fut.set_result, "ok")
        return await fut

    assert asyncio.run(main()) == "ok"


def test_a_future_costs_few_tracked_objects() -> None:
    """The point of the lighter future: tens of thousands held stay cheap for the GC."""
    gc.collect()
    before = len(gc.get_objects())
    held = [Future() for _ in range(1000)]
    per_future = (len(gc.get_objects()) - before) / len(held)
    assert per_future <= 4, per_future


def test_a_settled_call_keeps_nothing_else_alive(runtime: phalanx.Runtime) -> None:
    """Finished futures a caller holds cost the GC as little as bare ones (no job, no sink)."""
    futures = [runtime.submit(ops.inc, i) for i in range(2000)]
    assert [f.result(timeout=30) for f in futures] == list(range(1, 2001))
    gc.collect()
    before = len(gc.get_objects())
    del futures
    gc.collect()
    per_future = (before - len(gc.get_objects())) / 2000
    # The future and its two lists (its attributes are slots: no dict); 12 when the
    # future still held its sink, whose job held the sink.
    assert per_future < 4, per_future


def test_a_call_in_flight_costs_the_collector_few_objects(runtime: phalanx.Runtime) -> None:
    """Each call waiting for its worker adds few objects the GC tracks (its full passes walk them all)."""
    assert runtime.submit(ops.inc, 0).result(timeout=30) == 1
    pids = list(runtime.worker_pids().values())
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # nothing comes back: every call stays in flight
    try:
        gc.collect()
        before = len(gc.get_objects())
        futures = [runtime.submit(ops.inc, i) for i in range(2000)]
        gc.collect()
        per_call = (len(gc.get_objects()) - before) / 2000
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert [f.result(timeout=30) for f in futures] == list(range(1, 2001))
    # The future and its two lists, and the submit's job (its task and the
    # job's dict of tasks are untracked); 12 when a sink and four bound methods
    # stood between them.
    assert per_call < 5, per_call
