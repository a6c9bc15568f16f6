"""A frame pipe's read chunk (an anonymous 256 KiB mapping) on real workers.

Frames of every size around the chunk, the kernel buffer and a few chunks cross
a local worker's pipe both ways (arguments and results); a replaced worker's
pipe gives its mapping back when it is closed, though the driver keeps the dead
worker's entry a while (``dead_worker_ttl``): the driver's closed pipes hold
no chunk.
"""

from __future__ import annotations

import gc
import mmap
import weakref

import pytest

import ops
import phalanx
from phalanx.transport.pipe import FramePipe, socketpair

pytestmark = pytest.mark.timeout(300)

CHUNK = 256 * 1024
#: seconds any one result may take (far more than it needs)
T = 120.0


def _mapping(end: FramePipe) -> weakref.ref[mmap.mmap]:
    """A weak reference to the private anonymous mapping behind a pipe end's read chunk."""
    chunk = end._chunk
    assert chunk.nbytes == CHUNK and isinstance(chunk.obj, mmap.mmap)
    return weakref.ref(chunk.obj)


def test_a_closed_pipe_gives_back_its_read_chunk_even_while_referenced() -> None:
    a, b = socketpair()
    ends = [FramePipe(a, 1 << 20), FramePipe(b, 1 << 20)]
    mappings = [_mapping(end) for end in ends]
    ends[0].send(b"x" * 10)
    assert ends[1].recv() == [b"x" * 10]
    for end in ends:
        end.close()
    gc.collect()
    assert [m() for m in mappings] == [None, None]  # the objects live on; their mappings do not
    assert ends[1].closed


def test_workers_replaced_over_and_over_leave_no_read_chunk_mapped_in_the_driver() -> None:
    with phalanx.Runtime(workers=2, restart_limit=10_000) as rt:
        assert rt.submit(ops.exit_on_negative, 1).result(T) == 2
        # Each negative item kills the worker that runs it (and those it is retried on).
        out = list(rt.options(on_fatal=phalanx.Ignore).map(ops.exit_on_negative, [-1] * 20, chunksize=1,
                                                           timeout=T))
        assert out == []
        assert rt.submit(ops.exit_on_negative, 1).result(T) == 2
        # The driver keeps each dead worker's entry, and its closed pipe, for dead_worker_ttl:
        # not the pipe's 256 KiB read chunk.
        dead = [w for w in rt._driver._workers.values() if not w.alive and w.pipe is not None]
        assert len(dead) >= 20
        assert [w.id for w in dead if w.pipe._chunk.nbytes] == []


SIZES = sorted({0, 1, 3, 4, 5} | {base + d for base in (CHUNK, 2 * CHUNK, 4 * CHUNK, 16 * CHUNK)
                                   for d in (-9, -8, -5, -4, -3, -1, 0, 1, 4, 5)})


def test_frames_of_every_size_around_the_read_chunk_cross_a_workers_pipe_both_ways(
    module_runtime: phalanx.Runtime,
) -> None:
    rt = module_runtime
    for n in SIZES:
        data = bytes(range(256)) * (n // 256) + bytes(n % 256)
        assert rt.submit(ops.bytes_reverse, data).result(T) == data[::-1], n
    # Several frames of one chunk read, each straddling or ending at a chunk's edge.
    items = [b"z" * n for n in SIZES]
    assert list(rt.map(ops.identity, items, chunksize=3, timeout=T)) == items
    assert list(rt.map(ops.identity, items[::-1], chunksize=7, timeout=T)) == items[::-1]
