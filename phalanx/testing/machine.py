"""ActorSystemMachine: a Hypothesis ``RuleBasedStateMachine`` base for actor systems.

Runs in the test process. A subclass adds ``@rule`` methods that drive
``self.rt`` (spawn actors, call them, restart, stop, ``self.kill(i)``) and
keep a model; the base owns the runtime and checks phalanx's invariants
after every step:

* **exactly-once delivery** -- no outcome handed to a caller twice
  (:class:`~phalanx.testing.DeliveryLog`);
* **bounded mailbox** -- no actor with more than ``mailbox_limit`` calls waiting
  (on a SimRuntime, ever; on real workers, at each check, as their
  ``inspect()`` reports it);
* **not broken** -- the runtime still accepts work;
* **no leaked process** -- on a real runtime, nothing it started survives
  teardown (:class:`~phalanx.testing.ProcessLeakCheck`).

::

    class CounterMachine(ActorSystemMachine):
        faults = strategies.fault_plans(kinds=("kill",))

        def setup(self) -> None:
            self.ref = self.rt.spawn(Counter)
            self.model = 0

        @rule(k=st.integers(1, 5))
        def incr(self, k: int) -> None:
            self.model += k
            assert self.ref.incr(k).result() == self.model

    TestCounter = CounterMachine.TestCase

Invariant kept: every example gets a fresh runtime, and teardown shuts it
down even when a rule failed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar

from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant

from ..runtime import Runtime
from .faults import Fault, resolve_plan
from .inject import FaultInjector, inject_faults, kill_worker
from .invariants import DeliveryLog, ProcessLeakCheck, check_bounded_mailbox
from .sim import SimRuntime
from .strategies import schedules

__all__ = ["ActorSystemMachine"]


class ActorSystemMachine(RuleBasedStateMachine):
    """Owns ``self.rt`` for one example and checks phalanx's invariants (see the module docstring).

    Class attributes to override: ``runtime_kind`` (``"sim"`` or ``"real"``),
    ``workers``, ``faults`` (a plan, or a strategy of plans drawn once per
    example), ``mailbox_limit``, ``inspect_timeout``, ``runtime_options``
    (more keyword arguments for the runtime). Put per-example setup in
    :meth:`setup`.
    """

    runtime_kind: ClassVar[str] = "sim"
    workers: ClassVar[int] = 2
    faults: ClassVar[Any] = None
    mailbox_limit: ClassVar[int] = 10_000
    #: seconds a real worker has to report its mailboxes after each step (a silent one is not checked)
    inspect_timeout: ClassVar[float] = 1.0
    runtime_options: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.leaks: ProcessLeakCheck | None = None
        self.injector: FaultInjector | None = None
        self.kills = 0
        if self.runtime_kind == "real":
            self.leaks = ProcessLeakCheck().__enter__()
        elif self.runtime_kind != "sim":
            raise ValueError(f"runtime_kind must be 'sim' or 'real', got {self.runtime_kind!r}")
        self.rt: Any = self.make_runtime()
        self.log = DeliveryLog(self.rt)

    def make_runtime(self) -> SimRuntime | Runtime:
        """The runtime of one example (override to configure it differently)."""
        options = dict(self.runtime_options)
        if self.runtime_kind == "real":
            options.setdefault("restart_limit", 1000)
            return Runtime(workers=self.workers, **options)
        return SimRuntime(workers=self.workers, **options)

    @initialize(schedule=schedules())
    def _phalanx_start(self, schedule: Any) -> None:
        plan: Sequence[Fault] = resolve_plan(self.faults)
        if isinstance(self.rt, SimRuntime):
            self.rt.reseed(schedule)
            self.rt.add_faults(list(plan))
        elif plan:
            self.injector = inject_faults(self.rt, list(plan))
        self.setup()

    def setup(self) -> None:
        """Per-example setup, run once the runtime exists (override)."""

    def kill(self, index: int = 0) -> str | None:
        """Kill the ``index``-th worker (modulo their number) and let the driver notice."""
        wid = kill_worker(self.rt, index)
        if wid is None:
            return None
        self.kills += 1
        if isinstance(self.rt, SimRuntime):
            self.rt.run_for(0.005)
            return wid
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(w.id == wid and w.alive for w in self.rt.stats().workers):
            time.sleep(0.002)
        return wid

    @invariant()
    def _phalanx_invariants(self) -> None:
        rt = getattr(self, "rt", None)
        if rt is None:
            return
        self.log.check()
        broken = rt.broken if isinstance(rt, SimRuntime) else rt._driver.broken
        assert broken is None, f"the runtime broke: {broken}"
        # On real workers: the mailboxes they report now (one inspect round trip a step).
        check_bounded_mailbox(rt, self.mailbox_limit, timeout=self.inspect_timeout)

    def teardown(self) -> None:
        try:
            if self.injector is not None:
                self.injector.close()
            self.rt.shutdown(wait=False)
        finally:
            if self.leaks is not None:
                report = self.leaks.check()
                assert not report, "leaked worker processes: " + "; ".join(report)
