"""The local workers' frame pipe (phalanx.transport.pipe) on real socketpairs.

Frames must arrive whole and in order whatever sizes the kernel splits them
into, the driver's writes must never block (the backlog takes what the
kernel does not), and bad lengths or a closed peer must be reported, never
hang or crash the reader.
"""

from __future__ import annotations

import select
import socket
import struct
import threading

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import phalanx
from phalanx.transport.pipe import FramePipe, PipeError, socketpair

import ops

pytestmark = pytest.mark.timeout(60)

MAX = 1 << 24


@pytest.fixture
def pair() -> tuple[FramePipe, FramePipe]:
    a, b = socketpair()
    ends = FramePipe(a, MAX), FramePipe(b, MAX)
    yield ends
    for end in ends:
        end.close()


def read_until(end: FramePipe, count: int) -> list[bytes]:
    """Read frames until ``count`` arrived (waiting on the socket, never spinning)."""
    got: list[bytes] = []
    poller = select.poll()
    poller.register(end.fileno(), select.POLLIN)
    while len(got) < count:
        assert poller.poll(5000), f"only {len(got)} of {count} frames arrived"
        frames = end.recv()
        assert frames is not None, "the pipe ended early"
        got.extend(bytes(f) for f in frames)
    return got


def test_frames_arrive_whole_and_in_order(pair: tuple[FramePipe, FramePipe]) -> None:
    a, b = pair
    frames = [b"", b"x", b"hello" * 100, bytes(range(256)) * 10]
    assert not a.send_many(frames)
    assert read_until(b, len(frames)) == frames


def test_thousands_of_small_frames_in_one_write(pair: tuple[FramePipe, FramePipe]) -> None:
    """More frames than a system call takes pieces (IOV_MAX, 1024) still go, whole and in order."""
    a, b = pair
    frames = [i.to_bytes(4, "little") * (i % 7) for i in range(5000)]
    a.send_many(frames)
    got: list[bytes] = []
    poller = select.poll()
    poller.register(b.fileno(), select.POLLIN)
    while len(got) < len(frames):
        a.flush()
        assert poller.poll(5000), f"only {len(got)} of {len(frames)} frames arrived"
        more = b.recv()
        assert more is not None
        got.extend(bytes(f) for f in more)
    assert got == frames


def test_a_large_frame_goes_through_the_backlog(pair: tuple[FramePipe, FramePipe]) -> None:
    a, b = pair
    big = bytes(range(256)) * (8 * 1024 * 4)  # 8 MiB: far above the kernel's buffer
    assert a.send(big), "the kernel took 8 MiB at once: the backlog was not exercised"
    assert a.pending
    assert a.send(b"after"), "a frame sent behind a backlog must queue behind it"
    got: list[bytes] = []
    poller = select.poll()
    poller.register(b.fileno(), select.POLLIN)
    while len(got) < 2:
        a.flush()
        poller.poll(100)
        frames = b.recv()
        assert frames is not None
        got.extend(bytes(f) for f in frames)
    assert got == [big, b"after"]
    assert a.flush() and not a.pending


def test_blocking_send_waits_for_the_reader(pair: tuple[FramePipe, FramePipe]) -> None:
    a, b = pair
    big = b"y" * (4 * 1024 * 1024)
    reader = threading.Thread(target=lambda: got.extend(read_until(b, 3)))
    got: list[bytes] = []
    reader.start()
    for frame in (big, b"1", big):
        a.send_blocking(frame)
    reader.join(10)
    assert got == [big, b"1", big]


def test_blocking_sends_of_small_frames_survive_a_full_buffer(pair: tuple[FramePipe, FramePipe]) -> None:
    """A worker's outcomes (small frames, each one write) while its reader lags: the kernel takes
    some frames in part; what it left goes first, and every frame arrives whole and in order."""
    a, b = pair
    frames = [bytes([i % 251]) * (1000 + (i * 7919) % 15000) for i in range(4000)]  # ~32 MB in all
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(read_until(b, len(frames))))
    first = 0
    while not a.pending:  # the kernel's buffer fills before anyone reads
        a.send(frames[first])
        first += 1
    reader.start()
    for frame in frames[first:]:
        a.send_blocking(frame)
    reader.join(30)
    assert len(got) == len(frames) and got == frames
    assert not a.pending


@settings(max_examples=60, deadline=None)
@given(
    frames=st.lists(st.binary(max_size=3000), max_size=30),
    cuts=st.lists(st.integers(1, 5000), min_size=1, max_size=20),
)
def test_any_split_of_the_stream_gives_the_same_frames(frames: list[bytes], cuts: list[int]) -> None:
    """The reader reassembles frames however the bytes are cut into writes."""
    raw_a, raw_b = socket.socketpair()
    reader = FramePipe(raw_b, MAX)
    try:
        stream = b"".join(struct.pack("<I", len(f)) + f for f in frames)
        got: list[bytes] = []
        pos, i = 0, 0
        while pos < len(stream):
            step = cuts[i % len(cuts)]
            raw_a.sendall(stream[pos:pos + step])
            pos += step
            i += 1
            out = reader.recv()
            assert out is not None
            got.extend(bytes(f) for f in out)
        raw_a.close()
        while (out := reader.recv()) is not None:
            got.extend(bytes(f) for f in out)
            select.select([raw_b], [], [], 1.0)
        assert got == frames
    finally:
        raw_a.close()
        reader.close()


