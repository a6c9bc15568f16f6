"""The driver's public API end to end: real worker processes, real sockets.

Runs in the test (driver) process; the operations live in ``tests/ops.py``,
which workers import by name. Most tests share one ``module_runtime``
(``Runtime(workers=2)``) and check that it is still healthy afterwards (same
worker pids, no open job); tests that end a runtime get their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime
import functools
import operator
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ops
from marked import processes_marked
import phalanx

TIMEOUT = 30.0

ints = st.integers(min_value=-(2**62), max_value=2**62)
#: small enough that sums of 300 of them still fit in msgpack's int64
summable = st.integers(min_value=-(2**40), max_value=2**40)
chunksizes = st.one_of(st.none(), st.integers(min_value=1, max_value=50))


def _healthy(rt: phalanx.Runtime, pids: dict[str, int]) -> None:
    """The runtime still serves, with the same workers, and no lease is left open."""
    assert rt.submit(ops.square, 12).result(timeout=TIMEOUT) == 144
    assert list(rt.map(ops.inc, range(20), timeout=TIMEOUT)) == list(range(1, 21))
    assert rt.worker_pids() == pids, "a worker died or was replaced"
    stats = rt.stats()
    assert stats.worker_deaths == 0
    deadline = time.monotonic() + 5
    while rt.stats().jobs_open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.stats().jobs_open == 0, "a job (lease) was left open"


@pytest.fixture
def rt(module_runtime: phalanx.Runtime) -> Iterator[phalanx.Runtime]:
    """The shared runtime, checked healthy after the test."""
    pids = module_runtime.worker_pids()
    assert len(pids) == 2
    yield module_runtime
    _healthy(module_runtime, pids)


# --------------------------------------------------------------------------- #
# submit
# --------------------------------------------------------------------------- #


def test_submit_returns_a_concurrent_future(rt: phalanx.Runtime) -> None:
    fut = rt.submit(ops.square, 7)
    assert isinstance(fut, concurrent.futures.Future)
    assert isinstance(fut, phalanx.Future)
    assert fut.result(timeout=TIMEOUT) == 49
    assert fut.done() and fut.exception() is None


def test_submit_by_name(rt: phalanx.Runtime) -> None:
    assert rt.submit("ops:square", 9).result(timeout=TIMEOUT) == 81


def test_submit_kwargs(rt: phalanx.Runtime) -> None:
    assert rt.submit(ops.scaled, 5, factor=3, offset=2).result(timeout=TIMEOUT) == 17
    assert rt.submit(ops.scaled, 5, offset=-1).result(timeout=TIMEOUT) == 4
    assert rt.submit(ops.scaled, x=4, factor=2).result(timeout=TIMEOUT) == 8


def test_many_submits_in_flight(rt: phalanx.Runtime) -> None:
    futs = [rt.submit(ops.square, i) for i in range(300)]
    assert [f.result(timeout=TIMEOUT) for f in futs] == [i * i for i in range(300)]


def test_await_future_in_asyncio(rt: phalanx.Runtime) -> None:
    async def main() -> list[int]:
        one = await rt.submit(ops.square, 3)
        many = await asyncio.gather(*(rt.submit(ops.square, i) for i in range(10)))
        return [one, *many]

    assert asyncio.run(main()) == [9] + [i * i for i in range(10)]


# --------------------------------------------------------------------------- #
# map
# --------------------------------------------------------------------------- #


@given(xs=st.lists(ints, max_size=300), chunksize=chunksizes)
def test_map_equals_builtin_map(rt: phalanx.Runtime, xs: list[int], chunksize: int | None) -> None:
    got = list(rt.map(ops.inc, xs, chunksize=chunksize, timeout=TIMEOUT))
    assert got == [x + 1 for x in xs]


@given(xs=st.lists(ints, max_size=300), chunksize=chunksizes)
def test_map_unordered_same_multiset(
    rt: phalanx.Runtime, xs: list[int], chunksize: int | None
) -> None:
    got = list(rt.map(ops.inc, xs, chunksize=chunksize, ordered=False, timeout=TIMEOUT))
    assert Counter(got) == Counter(x + 1 for x in xs)


@given(
    xs=st.lists(summable, max_size=120),
    ys=st.lists(summable, max_size=120),
    zs=st.lists(summable, max_size=120),
    chunksize=chunksizes,
)
def test_map_several_iterables_zip_like_builtin(
    rt: phalanx.Runtime, xs: list[int], ys: list[int], zs: list[int], chunksize: int | None
) -> None:
    assert list(rt.map(ops.add, xs, ys, chunksize=chunksize, timeout=TIMEOUT)) == list(
        map(operator.add, xs, ys)
    )
    got3 = list(rt.map(ops.add3, xs, iter(ys), (z for z in zs), chunksize=chunksize, timeout=TIMEOUT))
    assert got3 == [a + b + c for a, b, c in zip(xs, ys, zs)]


@given(n=st.integers(min_value=0, max_value=300))
def test_map_over_generator(rt: phalanx.Runtime, n: int) -> None:
    gen = (i * 3 for i in range(n))
    assert list(rt.map(ops.inc, gen, timeout=TIMEOUT)) == [i * 3 + 1 for i in range(n)]


def test_map_long_generator_ramps_chunks(rt: phalanx.Runtime) -> None:
    n = 20_000
    assert sum(rt.map(ops.inc, (i for i in range(n)), timeout=TIMEOUT)) == sum(range(1, n + 1))


def test_map_needs_an_iterable(rt: phalanx.Runtime) -> None:
    with pytest.raises(TypeError):
        rt.map(ops.inc)


# --------------------------------------------------------------------------- #
# fold
# --------------------------------------------------------------------------- #


@given(xs=st.lists(summable, min_size=1, max_size=300), chunksize=chunksizes)
def test_fold_equals_reduce(rt: phalanx.Runtime, xs: list[int], chunksize: int | None) -> None:
    assert rt.fold(ops.add, xs, chunksize=chunksize, timeout=TIMEOUT) == functools.reduce(
        operator.add, xs
    )


@given(xs=st.lists(st.integers(0, 999), min_size=1, max_size=300), chunksize=chunksizes)
def test_fold_keeps_order_of_non_commutative_op(
    rt: phalanx.Runtime, xs: list[int], chunksize: int | None
) -> None:
    lists = [[x] for x in xs]
    assert rt.fold(ops.concat, lists, chunksize=chunksize, timeout=TIMEOUT) == xs
    strings = [f"{x}," for x in xs]
    assert rt.fold(ops.concat, iter(strings), chunksize=chunksize, timeout=TIMEOUT) == "".join(
        strings
    )


@given(xs=st.lists(summable, min_size=1, max_size=300), chunksize=chunksizes)
def test_fold_makes_exactly_n_minus_1_combines(
    rt: phalanx.Runtime, xs: list[int], chunksize: int | None
) -> None:
    leaves = [[x, 0] for x in xs]
    value, combines = rt.fold(ops.counted_add, leaves, chunksize=chunksize, timeout=TIMEOUT)
    assert value == sum(xs)
    assert combines == len(xs) - 1


@given(
    xs=st.lists(summable, min_size=0, max_size=300),
    chunksize=chunksizes,
    init=st.integers(-1000, 1000),
)
def test_fold_with_initial(
    rt: phalanx.Runtime, xs: list[int], chunksize: int | None, init: int
) -> None:
    leaves = [[x, 0] for x in xs]
    got = rt.fold(ops.counted_add, leaves, initial=[init, 0], chunksize=chunksize, timeout=TIMEOUT)
    assert got == [init + sum(xs), len(xs)]
    assert rt.fold(ops.add, xs, initial=init, chunksize=chunksize, timeout=TIMEOUT) == (
        functools.reduce(operator.add, xs, init)
    )
    lists = [[x] for x in xs]
    assert rt.fold(ops.concat, lists, initial=["start"], timeout=TIMEOUT) == ["start", *xs]


def test_fold_empty(rt: phalanx.Runtime) -> None:
    with pytest.raises(TypeError):
        rt.fold(ops.add, [])
    with pytest.raises(TypeError):
        rt.fold(ops.add, iter(()))
    assert rt.fold(ops.add, [], initial=42) == 42
    sentinel = {"k": [1, 2]}
    assert rt.fold(ops.add, iter(()), initial=sentinel) is sentinel


# --------------------------------------------------------------------------- #
# values
# --------------------------------------------------------------------------- #


def test_datetime_round_trip(rt: phalanx.Runtime) -> None:
    naive = datetime.datetime(2024, 2, 28, 13, 14, 15, 123456)
    aware = datetime.datetime(2024, 2, 28, 23, 59, 1, tzinfo=datetime.timezone.utc)
    for d in (naive, aware):
        got = rt.submit(ops.next_day, d).result(timeout=TIMEOUT)
        assert isinstance(got, datetime.datetime)
        assert got == d + datetime.timedelta(days=1)
        assert got.tzinfo == d.tzinfo


def test_uuid_round_trip(rt: phalanx.Runtime) -> None:
    u = uuid.uuid4()
    got = rt.submit(ops.uuid_version, u).result(timeout=TIMEOUT)
    assert isinstance(got, uuid.UUID)
    assert got == uuid.UUID(int=u.int ^ 1)
    assert list(rt.map(ops.uuid_version, [u, got], timeout=TIMEOUT)) == [got, u]


def test_bytes_round_trip(rt: phalanx.Runtime) -> None:
    data = bytes(range(256)) * 4
    got = rt.submit(ops.bytes_reverse, data).result(timeout=TIMEOUT)
    assert isinstance(got, bytes) and got == data[::-1]
    assert rt.submit(ops.identity, b"").result(timeout=TIMEOUT) == b""


def test_nested_containers_round_trip(rt: phalanx.Runtime) -> None:
    value = {
        "a": [1, 2.5, None, True, "x", b"\x00\xff"],
        "b": {"c": {"d": [[], {}, [[1], [2, [3]]]]}},
        "unicode": "Ωµ—🙂",
        "big": 2**63 - 1,
        "neg": -(2**63),
    }
    assert rt.submit(ops.identity, value).result(timeout=TIMEOUT) == value


def test_dataclass_round_trip(rt: phalanx.Runtime) -> None:
    got = rt.submit(ops.move, ops.Point(1, 2, "p"), 10).result(timeout=TIMEOUT)
    assert isinstance(got, ops.Point)
    assert got == ops.Point(11, 2, "p!")
    assert dataclasses.asdict(got) == {"x": 11, "y": 2, "label": "p!"}
    mapped = list(rt.map(ops.move, [ops.Point(0, 0), ops.Point(5, 5)], [1, 2], timeout=TIMEOUT))
    assert mapped == [ops.Point(1, 0, "!"), ops.Point(7, 5, "!")]


def test_struct_round_trip(rt: phalanx.Runtime) -> None:
    when = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    got = rt.submit(ops.grow, ops.Box("box", [1, 2], when), 3).result(timeout=TIMEOUT)
    assert isinstance(got, ops.Box)
    assert got == ops.Box("BOX", [1, 2, 3], when)


# --------------------------------------------------------------------------- #
# lease isolation
# --------------------------------------------------------------------------- #


def test_lease_isolation_many_threads(runtime: phalanx.Runtime) -> None:
    n_threads = 8
    barrier = threading.Barrier(n_threads)
    results: dict[int, list[Any]] = {}
    errors: list[BaseException] = []

    def client(t: int) -> None:
        try:
            barrier.wait(timeout=TIMEOUT)
            mine: list[Any] = []
            for round_ in range(3):
                futs = [runtime.submit(ops.tag, t, i) for i in range(25)]
                mine.append([f.result(timeout=TIMEOUT) for f in futs])
                mine.append(list(runtime.map(ops.tag, [t] * 150, range(150), timeout=TIMEOUT)))
                mine.append(
                    sorted(
                        runtime.map(
                            ops.tag, [t] * 60, range(60), ordered=False, chunksize=1 + round_,
                            timeout=TIMEOUT,
                        )
                    )
                )
                mine.append(runtime.fold(ops.add, [t * 1000 + i for i in range(40)], timeout=TIMEOUT))
            results[t] = mine
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=2 * TIMEOUT)
    assert not any(th.is_alive() for th in threads), "a client thread hung"
    assert not errors, errors

    for t in range(n_threads):
        expected: list[Any] = []
        for _ in range(3):
            expected.append([[t, i, t * 1_000_000 + i] for i in range(25)])
            expected.append([[t, i, t * 1_000_000 + i] for i in range(150)])
            expected.append([[t, i, t * 1_000_000 + i] for i in range(60)])
            expected.append(sum(t * 1000 + i for i in range(40)))
        assert results[t] == expected, f"thread {t} got someone else's results"

    stats = runtime.stats()
    assert stats.duplicates_dropped == 0
    assert stats.late_results_dropped == 0
    assert stats.frames_dropped == 0
    assert stats.tasks_failed == 0
    assert stats.redelivered == 0
    assert stats.tasks_completed == stats.tasks_submitted
    assert stats.jobs_open == 0


# --------------------------------------------------------------------------- #
# errors: each leaves the runtime serving with the same workers
# --------------------------------------------------------------------------- #


def _raises(fut: concurrent.futures.Future[Any], exc_type: type[BaseException]) -> BaseException:
    with pytest.raises(exc_type) as info:
        fut.result(timeout=TIMEOUT)
    return info.value


def test_unknown_operation_name(rt: phalanx.Runtime) -> None:
    err = _raises(rt.submit("ops:nope", 1), phalanx.UnknownOperationError)
    assert isinstance(err, LookupError)
    assert "ops:nope" in str(err)
    # map and fold report it the same way (one chunk: see
    # test_ordered_map_error_while_earlier_items_still_run for several)
    with pytest.raises(phalanx.UnknownOperationError, match="ops:nope"):
        list(rt.map("ops:nope", [1, 2, 3], chunksize=3, timeout=TIMEOUT))
    with pytest.raises(phalanx.UnknownOperationError, match="ops:nope"):
        list(rt.map("ops:nope", [1, 2, 3], chunksize=1, ordered=False, timeout=TIMEOUT))
    with pytest.raises(phalanx.UnknownOperationError, match="ops:nope"):
        rt.fold("ops:nope", [1, 2, 3], timeout=TIMEOUT)


def test_operation_name_without_colon(rt: phalanx.Runtime) -> None:
    with pytest.raises(phalanx.UnknownOperationError, match="nope"):
        rt.submit("nope", 1)


def test_module_failing_to_import(rt: phalanx.Runtime) -> None:
    err = _raises(rt.submit("broken_mod:f", 1), phalanx.UnknownOperationError)
    text = str(err)
    assert "broken_mod:f" in text
    assert "import" in text
    assert "broken_mod fails at import on purpose" in text
    assert "broken_mod" not in sys.modules  # the driver never imported it


@pytest.mark.parametrize(
    ("name", "reason_part"),
    [("ops:nope", "no such function"), ("broken_mod:f", "failed to import")],
)
def test_unknown_operation_error_keeps_name_and_reason(
    rt: phalanx.Runtime, name: str, reason_part: str
) -> None:
    """The rebuilt error has the same fields as the worker's, not a re-wrapped text."""
    err = _raises(rt.submit(name, 1), phalanx.UnknownOperationError)
    assert isinstance(err, phalanx.UnknownOperationError)
    assert err.name == name
    assert reason_part in err.reason
    assert str(err) == f"unknown operation {name!r}: {err.reason}"


