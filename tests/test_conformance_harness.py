"""The conformance harness (``python -m tests.conformance``) still runs: a few of each suite's tests.

Runs the harness as a subprocess of the test process, on a handful of tests
(the full suites take minutes and are run by hand, see docs/ecosystem.md).
CPython's suite is skipped on an interpreter that does not ship it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.conformance", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=110)


def test_joblib_suite_runs_its_tests_on_the_phalanx_backend() -> None:
    pytest.importorskip("joblib")
    proc = _harness("joblib", "-k", "test_simple_parallel[2-1-phalanx]")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 tests: 1 passed, 0 failed, 0 errors, 0 hung" in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("test.test_concurrent_futures") is None,
                    reason="this interpreter does not ship CPython's test_concurrent_futures")
def test_cpython_suite_runs_its_tests_on_phalanx_executor() -> None:
    proc = _harness("cf", "-k", "ProcessPoolForkAsCompletedTest.test_no_timeout")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 tests: 1 passed, 0 failed, 0 errors, 0 hung" in proc.stdout
    assert "phalanx.Executor (PHALANX_LOCAL_PICKLE=1)" in proc.stdout


def test_cf_interpreter_swaps_the_executor_in_isolated_interpreters_it_starts(tmp_path: Path) -> None:
    """CPython's test_interpreter_shutdown runs ``python -I -c CODE`` (PYTHONPATH ignored) importing
    ProcessPoolExecutor: the harness's interpreter swaps phalanx's in there too, only when asked."""
    from tests.conformance.runner import SWAP_ENV, interpreter

    python = interpreter(tmp_path)
    code = "import concurrent.futures as f; print(f.ProcessPoolExecutor.__name__, f.ProcessPoolExecutor.__mro__[1])"
    env = {k: v for k, v in os.environ.items() if k != SWAP_ENV}
    swapped = subprocess.run([python, "-I", "-c", code], env=dict(env, **{SWAP_ENV: "1"}), capture_output=True,
                             text=True, timeout=60, check=True)
    assert swapped.stdout.split() == ["ProcessPoolExecutor", "<class", "'phalanx.executor.Executor'>"], swapped
    stock = subprocess.run([python, "-I", "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert stock.stdout.split() == ["ProcessPoolExecutor", "<class", "'concurrent.futures._base.Executor'>"], stock
