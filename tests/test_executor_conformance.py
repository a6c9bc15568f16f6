"""Executor conformance: what the standard library documents for executors and
futures, run against both ``ProcessPoolExecutor`` and ``phalanx.Executor``.

Runs in the test (driver) process; the functions run in worker processes
come from ``tests/exec_ops.py`` (plain functions: phalanx names them
implicitly). Every test leaves no process behind (the autouse fixture in
``conftest.py`` checks), and blocking tasks wait on a file (:class:`Gate`)
that teardown always creates, so no test can hang its executor.

Where the two executors differ on purpose, the test asserts each one's
documented behaviour:

========================================  =====================================  ==================================
behaviour                                 ProcessPoolExecutor                    phalanx.Executor
========================================  =====================================  ==================================
argument that cannot be sent              error at ``result()`` (pickling)       ``TypeError`` (EncodeError) at submit
lambda / nested function                  fails at ``result()``                  ``TypeError`` at submit naming
                                                                                 ``local_pickle`` (which runs it)
bound method / partial                    runs (picklable)                       ``TypeError`` at submit naming
                                                                                 ``local_pickle`` (which runs it)
builtin / C function                      runs                                   runs (found by module and name)
unannotated tuple result                  a tuple                                a tuple (a msgpack extension)
worker dies in a task (``os._exit``)      BrokenProcessPool for every pending    WorkerCrashedError for that task only
                                          future; the pool is unusable           (after ``max_attempts`` runs); the
                                                                                 executor keeps working
execution after a crash                   (the pool is broken)                   at-least-once: the task runs again
                                                                                 in the replacement worker
initializer                               runs when a worker starts              runs before a worker's first task
``mp_context``                            the context is used                    only its start method is used
other keywords                            ``TypeError``                          Runtime options; ``credits``
                                                                                 defaults to 2, ``listen`` refused
========================================  =====================================  ==================================

The last rows are phalanx-only tests at the end of the file.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

import phalanx
import exec_ops
from exec_ops import (
    Scaler,
    add,
    die,
    die_first_time,
    fail,
    fail_on,
    identity,
    init_fail,
    init_state,
    make_nested,
    pair,
    parent_value,
    pid,
    power,
    read_inits,
    read_state,
    square,
    unencodable_result,
    wait_for,
)

T = 30.0  # generous bound on any single wait; tests finish far sooner

KINDS = ["process", "phalanx"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


Make = Callable[..., cf.Executor]


@pytest.fixture
def make(kind: str) -> Iterator[Make]:
    """Build executors of this kind; all are shut down (cancelling) at teardown."""
    made: list[cf.Executor] = []

    def factory(max_workers: int = 2, **kwargs: Any) -> cf.Executor:
        ex: cf.Executor
        if kind == "process":
            ex = ProcessPoolExecutor(max_workers, **kwargs)
        else:
            ex = phalanx.Executor(max_workers, **kwargs)
        made.append(ex)
        return ex

    yield factory
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


class Gate:
    """A file that blocked tasks wait for; ``started`` files say they run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.release = str(root / "release")

    def started(self, i: int) -> str:
        return str(self.root / f"started-{i}")

    def wait_started(self, i: int) -> None:
        deadline = time.monotonic() + T
        while not Path(self.started(i)).exists():
            assert time.monotonic() < deadline, f"task {i} never started"
            time.sleep(0.005)

    def open(self) -> None:
        Path(self.release).touch()


@pytest.fixture
def gate(make: Make, tmp_path: Path) -> Iterator[Gate]:
    """Opened at teardown, before the executors are shut down."""
    g = Gate(tmp_path)
    yield g
    g.open()


def block(ex: cf.Executor, gate: Gate, i: int, value: Any = None) -> cf.Future[Any]:
    return ex.submit(wait_for, gate.release, gate.started(i), value)


def occupy(ex: cf.Executor, gate: Gate, n: int = 2) -> list[cf.Future[Any]]:
    """One running task per worker, each known to have started."""
    futures = [block(ex, gate, i, i) for i in range(n)]
    for i in range(n):
        gate.wait_started(i)
    return futures


def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + T
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.005)


# --------------------------------------------------------------------------- #
# Results, exceptions, timeouts
# --------------------------------------------------------------------------- #


def test_submit_returns_result(make: Make) -> None:
    ex = make()
    assert ex.submit(square, 7).result(T) == 49
    assert ex.submit(power, 2, exp=10).result(T) == 1024


