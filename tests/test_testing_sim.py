"""SimRuntime: the Runtime API in one process, deterministic, on a virtual clock.

Runs in the test process only: no worker process is started here. Checks
that SimRuntime answers like a real runtime (results, conversions, exception
types, retries, fatal strategies, timeouts, directive chains, actors and
their events), that what it does not model says so, that heartbeats on the
virtual clock declare a partitioned worker lost, that nothing really sleeps,
that the same seed gives the same trace (100 seeds, each run twice), and
measures how many schedules per second it explores (printed; never
asserted).
"""

from __future__ import annotations

import time

import pytest

import phalanx
from phalanx import IndexedStream, Literal
from phalanx.testing import (
    DeliveryLog,
    DropMessage,
    FailRestart,
    HangError,
    KillWorker,
    PartitionHost,
    ReorderMessages,
    SimRuntime,
    kill_worker,
)

import harness_ops as ops

pytestmark = pytest.mark.timeout(60)


def test_tasks_map_fold_like_a_runtime() -> None:
    with SimRuntime(workers=3, seed=4) as rt:
        assert rt.submit(ops.square, 7).result() == 49
        assert list(rt.map(ops.square, range(50))) == [x * x for x in range(50)]
        assert sorted(rt.map(ops.square, range(20), chunksize=3, ordered=False)) == [x * x for x in range(20)]
        assert list(rt.map(ops.add, range(5), range(5))) == [2 * x for x in range(5)]
        assert rt.fold(ops.add, range(1, 101)) == 5050
        letters = [chr(ord("a") + i % 26) for i in range(60)]
        assert rt.fold(ops.concat, letters, chunksize=4) == "".join(letters)
        assert rt.fold(ops.add, [], initial=3) == 3
        assert rt.submit(ops.flip, ops.Point(1, 2)).result() == ops.Point(2, 1)
        assert isinstance(rt.submit(ops.square, 2), phalanx.Future)


def test_errors_are_rebuilt_like_a_runtime() -> None:
    with SimRuntime(seed=1) as rt:
        with pytest.raises(ops.HarnessError, match="bad item 3") as info:
            rt.submit(ops.fail_on, 3, 3).result()
        assert isinstance(info.value.__cause__, phalanx.RemoteTraceback)
        with pytest.raises(phalanx.ValidationError):
            rt.submit(ops.square, "x").result()
        with pytest.raises(phalanx.EncodeError):
            rt.submit(ops.square, object())
        with pytest.raises(ops.HarnessError):
            list(rt.map(ops.fail_on, range(10), [4] * 10))
        it = rt.options(on_fatal=phalanx.Ignore).map(ops.fail_on, range(10), [4] * 10, chunksize=3)
        assert list(it) == [x for x in range(10) if x != 4]
        assert [i for i, _ in it.skipped] == [4]
        with pytest.raises(phalanx.UnknownOperationError):
            rt.submit("harness_ops:nothing_here").result()


def test_retries_and_timeouts_run_on_the_virtual_clock() -> None:
    wall = time.monotonic()
    with SimRuntime(seed=2) as rt:
        assert rt.submit(ops.flaky, "sim-a", 3).result() == 3
        assert rt.now >= 0.5 + 1.0 + 2.0  # Exponential(0.5, 2.0): three waits
        assert rt.stats().retried == 3
        with pytest.raises(ops.HarnessError):
            rt.options(retry=phalanx.Immediate(2)).submit(ops.fail_on, 1, 1).result()
        assert rt.options(timeout=10).submit(ops.nap, 5.0).result() == 5.0
        with pytest.raises(phalanx.TaskTimeoutError):
            rt.options(timeout=1.0).submit(ops.nap, 100.0).result()
        rt.settle()
        assert rt.stats().worker_deaths == 0  # killed for ignoring its timeout: planned
        assert rt.stats().worker_restarts == 1
        with pytest.raises(TimeoutError):
            rt.submit(ops.nap, 50.0).result(timeout=1.0)
    assert time.monotonic() - wall < 30  # virtual seconds: 100 + 50 + retries, none slept