def test_not_an_operation_is_a_type_error(rt: phalanx.Runtime) -> None:
    before = rt.stats().tasks_submitted
    with pytest.raises(TypeError, match="not_an_operation"):
        rt.submit(ops.not_an_operation, 1)
    with pytest.raises(TypeError, match="not_an_operation"):
        rt.map(ops.not_an_operation, [1])
    with pytest.raises(TypeError, match="not_an_operation"):
        rt.fold(ops.not_an_operation, [1, 2])
    assert rt.stats().tasks_submitted == before


def test_local_function_cannot_be_an_operation() -> None:
    with pytest.raises(TypeError, match="inside a function"):

        @phalanx.operation
        def local(x: int) -> int:
            return x


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda rt: rt.submit(ops.identity, object()), id="object-arg"),
        pytest.param(lambda rt: rt.submit(ops.identity, lambda: 1), id="lambda-arg"),
        pytest.param(lambda rt: rt.submit(ops.scaled, 1, factor=object()), id="object-kwarg"),
        pytest.param(lambda rt: rt.submit(ops.identity, [1, {"a": [2, 3j]}]), id="nested-complex"),
        pytest.param(lambda rt: rt.map(ops.identity, [1, object()]), id="map-item"),
        pytest.param(lambda rt: rt.fold(ops.add, [object(), object()]), id="fold-item"),
    ],
)
def test_unencodable_argument_raises_at_call_and_sends_nothing(
    rt: phalanx.Runtime, call: Callable[[phalanx.Runtime], Any]
) -> None:
    before = rt.stats()
    with pytest.raises(phalanx.EncodeError) as info:
        call(rt)
    assert isinstance(info.value, TypeError)
    after = rt.stats()
    assert after.tasks_submitted == before.tasks_submitted
    assert after.jobs_open == 0


