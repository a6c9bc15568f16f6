"""phalanx from asyncio: ``await rt.submit``, ``await ref.method``, ``async for``, AsyncRuntime.

Runs in the test (driver) process under pytest-asyncio (strict mode: every
async test is marked); the operations and the actor live in
``tests/eco_ops.py``, which workers import by name.

Nothing here sleeps for a guessed duration: slow work waits for a file
(:class:`Gate`), and where a test proves that the event loop is never
blocked, the file is created by a coroutine on that loop, so the work can
only finish if the loop kept running while the call waited (a blocked loop
makes the task fail after ``eco_ops.WAIT_LIMIT`` instead of hanging).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio

import phalanx
from eco_ops import GateError, Gatekeeper, fail_at, flaky, gated, gated_item, gated_sum, pid, raise_key_error, square

#: generous bound on any single wait; tests finish far sooner
T = 30.0

R = TypeVar("R")


class Gate:
    """Files in a temp dir: ``release`` lets gated work finish, ``started``/``aborted`` report on it."""

    def __init__(self, root: Path, name: str = "gate") -> None:
        self.root = root
        self.release = str(root / f"{name}-release")
        self.name = name

    def started(self, i: int = 0) -> str:
        return str(self.root / f"{self.name}-started-{i}")

    def aborted(self, i: int = 0) -> str:
        return str(self.root / f"{self.name}-aborted-{i}")

    def open(self) -> None:
        Path(self.release).touch()

    def item(self, i: int, value: Any = None) -> list[Any]:
        """An item for ``eco_ops.gated_item``."""
        return [value, self.release, self.started(i), self.aborted(i)]


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    return Gate(tmp_path)


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Wait (on the loop) until ``predicate()``; fail after ``T`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + T
    while not predicate():
        assert loop.time() < deadline, f"gave up waiting: {what}"
        await asyncio.sleep(0.005)


def exists(path: str) -> Callable[[], bool]:
    return lambda: Path(path).exists()


@pytest_asyncio.fixture
async def art(gate: Gate) -> AsyncIterator[phalanx.AsyncRuntime]:
    """A started ``AsyncRuntime(workers=2)``; the gate is opened before it shuts down."""
    async with phalanx.AsyncRuntime(workers=2) as rt:
        try:
            yield rt
        finally:
            gate.open()


# --------------------------------------------------------------------------- #
# The three forms
# --------------------------------------------------------------------------- #


@pytest.mark.asyncio
async def test_await_submit(art: phalanx.AsyncRuntime) -> None:
    assert await art.submit(square, 7) == 49
    assert await asyncio.gather(*(art.submit(square, i) for i in range(20))) == [i * i for i in range(20)]
    assert await asyncio.wait_for(art.submit(square, 3), T) == 9


@pytest.mark.asyncio
async def test_await_submit_on_a_plain_runtime() -> None:
    rt = await asyncio.to_thread(phalanx.Runtime, 1)
    try:
        assert await rt.submit(square, 5) == 25
        assert [x async for x in rt.map(square, range(5))] == [0, 1, 4, 9, 16]
    finally:
        await asyncio.to_thread(rt.shutdown)


@pytest.mark.asyncio
async def test_await_actor_method(art: phalanx.AsyncRuntime) -> None:
    ref = await art.spawn(Gatekeeper, 5)
    assert await ref.incr(2) == 7
    assert await asyncio.gather(*(ref.incr() for _ in range(10))) == list(range(8, 18))
    assert await ref.call("incr", 0) == 17


@pytest.mark.asyncio
@pytest.mark.parametrize("chunksize", [None, 1, 7])
async def test_async_for_map(art: phalanx.AsyncRuntime, chunksize: int | None) -> None:
    got = [x async for x in art.map(square, range(50), chunksize=chunksize)]
    assert got == [i * i for i in range(50)]


@pytest.mark.asyncio
async def test_async_for_map_unordered_and_lazy_input(art: phalanx.AsyncRuntime) -> None:
    got = [x async for x in art.map(square, (i for i in range(100)), ordered=False)]
    assert sorted(got) == [i * i for i in range(100)]
    assert [x async for x in art.map(square, [])] == []


@pytest.mark.asyncio
async def test_fold_and_options(art: phalanx.AsyncRuntime, gate: Gate, tmp_path: Path) -> None:
    gate.open()
    total = await art.fold(gated_sum, [[i, gate.release] for i in range(1, 101)])
    assert total == [5050, gate.release]
    markers = tmp_path / "flaky"
    markers.mkdir()
    opts = art.options(retry=phalanx.Immediate(3))
    assert await opts.submit(flaky, str(markers), 2) == 3
    assert [x async for x in opts.map(square, range(3))] == [0, 1, 4]
    assert await opts.fold(gated_sum, [[1, gate.release], [2, gate.release]]) == [3, gate.release]


@pytest.mark.asyncio
async def test_state_is_readable_without_blocking(art: phalanx.AsyncRuntime) -> None:
    assert art.n_workers == 2
    assert len(art.worker_pids()) == 2
    assert art.runtime.n_workers == 2
    stats = art.stats()
    assert isinstance(stats, phalanx.RuntimeStats)
    assert await art.start() is art  # idempotent


@pytest.mark.asyncio
async def test_runtime_before_start_raises() -> None:
    art = phalanx.AsyncRuntime(workers=1)
    with pytest.raises(RuntimeError, match="not started"):
        art.submit(square, 1)
    await art.shutdown()  # nothing to stop


# --------------------------------------------------------------------------- #
# The event loop keeps running
# --------------------------------------------------------------------------- #


async def while_ticking(work: Callable[[], Awaitable[R]], gate: Gate, ticks_first: int = 10) -> R:
    """Run ``work()`` while a ticker coroutine ticks; the ticker opens ``gate``.

    The gate is opened only after ``ticks_first`` ticks that happened after
    ``work()`` was called, so the work finishes only if the event loop kept
    running while it waited.
    """
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.002)
            ticks += 1
            if ticks == ticks_first:
                gate.open()

    task = asyncio.create_task(ticker())
    try:
        result = await asyncio.wait_for(work(), T)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert ticks >= ticks_first
    return result


@pytest.mark.asyncio
async def test_calls_never_block_the_event_loop(tmp_path: Path) -> None:
    gates = {name: Gate(tmp_path, name) for name in ("spawn", "submit", "actor", "map", "fold", "shutdown")}
    art = phalanx.AsyncRuntime(workers=2)
    await art.start()
    try:
        spawn = gates["spawn"]
        ref = await while_ticking(lambda: art.spawn(Gatekeeper, 3, spawn.release), spawn)

        submit = gates["submit"]
        assert await while_ticking(lambda: art.submit(gated, submit.release, None, 42), submit) == 42

        actor = gates["actor"]
        assert await while_ticking(lambda: ref.wait(actor.release), actor) == 3

        mapped = gates["map"]

        async def consume() -> list[Any]:
            return [x async for x in art.map(gated_item, [mapped.item(i, i) for i in range(6)], chunksize=1)]

        assert await while_ticking(consume, mapped) == list(range(6))

        fold = gates["fold"]
        total = await while_ticking(lambda: art.fold(gated_sum, [[i, fold.release] for i in range(10)]), fold)
        assert total == [45, fold.release]

        # shutdown(wait=True) waits for queued work: still off the loop.
        down = gates["shutdown"]
        last = art.submit(gated, down.release, None, "done")
        await while_ticking(art.shutdown, down)
        assert last.result(0) == "done"
    finally:
        for g in gates.values():
            g.open()
        await art.shutdown()


@pytest.mark.asyncio
async def test_actor_refs_never_block_the_event_loop(art: phalanx.AsyncRuntime, tmp_path: Path) -> None:
    """restart, join and events wait behind a running call: they finish only if the loop kept running."""
    restart, join, events = Gate(tmp_path, "restart"), Gate(tmp_path, "join"), Gate(tmp_path, "events")
    try:
        a = await art.spawn(Gatekeeper, 1, name="keeper")
        assert isinstance(a, phalanx.AsyncActorRef) and (a.name, a.state) == ("keeper", "running")
        first = a.worker
        running = a.wait(restart.release)  # the hot restart's save() queues behind it
        assert await while_ticking(lambda: a.restart(), restart) is True
        assert await running == 1
        assert a.worker != first and await a.incr(1) == 2  # the state moved to the new instance
        same = art.get_actor("keeper")
        assert same.id == a.id and await same.call("incr", 0) == 2

        b = await art.spawn(Gatekeeper, 2)
        running = b.wait(join.release)
        await b.stop()  # after the calls already made
        await while_ticking(lambda: b.join(T), join)
        assert b.state == "stopped" and await running == 2

        c = await art.spawn(Gatekeeper, 3)
        running = c.wait(events.release)
        await c.stop()

        async def collect() -> list[str]:
            return [type(e).__name__ async for e in c.events(timeout=T)]

        assert await while_ticking(collect, events) == ["Started", "Stopped"]

        tree = await a.inspect(timeout=T)
        assert [actor.id for w in tree.workers for actor in w.actors] == [a.id]
        everything = await art.inspect(timeout=T)
        assert a.id in {actor.id for w in everything.workers for actor in w.actors}
        await a.stop()
        await a.join(T)
    finally:
        for g in (restart, join, events):
            g.open()


# --------------------------------------------------------------------------- #
# Cancellation reaches the work
# --------------------------------------------------------------------------- #


async def awaiting(fut: Awaitable[R]) -> R:
    return await fut


@pytest.mark.asyncio
async def test_cancelling_the_awaiting_task_removes_a_queued_call(tmp_path: Path) -> None:
    busy, queued, later = Gate(tmp_path, "busy"), Gate(tmp_path, "queued"), Gate(tmp_path, "later")
    queued.open()
    later.open()
    async with phalanx.AsyncRuntime(workers=1, credits=1) as art:
        try:
            running = art.submit(gated, busy.release, busy.started(), "busy")
            await until(exists(busy.started()), "the first call started")
            fut = art.submit(gated, queued.release, queued.started(), "queued")
            waiter = asyncio.create_task(awaiting(fut))
            await asyncio.sleep(0)  # the waiter is now awaiting
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert fut.cancelled()
            busy.open()
            assert await running == "busy"
            # One worker runs calls in order: had the cancelled call been sent, it ran before this one.
            assert await art.submit(gated, later.release, later.started(), "later") == "later"
            assert not Path(queued.started()).exists()
        finally:
            busy.open()


@pytest.mark.asyncio
async def test_cancelling_the_awaiting_task_aborts_a_running_call(art: phalanx.AsyncRuntime, gate: Gate) -> None:
    pids = art.worker_pids()
    fut = art.submit(gated, gate.release, gate.started(), "never", gate.aborted())
    waiter = asyncio.create_task(awaiting(fut))
    await asyncio.sleep(0)  # the waiter is now awaiting (a task cancelled before it ran awaits nothing)
    await until(exists(gate.started()), "the call started")
    assert fut.running()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await until(exists(gate.aborted()), "the worker saw the abort flag")
    assert isinstance(fut.exception(T), phalanx.TaskCancelledError)
    assert await art.submit(square, 4) == 16
    assert art.worker_pids() == pids  # it returned on its own: no worker was killed
    await until(lambda: art.stats().jobs_open == 0, "the call's job closed")


@pytest.mark.asyncio
async def test_cancelling_async_for_ends_the_map(art: phalanx.AsyncRuntime, gate: Gate) -> None:
    pids = art.worker_pids()
    items = [gate.item(i, i) for i in range(20)]
    got: list[Any] = []

    async def consume() -> None:
        async for x in art.map(gated_item, items, chunksize=1):
            got.append(x)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)
    await until(lambda: exists(gate.started(0))() and exists(gate.started(1))(), "both workers run an item")
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await until(lambda: exists(gate.aborted(0))() and exists(gate.aborted(1))(), "the running items saw the abort")
    await until(lambda: art.stats().jobs_open == 0, "the map's job closed")
    assert got == []
    assert not any(Path(gate.started(i)).exists() for i in range(4, 20))  # the rest never ran
    assert [x async for x in art.map(square, range(4))] == [0, 1, 4, 9]
    assert art.worker_pids() == pids


@pytest.mark.asyncio
async def test_wait_for_timeout_cancels_the_call(art: phalanx.AsyncRuntime, gate: Gate) -> None:
    fut = art.submit(gated, gate.release, gate.started(), None, gate.aborted())
    await until(exists(gate.started()), "the call started")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(awaiting(fut), 0.05)
    await until(exists(gate.aborted()), "the worker saw the abort flag")
    with pytest.raises(phalanx.TaskCancelledError):
        fut.result(T)


# --------------------------------------------------------------------------- #
# Errors keep their types
# --------------------------------------------------------------------------- #


@pytest.mark.asyncio
async def test_errors_are_reraised_with_their_types(art: phalanx.AsyncRuntime, gate: Gate) -> None:
    with pytest.raises(KeyError) as info:
        await art.submit(raise_key_error, "missing")
    assert isinstance(info.value.__cause__, phalanx.RemoteTraceback)

    got: list[int] = []
    with pytest.raises(GateError, match="bad item 5"):
        async for x in art.map(fail_at, range(10), [5] * 10, chunksize=1):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]

    ref = await art.spawn(Gatekeeper)
    with pytest.raises(GateError, match="on purpose"):
        await ref.boom("on purpose")
    assert await ref.incr() == 1  # the actor survives its method's exception

    with pytest.raises(phalanx.UnsupportedActorError):
        await art.spawn("eco_ops:NoSuchActor")
    with pytest.raises(phalanx.UnknownOperationError):
        await art.submit("eco_ops:no_such_operation")
    gate.open()
    with pytest.raises(TypeError):  # "x" + 1 in the worker
        await art.fold(gated_sum, [["x", gate.release], [1, gate.release]])
    assert await art.submit(pid) in art.worker_pids().values()
