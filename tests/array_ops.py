"""Operations on numpy arrays for tests/test_arrays.py (imported by workers too)."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from typing import Any

import numpy as np
import numpy.typing as npt

import phalanx


@phalanx.operation
def total(a: npt.NDArray[np.float64]) -> float:
    return float(a.sum())


@phalanx.operation
def double(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return a * 2


@phalanx.operation
def add(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return a + b


def _mapped(a: Any) -> bool:
    """True if ``a`` is a view of an ``mmap`` (a shared-memory segment), not an array of its own."""
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, ctypes.Array):  # a pooled segment: a buffer of its own over the mapping
        base = next(iter(base._objects.values()))
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)


@phalanx.operation
def view_info(a: npt.NDArray[np.float64]) -> dict[str, Any]:
    """How the worker got ``a``; then writes into it (the sender's array must not change)."""
    info = {"mapped": _mapped(a), "writeable": bool(a.flags.writeable), "sum": float(a.sum())}
    if a.size:
        a[0] = -1.0
    return info


@phalanx.operation
def echo(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return a


@phalanx.operation
def ramp(n: int) -> npt.NDArray[np.float64]:
    return np.arange(n, dtype=np.float64)


@phalanx.operation
def hold(a: npt.NDArray[np.float64], marker: str) -> float:
    """Say it started (creates ``marker``), then sleep until killed."""
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
    return float(a.sum())


#: views of arrays this worker received and keeps (keep, kept)
_KEPT: list[Any] = []


@phalanx.operation
def keep(a: npt.NDArray[np.float64]) -> int:
    """Keep a view of ``a`` (not ``a`` itself) past the task; this worker's pid."""
    _KEPT.append(a[1:].reshape(-1, 1)[:, 0])
    return os.getpid()


@phalanx.operation
def kept() -> list[tuple[float, float]]:
    """(min, max) of every view kept so far (an array of one value i: (i, i))."""
    return [(float(v.min()), float(v.max())) for v in _KEPT]


@phalanx.operation
def overwrite(a: npt.NDArray[np.float64]) -> int:
    """Write into the array received (its segment), then drop it; how many views are kept."""
    a[:] = -7.0
    return len(_KEPT)