def test_op_raising_value_error(rt: phalanx.Runtime) -> None:
    err = _raises(rt.submit(ops.boom_value_error), ValueError)
    assert type(err) is ValueError
    assert str(err) == "boom"
    cause = err.__cause__
    assert isinstance(cause, phalanx.RemoteTraceback)
    assert "boom" in str(cause)
    assert "boom_value_error" in str(cause)
    assert "ValueError" in cause.tb


def test_custom_exception_rebuilt_as_its_class(rt: phalanx.Runtime) -> None:
    err = _raises(rt.submit(ops.raise_custom, "custom text"), ops.CustomError)
    assert type(err) is ops.CustomError
    assert err.args == ("custom text",)
    assert isinstance(err.__cause__, phalanx.RemoteTraceback)
    assert "raise_custom" in str(err.__cause__)


def test_unbuildable_exception_becomes_remote_error(rt: phalanx.Runtime) -> None:
    err = _raises(rt.submit(ops.raise_two_arg), phalanx.RemoteError)
    assert isinstance(err, phalanx.RemoteError)
    assert err.type_name == "ops:TwoArgError"
    assert err.message == "left/right"
    assert "raise_two_arg" in err.remote_traceback
    assert isinstance(err.__cause__, phalanx.RemoteTraceback)


def test_unencodable_result(rt: phalanx.Runtime) -> None:
    err = _raises(rt.submit(ops.return_unencodable), phalanx.EncodeError)
    assert isinstance(err, TypeError)
    assert "return_unencodable" in str(err)
    # the other outcomes of a batch are not lost with it
    futs = [rt.submit(ops.square, i) for i in range(50)]
    bad = rt.submit(ops.return_unencodable)
    futs += [rt.submit(ops.square, i) for i in range(50, 100)]
    _raises(bad, phalanx.EncodeError)
    assert [f.result(timeout=TIMEOUT) for f in futs] == [i * i for i in range(100)]


