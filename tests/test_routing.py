"""Routing to dedicated workers: tagged workers get only the work routed to their tag.

Runs in the test (driver) process against real runtimes and worker processes;
every operation returns the pid of the worker that ran it
(``tests/routing_ops.py``), so "ran on a worker of tag T" is checked by pid,
over many tasks, for submit, map, fold and actors. Also checked: work for a
tag with no live worker waits and then fails with ``NoWorkerError`` while the
other tags keep being served (no head-of-line blocking); a killed tagged
worker is replaced by one of the same tag, which alone gets its redelivered
tasks; actors keep to their tag across hot and supervised restarts; a remote
``phalanx worker --tag gpu`` joins over loopback tcp and gets only gpu work;
the tags show in ``stats()``, ``inspect()`` and ``worker_tags()``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

import phalanx
from phalanx.testing.inject import kill_child
from phalanx.testing.invariants import ProcessLeakCheck
from phalanx.transport import sockets
from phalanx.transport.codec import decode_driver
from phalanx.transport.messages import PROTOCOL_VERSION, Hello, new_inbox

import multihost_ops
import routing_ops as ops
from remote_host import RemoteHost

pytestmark = pytest.mark.timeout(120)

T = 20.0  # seconds: generous bound on any single wait (never an assertion on speed)


def pids_of(rt: phalanx.Runtime, tag: str) -> set[int]:
    """Pids of the live workers of ``rt`` holding ``tag``."""
    tags, pids = rt.worker_tags(), rt.worker_pids()
    return {pid for wid, pid in pids.items() if tag in tags.get(wid, ())}


def wait_for(predicate: object, what: str, timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def tagged() -> Iterator[phalanx.Runtime]:
    """One runtime with two "default" and two "io" workers, shared by the module's tests."""
    with ProcessLeakCheck(grace=3.0) as check:
        rt = phalanx.Runtime(workers={"default": 2, "io": 2})
        try:
            yield rt
        finally:
            rt.shutdown()
        assert not check.check(), "the module runtime left processes behind"


# --------------------------------------------------------------------------- #
# Work stays in its tag
# --------------------------------------------------------------------------- #


def test_workers_carry_their_tags(tagged: phalanx.Runtime) -> None:
    tags = tagged.worker_tags()
    assert sorted(tags.values()) == [("default",), ("default",), ("io",), ("io",)]
    assert set(tags) == set(tagged.worker_pids())
    stats = {w.id: w.tags for w in tagged.stats().workers if w.alive}
    assert stats == tags
    tree = tagged.inspect(timeout=5)
    assert {w.id: w.tags for w in tree.workers} == tags
    assert "[io]" in str(tree)


def test_submit_runs_only_on_its_tag(tagged: phalanx.Runtime) -> None:
    io, default = pids_of(tagged, "io"), pids_of(tagged, "default")
    routed = [tagged.options(on="io").submit(ops.where, x) for x in range(100)]
    plain = [tagged.submit(ops.where, x) for x in range(100)]
    explicit = [tagged.options(on="default").submit(ops.where, x) for x in range(50)]
    assert {f.result(timeout=T)[1] for f in routed} <= io
    assert {f.result(timeout=T)[1] for f in plain} <= default
    assert {f.result(timeout=T)[1] for f in explicit} <= default


def test_map_runs_only_on_its_tag(tagged: phalanx.Runtime) -> None:
    io, default = pids_of(tagged, "io"), pids_of(tagged, "default")
    got = list(tagged.map(ops.where, range(500), chunksize=1, on="io"))
    assert [x for x, _ in got] == list(range(500))
    assert {pid for _, pid in got} <= io
    got = list(tagged.options(on="io", timeout=30).map(ops.where, range(300), chunksize=3, ordered=False))
    assert sorted(x for x, _ in got) == list(range(300))
    assert {pid for _, pid in got} <= io
    got = list(tagged.map(ops.where, range(500), chunksize=1))
    assert {pid for _, pid in got} <= default
    # map's own on= overrides the options'
    got = list(tagged.options(on="io").map(ops.where, range(50), chunksize=1, on="default"))
    assert {pid for _, pid in got} <= default


