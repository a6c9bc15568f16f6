"""A Hypothesis state machine driving one runtime through submits, kills, cancels and maps.

Runs in the test (driver) process; operations run in worker processes
(``chaos_ops``). Each example starts its own ``Runtime(workers=2)`` and shuts
it down in teardown. The model records what every future must resolve to:

* ``submit(x)`` -> ``3x + 1``;
* ``cancel()`` returning True -> ``CancelledError``, False -> the result;
* a worker SIGKILLed between steps changes nothing a caller can see
  (invariant 1: redelivered, exactly once);
* a short ``map`` returns exactly the builtin ``map``; a map iterator closed
  after ``k`` items yielded exactly the first ``k`` results;
* a task failing fatally (``fault_ops.fail_odd`` on an odd item, under the
  default ``Terminate``): a ``submit`` fails with the remote ``ValueError``; a
  ``map`` yields the results before the first odd item, then raises its
  ``ValueError`` (the rest of the job is cancelled); other jobs are
  unaffected (their futures still resolve to the model).

Invariants after every step: nothing was delivered twice (counted where the
driver delivers, see ``phalanx.testing.DeliveryLog``), the runtime is not broken,
a duplicate result needs a redelivered task (or a map that failed and
forgot its later tasks), and a late result needs a cause (a kill, a map
ended early, a fatal failure).
Teardown: every future resolves to its model value within a timeout
(invariant 3).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

import phalanx
from phalanx.testing import DeliveryLog

import chaos_ops
import fault_ops
from chaos_ops import (
    ThreadWatch,
    expected,
    kill_child,
    wait_settled,
)

#: seconds a future or a map may take to resolve in the model's checks
RESOLVE_TIMEOUT = 30.0
DELAYS = (0.0, 0.001, 0.02)

#: what the examples did, summed (printed at the end)
DONE: Counter[str] = Counter()


class RuntimeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.watch = ThreadWatch().__enter__()
        self.rt = phalanx.Runtime(workers=2, restart_limit=1000, max_attempts=20)
        self.log = DeliveryLog(self.rt)
        #: (future, x, model) with model[0]: None (result expected), "cancelled" or "fails" (ValueError)
        self.futures: list[tuple[concurrent.futures.Future[int], int, list[str | None]]] = []
        self.kills = 0
        #: maps that failed fatally (each may drop up to a window of tasks it forgot)
        self.failed_maps = 0
        #: steps after which a late result may legitimately be dropped
        self.late_causes = 0

    def _step(self, action: Callable[[], None]) -> None:
        """Run one step, failing fast if a driver thread died meanwhile."""
        self.watch.check()
        action()
        self.watch.check()

    # ---- rules ---------------------------------------------------------------

    @rule(x=st.integers(-10**6, 10**6), delay=st.sampled_from(DELAYS))
    def submit(self, x: int, delay: float) -> None:
        def action() -> None:
            fut = self.rt.submit(chaos_ops.slow_triple_plus_one, x, delay)
            self.futures.append((fut, x, [None]))
        self._step(action)

    @rule(start=st.integers(0, 1000), n=st.integers(20, 60), cancel_newest=st.integers(0, 10))
    def submit_burst(self, start: int, n: int, cancel_newest: int) -> None:
        # More than the 2 x 16 credits: some stay queued in the driver, so a
        # cancel can still succeed; then cancel the newest few at once.
        def action() -> None:
            burst = []
            for x in range(start, start + n):
                fut = self.rt.submit(chaos_ops.slow_triple_plus_one, x, 0.005)
                burst.append((fut, x, [None]))
            self.futures.extend(burst)
            for fut, _, model in burst[len(burst) - cancel_newest:]:
                self._cancel(fut, model)
        self._step(action)

    def _cancel(self, fut: concurrent.futures.Future[int], model: list[str | None]) -> None:
        DONE["cancel attempts"] += 1
        if fut.cancel():
            model[0] = "cancelled"
            DONE["cancelled"] += 1

    # Draws never depend on timing (which futures are done, which worker ids
    # exist): an index is drawn first and taken modulo what is there.
    @rule(index=st.integers(0, 1))
    def kill_worker(self, index: int) -> None:
        def action() -> None:
            pids = self.rt.worker_pids()
            if not pids:
                return
            wid = sorted(pids)[index % len(pids)]
            if kill_child(pids[wid]):
                self.kills += 1
                self.late_causes += 1
                DONE["kills"] += 1
                # Let the driver notice the death before the next step.
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline and any(
                    w.id == wid and w.alive for w in self.rt.stats().workers
                ):
                    time.sleep(0.002)
        self._step(action)

    @rule(index=st.integers(0, 40))
    def cancel(self, index: int) -> None:
        def action() -> None:
            candidates = [i for i, (fut, _, model) in enumerate(self.futures)
                          if not fut.done() and model[0] is None]
            if not candidates:
                return
            # Counted from the newest: those are the likeliest to be still queued.
            fut, _, model = self.futures[candidates[-1 - index % len(candidates)]]
            self._cancel(fut, model)
        self._step(action)

    @rule(xs=st.lists(st.integers(-1000, 1000), max_size=40), chunksize=st.sampled_from([None, 1, 3, 10]))
    def short_map(self, xs: list[int], chunksize: int | None) -> None:
        def action() -> None:
            got = list(self.rt.map(chaos_ops.triple_plus_one, xs, chunksize=chunksize,
                                   timeout=RESOLVE_TIMEOUT))
            assert got == [expected(x) for x in xs]
            DONE["maps"] += 1
        self._step(action)

    @rule(n=st.integers(1, 40), k=st.integers(0, 40), chunksize=st.sampled_from([1, 4]))
    def map_closed_early(self, n: int, k: int, chunksize: int) -> None:
        def action() -> None:
            m = min(k, n)
            self.late_causes += 1
            it = self.rt.map(chaos_ops.slow_triple_plus_one, range(n), [0.002] * n,
                             chunksize=chunksize, timeout=RESOLVE_TIMEOUT)
            try:
                got = [next(it) for _ in range(m)]
            finally:
                it.close()
            assert got == [expected(x) for x in range(m)]
            assert list(it) == []
            DONE["maps closed early"] += 1
        self._step(action)

    @rule(x=st.integers(-1000, 1000).map(lambda v: 2 * v + 1))
    def fatal_submit(self, x: int) -> None:
        def action() -> None:
            fut = self.rt.submit(fault_ops.fail_odd, x)
            self.futures.append((fut, x, ["fails"]))
        self._step(action)

    @rule(xs=st.lists(st.integers(0, 99), min_size=1, max_size=30), chunksize=st.sampled_from([1, 4]))
    def fatal_map(self, xs: list[int], chunksize: int) -> None:
        def action() -> None:
            first_odd = next((i for i, x in enumerate(xs) if x % 2), None)
            it = self.rt.map(fault_ops.fail_odd, xs, chunksize=chunksize, timeout=RESOLVE_TIMEOUT)
            got: list[int] = []
            if first_odd is None:
                got.extend(it)
                assert got == xs
                return
            self.failed_maps += 1
            self.late_causes += 1
            with pytest.raises(ValueError, match=f"^odd {xs[first_odd]}$") as info:
                got.extend(it)
            assert isinstance(info.value.__cause__, phalanx.RemoteTraceback)
            assert got == xs[:first_odd]  # the results before it, then the error at its position
            assert list(it) == []
            DONE["maps failed fatally"] += 1
        self._step(action)

    # ---- invariants -------------------------------------------------------------

    @invariant()
    def nothing_delivered_twice(self) -> None:
        def action() -> None:
            assert not self.log.repeated()
            stats = self.rt.stats()
            # Each redelivery runs a task once more (one more result at most); a failed
            # map forgets at most a window (4 * 2 + 2) of tasks that may still answer.
            assert stats.duplicates_dropped <= stats.redelivered + 10 * self.failed_maps
            if not self.late_causes:
                assert stats.late_results_dropped == 0
            assert self.rt._driver.broken is None
        self._step(action)

    def teardown(self) -> None:
        def action() -> None:
            deadline = time.monotonic() + RESOLVE_TIMEOUT
            for fut, x, model in self.futures:
                if model[0] == "cancelled":
                    assert fut.cancelled()
                    with pytest.raises(concurrent.futures.CancelledError):
                        fut.result(timeout=0)
                    continue
                if model[0] == "fails":
                    with pytest.raises(ValueError, match=f"^odd {x}$") as info:
                        fut.result(timeout=max(0.0, deadline - time.monotonic()))
                    assert isinstance(info.value.__cause__, phalanx.RemoteTraceback)
                    DONE["futures failed fatally"] += 1
                    continue
                while not fut.done():
                    self.watch.check()  # fail fast if the pump died
                    assert time.monotonic() < deadline, f"future of submit({x}) unresolved (hang)"
                    concurrent.futures.wait([fut], timeout=0.1)
                assert fut.result(timeout=0) == expected(x)
                DONE["futures checked"] += 1
            assert not self.log.repeated()
            assert self.rt._driver.broken is None
            wait_settled(self.rt, workers=2, deaths=self.kills)
        try:
            self._step(action)
        finally:
            try:
                self.rt.shutdown()
            finally:
                self.watch.__exit__(None, None, None)


@pytest.mark.chaos
@pytest.mark.timeout(240)
def test_runtime_state_machine() -> None:
    DONE.clear()
    run_state_machine_as_test(
        RuntimeMachine,
        settings=settings(max_examples=8, stateful_step_count=15, deadline=None),
    )
    print(f"what the examples did: {dict(DONE)}")
