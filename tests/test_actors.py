"""Actors on real worker processes: calls, ordering, lifecycle events, inspect.

Runs in the test (driver) process; the actor types live in ``actor_ops``
(imported by name in the workers). Tests that leave the runtime usable share
``module_runtime``; tests that kill, stop or freeze worker processes get their
own runtime and wait for it to settle (full strength, replacements ready)
before shutting it down.

The event sequences checked are mesh_worker's: Started; Stopped;
RestartFailed with the old instance still answering; Failed.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

import psutil
import pytest

import phalanx
from actor_ops import (
    ActorOpsError,
    BadInit,
    Big,
    Counter,
    Geometry,
    Handover,
    PlainCounter,
    Recorder,
    Shape,
    Vec,
    triple,
    wait_settled,
)

T = 10.0  # seconds: generous bound on any single wait


def take_events(ref: phalanx.ActorRef[Any], n: int, timeout: float = T) -> list[Any]:
    """The first ``n`` events of ``ref`` (waiting up to ``timeout`` for them)."""
    return list(itertools.islice(ref.events(timeout=timeout), n))


def all_events(ref: phalanx.ActorRef[Any]) -> list[Any]:
    """Every event so far, without waiting for more (the log of a live actor)."""
    got: list[Any] = []
    try:
        for event in ref.events(timeout=0.05):
            got.append(event)
    except phalanx.TaskTimeoutError:
        pass
    return got


def shape(events: list[Any]) -> list[tuple[Any, ...]]:
    """Events reduced to what the model predicts: kind and flags."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        if isinstance(e, phalanx.Started):
            out.append(("Started", e.restored))
        elif isinstance(e, phalanx.Failed):
            out.append(("Failed", e.final))
        else:
            out.append((type(e).__name__,))
    return out


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)


# --------------------------------------------------------------------------- #
# 1. Basics
# --------------------------------------------------------------------------- #


def test_spawn_by_class_and_call(module_runtime: phalanx.Runtime) -> None:
    rt = module_runtime
    ref = rt.spawn(Counter, 5)
    assert ref.state == "running"
    assert ref.incr(2).result(timeout=T) == 7
    assert ref.incr().result(timeout=T) == 8
    assert ref.incr(k=10).result(timeout=T) == 18
    assert ref.add_kw(1, b=2, c=3).result(timeout=T) == 321
    assert ref.call("get").result(timeout=T) == 18
    assert take_events(ref, 1) == [phalanx.Started(ref.worker, restored=False)]
    ref.stop()
    ref.join(T)


def test_spawn_kwargs_to_init(module_runtime: phalanx.Runtime) -> None:
    ref = module_runtime.spawn(Counter, 100, step=7)
    assert ref.incr().result(timeout=T) == 107
    ref.stop()
    ref.join(T)


def test_spawn_by_name_on_each_worker(module_runtime: phalanx.Runtime) -> None:
    rt = module_runtime
    pids = rt.worker_pids()
    assert len(pids) == 2
    refs = []
    for wid, pid in pids.items():
        ref = rt.spawn("actor_ops:Counter", 1, on=wid)
        refs.append(ref)
        assert ref.worker == wid
        assert ref.pid().result(timeout=T) == pid
        assert ref.incr(1).result(timeout=T) == 2
    for ref in refs:
        ref.stop()
        ref.join(T)


def test_spawn_on_unknown_worker(module_runtime: phalanx.Runtime) -> None:
    # not a live worker's id, so a worker tag: waited for (here briefly), then NoWorkerError
    with pytest.raises(phalanx.NoWorkerError, match="no-such-worker"):
        module_runtime.spawn(Counter, on="no-such-worker", timeout=0.5)
    with pytest.raises(LookupError):
        module_runtime.spawn(Counter, on="no such worker")  # not even a possible tag
    with pytest.raises(LookupError, match="not live"):
        module_runtime.spawn(Counter, on="w999")  # a worker id, not a tag: no wait


def test_async_method_and_awaitable_future(module_runtime: phalanx.Runtime) -> None:
    ref = module_runtime.spawn(Counter, 0)
    assert ref.aincr(5).result(timeout=T) == 5

    async def main() -> list[int]:
        a = await ref.aincr(1)
        b = await ref.incr(1)
        both = await asyncio.gather(ref.aincr(1), ref.incr(1))
        return [a, b, *both]

    assert asyncio.run(main()) == [6, 7, 8, 9]
    ref.stop()
    ref.join(T)


def test_struct_arguments_and_results(module_runtime: phalanx.Runtime) -> None:
    ref = module_runtime.spawn(Geometry)
    out = ref.scale(Shape("tri", [Vec(1, 2), Vec(-3, 4)]), 3).result(timeout=T)
    assert out == Shape("tri*", [Vec(3, 6), Vec(-9, 12)])
    assert isinstance(out, Shape) and isinstance(out.points[0], Vec)
    assert ref.norm1(Vec(-5, 2)).result(timeout=T) == 7
    origin = ref.origin().result(timeout=T)
    assert origin == Vec(0, 0) and isinstance(origin, Vec)
    # A value of the wrong shape for the annotation fails in the worker, which keeps serving.
    with pytest.raises(TypeError):
        ref.norm1({"x": "not an int", "y": 1}).result(timeout=T)
    assert ref.norm1(Vec(1, 1)).result(timeout=T) == 2
    ref.stop()
    ref.join(T)


