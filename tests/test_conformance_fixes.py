"""Behaviour CPython's ``test_concurrent_futures`` and joblib's ``test_parallel.py`` expect,
found by the conformance harness (``python -m tests.conformance``), as our own tests.

Runs in the test (driver) process on real worker processes; the objects sent
come from ``tests/conformance_ops.py``. Each test names the harness test it
stands for.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
import weakref
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

import phalanx
from conformance_ops import (
    ErrorAtPickle,
    ErrorAtUnpickle,
    ExitAtPickle,
    ExitAtUnpickle,
    InterruptAtPickle,
    Plain,
    exit_with,
    interrupt,
    make,
    wait_for,
)

pytest.importorskip("cloudpickle")

TESTS = Path(__file__).parent


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


def test_argument_that_cannot_be_pickled_fails_its_future_with_a_pickling_error() -> None:
    """test_deadlock.test_error_at_task_pickle: as with ProcessPoolExecutor, at result(), a PicklingError."""
    with phalanx.Executor(2, local_pickle=True) as ex:
        fut = ex.submit(id, ErrorAtPickle())
        with pytest.raises(pickle.PicklingError, match="refused to pickle") as info:
            fut.result(timeout=60)
        assert isinstance(info.value, phalanx.EncodeError)
        assert ex.submit(abs, -3).result(timeout=60) == 3


def test_task_that_fails_to_load_in_its_worker_is_a_broken_process_pool_error() -> None:
    """test_deadlock.test_error_at_task_unpickle: what ProcessPoolExecutor raises (BrokenProcessPool)."""
    with phalanx.Executor(2, local_pickle=True) as ex:
        fut = ex.submit(id, ErrorAtUnpickle())
        with pytest.raises(BrokenProcessPool, match="refused to load"):
            fut.result(timeout=60)
        assert ex.submit(abs, -3).result(timeout=60) == 3


def test_result_that_cannot_be_pickled_is_a_pickling_error() -> None:
    """test_deadlock.test_error_during_result_pickle_on_worker."""
    with phalanx.Executor(2, local_pickle=True) as ex:
        with pytest.raises(pickle.PicklingError, match="refused to pickle"):
            ex.submit(make, ErrorAtPickle).result(timeout=60)
        with pytest.raises(pickle.PicklingError, match="refused to pickle"):
            list(ex.map(make, [ErrorAtPickle]))


@pytest.mark.parametrize("cls", [ErrorAtUnpickle, ExitAtUnpickle])
def test_result_that_fails_to_load_in_the_driver_fails_its_future_only(cls: type) -> None:
    """test_deadlock.test_error/exit_during_result_unpickle_in_result_handler: a result whose loading
    raises (even SystemExit) fails that future with a BrokenProcessPool; the runtime keeps serving."""
    with phalanx.Executor(2, local_pickle=True) as ex:
        with pytest.raises(BrokenProcessPool):
            ex.submit(make, cls).result(timeout=60)
        assert ex.submit(abs, -3).result(timeout=60) == 3


def _no_worker_died(ex: phalanx.Executor) -> None:
    stats = ex.runtime.stats()
    assert stats.worker_deaths == 0 and stats.worker_restarts == 0, stats


def _shut_down(ex: phalanx.Executor) -> dict[int, Any]:
    """Shut ``ex`` down; the handles of the workers it had (to join and check)."""
    procs = ex._processes
    ex.shutdown(wait=True)
    return procs


def _all_ended(procs: dict[int, Any]) -> None:
    for p in procs.values():
        p.join(timeout=30)
        assert not p.is_alive()


@pytest.mark.parametrize("pickled", [False, True])
def test_task_raising_system_exit_or_keyboard_interrupt_fails_with_that_exception(pickled: bool) -> None:
    """test_deadlock.test_exit_during_func_exec_on_worker, joblib's test_error_capture: the future's
    exception is the SystemExit (KeyboardInterrupt) itself, with the remote traceback; the worker lives."""
    with phalanx.Executor(2, local_pickle=pickled) as ex:
        with pytest.raises(SystemExit) as exited:
            ex.submit(exit_with, 3).result(timeout=60)
        assert exited.value.code == 3
        assert isinstance(exited.value.__cause__, phalanx.RemoteTraceback)
        assert "exit_with" in str(exited.value.__cause__)
        with pytest.raises(KeyboardInterrupt):
            ex.submit(interrupt).result(timeout=60)
        with pytest.raises(KeyboardInterrupt):
            list(ex.map(interrupt, range(4), chunksize=2, timeout=60))
        assert isinstance(ex.submit(exit_with, 0).exception(timeout=60), SystemExit)
        assert ex.submit(abs, -3).result(timeout=60) == 3
        _no_worker_died(ex)


def test_exit_subclasses_and_generator_exit_are_still_not_raised_as_such() -> None:
    """Only the builtin SystemExit and KeyboardInterrupt are rebuilt as themselves."""
    from phalanx.transport import codec, messages

    for name in ("builtins:GeneratorExit", "builtins:BaseException", "conformance_ops:MyExit"):
        rebuilt = codec.rebuild_error(messages.ErrorInfo(name, "x", ["x"], "tb"))
        assert isinstance(rebuilt, phalanx.RemoteError), name


@pytest.mark.timeout(120)
def test_an_exit_named_by_a_host_on_the_network_is_a_remote_error() -> None:
    """Only a local worker's SystemExit is raised as itself: a host over tcp (honest or hostile)
    cannot make a caller's result() raise SystemExit or KeyboardInterrupt; a RemoteError names it."""
    from phalanx.transport import codec, messages
    from remote_host import RemoteHost

    import ops

    with phalanx.Runtime(workers=0, listen="tcp://127.0.0.1:0", insecure=True) as rt:
        assert rt.address is not None
        with RemoteHost(rt.address, "far", ["--insecure", "--import", "ops"], workers=1) as host:
            assert rt.wait_for_workers(1, timeout=30) == 1, host.err
            with pytest.raises(phalanx.RemoteError) as info:
                rt.submit(ops.call_sys_exit, 3).result(timeout=60)
            assert info.value.type_name == "builtins:SystemExit"
            assert not isinstance(info.value, SystemExit)
            with pytest.raises(phalanx.RemoteError):
                list(rt.map(ops.call_sys_exit, [1, 2], chunksize=1, timeout=60))
            assert rt.stats().workers_lost == 0
    # What the driver does with such a frame from the network, whatever else it claims.
    forged = messages.Results("w9", [messages.Err(1, 0, 0, codec.error_info(KeyboardInterrupt())),
                                     messages.Err(1, 1, 0, codec.error_info(KeyError("k")))])
    marked = codec.distrust_exits(forged)
    assert isinstance(marked, messages.Results)
    first, second = (codec.rebuild_error(o.error) for o in marked.outcomes)  # type: ignore[union-attr]
    assert isinstance(first, phalanx.RemoteError) and first.type_name == "builtins:KeyboardInterrupt"
    assert type(second) is KeyError


