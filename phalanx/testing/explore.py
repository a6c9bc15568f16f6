"""Search for a fault plan that breaks a scenario, shrink it, print a regression test.

Runs in the test process. :func:`find_failing_plan` hands Hypothesis a
strategy of ``(fault plan, seed)`` pairs and a scenario (a function of a
runtime that raises when something is wrong); Hypothesis generates pairs
until one fails, then shrinks it to a minimal one -- fewer steps, earlier
tasks, seed 0 -- and :class:`Counterexample` prints it as a test to paste.

Invariant kept: the search is deterministic (``derandomize``, no example
database), so the same scenario and settings find and print the same plan
on every machine, and a runtime is always shut down after each example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import HealthCheck, Phase, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from .faults import Fault, plan_repr
from .sim import SimRuntime
from .strategies import SAFE, fault_plans

__all__ = ["Counterexample", "find_failing_plan", "run_scenario"]

Scenario = Callable[[Any], None]
RuntimeFactory = Callable[[list[Fault], int], Any]


def _sim_factory(workers: int) -> RuntimeFactory:
    def make(plan: list[Fault], seed: int) -> SimRuntime:
        return SimRuntime(workers=workers, seed=seed, faults=plan)

    return make


def run_scenario(scenario: Scenario, plan: Sequence[Fault], seed: int = 0, *,
                 runtime: RuntimeFactory | None = None, workers: int = 2) -> Any:
    """Run ``scenario`` once on a fresh runtime with ``plan``; return the runtime (shut down)."""
    make = runtime or _sim_factory(workers)
    rt = make(list(plan), seed)
    try:
        scenario(rt)
    finally:
        rt.shutdown(wait=False)
    return rt


class Counterexample:
    """A minimal failing ``(plan, seed)`` with the error it produced and how to replay it."""

    def __init__(self, scenario: Scenario, plan: list[Fault], seed: int, error: BaseException,
                 examples: int, fired: list[tuple[Fault, str]], trace: str, workers: int) -> None:
        self.scenario = scenario
        self.plan = plan
        self.seed = seed
        self.error = error
        self.examples = examples
        self.fired = fired
        self.trace = trace
        self.workers = workers

    def regression_test(self) -> str:
        """Python source of a test that replays this failure (on a SimRuntime)."""
        name = getattr(self.scenario, "__name__", "scenario")
        module = getattr(self.scenario, "__module__", "")
        imported = f"from {module} import {name}\n" if module and module != "__main__" else ""
        return (
            "from phalanx.testing import *\n"
            f"{imported}\n\n"
            f"def test_{name}_regression() -> None:\n"
            f"    with SimRuntime(workers={self.workers}, seed={self.seed}, faults={plan_repr(self.plan)}) as rt:\n"
            f"        {name}(rt)\n"
        )

    def __str__(self) -> str:
        fired = "\n".join(f"    {step!r}: {note}" for step, note in self.fired) or "    (none)"
        return (
            f"phalanx.testing found a failing fault plan after {self.examples} examples, "
            f"shrunk to {len(self.plan)} step(s):\n"
            f"    faults={plan_repr(self.plan)}\n"
            f"    seed={self.seed}\n"
            f"error: {type(self.error).__name__}: {self.error}\n"
            f"faults that fired:\n{fired}\n"
            f"the schedule around the first kill (time, step, worker, message...):\n{self.trace}\n"
            f"paste as a regression test:\n\n{self.regression_test()}"
        )

    def __repr__(self) -> str:
        return f"Counterexample(plan={plan_repr(self.plan)}, seed={self.seed}, error={self.error!r})"


def find_failing_plan(
    scenario: Scenario,
    *,
    runtime: RuntimeFactory | None = None,
    workers: int = 2,
    kinds: Sequence[str] = SAFE,
    max_steps: int = 4,
    max_task: int = 20,
    max_examples: int = 200,
    vary_seed: bool = True,
) -> Counterexample | None:
    """Search fault plans (and seeds) under which ``scenario(rt)`` raises; shrink the first found.

    ``runtime(plan, seed)`` builds the runtime for one example (default: a
    :class:`~phalanx.testing.SimRuntime` with ``workers`` workers). Returns
    the minimal :class:`Counterexample` (``print()`` it), or None when
    ``max_examples`` examples all passed.
    """
    make = runtime or _sim_factory(workers)
    strategy = st.tuples(
        fault_plans(kinds, max_steps=max_steps, max_task=max_task),
        st.integers(0, 2**16) if vary_seed else st.just(0),
    )
    tried = [0]

    def fails(example: tuple[list[Fault], int]) -> bool:
        tried[0] += 1
        plan, seed = example
        try:
            run_scenario(scenario, plan, seed, runtime=make)
        except Exception:
            return True
        return False

    config = settings(
        max_examples=max_examples,
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    try:
        plan, seed = find(strategy, fails, settings=config)
    except NoSuchExample:
        return None
    rt: Any = None
    error: BaseException | None = None
    try:
        rt = make(list(plan), seed)
        scenario(rt)
    except Exception as exc:
        error = exc
    finally:
        if rt is not None:
            rt.shutdown(wait=False)
    if error is None:  # pragma: no cover  (a flaky scenario: real processes, real time)
        error = AssertionError("the shrunk plan failed during the search but passed when replayed (flaky)")
    if isinstance(rt, SimRuntime):
        fired, trace = rt.fired, rt.trace_around("kill")
    else:
        injector = getattr(rt, "faults", None)
        fired, trace = (injector.fired if injector is not None else []), "(a real runtime keeps no trace)"
    return Counterexample(scenario, list(plan), seed, error, tried[0], fired, trace, workers)
