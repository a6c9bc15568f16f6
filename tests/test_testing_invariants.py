"""phalanx's own invariants checked with phalanx.testing, on SimRuntime and on real workers.

Runs in the test (driver) process; the ``real`` cases start worker processes
(``harness_ops``), relying on the autouse leak check of ``tests/conftest.py``
and a per-test timeout. Each property is parametrised over both runtimes
and run under Hypothesis-drawn fault plans:

* invariant 1, **exactly-once delivery**: every submit and every map item
  comes back exactly once (``check_exactly_once``, ``DeliveryLog``), with
  workers killed before, during and after tasks;
* invariant 2, **lease isolation**: two maps interleaved on one runtime
  never see each other's results;
* **per-caller actor ordering**: two callers' pipelined calls reach an
  actor in the order each caller made them (``check_per_caller_order``);
* **bounded mailbox** and **no leaked process** checkers catch what they
  are for; ``ActorSystemMachine`` drives a supervised counter; the pytest
  plugin's fixtures clean up and report.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule, run_state_machine_as_test

import phalanx
from phalanx.testing import (
    ActorSystemMachine,
    DeliveryLog,
    DropMessage,
    KillWorker,
    ProcessLeakCheck,
    SimRuntime,
    check_bounded_mailbox,
    check_exactly_once,
    check_per_caller_order,
    strategies as pst,
)

import harness_ops as ops

KINDS = ["sim", "real"]
EXAMPLES = {"sim": 60, "real": 8}


def make(kind: str, plan: list[Any], seed: int = 0) -> Any:
    if kind == "sim":
        return SimRuntime(workers=2, seed=seed, faults=plan)
    return phalanx.Runtime(workers=2, faults=plan, restart_limit=1000)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.timeout(90)
def test_exactly_once_delivery(kind: str) -> None:
    @settings(max_examples=EXAMPLES[kind], deadline=None, database=None)
    @given(plan=pst.fault_plans(("kill",), max_steps=3, max_task=15), seed=pst.seeds(),
           n=st.integers(1, 40), chunksize=st.sampled_from([1, 3, 8]))
    def prop(plan: list[Any], seed: int, n: int, chunksize: int) -> None:
        with make(kind, plan, seed) as rt:
            log = DeliveryLog(rt)
            futures = [rt.submit(ops.square, x) for x in range(n)]
            mapped = list(rt.map(ops.square, range(n), chunksize=chunksize, ordered=False, timeout=30))
            check_exactly_once([f.result(timeout=30) for f in futures], [x * x for x in range(n)])
            check_exactly_once(mapped, [x * x for x in range(n)])
            log.check()

    prop()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.timeout(90)
def test_lease_isolation(kind: str) -> None:
    @settings(max_examples=EXAMPLES[kind], deadline=None, database=None)
    @given(plan=pst.fault_plans(pst.SAFE, max_steps=3, max_task=15), seed=pst.seeds(),
           n=st.integers(1, 30), steps=st.lists(st.booleans(), max_size=60))
    def prop(plan: list[Any], seed: int, n: int, steps: list[bool]) -> None:
        with make(kind, plan, seed) as rt:
            a = rt.map(ops.tagged, ["a"] * n, range(n), chunksize=2, timeout=30)
            b = rt.map(ops.tagged, ["b"] * n, range(n), chunksize=3, timeout=30)
            got: dict[str, list[Any]] = {"a": [], "b": []}
            for take_a in steps:  # interleave the two consumers as drawn
                it, key = (a, "a") if take_a else (b, "b")
                value = next(it, None)
                if value is not None:
                    got[key].append(value)
            got["a"].extend(a)
            got["b"].extend(b)
            assert got["a"] == [["a", x] for x in range(n)]
            assert got["b"] == [["b", x] for x in range(n)]

    prop()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.timeout(90)
def test_per_caller_actor_order(kind: str) -> None:
    # Faults on what comes back (a delayed or reordered *call* would break the order ZeroMQ keeps).
    back = st.one_of(pst.delay_messages(kinds=("result", "event")), pst.duplicate_messages(),
                     pst.reorder_messages(kinds=("result", "event")))

    @settings(max_examples=EXAMPLES[kind], deadline=None, database=None)
    @given(plan=st.lists(back, max_size=3), seed=pst.seeds(),
           callers=st.lists(st.sampled_from(["x", "y", "z"]), min_size=1, max_size=30))
    def prop(plan: list[Any], seed: int, callers: list[str]) -> None:
        with make(kind, plan, seed) as rt:
            log = rt.spawn(ops.Log, timeout=30)
            sent: dict[str, list[int]] = {}
            futures = []
            for caller in callers:  # pipelined: nobody waits between calls
                number = len(sent.setdefault(caller, []))
                sent[caller].append(number)
                futures.append(log.append(caller, number))
            assert [f.result(timeout=30) for f in futures] == list(range(1, len(callers) + 1))
            check_per_caller_order([tuple(e) for e in log.read().result(timeout=30)], sent)
            log.stop()

    prop()


def test_checkers_catch_what_they_are_for() -> None:
    with pytest.raises(AssertionError, match="missing"):
        check_exactly_once([1, 2], [1, 2, 3])
    with pytest.raises(AssertionError, match="extra or repeated"):
        check_exactly_once([1, 2, 2], [1, 2])
    with pytest.raises(AssertionError, match="order broken for 'x'"):
        check_per_caller_order([("x", 0), ("y", 0), ("x", 2), ("x", 1)])
    with pytest.raises(AssertionError, match="sent"):
        check_per_caller_order([("x", 0)], {"x": [0, 1]})
    with SimRuntime(seed=0) as rt:
        ref = rt.spawn(ops.Counter)
        futures = [ref.incr() for _ in range(20)]
        with pytest.raises(AssertionError, match="bounded mailbox"):
            check_bounded_mailbox(rt, 5)
        check_bounded_mailbox(rt, 20)
        assert [f.result() for f in futures][-1] == 20


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.timeout(60)
def test_delivery_log_catches_duplicates_and_losses(kind: str) -> None:
    # A duplicate: a driver whose dedupe is broken hands one outcome over twice.
    with make(kind, []) as rt:
        if kind == "sim":
            deliver = rt._deliver

            def twice_sim(job: Any, seq: int, outcome: Any) -> None:
                deliver(job, seq, outcome)
                deliver(job, seq, outcome)

            rt._deliver = twice_sim
            log = DeliveryLog(rt)
        else:
            log = DeliveryLog(rt)
            handed_over = rt._driver._deliver  # every outcome the driver delivers passes here

            def twice(ready: Any) -> None:
                handed_over(ready)
                handed_over(ready)

            rt._driver._deliver = twice
        assert rt.submit(ops.square, 5).result(timeout=30) == 25
        assert list(log.repeated().values()) == [2]
        with pytest.raises(AssertionError, match="delivered more than once"):
            log.check()
    # A loss: a result frame dropped on its way; check(complete=True) names the task.
    with make(kind, [DropMessage(kind="result", index=0)]) as rt:
        log = DeliveryLog(rt)
        lost = rt.submit(ops.square, 3)
        with pytest.raises(TimeoutError):
            lost.result(timeout=0.5)
        assert rt.submit(ops.square, 4).result(timeout=30) == 16
        log.check()  # nothing twice
        [(job, seq)] = log.missing()
        assert seq == 0 and len(log.submitted()) == 2 and log.kinds() == {"Ok": 1}
        with pytest.raises(AssertionError, match=rf"never delivered: \[\({job}, 0\)\]"):
            log.check(complete=True)
        rt.shutdown(wait=False)


@pytest.mark.timeout(30)
def test_process_leak_check_kills_and_reports() -> None:
    procs: list[subprocess.Popen[bytes]] = []
    with pytest.raises(AssertionError, match="sleep 30"):
        with ProcessLeakCheck(grace=0.2):
            procs.append(subprocess.Popen(["sleep", "30"]))
    procs[0].wait(timeout=5)  # killed (and reaped) by the check already
    with ProcessLeakCheck(grace=0.2):
        subprocess.run(["true"], check=True)


@pytest.mark.timeout(30)
def test_a_step_of_the_boot_time_does_not_make_an_older_child_new(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child started before the check is not the check's, even if the boot time that
    wall-clock creation times are computed from steps meanwhile (NTP, a resumed VM): the
    check must neither report it nor kill it."""
    from psutil import _pslinux

    older = subprocess.Popen(["sleep", "32"])
    try:
        with ProcessLeakCheck(grace=0.2):
            boot_time = _pslinux.boot_time
            monkeypatch.setattr(_pslinux, "boot_time", lambda: boot_time() + 1.0)
        assert older.poll() is None
    finally:
        older.kill()
        older.wait(timeout=5)


