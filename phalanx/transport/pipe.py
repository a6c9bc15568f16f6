"""Length-prefixed frames over a Unix socketpair: the fast path to local workers.

Runs in the driver (one end per local worker: written under the driver's
lock, read and flushed by the pump thread) and in each local worker (the
other end, main thread only). Remote workers keep ZeroMQ.

Why not ZeroMQ here: ZeroMQ moves every message through its I/O threads, so
a round trip over ipc wakes six threads where a socketpair wakes two (on a
2-core machine: 195 us against 57 us, ``python -m benchmarks.raw``). The
kernel also batches for free: whatever the driver wrote while a worker was
busy arrives in one read.

Layout of a frame: ``u32 little-endian length``, then that many bytes.

Invariants kept:

* **Frames arrive whole and in order**, one writer and one reader per end.
* **The driver never blocks on a worker.** :meth:`FramePipe.send` writes
  what the kernel takes and keeps the rest in a backlog that the pump
  flushes when the socket is writable, so a worker blocked writing outcomes
  can never deadlock with a driver writing tasks. A worker's writes block
  (its reader, the pump, never waits on it).
* **Bad input never kills.** A length above ``max_frame`` raises
  :class:`PipeError`; the owner closes the pipe (for a local worker, that is
  the end of the worker).
"""

from __future__ import annotations

import errno
import itertools
import mmap
import select
import socket
import struct
from collections import deque

__all__ = ["FramePipe", "PipeError", "as_written", "socketpair"]

_HEADER = struct.Struct("<I")
#: frames shorter than this are copied into one buffer per write: one iovec for many small
#: tasks (a kernel takes at most IOV_MAX, 1024, per sendmsg), no copy of large ones
_JOIN_BELOW = 16 * 1024
#: iovecs passed to one sendmsg; what is beyond waits in the backlog
_MAX_PARTS = 512
#: bytes read per recv (a frame larger than this is read straight into its own buffer)
_CHUNK = 256 * 1024
#: what a closed pipe reads into: its own chunk is unmapped at close (see FramePipe.close)
_NO_CHUNK = memoryview(bytearray())
#: socket buffer asked for, each way (bytes)
BUFFER = 4 * 1024 * 1024
#: reads per call of :meth:`FramePipe.recv`, so one busy worker cannot starve the others
_MAX_READS = 64


class PipeError(Exception):
    """The peer sent a frame length above the limit (or the pipe broke)."""


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of non-blocking Unix stream sockets (driver end, worker end)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setblocking(False)
        # Large buffers: a big array then crosses in few writes (the kernel caps at wmem_max).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    return a, b


def as_written(frames: list[bytes]) -> bytes:
    """``frames`` as they cross a pipe, headers and all: what :meth:`FramePipe.send_many` writes."""
    return b"".join(_HEADER.pack(len(frame)) + frame for frame in frames)


