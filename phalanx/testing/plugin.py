"""The phalanx pytest plugin: ``runtime`` and ``sim_runtime`` fixtures that clean up.

Runs in the pytest process. pytest loads it through the ``pytest11`` entry
point ``phalanx`` (declared in ``setup.cfg``) in every session where phalanx
is installed, so importing it must stay cheap and need nothing but pytest:
the fixtures import what they use.

* ``runtime`` -- a ``phalanx.Runtime(workers=2)``, shut down after the test;
  any child process still alive a few seconds later is killed and the test
  fails listing it (no leaked process).
* ``sim_runtime`` -- a :class:`~phalanx.testing.SimRuntime` with two workers
  and the seed of ``--phalanx-seed`` (default 0); when the test fails, its
  report gets a "phalanx" section with the seed, the fault steps that fired,
  the end of the schedule and the line that rebuilds the runtime.
* ``phalanx_seed`` -- that seed.

A ``conftest.py`` fixture of the same name overrides a plugin fixture, as
pytest always does. Invariant kept: every runtime a fixture made is shut
down at teardown, whatever the test did.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ..runtime import Runtime
    from .sim import SimRuntime

__all__ = ["pytest_addoption", "phalanx_seed", "runtime", "sim_runtime", "pytest_runtest_makereport"]

#: the SimRuntime a test's ``sim_runtime`` fixture made, kept on the item for the report
_SIM_KEY = pytest.StashKey["SimRuntime"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("phalanx", "phalanx.testing")
    group.addoption("--phalanx-seed", type=int, default=0, metavar="N",
                    help="scheduler seed of the sim_runtime fixture (default 0)")


@pytest.fixture
def phalanx_seed(request: pytest.FixtureRequest) -> int:
    """The scheduler seed for ``sim_runtime`` (``--phalanx-seed``)."""
    return int(request.config.getoption("--phalanx-seed", 0) or 0)


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    """A running ``phalanx.Runtime(workers=2)``; shut down, then checked for leaked processes."""
    import phalanx

    from .invariants import ProcessLeakCheck

    leaks = ProcessLeakCheck()
    with leaks:
        rt = phalanx.Runtime(workers=2)
        try:
            yield rt
        finally:
            rt.shutdown(wait=False)
        report = leaks.check()
        if report:
            pytest.fail("phalanx: the runtime leaked child processes (killed):\n  " + "\n  ".join(report),
                        pytrace=False)


@pytest.fixture
def sim_runtime(request: pytest.FixtureRequest, phalanx_seed: int) -> Iterator[SimRuntime]:
    """A :class:`~phalanx.testing.SimRuntime` (2 workers, ``--phalanx-seed``), shut down after the test."""
    from .sim import SimRuntime

    rt = SimRuntime(workers=2, seed=phalanx_seed)
    request.node.stash[_SIM_KEY] = rt
    try:
        yield rt
    finally:
        rt.shutdown(wait=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    rt = item.stash.get(_SIM_KEY, None)
    if rt is not None and call.when == "call" and report.failed:
        fired = "\n".join(f"  {step!r}: {note}" for step, note in rt.fired) or "  (none)"
        report.sections.append((
            "phalanx SimRuntime",
            f"replay: {rt.replay_hint()}\nfaults that fired:\n{fired}\n"
            f"virtual time {rt.now:.6f} s after {rt.steps} steps; last steps:\n{rt.trace_text(last=15)}",
        ))
    return report