def test_fold_runs_only_on_its_tag(tagged: phalanx.Runtime) -> None:
    io, default = pids_of(tagged, "io"), pids_of(tagged, "default")
    items = [[] for _ in range(400)]
    assert set(tagged.fold(ops.merge_pids, items, chunksize=4, on="io")) <= io
    assert set(tagged.options(on="io").fold(ops.merge_pids, items, chunksize=2)) <= io
    assert set(tagged.fold(ops.merge_pids, items, chunksize=4)) <= default


def test_actors_run_only_on_their_tag(tagged: phalanx.Runtime) -> None:
    io, default = pids_of(tagged, "io"), pids_of(tagged, "default")
    io_ids = {w for w, t in tagged.worker_tags().items() if "io" in t}
    refs = [tagged.spawn(ops.Where, on="io") for _ in range(4)]
    plain = [tagged.spawn(ops.Where) for _ in range(4)]
    try:
        assert {r.pid().result(timeout=T) for r in refs} == io  # spread over both io workers
        assert {r.worker for r in refs} == io_ids
        assert {r.pid().result(timeout=T) for r in plain} <= default
        # a hot restart without on= stays in the tag: onto the other io worker
        ref = refs[0]
        assert ref.incr(5).result(timeout=T) == 5
        before = ref.worker
        assert ref.restart(timeout=T)
        assert ref.worker != before and ref.worker in io_ids
        assert ref.pid().result(timeout=T) in io
        assert ref.incr().result(timeout=T) == 6
        # spawn's on= still takes a worker id
        wid = sorted(io_ids)[0]
        pinned = tagged.spawn(ops.Where, on=wid)
        assert pinned.worker == wid
        assert pinned.pid().result(timeout=T) == tagged.worker_pids()[wid]
        pinned.stop()
        pinned.join(T)
    finally:
        for r in refs + plain:
            r.stop()
            r.join(T)


def test_async_runtime_routes() -> None:
    async def main() -> None:
        async with phalanx.AsyncRuntime(workers={"default": 1, "io": 1}) as rt:
            io = pids_of(rt.runtime, "io")
            assert (await rt.options(on="io").submit(ops.where, 1))[1] in io
            assert {pid async for _, pid in rt.map(ops.where, range(50), chunksize=1, on="io")} <= io
            assert set(await rt.fold(ops.merge_pids, [[] for _ in range(20)], chunksize=2, on="io")) <= io
            assert rt.worker_tags() == rt.runtime.worker_tags()

    asyncio.run(main())


@settings(max_examples=25, deadline=None)
@given(
    work=st.lists(st.tuples(st.sampled_from([None, "default", "io"]), st.sampled_from(["submit", "map"]),
                            st.integers(1, 8)), min_size=1, max_size=12),
)
def test_any_mix_of_routed_work_stays_in_its_tag(tagged: phalanx.Runtime,
                                                  work: list[tuple[str | None, str, int]]) -> None:
    """For any interleaving of routed submits and maps, every result comes from its tag's workers."""
    pids = {"default": pids_of(tagged, "default"), "io": pids_of(tagged, "io")}
    pending = []
    for on, kind, n in work:
        tag = on or "default"
        if kind == "submit":
            opts = tagged.options(on=on)
            pending.append((tag, [opts.submit(ops.where, x) for x in range(n)]))
        else:
            pending.append((tag, list(tagged.map(ops.where, range(n), chunksize=1, on=on))))
    for tag, results in pending:
        values = [r.result(timeout=T) if isinstance(r, phalanx.Future) else r for r in results]
        assert [x for x, _ in values] == list(range(len(values)))
        assert {pid for _, pid in values} <= pids[tag], (tag, values)


# --------------------------------------------------------------------------- #
# A tag with no live worker
# --------------------------------------------------------------------------- #


