"""Operations on numpy arrays for tests/test_arrays.py (imported by workers too)."""

from __future__ import annotations

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
