"""``rt.map`` and ``rt.fold`` stream: the input is read lazily, at most a window of work is in flight.

Runs in the test (driver) process against one ``Runtime(workers=2)`` per
module (``module_runtime``); the operations live in ``tests/ops.py``.
Invariant 7 (bounded memory) is checked by counting, never by measuring
memory or time: items pulled from the input, tasks submitted, tasks a job
still waits for, and chunks received but not yet consumed. The window is
``4 * workers + 2`` chunks (``phalanx.jobs``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ops
import phalanx
from phalanx.core.window import MAX_MAP_CHUNK

#: generous bound on any single wait; tests finish far sooner
T = 30.0
#: the largest chunk an input of unknown length ramps up to (``phalanx.core.window.ChunkSizer``)
RAMP_MAX = 4096


class Source:
    """An endless (or ``n``-item) input that counts what was pulled and calls ``on_pull`` first."""

    def __init__(self, n: int | None = None, on_pull: Callable[[], None] | None = None) -> None:
        self.n = n
        self.on_pull = on_pull
        self.pulled = 0

    def __iter__(self) -> Iterator[int]:
        while self.n is None or self.pulled < self.n:
            if self.on_pull is not None:
                self.on_pull()
            self.pulled += 1
            yield self.pulled - 1


def wait_until(predicate: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + T
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.005)


def open_jobs(rt: phalanx.Runtime) -> list[Any]:
    with rt._driver._lock:
        return list(rt._driver._jobs.values())


def outstanding_sampler(rt: phalanx.Runtime, seen: list[int]) -> Callable[[], None]:
    """A callback appending to ``seen`` the most tasks any open job has in flight now."""

    def sample() -> None:
        seen.append(max((len(j.outstanding) for j in open_jobs(rt)), default=0))

    return sample


@pytest.mark.parametrize(
    ("chunksize", "ordered"), [(1, True), (1, False), (7, True), (None, True)], ids=str
)
def test_map_reads_an_endless_input_lazily(
    module_runtime: phalanx.Runtime, chunksize: int | None, ordered: bool
) -> None:
    rt = module_runtime
    source = Source()
    it = rt.map(ops.square, source, chunksize=chunksize, ordered=ordered, timeout=T)
    window = it._w.window
    assert window == 4 * 2 + 2
    k = 100
    got = [next(it) for _ in range(k)]
    if ordered:
        assert got == [i * i for i in range(k)]
    else:
        assert len(set(got)) == k and set(got) <= {i * i for i in range(source.pulled)}
    # What was pulled is what the map read: k results plus at most a window of chunks
    # (and the rest of the chunk the k-th result came in).
    assert source.pulled == it.items_read
    biggest = chunksize or RAMP_MAX
    assert k <= source.pulled <= k + (window + 1) * biggest

    # The consumer pauses: once what is in flight came back, nothing more is read or sent.
    (job,) = open_jobs(rt)
    submitted, pulled = rt.stats().tasks_submitted, source.pulled
    assert len(job.outstanding) <= window
    wait_until(lambda: not job.outstanding, "the chunks in flight came back")
    assert rt.stats().tasks_submitted == submitted
    assert source.pulled == pulled
    # Received but not consumed: at most a window of chunks, not all results.
    assert it._lease.queue.qsize() + len(it._w.buffer) <= window

    assert it.cancel() is True
    assert source.pulled == pulled  # ending the map reads no more input
    assert rt.stats().jobs_open == 0


def test_ordered_map_waiting_on_a_straggler_reads_no_further(
    module_runtime: phalanx.Runtime, tmp_path: Path
) -> None:
    """Item 0 is slow, the rest quick: results after it are held, and they count against the window."""
    rt = module_runtime
    release = tmp_path / "release"
    source = Source()
    it = rt.map(ops.square_after, source, itertools.repeat(str(release)), chunksize=1, timeout=T)
    got: list[int] = []
    consumer = threading.Thread(target=lambda: got.append(next(it)))
    consumer.start()
    try:
        (job,) = open_jobs(rt)
        driver = rt._driver

        def only_the_stragglers_worker_busy() -> bool:
            # The straggler's worker runs the tasks queued behind it in order: all that
            # is still out is there, and every result the other worker sent was read.
            with driver._lock:
                holders = [w for w in driver._workers.values() if (job.id, 0) in w.inflight]
                behind = all(any((job.id, seq) in w.inflight for w in holders) for seq in job.outstanding)
            return bool(holders) and behind and it._lease.queue.qsize() == 0

        wait_until(only_the_stragglers_worker_busy, "every task not behind the straggler came back")
        assert source.pulled <= it._w.window  # not one item more while it waits
    finally:
        release.touch()
        consumer.join(T)
    assert got == [0]
    assert [next(it) for _ in range(50)] == [i * i for i in range(1, 51)]  # and it streams on
    assert it.cancel() is True
    assert rt.stats().jobs_open == 0


def test_map_window_never_exceeded_while_streaming(module_runtime: phalanx.Runtime) -> None:
    """Sampled at every item pulled: the job never waits for more than a window of chunks."""
    rt = module_runtime
    seen: list[int] = []
    sample = outstanding_sampler(rt, seen)

    n = 3000
    source = Source(n, sample)
    it = rt.map(ops.square, source, chunksize=5, timeout=T)
    assert list(it) == [i * i for i in range(n)]
    assert source.pulled == n == len(seen)
    assert max(seen) <= it._w.window
    assert max(seen) > 1  # it did pipeline


def test_fold_reads_lazily_with_a_bounded_window(module_runtime: phalanx.Runtime) -> None:
    """A fold pulls its input as partial results come back: never more than a window of tasks in flight."""
    rt = module_runtime
    seen: list[int] = []
    sample = outstanding_sampler(rt, seen)

    n = 20_000
    source = Source(n, sample)
    assert rt.fold(ops.add, source, chunksize=50, timeout=T) == sum(range(n))
    assert source.pulled == n
    window = 4 * 2 + 2
    assert 1 < max(seen) <= window
    assert rt.stats().jobs_open == 0


# ---- handing out results a chunk at a time: ``for`` runs over each chunk in C ----------------------


def test_next_inside_a_for_loop_over_the_same_map(module_runtime: phalanx.Runtime) -> None:
    """``for x in it: y = next(it)`` takes results pairwise, none lost or repeated, across chunks."""
    n = 1000
    it = module_runtime.map(ops.square, range(n), chunksize=7, timeout=T)
    pairs = [(x, next(it)) for x in it]
    assert pairs == [((2 * i) ** 2, (2 * i + 1) ** 2) for i in range(n // 2)]
    assert module_runtime.stats().jobs_open == 0


def test_break_then_next_then_for_again_continues_where_it_stopped(module_runtime: phalanx.Runtime) -> None:
    """Leaving a ``for`` in the middle of a chunk keeps the rest of it for ``next()`` and the next loop."""
    n = 500
    it = module_runtime.map(ops.square, range(n), chunksize=50, timeout=T)
    got: list[int] = []
    for x in it:
        got.append(x)
        if len(got) == 13:
            break
    got.append(next(it))
    got.extend(it.take_ready())
    got.extend(it)
    assert got == [i * i for i in range(n)]
    assert list(it) == [] and next(it, None) is None
    assert module_runtime.stats().jobs_open == 0


def test_close_inside_a_for_loop_stops_it_in_the_middle_of_a_chunk(module_runtime: phalanx.Runtime) -> None:
    """``close()`` from the loop body: the loop yields nothing more, not even the rest of the chunk."""
    it = module_runtime.map(ops.square, range(10_000), chunksize=100, timeout=T)
    got = []
    for x in it:
        got.append(x)
        if len(got) == 3:
            it.close()
    assert got == [0, 1, 4]
    assert module_runtime.stats().jobs_open == 0


def test_failure_raised_by_for_after_every_value_before_it(module_runtime: phalanx.Runtime) -> None:
    """The failed item's error reaches a ``for`` loop after the values before it, chunk boundaries aside."""
    got: list[int] = []
    with pytest.raises(ValueError):
        for x in module_runtime.map(ops.fail_at, range(1000), itertools.repeat(537), chunksize=10, timeout=T):
            got.append(x)
    assert got == [i * 10 for i in range(537)]
    wait_until(lambda: module_runtime.stats().jobs_open == 0, "the failed map's job closed")


