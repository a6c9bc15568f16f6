"""numpy arrays as arguments and results: the wire form, its refusals, and a runtime round trip.

Runs in the test process; the runtime tests start worker processes (checked
for leaks by the suite's autouse fixture).
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import phalanx
from phalanx.transport import buffers
from phalanx.transport.codec import NDARRAY_EXT, decode_inbox, encode
from phalanx.transport.messages import Call
from tests import array_ops

SAFE_DTYPES = st.one_of(
    hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(), hnp.complex_number_dtypes(),
    hnp.boolean_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes(), hnp.datetime64_dtypes(),
)


def _roundtrip(value: Any) -> Any:
    return decode_inbox(encode(Call(1, 0, 0, "m:f", [value]))).args[0]  # type: ignore[union-attr]


@settings(max_examples=200)
@given(hnp.arrays(SAFE_DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
def test_any_plain_array_survives_the_wire(array: np.ndarray[Any, Any]) -> None:
    back = _roundtrip(array)
    assert isinstance(back, np.ndarray)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable and back.flags.owndata  # a copy, not a view on the frame


def test_non_contiguous_views_are_sent_by_value() -> None:
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    for view in (base[:, ::2], base.T, base[::-1]):
        np.testing.assert_array_equal(_roundtrip(view), view)


def test_numpy_scalars_become_python_values() -> None:
    assert _roundtrip(np.float64(2.5)) == 2.5
    assert _roundtrip(np.int16(7)) == 7


@pytest.mark.parametrize("array", [
    np.array([object(), 1], dtype=object),
    np.zeros(2, dtype=[("a", "i4"), ("b", "f8")]),
])
def test_arrays_that_would_need_pickle_are_refused_before_sending(array: np.ndarray[Any, Any]) -> None:
    with pytest.raises(phalanx.EncodeError, match="cannot be sent"):
        encode(Call(1, 0, 0, "m:f", [array]))


def _frame(payload: bytes) -> bytes:
    return msgspec.msgpack.encode(Call(1, 0, 0, "m:f", [msgspec.msgpack.Ext(NDARRAY_EXT, payload)]))


@pytest.mark.parametrize("payload", [
    b"",
    b"\x01\x00",
    b"\xff\xff\xff\x7f" + b"x",  # header longer than the record
    buffers._HEADER.pack(3) + b"abc",  # header that is not msgpack of (dtype, shape)
    buffers._HEADER.pack(len(h := msgspec.msgpack.encode(("|O", (1,))))) + h + b"\x00" * 8,  # object dtype
    buffers._HEADER.pack(len(h := msgspec.msgpack.encode(("<f8", (3,))))) + h + b"\x00" * 8,  # too short
    buffers._HEADER.pack(len(h := msgspec.msgpack.encode(("<f8", (-1,))))) + h,  # negative shape
    buffers._HEADER.pack(len(h := msgspec.msgpack.encode(("not a dtype", (1,))))) + h + b"\x00" * 8,
])
def test_malformed_array_records_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(phalanx.ProtocolError):
        decode_inbox(_frame(payload))


@given(st.binary(max_size=64))
def test_random_array_records_never_escape_as_other_errors(payload: bytes) -> None:
    try:
        decode_inbox(_frame(payload))
    except phalanx.ProtocolError:
        pass


@pytest.mark.timeout(120)
def test_arrays_round_trip_through_workers() -> None:
    rng = np.random.default_rng(0)
    big = rng.random(1 << 18)  # 2 MB
    with phalanx.Runtime(workers=2) as rt:
        assert rt.submit(array_ops.total, big).result(timeout=30) == pytest.approx(float(big.sum()))
        back = rt.submit(array_ops.double, big).result(timeout=30)
        np.testing.assert_array_equal(back, big * 2)
        matrices = [rng.random((3, 4)) for _ in range(20)]
        for got, m in zip(rt.map(array_ops.double, matrices, timeout=30), matrices):
            np.testing.assert_array_equal(got, m * 2)
        summed = rt.fold(array_ops.add, matrices, timeout=30)
        np.testing.assert_allclose(summed, sum(matrices))
        # An annotated ndarray parameter refuses a list: a ValidationError naming it.
        with pytest.raises(phalanx.ValidationError, match="argument 'a'"):
            rt.submit(array_ops.total, [1.0, 2.0]).result(timeout=30)
        assert rt.submit(array_ops.total, np.ones(3)).result(timeout=30) == 3.0
