"""Channels in user code (``rt.lease``): real workers, real sockets, no mocks.

Runs in the test (driver) process; the operations and the actor are in
``channel_ops`` (imported by the workers by name). What is checked:

* Broadcast: three subscriptions, each read by an operation, each get every
  message in send order.
* ExactlyOnce: three receivers (operations) share 1000 messages, none lost or
  duplicated; still so when receivers nack, and when the worker of a
  receiver holding unacked messages is SIGKILLed (they are redelivered).
  Acks a receiver sent before closing count even when a send to it failed
  before the broker read them.
* Ends cross the wire as themselves: a sender in an operation with the
  receiver in the driver, an actor method taking a receiver, an unannotated
  parameter, an end returned by an operation.
* Close drains then ends; release ends receivers at once and drops (and
  counts) later sends; backpressure; async iteration and ``asend``.
* Bad input never kills: malformed channel frames from random identities
  containing "~" are counted and dropped and the runtime keeps serving.
* A hypothesis property: under random interleavings of send / recv / ack /
  nack / close, every message is acknowledged exactly once.

No assertion depends on timing: waits have generous timeouts, and what is
asserted holds whatever the scheduling.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import phalanx
from phalanx.transport import codec, messages

import channel_ops
from remote_host import Keys, RemoteHost

T = 60.0  # seconds: generous waits, never asserted on


@pytest.fixture(scope="module")
def rt() -> Iterator[phalanx.Runtime]:
    """One runtime with three workers for the tests that leave it usable."""
    runtime = phalanx.Runtime(workers=3)
    try:
        yield runtime
    finally:
        runtime.shutdown()


# --------------------------------------------------------------------------- #
# Broadcast and ExactlyOnce across operations
# --------------------------------------------------------------------------- #


@pytest.mark.timeout(120)
def test_broadcast_three_subscribers_each_get_every_message_in_order(rt: phalanx.Runtime) -> None:
    tx, rx = rt.lease(phalanx.Broadcast)
    subs = [rx.subscribe() for _ in range(3)]  # registered now: each gets everything sent after
    rx.close()  # the lease's own subscription is not read here
    futures = [rt.submit(channel_ops.collect, sub) for sub in subs]
    for i in range(500):
        tx.send(i)
    tx.close()
    for fut in futures:
        assert fut.result(timeout=T) == list(range(500))


@pytest.mark.timeout(120)
def test_a_channel_end_s_identity_cannot_be_guessed(rt: phalanx.Runtime) -> None:
    """The broker sends an end's messages to whoever holds its identity: a counter would let
    another authorized key claim a remote end's identity once its connection broke."""
    tx, rx = rt.lease()
    tx.send(1)
    other, _ = rt.lease()
    other.send(2)
    idents = [end._conn.ident for end in (tx, other)]  # type: ignore[attr-defined]
    for ident in idents:
        assert re.fullmatch(rb".+~\d+-[0-9a-f]{16}", ident), ident
    assert idents[0].split(b"-")[-1] != idents[1].split(b"-")[-1]
    assert next(iter(rx)) == 1


def test_exactly_once_three_receivers_share_1000_messages(rt: phalanx.Runtime) -> None:
    tx, rx = rt.lease(phalanx.ExactlyOnce)
    futures = [rt.submit(channel_ops.collect, rx) for _ in range(3)]
    for i in range(1000):
        tx.send(i)
    tx.close()
    parts = [fut.result(timeout=T) for fut in futures]
    got = [x for part in parts for x in part]
    assert sorted(got) == list(range(1000)), "lost or duplicated"
    for part in parts:
        assert part == sorted(part), "one receiver sees its share in send order"


@pytest.mark.timeout(120)
def test_exactly_once_with_nacks(rt: phalanx.Runtime) -> None:
    tx, rx = rt.lease()
    futures = [rt.submit(channel_ops.nacker, rx, 7) for _ in range(3)]
    for i in range(1000):
        tx.send(i)
    tx.close()
    results = [fut.result(timeout=T) for fut in futures]
    acked = [x for values, _ in results for x in values]
    assert sorted(acked) == list(range(1000)), "lost or duplicated after nacks"
    assert sum(nacks for _, nacks in results) > 0
    assert rt.stats().channel_redelivered >= sum(nacks for _, nacks in results)


