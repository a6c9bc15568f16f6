"""Attacks on the driver's reading paths: a caller reading its own reply, a submitting thread's read.

A waiting caller (``phalanx.direct``) reads and delivers outcomes of other
futures than its own; a thread submitting behind every credit reads them too
(``LocalPipes.help``). Whatever interrupts such a thread (a signal handler
raising KeyboardInterrupt in the main thread, a done-callback that itself
waits or submits, a worker killed meanwhile), every outcome it took must still
reach its future exactly once, and the next wait must work.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import select
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import phalanx

import actor_ops
import ops
from pump_hold import PumpHeld

pytestmark = pytest.mark.timeout(120)


def _when_waiting(rt: phalanx.Runtime, then: object) -> threading.Thread:
    """A thread that runs ``then()`` once a caller waits in the direct read."""
    def run() -> None:
        direct = rt._driver.direct
        while not direct.waiting:
            threading.Event().wait(0.001)
        then()  # type: ignore[operator]
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _each_time_counted(count: collections.Counter[int], lock: threading.Lock, marks: tuple[int, ...],
                       pause: float, act: Callable[[], object]) -> None:
    """Call ``act`` each time the threads' total in ``count`` reaches the next of ``marks``."""
    for at in marks:
        for _ in range(60000):
            with lock:
                if sum(count.values()) >= at:
                    break
            threading.Event().wait(pause)
        act()


def _join_all(threads: list[threading.Thread]) -> None:
    for th in threads:
        th.join(90)
    assert not any(th.is_alive() for th in threads)


def test_a_keyboard_interrupt_in_a_callback_run_by_a_waiting_caller_loses_no_other_outcome(
        tmp_path: Path) -> None:
    """SIGINT lands while the main thread, waiting in result(), delivers the outcomes it read:
    KeyboardInterrupt leaves result(), and every other outcome still reaches its future (before,
    those after the interrupted one in the same read were dropped: their futures never settled)."""
    release = tmp_path / "release"
    calls: collections.Counter[int] = collections.Counter()
    on_main: list[bool] = []

    def interrupt(_: object) -> None:
        on_main.append(threading.current_thread() is threading.main_thread())
        if on_main[-1]:
            signal.raise_signal(signal.SIGINT)  # its handler raises here, in the callback

    def counted(i: int) -> object:
        def callback(_: object) -> None:
            calls[i] += 1
        return callback

    with phalanx.Runtime(workers=1, credits=64) as rt:
        straggler = rt.submit(ops.square_after, 0, str(release))
        futures = [rt.submit(ops.inc, i) for i in range(40)]
        futures[20].add_done_callback(interrupt)
        for i, fut in enumerate(futures):
            fut.add_done_callback(counted(i))
        helper = _when_waiting(rt, release.touch)
        interrupted = False
        try:
            futures[-1].result(timeout=60)
        except KeyboardInterrupt:
            interrupted = True
        helper.join(30)
        assert on_main == [True] and interrupted  # the attack ran as meant
        assert straggler.result(timeout=30) == 0
        assert [f.result(timeout=30) for f in futures] == [i + 1 for i in range(40)]
        # The thread's next wait works (its waiter is not left busy, nor in a future's waiters).
        assert rt.submit(ops.inc, 1).result(timeout=30) == 2
        assert all(not f._waiters for f in futures)
        deadline = threading.Event()
        for _ in range(300):
            if len(calls) == 39:
                break
            deadline.wait(0.01)
        # (future 20's callbacks after the interrupted one are skipped, as concurrent.futures does)
        assert set(calls.values()) == {1} and sorted(calls) == [i for i in range(40) if i != 20]
        assert rt._driver.broken is None


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_keyboard_interrupt_between_two_pipe_reads_of_a_waiting_caller_loses_no_outcome(
        tmp_path: Path) -> None:
    """The main thread, waiting in result(), read one worker's outcome and waits for the next
    worker's reader lock when SIGINT arrives: what it read and resolved is still delivered (before,
    it was resolved but never delivered, and the worker's pipe stayed marked as being delivered
    from, so the pump never read it again)."""
    release = tmp_path / "release"
    caught = threading.Event()
    main = threading.main_thread().ident
    assert main is not None

    with phalanx.Runtime(workers=3, credits=1) as rt:
        pump = PumpHeld(rt)  # it reads no pipe from now on: the waiting caller does
        pipes = rt._driver.pipes
        assert len(pipes.piped) == 3
        # One task per worker (one credit each): two wait for the file, one answers at once.
        gated = [rt.submit(ops.square_after, 0, str(release)) for _ in range(2)]
        quick = rt.submit(ops.inc, 1)
        held = threading.Lock()
        held.acquire()
        armed: list[bool] = []

        def hold_the_second_reader(first_w: Any, second_w: Any) -> None:
            with second_w.reader:
                held.release()
                while not first_w.delivering:  # the caller read the first pipe, then waits for this lock
                    threading.Event().wait(0.001)
                signal.pthread_kill(main, signal.SIGINT)  # type: ignore[arg-type]
                caught.wait(30)

        def on_quick(_: object) -> None:  # run by the main thread, delivering what it read
            if threading.current_thread().ident != main:
                return
            busy = [w for w in pipes.piped if w.inflight]  # the gated tasks' workers, in poll order
            assert len(busy) == 2
            fds = [w.pipe.fileno() for w in busy]
            threading.Thread(target=hold_the_second_reader, args=busy, daemon=True).start()
            held.acquire()
            release.touch()
            for _ in range(30000):  # until both outcomes wait in their pipes: one poll sees both
                if _readable(fds[0]) and _readable(fds[1]):
                    armed.append(True)
                    return
                threading.Event().wait(0.001)

        quick.add_done_callback(on_quick)
        try:
            try:
                gated[0].result(timeout=60)
            except KeyboardInterrupt:
                caught.set()
            assert armed and caught.is_set()  # the attack ran as meant
        finally:
            caught.set()
            pump.release()
        assert [f.result(timeout=30) for f in (*gated, quick)] == [0, 0, 2]
        assert pump.first.result(timeout=30) == 1
        assert rt.submit(ops.inc, 3).result(timeout=30) == 4
        assert rt._driver.broken is None