def test_tag_without_workers_times_out_and_others_are_served() -> None:
    with phalanx.Runtime(workers={"default": 1, "io": 1}, route_timeout=0.5) as rt:
        fut = rt.options(on="gpu").submit(ops.where, 1)
        with pytest.raises(phalanx.NoWorkerError) as info:
            fut.result(timeout=T)
        err = info.value
        assert isinstance(err, TimeoutError) and isinstance(err, phalanx.PhalanxError)
        assert "'gpu'" in str(err) and "default" in str(err) and "io" in str(err)
        assert err.tag == "gpu" and err.available == ("default", "io")
        with pytest.raises(phalanx.NoWorkerError, match="gpu"):
            list(rt.map(ops.where, range(20), on="gpu"))
        with pytest.raises(phalanx.NoWorkerError, match="gpu"):
            rt.fold(ops.merge_pids, [[] for _ in range(10)], on="gpu")
        with pytest.raises(phalanx.NoWorkerError, match="gpu"):
            rt.spawn(ops.Where, on="gpu")
        # the spawn timeout bounds the wait too, when shorter
        with pytest.raises(phalanx.NoWorkerError, match="gpu"):
            rt.spawn(ops.Where, on="gpu", timeout=0.1)
        # the runtime goes on serving the tags that have workers
        assert rt.submit(ops.where, 2).result(timeout=T)[1] in pids_of(rt, "default")
        assert rt.options(on="io").submit(ops.where, 3).result(timeout=T)[1] in pids_of(rt, "io")
        assert rt.stats().tasks_failed >= 3
        assert rt.stats().jobs_open == 0


def test_work_for_a_missing_tag_does_not_block_other_tags() -> None:
    with phalanx.Runtime(workers={"default": 1}, route_timeout=60) as rt:
        stuck = [rt.options(on="gpu").submit(ops.where, x) for x in range(50)]
        it = rt.options(on="gpu").map(ops.where, range(100), chunksize=1)
        # submitted after the gpu work, served at once all the same
        assert [f.result(timeout=T)[0] for f in [rt.submit(ops.where, x) for x in range(50)]] == list(range(50))
        assert [x for x, _ in rt.map(ops.where, range(200))] == list(range(200))
        assert not any(f.done() for f in stuck)
        for f in stuck:
            assert f.cancel()  # still queued in the driver: removed
        it.close()
        assert rt.stats().jobs_open == 0
        # cancelled work waits for no worker: idle at once, not at the route timeout
        assert rt._driver.wait_idle(T)


def test_a_worker_joining_the_tag_takes_the_waiting_work() -> None:
    with phalanx.Runtime(workers={"default": 1}, listen="tcp://127.0.0.1:0", insecure=True) as rt:
        assert rt.address is not None
        futures = [rt.options(on="gpu").submit(multihost_ops.where, x) for x in range(20)]
        with RemoteHost(rt.address, "gpuhost", ["--insecure"], workers=1, extra=["--tag", "gpu"]) as host:
            assert [f.result(timeout=T) for f in futures] == [(2 * x, "gpuhost") for x in range(20)], host.err
            assert list(rt.map(multihost_ops.where, range(200), chunksize=1, on="gpu")) == [
                (2 * x, "gpuhost") for x in range(200)
            ]
            assert rt.fold(multihost_ops.add, range(1, 101), chunksize=3, on="gpu") == 5050
            # default work never goes to the gpu host
            assert {h for _, h in rt.map(multihost_ops.where, range(200), chunksize=1)} == {"local"}
            ref = rt.spawn(multihost_ops.Tally, on="gpu")
            assert ref.where().result(timeout=T) == "gpuhost"
            ref.stop()
            ref.join(T)
            remote = [w for w in rt.stats().workers if w.remote and w.alive]
            assert [w.tags for w in remote] == [("gpu",)]
            assert sorted(rt.worker_tags().values()) == [("default",), ("gpu",)]
        assert "tags: gpu" in host.err