@pytest.mark.timeout(180)
@pytest.mark.chaos
def test_receiver_killed_midstream_its_messages_are_redelivered(tmp_path: Path) -> None:
    flag = str(tmp_path / "held.json")
    with phalanx.Runtime(workers=3) as rt:
        tx, rx = rt.lease()
        for i in range(1000):
            tx.send(i)
        tx.close()  # receivers end once all 1000 are acked: not before the hog's are redelivered
        hog = rt.submit(channel_ops.hog, rx, 5, flag)
        deadline = time.monotonic() + T
        while not os.path.exists(flag):
            assert time.monotonic() < deadline, "the hog never took its messages"
            time.sleep(0.01)
        info = json.loads(Path(flag).read_text())
        futures = [rt.submit(channel_ops.collect, rx) for _ in range(2)]
        # One of this runtime's workers (under forkserver not a child of ours): SIGKILL it.
        assert info["pid"] in rt.worker_pids().values()
        os.kill(info["pid"], signal.SIGKILL)
        got = [x for fut in futures for x in fut.result(timeout=T)]
        assert sorted(got) == list(range(1000)), "lost or duplicated after a receiver died"
        assert set(info["held"]) <= set(got)
        assert hog.result(timeout=T) == -1  # its retry did nothing
        stats = rt.stats()
        assert stats.channel_redelivered >= 5
        assert stats.worker_deaths >= 1


@pytest.mark.timeout(60)
def test_a_receiver_dropped_early_gives_back_what_it_did_not_ack(rt: phalanx.Runtime) -> None:
    tx, rx = rt.lease(prefetch=8)
    for i in range(100):
        tx.send(i)
    tx.close()
    first = rt.submit(channel_ops.take_some, rx, 10).result(timeout=T)  # left its loop early
    held = rt.submit(channel_ops.hold_and_drop, rx, 5).result(timeout=T)  # never acked them
    rest = list(rx)  # ends only once the dropped receiver's messages came back and were acked
    assert len(first) == 10
    assert sorted(first + rest) == list(range(100))
    assert set(held) <= set(rest)


@pytest.mark.timeout(60)
def test_a_receiver_gone_without_goodbye_is_found_and_its_messages_redelivered(rt: phalanx.Runtime) -> None:
    tx, rx = rt.lease()
    for i in range(3):
        tx.send(i)
    gone = rx.subscribe()
    held = gone.recv_message(timeout=T)
    # Vanish as a process that lost its socket would: no goodbye reaches the broker.
    assert gone._finalizer is not None and gone._conn is not None
    gone._finalizer.detach()
    gone._conn.sock.close(linger=0)
    tx.close()
    assert sorted(rx) == [0, 1, 2]  # the broker probes the quiet holder, finds it gone, redelivers
    assert held.value in (0, 1, 2)