def test_wrong_argument_type_is_validation_error(rt: phalanx.Runtime) -> None:
    err = _raises(rt.submit(ops.typed_int, "not an int"), phalanx.ValidationError)
    assert isinstance(err, TypeError)
    assert "typed_int" in str(err)
    _raises(rt.submit(ops.move, {"x": "a", "y": 2}, 1), phalanx.ValidationError)
    _raises(rt.submit(ops.uuid_version, "not-a-uuid"), phalanx.ValidationError)


def test_sys_exit_in_op_fails_its_task_with_system_exit(rt: phalanx.Runtime) -> None:
    """A worker never exits because user code raised SystemExit; the task fails with
    that SystemExit (as under ProcessPoolExecutor), carrying the remote traceback."""
    err = _raises(rt.submit(ops.call_sys_exit, 3), SystemExit)
    assert type(err) is SystemExit and err.code == 3
    assert isinstance(err.__cause__, phalanx.RemoteTraceback)
    assert "call_sys_exit" in str(err.__cause__)
    # several in a row, in a map, on both workers
    with pytest.raises(SystemExit):
        list(rt.map(ops.call_sys_exit, [0, 1, 2, 3], chunksize=4, timeout=TIMEOUT))
    with pytest.raises(SystemExit):
        list(rt.map(ops.call_sys_exit, [0, 1, 2, 3], chunksize=1, ordered=False, timeout=TIMEOUT))
    futs = [rt.submit(ops.call_sys_exit, i) for i in range(6)]
    for f in futs:
        _raises(f, SystemExit)
    assert rt.stats().worker_deaths == 0