def test_remote_worker_with_several_tags_serves_each() -> None:
    with phalanx.Runtime(workers=0, listen="tcp://127.0.0.1:0", insecure=True) as rt:
        assert rt.address is not None
        extra = ["--tag", "gpu", "--tag", "io"]
        with RemoteHost(rt.address, "both", ["--insecure"], workers=1, extra=extra) as host:
            assert rt.wait_for_workers(1, timeout=T) == 1, host.err
            assert rt.options(on="gpu").submit(multihost_ops.where, 1).result(timeout=T) == (2, "both")
            assert rt.options(on="io").submit(multihost_ops.where, 2).result(timeout=T) == (4, "both")
            assert list(rt.worker_tags().values()) == [("gpu", "io")]


# --------------------------------------------------------------------------- #
# Deaths and restarts
# --------------------------------------------------------------------------- #


def test_dead_tagged_worker_is_replaced_in_its_tag() -> None:
    with phalanx.Runtime(workers={"default": 1, "io": 1}) as rt:
        default = pids_of(rt, "default")
        (io_id,) = [w for w, t in rt.worker_tags().items() if t == ("io",)]
        old_pid = rt.worker_pids()[io_id]
        it = rt.map(ops.slow_where, range(60), [0.02] * 60, chunksize=1, on="io")
        first = [next(it) for _ in range(5)]
        assert kill_child(old_pid)
        rest = list(it)
        values = first + rest
        assert [x for x, _ in values] == list(range(60))  # every item exactly once, in order
        wait_for(lambda: len(rt.worker_pids()) == 2, "the replacement worker")
        new_ids = [w for w, t in rt.worker_tags().items() if t == ("io",)]
        assert len(new_ids) == 1 and new_ids[0] != io_id
        new_pid = rt.worker_pids()[new_ids[0]]
        ran = {pid for _, pid in values}
        assert ran <= {old_pid, new_pid} and not ran & default
        assert new_pid in ran  # the redelivered and later tasks went to the replacement
        stats = rt.stats()
        assert stats.worker_deaths == 1 and stats.redelivered >= 1
        assert pids_of(rt, "default") == default  # the default worker was never touched


def test_supervised_actor_restarts_in_its_tag() -> None:
    with phalanx.Runtime(workers={"default": 2, "io": 1}) as rt:
        io_ids = {w for w, t in rt.worker_tags().items() if "io" in t}
        ref = rt.spawn(ops.Where, 10, on="io", restart_policy="on-failure", checkpoint_every=1)
        assert ref.worker in io_ids
        assert ref.incr(2).result(timeout=T) == 12
        assert kill_child(ref.pid().result(timeout=T))
        # back on the replacement io worker (the default workers were live all along)
        wait_for(lambda: ref.state == "running" and ref.worker not in io_ids, "the restart")
        assert rt.worker_tags()[ref.worker] == ("io",)
        assert ref.pid().result(timeout=T) in pids_of(rt, "io")
        assert ref.incr().result(timeout=T) == 13  # from the checkpoint
        ref.stop()
        ref.join(T)


def test_spawn_waits_for_a_tag_until_its_worker_is_back() -> None:
    with phalanx.Runtime(workers={"default": 1, "io": 1}, route_timeout=60) as rt:
        (io_pid,) = pids_of(rt, "io")
        assert kill_child(io_pid)
        wait_for(lambda: rt.stats().worker_deaths == 1, "the driver to see the death")
        # spawned while the io worker may still be down: placed once its replacement is up
        ref = rt.spawn(ops.Where, on="io")
        assert ref.pid().result(timeout=T) in pids_of(rt, "io")
        assert ref.pid().result(timeout=T) != io_pid
        ref.stop()
        ref.join(T)


# --------------------------------------------------------------------------- #
# Configuration and wire
# --------------------------------------------------------------------------- #