def test_method_exception_reraised_and_actor_keeps_serving(module_runtime: phalanx.Runtime) -> None:
    ref = module_runtime.spawn(Counter, 1)
    with pytest.raises(ActorOpsError, match="boom: here") as info:
        ref.boom("here").result(timeout=T)
    cause = info.value.__cause__
    assert isinstance(cause, phalanx.RemoteTraceback)
    assert "boom" in cause.tb and "actor_ops.py" in cause.tb and "ActorOpsError" in cause.tb
    assert ref.incr(1).result(timeout=T) == 2
    assert ref.state == "running"
    ref.stop()
    ref.join(T)


def test_private_and_unknown_methods(module_runtime: phalanx.Runtime) -> None:
    ref = module_runtime.spawn(Counter, 3)
    with pytest.raises(AttributeError):
        ref._secret  # refused locally: nothing is sent
    with pytest.raises(AttributeError):
        ref.call("_secret")
    with pytest.raises(AttributeError, match="nope"):
        ref.nope().result(timeout=T)  # refused by the worker
    with pytest.raises(AttributeError):
        ref.n().result(timeout=T)  # an attribute, not a method
    assert ref.get().result(timeout=T) == 3
    # A method's callable is made once per ref (a pipelined loop asks for it on every call).
    assert ref.get is ref.get and ref.get.__name__ == "get"
    other = module_runtime.spawn(Counter, 4)
    assert other.get is not ref.get and other.get().result(timeout=T) == 4
    other.stop()
    other.join(T)
    with pytest.raises(AttributeError):
        ref._secret  # still refused after other names were cached
    ref.stop()
    ref.join(T)


@pytest.mark.parametrize("name", ["actor_ops:NoSuchActor", "no_such_module_xyz:Actor", "actor_ops:triple"])
def test_unknown_actor_name_worker_keeps_serving(module_runtime: phalanx.Runtime, name: str) -> None:
    rt = module_runtime
    for wid in rt.worker_pids():
        with pytest.raises(phalanx.UnsupportedActorError, match="unsupported worker"):
            rt.spawn(name, on=wid)
        # the same worker still runs tasks and hosts actors
        ref = rt.spawn(Counter, 41, on=wid)
        assert ref.incr().result(timeout=T) == 42
        ref.stop()
        ref.join(T)
    assert rt.submit(triple, 5).result(timeout=T) == 15


def test_malformed_actor_name_fails_locally(module_runtime: phalanx.Runtime) -> None:
    with pytest.raises(phalanx.UnsupportedActorError):
        module_runtime.spawn("NoColonHere")
    with pytest.raises(TypeError):
        module_runtime.spawn(PlainCounter)  # not decorated with @phalanx.actor


def test_init_raising_fails_spawn(module_runtime: phalanx.Runtime) -> None:
    rt = module_runtime
    with pytest.raises(ActorOpsError, match="cannot start: nope") as info:
        rt.spawn(BadInit, "nope")
    assert isinstance(info.value.__cause__, phalanx.RemoteTraceback)
    assert rt.submit(triple, 2).result(timeout=T) == 6
    ref = rt.spawn(Counter)
    assert ref.incr().result(timeout=T) == 1
    ref.stop()
    ref.join(T)


def test_detached_needs_name(module_runtime: phalanx.Runtime) -> None:
    with pytest.raises(ValueError):
        module_runtime.spawn(Counter, detached=True)


# --------------------------------------------------------------------------- #
# 2. Ordering
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("refs", [1, 4], ids=["one-ref", "four-refs"])
def test_ten_thousand_calls_from_four_threads_in_order(module_runtime: phalanx.Runtime, refs: int) -> None:
    """10,000 calls from 4 threads, through one shared ref or through 4 refs (``get_actor``),
    each thread alternating between two of them, each ref used by two threads."""
    rt = module_runtime
    name = f"recorder-{refs}-refs"
    ref = rt.spawn(Recorder, name=name)
    handles = [ref] + [rt.get_actor(name) for _ in range(refs - 1)]
    assert len({id(h) for h in handles}) == refs and all(h.id == ref.id for h in handles)
    per_thread, threads = 2_500, 4
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def caller(tid: int) -> None:
        try:
            mine = [handles[tid % refs], handles[(tid + 1) % refs]]
            barrier.wait()
            futures = [mine[i % 2].append(tid, i) for i in range(per_thread)]
            results[tid] = [f.result(timeout=60) for f in futures]
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join(90)
    elapsed = time.perf_counter() - start
    assert not errors, errors
    assert sorted(results) == list(range(threads))

    log = ref.log().result(timeout=T)
    assert len(log) == per_thread * threads
    for tid in range(threads):
        assert [i for t, i in log if t == tid] == list(range(per_thread)), f"thread {tid} reordered"
        # a thread's results grow: its calls were served in the order it made them
        assert results[tid] == sorted(results[tid])
        # each result is the position of that very call in the log
        for i, count in enumerate(results[tid]):
            assert log[count - 1] == (tid, i)
    counts = sorted(c for r in results.values() for c in r)
    assert counts == list(range(1, per_thread * threads + 1))
    print(f"\n10,000 calls from 4 threads, {refs} ref(s): {elapsed:.2f} s ({10_000 / elapsed:,.0f} calls/s)")
    ref.stop()
    ref.join(T)