def test_kills_redeliver_exactly_once() -> None:
    with SimRuntime(workers=2, seed=3, faults=[KillWorker(task=1), KillWorker(task=4, when="before")]) as rt:
        assert list(rt.map(ops.square, range(40), chunksize=2)) == [x * x for x in range(40)]
        assert len(rt.fired) == 2
        stats = rt.stats()
        assert stats.worker_deaths == 2 and stats.redelivered >= 2
        assert max(rt.deliveries.values()) == 1


def test_directive_chains_run_as_on_a_runtime() -> None:
    chain = Literal(range(30)).map(ops.square).map(ops.square)
    fold = Literal(range(1, 21)).map(ops.square).fold(ops.add)
    indexed = IndexedStream(range(12)).map(ops.square)
    with SimRuntime(workers=2, seed=8, faults=[KillWorker(task=1), KillWorker(task=6)]) as rt:
        log = DeliveryLog(rt)
        assert rt.run(chain, chunksize=4).result() == chain.evaluate()
        assert rt.run(fold, chunksize=3).result() == fold.evaluate() == sum(x * x for x in range(1, 21))
        pairs = list(rt.run(indexed, chunksize=2))
        assert sorted(pairs) == list(enumerate(indexed.evaluate()))
        assert rt.run(indexed, chunksize=5).result() == indexed.evaluate()
        assert rt.run(Literal(["a", "b"])).result() == ["a", "b"]
        assert list(rt.options(timeout=5).run(fold)) == [fold.evaluate()]
        assert [s for s, _ in rt.fired] == [KillWorker(task=1), KillWorker(task=6)]
        log.check(complete=True)
        # Stages run in their chunk's task: 30 items in chunks of 4 are 8 tasks, not 16.
        before = rt.stats().tasks_submitted
        rt.run(chain, chunksize=4).result()
        assert rt.stats().tasks_submitted - before == 8
        with pytest.raises(ops.HarnessError):
            rt.run(Literal(range(5)).map(ops.fail_on_3).fold(ops.add)).result()
        with pytest.raises(ops.HarnessError):
            rt.run(Literal(range(5)).map(ops.fail_on_3).map(ops.square)).result()
        handle = rt.run(chain, chunksize=1)
        assert next(iter(handle)) == 0 and handle.cancel() and handle.cancelled()
        with pytest.raises(phalanx.TaskCancelledError):
            next(handle)
        with pytest.raises(TypeError, match="directive"):
            rt.run([1, 2])  # type: ignore[call-overload]


def test_what_simruntime_does_not_model_says_so() -> None:
    with SimRuntime(workers={"default": 2}, seed=0) as rt:
        assert rt.n_workers == 2
        for name in ("wait_for_workers", "address", "endpoints"):
            with pytest.raises(AttributeError, match=f"SimRuntime has no '{name}': .*real phalanx.Runtime"):
                getattr(rt, name)
        with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
            getattr(rt, "nonsense")
        assert list(rt.map(ops.square, [3], on="default")) == [9]
        assert rt.spawn(ops.Counter, on="default").incr().result() == 1


def test_simruntime_routes_worker_tags_through_the_core() -> None:
    with SimRuntime(workers={"default": 1, "gpu": 1}, seed=0, route_timeout=5.0) as rt:
        assert sorted(rt.worker_tags().values()) == [("default",), ("gpu",)]
        assert list(rt.map(ops.square, [1, 2], on="gpu")) == [1, 4]
        assert rt.fold(ops.add, [1, 2, 3], on="gpu") == 6
        counter = rt.spawn(ops.Counter, on="gpu")
        assert rt.worker_tags()[counter.worker] == ("gpu",)
        with pytest.raises(phalanx.NoWorkerError):
            rt.options(on="tpu").submit(ops.square, 2).result()
        assert rt.now >= 5.0  # it waited route_timeout (virtual seconds) for a worker of that tag


