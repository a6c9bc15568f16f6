"""The worked example of docs/testing.md: a bank with a seeded bug, found and shrunk.

Runs in the test (driver) process. ``docs/examples/bank.py`` holds a bank of
supervised account actors whose checkpoints are taken every 3 calls (the
seeded bug: a worker death loses acknowledged transfers). The harness, with
its default settings, must find a fault plan that breaks the bank's
invariant and shrink it to at most 3 steps; the plan must replay on a
SimRuntime and reproduce on a real Runtime (real SIGKILLs); and the fixed
bank (a checkpoint after every call) must survive every kill plan tried.
The shrunk output is printed (``pytest -s`` shows it) and must be the one
docs/testing.md shows.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

import phalanx
from phalanx.testing import KillWorker, SimRuntime, find_failing_plan, strategies as pst

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "docs" / "examples"
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))

import bank  # noqa: E402

pytestmark = pytest.mark.timeout(90)


GUIDE = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


def guide_output_block() -> str:
    """The first ``text`` block of docs/testing.md: the output the guide shows for the seeded bug."""
    text = GUIDE.read_text()
    start = text.index("```text\nphalanx.testing found a failing fault plan") + len("```text\n")
    return text[start:text.index("```", start)]


def test_the_harness_finds_and_shrinks_the_seeded_bug() -> None:
    found = find_failing_plan(bank.bank_scenario)
    assert found is not None, "the seeded bug was not found"
    print(f"\n{found}")
    # The guide shows this very output (the search is deterministic): regenerate it there if it changes.
    assert guide_output_block().rstrip("\n") == str(found).rstrip("\n")
    assert 1 <= len(found.plan) <= 3
    assert isinstance(found.error, AssertionError)
    assert any(isinstance(step, KillWorker) for step in found.plan)
    # The printed plan replays: same seed, same faults, same failure, same trace.
    traces = []
    for _ in range(2):
        rt = SimRuntime(workers=2, seed=found.seed, faults=found.plan)
        with pytest.raises(AssertionError, match="money not conserved|acknowledged transfers lost"):
            bank.bank_scenario(rt)
        rt.shutdown(wait=False)
        traces.append(rt.trace)
    assert traces[0] == traces[1]
    # And the printed regression test is Python that runs.
    source = found.regression_test()
    namespace: dict[str, Any] = {}
    exec(compile(source, "<regression>", "exec"), namespace)
    test = next(v for k, v in namespace.items() if k.startswith("test_"))
    with pytest.raises(AssertionError):
        test()


def test_the_shrunk_plan_reproduces_on_a_real_runtime() -> None:
    found = find_failing_plan(bank.bank_scenario)
    assert found is not None
    with phalanx.Runtime(workers=2, faults=found.plan) as rt:
        with pytest.raises(AssertionError, match="money not conserved|acknowledged transfers lost"):
            bank.bank_scenario(rt)
        assert rt.faults.kills, "the plan killed no real worker"


def test_the_fix_passes_the_shrunk_plan() -> None:
    found = find_failing_plan(bank.bank_scenario)
    assert found is not None
    with SimRuntime(workers=2, seed=found.seed, faults=found.plan) as rt:
        bank.fixed_bank_scenario(rt)


# Found by this harness (docs/testing.md, "What the harness found in phalanx"): a
# worker used to send an actor call's reply before its checkpoint, so a death noticed
# before the checkpoint was read lost an acknowledged call. Fixed in phalanx/worker.py.
def test_the_fixed_bank_survives_every_kill_plan_tried() -> None:
    found = find_failing_plan(bank.fixed_bank_scenario, kinds=("kill",))
    if found is not None:
        print(f"\n{found}")
    assert found is None