class FramePipe:
    """One end of a frame pipe (see the module docstring)."""

    __slots__ = ("sock", "max_frame", "_backlog", "_buf", "_start", "_chunk", "_big", "_big_got", "_fd")

    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.max_frame = max_frame
        self._fd = sock.fileno()
        #: bytes the kernel did not take yet, oldest first
        self._backlog: deque[memoryview] = deque()
        self._buf = bytearray()
        self._start = 0
        # Anonymous memory, not a bytearray: the kernel maps a page at its first write, so a
        # pipe that carries small frames touches one page, where zero-filling 256 KiB cost
        # ~64 page faults in the driver and in each worker as it starts.
        # Private: a process forked from this one (a fork server, a task's child) gets a copy,
        # never a view of what this pipe reads next.
        self._chunk = memoryview(mmap.mmap(-1, _CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        #: a large frame being read into its own buffer, and how much of it arrived
        self._big: bytearray | None = None
        self._big_got = 0

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1

    @property
    def pending(self) -> bool:
        """Bytes wait in the backlog (the owner should flush when writable)."""
        return bool(self._backlog)

    # ---- writing --------------------------------------------------------------

    def send(self, frame: bytes) -> bool:
        """Write one frame without blocking; True if part of it waits in the backlog.

        Raises :class:`PipeError` if the peer is gone.
        """
        return self.send_many((frame,))

    def _send_small(self, frame: bytes) -> bool:
        """The common case, one small frame with nothing waiting before it (a lone call): header
        and frame in one buffer, one send; True if part of it waits in the backlog."""
        data = _HEADER.pack(len(frame)) + frame
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise PipeError(f"the pipe is closed: {exc}") from None
        if sent == len(data):
            return False
        self._backlog.append(memoryview(data)[sent:])
        return True

    def send_many(self, frames: tuple[bytes, ...] | list[bytes]) -> bool:
        """Write frames in one system call where the kernel takes them; True if a backlog remains."""
        if len(frames) == 1 and not self._backlog and len(frames[0]) < _JOIN_BELOW:
            return self._send_small(frames[0])
        parts: list[bytes | memoryview] = []
        small: list[bytes] = []
        for frame in frames:
            if len(frame) < _JOIN_BELOW:
                small.append(_HEADER.pack(len(frame)))
                small.append(frame)
                continue
            if small:
                parts.append(b"".join(small))
                small = []
            parts.append(_HEADER.pack(len(frame)))
            parts.append(frame)  # large frames (arrays) are written from where they are
        if small:
            parts.append(b"".join(small))
        if self._backlog:
            self._backlog.extend(memoryview(p) for p in parts)
            return True
        try:
            sent = self.sock.sendmsg(parts[:_MAX_PARTS])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise PipeError(f"the pipe is closed: {exc}") from None
        for part in parts:
            size = len(part)
            if sent >= size:
                sent -= size
                continue
            self._backlog.append(memoryview(part)[sent:])
            sent = 0
        return bool(self._backlog)

    def flush(self) -> bool:
        """Write what the backlog holds without blocking; True once it is empty."""
        backlog = self._backlog
        while backlog:
            try:
                sent = self.sock.sendmsg(list(itertools.islice(backlog, 64)))
            except BlockingIOError:
                return False
            except OSError as exc:
                raise PipeError(f"the pipe is closed: {exc}") from None
            while sent and backlog:
                head = backlog[0]
                if sent >= len(head):
                    sent -= len(head)
                    backlog.popleft()
                else:
                    backlog[0] = head[sent:]
                    sent = 0
        return True

    def send_blocking(self, frame: bytes) -> None:
        """Write one frame, waiting while the kernel buffer is full (workers only)."""
        size = len(frame)
        if size < _JOIN_BELOW and not self._backlog:
            if not self._send_small(frame):
                return
        elif not self.send(frame):
            return
        self._drain_blocking()

    def send_all_blocking(self, frames: list[bytes]) -> None:
        """Write frames in one system call where the kernel takes them, waiting while its buffer
        is full (workers only): the reader gets them in order, and usually in one read."""
        if self.send_many(frames):
            self._drain_blocking()

    def _drain_blocking(self) -> None:
        if self._backlog:
            poller = select.poll()
            poller.register(self._fd, select.POLLOUT)
            while not self.flush():
                poller.poll()

    # ---- reading --------------------------------------------------------------

    def recv(self) -> list[bytes] | None:
        """Frames that arrived whole (maybe none); None once the peer closed its end.

        Raises :class:`PipeError` on a frame length above ``max_frame``.
        """
        frames: list[bytes] = []
        chunk = self._chunk
        for _ in range(_MAX_READS):
            big = self._big
            n = self._read(chunk if big is None else memoryview(big)[self._big_got:])
            if n < 0:
                return frames
            if n == 0:
                return frames or None
            if big is not None:
                self._big_got += n
                if self._big_got == len(big):
                    frames.append(big)  # type: ignore[arg-type]  # bytes-like, owned by the receiver
                    self._big = None
                continue
            if self._buf:  # the rest of a frame begun in the last read
                self._buf += chunk[:n]
                self._parse(frames)
            else:
                # The usual case: whole frames cut straight from the chunk (one copy each);
                # only what is left of a partial one goes to the buffer.
                start, limit = 0, self.max_frame
                while n - start >= 4:
                    (size,) = _HEADER.unpack_from(chunk, start)
                    end = start + 4 + size
                    if end > n or size > limit:
                        break
                    frames.append(bytes(chunk[start + 4:end]))
                    start = end
                if start < n:  # a partial frame (or a length above max_frame: _parse raises)
                    self._buf += chunk[start:n]
                    self._parse(frames)
            if n < _CHUNK:
                return frames  # the socket is drained: spare a system call
        return frames

    def _read(self, into: memoryview) -> int:
        """Bytes read into ``into``: -1 if none are waiting, 0 once the peer is gone."""
        try:
            return self.sock.recv_into(into)
        except BlockingIOError:
            return -1
        except OSError as exc:
            if exc.errno == errno.ECONNRESET:
                return 0
            raise

    def _parse(self, frames: list[bytes]) -> None:
        buf = self._buf
        start = self._start
        end = len(buf)
        while end - start >= 4:
            (size,) = _HEADER.unpack_from(buf, start)
            if size > self.max_frame:
                raise PipeError(f"frame of {size} bytes is larger than max_frame={self.max_frame}")
            if end - start - 4 >= size:
                frames.append(bytes(buf[start + 4:start + 4 + size]))
                start += 4 + size
                continue
            if size > _CHUNK:
                # A large frame: read the rest straight into a buffer of its own.
                big = bytearray(size)
                have = end - start - 4
                big[:have] = buf[start + 4:end]
                self._big, self._big_got = big, have
                start = end
            break
        if start == end:
            buf.clear()
            self._start = 0
        else:
            self._start = start
            if start > _CHUNK:
                del buf[:start]
                self._start = 0

    def close(self) -> None:
        self._backlog.clear()
        # A dead worker's entry outlives its pipe (the driver keeps it a while): its 256 KiB
        # mapping goes now, not with the entry. A read in progress keeps the chunk it took
        # until it returns (no BufferError, no unmapping under it).
        self._chunk = _NO_CHUNK
        self._buf = bytearray()
        self._big = None
        self.sock.close()