@pytest.mark.timeout(60)
def test_acks_a_receiver_sent_before_going_are_honoured_though_a_send_to_it_failed_first(
    rt: phalanx.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver acks, detaches and closes its socket while the pump is busy; the pump's
    next send to it fails before it has read those frames. What it acked stays acked."""
    tx, rx = rt.lease()
    for i in range(3):
        tx.send(i)  # message ids 1, 2, 3
    tx.close()
    lid = tx.lease_id
    driver = rt._driver
    broker = driver.channels
    assert broker is not None
    ident = b"t%d~1" % os.getpid()
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, ident)
    sock.connect(rt.endpoints[1])
    try:
        sock.send(codec.encode(messages.ChanPull(lid, 0, 2, [], [])))
        held: list[int] = []
        while len(held) < 2:
            assert sock.poll(int(T * 1000))
            msg = codec.decode_channel(sock.recv())
            if isinstance(msg, messages.ChanDeliver):
                held.extend(msg.ids)
        assert held == [1, 2]

        # Stall the pump before it sends message 3 to this receiver, until the ROUTER has
        # seen the receiver go (a ping to it fails): its last frames are then still unread.
        stalled, go, unreachable = threading.Event(), threading.Event(), threading.Event()
        flush = broker.flush

        def stalling_flush() -> None:
            if not stalled.is_set() and broker.state.queued_for(ident):
                stalled.set()
                go.wait(T)
                ping = codec.encode(messages.ChanPing(lid))
                deadline = time.monotonic() + T / 2
                while time.monotonic() < deadline:
                    if not driver.send_from_pump(ident, ping):
                        unreachable.set()
                        break
                    time.sleep(0.005)
            flush()

        monkeypatch.setattr(broker, "flush", stalling_flush)
        sock.send(codec.encode(messages.ChanPull(lid, 0, 2, [1], [])))  # acks 1: message 3 is due
        assert stalled.wait(T)
        sock.send(codec.encode(messages.ChanPull(lid, 0, 0, [2], [])))  # acks 2, wants nothing more
        sock.send(codec.encode(messages.ChanDetach(lid, 0, 0, [], False)))
        sock.close(linger=int(T * 1000))  # the frames go out, then the connection closes
        go.set()
        assert list(rx) == [2]  # message 3 only: 1 and 2 were acked
        assert unreachable.is_set()  # the case above really happened
    finally:
        go.set()
        sock.close(linger=0)
        ctx.destroy(linger=0)


# --------------------------------------------------------------------------- #
# Ends as arguments and results
# --------------------------------------------------------------------------- #


@pytest.mark.timeout(60)
def test_sender_in_an_operation_receiver_in_the_driver(rt: phalanx.Runtime) -> None:
    tx, rx = rt.lease()
    fut = rt.submit(channel_ops.produce, tx, 0, 300)
    assert list(rx) == list(range(300))
    assert fut.result(timeout=T) == 300


@pytest.mark.timeout(60)
def test_two_senders_in_operations_one_closes_after_both_flushed(rt: phalanx.Runtime) -> None:
    tx, rx = rt.lease()
    a = rt.submit(channel_ops.produce, tx, 0, 100, False)
    b = rt.submit(channel_ops.produce, tx, 100, 100, False)
    assert a.result(timeout=T) == b.result(timeout=T) == 100  # flushed: the broker holds all 200
    tx.close()
    assert sorted(rx) == list(range(200))


@pytest.mark.timeout(60)
def test_actor_method_receives_a_receiver(rt: phalanx.Runtime) -> None:
    ref = rt.spawn(channel_ops.Sink)
    tx, rx = rt.lease()
    got = ref.drain(rx)
    for i in range(50):
        tx.send(i)
    tx.close()
    assert got.result(timeout=T) == list(range(50))
    assert ref.get_total().result(timeout=T) == sum(range(50))
    ref.stop()


@pytest.mark.timeout(60)
def test_ends_cross_the_wire_as_themselves(rt: phalanx.Runtime) -> None:
    tx, rx = rt.lease()
    back = rt.submit(channel_ops.return_receiver, rx).result(timeout=T)
    assert isinstance(back, phalanx.Receiver) and back.lease_id == rx.lease_id
    fut = rt.submit(channel_ops.collect_any, back)  # unannotated parameter
    for i in range(20):
        tx.send(i)
    tx.close()
    assert fut.result(timeout=T) == list(range(20))
    # a pipeline: driver -> operation (doubles) -> driver
    tx1, rx1 = rt.lease()
    tx2, rx2 = rt.lease()
    stage = rt.submit(channel_ops.echo_to, rx1, tx2)
    for i in range(30):
        tx1.send(i)
    tx1.close()
    assert list(rx2) == [2 * i for i in range(30)]
    assert stage.result(timeout=T) == 30


@pytest.mark.timeout(120)
def test_channels_reach_remote_workers_over_curve(tmp_path: Path) -> None:
    """Ends in workers of another "host" (loopback tcp, CURVE) use the same results socket."""
    keys = Keys(tmp_path / "keys")
    with phalanx.Runtime(workers=0, listen="tcp://127.0.0.1:0", **keys.runtime_kwargs()) as rt:
        assert rt.address is not None
        with RemoteHost(rt.address, "host1", keys.worker_args()) as host:
            assert rt.wait_for_workers(2, timeout=T) == 2, host.err
            tx, rx = rt.lease()
            futures = [rt.submit(channel_ops.collect, rx) for _ in range(2)]
            for i in range(300):
                tx.send(i)
            tx.close()
            assert sorted(x for f in futures for x in f.result(timeout=T)) == list(range(300))
            tx2, rx2 = rt.lease(phalanx.Broadcast)
            job = rt.submit(channel_ops.produce, tx2, 0, 100)
            assert list(rx2) == list(range(100))
            assert job.result(timeout=T) == 100


def test_end_payloads_are_validated() -> None:
    """A malformed end on the wire is a protocol error, never a crash."""
    call = messages.Call(1, 0, 0, "m:f", [msgspec.msgpack.Ext(2, b"\x93\x01")])
    with pytest.raises(phalanx.ProtocolError):
        codec.decode_inbox(codec.encode(call))
    for payload in (b"", b"\x94\x00\x00\x00\x01", b"\x94\x01\x05\x00\x01", b"\x94\x01\x00\x03\x01", b"\xc1"):
        bad = messages.Call(1, 0, 0, "m:f", [msgspec.msgpack.Ext(2, payload)])
        with pytest.raises(phalanx.ProtocolError):
            codec.decode_inbox(codec.encode(bad))
    good = codec.decode_inbox(codec.encode(messages.Call(1, 0, 0, "m:f", [phalanx.Receiver(1 << 32 | 1, phalanx.Broadcast, 9, 4)])))
    assert isinstance(good, messages.Call)
    (rx,) = good.args
    assert isinstance(rx, phalanx.Receiver) and rx.kind is phalanx.Broadcast and rx.prefetch == 4


# --------------------------------------------------------------------------- #
# Close, release, backpressure, errors
# --------------------------------------------------------------------------- #


@pytest.mark.timeout(60)
def test_closing_the_sender_drains_then_ends(rt: phalanx.Runtime) -> None:
    tx, rx = rt.lease()
    for i in range(50):
        tx.send(i)
    holder = rx.subscribe()  # another receiver of the same queue, in the driver
    held = holder.recv_message(timeout=T)  # held unacked: the channel cannot end yet
    tx.close()
    with pytest.raises(phalanx.ChannelClosedError):
        tx.send(99)
    fut = rt.submit(channel_ops.collect, rx)
    # The operation gets the other 49; it ends only after the held message is
    # nacked and redelivered to it, so it must return all 50.
    held.nack()
    assert sorted(fut.result(timeout=T)) == list(range(50))
    with pytest.raises(phalanx.ChannelClosedError) as info:
        holder.recv(timeout=T)
    assert info.value.reason == "closed"
    assert list(holder) == []


@pytest.mark.timeout(90)
def test_release_ends_receivers_and_drops_later_sends(rt: phalanx.Runtime) -> None:
    before = rt.stats().channel_messages_dropped
    lease = rt.lease()
    tx, rx = lease
    sender = rt.submit(channel_ops.send_until_closed, tx)
    receiver = rt.submit(channel_ops.collect, rx)
    assert rx.recv(timeout=T) >= 0  # messages flow
    it = iter(rx)
    next(it)  # an iterating receiver, with prefetched messages on their way
    lease.release()
    assert list(it) == [], "a receiver got something after release"
    assert list(rx) == []
    with pytest.raises(phalanx.ChannelClosedError) as info:
        rx.recv(timeout=T)
    assert info.value.reason == "released"
    got = receiver.result(timeout=T)  # the operation's iteration ended
    sent = sender.result(timeout=T)  # the operation's sender was refused
    assert sent > 0 and len(got) <= sent
    assert rt.stats().channel_messages_dropped > before
    with pytest.raises(phalanx.ChannelClosedError):
        tx.send(1)
        tx.flush(timeout=T)
    lease.release()  # idempotent
    tx.close()  # closing a released lease does nothing


@pytest.mark.timeout(60)
def test_lease_as_context_manager(rt: phalanx.Runtime) -> None:
    with rt.lease(phalanx.Broadcast) as (tx, rx):
        sub = rx.subscribe()
        tx.send("a")
        tx.send({"b": [1, 2]})
        assert sub.recv(timeout=T) == "a"
        assert rx.recv(timeout=T) == "a"
        assert sub.recv(timeout=T) == {"b": [1, 2]}
    assert list(sub) == []


@pytest.mark.timeout(60)
def test_backpressure_bounds_a_lease(rt: phalanx.Runtime) -> None:
    tx, rx = rt.lease(capacity=10)
    sent = 0
    with pytest.raises(phalanx.ChannelTimeoutError):
        for i in range(1000):
            tx.send(i, timeout=0.5)
            sent += 1
    assert 10 <= sent <= 10 + phalanx.channels.SEND_WINDOW
    # a consumer frees room; everything sent arrives once
    fut = rt.submit(channel_ops.collect, rx)
    tx.send(sent, timeout=T)
    tx.close()
    assert fut.result(timeout=T) == list(range(sent + 1))


def test_send_errors(rt: phalanx.Runtime) -> None:
    tx, rx = rt.lease()
    with pytest.raises(phalanx.EncodeError):
        tx.send(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        rt.lease(capacity=0)
    with pytest.raises(TypeError):
        rt.lease("broadcast")  # type: ignore[arg-type]
    with pytest.raises(phalanx.ChannelTimeoutError):
        rx.recv(timeout=0.05)
    tx.close()
    tx.close()
    with pytest.raises(phalanx.ChannelClosedError) as info:
        tx.send(1)
    assert info.value.reason == "end closed"
    rx.close()
    with pytest.raises(phalanx.ChannelClosedError):
        rx.recv()


def test_an_end_outside_its_runtime() -> None:
    stray: phalanx.Receiver[int] = phalanx.Receiver(12345 << 32 | 1, phalanx.ExactlyOnce)
    with pytest.raises(phalanx.RuntimeClosedError):
        stray.recv(timeout=1)
    with pytest.raises(phalanx.RuntimeClosedError):
        phalanx.Sender(12345 << 32 | 1, phalanx.ExactlyOnce).send(1)


@pytest.mark.timeout(60)
def test_an_end_in_a_process_a_task_forked_is_outside_its_runtime() -> None:
    """A worker's channel location is made when its first end needs it: a child the task forks,
    asking first, must still be refused (it is no worker), and the worker still served after."""
    with phalanx.Runtime(workers=1) as rt:
        tx, rx = rt.lease()
        fut = rt.submit(channel_ops.end_in_a_forked_child, rx)
        tx.send(7)
        assert fut.result(timeout=T) == ("RuntimeClosedError", 7)


@pytest.mark.timeout(60)
def test_shutdown_ends_a_waiting_receiver() -> None:
    errors: list[BaseException] = []
    with phalanx.Runtime(workers=1) as rt:
        tx, rx = rt.lease()
        blocked = rt.submit(channel_ops.collect, rx)  # waits in the worker: nobody sends

        def wait() -> None:
            try:
                rx.recv()
            except BaseException as exc:
                errors.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        rt.shutdown(wait=False)
        waiter.join(T)
        assert not waiter.is_alive()
        with pytest.raises(phalanx.PhalanxError):
            blocked.result(timeout=T)
    assert len(errors) == 1 and isinstance(errors[0], phalanx.RuntimeClosedError)


# --------------------------------------------------------------------------- #
# asyncio
# --------------------------------------------------------------------------- #


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_async_iteration_and_asend() -> None:
    async with phalanx.AsyncRuntime(workers=2) as art:
        tx, rx = art.lease(capacity=16)
        got: list[int] = []

        async def consume() -> None:
            async for x in rx:
                got.append(x)

        # Consumer first: if `async for` blocked the loop, the producer below
        # could never run and the test would time out.
        consumer = asyncio.create_task(consume())
        for i in range(300):
            await tx.asend(i)  # capacity 16: it has to wait for the consumer, off the loop
        await tx.aclose()
        await asyncio.wait_for(consumer, T)
        assert got == list(range(300))
        # a sender in an operation, read with async for
        tx2, rx2 = art.lease()
        fut = art.submit(channel_ops.produce, tx2, 0, 40)
        assert [x async for x in rx2] == list(range(40))
        assert await fut == 40


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_cancelled_async_receive_loses_nothing() -> None:
    async with phalanx.AsyncRuntime(workers=1) as art:
        tx, rx = art.lease()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(rx.arecv(), 0.2)  # cancelled while waiting
        for i in range(10):
            await tx.asend(i)
        await tx.aclose()
        assert [x async for x in rx] == list(range(10))


# --------------------------------------------------------------------------- #
# Bad input never kills
# --------------------------------------------------------------------------- #

_INT = st.integers(-(2**63), 2**64 - 1)
_REQUESTS = [messages.ChanSend, messages.ChanClose, messages.ChanPull, messages.ChanSubscribe, messages.ChanDetach]


def _request(lease: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    ints = st.lists(_INT, max_size=5)
    return st.one_of(
        st.builds(messages.ChanSend, lease, _INT, st.binary(max_size=40)),
        st.builds(messages.ChanClose, lease, _INT),
        st.builds(messages.ChanPull, lease, _INT, _INT, ints, ints),
        st.builds(messages.ChanSubscribe, lease, _INT, _INT),
        st.builds(messages.ChanDetach, lease, _INT, _INT, ints, st.booleans()),
    ).map(codec.encode)


@st.composite
def _junk(draw: st.DrawFn, lease: st.SearchStrategy[int]) -> list[bytes]:
    """One multipart message: channel requests for leases that do not exist, truncated, retagged, or bytes."""
    def frame() -> bytes:
        kind = draw(st.sampled_from(["request", "truncated", "retagged", "bytes"]))
        if kind == "bytes":
            return draw(st.binary(max_size=200))
        data = draw(_request(lease))
        if kind == "truncated":
            return data[: draw(st.integers(0, len(data) - 1))]
        if kind == "retagged":
            body = msgspec.msgpack.decode(data)
            body[0] = draw(st.sampled_from(["ChanAck", "ChanDeliver", "ChanEnd", "Nope", ""]) | _INT)
            return msgspec.msgpack.encode(body)
        return data

    return [frame() for _ in range(draw(st.integers(1, 3)))]


@pytest.mark.timeout(240)
def test_malformed_channel_frames_are_counted_and_dropped(tmp_path: Path) -> None:
    with phalanx.Runtime(workers=2) as rt:
        tx, rx = rt.lease()
        base = tx.lease_id >> phalanx.channels.LEASE_SHIFT
        other = _INT.filter(lambda n: n >> phalanx.channels.LEASE_SHIFT != base)
        ctx: zmq.Context[Any] = zmq.Context()
        socks: list[zmq.Socket[Any]] = []
        sent = 0
        names = iter(range(10**9))
        try:
            before = rt.stats().frames_dropped

            @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
            @given(tag=st.binary(max_size=8), batch=st.lists(_junk(other), min_size=1, max_size=4))
            def fuzz(tag: bytes, batch: list[list[bytes]]) -> None:
                nonlocal sent
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 0)
                sock.setsockopt(zmq.ROUTING_ID, b"fz%d" % next(names) + tag.replace(b"\0", b"") + b"~1")
                sock.connect(rt.endpoints[1])
                socks.append(sock)
                for parts in batch:
                    sock.send_multipart(parts, zmq.NOBLOCK)
                    sent += 1

            fuzz()
            deadline = time.monotonic() + T
            while rt.stats().frames_dropped < before + sent and time.monotonic() < deadline:
                time.sleep(0.01)
            assert rt.stats().frames_dropped - before == sent

            # Well-formed but hostile requests on the real lease: acks and nacks of
            # messages not held, impossible windows, detaches of strangers.
            hostile = ctx.socket(zmq.DEALER)
            hostile.setsockopt(zmq.LINGER, 0)
            hostile.setsockopt(zmq.ROUTING_ID, b"hostile~1")
            hostile.connect(rt.endpoints[1])
            socks.append(hostile)
            lid = tx.lease_id
            for msg in (
                messages.ChanPull(lid, 0, 0, [1, 2, 3], [4, 5]),
                messages.ChanPull(lid, 0, -5, [], []),
                messages.ChanPull(lid, 7, 10**9, [], []),
                messages.ChanDetach(lid, 0, 1, [1, 2], True),
                messages.ChanSubscribe(lid, 99, 1),
                messages.ChanPull(lid, 0, 0, [], list(range(100))),
            ):
                hostile.send(codec.encode(msg))

            # The runtime serves, and the lease is still exactly-once.
            pids = rt.worker_pids()
            assert rt.submit(channel_ops.produce, tx, 0, 200, True).result(timeout=T) == 200
            assert list(rx) == list(range(200))
            assert rt.worker_pids() == pids
            assert rt.stats().worker_deaths == 0
        finally:
            for sock in socks:
                sock.close(linger=0)
            ctx.destroy(linger=0)


# --------------------------------------------------------------------------- #
# Exactly-once under random interleavings
# --------------------------------------------------------------------------- #

_ENDS = 3
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 5)),
        st.tuples(st.just("recv"), st.integers(0, _ENDS - 1)),
        st.tuples(st.just("ack"), st.integers(0, _ENDS - 1), st.integers(0, 100)),
        st.tuples(st.just("nack"), st.integers(0, _ENDS - 1), st.integers(0, 100)),
        st.tuples(st.just("close"), st.integers(0, _ENDS - 1)),
    ),
    max_size=30,
)


@pytest.mark.timeout(300)
def test_exactly_once_under_random_interleavings(rt: phalanx.Runtime) -> None:
    """Whatever the order of operations (and however the broker's frames
    interleave), every message is acknowledged exactly once."""

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(steps=_steps, prefetch=st.integers(1, 3))
    def check(steps: list[tuple[Any, ...]], prefetch: int) -> None:
        tx, rx = rt.lease(prefetch=prefetch)
        ends = [rx.subscribe() for _ in range(_ENDS)]
        held: list[list[phalanx.Message[int]]] = [[] for _ in range(_ENDS)]
        acked: list[int] = []
        sent = 0
        for step in steps:
            if step[0] == "send":
                for _ in range(step[1]):
                    tx.send(sent)
                    sent += 1
            elif step[0] == "recv":
                try:
                    held[step[1]].append(ends[step[1]].recv_message(timeout=0.02))
                except phalanx.ChannelTimeoutError:
                    pass
            elif step[0] in ("ack", "nack") and held[step[1]]:
                msg = held[step[1]].pop(step[2] % len(held[step[1]]))
                if step[0] == "ack":
                    msg.ack()
                    acked.append(msg.value)
                else:
                    msg.nack()
            elif step[0] == "close":
                ends[step[1]].close()  # what it held goes back to the queue
                held[step[1]].clear()
                ends[step[1]] = rx.subscribe()
        tx.close()
        for i, end in enumerate(ends):
            for msg in held[i]:
                msg.ack()
                acked.append(msg.value)
            end.close()
        acked.extend(rx)  # the rest, until the channel ends
        assert Counter(acked) == Counter(range(sent))

    check()
