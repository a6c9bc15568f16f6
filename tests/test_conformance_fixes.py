"""Behaviour CPython's ``test_concurrent_futures`` and joblib's ``test_parallel.py`` expect,
found by the conformance harness (``python -m tests.conformance``), as our own tests.

Runs in the test (driver) process on real worker processes; the objects sent
come from ``tests/conformance_ops.py``. Each test names the harness test it
stands for.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures.process import BrokenProcessPool

import pytest

import phalanx
from conformance_ops import ExitAtUnpickle

pytest.importorskip("cloudpickle")


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_worker_exiting_while_loading_its_task_breaks_only_that_task(method: str) -> None:
    """test_deadlock.test_exit_at_task_unpickle: a task whose argument exits the worker as it loads
    fails with WorkerCrashedError (a BrokenProcessPool), it does not hang.

    With the "fork" start method, a replacement worker is forked from the driver and inherited
    the executor's interpreter-exit hook: exiting, it tried to finish the executor's copy and hung.
    """
    ctx = multiprocessing.get_context(method)
    with phalanx.Executor(2, mp_context=ctx, local_pickle=True) as ex:
        fut = ex.submit(id, ExitAtUnpickle())
        with pytest.raises(BrokenProcessPool):
            fut.result(timeout=60)
        assert ex.submit(id, 7).result(timeout=60) > 0  # the executor still works