def test_a_length_above_max_frame_is_an_error(pair: tuple[FramePipe, FramePipe]) -> None:
    a, _ = pair
    raw, reader_sock = socket.socketpair()
    reader = FramePipe(reader_sock, 100)
    try:
        raw.sendall(struct.pack("<I", 101) + b"z" * 101)
        with pytest.raises(PipeError, match="max_frame"):
            reader.recv()
    finally:
        raw.close()
        reader.close()


def test_the_end_of_the_peer_is_seen(pair: tuple[FramePipe, FramePipe]) -> None:
    a, b = pair
    a.send(b"last")
    a.close()
    assert read_until(b, 1) == [b"last"]
    assert b.recv() is None
    with pytest.raises(PipeError):
        b.send(b"x" * 1_000_000)
        b.flush()


def test_local_workers_talk_over_their_pipe_and_remote_paths_still_work() -> None:
    """A runtime's local workers each get a pipe; the answers come back on it."""
    with phalanx.Runtime(workers=2) as rt:
        driver = rt._driver
        workers = [w for w in driver._workers.values() if w.alive]
        assert workers and all(w.pipe is not None for w in workers)
        assert [f.result(timeout=30) for f in [rt.submit(ops.inc, i) for i in range(200)]] == \
            [i + 1 for i in range(200)]
        assert list(rt.map(ops.inc, range(1000), timeout=30)) == [i + 1 for i in range(1000)]
        assert rt.stats().frames_dropped == 0


def test_a_worker_fed_faster_than_it_reads_answers_every_task_once_and_in_order() -> None:
    """A worker reads its pipe only when its queue runs dry (or to decide whether a quick
    outcome may wait): quick and slow tasks mixed, hundreds in its pipe at once, each gets
    exactly its own outcome; map chunks too."""
    with phalanx.Runtime(workers=1, credits=256) as rt:
        futures = []
        for i in range(3000):
            if i % 97 == 0:
                futures.append(rt.submit(ops.sleep_then, i, 0.002))  # slow: its outcome goes at once
            else:
                futures.append(rt.submit(ops.inc, i))  # quick: batched while more wait
        assert [f.result(timeout=60) for f in futures] == \
            [i if i % 97 == 0 else i + 1 for i in range(3000)]
        assert list(rt.map(ops.inc, range(2000), chunksize=7, timeout=60)) == [i + 1 for i in range(2000)]
        stats = rt.stats()
        assert stats.frames_dropped == 0


def test_outcomes_and_control_replies_share_a_workers_pipe_without_interleaving() -> None:
    """A local worker's main thread (outcomes) and control thread (inspect replies, timeouts)
    write to the same pipe: whole frames only, even while the kernel takes large outcomes in
    parts, so the driver drops nothing and never takes the worker for a hostile one."""
    payload = bytes(range(256)) * 1200  # 300 KB each way: written in parts while the driver lags
    with phalanx.Runtime(workers=1) as rt:
        stop = threading.Event()

        def inspect() -> None:
            while not stop.is_set():
                rt.inspect(timeout=5)

        prober = threading.Thread(target=inspect)
        prober.start()
        try:
            futures = [rt.submit(ops.bytes_reverse, payload) for _ in range(300)]
            assert all(f.result(timeout=60) == payload[::-1] for f in futures)
        finally:
            stop.set()
            prober.join(30)
        stats = rt.stats()
        assert stats.frames_dropped == 0 and stats.worker_deaths == 0


@settings(max_examples=50, deadline=None)
@given(
    worker_id=st.text(min_size=1, max_size=40),
    host=st.text(max_size=80),
    tags=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4),
    credits=st.integers(min_value=1, max_value=2**32 - 1),
)
@example(worker_id="w1", host="h", tags=["default"], credits=0xFFFFFFF0)  # the pid's placeholder
def test_a_greeting_made_by_the_driver_reaches_it_with_the_workers_own_pid(
    worker_id: str, host: str, tags: list[str], credits: int
) -> None:
    """A local worker forked by the fork server sends the Hello and Ready the driver encoded
    for it, its own pid written in: whatever the names in them, the driver decodes exactly
    that worker's Hello (its pid, id, host, tags) and then its Ready, even credits that look
    like the pid's placeholder."""
    import os

    from phalanx.transport.codec import decode_driver
    from phalanx.transport.messages import Hello, Ready
    from phalanx.worker import greeting, say_greeting

    made = greeting(worker_id, host, tuple(tags), credits)
    assert made, "the driver could not make the greeting"
    ours, theirs = socketpair()
    try:
        say_greeting(theirs.fileno(), made)
        end = FramePipe(ours, 1 << 20)
        frames: list[bytes] = []
        while len(frames) < 2:
            assert select.select([ours], [], [], 5)[0], "the greeting never came"
            got = end.recv()
            assert got is not None
            frames += got
        hello, ready = (decode_driver(f) for f in frames)
        assert hello == Hello(worker_id, os.getpid(), host, tags=tags)
        assert ready == Ready(worker_id, credits)
    finally:
        ours.close()
        theirs.close()

