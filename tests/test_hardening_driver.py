"""What a careless task does to the driver: oversized or unencodable results, frozen or
GIL-holding workers, a crash on one item of a chunk, an exception on the pump thread.

Runs real worker processes. Each test bounds every wait, checks no process leaked
(the autouse fixture) and, where the runtime is meant to survive, ends by running
ordinary work on it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import phalanx
from hardening_ops import (
    Hoard,
    blob,
    blob_at,
    catastrophic,
    deep,
    exit_on,
    getpid,
    nap,
    rogue,
    self_ref,
    short,
    size_of,
    terminate_a_forked_child,
)

#: generous bound on any single wait; tests finish far sooner
T = 30.0
MiB = 1 << 20


def still_works(rt: phalanx.Runtime) -> None:
    assert rt.submit(getpid).result(timeout=T) in rt.worker_pids().values()
    assert list(rt.map(short, range(20))) == list(range(20))


def wait_until(predicate: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + T
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


# ---- item 1: results over max_frame ---------------------------------------------


@pytest.mark.timeout(60)
def test_result_over_max_frame_is_an_error_not_a_hang() -> None:
    with phalanx.Runtime(workers=1, max_frame=MiB) as rt:
        exc = rt.submit(blob, 2 * MiB).exception(timeout=T)
        assert isinstance(exc, phalanx.FrameTooLargeError) and isinstance(exc, ValueError)
        assert exc.limit == MiB and exc.size > 2 * MiB
        assert str(MiB) in str(exc) and str(exc.size) in str(exc)
        assert rt.stats().worker_deaths == 0
        still_works(rt)


@pytest.mark.timeout(60)
def test_map_item_over_max_frame_fails_at_its_index() -> None:
    with phalanx.Runtime(workers=1, max_frame=MiB) as rt:
        it = rt.map(blob_at, range(40), [17] * 40, [2 * MiB] * 40, chunksize=8)
        got: list[bytes] = []
        with pytest.raises(phalanx.FrameTooLargeError):
            for value in it:
                got.append(value)
        assert got == [b"x" * 8] * 17
        skip = rt.options(on_fatal=phalanx.Ignore).map(blob_at, range(40), [17] * 40, [2 * MiB] * 40, chunksize=8)
        assert len(list(skip)) == 39
        assert [i for i, _ in skip.skipped] == [17]
        still_works(rt)


@pytest.mark.timeout(60)
def test_chunk_whose_items_together_pass_max_frame_still_completes() -> None:
    # Each item fits; together the chunk's values do not: the chunk is split, not failed.
    with phalanx.Runtime(workers=1, max_frame=MiB) as rt:
        got = list(rt.map(blob, [300 * 1024] * 12, chunksize=12))
        assert got == [b"x" * (300 * 1024)] * 12
        assert rt.stats().worker_deaths == 0
        still_works(rt)


@pytest.mark.timeout(60)
def test_arguments_over_max_frame_are_refused_at_the_call_not_by_killing_workers() -> None:
    # A worker refuses a frame above max_frame: sent anyway, it cost three worker deaths
    # and a WorkerCrashedError naming no size.
    with phalanx.Runtime(workers=1, max_frame=MiB) as rt:
        with pytest.raises(phalanx.FrameTooLargeError) as raised:
            rt.submit(size_of, b"x" * (2 * MiB))
        assert raised.value.limit == MiB and raised.value.size > 2 * MiB
        assert "size_of" in str(raised.value) and str(MiB) in str(raised.value)
        with pytest.raises(phalanx.FrameTooLargeError, match="chunksize"):
            list(rt.map(size_of, [b"x" * (300 * 1024)] * 8, chunksize=8))
        ref = rt.spawn(Hoard)
        with pytest.raises(phalanx.FrameTooLargeError, match="Hoard.take"):
            ref.take(b"x" * (2 * MiB))
        assert ref.take(b"x" * 10).result(timeout=T) == 10
        assert rt.stats().worker_deaths == 0
        still_works(rt)


@pytest.mark.timeout(60)
def test_actor_reply_over_max_frame_is_an_error() -> None:
    with phalanx.Runtime(workers=1, max_frame=MiB) as rt:
        ref = rt.spawn(Hoard)
        exc = ref.give(2 * MiB).exception(timeout=T)
        assert isinstance(exc, phalanx.FrameTooLargeError), exc
        assert ref.give(10).result(timeout=T) == b"y" * 10
        still_works(rt)


@pytest.mark.timeout(60)
def test_oversized_frame_that_arrives_kills_and_replaces_the_worker() -> None:
    # A worker that sends a frame above max_frame anyway (buggy or hostile): the driver
    # kills it, settles what it held by the crash rules, and a replacement serves on.
    with phalanx.Runtime(workers=1, max_frame=MiB, max_attempts=2, credits=4) as rt:
        first = dict(rt.worker_pids())
        fut = rt.submit(rogue, 2 * MiB)
        behind = rt.submit(nap, 0, 7)  # held by the same worker: redelivered, not charged
        exc = fut.exception(timeout=T)
        assert isinstance(exc, phalanx.WorkerCrashedError), exc
        assert behind.result(timeout=T) == 7
        stats = rt.stats()
        assert stats.worker_deaths == 2 and stats.frames_dropped >= 2
        assert rt.worker_pids() and not set(rt.worker_pids().values()) & set(first.values())
        still_works(rt)


@pytest.mark.timeout(120)
def test_remote_worker_with_a_larger_max_frame_keeps_to_the_drivers(tmp_path: Path) -> None:
    # A host started with the default max_frame (256 MiB) joins a driver that accepts 1 MiB:
    # it learns the driver's limit (Welcome) and sends an error, not a frame ZeroMQ would drop.
    from remote_host import Keys, RemoteHost

    keys = Keys(tmp_path / "keys")
    with phalanx.Runtime(workers=0, listen="tcp://127.0.0.1:0", max_frame=MiB, **keys.runtime_kwargs()) as rt:
        assert rt.address is not None
        with RemoteHost(rt.address, "host1", keys.worker_args(), workers=1) as host:
            assert rt.wait_for_workers(1, timeout=T) == 1, host.err
            exc = rt.submit(blob, 2 * MiB).exception(timeout=T)
            assert isinstance(exc, phalanx.FrameTooLargeError), exc
            assert rt.submit(blob, 10).result(timeout=T) == b"x" * 10


# ---- item 2: results that cannot be encoded ----------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make", [lambda rt: rt.submit(self_ref), lambda rt: rt.submit(deep, 100_000)],
                         ids=["self-referencing", "100000-deep"])
def test_unencodable_result_is_an_encode_error_without_a_death(make: Callable[[phalanx.Runtime], phalanx.Future[object]]) -> None:
    with phalanx.Runtime(workers=1) as rt:
        exc = make(rt).exception(timeout=T)
        assert isinstance(exc, phalanx.EncodeError) and isinstance(exc, TypeError), exc
        stats = rt.stats()
        assert stats.worker_deaths == 0 and stats.redelivered == 0
        still_works(rt)


# ---- item 3: timeouts enforced by the driver ----------------------------------------


@pytest.mark.timeout(60)
def test_timeout_settles_a_call_on_a_frozen_worker() -> None:
    with phalanx.Runtime(workers=1, abort_grace=1.0) as rt:
        pid = next(iter(rt.worker_pids().values()))
        fut = rt.options(timeout=1.0).submit(nap, 30)
        time.sleep(0.2)
        os.kill(pid, signal.SIGSTOP)
        exc = fut.exception(timeout=T)
        assert isinstance(exc, phalanx.TaskTimeoutError), exc
        assert "timeout" in str(exc)
        wait_until(lambda: pid not in rt.worker_pids().values() and rt.worker_pids(), "a replacement")
        assert rt.stats().worker_deaths == 0  # a planned kill, not a crash
        still_works(rt)


@pytest.mark.timeout(90)
def test_timeout_settles_a_call_holding_the_gil() -> None:
    with phalanx.Runtime(workers=1, abort_grace=1.0, credits=4) as rt:
        fut = rt.options(timeout=1.0).submit(catastrophic)
        behind = [rt.submit(nap, 0, i) for i in range(3)]  # held by the same worker, not charged
        exc = fut.exception(timeout=T)
        assert isinstance(exc, phalanx.TaskTimeoutError), exc
        assert [f.result(timeout=T) for f in behind] == [0, 1, 2]
        assert rt.stats().worker_deaths == 0
        still_works(rt)


# ---- item 4: shutdown with a frozen worker -------------------------------------------


@pytest.mark.timeout(40)
def test_shutdown_with_a_frozen_worker_is_bounded() -> None:
    rt = phalanx.Runtime(workers=2, shutdown_timeout=1.0)
    try:
        pids = list(rt.worker_pids().values())
        futs = [rt.submit(nap, 60) for _ in range(2)]
        time.sleep(0.3)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
    finally:
        rt.shutdown()
    for fut in futs:
        assert isinstance(fut.exception(timeout=1), phalanx.RuntimeClosedError)
    for pid in pids:
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- item 5: a crash charged to one item ------------------------------------------------


@pytest.mark.timeout(120)
def test_ignore_skips_exactly_the_crashing_item() -> None:
    with phalanx.Runtime(workers=2) as rt:
        it = rt.options(on_fatal=phalanx.Ignore).map(exit_on, range(1000), [500] * 1000)
        got = list(it)
        assert got == [i for i in range(1000) if i != 500]
        assert [(i, type(e)) for i, e in it.skipped] == [(500, phalanx.WorkerCrashedError)]
        # One death per halving of its chunk (at most log2(1000) + 1), then max_attempts runs of item 500.
        assert 3 <= rt.stats().worker_deaths <= 3 + 11
        still_works(rt)


@pytest.mark.timeout(120)
def test_terminate_names_the_crashing_item_after_the_results_before_it() -> None:
    with phalanx.Runtime(workers=2) as rt:
        got: list[int] = []
        with pytest.raises(phalanx.WorkerCrashedError) as info:
            for value in rt.map(exit_on, range(1000), [500] * 1000):
                got.append(value)
        assert info.value.index == 500
        assert got == list(range(500))
        assert "item 500" in str(info.value)
        still_works(rt)


@pytest.mark.timeout(120)
@pytest.mark.chaos
def test_random_kills_during_a_map_lose_nothing() -> None:
    import random
    import threading

    rng = random.Random(18)
    kills = 8  # far below restart_limit, however slow the machine
    with phalanx.Runtime(workers=2) as rt:
        done = threading.Event()

        def killer() -> None:
            for _ in range(kills):
                if done.wait(rng.uniform(0.15, 0.3)):
                    return
                pids = list(rt.worker_pids())
                if pids:
                    rt._driver.kill_worker(rng.choice(pids))

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            got = list(rt.map(short, range(3000)))
        finally:
            done.set()
            thread.join()
        assert got == list(range(3000))
        assert 1 <= rt.stats().worker_deaths <= kills
        still_works(rt)


# ---- item 9: the pump never dies silently ---------------------------------------------------


@pytest.mark.timeout(60)
def test_pump_death_breaks_the_runtime_for_every_caller() -> None:
    rt = phalanx.Runtime(workers=1, credits=4)
    try:
        doomed = rt.submit(nap, 0.3, 1)

        def explode(_: object) -> None:
            raise SystemExit("a callback ended the pump")

        doomed.add_done_callback(explode)
        waiting = rt.submit(nap, 60)
        # Not waiting in result(): the pump, not this thread, delivers doomed's outcome.
        wait_until(doomed.done, "the doomed call")
        exc = waiting.exception(timeout=T)
        assert isinstance(exc, phalanx.RuntimeBrokenError), exc
        assert isinstance(exc.__cause__, SystemExit)
        with pytest.raises(phalanx.RuntimeBrokenError):
            rt.submit(nap, 0)
    finally:
        rt.shutdown()


# ---- a process a task forks ---------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["phalanx", "spawn"])
def test_a_sigterm_to_a_process_a_task_forked_ends_that_process_only(start_method: str) -> None:
    """A child forked by a task inherits the worker's Python signal handlers; a SIGTERM
    to it (multiprocessing.Pool.terminate, joblib's nested backends) must not run the
    worker's, which kills the worker's whole process group, the worker included."""
    with phalanx.Runtime(workers=1, start_method=start_method) as rt:
        pid = rt.submit(getpid).result(timeout=T)
        for _ in range(3):
            assert rt.submit(terminate_a_forked_child).result(timeout=T) == [-signal.SIGTERM, pid]
        assert rt.stats().worker_deaths == 0
        still_works(rt)
