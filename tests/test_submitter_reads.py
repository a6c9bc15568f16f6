"""A thread submitting behind every free credit reads the local workers' outcomes itself.

While one thread submits faster than the workers run tasks, the pump would
contend with it for the interpreter on every pipe it reads and task it
writes, and the workers ran dry (``phalanx.pipes.LocalPipes.help``). The
submitting thread reads what is ready instead, as a caller waiting in
``Future.result()`` does. What must hold whoever reads: every outcome
delivered once, a worker dying mid-batch redelivered with no hang, its
replacement's Hello handled (by the pump), and a done-callback run inside
``submit`` free to submit and wait.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import signal
import threading
import time

import pytest

import phalanx

import ops

pytestmark = pytest.mark.timeout(120)


def _on_thread(threads: collections.Counter[int], done: collections.Counter[int], i: int) -> object:
    def callback(_: object) -> None:
        threads[threading.get_ident()] += 1
        done[i] += 1
    return callback


def test_a_thread_submitting_behind_every_credit_reads_outcomes() -> None:
    """Outcomes come in on the submitting thread while it submits (before any ``result()``)."""
    threads: collections.Counter[int] = collections.Counter()
    done: collections.Counter[int] = collections.Counter()
    me = threading.get_ident()
    with phalanx.Runtime(workers=2, credits=1) as rt:
        futures = []
        for i in range(50_000):
            fut = rt.submit(ops.inc, i)
            fut.add_done_callback(_on_thread(threads, done, i))
            futures.append(fut)
            if threads[me] >= 20:
                break
        assert threads[me] >= 20  # the pump delivered every one of them before
        assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(len(futures))]
        assert set(done.values()) == {1} and len(done) == len(futures)  # each exactly once
        stats = rt.stats()
        assert stats.frames_dropped == 0 and rt._driver.broken is None


def test_a_worker_killed_while_the_submitter_reads_its_pipe_is_redelivered() -> None:
    """SIGKILL a worker in the middle of a batch the submitting thread reads: each outcome once, no hang."""
    threads: collections.Counter[int] = collections.Counter()
    done: collections.Counter[int] = collections.Counter()
    with phalanx.Runtime(workers=2, credits=4) as rt:
        victim = next(iter(rt.worker_pids().values()))
        futures = []
        for i in range(6000):
            if i == 2000:
                os.kill(victim, signal.SIGKILL)
            fut = rt.submit(ops.inc, i)
            fut.add_done_callback(_on_thread(threads, done, i))
            futures.append(fut)
        assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(6000)]
        assert set(done.values()) == {1} and len(done) == 6000
        assert threads[threading.get_ident()] > 0  # the submitting thread did read outcomes
        assert rt.stats().worker_deaths == 1 and rt._driver.broken is None
        # Its replacement said Hello and Ready (whoever read them, the pump handled them) and serves.
        deadline = time.monotonic() + 30
        while len(rt.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert victim not in rt.worker_pids().values() and len(rt.worker_pids()) == 2
        assert [f.result(timeout=30) for f in [rt.submit(ops.inc, i) for i in range(200)]] == list(range(1, 201))


def test_a_done_callback_run_inside_submit_may_submit_and_wait() -> None:
    """A callback delivered by a submitting thread runs with no lock held: it may submit, and wait.

    (A callback run by the pump must not block, as ever: there it only submits.)
    """
    me = threading.get_ident()
    inner: list[phalanx.Future[int] | int] = []

    def callback(f: concurrent.futures.Future[int]) -> None:
        nested = rt.submit(ops.inc, f.result())
        inner.append(nested.result(timeout=30) if threading.get_ident() == me else nested)

    with phalanx.Runtime(workers=2, credits=1) as rt:
        futures = []
        for i in range(20_000):
            fut = rt.submit(ops.inc, i)
            fut.add_done_callback(callback)
            futures.append(fut)
            if sum(isinstance(v, int) for v in inner) >= 5:
                break
        assert sum(isinstance(v, int) for v in inner) >= 5  # ran (and waited) inside submit
        n = len(futures)
        assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(n)]
        deadline = time.monotonic() + 60
        while len(inner) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(v if isinstance(v, int) else v.result(timeout=30) for v in inner) == [i + 2 for i in range(n)]
        assert rt._driver.broken is None