# --------------------------------------------------------------------------- #
# 3. Lifecycle and events
# --------------------------------------------------------------------------- #


def test_stop_events_and_calls_after_stop(module_runtime: phalanx.Runtime) -> None:
    ref = module_runtime.spawn(Counter, 0)
    futures = [ref.incr() for _ in range(20)]
    ref.stop()  # lets the calls already made finish
    ref.join(T)
    assert [f.result(timeout=T) for f in futures] == list(range(1, 21))
    assert ref.state == "stopped"
    events = list(ref.events(timeout=T))
    assert shape(events) == [("Started", False), ("Stopped",)]
    with pytest.raises(phalanx.ActorDiedError):
        ref.incr().result(timeout=T)
    with pytest.raises(phalanx.ActorDiedError):
        ref.restart()
    ref.stop()  # idempotent
    ref.join(0.1)


def test_join_times_out_on_running_actor(module_runtime: phalanx.Runtime) -> None:
    ref = module_runtime.spawn(Counter, 0)
    with pytest.raises(phalanx.TaskTimeoutError):
        ref.join(0.1)  # join waits, it does not stop
    assert ref.incr().result(timeout=T) == 1
    ref.stop()
    ref.join(T)


def test_hot_restart_carries_state_to_other_worker(module_runtime: phalanx.Runtime) -> None:
    ref = module_runtime.spawn(Counter, 0)
    for _ in range(5):
        ref.incr(2).result(timeout=T)
    old_worker, old_pid = ref.worker, ref.pid().result(timeout=T)
    assert ref.restart() is True
    assert ref.worker != old_worker
    assert ref.pid().result(timeout=T) != old_pid
    assert module_runtime.worker_pids()[ref.worker] == ref.pid().result(timeout=T)
    info = ref.info().result(timeout=T)
    assert info["n"] == 10 and info["generation"] == 1
    assert ref.incr(1).result(timeout=T) == 11
    assert shape(all_events(ref)) == [("Started", False), ("Started", True)]
    events = all_events(ref)
    assert events[1] == phalanx.Started(ref.worker, restored=True)
    # restart onto a chosen worker (the same one it is on works too)
    assert ref.restart(on=old_worker) is True
    assert ref.worker == old_worker and ref.get().result(timeout=T) == 11
    ref.stop()
    ref.join(T)
    assert shape(list(ref.events(timeout=T))) == [
        ("Started", False), ("Started", True), ("Started", True), ("Stopped",)]


@pytest.mark.parametrize("fail", ["restore", "save"])
def test_failing_restart_reverts_to_old_instance(module_runtime: phalanx.Runtime, fail: str) -> None:
    ref = module_runtime.spawn(Counter, 0)
    ref.incr(7).result(timeout=T)
    worker, pid = ref.worker, ref.pid().result(timeout=T)
    getattr(ref, f"set_fail_{fail}")(True).result(timeout=T)
    assert ref.restart() is False
    events = all_events(ref)
    assert shape(events) == [("Started", False), ("RestartFailed",)]
    assert isinstance(events[1].error, ActorOpsError)
    assert f"{fail} failed on purpose" in str(events[1].error)
    # the old instance is still serving, with its state intact
    assert ref.state == "running" and ref.worker == worker
    assert ref.pid().result(timeout=T) == pid
    assert ref.incr(1).result(timeout=T) == 8
    assert ref.info().result(timeout=T)["generation"] == 0
    # and once the fault is gone, a restart succeeds
    getattr(ref, f"set_fail_{fail}")(False).result(timeout=T)
    assert ref.restart() is True
    assert ref.get().result(timeout=T) == 8
    ref.stop()
    ref.join(T)
    assert shape(list(ref.events(timeout=T))) == [
        ("Started", False), ("RestartFailed",), ("Started", True), ("Stopped",)]


def test_restart_without_hooks_reverts(module_runtime: phalanx.Runtime) -> None:
    ref = module_runtime.spawn(Geometry)  # no save(): the restart cannot take its state
    assert ref.restart() is False
    assert shape(all_events(ref)) == [("Started", False), ("RestartFailed",)]
    assert ref.origin().result(timeout=T) == Vec(0, 0)
    ref.stop()
    ref.join(T)


