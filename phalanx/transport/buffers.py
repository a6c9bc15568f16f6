"""numpy arrays on the wire: an msgpack extension record holding the raw buffer.

Runs in the driver and in workers, imported on first use (when an ndarray is
encoded or an array record is decoded), so phalanx never imports numpy for
users who do not have it or do not send arrays.

Layout of extension :data:`NDARRAY` (payload of the msgpack ``Ext``)::

    u32 little-endian  header length H
    H bytes            msgpack [dtype.str, shape]
    rest               the array's bytes, C order

Invariants kept: **no pickle on the wire** (object and structured dtypes,
which would need it, are refused with a ``TypeError`` that the encoder turns
into :class:`~phalanx.errors.EncodeError` before anything is sent); a
malformed record raises ``ValueError`` (a protocol error for the receiver),
never anything that could run code. A decoded array is a writable copy that
owns its memory, as an unpickled one would be.

Importing this module tunes glibc's allocator in this process (Linux): each
array crossing the wire costs a few buffers of its size, and with the default
thresholds every one of them is a fresh ``mmap`` whose page faults cost several
times the copy itself (measured: 8 MB one way went from ~20 ms to ~7 ms per
call). Freed memory up to :data:`RETAIN` bytes is kept for reuse instead.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from typing import Any

import msgspec
import numpy as np

__all__ = ["NDARRAY", "RETAIN", "ndarray_to_bytes", "ndarray_from_bytes", "array_layout"]

#: bytes of freed memory glibc keeps for reuse once arrays travel (M_TRIM_THRESHOLD)
RETAIN = 64 * 1024 * 1024
#: allocations below this come from the heap, not a fresh mmap (M_MMAP_THRESHOLD; glibc's maximum)
_MMAP_THRESHOLD = 32 * 1024 * 1024


def _tune_allocator() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc (musl has no mallopt): nothing to tune
    mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    mallopt(-1, RETAIN)  # M_TRIM_THRESHOLD


_tune_allocator()

#: the msgpack extension code of an ndarray
NDARRAY = 16

_HEADER = struct.Struct("<I")
_SAFE_KINDS = frozenset("biufcmMSU?")
_header_decoder = msgspec.msgpack.Decoder(tuple[str, tuple[int, ...]])


def ndarray_to_bytes(array: Any) -> bytearray:
    """The extension payload for ``array`` (one copy of its data)."""
    if not isinstance(array, np.ndarray):
        array = np.asarray(array)
    dtype = array.dtype
    if dtype.kind not in _SAFE_KINDS or dtype.fields is not None:
        raise TypeError(f"numpy arrays of dtype {dtype} cannot be sent (only plain numeric, bool, "
                        "bytes, str and datetime dtypes travel without pickle)")
    header = msgspec.msgpack.encode((dtype.str, array.shape))
    start = _HEADER.size + len(header)
    out = bytearray(start + array.nbytes)
    _HEADER.pack_into(out, 0, len(header))
    out[_HEADER.size:start] = header
    if array.nbytes:
        np.frombuffer(out, dtype=dtype, count=array.size, offset=start).reshape(array.shape)[...] = array
    return out


def ndarray_from_bytes(data: memoryview) -> Any:
    """The array in an extension payload; ``ValueError`` if it is malformed."""
    if len(data) < _HEADER.size:
        raise ValueError("truncated ndarray record")
    (size,) = _HEADER.unpack_from(data, 0)
    start = _HEADER.size + size
    if start > len(data):
        raise ValueError("truncated ndarray header")
    try:
        dtype_str, shape = _header_decoder.decode(data[_HEADER.size:start])
        dtype = np.dtype(dtype_str)
    except (msgspec.DecodeError, TypeError) as exc:
        raise ValueError(f"bad ndarray header: {exc}") from None
    count, nbytes = array_layout(dtype, dtype_str, shape)
    if nbytes != len(data) - start:
        raise ValueError(f"ndarray record holds {len(data) - start} bytes, shape {shape} needs {nbytes}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape).copy()


def array_layout(dtype: Any, dtype_str: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The item count and byte size of an array record's ``dtype`` and ``shape``;
    ``ValueError`` for a dtype that could run code or carry objects, or a negative shape."""
    if dtype.kind not in _SAFE_KINDS or dtype.fields is not None or dtype.itemsize == 0:
        raise ValueError(f"refused ndarray dtype {dtype_str!r}")
    if any(n < 0 for n in shape):
        raise ValueError(f"bad ndarray shape {shape}")
    count = 1
    for n in shape:
        count *= n
    return count, count * dtype.itemsize
