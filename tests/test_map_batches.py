"""A plain map chunk's calls run in one C loop (``TaskRunner._map_all``): what a chunk yields stays per item.

The first tests run the core's runner in this process, with a clock of
their own (no worker, no sleep): where a failure lands inside a chunk, which
values come before it, and how soon the abort flag is read. The last run the
same chunks through a ``Runtime(workers=2)`` per module (``module_runtime``);
the operations live in ``tests/ops.py``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import pytest

import ops
import phalanx
from phalanx.core.execute import TaskRunner, abort
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
        self.rest: Any = None

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


@pytest.mark.parametrize("at", [0, 1, 10, 100, 9_999])
def test_no_call_starts_once_the_task_is_aborted(at: int) -> None:
    ctx_ref: list[Ctx] = []
    calls: list[int] = []

    def quick(x: int) -> int:
        calls.append(x)
        if x == at:
            abort(ctx_ref[0])  # what the worker's control thread does, here from inside a call
        return x

    op = Operation("quick", quick)
    runner = TaskRunner(lambda: 0.0, lambda a: a, lambda name: op)
    ctx = Ctx()
    ctx_ref.append(ctx)
    outcome = runner.execute(Chunk(1, 0, 0, "quick", list(range(10_000)), False, False, 0.0, []), ctx)
    assert isinstance(outcome, Err) and outcome.error.type.endswith("TaskCancelledError")
    assert calls == list(range(at + 1)) and outcome.partial == list(range(at + 1)) and outcome.index == at + 1
    assert ctx.rest is None


@pytest.mark.parametrize("at", [0, 1, 500, 999])
def test_no_awaitable_a_call_returned_starts_once_the_task_is_aborted(at: int) -> None:
    """The calls return coroutines, awaited after the loop: an abort while one runs leaves every
    later one closed, never run (and none left to warn that it was never awaited)."""
    ctx_ref: list[Ctx] = []
    ran: list[int] = []

    async def body(x: int) -> int:
        ran.append(x)
        if x == at:
            abort(ctx_ref[0])  # what the worker's control thread does, here while one is awaited
        return x

    def later(x: int) -> Any:
        return body(x)

    op = Operation("later", later)
    runner = TaskRunner(lambda: 0.0, settle, lambda name: op)
    ctx = Ctx()
    ctx_ref.append(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outcome = runner.execute(Chunk(1, 0, 0, "later", list(range(1000)), False, False, 0.0, []), ctx)
    assert isinstance(outcome, Err) and outcome.error.type.endswith("TaskCancelledError")
    assert ran == list(range(at + 1))
    assert outcome.partial == list(range(at + 1)) and outcome.index == at + 1


def test_a_task_aborted_before_its_loop_starts_calls_nothing() -> None:
    calls: list[int] = []

    def quick(x: int) -> int:
        calls.append(x)
        return x

    op = Operation("quick", quick)
    runner = TaskRunner(lambda: 0.0, lambda a: a, lambda name: op)
    ctx = Ctx()
    abort(ctx)
    outcome = runner.execute(Chunk(1, 0, 0, "quick", list(range(100)), False, False, 0.0, []), ctx)
    assert isinstance(outcome, Err) and outcome.error.type.endswith("TaskCancelledError")
    assert calls == [] and outcome.index == 0


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


# ---- the tight loop on real workers: abort, crash, per-item errors, order ---------------


def _wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + T
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("op", [ops.log_then_wait_at_gate, ops.log_then_wait_at_gate_when_awaited],
                         ids=["calls", "awaitables"])
def test_closing_a_map_stops_its_chunk_after_the_call_running_then(tmp_path: Path, op: Any) -> None:
    """Quick calls, then one that blocks until the map is closed: not one call after it runs.

    Items 0..4 return at once, item 5 waits for the gate the test opens once
    the worker has its abort flag (the map closed). Whatever batch it sat in,
    the chunk ends at item 5; the worker lives on (nobody killed it). With
    ``awaitables`` the operation returns coroutines, which the worker awaits
    after the chunk's calls: every one after the abort stays unawaited.
    """
    log, gate = tmp_path / "log", tmp_path / "gate"
    items = [f"{log}\n{gate}\n{i}\n5" for i in range(1000)]
    with phalanx.Runtime(workers=1, abort_grace=30) as rt:
        pids = rt.worker_pids()
        it = rt.map(op, items, chunksize=1000, timeout=T)
        _wait_until(lambda: log.exists() and "5\n" in log.read_text(), "item 5 started")
        before = rt.stats().late_results_dropped
        it.close()
        # The worker's control thread answers for the task as it sets the abort flag; the
        # driver, done with the job, drops that answer and counts it.
        _wait_until(lambda: rt.stats().late_results_dropped > before, "the worker set the abort flag")
        gate.touch()
        assert rt.submit(ops.triple_unless_negative, 2).result(timeout=T) == 6  # the chunk ended
        assert log.read_text().split() == [str(i) for i in range(6)]
        assert rt.worker_pids() == pids


def test_a_crash_deep_in_a_big_chunk_of_single_argument_calls_is_charged_to_that_item_only() -> None:
    items = list(range(3000))
    items[1777] = -1
    with phalanx.Runtime(workers=2) as rt:
        it = rt.options(on_fatal=phalanx.Ignore).map(ops.exit_on_negative, items, chunksize=3000, timeout=T)
        got = list(it)
        assert got == [x + 1 for x in items if x >= 0]
        assert [(i, type(e)) for i, e in it.skipped] == [(1777, phalanx.WorkerCrashedError)]
        assert rt.submit(ops.triple_unless_negative, 2).result(timeout=T) == 6


@pytest.mark.parametrize("chunksize", [None, 1, 97, 4096])
def test_every_failing_item_of_a_long_map_is_skipped_in_place_with_its_own_remote_traceback(
    module_runtime: phalanx.Runtime, chunksize: int | None,
) -> None:
    items = list(range(20_000))
    it = module_runtime.options(on_fatal=phalanx.Ignore).map(ops.inc_unless_multiple_of_97, items,
                                                             chunksize=chunksize, timeout=T)
    got = list(it)
    assert got == [x + 1 for x in items if x % 97]
    assert [i for i, _ in it.skipped] == [x for x in items if x % 97 == 0]
    for index, error in it.skipped:
        assert isinstance(error, ValueError) and str(error) == f"item {index} is a multiple of 97"
        assert isinstance(error.__cause__, phalanx.RemoteTraceback)
        assert "inc_unless_multiple_of_97" in str(error.__cause__)


@pytest.mark.parametrize("chunksize", [None, 3, 2500])
def test_a_map_yields_each_item_s_value_once_in_input_order(
    module_runtime: phalanx.Runtime, chunksize: int | None,
) -> None:
    items = [(x * 7919) % 20_011 for x in range(20_000)]  # not sorted: order comes from the runtime
    assert list(module_runtime.map(ops.triple_unless_negative, items, chunksize=chunksize, timeout=T)) == [
        3 * x for x in items]
    got = list(module_runtime.map(ops.triple_unless_negative, iter(items), chunksize=chunksize, timeout=T))
    assert got == [3 * x for x in items]


@pytest.mark.parametrize("chunksize", [None, 1, 4096])
def test_an_item_that_does_not_fit_the_parameter_fails_alone_and_in_place(
    module_runtime: phalanx.Runtime, chunksize: int | None,
) -> None:
    items: list[Any] = list(range(5000))
    bad = [0, 1234, 4095, 4096, 4999]
    for k in bad:
        items[k] = f"item {k}"
    it = module_runtime.options(on_fatal=phalanx.Ignore).map(ops.triple_unless_negative, items,
                                                             chunksize=chunksize, timeout=T)
    assert list(it) == [3 * x for x in items if isinstance(x, int)]
    assert [i for i, _ in it.skipped] == bad
    for _, error in it.skipped:
        assert str(error) == "argument 'x' of triple_unless_negative: expected int, got str"
        assert isinstance(error.__cause__, phalanx.RemoteTraceback)
