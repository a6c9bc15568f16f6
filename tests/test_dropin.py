"""Drop-in values and callables: what code written for ProcessPoolExecutor passes.

Runs in the test (driver) process with real worker processes (and, for the
refusal of pickles over tcp, a real ``phalanx worker`` host on
tcp://127.0.0.1). Promises checked:

* values round-trip as Python made them without annotations (tuple, set,
  frozenset, ints of any size, numpy scalars), through tasks, maps and results;
* builtins and C functions resolve by module and name (Executor, joblib);
* ``local_pickle`` carries lambdas, closures, methods, partials, classes and
  objects to and from local workers, and a remote host never reads a pickle;
* refusals and mismatches are explained in phalanx's words.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, strategies as st

import phalanx
from phalanx.transport import codec, messages

import dropin_ops as ops
from remote_host import RemoteHost

T = 30.0

# --------------------------------------------------------------------------- #
# Values as Python made them
# --------------------------------------------------------------------------- #

SAMPLES: list[Any] = [
    (1, 2), (), {1, 2}, set(), frozenset({3}), 2**64, -(2**63) - 1, 39**39, [(1, (2, 3))],
    {"k": (1,), "s": {2}}, {(1, 2): frozenset({4})}, [1, 2, 3], "s", np.float32(1.5), np.int8(-3),
    [[2**70]], ({1},), [np.uint16(7)], [1, ()], {"a": ()},
]


def _same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


values = st.recursive(
    st.integers() | st.text(max_size=5) | st.floats(allow_nan=False) | st.none() | st.booleans(),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.frozensets(st.integers(), max_size=3)
    | st.sets(st.text(max_size=3), max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=12,
)


@given(values)
def test_codec_round_trips_python_values(value: Any) -> None:
    call = codec.decode_inbox(codec.encode(messages.Call(1, 0, 0, "m:f", (value,), {"k": value})))
    assert _same(call.args[0], value) and _same(call.kwargs["k"], value)  # type: ignore[index]
    done = codec.decode_driver(codec.encode(messages.Results("w", [messages.Ok(1, 0, 0, value)])))
    assert _same(done.outcomes[0].value, value)  # type: ignore[union-attr]


def test_values_round_trip_through_workers() -> None:
    with phalanx.Executor(2) as ex:
        for value in SAMPLES:
            assert _same(ex.submit(ops.identity, value).result(T), value), value
        assert all(map(_same, ex.map(ops.identity, SAMPLES, chunksize=3), SAMPLES))
    with phalanx.Runtime(workers=1) as rt:
        assert all(map(_same, rt.map(ops.echo, SAMPLES), SAMPLES))
        assert _same(rt.submit(ops.echo, (2**100, {1})).result(T), (2**100, {1}))


def test_a_malformed_record_is_bad_input() -> None:
    for code, payload in [(codec.SET_EXT, codec._encoder.encode([[1]])),  # an unhashable item
                          (codec.TUPLE_EXT, b"\xc1"), (codec.NPSCALAR_EXT, b"\x00")]:
        frame = codec._encoder.encode(messages.Call(1, 0, 0, "m:f", [codec.msgspec.msgpack.Ext(code, payload)]))
        with pytest.raises(phalanx.ProtocolError):
            codec.decode_inbox(frame)


# --------------------------------------------------------------------------- #
# Builtins and C functions
# --------------------------------------------------------------------------- #


def test_builtins_and_c_functions_run_by_name() -> None:
    with phalanx.Executor(2) as ex:
        assert ex.submit(time.sleep, 0.01).result(T) is None
        assert list(ex.map(pow, [2, 39], [10, 39])) == [1024, 39**39]
        assert ex.submit(divmod, 7, 2).result(T) == (3, 1)
        assert isinstance(ex.submit(id, 1).result(T), int)
        assert ex.submit(math.sqrt, 16).result(T) == 4.0
        assert ex.submit(np.dot, [1, 2], [3, 4]).result(T) == 11
        with pytest.raises(TypeError, match="local_pickle"):
            ex.submit([].append, 1)  # a method of an object: not found by name


def test_joblib_runs_builtins() -> None:
    joblib = pytest.importorskip("joblib")
    import phalanx.joblib_backend  # noqa: F401

    with joblib.parallel_backend("phalanx", n_jobs=2):
        out = joblib.Parallel()(joblib.delayed(math.sqrt)(x) for x in [1, 4, 9])
        assert out == [1.0, 2.0, 3.0]
        assert joblib.Parallel()(joblib.delayed(divmod)(x, 3) for x in [7]) == [(2, 1)]


# --------------------------------------------------------------------------- #
# local_pickle
# --------------------------------------------------------------------------- #


class _Scaler:
    def __init__(self, k: int) -> None:
        self.k = k

    def scale(self, x: int) -> int:
        return self.k * x


def test_without_local_pickle_a_lambda_is_refused_with_the_fix() -> None:
    with phalanx.Executor(1) as ex:
        with pytest.raises(TypeError, match=r"lambda.*module level.*local_pickle=True \(PHALANX_LOCAL_PICKLE=1"):
            ex.submit(lambda: 1)
    with phalanx.Runtime(workers=1) as rt:
        with pytest.raises(TypeError, match="local_pickle=True"):
            rt.submit(lambda: 1)


def test_local_pickle_carries_callables_and_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_LOCAL_PICKLE", "1")
    k = 3
    with phalanx.Executor(2, initializer=functools.partial(time.sleep, 0)) as ex:
        assert ex.submit(lambda x: x + k, 1).result(T) == 4  # a closure
        assert list(ex.map(lambda x: x * k, range(4), chunksize=2)) == [0, 3, 6, 9]
        assert ex.submit(_Scaler(2).scale, 5).result(T) == 10  # a bound method
        assert ex.submit(functools.partial(pow, 2), 10).result(T) == 1024
        made = ex.submit(_Scaler, 7).result(T)  # a class called, an object returned
        assert isinstance(made, _Scaler) and made.k == 7
        assert ex.submit(ops.identity, ops.Order(2)).result(T) == ops.Order(2)
    with phalanx.Runtime(workers=1, local_pickle=True) as rt:
        assert rt.submit(lambda: "runtime").result(T) == "runtime"


def test_a_failing_builtin_in_map_raises_at_its_item() -> None:
    with phalanx.Executor(2) as ex:
        results = ex.map(divmod, [1, 1, 1, 1], [2, 2, 0, 2])
        assert next(results) == (0, 1) and next(results) == (0, 1)
        with pytest.raises(ZeroDivisionError):
            next(results)


def test_local_pickle_carries_a_manager_proxy_as_initargs(monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing

    monkeypatch.setenv("PHALANX_LOCAL_PICKLE", "1")
    with multiprocessing.Manager() as manager:
        shared = manager.list()
        with phalanx.Executor(2, initializer=ops.remember, initargs=(shared,)) as ex:
            assert sorted(ex.map(ops.append_to_shared, range(6))) == list(range(6))
        assert sorted(shared) == list(range(6))


def test_a_pickle_that_fails_to_load_fails_its_task_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading fails in the worker (an argument) or in the driver (a result): that call's error, no hang."""
    monkeypatch.setenv("PHALANX_LOCAL_PICKLE", "1")
    with phalanx.Executor(2) as ex:
        with pytest.raises(phalanx.DecodeError, match="this object cannot be loaded") as info:
            ex.submit(id, ops.ErrorAtUnpickle()).result(T)
        assert isinstance(info.value, ValueError)
        with pytest.raises(phalanx.DecodeError, match="this object cannot be loaded"):
            ex.submit(ops.make_error_at_unpickle).result(T)
        assert ex.submit(pow, 2, 3).result(T) == 8
        assert ex.runtime.stats().frames_dropped == 0 and ex.runtime.stats().worker_deaths == 0


