"""A plain map chunk's calls run in batches (``TaskRunner._map_batches``): what a chunk yields stays per item.

The first tests run the core's runner in this process, with a clock of
their own (no worker, no sleep): where a failure lands inside a chunk, which
values come before it, and how soon the abort flag is read. The last run the
same chunks through a ``Runtime(workers=2)`` per module (``module_runtime``);
the operations live in ``tests/ops.py``.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

import ops
import phalanx
from phalanx.core.execute import BATCH_TIME, TaskRunner
from phalanx.errors import TaskCancelledError
from phalanx.registry.operations import Operation, driver_operation
from phalanx.transport.messages import Chunk, Err, Ok

#: generous bound on any single wait; tests finish far sooner
T = 60.0


class Ctx:
    """The running task as the runner sees it (``phalanx.TaskContext``'s fields it reads)."""

    def __init__(self) -> None:
        self.aborted = False
        self.started = 0.0
        self.values: list[Any] = []

    def check(self) -> None:
        if self.aborted:
            raise TaskCancelledError("aborted")


def settle(awaitable: Any) -> Any:
    """Run a coroutine that never suspends to its result (what a worker's event loop would do)."""
    try:
        awaitable.__await__().send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine suspended")


def run_chunk(fn: Any, items: list[Any], clock: Any = lambda: 0.0) -> tuple[Any, Ctx]:
    op = driver_operation(fn)
    assert op is not None
    runner = TaskRunner(clock, settle, lambda name: op)
    ctx = Ctx()
    return runner.execute(Chunk(1, 0, 0, op.name, items, False, False, 0.0, []), ctx), ctx


@pytest.mark.parametrize("k", [0, 1, 2, 3, 1000, 4095, 4096, 9999])
def test_a_call_failing_deep_in_a_chunk_reports_its_position_and_the_values_before_it(k: int) -> None:
    items = list(range(10_000))
    items[k] = -1
    outcome, _ = run_chunk(ops.triple_unless_negative, items)
    assert isinstance(outcome, Err) and outcome.index == k
    assert outcome.partial == [3 * x for x in range(k)]
    assert "negative item -1" in outcome.error.message


def test_a_sync_operation_returning_awaitables_mid_chunk_has_each_settled_in_place() -> None:
    outcome, _ = run_chunk(ops.double_sometimes_awaitable, list(range(5000)))
    assert isinstance(outcome, Ok) and outcome.value == [2 * x for x in range(5000)]


def test_a_field_less_awaitable_among_plain_numbers_is_settled_in_place() -> None:
    # The batch check skips the scan by class for values that refer to nothing; an
    # awaitable without fields still refers to its class, so it is awaited.
    outcome, _ = run_chunk(ops.seven_when_awaited_at, list(range(5000)))
    assert isinstance(outcome, Ok)
    assert outcome.value == [7 if x == 1234 else x for x in range(5000)]


@pytest.mark.parametrize("k", [1, 2, 700, 4999])
def test_an_awaitable_failing_mid_chunk_fails_at_its_position_and_none_after_it_is_left_pending(k: int) -> None:
    items = list(range(5000))
    items[k] = -k
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a coroutine never awaited nor closed would warn
        outcome, _ = run_chunk(ops.double_sometimes_awaitable, items)
    assert isinstance(outcome, Err) and outcome.index == k
    assert outcome.partial == [2 * x for x in range(k)]
    assert f"negative awaited item {-k}" in outcome.error.message


def test_slow_calls_read_the_abort_flag_after_every_call() -> None:
    now = [0.0]
    ctx_ref: list[Ctx] = []
    calls: list[int] = []

    def slow(x: int) -> int:  # each call takes twice the batch time, on the test's clock
        calls.append(x)
        now[0] += 2 * BATCH_TIME
        if x == 10:
            ctx_ref[0].aborted = True
        return x

    op = Operation("slow", slow)
    runner = TaskRunner(lambda: now[0], lambda a: a, lambda name: op)
    ctx = Ctx()
    ctx_ref.append(ctx)
    outcome = runner.execute(Chunk(1, 0, 0, "slow", list(range(1000)), False, False, 0.0, []), ctx)
    assert isinstance(outcome, Err) and outcome.error.type.endswith("TaskCancelledError")
    assert calls == list(range(11)) and outcome.partial == list(range(11))


def test_quick_calls_read_the_abort_flag_within_a_batch_of_calls_at_most_as_long_as_the_one_before() -> None:
    ctx_ref: list[Ctx] = []
    calls: list[int] = []

    def quick(x: int) -> int:
        calls.append(x)
        if x == 100:
            ctx_ref[0].aborted = True
        return x

    op = Operation("quick", quick)
    runner = TaskRunner(lambda: 0.0, lambda a: a, lambda name: op)
    ctx = Ctx()
    ctx_ref.append(ctx)
    outcome = runner.execute(Chunk(1, 0, 0, "quick", list(range(100_000)), False, False, 0.0, []), ctx)
    assert isinstance(outcome, Err) and outcome.error.type.endswith("TaskCancelledError")
    # Batches of 1, 2, 4, ... 64 end at item 126: the flag set by item 100 is read there.
    assert calls == list(range(127))


@pytest.mark.parametrize("k", [0, 777, 19_999])
def test_a_map_failing_deep_in_a_big_chunk_yields_every_value_before_the_failure(
    module_runtime: phalanx.Runtime, k: int
) -> None:
    items = list(range(20_000))
    items[k] = -1
    got: list[int] = []
    with pytest.raises(ValueError, match="negative item -1"):
        for value in module_runtime.map(ops.triple_unless_negative, items, chunksize=20_000, timeout=T):
            got.append(value)
    assert got == [3 * x for x in range(k)]


def test_a_map_of_a_sync_operation_returning_awaitables_yields_their_results_in_order(
    module_runtime: phalanx.Runtime,
) -> None:
    got = list(module_runtime.map(ops.double_sometimes_awaitable, range(3000), chunksize=3000, timeout=T))
    assert got == [2 * x for x in range(3000)]


def test_under_ignore_a_failing_awaitable_deep_in_a_chunk_is_skipped_at_its_position(
    module_runtime: phalanx.Runtime,
) -> None:
    items = list(range(3000))
    items[1001] = -1001
    it = module_runtime.options(on_fatal=phalanx.Ignore).map(ops.double_sometimes_awaitable, items,
                                                             chunksize=3000, timeout=T)
    got = list(it)
    assert got == [2 * x for x in items if x >= 0]
    ((index, error),) = it.skipped
    assert index == 1001 and "negative awaited item -1001" in str(error)