def test_exception_is_reraised_with_remote_traceback(make: Make) -> None:
    ex = make()
    fut = ex.submit(fail, "boom")
    exc = fut.exception(T)
    assert isinstance(exc, ValueError) and str(exc) == "boom"
    assert "fail" in str(exc.__cause__)  # the worker's traceback, as __cause__
    with pytest.raises(ValueError, match="boom"):
        fut.result(T)


def test_result_and_exception_time_out(make: Make, gate: Gate) -> None:
    ex = make()
    fut = block(ex, gate, 0, "late")
    with pytest.raises(cf.TimeoutError):
        fut.result(timeout=0.05)
    with pytest.raises(TimeoutError):  # the same class since 3.11
        fut.exception(timeout=0.05)
    gate.open()
    assert fut.result(T) == "late"


def test_future_states(make: Make, gate: Gate) -> None:
    ex = make()
    fut = block(ex, gate, 0, 1)
    gate.wait_started(0)
    assert fut.running() and not fut.done() and not fut.cancelled()
    gate.open()
    assert fut.result(T) == 1
    assert fut.done() and not fut.running() and not fut.cancelled()


def test_annotated_tuple_result_is_a_tuple(make: Make) -> None:
    ex = make()
    assert ex.submit(pair, 3).result(T) == (3, 9)


def test_unannotated_tuple_result(make: Make, kind: str) -> None:
    ex = make()
    value = ex.submit(identity, (1, 2)).result(T)
    assert value == (1, 2) and type(value) is tuple


# --------------------------------------------------------------------------- #
# Cancellation
# --------------------------------------------------------------------------- #


def test_cancel_before_start(make: Make, gate: Gate) -> None:
    ex = make()
    running = occupy(ex, gate)
    queued = [ex.submit(square, i) for i in range(8)]
    last = queued[-1]
    assert last.cancel()
    assert last.cancelled() and last.done() and not last.running()
    with pytest.raises(cf.CancelledError):
        last.result(T)
    gate.open()
    assert [f.result(T) for f in running] == [0, 1]
    assert [f.result(T) for f in queued[:-1]] == [i * i for i in range(7)]


def test_cancel_after_start_fails(make: Make, gate: Gate) -> None:
    ex = make()
    (fut, _) = occupy(ex, gate)
    assert not fut.cancel()
    assert fut.running() and not fut.cancelled()
    gate.open()
    assert fut.result(T) == 0


def test_cancel_after_done_fails(make: Make) -> None:
    ex = make()
    fut = ex.submit(square, 2)
    assert fut.result(T) == 4
    assert not fut.cancel()
    assert not fut.cancelled()


# --------------------------------------------------------------------------- #
# as_completed and wait
# --------------------------------------------------------------------------- #


def test_as_completed_yields_in_completion_order(make: Make, gate: Gate) -> None:
    ex = make()
    slow = block(ex, gate, 0, "slow")
    quick = ex.submit(square, 3)
    it = cf.as_completed([slow, quick], timeout=T)
    assert next(it) is quick
    gate.open()
    assert next(it) is slow
    with pytest.raises(StopIteration):
        next(it)


def test_as_completed_times_out(make: Make, gate: Gate) -> None:
    ex = make()
    slow = block(ex, gate, 0)
    with pytest.raises(cf.TimeoutError):
        list(cf.as_completed([slow], timeout=0.1))


def test_wait_first_completed(make: Make, gate: Gate) -> None:
    ex = make()
    slow = block(ex, gate, 0)
    quick = ex.submit(square, 3)
    done, not_done = cf.wait([slow, quick], timeout=T, return_when=cf.FIRST_COMPLETED)
    assert quick in done and slow in not_done


def test_wait_first_exception(make: Make, gate: Gate) -> None:
    ex = make()
    slow = block(ex, gate, 0)
    failing = ex.submit(fail)
    done, not_done = cf.wait([slow, failing], timeout=T, return_when=cf.FIRST_EXCEPTION)
    assert failing in done and slow in not_done


def test_wait_first_exception_without_one_waits_for_all(make: Make) -> None:
    ex = make()
    futures = [ex.submit(square, i) for i in range(5)]
    done, not_done = cf.wait(futures, timeout=T, return_when=cf.FIRST_EXCEPTION)
    assert done == set(futures) and not not_done


def test_wait_all_completed(make: Make) -> None:
    ex = make()
    futures = [ex.submit(square, i) for i in range(10)] + [ex.submit(fail)]
    done, not_done = cf.wait(futures, timeout=T, return_when=cf.ALL_COMPLETED)
    assert done == set(futures) and not not_done