def test_kill_without_restart_policy_fails_final(runtime: phalanx.Runtime) -> None:
    rt = runtime
    ref = rt.spawn(Counter, 0)
    ref.incr(3).result(timeout=T)
    pid = ref.pid().result(timeout=T)
    blocked = ref.sleep(30)
    queued = [ref.incr() for _ in range(10)]
    time.sleep(0.2)  # the sleep is running in the worker
    start = time.monotonic()
    kill(pid)
    for fut in [blocked, *queued]:
        with pytest.raises(phalanx.ActorDiedError):
            fut.result(timeout=T)
    assert time.monotonic() - start < 5.0
    ref.join(T)
    assert ref.state == "failed"
    events = list(ref.events(timeout=T))
    assert shape(events) == [("Started", False), ("Failed", True)]
    assert isinstance(events[-1].error, phalanx.ActorDiedError)
    with pytest.raises(phalanx.ActorDiedError):
        ref.incr().result(timeout=T)
    wait_settled(rt, workers=2, deaths=1)


def test_supervised_restart_from_checkpoint(runtime: phalanx.Runtime) -> None:
    rt = runtime
    ref = rt.spawn(Counter, 0, restart_policy="on-failure", checkpoint_every=1)
    for _ in range(5):
        ref.incr(3).result(timeout=T)
    worker, pid = ref.worker, ref.pid().result(timeout=T)
    kill(pid)
    events = take_events(ref, 3)
    assert shape(events) == [("Started", False), ("Failed", False), ("Started", True)]
    assert isinstance(events[1].error, phalanx.ActorDiedError)
    assert ref.state == "running"
    assert ref.worker != worker
    assert ref.get().result(timeout=T) == 15
    assert ref.incr(1).result(timeout=T) == 16
    new_pid = ref.pid().result(timeout=T)
    assert new_pid != pid and rt.worker_pids()[ref.worker] == new_pid
    wait_settled(rt, workers=2, deaths=1)
    ref.stop()
    ref.join(T)
    assert shape(list(ref.events(timeout=T)))[-1] == ("Stopped",)


def test_supervised_restart_resumes_last_checkpoint_not_last_value(runtime: phalanx.Runtime) -> None:
    rt = runtime
    ref = rt.spawn(Counter, 0, restart_policy="on-failure", checkpoint_every=3)
    pid = ref.pid().result(timeout=T)                              # call 1
    values = [ref.incr().result(timeout=T) for _ in range(4)]      # calls 2..5; checkpoint after call 3
    assert values == [1, 2, 3, 4]
    kill(pid)
    assert shape(take_events(ref, 3)) == [("Started", False), ("Failed", False), ("Started", True)]
    assert ref.get().result(timeout=T) == 2  # the state saved after the third call
    wait_settled(rt, workers=2, deaths=1)
    ref.stop()
    ref.join(T)


def test_supervised_restart_from_time_based_checkpoint(runtime: phalanx.Runtime) -> None:
    """checkpoint_interval: a call made T seconds after the last save is followed by a save."""
    rt = runtime
    interval = 0.2
    where = next(iter(rt.worker_pids()))  # both on one worker: one kill takes both
    timed = rt.spawn(Counter, 0, on=where, restart_policy="on-failure", checkpoint_every=10_000,
                     checkpoint_interval=interval)
    untimed = rt.spawn(Counter, 0, on=where, restart_policy="on-failure", checkpoint_every=10_000)
    pid = timed.pid().result(timeout=T)
    assert untimed.pid().result(timeout=T) == pid
    for ref in (timed, untimed):
        assert [ref.incr(2).result(timeout=T) for _ in range(3)] == [2, 4, 6]
    # Any save so far happened before a reply that has arrived: T from now, the interval
    # has passed for the worker too (one monotonic clock per machine).
    since = time.monotonic()
    wait_until(lambda: time.monotonic() >= since + interval, "the checkpoint interval to pass")
    assert timed.incr(1).result(timeout=T) == 7  # a checkpoint (n == 7) goes out before this reply
    assert untimed.incr(1).result(timeout=T) == 7  # 4 calls of 10,000: no checkpoint
    kill(pid)
    assert shape(take_events(timed, 3)) == [("Started", False), ("Failed", False), ("Started", True)]
    assert shape(take_events(untimed, 3)) == [("Started", False), ("Failed", False), ("Started", False)]
    assert timed.get().result(timeout=T) == 7  # resumed from the time-based checkpoint
    assert untimed.get().result(timeout=T) == 0  # started afresh
    wait_settled(rt, workers=2, deaths=1)
    for ref in (timed, untimed):
        ref.stop()
        ref.join(T)