def test_threads_mixing_every_kind_of_wait_with_nested_waits_and_a_worker_killed(tmp_path: Path) -> None:
    """Six threads at once: submit then result with short timeouts, map, as_completed, pipelined
    actor calls, and done-callbacks that submit and wait on another future (a wait nested in the
    caller's delivery, on the same thread); a worker is SIGKILLed meanwhile. Every future settles
    (a value, or a phalanx error of the lost worker), every callback runs once, no thread hangs."""
    import random

    errors: list[BaseException] = []
    calls: collections.Counter[tuple[int, int]] = collections.Counter()
    progress = collections.Counter[int]()
    expected: set[tuple[int, int]] = set()
    lock = threading.Lock()

    with phalanx.Runtime(workers=3, credits=2) as rt:
        counters = [rt.spawn(actor_ops.Counter) for _ in range(2)]

        def settle(fut: phalanx.Future[object], want: object) -> None:
            try:
                got = fut.result(timeout=60)
            except phalanx.errors.PhalanxError:
                return  # the killed worker's
            assert got == want or want is None, (got, want)

        def nested(key: tuple[int, int]) -> object:
            def callback(_: object) -> None:
                with lock:
                    calls[key] += 1
                inner = rt.submit(ops.inc, key[1])
                if threading.current_thread().name != "phalanx-pump":  # (the pump must never wait)
                    settle(inner, key[1] + 1)
            return callback

        def run(t: int) -> None:
            rng = random.Random(t)
            try:
                for i in range(250):
                    kind = rng.randrange(5)
                    if kind == 0:
                        fut = rt.submit(ops.inc, i)
                        try:
                            fut.result(timeout=rng.choice([0, 0.0005, 0.002]))
                        except TimeoutError:
                            pass
                        except phalanx.errors.PhalanxError:
                            pass
                        settle(fut, i + 1)
                    elif kind == 1:
                        try:
                            assert list(rt.map(ops.inc, range(i % 17), timeout=60)) == [x + 1 for x in range(i % 17)]
                        except phalanx.errors.PhalanxError:
                            pass
                    elif kind == 2:
                        futs = [rt.submit(ops.inc, x) for x in range(8)]
                        for fut in concurrent.futures.as_completed(futs, timeout=60):
                            settle(fut, None)
                    elif kind == 3:
                        ref = counters[rng.randrange(2)]
                        futs = [ref.incr() for _ in range(rng.randrange(1, 40))]
                        for fut in futs:
                            settle(fut, None)
                    else:
                        fut = rt.submit(ops.inc, i)
                        with lock:
                            expected.add((t, i))
                        fut.add_done_callback(nested((t, i)))
                        settle(fut, i + 1)
                    with lock:
                        progress[t] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(6)]
        for th in threads:
            th.start()
        _each_time_counted(progress, lock, (150, 600), 0.001,
                           lambda: os.kill(rt._driver.pipes.piped[0].pid, signal.SIGKILL))
        _join_all(threads)
        assert not errors, errors
        for _ in range(30000):  # callbacks the pump runs may still be under way
            with lock:
                if set(calls) == expected:
                    break
            threading.Event().wait(0.001)
        assert set(calls) == expected and set(calls.values()) == {1}
        assert rt.submit(ops.inc, 1).result(timeout=30) == 2
        assert rt._driver.broken is None