def test_dropping_a_for_loop_over_a_map_ends_its_job(module_runtime: phalanx.Runtime) -> None:
    """``for x in rt.map(...): break`` leaves no job open: dropping the loop drops the map."""
    for _ in module_runtime.map(ops.square, Source(), chunksize=3, timeout=T):
        break
    wait_until(lambda: module_runtime.stats().jobs_open == 0, "the dropped map's job closed")


def test_a_long_list_is_mapped_in_chunks_no_larger_than_the_map_cap(module_runtime: phalanx.Runtime) -> None:
    """``chunksize=None`` over a list of a million: a quarter of each worker's share would be
    125,000 items a chunk; every chunk in flight holds at most ``MAX_MAP_CHUNK`` items, and
    the results are all there, in order."""
    n = 1_000_000
    it = module_runtime.map(ops.square, list(range(n)), timeout=T)
    assert it._w.sizer.size == MAX_MAP_CHUNK  # every chunk is cut to this (the last one shorter)
    (job,) = open_jobs(module_runtime)
    assert all(task.items <= MAX_MAP_CHUNK for task in list(job.outstanding.values()))
    assert sum(1 for i, y in enumerate(it) if y == i * i) == n


@pytest.mark.parametrize("ordered", [True, False])
def test_the_window_keeps_no_record_per_chunk_once_the_chunk_is_handed_out(
    module_runtime: phalanx.Runtime, ordered: bool
) -> None:
    """An endless input in chunks of one: what the window remembers stays within a window of
    chunks, however many chunks went through (bounded memory, invariant 7)."""
    it = module_runtime.map(ops.square, Source(), chunksize=1, ordered=ordered, timeout=T)
    window = it._w.window
    for _ in range(3000):
        next(it)
    w = it._w
    assert len(w.starts) <= 2 * window + 1
    assert len(w.sent_at) + len(w.buffer) <= window
    it.close()