@pytest.mark.parametrize("cls, expected", [(ExitAtPickle, SystemExit), (InterruptAtPickle, KeyboardInterrupt)])
def test_result_whose_pickling_exits_fails_its_task_and_the_worker_lives(cls: type, expected: type) -> None:
    """test_deadlock.test_exit_during_result_pickle_on_worker: a result whose pickling raises SystemExit
    (KeyboardInterrupt) fails that task with it; the worker neither exits nor is replaced."""
    with phalanx.Executor(2, local_pickle=True) as ex:
        with pytest.raises(expected):
            ex.submit(make, cls).result(timeout=60)
        for chunksize in (1, 3):
            with pytest.raises(expected):
                list(ex.map(make, [Plain, cls, Plain], chunksize=chunksize, timeout=60))
        assert type(ex.submit(make, Plain).result(timeout=60)) is Plain
        _no_worker_died(ex)


def test_max_tasks_per_child_with_the_fork_context_is_a_value_error() -> None:
    """test_process_pool.test_max_tasks_per_child (fork): as ProcessPoolExecutor, refused at construction."""
    with pytest.raises(ValueError, match="max_tasks_per_child is incompatible with the 'fork'"):
        phalanx.Executor(1, mp_context=multiprocessing.get_context("fork"), max_tasks_per_child=3)
    with phalanx.Executor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=2) as ex:
        assert [ex.submit(abs, -i).result(timeout=60) for i in range(3)] == [0, 1, 2]
        assert ex.runtime.stats().workers_recycled >= 1


