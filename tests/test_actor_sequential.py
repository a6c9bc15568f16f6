"""Sequential actor calls: each result awaited before the next call is made.

The caller blocked in ``result()`` reads its reply from the worker's pipe
itself (``phalanx.direct``). What must hold on that path, whatever happens
around it: no call lost, none answered twice, none out of order, and no
caller left waiting when the actor's process dies or its wait times out.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

import phalanx

from actor_ops import Counter

pytestmark = pytest.mark.timeout(120)

T = 30.0  # seconds: a generous bound on any single wait


def test_caller_timeouts_between_sequential_calls_lose_and_repeat_nothing(runtime: phalanx.Runtime) -> None:
    """A wait that times out leaves its call running; the calls after it keep their order and count."""
    ref = runtime.spawn(Counter, 0)
    seen: list[int] = []
    slow: list[phalanx.Future[int]] = []
    for i in range(1, 401):
        if i % 50 == 0:
            fut = ref.sleep(0.05)
            with pytest.raises(TimeoutError):
                fut.result(timeout=0.001)
            slow.append(fut)
        seen.append(ref.incr().result(timeout=T))
    assert seen == list(range(1, 401))
    # The slow calls ran in their place: each saw the count of the calls made before it.
    assert [f.result(timeout=T) for f in slow] == [50 * k - 1 for k in range(1, 9)]
    stats = runtime.stats()
    assert stats.duplicates_dropped == 0 and stats.frames_dropped == 0


def test_sequential_callers_beside_a_pipelined_burst_on_one_actor(runtime: phalanx.Runtime) -> None:
    """Three threads call one at a time while a fourth pipelines: every count once, each thread's in order."""
    ref = runtime.spawn(Counter, 0)
    per_thread, burst = 500, 3_000
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def sequential(name: str) -> None:
        try:
            barrier.wait()
            results[name] = [ref.incr().result(timeout=T) for _ in range(per_thread)]
        except BaseException as exc:  # reported below
            errors.append(exc)

    def pipelined() -> None:
        try:
            barrier.wait()
            futures = [ref.incr() for _ in range(burst)]
            results["burst"] = [f.result(timeout=T) for f in futures]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sequential, args=(f"seq{k}",)) for k in range(3)]
    threads.append(threading.Thread(target=pipelined))
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    for name, values in results.items():
        assert values == sorted(values), f"{name}: answered out of order"
    every = sorted(v for values in results.values() for v in values)
    assert every == list(range(1, 3 * per_thread + burst + 1))
    stats = runtime.stats()
    assert stats.duplicates_dropped == 0 and stats.frames_dropped == 0


def test_actor_killed_under_a_caller_blocked_in_result(runtime: phalanx.Runtime, tmp_path: Path) -> None:
    """The caller reading the pipe when the actor's process dies gets ActorDiedError, not a hang.

    The supervised restart resumes from the checkpoint taken before each reply,
    so the sequence the caller saw goes on where it stopped.
    """
    ref = runtime.spawn(Counter, 0, restart_policy="on-failure", checkpoint_every=1)
    seen = [ref.incr().result(timeout=T) for _ in range(200)]
    assert seen == list(range(1, 201))
    pid = ref.pid().result(timeout=T)
    outcome: list[BaseException | int] = []

    def blocked() -> None:
        try:
            outcome.append(ref.hold(str(tmp_path / "never")).result(timeout=T))
        except BaseException as exc:  # the point of the test
            outcome.append(exc)

    caller = threading.Thread(target=blocked)
    caller.start()
    time.sleep(0.3)  # the call runs and its caller waits in result()
    os.kill(pid, signal.SIGKILL)
    caller.join(T)
    assert not caller.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], phalanx.ActorDiedError), outcome
    after = [ref.incr().result(timeout=T) for _ in range(200)]
    assert after == list(range(201, 401))
    assert ref.pid().result(timeout=T) != pid
    stats = runtime.stats()
    assert stats.duplicates_dropped == 0 and stats.frames_dropped == 0


def test_replies_batched_before_a_long_call_do_not_wait_for_it(runtime: phalanx.Runtime, tmp_path: Path) -> None:
    """Pipelined quick calls, then one that blocks: the quick replies batched before it go out while it runs.

    Round after round, so the worker's flush thread is found both asleep and
    looking for work (it keeps looking for a while after the last batch).
    """
    ref = runtime.spawn(Counter, 0)
    for r in range(4):
        gate = tmp_path / f"gate{r}"
        quick = [ref.incr() for _ in range(300)]
        slow = ref.hold(str(gate))
        assert [f.result(timeout=T) for f in quick] == list(range(300 * r + 1, 300 * (r + 1) + 1))
        assert not slow.done()
        gate.touch()
        assert slow.result(timeout=T) == 300 * (r + 1)
        if r == 1:
            time.sleep(0.3)  # longer than the flush thread looks for work after the last batch
    stats = runtime.stats()
    assert stats.duplicates_dropped == 0 and stats.frames_dropped == 0