# --------------------------------------------------------------------------- #
# map errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("k", [0, 1, 7, 99])
@pytest.mark.parametrize("chunksize", [None, 1, 3])
def test_ordered_map_raises_at_failing_position(
    rt: phalanx.Runtime, k: int, chunksize: int | None
) -> None:
    n = 100
    it = rt.map(ops.fail_at, range(n), [k] * n, chunksize=chunksize, timeout=5)
    got: list[int] = []
    with pytest.raises(ValueError, match=f"fail at {k}") as info:
        for value in it:
            got.append(value)
    assert got == [x * 10 for x in range(k)]
    assert isinstance(info.value.__cause__, phalanx.RemoteTraceback)
    with pytest.raises(StopIteration):
        next(it)


def test_ordered_map_error_while_earlier_items_still_run(rt: phalanx.Runtime) -> None:
    """Item 1 fails at once while item 0 still runs on the other worker:
    item 0 must still be yielded first, then the error (no lost results, no hang)."""
    n = 6
    it = rt.map(ops.slow_fail_at, range(n), [1] * n, [0.5] * n, chunksize=1, timeout=5)
    got: list[int] = []
    with pytest.raises(ValueError, match="fail at 1"):
        for value in it:
            got.append(value)
    assert got == [0]


def test_map_error_cancels_remaining_tasks(rt: phalanx.Runtime, tmp_path: Path) -> None:
    n, k, delay = 200, 5, 0.3
    it = rt.map(
        ops.record_then_fail, range(n), [k] * n, [str(tmp_path)] * n, [delay] * n,
        chunksize=1, timeout=TIMEOUT,
    )
    got: list[int] = []
    with pytest.raises(ValueError, match=f"fail at {k}"):
        for value in it:
            got.append(value)
    assert got == list(range(k))
    time.sleep(6 * delay)  # without cancellation, ~6 more items per worker would run by now
    executed = sorted(int(p.name) for p in tmp_path.iterdir())
    # items 0..k, plus at most what each worker started before Terminate reached it
    assert len(executed) <= k + 1 + 4, executed
    assert rt.stats().jobs_open == 0


def test_unordered_map_error(rt: phalanx.Runtime) -> None:
    n, k = 100, 37
    got: list[int] = []
    with pytest.raises(ValueError, match=f"fail at {k}"):
        for value in rt.map(ops.fail_at, range(n), [k] * n, ordered=False, chunksize=2, timeout=TIMEOUT):
            got.append(value)
    assert set(got) <= {x * 10 for x in range(n) if x != k}
    assert len(got) == len(set(got))


def test_map_closed_early_cancels_job(rt: phalanx.Runtime) -> None:
    it = rt.map(ops.inc, range(10_000), chunksize=10, timeout=TIMEOUT)
    assert next(it) == 1
    it.close()
    with pytest.raises(StopIteration):
        next(it)
    assert rt.stats().jobs_open == 0