def test_supervised_restart_in_flight_calls_fail_later_calls_succeed(runtime: phalanx.Runtime) -> None:
    rt = runtime
    ref = rt.spawn(Counter, 0, restart_policy="on-failure", checkpoint_every=1)
    ref.incr(4).result(timeout=T)
    pid = ref.pid().result(timeout=T)
    blocked = ref.sleep(30)
    queued = [ref.incr() for _ in range(5)]
    time.sleep(0.2)
    kill(pid)
    for fut in [blocked, *queued]:
        with pytest.raises(phalanx.ActorDiedError):
            fut.result(timeout=T)
    assert shape(take_events(ref, 3)) == [("Started", False), ("Failed", False), ("Started", True)]
    assert ref.incr(1).result(timeout=T) == 5
    wait_settled(rt, workers=2, deaths=1)
    ref.stop()
    ref.join(T)


def test_supervision_intensity_limit(runtime: phalanx.Runtime) -> None:
    """After max_restarts (3) within the window, the next death is final."""
    rt = runtime
    ref = rt.spawn(Counter, 0, restart_policy="on-failure", checkpoint_every=1)
    expected = [("Started", False)]
    for k in range(4):
        ref.incr(1).result(timeout=T)
        kill(ref.pid().result(timeout=T))
        if k < 3:
            expected += [("Failed", False), ("Started", True)]
        else:
            expected += [("Failed", True)]
        assert shape(take_events(ref, len(expected))) == expected
        wait_settled(rt, workers=2, deaths=k + 1)
        if k < 3:
            assert ref.get().result(timeout=T) == k + 1
    ref.join(T)
    assert ref.state == "failed"
    with pytest.raises(phalanx.ActorDiedError):
        ref.get().result(timeout=T)


def restart_while_calling(ref: phalanx.ActorRef[Any], restart: Callable[[], bool],
                          times: int) -> tuple[list[bool], list[str]]:
    """Restart ``ref`` (a Recorder) ``times`` times while a thread keeps calling it.

    Checks that no call was lost or reordered: every result is the call's
    position, and the log holds every call once, in order. Returns the
    outcomes of the restarts and the worker after each (the first: before).
    """
    stop = threading.Event()
    futures: list[phalanx.Future[int]] = []
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            i = 0
            while not stop.is_set():
                futures.append(ref.append(0, i))
                i += 1
                if i % 64 == 0:
                    time.sleep(0.0005)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=caller)
    th.start()
    outcomes = []
    workers = [ref.worker]
    try:
        for _ in range(times):
            time.sleep(0.03)
            outcomes.append(restart())
            workers.append(ref.worker)
    finally:
        stop.set()
        th.join(T)
    assert not errors, errors
    results = [f.result(timeout=T) for f in futures]
    assert results == list(range(1, len(futures) + 1)), "a call was lost or reordered"
    assert ref.log().result(timeout=T) == [(0, i) for i in range(len(futures))]
    assert len(futures) > 100
    return outcomes, workers


@pytest.mark.parametrize("fail_restore", [False, True])
def test_calls_during_hot_restart_none_lost(module_runtime: phalanx.Runtime, fail_restore: bool) -> None:
    """Calls made during hot restarts reach the new instance, or, when restore() raises on the
    new instance (RestartFailed, revert), the old one: in order, none lost."""
    ref = module_runtime.spawn(Recorder)
    pid = ref.pid().result(timeout=T)
    assert ref.set_fail_restore(fail_restore).result(timeout=T) is fail_restore
    outcomes, workers = restart_while_calling(ref, ref.restart, 6)
    events = all_events(ref)
    if fail_restore:
        assert outcomes == [False] * 6
        assert len(set(workers)) == 1 and ref.pid().result(timeout=T) == pid  # the old instance served
        assert shape(events) == [("Started", False)] + [("RestartFailed",)] * 6
        assert all(isinstance(e.error, ActorOpsError) and "restore failed" in str(e.error) for e in events[1:])
    else:
        assert outcomes == [True] * 6
        assert all(a != b for a, b in zip(workers, workers[1:]))
        assert shape(events) == [("Started", False)] + [("Started", True)] * 6
    ref.stop()
    ref.join(T)


def test_calls_during_hot_restart_to_no_live_worker_none_lost(module_runtime: phalanx.Runtime) -> None:
    """A hot restart whose placement fails (no live worker of the tag; nothing waits for one)
    after the state was taken: RestartFailed, and the calls held meanwhile reach the old instance."""
    ref = module_runtime.spawn(Recorder)
    outcomes, workers = restart_while_calling(ref, lambda: ref.restart(on="no-such-worker"), 3)
    assert outcomes == [False] * 3
    assert len(set(workers)) == 1
    events = all_events(ref)
    assert shape(events) == [("Started", False)] + [("RestartFailed",)] * 3
    assert all(isinstance(e.error, LookupError) for e in events[1:])
    ref.stop()
    ref.join(T)