def test_wait_times_out(make: Make, gate: Gate) -> None:
    ex = make()
    slow = block(ex, gate, 0)
    done, not_done = cf.wait([slow], timeout=0.1)
    assert not done and not_done == {slow}


# --------------------------------------------------------------------------- #
# Callbacks
# --------------------------------------------------------------------------- #


def test_done_callback_runs_once_on_completion(make: Make, gate: Gate) -> None:
    ex = make()
    seen: list[cf.Future[Any]] = []
    fut = block(ex, gate, 0, 5)
    fut.add_done_callback(seen.append)
    assert seen == []
    gate.open()
    assert fut.result(T) == 5
    wait_until(lambda: len(seen) == 1)
    assert seen == [fut]


def test_done_callback_added_after_completion_runs_at_once(make: Make) -> None:
    ex = make()
    fut = ex.submit(square, 2)
    fut.result(T)
    seen: list[tuple[cf.Future[Any], threading.Thread]] = []
    fut.add_done_callback(lambda f: seen.append((f, threading.current_thread())))
    assert seen == [(fut, threading.current_thread())]


def test_done_callback_on_cancel(make: Make, gate: Gate) -> None:
    ex = make()
    occupy(ex, gate)
    queued = [ex.submit(square, i) for i in range(8)]
    seen: list[cf.Future[Any]] = []
    queued[-1].add_done_callback(seen.append)
    assert queued[-1].cancel()
    assert seen == [queued[-1]]


# --------------------------------------------------------------------------- #
# Shutdown
# --------------------------------------------------------------------------- #


def test_shutdown_wait_true_finishes_queued_work(make: Make, gate: Gate) -> None:
    ex = make()
    running = occupy(ex, gate)
    queued = [ex.submit(square, i) for i in range(6)]
    threading.Timer(0.2, gate.open).start()
    ex.shutdown(wait=True)
    assert all(f.done() for f in running + queued)
    assert [f.result() for f in queued] == [i * i for i in range(6)]


def test_shutdown_wait_false_returns_and_work_still_finishes(make: Make, gate: Gate) -> None:
    ex = make()
    running = occupy(ex, gate)
    queued = [ex.submit(square, i) for i in range(6)]
    t0 = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - t0 < 2.0
    assert not any(f.done() for f in running)
    gate.open()
    assert [f.result(T) for f in running] == [0, 1]
    assert [f.result(T) for f in queued] == [i * i for i in range(6)]


def test_shutdown_cancel_futures(make: Make, gate: Gate) -> None:
    ex = make()
    running = occupy(ex, gate)
    queued = [ex.submit(square, i) for i in range(8)]
    ex.shutdown(wait=False, cancel_futures=True)
    wait_until(queued[-1].done)  # ProcessPoolExecutor cancels from its manager thread
    assert queued[-1].cancelled()
    gate.open()
    assert [f.result(T) for f in running] == [0, 1]
    for i, f in enumerate(queued):  # what had started finishes, the rest is cancelled
        assert f.cancelled() or f.result(T) == i * i