def test_map_timeout(rt: phalanx.Runtime) -> None:
    it = rt.map(ops.sleep_then, [1, 2], [1.0, 1.0], chunksize=1, timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(phalanx.TaskTimeoutError):
        list(it)
    assert time.monotonic() - t0 < 0.9


def test_fold_error_propagates(rt: phalanx.Runtime) -> None:
    with pytest.raises(ValueError, match="boom"):
        rt.fold(ops.boom_value_error, [1, 2, 3, 4], timeout=TIMEOUT)


# --------------------------------------------------------------------------- #
# shutdown
# --------------------------------------------------------------------------- #


def _ipc_dir(rt: phalanx.Runtime) -> Path:
    tasks = rt.endpoints[0]
    assert tasks.startswith("ipc://")
    return Path(tasks[len("ipc://"):]).parent


def _gone(pids: list[int], within: float = 3.0) -> list[int]:
    deadline = time.monotonic() + within
    while True:
        alive = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_shutdown(runtime: phalanx.Runtime) -> None:
    pids = list(runtime.worker_pids().values())
    assert len(pids) == 2
    ipc = _ipc_dir(runtime)
    assert ipc.is_dir()
    assert runtime.submit(ops.square, 2).result(timeout=TIMEOUT) == 4

    runtime.shutdown()

    with pytest.raises(phalanx.RuntimeClosedError) as info:
        runtime.submit(ops.square, 2)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(phalanx.RuntimeClosedError):
        runtime.map(ops.square, [1, 2])
    with pytest.raises(phalanx.RuntimeClosedError):
        runtime.fold(ops.add, [1, 2])
    assert not ipc.exists()
    assert _gone(pids) == []
    assert not [p for p in psutil.Process().children(recursive=True) if p.pid in pids]
    # idempotent, in every form
    runtime.shutdown()
    runtime.shutdown(wait=False)
    with runtime:
        pass


def test_no_live_workers_reported_after_shutdown(runtime: phalanx.Runtime) -> None:
    """``worker_pids()``/``n_workers`` list *live* workers: none after shutdown."""
    pids = list(runtime.worker_pids().values())
    runtime.shutdown()
    assert _gone(pids) == []
    assert runtime.worker_pids() == {}
    assert runtime.n_workers == 0


def test_shutdown_fails_open_jobs() -> None:
    rt = phalanx.Runtime(workers=1)
    try:
        futs = [rt.submit(ops.sleep_then, i, 0.5) for i in range(4)]
        it = rt.map(ops.sleep_then, range(4), [0.5] * 4, chunksize=1)
    finally:
        rt.shutdown(wait=False)
    for f in futs:
        with pytest.raises(phalanx.RuntimeClosedError):
            f.result(timeout=TIMEOUT)
    with pytest.raises(phalanx.RuntimeClosedError):
        list(it)


def test_shutdown_waits_for_queued_work() -> None:
    rt = phalanx.Runtime(workers=2)
    futs = [rt.submit(ops.sleep_then, i, 0.05) for i in range(20)]
    rt.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futs] == list(range(20))


# --------------------------------------------------------------------------- #
# __main__ scripts
# --------------------------------------------------------------------------- #

GUARDED = """
import phalanx

@phalanx.operation
def cube(x: int) -> int:
    return x ** 3

@phalanx.operation
def plus(a: int, b: int) -> int:
    return a + b

if __name__ == "__main__":
    with phalanx.Runtime(workers=2, start_method=START_METHOD) as rt:
        print("submit", rt.submit(cube, 3).result(timeout=30))
        print("map", list(rt.map(cube, range(5), timeout=30)))
        print("fold", rt.fold(plus, range(1, 101), timeout=30))
"""

# Under spawn, each worker re-imports the main script (as ``__mp_main__``):
# without the guard that import starts a Runtime inside the worker.
UNGUARDED = """
import phalanx

@phalanx.operation
def cube(x: int) -> int:
    return x ** 3

rt = phalanx.Runtime(workers=2, start_timeout=30, start_method="spawn")
print("submit", rt.submit(cube, 3).result(timeout=30))
rt.shutdown()
"""


def _processes_with_marker(marker: str) -> list[psutil.Process]:
    return processes_marked("PHALANX_TEST_MARKER", marker)