def test_processes_leave_out_a_worker_replaced_after_max_tasks_per_child(tmp_path: Path) -> None:
    """test_process_pool.test_max_tasks_per_child: once a worker is being replaced, ``_processes``
    holds its replacement only (ProcessPoolExecutor drops the old one as it exits, before the
    replacement starts); it counted the old one while it finished its last task."""
    gate = str(tmp_path / "go")
    ex = phalanx.Executor(1, mp_context=multiprocessing.get_context("forkserver"), max_tasks_per_child=2)
    try:
        old = ex.submit(os.getpid).result(timeout=60)
        last = ex.submit(wait_for, gate)  # the old worker's second and last task: it holds it
        new = ex.submit(os.getpid).result(timeout=60)  # run by the replacement
        assert new != old and not last.done()
        assert list(ex._processes) == [new]
        Path(gate).touch()
        assert last.result(timeout=60) == old
    finally:
        procs = _shut_down(ex)
    _all_ended(procs)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_start_on_demand_under_spawn_and_forkserver(method: str, tmp_path: Path) -> None:
    """test_process_pool.test_idle_process_reuse_one / _multiple, test_processes_terminate: with a
    spawn or forkserver mp_context, a worker starts only when a submit finds none idle, up to
    max_workers. (Under spawn all started at construction: 4 processes where 1 was expected.)"""
    ex = phalanx.Executor(4, mp_context=multiprocessing.get_context(method))
    try:
        for i in range(3):
            assert ex.submit(abs, -i).result(timeout=60) == i
        assert len(ex._processes) == 1  # each submit found the one worker idle
        # A result seen by the caller gives its worker back at once, whichever thread settled it.
        for i in range(20):
            assert ex.submit(abs, -i).result(timeout=60) == i
            assert len(ex._processes) == 1
        gate = str(tmp_path / "go")
        blocked = [ex.submit(wait_for, gate) for _ in range(3)]
        assert len(ex._processes) == 3  # one per blocked task, started by the submits themselves
        blocked += [ex.submit(wait_for, gate) for _ in range(3)]
        assert len(ex._processes) == 4  # never more than max_workers
        assert ex.runtime.wait_for_workers(4, timeout=60) == 4  # they connect and serve
        Path(gate).touch()
        assert all(f.result(timeout=60) > 0 for f in blocked)
        assert list(ex.map(abs, range(-5, 0), chunksize=2, timeout=60)) == [5, 4, 3, 2, 1]
        assert len(ex._processes) == 4
        _no_worker_died(ex)
    finally:
        procs = _shut_down(ex)
    _all_ended(procs)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_started_on_demand_never_hold_up_a_quick_task(method: str, tmp_path: Path) -> None:
    """executor.test_map_timeout under spawn: map(sleep, [0, 0, 6], timeout=5) starts workers as its
    tasks find none idle; the quick tasks must not wait for them (they take seconds to start under
    spawn) nor behind the long one. Here the long one waits for a file, created only after the
    quick results came back."""
    gate, there = str(tmp_path / "go"), str(tmp_path / "there")
    Path(there).touch()
    ex = phalanx.Executor(5, mp_context=multiprocessing.get_context(method))
    try:
        results = ex.map(wait_for, [there, there, gate], timeout=60)
        assert next(results) > 0 and next(results) > 0  # while the third still waits for its gate
        Path(gate).touch()
        assert next(results) > 0
        assert len(ex._processes) <= 3
        _no_worker_died(ex)
    finally:
        procs = _shut_down(ex)
    _all_ended(procs)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_submit_whose_task_cannot_be_sent_keeps_the_worker_it_took(method: str) -> None:
    """test_process_pool.test_saturation, test_shutdown.test_processes_terminate: their tasks cannot be
    pickled (a multiprocessing semaphore), and ProcessPoolExecutor still starts a worker for each
    submit that finds none idle: only a worker's result gives one back."""
    ex = phalanx.Executor(3, mp_context=multiprocessing.get_context(method), local_pickle=True)
    try:
        for _ in range(2):
            with pytest.raises(pickle.PicklingError):
                ex.submit(id, ErrorAtPickle()).result(timeout=60)
        assert len(ex._processes) == 2
        for _ in range(4):
            with pytest.raises(pickle.PicklingError):
                ex.submit(id, ErrorAtPickle()).result(timeout=60)
        assert len(ex._processes) == 3  # never more than max_workers
        assert ex.submit(abs, -4).result(timeout=60) == 4
        _no_worker_died(ex)
    finally:
        procs = _shut_down(ex)
    _all_ended(procs)