def test_shutdown_while_threads_submit_behind_every_credit_and_wait() -> None:
    """shutdown() while four threads submit behind every credit (reading the pipes in submit) and
    wait in result(): each gets its value or a phalanx error, none hangs, no process is left."""
    errors: list[BaseException] = []
    started = threading.Barrier(5)

    with phalanx.Runtime(workers=2, credits=1) as rt:
        def run(t: int) -> None:
            futs: list[phalanx.Future[int]] = []
            try:
                started.wait(30)
                for i in range(100000):
                    try:
                        futs.append(rt.submit(ops.inc, i))
                    except phalanx.errors.PhalanxError:
                        break  # closed
                    if i % 7 == t:
                        try:
                            futs[-1].result(timeout=60)
                        except phalanx.errors.PhalanxError:
                            break
                for i, fut in enumerate(futs):
                    try:
                        assert fut.result(timeout=60) == i + 1
                    except phalanx.errors.PhalanxError:
                        pass
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(4)]
        for th in threads:
            th.start()
        started.wait(30)
        while rt.stats().tasks_completed < 500:  # mid-storm
            threading.Event().wait(0.001)
        rt.shutdown(wait=False)
        for th in threads:
            th.join(90)
        assert not any(th.is_alive() for th in threads)
        assert not errors, errors


def test_bursts_of_actor_calls_from_three_threads_survive_hot_restarts_in_order() -> None:
    """Three threads each make 600 calls to one actor without waiting (bursts held and written
    every DIRECTED_HELD_MAX calls) while it is hot-restarted twice, to the other worker and back:
    every call lands once, each thread's in the order it made them."""
    with phalanx.Runtime(workers=2) as rt:
        ref = rt.spawn(actor_ops.Recorder)
        errors: list[BaseException] = []
        made = collections.Counter[int]()
        lock = threading.Lock()

        def run(t: int) -> None:
            try:
                futs = []
                for i in range(600):
                    futs.append(ref.append(t, i))
                    with lock:
                        made[t] += 1
                for fut in futs:
                    fut.result(timeout=60)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(3)]
        for th in threads:
            th.start()
        def restart() -> None:
            assert ref.restart(timeout=60)

        _each_time_counted(made, lock, (300, 1200), 0.0005, restart)
        _join_all(threads)
        assert not errors, errors
        log = ref.log().result(timeout=60)
        assert sorted(log) == sorted((t, i) for t in range(3) for i in range(600))
        for t in range(3):
            assert [i for c, i in log if c == t] == list(range(600))


def test_a_keyboard_interrupt_while_waiting_leaves_the_next_waits_working(tmp_path: Path) -> None:
    """SIGINT while the main thread waits in result() (in its poll of the pipes), and again while
    it waits in a done-callback run by its own delivery (a nested wait): KeyboardInterrupt leaves
    result(), the waiters are off the futures, no caller counts as waiting, and the next waits
    (plain and nested) still get their replies."""
    release, never = tmp_path / "release", tmp_path / "never"
    main = threading.main_thread().ident
    assert main is not None

    def interrupt() -> None:
        signal.pthread_kill(main, signal.SIGINT)  # type: ignore[arg-type]

    with phalanx.Runtime(workers=2) as rt:
        slow = rt.submit(ops.square_after, 0, str(release))
        helper = _when_waiting(rt, interrupt)
        with pytest.raises(KeyboardInterrupt):
            slow.result(timeout=60)
        helper.join(30)
        assert not slow._waiters and rt._driver.direct.waiting == 0
        assert rt.submit(ops.inc, 1).result(timeout=30) == 2  # the thread's reused waiter is free

        # The same inside a wait nested in a done-callback the main thread runs.
        inner = rt.submit(ops.square_after, 0, str(never))
        nested: list[BaseException] = []
        after: list[int] = []

        def wait_inside(_: object) -> None:
            if threading.current_thread().ident != main:
                return
            helper2 = _when_waiting(rt, interrupt)
            try:
                inner.result(timeout=60)
            except KeyboardInterrupt as exc:
                nested.append(exc)
            helper2.join(30)
            after.append(rt.submit(ops.inc, 2).result(timeout=30))  # a nested wait still works

        quick: list[phalanx.Future[int]] = []

        def submit_quick() -> None:  # while the main thread waits on slow: it reads quick's reply
            quick.append(rt.submit(ops.inc, 0))
            quick[0].add_done_callback(wait_inside)
            release.touch()

        helper = _when_waiting(rt, submit_quick)
        assert slow.result(timeout=60) == 0
        helper.join(30)
        assert quick[0].result(timeout=30) == 1
        assert len(nested) == 1 and after == [3]  # the attack ran as meant, on the main thread
        assert not inner._waiters
        never.touch()
        assert inner.result(timeout=60) == 0
        assert not inner._waiters and not slow._waiters and rt._driver.direct.waiting == 0
        assert rt.submit(ops.inc, 5).result(timeout=30) == 6