def test_workers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_WORKERS", "default=1,io=2")
    monkeypatch.setenv("PHALANX_ROUTE_TIMEOUT", "7.5")
    with phalanx.Runtime() as rt:
        assert rt.config.workers == 3 and rt.config.tags == {"default": 1, "io": 2}
        assert rt.config.route_timeout == 7.5
        assert sorted(rt.worker_tags().values()) == [("default",), ("io",), ("io",)]
        assert rt.options(on="io").submit(ops.where, 1).result(timeout=T)[1] in pids_of(rt, "io")


@pytest.mark.parametrize("bad", [{"a b": 1}, {"": 1}, {"x,y": 1}, {"io": -1}])
def test_bad_tags_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        phalanx.Config.load(workers=bad)


def test_bad_routes_are_refused(tagged: phalanx.Runtime) -> None:
    with pytest.raises(ValueError):
        tagged.options(on="not a tag")
    with pytest.raises(ValueError):
        tagged.map(ops.where, range(3), on="a=b")
    with pytest.raises(LookupError):
        tagged.spawn(ops.Where, on="no such worker")  # neither a worker id nor a possible tag


def test_hello_without_tags_still_decodes() -> None:
    """A Hello from a worker that predates tags: it serves "default"."""

    class OldHello(msgspec.Struct, frozen=True, array_like=True, tag="Hello"):
        worker: str
        pid: int
        host: str
        version: int

    frame = msgspec.msgpack.encode(OldHello("w9", os.getpid(), "h", PROTOCOL_VERSION))
    msg = decode_driver(frame)
    assert isinstance(msg, Hello) and msg.tags == []


def test_hot_restart_moves_an_actor_between_tags(tagged: phalanx.Runtime) -> None:
    io_ids = {w for w, t in tagged.worker_tags().items() if "io" in t}
    ref = tagged.spawn(ops.Where, 3)
    try:
        assert ref.worker not in io_ids
        assert ref.restart(on="io", timeout=T)  # onto a tag: the actor now keeps to it
        assert ref.worker in io_ids and ref.incr().result(timeout=T) == 4
        assert ref.restart(timeout=T)
        assert ref.worker in io_ids
        # a hot restart waits for no worker: refused at once, the old instance serves on
        before = ref.worker
        assert not ref.restart(on="gpu", timeout=T)
        assert ref.worker == before and ref.incr().result(timeout=T) == 5
        events = list(itertools.islice(ref.events(timeout=T), 4))
        assert isinstance(events[-1], phalanx.RestartFailed)
        assert isinstance(events[-1].error, LookupError) and "gpu" in str(events[-1].error)
    finally:
        ref.stop()
        ref.join(T)


def test_a_hello_with_bad_tags_is_refused_and_good_tags_are_kept() -> None:
    """Tags come from the remote worker's Hello: a malformed one is dropped, the runtime serves on."""
    from phalanx.transport.codec import encode

    with phalanx.Runtime(workers=1, listen="tcp://127.0.0.1:0", insecure=True) as rt:
        address = rt._driver.address
        assert address is not None
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            bad = sockets.dealer(ctx, address.results, b"evil-1")
            good = sockets.dealer(ctx, address.results, b"peer-1")
            dropped = rt.stats().frames_dropped
            bad.send(encode(Hello("evil-1", 1, "h", PROTOCOL_VERSION, ["not a tag"])))
            bad.send(encode(Hello("evil-1", 1, "h", PROTOCOL_VERSION, ["x"] * 1000)))
            wait_for(lambda: rt.stats().frames_dropped >= dropped + 2, "the bad Hellos to be dropped")
            good.send(encode(Hello("peer-1", 2, "h", PROTOCOL_VERSION, ["gpu", "io", "gpu"], new_inbox())))
            wait_for(lambda: rt.stats().workers_joined == 1, "the good Hello")
            (joined,) = [w for w in rt.stats().workers if w.remote]
            assert joined.id == "peer-1" and joined.tags == ("gpu", "io")
            assert rt.submit(ops.where, 1).result(timeout=T)[0] == 1
            sockets.close(bad, good)
        finally:
            ctx.destroy(linger=0)
