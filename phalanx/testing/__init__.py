"""phalanx.testing: test actor and task systems the way phalanx tests itself.

Runs in the test (driver) process. What it offers:

* :class:`SimRuntime` -- tasks, directives and actors of the
  :class:`phalanx.Runtime` API in one process (not channels, worker tags or
  remote workers), with a seeded scheduler and a virtual clock: same seed,
  same run (see :mod:`phalanx.testing.sim`).
* **Fault plans** -- :class:`KillWorker`, :class:`DropMessage`,
  :class:`DelayMessage`, :class:`DuplicateMessage`, :class:`ReorderMessages`,
  :class:`FailRestart`, :class:`PartitionHost` -- given as ``faults=`` to a
  ``SimRuntime`` or a real ``phalanx.Runtime`` (which then really kills
  processes and drops frames; :func:`inject_faults` does it to a running one).
* **Invariant checkers** -- :class:`DeliveryLog` (exactly-once delivery),
  :func:`check_per_caller_order`, :class:`ProcessLeakCheck`,
  :func:`check_bounded_mailbox`.
* With Hypothesis (``pip install 'phalanx[testing]'``):
  :mod:`phalanx.testing.strategies` (fault plans, seeds, schedules),
  :class:`ActorSystemMachine` (a ``RuleBasedStateMachine`` base) and
  :func:`find_failing_plan` (search, shrink, print a regression test).
* A pytest plugin (:mod:`phalanx.testing.plugin`, loaded through the
  ``pytest11`` entry point) with the fixtures ``runtime`` and ``sim_runtime``.

Invariant kept: importing this package starts nothing and needs no
Hypothesis; the names that need it import it on first use and say so
clearly when it is missing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .faults import (
    DelayMessage,
    DropMessage,
    DuplicateMessage,
    FailRestart,
    Fault,
    FaultEngine,
    FaultPlan,
    InjectedFault,
    KillWorker,
    PartitionHost,
    ReorderMessages,
    plan_repr,
)
from .inject import FaultInjector, inject_faults, kill_worker
from .invariants import (
    DeliveryLog,
    ProcessLeakCheck,
    check_bounded_mailbox,
    check_exactly_once,
    check_per_caller_order,
)
from .sim import HangError, SimRuntime, sleep

if TYPE_CHECKING:
    from . import strategies
    from .explore import Counterexample, find_failing_plan
    from .machine import ActorSystemMachine

__all__ = [
    "ActorSystemMachine",
    "Counterexample",
    "DelayMessage",
    "DeliveryLog",
    "DropMessage",
    "DuplicateMessage",
    "FailRestart",
    "Fault",
    "FaultEngine",
    "FaultInjector",
    "FaultPlan",
    "HangError",
    "InjectedFault",
    "KillWorker",
    "PartitionHost",
    "ProcessLeakCheck",
    "ReorderMessages",
    "SimRuntime",
    "check_bounded_mailbox",
    "check_exactly_once",
    "check_per_caller_order",
    "find_failing_plan",
    "inject_faults",
    "kill_worker",
    "plan_repr",
    "sleep",
    "strategies",
]

#: names that need Hypothesis, and the module that defines each
_NEEDS_HYPOTHESIS = {
    "ActorSystemMachine": "machine",
    "Counterexample": "explore",
    "find_failing_plan": "explore",
    "strategies": "strategies",
}


def _require_hypothesis(name: str) -> None:
    try:
        import hypothesis  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"phalanx.testing.{name} needs Hypothesis, a test dependency phalanx does not install "
            "by default: pip install 'phalanx[testing]' (or pip install hypothesis)"
        ) from exc


def __getattr__(name: str) -> Any:
    module = _NEEDS_HYPOTHESIS.get(name)
    if module is None:
        raise AttributeError(f"module 'phalanx.testing' has no attribute {name!r}")
    _require_hypothesis(name)
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if name == module else getattr(mod, name)
    globals()[name] = value
    return value