def _partitioned(seed: int, heartbeat_timeout: float) -> tuple[SimRuntime, list[int], float]:
    rt = SimRuntime(workers=2, seed=seed, heartbeat_timeout=heartbeat_timeout,
                    faults=[PartitionHost(task=1, seconds=5.0)])
    log = DeliveryLog(rt)
    got = list(rt.map(ops.square, range(20), chunksize=1))
    done = rt.now
    log.check(complete=True)
    rt.shutdown()
    return rt, got, done


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heartbeats_declare_a_partitioned_worker_lost(seed: int) -> None:
    rt, got, done = _partitioned(seed, heartbeat_timeout=1.0)
    assert got == [x * x for x in range(20)]
    stats = rt.stats()
    assert stats.workers_lost == 1 and stats.worker_deaths == 0 and stats.redelivered >= 1
    cut = next(row[0] for row in rt.trace if row[1] == "send" and row[4:6] == (1, 1))  # task 1: (job 1, seq 1)
    lost = [row for row in rt.trace if row[1] == "exit"]
    assert lost == [(cut + 1.0, "exit", lost[0][2], None, "lost")]  # one heartbeat_timeout after the cut
    assert done < cut + 5.0  # the job did not wait for the partition to heal
    assert max(rt.deliveries.values()) == 1
    again, got_again, _ = _partitioned(seed, heartbeat_timeout=1.0)
    assert again.trace == rt.trace and got_again == got
    # Without heartbeats the worker is never lost: the job waits for the partition to heal.
    rt, got, done = _partitioned(seed, heartbeat_timeout=-1.0)
    assert got == [x * x for x in range(20)]
    assert rt.stats().workers_lost == 0 and done >= 5.0


def test_a_poison_task_fails_after_max_attempts() -> None:
    plan = [KillWorker(task=0), KillWorker(task=1), KillWorker(task=2)]
    with SimRuntime(seed=0, faults=plan, max_attempts=3) as rt:
        with pytest.raises(phalanx.WorkerCrashedError) as info:
            rt.submit(ops.square, 3).result()
        assert info.value.exitcode == -9


def test_a_dropped_result_is_a_hang_not_a_silent_wait() -> None:
    with SimRuntime(seed=0, faults=[DropMessage(kind="result", index=0)]) as rt:
        fut = rt.submit(ops.square, 3)
        with pytest.raises(HangError, match="would hang"):
            fut.result()
        with pytest.raises(TimeoutError):
            fut.result(timeout=5)


def test_a_reorder_with_nothing_to_swap_says_so() -> None:
    # One result only: nothing comes after it, so it is released in order, and reported so.
    with SimRuntime(seed=0, faults=[ReorderMessages(kind="result", index=0)]) as rt:
        assert rt.submit(ops.square, 3).result() == 9
        [(_, note)] = rt.fired
        assert "released" in note and "unreordered" in note and "50 ms" in note
    # Two results on one link: the first really goes after the second.
    with SimRuntime(workers=1, seed=0, faults=[ReorderMessages(kind="result", index=0)]) as rt:
        assert list(rt.map(ops.square, range(2), chunksize=1)) == [0, 1]
        [(_, note)] = rt.fired
        assert note.startswith("reordered result message 0") and "after result message 1" in note
        delivered = [row[3] for row in rt.trace if row[1] == "deliver"]
        assert delivered == [1, 0]


def test_actors_calls_events_restart_and_supervision() -> None:
    with SimRuntime(workers=2, seed=5) as rt:
        ref = rt.spawn(ops.Counter, 5, restart_policy="on-failure", checkpoint_every=1)
        assert isinstance(ref, phalanx.ActorRef)
        assert [ref.incr().result() for _ in range(3)] == [6, 7, 8]
        with pytest.raises(ops.HarnessError):
            ref.boom().result()
        first = ref.worker
        assert ref.restart() is True and ref.worker != first
        assert ref.incr().result() == 9
        kill_worker(rt, sorted(rt.worker_pids()).index(ref.worker))
        rt.settle()
        assert ref.state == "running" and ref.incr(10).result() == 19
        tree = rt.inspect()
        assert [a.id for w in tree.workers for a in w.actors] == [ref.id]
        ref.stop()
        events = [type(e).__name__ for e in ref.events()]
        assert events == ["Started", "Started", "Failed", "Started", "Stopped"]
        with pytest.raises(phalanx.ActorDiedError):
            ref.incr().result()
        with pytest.raises(phalanx.UnsupportedActorError):
            rt.spawn("harness_ops:Nope")