DOUBLE_FORK = ("import subprocess; "
               "print(subprocess.Popen(['sleep', '31'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")


@pytest.mark.timeout(30)
def test_process_leak_check_finds_an_orphan() -> None:
    """A child starts a grandchild and exits: the grandchild, reparented away from us, is still found."""
    orphan = 0
    try:
        with pytest.raises(AssertionError, match=r"sleep 31 \(an orphan") as info:
            with ProcessLeakCheck(grace=0.2):
                child = subprocess.run([sys.executable, "-c", DOUBLE_FORK], capture_output=True, text=True,
                                       timeout=20, check=True)
                orphan = int(child.stdout)
                proc = psutil.Process(orphan)
                assert proc.ppid() != os.getpid()
                assert proc not in psutil.Process().children(recursive=True)
        assert f"pid {orphan}:" in str(info.value)
        deadline = time.monotonic() + 10  # killed by the check; reaped by whoever adopted it
        while psutil.pid_exists(orphan) and psutil.Process(orphan).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the orphan survived the check"
            time.sleep(0.02)
    finally:
        if orphan:
            try:
                os.kill(orphan, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class CounterMachine(ActorSystemMachine):
    """A supervised counter under kills: every acknowledged increment is in the value."""

    faults = pst.fault_plans(("kill",), max_steps=2, max_task=10)

    def setup(self) -> None:
        self.ref = self.rt.spawn(ops.Counter, restart_policy="on-failure", checkpoint_every=1, timeout=30)
        self.acked = 0

    @rule(k=st.integers(1, 5))
    def incr(self, k: int) -> None:
        try:
            self.ref.incr(k).result(timeout=30)
        except phalanx.ActorDiedError:
            return  # not acknowledged: it may or may not be in the value
        self.acked += k

    @rule(index=st.integers(0, 1))
    def kill_a_worker(self, index: int) -> None:
        self.kill(index)

    def teardown(self) -> None:
        try:
            if self.ref.state == "running":
                try:
                    value = self.ref.incr(0).result(timeout=30)
                except phalanx.ActorDiedError:
                    value = None
                if value is not None:
                    assert value >= 0
        finally:
            super().teardown()


@pytest.mark.timeout(60)
def test_actor_system_machine_on_sim() -> None:
    run_state_machine_as_test(CounterMachine, settings=settings(max_examples=25, stateful_step_count=10,
                                                                deadline=None, database=None))


class RealCounterMachine(CounterMachine):
    runtime_kind = "real"
    faults = [KillWorker(task=3)]


@pytest.mark.timeout(60)
def test_actor_system_machine_on_real_workers() -> None:
    run_state_machine_as_test(RealCounterMachine, settings=settings(max_examples=3, stateful_step_count=6,
                                                                    deadline=None, database=None))


class FloodedMachine(ActorSystemMachine):
    """Ten calls pipelined to one actor: its mailbox goes past the limit of 3."""

    workers = 1
    mailbox_limit = 3
    inspect_timeout = 5.0

    def setup(self) -> None:  # the invariants are first checked right after it
        self.ref = self.rt.spawn(ops.Counter, timeout=30)
        calls = [self.ref.nap(0.2) for _ in range(10)]
        calls[0].result(timeout=30)  # the worker has read the other nine from its socket by now

    @rule()
    def incr(self) -> None:
        self.ref.incr().result(timeout=30)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.timeout(60)
def test_actor_system_machine_checks_the_mailbox_on_both(kind: str) -> None:
    machine = type(f"Flooded{kind.title()}Machine", (FloodedMachine,), {"runtime_kind": kind})
    with pytest.raises(AssertionError, match="bounded mailbox broken"):
        run_state_machine_as_test(machine, settings=settings(
            max_examples=1, stateful_step_count=1, phases=[Phase.generate], deadline=None, database=None))


PLUGIN_TESTS = '''
import sys
sys.path.insert(0, {tests!r})
import harness_ops as ops
from phalanx.testing import KillWorker


def test_sim(sim_runtime):
    assert sim_runtime.submit(ops.square, 3).result() == 9


def test_sim_failure_reports_the_replay(sim_runtime):
    sim_runtime.add_faults([KillWorker(task=0)])
    assert sim_runtime.submit(ops.square, 3).result() == 10


def test_real(runtime):
    assert runtime.submit(ops.square, 4).result(timeout=30) == 16


def test_real_leak_is_reported(runtime):
    import subprocess
    subprocess.Popen(["sleep", "30"])
'''


def test_the_plugin_entry_point_is_declared() -> None:
    """Installing phalanx registers the plugin: setup.cfg declares it, and the installed metadata has it."""
    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    declared = setup_cfg["options.entry_points"]["pytest11"].split("\n")
    assert "phalanx = phalanx.testing.plugin" in [line.strip() for line in declared]
    dist = importlib.metadata.distribution("phalanx")
    assert [(e.name, e.value) for e in dist.entry_points if e.group == "pytest11"] == [
        ("phalanx", "phalanx.testing.plugin")]


@pytest.mark.timeout(90)
def test_pytest_plugin_fixtures(tmp_path: Path) -> None:
    # No "-p phalanx.testing.plugin": pytest must find the plugin through the entry point alone.
    tests = str(Path(__file__).resolve().parent)
    (tmp_path / "test_plugin_use.py").write_text(textwrap.dedent(PLUGIN_TESTS.format(tests=tests)))
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--phalanx-seed", "3",
            "test_plugin_use.py"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHALANX_")}
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=80, env=env)
    text = out.stdout + out.stderr
    assert "1 failed, 3 passed, 1 error" in text, text
    assert "replay: SimRuntime(workers=2, seed=3, faults=[KillWorker(task=0)])" in text, text
    assert "leaked child processes" in text and "sleep 30" in text, text
