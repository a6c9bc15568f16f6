"""Directives (``phalanx.Literal``, ``IndexedStream``, ``.map``, ``.fold``), monoids and job handles.

Runs in the test (driver) process against real worker processes: one
``Runtime(workers=2)`` for the module (``module_runtime``), checked healthy
after each test. The operations live in ``tests/directive_ops.py``. No
assertion depends on timing: where order matters, an operation waits for a
file the test creates (or for its abort flag), always with a bound.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import directive_ops as d
import phalanx
from phalanx import IndexedStream, Literal
from phalanx.transport import messages
from phalanx.transport.codec import decode_inbox, encode

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 30.0


def _eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _exists(path: Path) -> Callable[[], bool]:
    return path.exists


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


@pytest.fixture
def rt(module_runtime: phalanx.Runtime) -> Iterator[phalanx.Runtime]:
    """The shared runtime, checked healthy (same workers, serving, no job left open) after the test."""
    pids = module_runtime.worker_pids()
    yield module_runtime
    assert module_runtime.run(Literal(range(5)).map(d.inc)).result(timeout=TIMEOUT) == [1, 2, 3, 4, 5]
    assert module_runtime.worker_pids() == pids, "a worker died or was replaced"
    _eventually(lambda: module_runtime.stats().jobs_open == 0, "every job to be closed", 10.0)


# --------------------------------------------------------------------------- #
# rt.run(chain) == chain.evaluate()
# --------------------------------------------------------------------------- #

MAPS = [d.inc, d.double, d.negate, d.square_mod]


@st.composite
def chains(draw: st.DrawFn) -> tuple[Callable[[Any], phalanx.Directive[Any]], list[Any], str]:
    """A way to build a chain from its items (called twice: a lazy source is read once), the items, the kind."""
    items: list[Any] = draw(st.lists(st.integers(-1000, 1000), max_size=40))
    maps = draw(st.lists(st.sampled_from(MAPS), max_size=3))
    source: Any = draw(st.sampled_from([Literal, IndexedStream]))
    ending = draw(st.sampled_from(["map", "text", "list", "raw"]))
    lazy = draw(st.booleans())
    if ending == "raw":  # a fold with no map stage at all
        items = [f"{x}:" for x in items]
        maps = []

    def build(xs: list[Any]) -> phalanx.Directive[Any]:
        chain = source(iter(xs) if lazy else xs)
        for op in maps:
            chain = chain.map(op)
        if ending == "text":
            return chain.map(d.as_text).fold(d.concat)  # type: ignore[no-any-return]
        if ending == "list":
            return chain.map(d.as_list).fold(d.concat_lists)  # type: ignore[no-any-return]
        if ending == "raw":
            return chain.fold(d.concat)  # type: ignore[no-any-return]
        return chain  # type: ignore[no-any-return]

    return build, items, ending


@settings(max_examples=25, deadline=None)
@given(chain=chains(), chunksize=st.sampled_from([None, 1, 2, 3, 7]))
def test_run_equals_serial_evaluation(
    rt: phalanx.Runtime, chain: tuple[Callable[[Any], phalanx.Directive[Any]], list[Any], str], chunksize: int | None
) -> None:
    build, items, ending = chain
    expected = build(items).evaluate()
    handle = rt.run(build(items), chunksize=chunksize, timeout=TIMEOUT)  # type: ignore[call-overload]
    assert handle.result(timeout=TIMEOUT) == expected
    assert handle.progress == phalanx.JobProgress(len(items), len(items), True)
    if ending == "map":  # iterating gives the same, in input order or as (index, value) pairs
        again = list(rt.run(build(items), chunksize=chunksize))  # type: ignore[call-overload]
        if isinstance(build([]), phalanx.IndexedChain):
            assert sorted(again) == list(enumerate(expected))
        else:
            assert again == expected


def test_directives_are_immutable_values() -> None:
    base = Literal([1, 2, 3])
    mapped = base.map(d.inc)
    folded = mapped.map(d.as_text).fold(d.concat)
    assert base.stages == () and mapped.stages == (d.inc,)
    assert base.evaluate() == [1, 2, 3] and mapped.evaluate() == [2, 3, 4]
    assert folded.evaluate() == "2;3;4;"
    assert folded.monoid is d.concat
    with pytest.raises(AttributeError):
        base._items = []  # type: ignore[misc]
    assert repr(folded) == "Literal([1, 2, 3]).map(directive_ops:inc).map(directive_ops:as_text).fold(directive_ops:concat)"
    assert repr(IndexedStream("ab").map(d.length)) == "IndexedStream('ab').map(directive_ops:length)"


def test_literal_without_stages_returns_its_items(rt: phalanx.Runtime) -> None:
    assert rt.run(Literal(iter(range(3000)))).result(timeout=TIMEOUT) == list(range(3000))
    assert list(rt.run(IndexedStream("abc"))) == [(0, "a"), (1, "b"), (2, "c")]


def test_a_lazy_source_is_read_as_the_job_runs(rt: phalanx.Runtime) -> None:
    read: list[int] = []

    def source() -> Iterator[int]:
        for i in range(100_000):
            read.append(i)
            yield i

    handle = rt.run(Literal(source()).map(d.inc), chunksize=10)
    first = next(iter(handle))
    assert first == 1
    assert len(read) < 100_000, "the whole input was read before the first result"
    handle.cancel()


# --------------------------------------------------------------------------- #
# Monoids: empty input, n-1 combines
# --------------------------------------------------------------------------- #


def test_fold_of_empty_input_gives_empty(rt: phalanx.Runtime) -> None:
    assert rt.run(Literal([]).map(d.as_text).fold(d.concat)).result(timeout=TIMEOUT) == ""
    assert rt.run(IndexedStream(iter([])).map(d.as_list).fold(d.concat_lists)).result(timeout=TIMEOUT) == []
    assert rt.run(Literal([]).fold(d.concat_immutable_empty)).result(timeout=TIMEOUT) == ""
    assert rt.run(Literal([]).map(d.make_record).fold(d.merge_records)).result(timeout=TIMEOUT) == d.Record("", 0)
    assert rt.fold(d.concat, []) == ""
    first = rt.fold(d.concat_lists, [])
    first.append(1)
    assert rt.fold(d.concat_lists, []) == [], "empty() must build a fresh value each time"
    assert rt.fold(d.concat, [], initial="x") == "x"
    assert Literal([]).map(d.as_text).fold(d.concat).evaluate() == ""
    assert list(rt.run(Literal([]).fold(d.concat))) == [""]


def test_fold_of_empty_input_without_empty_raises_type_error(rt: phalanx.Runtime) -> None:
    with pytest.raises(TypeError):
        rt.fold(d.concat_plain, [])
    with pytest.raises(TypeError):
        rt.run(Literal([]).map(d.as_text).fold(d.concat_plain)).result(timeout=TIMEOUT)
    with pytest.raises(TypeError):
        Literal([]).fold(d.concat_plain).evaluate()
    assert rt.fold(d.concat_plain, ["a", "b"]) == "ab"


def test_empty_must_be_a_factory_or_immutable() -> None:
    with pytest.raises(TypeError, match="immutable"):
        phalanx.operation(empty=[])
    with pytest.raises(TypeError, match="immutable"):
        phalanx.operation(empty={})
    with pytest.raises(TypeError, match="two positional arguments"):
        phalanx.operation(empty=0)(d.inc)
    phalanx.operation(empty=())  # immutable values are fine (not applied here)
    phalanx.operation(empty=frozenset())


@pytest.mark.parametrize("chunksize", [None, 1, 2, 3, 5])
def test_combine_count_is_n_minus_1(rt: phalanx.Runtime, tmp_path: Path, chunksize: int | None) -> None:
    """Each combine appends a byte to a per-run file and adds one to the count it carries."""
    for n in range(0, 26):
        log = tmp_path / f"combines-{n}"
        items = [[str(log), i] for i in range(n)]
        expected_text = "".join(f"{i}," for i in range(n))
        chain = Literal(items).map(d.tagged).fold(d.counted_concat)
        got = rt.run(chain, chunksize=chunksize).result(timeout=TIMEOUT)
        if n == 0:
            assert got == ["", "", 0]
            assert not log.exists()
            continue
        assert got == [str(log), expected_text, n - 1], n
        assert _size(log) == n - 1, f"{_size(log)} combines ran for {n} items"
        # The plain fold (no stage) makes n-1 calls too.
        log2 = tmp_path / f"plain-{n}"
        leaves = [[str(log2), f"{i},", 0] for i in range(n)]
        assert rt.fold(d.counted_concat, leaves, chunksize=chunksize) == [str(log2), expected_text, n - 1]
        assert _size(log2) == n - 1


# --------------------------------------------------------------------------- #
# Types
# --------------------------------------------------------------------------- #


def test_input_type_mismatch_is_a_validation_error_naming_the_field(rt: phalanx.Runtime) -> None:
    good = {"name": "a", "count": 1}
    bad = {"name": "b", "count": "many"}
    for chain in (
        Literal([good, bad]).map(d.record_count),
        IndexedStream([good, bad]).map(d.record_count).map(d.inc),
        Literal([good, good, bad]).map(d.record_count).map(d.as_text).fold(d.concat),
    ):
        with pytest.raises(phalanx.ValidationError) as info:
            rt.run(chain, chunksize=1).result(timeout=TIMEOUT)  # type: ignore[call-overload]
        assert "$.count" in str(info.value) and "record_count" in str(info.value) and "'rec'" in str(info.value)
        assert isinstance(info.value.__cause__, phalanx.RemoteTraceback)
    with pytest.raises(phalanx.ValidationError, match=r"\$\.count"):
        list(rt.map(d.record_count, [bad]))
    # and the runtime keeps serving
    assert rt.run(Literal([good]).map(d.record_count)).result(timeout=TIMEOUT) == [1]


def test_output_type_mismatch_is_a_validation_error_naming_the_field(rt: phalanx.Runtime) -> None:
    for chain in (
        Literal([1, 2]).map(d.bad_record),
        Literal([1, 2]).map(d.inc).map(d.bad_record),
        IndexedStream([1]).map(d.bad_record),
    ):
        with pytest.raises(phalanx.ValidationError) as info:
            rt.run(chain).result(timeout=TIMEOUT)  # type: ignore[call-overload]
        assert "$.count" in str(info.value) and "bad_record" in str(info.value)
    # map: the error comes at its position; the results before it are yielded first.
    got: list[Any] = []
    with pytest.raises(phalanx.ValidationError, match=r"result of bad_record: expected .* at `\$\.count`"):
        for value in rt.map(d.bad_record, [1, 2, 3], chunksize=1):
            got.append(value)
    assert got == []
    with pytest.raises(phalanx.ValidationError, match=r"\$\.count"):
        rt.submit(d.bad_record, 1).result(timeout=TIMEOUT)
    # Structs travel and convert both ways
    assert rt.run(Literal(range(4)).map(d.make_record)).result(timeout=TIMEOUT) == [d.Record(f"r{i}", i) for i in range(4)]
    assert rt.run(Literal(range(4)).map(d.make_record).fold(d.merge_records), chunksize=2).result(
        timeout=TIMEOUT) == d.Record("r0r1r2r3", 6)


def test_chains_are_type_checked_when_built() -> None:
    with pytest.raises(TypeError) as info:
        Literal([1]).map(d.as_text).map(d.inc)
    assert "directive_ops:as_text" in str(info.value) and "directive_ops:inc" in str(info.value)
    assert "returns str" in str(info.value) and "takes int" in str(info.value)
    with pytest.raises(TypeError, match="cannot fold with directive_ops:concat after directive_ops:inc"):
        Literal([1]).map(d.inc).fold(d.concat)
    with pytest.raises(TypeError, match="not a phalanx operation"):
        Literal([1]).map(len)
    # what might convert is let through: Any, generics, Structs, int -> float
    Literal([1]).map(d.inc).map(d.double).map(d.as_list).fold(d.concat_lists)
    Literal([1]).map(d.make_record).fold(d.merge_records)
    Literal([[1]]).map(d.tagged).fold(d.counted_concat)
    Literal(["x"]).map(d.length).map(d.as_text)
    Literal([1]).map("directive_ops:as_text").map(d.inc)  # by name: not checked


# --------------------------------------------------------------------------- #
# The job handle
# --------------------------------------------------------------------------- #


def test_progress_reaches_total(rt: phalanx.Runtime) -> None:
    handle = rt.run(Literal(range(50)).map(d.inc), chunksize=5)
    assert handle.progress.items_total == 50
    assert handle.result(timeout=TIMEOUT) == list(range(1, 51))
    assert handle.progress == phalanx.JobProgress(items_done=50, items_total=50, done=True)
    assert handle.done() and not handle.cancelled()
    assert handle.cancel() is False  # already over: its results stay
    assert handle.result() == list(range(1, 51))

    lazy = rt.run(Literal(iter(range(40))).map(d.as_text).fold(d.concat), chunksize=3)
    assert lazy.result(timeout=TIMEOUT) == "".join(f"{i};" for i in range(40))
    assert lazy.progress == phalanx.JobProgress(items_done=40, items_total=40, done=True)
    assert list(lazy) == [lazy.result()]


def test_indexed_stream_delivers_out_of_order_and_collects_in_order(rt: phalanx.Runtime, tmp_path: Path) -> None:
    release = tmp_path / "release"
    items = [[str(release), i] for i in range(6)]
    handle = rt.run(IndexedStream(items).map(d.held_back), chunksize=1)
    pairs = []
    for index, value in handle:
        pairs.append((index, value))
        if not release.exists():
            # item 0 is held back until now: whatever came first was not it
            assert index != 0
            release.write_text("go")
    assert pairs != sorted(pairs)
    assert sorted(pairs) == [(i, i * 10) for i in range(6)]
    # result() is in input order
    again = rt.run(IndexedStream(items).map(d.held_back), chunksize=1)
    assert again.result(timeout=TIMEOUT) == [i * 10 for i in range(6)]
    assert list(again) == [(i, i * 10) for i in range(6)]


def test_cancel_reaches_running_operations(rt: phalanx.Runtime, tmp_path: Path) -> None:
    items = [[str(tmp_path), i] for i in range(2)]
    handle = rt.run(Literal(items).map(d.wait_for_abort), chunksize=1)
    _eventually(_exists(tmp_path / "started-0"), "item 0 to start")
    _eventually(_exists(tmp_path / "started-1"), "item 1 to start")
    assert handle.cancel() is True
    assert handle.cancelled()
    _eventually(_exists(tmp_path / "aborted-0"), "item 0 to see its abort flag")
    _eventually(_exists(tmp_path / "aborted-1"), "item 1 to see its abort flag")
    with pytest.raises(phalanx.TaskCancelledError):
        handle.result(timeout=TIMEOUT)
    with pytest.raises(phalanx.TaskCancelledError):
        next(iter(handle))
    _eventually(handle.done, "the job thread to end")


def test_cancel_reaches_a_fold_chain(rt: phalanx.Runtime, tmp_path: Path) -> None:
    items = [[str(tmp_path), i] for i in range(4)]
    handle = rt.run(Literal(items).map(d.wait_for_abort).fold(d.concat), chunksize=2)
    _eventually(_exists(tmp_path / "started-0"), "chunk 0 to start")
    _eventually(_exists(tmp_path / "started-2"), "chunk 1 to start")
    handle.cancel()
    _eventually(_exists(tmp_path / "aborted-0"), "chunk 0 to see its abort flag")
    _eventually(_exists(tmp_path / "aborted-2"), "chunk 1 to see its abort flag")
    with pytest.raises(phalanx.TaskCancelledError):
        handle.result(timeout=TIMEOUT)


def test_leaving_the_handle_scope_or_dropping_it_cancels(rt: phalanx.Runtime, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with rt.run(Literal([[str(tmp_path / "a"), 0]]).map(d.wait_for_abort)) as handle:
        _eventually(_exists(tmp_path / "a" / "started-0"), "the call to start")
    _eventually(_exists(tmp_path / "a" / "aborted-0"), "the call to see its abort flag")
    assert handle.cancelled()

    (tmp_path / "b").mkdir()
    dropped = rt.run(Literal([[str(tmp_path / "b"), 0]]).map(d.wait_for_abort))
    _eventually(_exists(tmp_path / "b" / "started-0"), "the call to start")
    del dropped
    gc.collect()
    _eventually(_exists(tmp_path / "b" / "aborted-0"), "the dropped job's call to see its abort flag")


def test_first_failure_is_raised_with_the_remote_traceback(rt: phalanx.Runtime) -> None:
    for chain in (
        Literal(range(10)).map(d.inc).map(d.fail_on_three),
        Literal(range(10)).map(d.fail_on_three).map(d.as_text).fold(d.concat),
    ):
        with pytest.raises(ValueError, match="item 3 fails") as info:
            rt.run(chain, chunksize=2).result(timeout=TIMEOUT)  # type: ignore[call-overload]
        assert isinstance(info.value.__cause__, phalanx.RemoteTraceback)
        assert "fail_on_three" in str(info.value.__cause__)
    got = []
    with pytest.raises(ValueError, match="item 3 fails"):
        for value in rt.run(Literal(range(10)).map(d.fail_on_three), chunksize=1):
            got.append(value)
    assert got == [0, 1, 2]


def test_options_apply_to_chains(rt: phalanx.Runtime, tmp_path: Path) -> None:
    items = [[str(tmp_path), i] for i in range(8)]
    # a transient failure in a stage (its own transient= types) is retried, item by item
    retried = rt.options(retry=phalanx.Immediate(3)).run(Literal(items).map(d.flaky_once).map(d.inc), chunksize=3)
    assert retried.result(timeout=TIMEOUT) == list(range(1, 9))
    # without a retry strategy the same failure is fatal
    (tmp_path / "x").mkdir()
    with pytest.raises(ConnectionError):
        rt.run(Literal([[str(tmp_path / "x"), 0]]).map(d.flaky_once).map(d.inc)).result(timeout=TIMEOUT)
    # on_fatal=Ignore drops the failed item of a map chain ...
    assert rt.options(on_fatal=phalanx.Ignore).run(
        Literal(range(6)).map(d.inc).map(d.fail_on_three), chunksize=2).result(timeout=TIMEOUT) == [1, 2, 4, 5, 6]
    assert rt.options(on_fatal=phalanx.Ignore).run(
        IndexedStream(range(6)).map(d.fail_on_three), chunksize=4).result(timeout=TIMEOUT) == [0, 1, 2, 4, 5]
    # ... and is refused for a fold, which needs every item
    with pytest.raises(ValueError, match="on_fatal=Ignore"):
        rt.options(on_fatal=phalanx.Ignore).run(Literal(range(3)).map(d.as_text).fold(d.concat))
    # a per-call timeout reaches a stage
    (tmp_path / "t").mkdir()
    with pytest.raises(phalanx.TaskTimeoutError):
        rt.options(timeout=0.2).run(Literal([[str(tmp_path / "t"), 0]]).map(d.wait_for_abort)).result(timeout=TIMEOUT)
    _eventually(_exists(tmp_path / "t" / "aborted-0"), "the timed-out call to see its abort flag")


def test_result_timeout_leaves_the_job_running(rt: phalanx.Runtime, tmp_path: Path) -> None:
    release = tmp_path / "release"
    handle = rt.run(Literal([[str(release), 0], [str(release), 1]]).map(d.held_back))
    with pytest.raises(phalanx.TaskTimeoutError):
        handle.result(timeout=0.05)
    assert not handle.done()
    release.write_text("go")
    assert handle.result(timeout=TIMEOUT) == [0, 10]


def test_iterate_or_collect_not_both(rt: phalanx.Runtime) -> None:
    handle = rt.run(Literal(range(10)).map(d.inc), chunksize=1)
    assert next(iter(handle)) == 1
    with pytest.raises(RuntimeError, match="iterat"):
        handle.result(timeout=TIMEOUT)
    assert list(handle) == list(range(2, 11))


def test_run_needs_a_directive(rt: phalanx.Runtime) -> None:
    with pytest.raises(TypeError, match="directive"):
        rt.run([1, 2, 3])  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="chunksize"):
        rt.run(Literal([1]).map(d.inc), chunksize=0)


def test_await_and_async_for(rt: phalanx.Runtime, tmp_path: Path) -> None:
    async def main() -> None:
        assert await rt.run(Literal(range(10)).map(d.as_list).fold(d.concat_lists)) == list(range(10))
        pairs = [pair async for pair in rt.run(IndexedStream(range(10)).map(d.inc), chunksize=1)]
        assert sorted(pairs) == [(i, i + 1) for i in range(10)]
        values = [v async for v in rt.run(Literal(range(10)).map(d.inc), chunksize=3)]
        assert values == list(range(1, 11))
        # a cancelled await cancels the job; its running call sees the abort flag
        handle = rt.run(Literal([[str(tmp_path), 0]]).map(d.wait_for_abort))

        async def wait() -> list[str]:
            return await handle

        waiting = asyncio.ensure_future(wait())
        await asyncio.sleep(0)  # the task runs up to its await (a task cancelled before it starts never runs)
        while not (tmp_path / "started-0").exists():
            await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        while not (tmp_path / "aborted-0").exists():
            await asyncio.sleep(0.01)
        assert handle.cancelled()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_async_runtime_runs_directives() -> None:
    async def main() -> None:
        async with phalanx.AsyncRuntime(workers=1) as art:
            assert await art.run(Literal(range(5)).map(d.inc)) == [1, 2, 3, 4, 5]
            folded = art.options(timeout=10).run(Literal(range(5)).map(d.as_text).fold(d.concat))
            assert await folded == "0;1;2;3;4;"

    asyncio.run(asyncio.wait_for(main(), 60))


# --------------------------------------------------------------------------- #
# The wire
# --------------------------------------------------------------------------- #


def test_chunk_frames_without_stages_still_decode() -> None:
    class OldChunk(msgspec.Struct, frozen=True, array_like=True, tag="Chunk"):
        job: int
        seq: int
        attempt: int
        op: str
        items: list[Any]
        star: bool = False
        fold: bool = False
        timeout: float = 0.0

    old = msgspec.msgpack.encode(OldChunk(1, 2, 0, "m:f", [1, 2], False, True, 0.0))
    msg = decode_inbox(old)
    assert isinstance(msg, messages.Chunk) and msg.stages == [] and msg.fold and msg.items == [1, 2]
    new = messages.Chunk(1, 2, 0, "m:g", [1], stages=["m:f"])
    assert decode_inbox(encode(new)) == new


def test_evaluate_matches_functools_reduce() -> None:
    chain = Literal(range(20)).map(d.double).map(d.as_text).fold(d.concat)
    assert chain.evaluate() == functools.reduce(d.concat, [d.as_text(d.double(x)) for x in range(20)])
