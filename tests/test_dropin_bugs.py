"""What code written for ``ProcessPoolExecutor`` and joblib expects of phalanx's drop-ins.

Runs in the test (driver) process, on real worker processes; scripts that
must exit the interpreter run in a subprocess. Each test attacks one promise:

* pending work completes at interpreter exit (every start method);
* a runtime or executor dropped without ``shutdown()`` is collected and its
  workers stop;
* a short task does not wait behind a long one while another worker is idle
  (unstarted prefetched tasks are taken back, each run exactly once);
* the joblib backend inside a daemonic process runs sequentially, with a warning;
* ``WorkerCrashedError`` is a ``BrokenProcessPool``; the executor does not
  prefix worker output.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import psutil
import pytest

import phalanx

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def _run_script(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _gone_within(pids: list[int], bound: float) -> list[int]:
    """The pids still running after up to ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


# ---- pending work at interpreter exit -------------------------------------------------

_EXIT_SCRIPT = """
import sys
from multiprocessing import get_context
import phalanx
from exec_ops import append_line_after

if __name__ == "__main__":
    ex = phalanx.Executor(2, mp_context=get_context(sys.argv[1]))
    for i in range(5):
        ex.submit(append_line_after, sys.argv[2], 0.3, str(i))
    # no shutdown: the interpreter exits with the work pending
"""


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_pending_work_completes_at_interpreter_exit(method: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run_script(_EXIT_SCRIPT, method, str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.exists(), proc.stderr
    assert sorted(out.read_text().split()) == ["0", "1", "2", "3", "4"]


# ---- dropped without shutdown ---------------------------------------------------------


def test_dropped_runtime_is_collected_and_its_workers_stop() -> None:
    rt = phalanx.Runtime(workers=2)
    pids = list(rt.worker_pids().values())
    ref = weakref.ref(rt)
    del rt
    gc.collect()
    assert ref() is None
    assert _gone_within(pids, 10.0) == []


def test_dropped_executor_is_collected_and_its_workers_stop() -> None:
    from exec_ops import square

    ex = phalanx.Executor(2)
    assert ex.submit(square, 3).result(timeout=30) == 9
    pids = list(ex.runtime.worker_pids().values())
    ref = weakref.ref(ex)
    del ex
    gc.collect()
    assert ref() is None
    assert _gone_within(pids, 10.0) == []


# ---- joblib in a daemonic process ------------------------------------------------------


def test_joblib_backend_in_a_daemonic_process_runs_sequentially_with_a_warning() -> None:
    import multiprocessing

    from exec_ops import joblib_in_daemonic_process

    pytest.importorskip("joblib")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        out, warned = pool.apply(joblib_in_daemonic_process, (5,))
    assert out == [0, 1, 4, 9, 16]
    assert any("daemonic" in w and "n_jobs=1" in w for w in warned), warned


# ---- what code written for ProcessPoolExecutor catches and sees -----------------------


def test_worker_crashed_error_is_a_broken_process_pool() -> None:
    from concurrent.futures.process import BrokenProcessPool

    from exec_ops import die

    with phalanx.Executor(1, max_attempts=1) as ex:
        with pytest.raises(BrokenProcessPool) as info:
            ex.submit(die, 3).result(timeout=30)
    assert isinstance(info.value, phalanx.WorkerCrashedError)


_SAY_SCRIPT = """
import phalanx
from exec_ops import say

if __name__ == "__main__":
    with phalanx.Executor(1) as ex:
        ex.submit(say, "plain line").result(timeout=30)
"""


def test_executor_does_not_prefix_worker_output() -> None:
    env_free = {k: v for k, v in os.environ.items() if k != "PHALANX_PREFIX_OUTPUT"}
    proc = subprocess.run([sys.executable, "-c", _SAY_SCRIPT], capture_output=True, text=True, timeout=60,
                          env=dict(env_free, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)])))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["plain line"]


# ---- short work behind long work -----------------------------------------------------


def test_short_work_is_not_stranded_behind_a_long_task(tmp_path: Path) -> None:
    """A task prefetched behind a blocked one runs on the other, idle, worker."""
    import concurrent.futures as cf

    from exec_ops import append_line_after, wait_for

    release, started, log = tmp_path / "release", tmp_path / "started", tmp_path / "log"
    with phalanx.Executor(2) as ex:
        try:
            slow = ex.submit(wait_for, str(release), str(started))
            deadline = time.monotonic() + 30
            while not started.exists():
                assert time.monotonic() < deadline, "the long task never started"
                time.sleep(0.005)
            # Each worker holds two tasks (credits): one of these waits behind the long task.
            quick = [ex.submit(append_line_after, str(log), 0.05, str(i)) for i in range(9)]
            done, not_done = cf.wait(quick, timeout=25)  # the long task blocks until released
            assert not not_done, "a short task waited behind the long one while a worker was idle"
            assert not slow.done()
        finally:
            release.touch()
        assert slow.result(timeout=30) is None
        assert ex.runtime.stats().reclaimed >= 1
    assert sorted(log.read_text().split(), key=int) == [str(i) for i in range(9)]


def test_tasks_taken_back_run_exactly_once(tmp_path: Path) -> None:
    """Deep prefetch, long tasks among short ones: every task runs once, every result arrives once."""
    from exec_ops import append_line_after

    log = tmp_path / "log"
    with phalanx.Executor(2, credits=6) as ex:
        futures = []
        for wave in range(4):  # waves: workers idle between them, so tasks are taken back again and again
            futures += [ex.submit(append_line_after, str(log), 0.4 if i % 8 == 0 else 0.01, str(wave * 24 + i))
                        for i in range(24)]
            time.sleep(0.2)
        assert [f.result(timeout=60) for f in futures] == [None] * 96
        stats = ex.runtime.stats()
    lines = log.read_text().split()
    assert sorted(lines, key=int) == [str(i) for i in range(96)]  # none twice, none lost
    assert stats.reclaimed >= 1
    assert stats.duplicates_dropped == 0 and stats.frames_dropped == 0
