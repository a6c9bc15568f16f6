"""The joblib backend: joblib's own ``Parallel`` usage patterns, run on phalanx workers.

Runs in the test (driver) process; the delayed functions are plain
module-level functions from ``tests/exec_ops.py`` (no ``@phalanx.operation``:
the backend names them implicitly, as :class:`phalanx.Executor` does).
Every ``Parallel`` call starts its workers and stops them when it ends; the
autouse leak check in ``conftest.py`` verifies none is left.
"""

from __future__ import annotations

import itertools
import os
import types
import warnings
from typing import Any

import pytest

joblib = pytest.importorskip("joblib")

import phalanx.joblib_backend  # noqa: E402  (registers the "phalanx" backend)
from exec_ops import fail_on, fit_and_score, pair, pid, power, square  # noqa: E402
from joblib import Parallel, delayed  # noqa: E402


def test_registered_on_import() -> None:
    from joblib.parallel import BACKENDS

    assert BACKENDS["phalanx"] is phalanx.joblib_backend.PhalanxBackend
    phalanx.joblib_backend.register()  # idempotent
    assert BACKENDS["phalanx"] is phalanx.joblib_backend.PhalanxBackend


def test_parallel_backend_context() -> None:
    with joblib.parallel_backend("phalanx"):
        assert Parallel(n_jobs=2)(delayed(square)(i) for i in range(100)) == [i * i for i in range(100)]


def test_parallel_config_and_backend_argument() -> None:
    with joblib.parallel_config(backend="phalanx", n_jobs=2):
        assert Parallel()(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]
    assert Parallel(n_jobs=2, backend="phalanx")(delayed(square)(i) for i in range(10)) == [
        i * i for i in range(10)
    ]


def test_runs_in_two_worker_processes() -> None:
    with joblib.parallel_backend("phalanx", n_jobs=2):
        pids = Parallel(batch_size=1)(delayed(pid)(i) for i in range(40))
    assert os.getpid() not in pids
    assert 1 <= len(set(pids)) <= 2


def test_keyword_arguments_and_typed_results() -> None:
    with joblib.parallel_backend("phalanx", n_jobs=2):
        assert Parallel()(delayed(power)(i, exp=3) for i in range(6)) == [i**3 for i in range(6)]
        assert Parallel()(delayed(pair)(i) for i in range(3)) == [(0, 0), (1, 1), (2, 4)]


@pytest.mark.parametrize("batch_size", ["auto", 1, 7])
def test_batch_sizes(batch_size: Any) -> None:
    with joblib.parallel_backend("phalanx", n_jobs=2):
        got = Parallel(batch_size=batch_size, pre_dispatch="all")(delayed(square)(i) for i in range(50))
    assert got == [i * i for i in range(50)]


def test_return_as_generator() -> None:
    with joblib.parallel_backend("phalanx", n_jobs=2):
        gen = Parallel(return_as="generator")(delayed(square)(i) for i in range(30))
        assert isinstance(gen, types.GeneratorType)
        assert list(gen) == [i * i for i in range(30)]
        unordered = Parallel(return_as="generator_unordered")(delayed(square)(i) for i in range(30))
        assert sorted(unordered) == [i * i for i in range(30)]


def test_generator_closed_early() -> None:
    with joblib.parallel_backend("phalanx", n_jobs=2):
        gen = Parallel(return_as="generator")(delayed(square)(i) for i in range(10_000))
        assert next(gen) == 0
        with warnings.catch_warnings():  # joblib says how many dispatched tasks went unused
            warnings.filterwarnings("ignore", "[0-9]+ tasks (have been|which were)", UserWarning)
            gen.close()  # aborts the call: its workers stop (the leak check verifies)
        assert Parallel()(delayed(square)(i) for i in range(3)) == [0, 1, 4]


def test_exception_propagates_with_its_type() -> None:
    with joblib.parallel_backend("phalanx", n_jobs=2):
        with pytest.raises(ValueError, match="bad item 13"):
            Parallel()(delayed(fail_on)(i, 13) for i in range(40))
        gen = Parallel(return_as="generator")(delayed(fail_on)(i, 3) for i in range(10))
        with pytest.raises(ValueError, match="bad item 3"):
            list(gen)
        assert Parallel()(delayed(square)(i) for i in range(3)) == [0, 1, 4]  # still usable


def test_function_that_cannot_be_named_is_refused() -> None:
    with joblib.parallel_backend("phalanx", n_jobs=2):
        with pytest.raises(TypeError, match="lambda"):
            Parallel()(delayed(lambda x: x)(i) for i in range(3))


def test_n_jobs_one_runs_in_this_process() -> None:
    with joblib.parallel_backend("phalanx", n_jobs=1):
        assert Parallel()(delayed(pid)(i) for i in range(3)) == [os.getpid()] * 3


def test_n_jobs_negative_counts_from_the_cpus() -> None:
    with joblib.parallel_backend("phalanx", n_jobs=-1):
        assert Parallel()(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]
    with pytest.raises(ValueError):
        Parallel(n_jobs=0, backend="phalanx")(delayed(square)(i) for i in range(5))


def test_backend_options_reach_the_executor() -> None:
    with joblib.parallel_backend("phalanx", n_jobs=1 + 1, max_tasks_per_child=1):
        pids = Parallel(batch_size=1)(delayed(pid)(i) for i in range(6))
    assert len(set(pids)) == 6  # a fresh worker process per task


def test_grid_search_pattern() -> None:
    """Parameter grid x cross-validation folds, one task per cell, pick the best: GridSearchCV without sklearn."""
    xs = [i / 10 for i in range(1, 41)]
    noise = [((i * 37) % 11 - 5) / 100 for i in range(len(xs))]  # deterministic, small
    data = [[x, 1.5 * x**2 + e] for x, e in zip(xs, noise)]
    k = 4
    folds = [
        ([row for j, row in enumerate(data) if j % k != f], [row for j, row in enumerate(data) if j % k == f])
        for f in range(k)
    ]
    grid = [{"degree": d, "lam": lam} for d, lam in itertools.product([1, 2, 3], [0.0, 1.0, 100.0])]
    with joblib.parallel_backend("phalanx", n_jobs=2):
        scores = Parallel()(
            delayed(fit_and_score)(params, train, test) for params in grid for train, test in folds
        )
    assert len(scores) == len(grid) * k
    assert scores == [fit_and_score(p, train, test) for p in grid for train, test in folds]  # same numbers
    means = [sum(scores[i * k:(i + 1) * k]) / k for i in range(len(grid))]
    best = grid[max(range(len(grid)), key=means.__getitem__)]
    assert best == {"degree": 2, "lam": 0.0}
