"""Operations on numpy arrays for W5 (payload throughput).

Imported by the child measuring process and by worker processes (lazily, on
the first W5 task), never by the other workloads, so numpy's import time does
not leak into their figures.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

import phalanx

__all__ = ["np_sum", "np_echo"]


@phalanx.operation
def np_sum(a: npt.NDArray[np.float64]) -> float:
    """One-way payload: the array goes to the worker, only its sum comes back."""
    return float(a.sum())


@phalanx.operation
def np_echo(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Both-ways payload: the array goes to the worker and comes back."""
    return a