def _run_script(tmp_path: Path, source: str) -> tuple[subprocess.CompletedProcess[str], str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    marker = uuid.uuid4().hex
    env = {**os.environ, "PHALANX_TEST_MARKER": marker}
    for name in ("PHALANX_WORKERS", "PHALANX_START_METHOD"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    return proc, marker


def _assert_no_marked_processes(marker: str) -> None:
    deadline = time.monotonic() + 3.0
    left = _processes_with_marker(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _processes_with_marker(marker)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    assert not left, f"processes left behind: {[p.pid for p in left]}"


@pytest.mark.parametrize("start_method", [None, "phalanx", "spawn", "forkserver", "fork"])
def test_operation_defined_in_main_script(tmp_path: Path, start_method: str | None) -> None:
    proc, marker = _run_script(tmp_path, f"START_METHOD = {start_method!r}\n" + GUARDED)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["submit 27", "map [0, 1, 8, 27, 64]", "fold 5050"]
    _assert_no_marked_processes(marker)


def test_runtime_without_main_guard_fails_clearly(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc, marker = _run_script(tmp_path, UNGUARDED)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "submit" not in proc.stdout
    assert "WorkerStartError" in proc.stderr
    assert 'if __name__ == "__main__":' in proc.stderr
    assert elapsed < 30, f"took {elapsed:.1f} s to fail"
    _assert_no_marked_processes(marker)


FAILED_START = """
import gc, os, signal, threading, time

import psutil

import phalanx
from phalanx.transport import shm
from phalanx.transport.endpoints import adverts


def slow_start():
    time.sleep(2.0)  # in the fork server and every worker: no worker is ready for 2 s


def main():
    os.register_at_fork(after_in_child=slow_start)
    if MODE == "interrupt":
        main_thread, me = threading.get_ident(), psutil.Process()

        def interrupt():
            while not me.children():  # the fork server exists: the constructor is past the fork
                time.sleep(0.002)
            time.sleep(0.05)
            signal.pthread_kill(main_thread, signal.SIGINT)

        threading.Thread(target=interrupt, daemon=True).start()
    try:
        phalanx.Runtime(workers=2, start_timeout=0.5 if MODE == "timeout" else 30, shutdown_timeout=0.5)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    except phalanx.WorkerStartError as exc:
        print("failed:", exc, flush=True)
    gc.collect()
    print("runtimes", sum(1 for o in gc.get_objects() if type(o) is phalanx.Runtime), flush=True)
    print("shm runtimes", len(shm._runtimes), flush=True)
    mine = [d for d, info, _ in adverts() if info.get("pid") == os.getpid()]
    print("runtime.json", len(mine), flush=True)
    deadline = time.monotonic() + 5.0
    while psutil.Process().children(recursive=True) and time.monotonic() < deadline:
        time.sleep(0.02)
    print("children", len(psutil.Process().children(recursive=True)), flush=True)


if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("mode", ["timeout", "interrupt"])
def test_a_start_that_times_out_or_is_interrupted_leaves_nothing(tmp_path: Path, mode: str) -> None:
    """The constructor builds most of the runtime while its first workers start (after the fork
    server's fork): a start that passes ``start_timeout``, or a KeyboardInterrupt while it waits,
    undoes all of it: no process, no runtime.json, no shared-memory user, and the half-built
    runtime is collected."""
    proc, marker = _run_script(tmp_path, f"MODE = {mode!r}\n" + FAILED_START)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    if mode == "timeout":
        assert lines[0] == "failed: only 0 of 2 workers connected within 0.5 s", proc.stdout
    else:
        assert lines[0] == "interrupted", proc.stdout
    assert lines[1:] == ["runtimes 0", "shm runtimes 0", "runtime.json 0",
                         "children 0"], proc.stdout + proc.stderr
    _assert_no_marked_processes(marker)


INTERRUPTED_START = """
import gc, os, sys, threading, time

import psutil

import phalanx
from phalanx.transport import shm
from phalanx.transport.endpoints import adverts


def phalanx_calls(on_call):
    me = os.getpid()

    def tracer(frame, event, arg):
        if event == "call" and os.getpid() == me and os.sep + "phalanx" + os.sep in frame.f_code.co_filename:
            on_call(frame)
        return None

    return tracer


def leftovers():
    deadline = time.monotonic() + 3.0
    while True:
        gc.collect()
        left = [f"process {p.pid}" for p in psutil.Process().children(recursive=True)]
        left += [f"thread {t.name}" for t in threading.enumerate() if t.name.startswith("phalanx-")]
        left += ["a shared-memory user"] if shm._runtimes else []
        left += ["a runtime"] if any(type(o) is phalanx.Runtime for o in gc.get_objects()) else []
        fds = len(os.listdir("/proc/self/fd"))
        left += [f"{fds - base_fds} descriptors"] if fds > base_fds else []
        left += [d for d, info, _ in adverts() if info.get("pid") == os.getpid()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def main():
    global base_fds
    phalanx.Runtime(workers=2).shutdown()  # imports and first-time set-up done: the calls below are the start's
    gc.collect()
    base_fds = len(os.listdir("/proc/self/fd"))
    calls = 0

    def count(frame):
        nonlocal calls
        calls += 1

    sys.settrace(phalanx_calls(count))
    rt = phalanx.Runtime(workers=2)
    sys.settrace(None)
    rt.shutdown()
    del rt
    step = max(1, calls // 200)  # every call (about 140)
    print("calls", calls, flush=True)
    for n in range(1, calls, step):
        seen = 0
        where = ""

        def interrupt(frame):  # a KeyboardInterrupt as the n-th call of phalanx code starts
            nonlocal seen, where
            seen += 1
            if seen == n:
                sys.settrace(None)
                where = f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)})"
                raise KeyboardInterrupt

        sys.settrace(phalanx_calls(interrupt))
        try:
            phalanx.Runtime(workers=2).shutdown()
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        left = leftovers()
        if left:
            print(f"interrupted at call {n}, {where}: left {left}", flush=True)
            for p in psutil.Process().children(recursive=True):
                p.kill()
            return
    print("nothing left", flush=True)


if __name__ == "__main__":
    main()
"""


def test_a_keyboard_interrupt_anywhere_in_the_constructor_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C may land at any call of the constructor, before the fork server's fork, after it
    (while the driver is built around the workers being forked) or in the wait for them: each time
    no process, thread of the runtime, descriptor, runtime.json or shared-memory user is left, and the half-built
    runtime is collected. Interrupts land as each call of phalanx's code starts (sys.settrace), at
    every call (one landing just as a forked worker's pidfd had been received left it open)."""
    proc, marker = _run_script(tmp_path, INTERRUPTED_START)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("calls ") and int(lines[0].split()[1]) > 50, proc.stdout
    assert lines[1:] == ["nothing left"], proc.stdout
    _assert_no_marked_processes(marker)



INTERRUPTED_RETURN = """
import os, signal, sys
import psutil
import phalanx

real = getattr(os, sys.argv[1])
pid = os.getpid()

def interrupted(*args):
    made = real(*args)
    if made != 0 and os.getpid() == pid:  # the driver's call, a descriptor or process made
        signal.raise_signal(signal.SIGINT)
    return made

if __name__ == "__main__":
    phalanx.Runtime  # imported before the descriptors are counted
    before = set(os.listdir("/proc/self/fd"))
    setattr(os, sys.argv[1], interrupted)
    try:
        phalanx.Runtime(workers=1)
        print("not interrupted")
    except KeyboardInterrupt:
        pass
    setattr(os, sys.argv[1], real)
    print("children", [(p.pid, p.status()) for p in psutil.Process().children(recursive=True)])
    print("descriptors", sorted(set(os.listdir("/proc/self/fd")) - before))
"""


@pytest.mark.parametrize("call", ["fork", "pipe"])
def test_a_keyboard_interrupt_as_the_constructor_makes_a_process_or_pipe_leaves_nothing(
        tmp_path: Path, call: str) -> None:
    """Ctrl-C lands the moment ``os.fork()`` (the fork server's) or ``os.pipe()`` (the driver's
    wake-up pipe) returned, before the constructor stored what it made (a real SIGINT during
    the call lands there): no process is left, not even a zombie, and no descriptor."""
    script = tmp_path / "script.py"
    script.write_text(INTERRUPTED_RETURN)
    marker = uuid.uuid4().hex
    proc = subprocess.run([sys.executable, str(script), call], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PHALANX_TEST_MARKER": marker})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["children []", "descriptors []"], proc.stdout + proc.stderr
    _assert_no_marked_processes(marker)


LOADED = """
import sys
import phalanx

@phalanx.operation
def loaded(x: int) -> list[str]:
    return sorted(m for m in ("asyncio", "ssl") if m in sys.modules)
"""

LATER = """
@phalanx.operation
async def later(x: int) -> int:
    return x * 2
"""

RUN = """
if __name__ == "__main__":
    with phalanx.Runtime(workers=1) as rt:
        print("worker", rt.submit(loaded, 0).result(timeout=30))
        print("driver", loaded(0))
        if "later" in globals():
            print("async", rt.submit(later, 4).result(timeout=30))
"""


@pytest.mark.parametrize("async_op", [False, True], ids=["plain", "async-op"])
def test_a_runtime_imports_asyncio_only_for_async_operations(tmp_path: Path, async_op: bool) -> None:
    """Every module the driver holds is copied into the fork server and each worker (page
    tables, and the pages a process writes): a runtime without async operations never imports
    asyncio (nor ssl, which it brings). An ``async def`` operation imports it where it is
    registered, so its workers have it from their fork, not from their first call."""
    proc, marker = _run_script(tmp_path, LOADED + (LATER if async_op else "") + RUN)
    assert proc.returncode == 0, proc.stderr
    both = "['asyncio', 'ssl']" if async_op else "[]"
    assert proc.stdout.splitlines() == [f"worker {both}", f"driver {both}", *(["async 8"] if async_op else [])], \
        proc.stdout
    _assert_no_marked_processes(marker)


def test_the_runtimes_ipc_directory_is_private_and_removed_at_shutdown() -> None:
    """Local sockets live in a fresh directory only this user can enter (mode 0700, made
    without a name another runtime holds), gone after shutdown."""
    import stat

    from phalanx.transport.endpoints import local_endpoints

    made = [local_endpoints() for _ in range(20)]
    try:
        dirs = [Path(e.ipc_dir) for e in made]
        assert len(set(dirs)) == 20
        for d in dirs:
            assert d.is_dir() and stat.S_IMODE(d.stat().st_mode) == 0o700 and d.stat().st_uid == os.getuid()
    finally:
        for e in made:
            e.remove()
    with phalanx.Runtime(workers=1) as rt:
        d = Path(rt._driver.endpoints.ipc_dir)
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert rt.submit(ops.square, 3).result(timeout=30) == 9
    assert not d.exists()
