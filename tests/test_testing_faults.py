"""Fault plans on SimRuntime and on a real Runtime: the same property, the same faults.

Runs in the test (driver) process; the ``real`` cases start worker
processes (``harness_ops``) that the faults really SIGKILL, and whose frames
they really drop, hold, repeat or reorder through the driver's
``frame_filter``. Every test that starts processes relies on the autouse
leak check of ``tests/conftest.py`` and has a timeout.

The property (parametrised over both runtimes): under any plan of the
faults phalanx promises to tolerate (``strategies.SAFE``), a map, some
submits and a fold return exactly what they would without faults, and no
outcome is delivered twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import phalanx
import phalanx.testing as pt
from phalanx.testing import (
    DelayMessage,
    DeliveryLog,
    DropMessage,
    DuplicateMessage,
    FailRestart,
    KillWorker,
    PartitionHost,
    ReorderMessages,
    SimRuntime,
    inject_faults,
    plan_repr,
    strategies as pst,
)

import harness_ops as ops
import multihost_ops
from remote_host import Keys, RemoteHost

KINDS = ["sim", "real"]
#: examples per property run: real ones start processes, so fewer
EXAMPLES = {"sim": 100, "real": 15}


def make(kind: str, plan: list[Any], seed: int = 0) -> Any:
    if kind == "sim":
        return SimRuntime(workers=2, seed=seed, faults=plan)
    return phalanx.Runtime(workers=2, faults=plan, restart_limit=1000)


def workload(rt: Any) -> None:
    log = DeliveryLog(rt)
    futures = [rt.submit(ops.add, i, 1) for i in range(5)]
    assert list(rt.map(ops.square, range(30), chunksize=2, timeout=30)) == [x * x for x in range(30)]
    assert [f.result(timeout=30) for f in futures] == [i + 1 for i in range(5)]
    assert rt.fold(ops.add, range(20), chunksize=3, timeout=30) == 190
    log.check()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.timeout(90)
def test_exactly_once_under_any_safe_fault_plan(kind: str) -> None:
    @settings(max_examples=EXAMPLES[kind], deadline=None, database=None)
    @given(plan=pst.fault_plans(pst.SAFE, max_steps=3, max_task=12), seed=pst.seeds())
    def prop(plan: list[Any], seed: int) -> None:
        with make(kind, plan, seed) as rt:
            workload(rt)

    prop()


STEPS = [
    KillWorker(task=2, when="before"),
    KillWorker(task=2),
    KillWorker(task=2, when="after"),
    DuplicateMessage(kind="result", index=1),
    DuplicateMessage(kind="task", index=1),
    DelayMessage(kind="result", index=0, seconds=0.1),
    DelayMessage(kind="task", index=1, seconds=0.1),
    ReorderMessages(kind="result", index=0),
    PartitionHost(task=1, seconds=0.2),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step", STEPS, ids=repr)
@pytest.mark.timeout(60)
def test_each_fault_fires_and_is_tolerated(kind: str, step: Any) -> None:
    with make(kind, [step]) as rt:
        workload(rt)
        fired = rt.fired if kind == "sim" else rt.faults.fired
        assert [s for s, _ in fired] == [step]
        if isinstance(step, KillWorker):
            assert rt.stats().worker_deaths == 1
        if kind == "real" and isinstance(step, KillWorker):
            assert len(rt.faults.kills) == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.timeout(60)
def test_fail_restart_reverts_on_both(kind: str) -> None:
    with make(kind, [FailRestart(restart=0)]) as rt:
        ref = rt.spawn(ops.Counter, 1)
        assert ref.incr().result(timeout=30) == 2
        assert ref.restart(timeout=30) is False
        assert ref.incr().result(timeout=30) == 3
        assert ref.restart(timeout=30) is True  # only restart 0 was made to fail
        assert ref.incr().result(timeout=30) == 4
        ref.stop()
        events = list(ref.events(timeout=30))
        assert [type(e).__name__ for e in events] == ["Started", "RestartFailed", "Started", "Stopped"]
        error = events[1].error  # type: ignore[union-attr]
        assert isinstance(error, pt.InjectedFault) and "FailRestart" in str(error)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("drop", ["task", "result"])
@pytest.mark.timeout(60)
def test_a_dropped_frame_leaves_the_caller_waiting(kind: str, drop: str) -> None:
    """phalanx has no retransmission: a lost frame is what a timeout is for (SimRuntime says 'hang')."""
    step = DropMessage(kind=drop, index=0)  # type: ignore[arg-type]
    with make(kind, [step]) as rt:
        fut = rt.submit(ops.square, 3)
        with pytest.raises(TimeoutError):
            fut.result(timeout=0.3)
        assert rt.submit(ops.square, 4).result(timeout=30) == 16
        fired = rt.fired if kind == "sim" else rt.faults.fired
        assert [(s, note.split()[0]) for s, note in fired] == [(step, "dropped")]
        rt.shutdown(wait=False)


@pytest.mark.timeout(60)
def test_a_strategy_as_faults_on_a_real_runtime() -> None:
    plans: list[list[Any]] = []

    @settings(max_examples=3, deadline=None, database=None)
    @given(st.data())
    def prop(data: st.DataObject) -> None:
        strategy = pst.fault_plans(("kill",), max_steps=2, max_task=6)
        with phalanx.Runtime(workers=2, faults=strategy, restart_limit=1000) as rt:
            plans.append(rt.faults.plan)
            workload(rt)
            # The drawn plan is the one applied: its first kill always strikes a live worker (a later
            # one may find its task on a worker an earlier kill already took).
            assert {s for s, _ in rt.faults.fired} <= set(rt.faults.plan)
            assert bool(rt.faults.kills) == bool(rt.faults.plan)

    prop()
    assert len(plans) == 3 and all(len(p) <= 2 for p in plans) and any(plans)


@pytest.mark.timeout(90)
def test_a_partitioned_host_is_declared_lost_on_a_real_runtime(tmp_path: Path) -> None:
    """Heartbeats are held with everything else: the driver loses the whole host and redelivers.

    The "island" host's two workers join over loopback tcp and serve the tags
    "island" and "default"; task 0 is routed to the island, so the partition
    cuts that host off (both of its workers, by the host name they joined
    with), while the runtime's one local worker stays reachable.
    """
    keys = Keys(tmp_path / "keys")
    plan = [PartitionHost(task=0, seconds=2.5)]
    n = 40
    with phalanx.Runtime(workers=1, listen="tcp://127.0.0.1:0", heartbeat_timeout=1.0, faults=plan,
                         **keys.runtime_kwargs()) as rt:
        assert rt.address is not None
        with RemoteHost(rt.address, "island", keys.worker_args(), workers=2, heartbeat_timeout=30,
                        extra=["--tag", "island", "--tag", "default"]) as host:
            assert rt.wait_for_workers(3, timeout=30) == 3, host.err
            log = DeliveryLog(rt)
            routed = rt.options(on="island").submit(multihost_ops.where, -1)
            got = list(rt.map(multihost_ops.where, range(n), chunksize=1, timeout=60))
            # After the heal the island's old workers are told to stop; its host starts new ones.
            assert routed.result(timeout=60) == (-2, "island")
            stats = rt.stats()
            log.check(complete=True)
    assert [v for v, _ in got] == [2 * x for x in range(n)]
    assert stats.workers_lost == 2 and stats.worker_deaths == 0
    assert stats.redelivered >= 1
    [(step, note)] = rt.faults.fired
    assert step == plan[0] and "every worker of it" in note


@pytest.mark.timeout(60)
def test_inject_into_a_running_runtime_and_remove() -> None:
    with phalanx.Runtime(workers=2) as rt:
        assert rt.submit(ops.square, 2).result(timeout=30) == 4
        with inject_faults(rt, [KillWorker(task=0)]) as injector:
            assert list(rt.map(ops.square, range(10), chunksize=1, timeout=30)) == [x * x for x in range(10)]
            assert len(injector.fired) == 1
        assert rt._driver.frame_filter is None
        assert rt.submit(ops.square, 3).result(timeout=30) == 9


@settings(max_examples=100, deadline=None, database=None)
@given(plan=pst.fault_plans(pst.ALL, max_steps=5))
def test_a_plan_repr_is_python_that_builds_the_same_plan(plan: list[Any]) -> None:
    namespace: dict[str, Any] = {}
    exec("from phalanx.testing import *", namespace)
    assert eval(plan_repr(plan), namespace) == plan
    assert eval(repr(plan), namespace) == plan


def test_invalid_steps_are_refused() -> None:
    with pytest.raises(ValueError):
        KillWorker(task=0, when="sometime")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DropMessage(kind="nonsense", index=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DelayMessage(index=-1)
    with pytest.raises(TypeError):
        SimRuntime(faults=["not a step"])


@pytest.mark.timeout(60)
def test_a_strategy_as_faults_is_drawn_inside_given() -> None:
    seen: list[int] = []

    @settings(max_examples=10, deadline=None, database=None)
    @given(st.data())
    def prop(data: st.DataObject) -> None:
        with SimRuntime(seed=1, faults=pst.fault_plans(("kill",), max_steps=2)) as rt:
            seen.append(len(rt.plan))
            workload(rt)

    prop()
    assert seen and max(seen) <= 2
    with pytest.raises(TypeError, match="@given"):
        SimRuntime(faults=pst.fault_plans())