def test_a_pickled_task_whose_worker_dies_is_redelivered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A redelivered task keeps its pickles (found by CPython's test_deadlock: it hung)."""
    import os

    monkeypatch.setenv("PHALANX_LOCAL_PICKLE", "1")
    with phalanx.Executor(2, max_attempts=2) as ex:
        with pytest.raises(phalanx.WorkerCrashedError, match="died 2 times"):
            ex.submit(functools.partial(os._exit, 3)).result(T)
        assert ex.runtime.stats().redelivered == 1
        assert ex.submit(lambda: "still serving").result(T) == "still serving"


def test_local_pickle_is_refused_with_listen() -> None:
    with pytest.raises(ValueError, match="local_pickle cannot be combined with listen"):
        phalanx.Runtime(workers=0, listen="tcp://127.0.0.1:0", insecure=True, local_pickle=True)


@pytest.mark.timeout(120)
def test_a_remote_host_never_reads_a_pickle(tmp_path: Path) -> None:
    """A driver that sends a pickle over tcp anyway: the host drops the frame, counts it, runs on."""
    marker = tmp_path / "unpickled"
    bad = codec._encoder.encode(messages.Call(
        10**6, 0, 0, "dropin_ops:echo", [codec.msgspec.msgpack.Ext(codec.PICKLE_EXT, codec._pickle(ops.Touch(str(marker))))]))
    with phalanx.Runtime(workers=0, listen="tcp://127.0.0.1:0", insecure=True) as rt:
        assert rt.address is not None
        with RemoteHost(rt.address, "far", ["--insecure", "--import", "dropin_ops"], workers=1) as host:
            assert rt.wait_for_workers(1, timeout=30) == 1, host.err
            driver = rt._driver
            sent = []

            def swap(direction: str, ident: bytes, frame: bytes) -> list[bytes]:
                if direction == "out" and not sent and codec.decode_inbox(frame).__class__ is messages.Call:
                    sent.append(ident)
                    return [bad, frame]  # the pickle first, then the real task
                return [frame]

            driver.frame_filter = swap
            assert rt.submit(ops.echo, 5).result(T) == 5
            driver.frame_filter = None
            assert sent
            assert rt.submit(ops.echo, (1, 2)).result(T) == (1, 2)  # still serving
            deadline = time.monotonic() + T
            while time.monotonic() < deadline:
                dropped = [w.frames_dropped for w in driver._workers.values() if w.remote]
                if dropped and dropped[0] >= 1:
                    break
                rt.submit(ops.echo, 0).result(T)
                time.sleep(0.05)
            assert dropped and dropped[0] >= 1, "the host did not count the pickled frame as bad input"
            assert host.proc.poll() is None
    assert not marker.exists(), "a remote host unpickled a payload"


# --------------------------------------------------------------------------- #
# Messages in phalanx's words
# --------------------------------------------------------------------------- #


def test_a_dataclass_mismatch_names_the_argument_and_types() -> None:
    with phalanx.Runtime(workers=1) as rt:
        with pytest.raises(phalanx.ValidationError) as info:
            rt.submit(ops.double, "x").result(T)
    assert "argument 'order' of double: expected Order, got str" in str(info.value)
    assert "`object`" not in str(info.value)