def test_calls_during_failing_hot_restart_delivered_to_old_instance(module_runtime: phalanx.Runtime) -> None:
    ref = module_runtime.spawn(Counter, 0)
    ref.set_fail_restore(True).result(timeout=T)
    stop = threading.Event()
    futures: list[phalanx.Future[int]] = []

    def caller() -> None:
        while not stop.is_set():
            futures.append(ref.incr(1))
            if len(futures) % 64 == 0:
                time.sleep(0.0005)

    th = threading.Thread(target=caller)
    th.start()
    try:
        outcomes = []
        for _ in range(5):
            time.sleep(0.03)
            outcomes.append(ref.restart())
    finally:
        stop.set()
        th.join(T)
    assert outcomes == [False] * 5
    assert [f.result(timeout=T) for f in futures] == list(range(1, len(futures) + 1))
    assert ref.info().result(timeout=T)["generation"] == 0
    assert shape(all_events(ref)) == [("Started", False)] + [("RestartFailed",)] * 5
    ref.stop()
    ref.join(T)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = T) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` (a bound, never a timing claim)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def live_instances(rt: phalanx.Runtime, cls: str) -> int:
    """Instances of actor type ``cls`` that the live workers themselves hold (not the driver's view)."""
    replies, live = rt._driver.inspect(T)
    assert len(replies) == len(live), "a worker did not answer"
    return sum(1 for reply in replies.values() for a in reply.actors if a.cls == cls)


#: case -> (where the restart is paused when the old process is killed, restore() fails,
#:          restart_policy, events, results of the calls held meanwhile (None: ActorDiedError),
#:          instances ever started)
OLD_PROCESS_DIES: dict[str, tuple[str, bool, str, list[tuple[Any, ...]], list[int] | None, int]] = {
    # the state never left the old process: as any death of it
    "in-save": ("save", False, "never", [("Started", False), ("Failed", True)], None, 1),
    "in-save-supervised": ("save", False, "on-failure",
                           [("Started", False), ("Failed", False), ("Started", False)], [1, 2, 3, 4, 5], 2),
    # the state was handed over: the new instance takes over if it starts...
    "after-handover": ("restore", False, "never", [("Started", False), ("Started", True)], [4, 5, 6, 7, 8], 2),
    # ...else nothing is left to revert to: Failed (final, or supervised)
    "after-handover-restore-fails": ("restore", True, "never", [("Started", False), ("Failed", True)], None, 1),
    "after-handover-restore-fails-supervised": ("restore", True, "on-failure",
                                                [("Started", False), ("Failed", False), ("Started", False)],
                                                [1, 2, 3, 4, 5], 2),
}


def restart_in_thread(ref: phalanx.ActorRef) -> tuple[threading.Thread, list[bool | BaseException]]:
    """Start ``ref.restart()`` in a thread; the list gets its result or exception."""
    outcome: list[bool | BaseException] = []

    def restart() -> None:
        try:
            outcome.append(ref.restart(timeout=T))
        except BaseException as exc:
            outcome.append(exc)

    th = threading.Thread(target=restart)
    th.start()
    return th, outcome


@pytest.mark.parametrize("case", list(OLD_PROCESS_DIES))
def test_old_process_dies_during_hot_restart(runtime: phalanx.Runtime, tmp_path: Path, case: str) -> None:
    """The old instance's process is SIGKILLed while a hot restart is paused (in save(), or in
    restore() on the new worker once the state was taken): one owner settles it, with one
    outcome and one set of events; no call hangs; never two live instances."""
    rt = runtime
    hold, fail_restore, policy, expected, held_results, started = OLD_PROCESS_DIES[case]
    flags = str(tmp_path)
    ref = rt.spawn(Handover, flags, hold, fail_restore, restart_policy=policy)
    assert [ref.incr().result(timeout=T) for _ in range(3)] == [1, 2, 3]
    pid = ref.pid().result(timeout=T)
    th, outcome = restart_in_thread(ref)
    try:
        paused = tmp_path / ("saving" if hold == "save" else "restoring")
        wait_until(paused.exists, f"the hot restart to reach {paused.name}")
        assert ref.state == "restarting"
        held = [ref.incr() for _ in range(5)]  # held until an instance takes over
        kill(pid)
        wait_until(lambda: rt.stats().worker_deaths >= 1, "the runtime to notice the death")
    finally:
        (tmp_path / "go").touch()  # restore() (if paused there) goes on
        th.join(T)
    assert not th.is_alive()
    assert outcome == [case == "after-handover"]
    events = take_events(ref, len(expected))
    assert shape(events) == expected
    failed = [e for e in events if isinstance(e, phalanx.Failed)]
    assert all(isinstance(e.error, phalanx.ActorDiedError) for e in failed)
    if fail_restore:
        assert "during a hot restart" in str(failed[0].error)
        assert isinstance(failed[0].error.__cause__, ActorOpsError)
    if held_results is None:
        for fut in held:
            with pytest.raises(phalanx.ActorDiedError):
                fut.result(timeout=T)
        ref.join(T)
        assert ref.state == "failed"
    else:
        assert [f.result(timeout=T) for f in held] == held_results
        assert ref.state == "running" and ref.pid().result(timeout=T) != pid
    wait_settled(rt, workers=2, deaths=1)
    assert shape(all_events(ref)) == expected, "a second owner acted on the death"
    assert len((tmp_path / "instances").read_text().split("\n")[:-1]) == started
    assert live_instances(rt, "actor_ops:Handover") == (0 if held_results is None else 1)
    if held_results is not None:
        ref.stop()
        ref.join(T)


def test_new_process_dies_as_hot_restart_starts(runtime: phalanx.Runtime, tmp_path: Path) -> None:
    """The new instance's process dies right after restore() returned, before the driver
    records the move: the restart reverts (the old instance serves the held calls) instead of
    leaving the actor "running" on a dead worker.

    To make the interleaving certain, the test holds the actor's driver-side lock (the one
    the move is recorded under) from before restore() returns until the death is seen."""
    rt = runtime
    flags = str(tmp_path)
    ref = rt.spawn(Handover, flags, "restore")
    assert [ref.incr().result(timeout=T) for _ in range(3)] == [1, 2, 3]
    pid = ref.pid().result(timeout=T)
    th, outcome = restart_in_thread(ref)
    try:
        wait_until((tmp_path / "restoring").exists, "restore() to begin")
        target = int((tmp_path / "restoring").read_text().split()[0])
        assert target != pid
        held = [ref.incr() for _ in range(5)]
        with ref._actor.lock:
            (tmp_path / "go").touch()
            wait_until(lambda: f"restore {target}" in (tmp_path / "instances").read_text(),
                       "restore() to return")
            kill(target)
            wait_until(lambda: rt.stats().worker_deaths >= 1, "the runtime to notice the death")
    finally:
        (tmp_path / "go").touch()
        th.join(T)
    assert outcome == [False]
    assert shape(take_events(ref, 2)) == [("Started", False), ("RestartFailed",)]
    assert [f.result(timeout=T) for f in held] == [4, 5, 6, 7, 8]
    assert ref.state == "running" and ref.pid().result(timeout=T) == pid
    wait_settled(rt, workers=2, deaths=1)
    assert shape(all_events(ref)) == [("Started", False), ("RestartFailed",)]
    assert live_instances(rt, "actor_ops:Handover") == 1
    ref.stop()
    ref.join(T)


def wait_gone(rt: phalanx.Runtime, name: str, timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            handle = rt.get_actor(name)
        except LookupError:
            return
        del handle
        assert time.monotonic() < deadline, f"actor {name!r} still running after its last ref was dropped"
        time.sleep(0.01)


def test_dropping_last_ref_stops_actor(module_runtime: phalanx.Runtime) -> None:
    rt = module_runtime
    ref = rt.spawn(Counter, 1, name="drop-me")
    other = rt.get_actor("drop-me")
    assert other.id == ref.id
    del ref
    gc.collect()
    # another ref is still held: the actor keeps running
    assert other.incr().result(timeout=T) == 2
    actor_id = other.id
    del other
    gc.collect()
    wait_gone(rt, "drop-me")
    deadline = time.monotonic() + T
    while any(a.id == actor_id for w in rt.inspect().workers for a in w.actors):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # the name is free again
    again = rt.spawn(Counter, 0, name="drop-me")
    assert again.incr().result(timeout=T) == 1
    again.stop()
    again.join(T)


def test_detached_actor_survives_del(module_runtime: phalanx.Runtime) -> None:
    rt = module_runtime
    ref = rt.spawn(Counter, 10, name="keeper", detached=True)
    actor_id = ref.id
    del ref
    gc.collect()
    time.sleep(0.2)
    found = rt.get_actor("keeper")
    assert found.id == actor_id
    assert found.incr().result(timeout=T) == 11
    with pytest.raises(ValueError):
        rt.spawn(Counter, name="keeper")  # the name is taken
    found.stop()
    found.join(T)
    with pytest.raises(LookupError):
        rt.get_actor("keeper")


# --------------------------------------------------------------------------- #
# 4. Inspect
# --------------------------------------------------------------------------- #


def test_inspect_tree(module_runtime: phalanx.Runtime, tmp_path: Path) -> None:
    rt = module_runtime
    ref = rt.spawn(Counter, 0)
    for _ in range(3):
        ref.incr().result(timeout=T)
    tree = rt.inspect()
    assert isinstance(tree, phalanx.RuntimeTree)
    assert {w.id: w.pid for w in tree.workers} == rt.worker_pids()
    assert all(w.resolved and w.rss > 0 for w in tree.workers)
    hosts = [w for w in tree.workers if any(a.id == ref.id for a in w.actors)]
    assert [w.id for w in hosts] == [ref.worker]
    node = next(a for a in hosts[0].actors if a.id == ref.id)
    assert node.cls == "actor_ops:Counter" and node.state == "running"
    assert node.calls == 3 and node.mailbox == 0
    text = str(tree)
    assert "worker" in text and "actor_ops:Counter" in text
    assert all(f"pid {pid}" in text for pid in rt.worker_pids().values())
    # the ref's own view: only the worker that hosts it
    mine = ref.inspect()
    assert [w.id for w in mine.workers] == [ref.worker]
    # A busy actor shows its mailbox: calls sent while its first call holds it are read when
    # that call ends, and wait there while the second call holds it in turn.
    first, rest = tmp_path / "first", tmp_path / "rest"
    futures = [ref.hold(str(first))] + [ref.hold(str(rest)) for _ in range(3)]
    first.touch()
    seen = 0
    deadline = time.monotonic() + T
    while time.monotonic() < deadline and not seen:
        w = next(w for w in rt.inspect().workers if w.id == ref.worker)
        seen = max((a.mailbox for a in w.actors if a.id == ref.id), default=0)
        time.sleep(0.02)
    rest.touch()
    for f in futures:
        f.result(timeout=T)
    assert seen >= 1
    ref.stop()
    ref.join(T)


def test_inspect_frozen_worker_is_unresolved(runtime: phalanx.Runtime) -> None:
    rt = runtime
    ref = rt.spawn(Counter, 0)
    assert ref.incr().result(timeout=T) == 1
    frozen = ref.worker
    pid = rt.worker_pids()[frozen]
    kill(pid, signal.SIGSTOP)
    try:
        # The stop takes effect asynchronously: wait until every thread is stopped.
        deadline = time.monotonic() + T
        while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        start = time.monotonic()
        tree = rt.inspect(timeout=0.5)
        elapsed = time.monotonic() - start
        by_id = {w.id: w for w in tree.workers}
        assert by_id[frozen].resolved is False
        assert by_id[frozen].pid == pid
        assert [a.id for a in by_id[frozen].actors] == [ref.id]  # known from the driver's side
        assert all(w.resolved for wid, w in by_id.items() if wid != frozen)
        assert "unresolved" in str(tree)
        assert elapsed < 3.0
    finally:
        kill(pid, signal.SIGCONT)
    assert ref.incr().result(timeout=T) == 2
    deadline = time.monotonic() + T
    while not all(w.resolved for w in rt.inspect().workers):
        assert time.monotonic() < deadline
    ref.stop()
    ref.join(T)


# --------------------------------------------------------------------------- #
# 5. Hot restart of a large state; 7. throughput next to BaseManager
# --------------------------------------------------------------------------- #


def test_hot_restart_of_10_mb_state(module_runtime: phalanx.Runtime) -> None:
    ref = module_runtime.spawn(Big, 10 * 2**20)
    size, crc, tag = ref.digest().result(timeout=T)
    assert size == 10 * 2**20 and tag == 0
    times = []
    for k in range(3):
        before = ref.worker
        start = time.perf_counter()
        assert ref.restart(timeout=30) is True
        times.append(time.perf_counter() - start)
        assert ref.worker != before
        assert ref.digest().result(timeout=T) == (size, crc, k + 1)
    print(f"\nhot restart of a 10 MiB state: {', '.join(f'{t * 1000:.0f} ms' for t in times)} "
          f"(best {min(times) * 1000:.0f} ms)")
    ref.stop()
    ref.join(T)


class _Manager(BaseManager):
    pass


_Manager.register("PlainCounter", PlainCounter)


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>9,.0f} calls/s"


def test_throughput_vs_basemanager(module_runtime: phalanx.Runtime) -> None:
    n = 2_000
    ref = module_runtime.spawn(Counter, 0)
    ref.incr(0).result(timeout=T)  # warm up

    start = time.perf_counter()
    for _ in range(n):
        ref.incr(1).result(timeout=T)
    phx_seq = time.perf_counter() - start

    start = time.perf_counter()
    futures = [ref.incr(1) for _ in range(n)]
    last = [f.result(timeout=T) for f in futures][-1]
    phx_pipe = time.perf_counter() - start
    assert last == 2 * n
    ref.stop()
    ref.join(T)

    manager = _Manager(ctx=multiprocessing.get_context("spawn"))
    manager.start()
    try:
        proxy = manager.PlainCounter()  # type: ignore[attr-defined]
        proxy.incr(0)
        start = time.perf_counter()
        for _ in range(n):
            proxy.incr(1)
        mgr_seq = time.perf_counter() - start

        # BaseManager proxies have no pipelining: the closest is 4 threads, one connection each.
        def burst() -> None:
            for _ in range(n // 4):
                proxy.incr(1)

        pool = [threading.Thread(target=burst) for _ in range(4)]
        start = time.perf_counter()
        for th in pool:
            th.start()
        for th in pool:
            th.join(60)
        mgr_par = time.perf_counter() - start
        assert proxy.incr(0) == 2 * n
        del proxy
    finally:
        manager.shutdown()

    print(f"\n{n} actor calls          sequential           pipelined / concurrent")
    print(f"phalanx actor       {_rate(n, phx_seq)}    {_rate(n, phx_pipe)} (pipelined futures)")
    print(f"BaseManager proxy   {_rate(n, mgr_seq)}    {_rate(n, mgr_par)} (4 threads, no pipelining)")
    print("ray: not installed")


def _unused() -> Iterator[None]:  # pragma: no cover - keeps the typing imports honest
    yield