def test_submit_after_shutdown_raises(make: Make) -> None:
    ex = make()
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(square, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        list(ex.map(square, [1]))
    ex.shutdown()  # idempotent


def test_context_manager_waits_and_shuts_down(make: Make) -> None:
    with make() as ex:
        futures = [ex.submit(square, i) for i in range(10)]
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


def test_submit_from_many_threads(make: Make) -> None:
    ex = make()
    results: dict[int, int] = {}

    def client(base: int) -> None:
        futures = {base + i: ex.submit(square, base + i) for i in range(25)}
        for k, f in futures.items():
            results[k] = f.result(T)

    threads = [threading.Thread(target=client, args=(100 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert results == {k: k * k for k in results} and len(results) == 100


# --------------------------------------------------------------------------- #
# Initializer
# --------------------------------------------------------------------------- #


def test_initializer_runs_once_per_worker(make: Make, tmp_path: Path) -> None:
    ex = make(initializer=init_state, initargs=(42, str(tmp_path)))
    assert [f.result(T) for f in [ex.submit(read_state) for _ in range(20)]] == [42] * 20
    assert set(f.result(T) for f in [ex.submit(read_inits) for _ in range(20)]) == {1}
    pids = {f.result(T) for f in [ex.submit(pid) for _ in range(20)]}
    marked = {int(p.name.split("-")[1]) for p in tmp_path.glob("init-*")}
    assert pids <= marked  # every worker that ran a task ran the initializer first
    assert list(ex.map(read_state, range(0), chunksize=2)) == []


def test_initializer_applies_to_map(make: Make) -> None:
    ex = make(initializer=init_state, initargs=("m",))
    assert list(ex.map(identity, [1, 2, 3], chunksize=2)) == [1, 2, 3]
    assert ex.submit(read_state).result(T) == "m"


def test_initializer_failure_breaks_the_executor(make: Make, kind: str) -> None:
    ex = make(initializer=init_fail)
    fut = ex.submit(square, 2)
    with pytest.raises(BrokenExecutor):
        fut.result(T)
    with pytest.raises(BrokenExecutor):
        ex.submit(square, 3)
    if kind == "process":
        assert isinstance(fut.exception(), BrokenProcessPool)
    else:
        assert isinstance(fut.exception(), phalanx.RuntimeBrokenError)
        assert "initializer failed on purpose" in str(fut.exception())


# --------------------------------------------------------------------------- #
# What cannot be sent
# --------------------------------------------------------------------------- #


def test_unencodable_argument(make: Make, kind: str) -> None:
    ex = make()
    if kind == "process":
        fut = ex.submit(identity, threading.Lock())  # fails later, when pickled
        with pytest.raises(TypeError, match="pickle"):
            fut.result(T)
    else:
        with pytest.raises(phalanx.EncodeError) as info:  # before anything is sent
            ex.submit(identity, threading.Lock())
        assert isinstance(info.value, TypeError)
    assert ex.submit(square, 4).result(T) == 16  # still usable


def test_unencodable_result(make: Make) -> None:
    ex = make()
    with pytest.raises(TypeError):
        ex.submit(unencodable_result).result(T)
    assert ex.submit(square, 4).result(T) == 16


#: how the stdlib refuses to pickle a local function: "Can't pickle local object ..." up to 3.12,
#: "Can't get local object ..." (an AttributeError) from 3.13
UNPICKLABLE = r"pickle|local object"


def test_lambda(make: Make, kind: str) -> None:
    ex = make()
    if kind == "process":
        with pytest.raises(Exception, match=UNPICKLABLE):
            ex.submit(lambda: 1).result(T)
    else:
        with pytest.raises(TypeError, match="lambda"):
            ex.submit(lambda: 1)


def test_builtin(make: Make, kind: str) -> None:
    ex = make()
    assert ex.submit(abs, -3).result(T) == 3
    assert list(ex.map(pow, [2, 39], [3, 39])) == [8, 39**39]


def test_nested_function_method_and_partial(make: Make, kind: str) -> None:
    ex = make()
    nested, method, partial = make_nested(), Scaler(3).scale, functools.partial(power, exp=3)
    if kind == "process":
        with pytest.raises(Exception, match=UNPICKLABLE):
            ex.submit(nested, 1).result(T)
        assert ex.submit(method, 2).result(T) == 6  # picklable: they run
        assert ex.submit(partial, 2).result(T) == 8
    else:
        with pytest.raises(TypeError, match="inside a function"):
            ex.submit(nested, 1)
        for fn in (method, partial):
            with pytest.raises(TypeError, match="not a function defined at module level.*local_pickle"):
                ex.submit(fn, 2)
    assert ex.submit(square, 5).result(T) == 25


# --------------------------------------------------------------------------- #
# map
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("chunksize", [1, 3, 50])
def test_map_keeps_order(make: Make, chunksize: int) -> None:
    ex = make()
    assert list(ex.map(square, range(20), chunksize=chunksize)) == [i * i for i in range(20)]


def test_map_several_iterables_stops_at_shortest(make: Make) -> None:
    ex = make()
    assert list(ex.map(add, [1, 2, 3], [10, 20])) == [11, 22]


def test_map_empty(make: Make) -> None:
    ex = make()
    assert list(ex.map(square, [])) == []


def test_map_rejects_bad_chunksize(make: Make) -> None:
    ex = make()
    with pytest.raises(ValueError):
        ex.map(square, [1], chunksize=0)


def test_map_raises_at_the_failing_item(make: Make) -> None:
    ex = make()
    it = ex.map(fail_on, range(10), [5] * 10)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="bad item 5"):
        next(it)


def test_map_timeout(make: Make, gate: Gate) -> None:
    ex = make()
    it = ex.map(wait_for, [gate.release], timeout=0.2)
    with pytest.raises(cf.TimeoutError):
        list(it)


def test_map_input_is_read_at_once(make: Make) -> None:
    ex = make()
    consumed: list[int] = []

    def numbers() -> Iterator[int]:
        for i in range(5):
            consumed.append(i)
            yield i

    it = ex.map(square, numbers())
    assert consumed == [0, 1, 2, 3, 4]
    assert list(it) == [0, 1, 4, 9, 16]


def test_map_results_outlive_shutdown(make: Make) -> None:
    with make() as ex:
        it = ex.map(square, range(10), chunksize=3)
    assert list(it) == [i * i for i in range(10)]


def test_map_cancelled_by_shutdown(make: Make, gate: Gate) -> None:
    ex = make()
    occupy(ex, gate)
    it = ex.map(square, range(8))
    ex.shutdown(wait=False, cancel_futures=True)
    gate.open()
    with pytest.raises(cf.CancelledError):
        list(it)


# --------------------------------------------------------------------------- #
# Worker life cycle
# --------------------------------------------------------------------------- #


def test_max_workers_must_be_positive(make: Make) -> None:
    with pytest.raises(ValueError):
        make(0)


def test_max_tasks_per_child_must_be_positive(make: Make) -> None:
    with pytest.raises(ValueError):
        make(1, max_tasks_per_child=0)


def test_max_tasks_per_child_replaces_workers(make: Make) -> None:
    ex = make(1, max_tasks_per_child=2)  # ProcessPoolExecutor picks spawn for this
    pids = [ex.submit(pid).result(T) for _ in range(6)]
    assert len(set(pids)) >= 3


def test_max_tasks_per_child_with_fork(make: Make) -> None:
    fork = multiprocessing.get_context("fork")
    with pytest.raises(ValueError, match="max_tasks_per_child is incompatible with the 'fork'"):
        make(1, mp_context=fork, max_tasks_per_child=2)


def test_worker_dying_in_a_task(make: Make, kind: str) -> None:
    ex = make()
    assert [f.result(T) for f in [ex.submit(square, i) for i in range(10)]] == [i * i for i in range(10)]
    fut = ex.submit(die, 7)
    if kind == "process":
        with pytest.raises(BrokenProcessPool):
            fut.result(T)
        with pytest.raises(BrokenProcessPool):
            ex.submit(square, 1)
    else:
        with pytest.raises(phalanx.WorkerCrashedError) as info:
            fut.result(T)
        assert info.value.exitcode == 7
        assert ex.submit(square, 12).result(T) == 144  # still usable
        assert list(ex.map(square, range(5))) == [0, 1, 4, 9, 16]


# --------------------------------------------------------------------------- #
# The phalanx-specific rows of docs/ecosystem.md's table of differences
# --------------------------------------------------------------------------- #


def test_execution_after_a_crash_is_at_least_once(tmp_path: Path) -> None:
    """A task whose worker died runs again, in another process (ProcessPoolExecutor breaks instead)."""
    log = str(tmp_path / "runs")
    with phalanx.Executor(max_workers=1) as ex:
        pids = ex.submit(die_first_time, log).result(T)
    assert len(pids) == 2 and pids[0] != pids[1]  # the second run, in the replacement worker, returned


class OnlyStartMethod:
    """A stand-in for a multiprocessing context: phalanx asks it for its start method, nothing else."""

    def __init__(self, method: str) -> None:
        self.method = method

    def get_start_method(self) -> str:
        return self.method


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_mp_context_only_its_start_method_is_used(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(exec_ops.STATE, "value", "set in the parent")
    with phalanx.Executor(max_workers=1, mp_context=OnlyStartMethod(method)) as ex:
        assert ex.runtime.config.start_method == method
        inherited = ex.submit(parent_value).result(T)
    assert inherited == ("set in the parent" if method == "fork" else None)


def test_other_keywords_are_runtime_options(make: Make, kind: str) -> None:
    if kind == "process":
        with pytest.raises(TypeError):
            make(1, credits=4)
        return
    ex = make(1, credits=4, max_attempts=2)
    assert (ex.runtime.config.credits, ex.runtime.config.max_attempts) == (4, 2)  # type: ignore[attr-defined]
    assert ex.submit(square, 3).result(T) == 9


def test_credits_default_to_two_and_listen_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PHALANX_CREDITS", raising=False)
    with phalanx.Executor(max_workers=1) as ex:
        assert ex.runtime.config.credits == 2
    with pytest.raises(ValueError, match="local workers only"):
        phalanx.Executor(max_workers=1, listen="tcp://127.0.0.1:0", insecure=True)
    monkeypatch.setenv("PHALANX_LISTEN", "tcp://127.0.0.1:0")
    with pytest.raises(ValueError, match="local workers only"):
        phalanx.Executor(max_workers=1)