def test_a_failed_restart_reverts() -> None:
    with SimRuntime(workers=2, seed=6, faults=[FailRestart(restart=0)]) as rt:
        ref = rt.spawn(ops.Counter, 1)
        assert ref.incr().result() == 2
        assert ref.restart() is False
        assert ref.incr().result() == 3
        names = []
        with pytest.raises(phalanx.TaskTimeoutError):
            for event in ref.events(timeout=1.0):
                names.append(type(event).__name__)
        assert names == ["Started", "RestartFailed"]


def _workload(seed: int) -> tuple[list[object], list[object]]:
    plan = [KillWorker(task=5), ReorderMessages(kind="result", index=3)]
    with SimRuntime(workers=3, seed=seed, faults=plan) as rt:
        results: list[object] = list(rt.map(ops.square, range(24), chunksize=2))
        futures = [rt.submit(ops.add, i, i) for i in range(6)]
        results.append(rt.fold(ops.add, range(30), chunksize=4))
        log = rt.spawn(ops.Log)
        for i in range(4):
            log.append("a", i)
        results.append(log.read().result())
        results.extend(f.result() for f in futures)
        log.stop()
        results.append([type(e).__name__ for e in log.events()])
        return list(rt.trace), results


def test_same_seed_same_trace_100_seeds() -> None:
    traces = set()
    for seed in range(100):
        first, again = _workload(seed), _workload(seed)
        assert first == again, f"seed {seed} is not deterministic"
        traces.add(tuple(first[0]))
    assert len(traces) > 50  # the seed really decides the interleaving


def test_schedules_per_second() -> None:
    """How many whole schedules (runtime + workload + shutdown) SimRuntime explores per second."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0:
        _workload(n)
        n += 1
    rate = n / (time.perf_counter() - start)
    with SimRuntime(seed=0) as rt:
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < 1.0:
            rt.submit(ops.square, count).result()
            count += 1
    print(f"\nSimRuntime: {rate:.0f} schedules/s (map 24 + 6 submits + fold 30 + actor, with 2 faults); "
          f"{count / (time.perf_counter() - start):.0f} submit round trips/s")


# ---- channels ------------------------------------------------------------------------------


def _channel_run(seed: int) -> tuple[list[int], list[tuple[object, ...]]]:
    with SimRuntime(workers=3, seed=seed, restart_limit=100) as rt:
        tx, rx = rt.lease(phalanx.ExactlyOnce, prefetch=2)
        assert rt.submit(ops.fill, tx, 8).result(timeout=30) == 8  # a sender inside a worker
        holder = rt.spawn(ops.Holder, rx)
        held = holder.take(3).result(timeout=30)
        rt.kill_worker(holder.worker)
        tx.close(timeout=30)
        got = list(rx)
        assert sorted(got) == list(range(8)) and held == [0, 1, 2]
        assert rt.stats().channel_redelivered == 3
        return got, rt.trace


def test_channels_on_a_sim_runtime_repeat_with_their_seed() -> None:
    assert _channel_run(5) == _channel_run(5)


def test_a_channel_end_in_a_simulated_worker_waiting_for_more_says_it_cannot() -> None:
    with SimRuntime(workers=1, seed=3) as rt:
        tx, rx = rt.lease()
        tx.send(1)
        assert rt.submit(ops.drain, rx, 1).result(timeout=30) == [1]
        with pytest.raises(Exception, match="cannot wait inside one"):
            rt.submit(ops.drain, rx, 1).result(timeout=30)


def test_a_released_lease_ends_its_receivers_on_a_sim_runtime() -> None:
    with SimRuntime(workers=1, seed=3) as rt:
        lease = rt.lease(phalanx.ExactlyOnce)
        tx, rx = lease
        tx.send(1)
        lease.release()
        with pytest.raises(phalanx.ChannelClosedError, match="released"):
            rx.recv(timeout=5)
        with pytest.raises(phalanx.ChannelClosedError):
            tx.send(2)
            tx.flush(timeout=5)
        assert rt.stats().channel_messages_dropped >= 1