def test_a_copied_actor_ref_keeps_its_actor_alive_after_the_original_is_dropped() -> None:
    """copy.copy / copy.deepcopy of a ref used on another thread once the original is dropped:
    the actor keeps serving (before, a copy was not counted as a ref: dropping the original
    stopped the actor under it), and the copy's cached method callables call the same actor."""
    import copy
    import gc

    with phalanx.Runtime(workers=1) as rt:
        ref = rt.spawn(actor_ops.Counter)
        assert ref.incr().result(timeout=30) == 1  # ref.incr is cached in the ref from now on
        copies = [copy.copy(ref), copy.deepcopy(ref)]
        del ref
        gc.collect()
        got: list[int] = []
        worker = threading.Thread(target=lambda: got.extend(c.incr().result(timeout=30) for c in copies))
        worker.start()
        worker.join(60)
        assert got == [2, 3] and copies[0].state == "running"
        copies.pop()
        gc.collect()
        assert copies[0].incr().result(timeout=30) == 4


def test_shutdown_from_a_done_callback_the_waiting_caller_runs(tmp_path: Path) -> None:
    """A done-callback run by the main thread while it delivers what it read (inside result())
    shuts the runtime down, waiting for the other running task: shutdown returns, the wait
    returns, every future settles."""
    release = tmp_path / "release"
    main = threading.main_thread().ident
    ran: list[bool] = []

    with phalanx.Runtime(workers=2) as rt:
        slow = rt.submit(ops.square_after, 0, str(release))

        def stop(_: object) -> None:
            ran.append(threading.current_thread().ident == main)
            if ran[-1]:
                release.touch()
                rt.shutdown(wait=True, timeout=60)  # waits for slow, read by the pump now

        quick: list[phalanx.Future[int]] = []

        def submit_quick() -> None:
            quick.append(rt.submit(ops.inc, 0))
            quick[0].add_done_callback(stop)

        helper = _when_waiting(rt, submit_quick)
        assert slow.result(timeout=60) == 0
        helper.join(30)
        assert ran == [True]
        assert quick[0].result(timeout=30) == 1
        assert slow.result(timeout=30) == 0


def test_a_keyboard_interrupt_between_two_pipe_reads_of_a_submitting_thread_loses_no_outcome(
        tmp_path: Path) -> None:
    """The main thread, submitting behind every credit, read one worker's outcome (LocalPipes.help)
    and waits for the next worker's reader lock when SIGINT arrives: KeyboardInterrupt leaves
    submit, and what it read and resolved still reaches its future (before, it never did)."""
    release = tmp_path / "release"
    both, caught = threading.Event(), threading.Event()
    main = threading.main_thread().ident
    assert main is not None

    with phalanx.Runtime(workers=2, credits=1) as rt:
        pump = PumpHeld(rt)  # it reads no pipe from now on
        pipes = rt._driver.pipes
        assert len(pipes.piped) == 2
        w0, w1 = pipes.piped  # the order the submitting thread polls them in
        fds = [w0.pipe.fileno(), w1.pipe.fileno()]  # type: ignore[union-attr]
        gated = [rt.submit(ops.square_after, 0, str(release)) for _ in range(2)]  # one per worker
        release.touch()
        for _ in range(30000):  # until both outcomes wait in their pipes
            if _readable(fds[0]) and _readable(fds[1]):
                break
            threading.Event().wait(0.001)
        held = threading.Event()

        def hold_the_second_reader() -> None:
            with w1.reader:
                held.set()
                while not w0.delivering:  # the submitting thread read the first pipe, then waits
                    threading.Event().wait(0.001)
                signal.pthread_kill(main, signal.SIGINT)  # type: ignore[arg-type]
                caught.wait(30)

        threading.Thread(target=hold_the_second_reader, daemon=True).start()
        assert held.wait(30)
        try:
            try:
                for i in range(1000):  # behind every credit: submit reads the pipes
                    rt.submit(ops.inc, i)
            except KeyboardInterrupt:
                caught.set()
            assert caught.is_set()  # the attack ran as meant
        finally:
            caught.set()
            pump.release()
        assert [f.result(timeout=30) for f in gated] == [0, 0]
        assert pump.first.result(timeout=30) == 1
        assert rt.submit(ops.inc, 3).result(timeout=30) == 4
        assert rt._driver.broken is None