def test_a_quick_result_never_waits_for_the_long_task_queued_after_it(tmp_path: Path) -> None:
    """executor.test_map_timeout (map(sleep, [0, 0, 6], timeout=5)): a worker holding a quick task and
    a long one behind it sent the quick one's result only with the long one's (it batches the
    outcomes of quick tasks while more work waits), so the caller timed out on a done task."""
    busy, there, gate = str(tmp_path / "busy"), str(tmp_path / "there"), str(tmp_path / "go")
    Path(there).touch()
    with phalanx.Executor(1, credits=3) as ex:
        first = ex.submit(wait_for, busy)
        quick = ex.submit(wait_for, there)
        slow = ex.submit(wait_for, gate)  # waits for its gate (60 s at most)
        driver = ex.runtime._driver
        for _ in range(6000):  # until the driver wrote the tasks it held back for the busy worker
            with driver._lock:
                if not any(w.held for w in driver._workers.values()):
                    break
            time.sleep(0.01)
        Path(busy).touch()  # the worker finds quick and slow waiting when first ends
        assert first.result(timeout=60) > 0
        assert quick.result(timeout=30) > 0  # before: only when slow ended (60 s)
        assert not slow.done()
        Path(gate).touch()
        assert slow.result(timeout=60) > 0
        _no_worker_died(ex)


@pytest.mark.parametrize("context", ["fork", None])
def test_workers_start_at_once_under_fork_and_by_default(context: str | None) -> None:
    """test_process_pool.test_processes_terminate (fork): fork starts every worker at construction,
    as ProcessPoolExecutor does; so does phalanx's default start method (no mp_context)."""
    mp_context = multiprocessing.get_context(context) if context else None
    with phalanx.Executor(3, mp_context=mp_context) as ex:
        assert len(ex._processes) == 3
        assert ex.submit(abs, -1).result(timeout=60) == 1
        assert len(ex._processes) == 3


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_holds_no_result_the_caller_dropped(chunksize: int) -> None:
    """executor.test_free_reference: the result iterator keeps no reference to a result already yielded."""
    with phalanx.Executor(2, local_pickle=True) as ex:
        for obj in ex.map(make, [Plain] * 6, chunksize=chunksize):
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None


def test_processes_are_the_live_workers_as_handles_to_join_or_terminate() -> None:
    """test_shutdown.test_context_manager_shutdown / test_shutdown_no_wait / test_processes_terminate:
    ``_processes`` maps each live worker's pid to a handle; join() returns once it ended."""
    ex = phalanx.Executor(3)
    try:
        assert ex.submit(abs, -1).result(timeout=60) == 1
        procs = ex._processes
        assert len(procs) == 3
        assert all(p.is_alive() and p.pid == pid for pid, p in procs.items())
        victim = next(iter(procs.values()))
        victim.terminate()  # a worker ended from outside is replaced; work goes on
        victim.join(timeout=30)
        assert not victim.is_alive()
        assert ex.submit(abs, -2).result(timeout=60) == 2
    finally:
        procs = _shut_down(ex)
    _all_ended(procs)
    assert ex._processes == {}


_ABORT_SCRIPT = """
import multiprocessing, time, joblib, phalanx.joblib_backend
if __name__ == "__main__":
    try:
        joblib.Parallel(n_jobs=2, backend="phalanx", timeout=0.5)(joblib.delayed(time.sleep)(600) for _ in range(4))
    except (TimeoutError, multiprocessing.TimeoutError):  # joblib raises the latter
        print("timed out")
"""


def test_joblib_abort_stops_running_tasks_so_the_interpreter_can_exit() -> None:
    """test_parallel_timeout_fail (and what joblib's own run hung on at exit): after a Parallel call
    times out, the tasks still running are abandoned with their workers, as loky kills them; the
    process then exits instead of waiting 600 s for them."""
    pytest.importorskip("joblib")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    proc = subprocess.run([sys.executable, "-c", _ABORT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "timed out", proc.stderr
    assert proc.returncode == 0, proc.stderr


def test_joblib_raises_a_workers_keyboard_interrupt_and_restarts_its_workers() -> None:
    """joblib's test_error_capture: a KeyboardInterrupt raised in a worker is raised by ``Parallel``
    as itself; in a managed ``Parallel``, the backend's workers (``_workers``) are then new ones."""
    joblib = pytest.importorskip("joblib")
    import phalanx.joblib_backend  # noqa: F401

    with pytest.raises(KeyboardInterrupt):
        joblib.Parallel(n_jobs=2, backend="phalanx")(joblib.delayed(interrupt)(x) for x in (1, 0))
    with joblib.Parallel(n_jobs=2, backend="phalanx") as parallel:
        first = parallel._backend._workers
        assert first is not None
        with pytest.raises(KeyboardInterrupt):
            parallel(joblib.delayed(interrupt)(x) for x in (1, 0))
        again = parallel._backend._workers
        assert again is not None and again is not first
        assert parallel(joblib.delayed(abs)(-x) for x in range(3)) == [0, 1, 2]
