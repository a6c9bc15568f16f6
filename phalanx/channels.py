"""Channels in user code: ``rt.lease(kind)`` returns a ``(Sender, Receiver)`` pair.

Runs in every process that holds a channel end: the driver (user threads)
and the workers (an operation or actor method that got an end as an
argument; ends travel as msgpack extension types, so they arrive as
themselves). The channel's state lives in the driver, in the broker
(:mod:`phalanx.broker`); an end is a handle that talks to it over the
driver's results ROUTER, each end with its own DEALER socket, opened when the
end is first used in a process, whose routing identity is
``<worker id>~<n>`` (``d<pid>~<n>`` in the driver)::

    any process, the thread using the end              driver process
    ┌──────────────────────────────────────┐           ┌──────────────────────────────────────┐
    │ Sender.send ─ ChanSend ─▶ DEALER "w3~7" ──ipc/tcp──▶ results ROUTER ─▶ pump thread:     │
    │             ◀ ChanAck ──                │  (CURVE) │  "~" in the identity ─▶ Broker       │
    │ Receiver ─── ChanPull (acks, window) ─▶ DEALER ───▶   leases, queues, unacked per end,  │
    │  iter/recv ◀ ChanDeliver, ChanEnd ──── "w3~8" ◀───   deferred send acks (backpressure)  │
    └──────────────────────────────────────┘           │ supervisor thread: a worker died ─▶  │
                                                       │  Broker redelivers what it held      │
                                                       └──────────────────────────────────────┘

A worker learns where its driver is from :func:`set_worker_location`
(``run_worker``); the driver process from :func:`register_driver` (the
broker, at the first ``rt.lease``). Anywhere else an end raises
:class:`~phalanx.RuntimeClosedError`.

Invariants kept (the broker keeps the rest, see :mod:`phalanx.broker`):

* **Lease isolation.** An end only speaks of its own lease and subscription
  and drops whatever arrives for another; a receiver of a released lease
  drops what it buffered and ends at once: it never yields anything late.
* **Exactly-once (ExactlyOnce).** A receiver acknowledges a message once:
  iteration acks it when the next one is asked for or the loop ends,
  ``recv`` at once, a :class:`Message` when told. What it holds unacked
  when it is closed, collected or its process dies is redelivered.
* **No hang.** Every wait has a timeout path and wakes every
  ``_SLICE`` seconds to check the runtime: once it is shut down (in the
  driver) or shutting the worker down, the wait raises
  :class:`~phalanx.RuntimeClosedError` instead of waiting forever.
* **Bounded memory.** In the driver, each end tells the broker when it is
  made and when it is closed or collected, and when it is encoded (then
  copies may live elsewhere): the broker frees a lease none of whose ends is
  left (see :mod:`phalanx.broker`).
* **No pickle on the wire.** Values are encoded with the usual codec before
  anything is sent (:class:`~phalanx.EncodeError` otherwise); the broker
  never decodes them.

One end is used from one thread at a time, like a socket (an ``async for``
or ``asend`` waits in the loop's default executor, still one call at a
time); copies of an end (each operation that got it) are independent ends.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import functools
import itertools
import os
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from types import TracebackType
from typing import Any, Generic, NamedTuple, TypeVar

import msgspec
import zmq

from .errors import ChannelClosedError, ChannelTimeoutError, PhalanxError, ProtocolError, RuntimeClosedError
from .transport import sockets
from .transport.codec import decode_channel, decode_value, encode, encode_value, register_ext
from .transport.messages import (
    CHAN_CLOSED,
    CHAN_OK,
    CHAN_RELEASED,
    CHAN_UNKNOWN,
    CHAN_UNSUBSCRIBED,
    ChanAck,
    ChanClose,
    ChanDeliver,
    ChanDetach,
    ChanEnd,
    ChannelReply,
    ChanPull,
    ChanReply,
    ChanSend,
    ChanSubscribe,
)

__all__ = [
    "ChannelKind",
    "ExactlyOnce",
    "Broadcast",
    "Sender",
    "Receiver",
    "Message",
    "Lease",
    "LEASE_SHIFT",
    "SEND_WINDOW",
    "MAX_PREFETCH",
    "set_worker_location",
    "register_driver",
    "close_all",
]

# Defined beside the broker's state (no I/O there); public here.
from .core.channels import LEASE_SHIFT, MAX_PREFETCH, Broadcast, ChannelKind, ExactlyOnce  # noqa: E402

T = TypeVar("T")


_KINDS = (ExactlyOnce, Broadcast)
_KIND_CODE = {ExactlyOnce: 0, Broadcast: 1}

#: sends a sender has in flight before ``send`` waits for the broker's acks
SEND_WINDOW = 64
#: seconds between checks of the deadline and of the runtime while an end waits
_SLICE = 0.1
#: milliseconds the socket of an end dropped without close() keeps its last frames (a
#: receiver's goodbye, a sender's last sends) for ZeroMQ to deliver; closing never blocks
_GOODBYE_LINGER = 1000
#: seconds a receiver's close() waits for the broker to confirm (it closes anyway after)
CLOSE_TIMEOUT = 5.0

_REASONS = {
    CHAN_CLOSED: "closed",
    CHAN_RELEASED: "released",
    CHAN_UNKNOWN: "unknown",
    CHAN_UNSUBSCRIBED: "unsubscribed",
}
_TEXT = {
    CHAN_CLOSED: "the lease's sending side was closed",
    CHAN_RELEASED: "the lease was released",
    CHAN_UNKNOWN: "the lease is unknown to this runtime (an end of another runtime?)",
    CHAN_UNSUBSCRIBED: "the subscription was closed",
}
#: reasons that end an iteration quietly (StopIteration); any other is raised
_ENDINGS = ("closed", "released", "unsubscribed")


def _closed_error(status: int, lease: int) -> ChannelClosedError:
    reason = _REASONS.get(status, "unknown")
    return ChannelClosedError(f"channel (lease {lease:#x}): {_TEXT.get(status, _TEXT[CHAN_UNKNOWN])}", reason)


# --------------------------------------------------------------------------- #
# Where the driver is, per process
# --------------------------------------------------------------------------- #


class _Location:
    """How ends in this process reach one driver's broker."""

    __slots__ = ("endpoint", "curve", "prefix", "alive", "release", "released", "limits", "count", "share", "pid",
                 "connect", "clock")

    def __init__(
        self,
        endpoint: str,
        curve: sockets.Curve | None,
        prefix: bytes,
        alive: Callable[[], bool],
        release: Callable[[int], None] | None = None,
        released: Callable[[int], bool] | None = None,
        limits: sockets.Limits | None = None,
        count: Callable[[int, int], None] | None = None,
        share: Callable[[int], None] | None = None,
        connect: Callable[[_Location], _Conn] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.prefix = prefix
        self.alive = alive
        #: in the driver: release a lease, and tell whether one was released (no round trip)
        self.release = release
        self.released = released
        #: the sockets' limits (None: the process default, which a worker sets from its spec)
        self.limits = limits
        #: in the driver: an end was made (+1) or closed or collected (-1); an end was encoded
        self.count = count
        self.share = share
        #: makes an end's connection (None: a DEALER socket; SimRuntime links ends to its broker in process)
        self.connect = connect
        #: what ends' timeouts are measured on (SimRuntime: its virtual clock)
        self.clock = clock
        self.pid = os.getpid()


_lock = threading.RLock()  # re-entrant: a finalizer the collector runs under it takes it again
_worker_at: _Location | None = None
#: a worker's location as set (endpoint, curve, worker id, alive, the pid that set it): made a
#: _Location by the first end that needs it, not as the worker starts (most tasks use no end)
_worker_given: tuple[str, sockets.Curve | None, str, Callable[[], bool], int] | None = None
_drivers: dict[int, _Location] = {}
_ctx: zmq.Context[zmq.Socket[bytes]] | None = None
_ctx_pid = 0
_conns: set[_Conn] = set()
_ids = itertools.count(1)
_nonces = itertools.count(1)


# A forked child owns nothing of its parent's: not its lock state, nor its ends' sockets (nor its
# context: _context() makes one per process). Each hook is a method in C (the objects are never
# rebound): a fork runs no Python code of this module, where a function of ours cost each worker
# ~0.04 ms as it started (the pages of its code and of what it touched, copied).
os.register_at_fork(after_in_child=_lock._at_fork_reinit)  # type: ignore[attr-defined]
os.register_at_fork(after_in_child=_conns.clear)


def set_worker_location(
    endpoint: str, curve: sockets.Curve | None, worker_id: str, alive: Callable[[], bool]
) -> None:
    """In a worker (``run_worker``): ends here reach the driver at ``endpoint`` as ``<worker id>~<n>``.

    ``alive()`` turns false when the worker is shutting down; waiting ends then raise.
    """
    global _worker_at, _worker_given
    _worker_at = None
    _worker_given = (endpoint, curve, worker_id, alive, os.getpid())


def _worker_location() -> _Location | None:
    """This process's worker location (see set_worker_location), made at its first use."""
    global _worker_at
    inside = _worker_at
    if inside is None and _worker_given is not None:
        with _lock:  # one location, whichever thread makes the first end
            inside = _worker_at
            given = _worker_given
            if inside is None and given is not None:
                endpoint, curve, worker_id, alive, pid = given
                inside = _Location(endpoint, curve, worker_id.encode(), alive)
                inside.pid = pid  # a process the worker forked is no worker: its ends do not work there
                _worker_at = inside
    return inside


def register_driver(
    key: int,
    endpoint: str,
    alive: Callable[[], bool],
    release: Callable[[int], None],
    released: Callable[[int], bool],
    limits: sockets.Limits | None = None,
    count: Callable[[int, int], None] | None = None,
    share: Callable[[int], None] | None = None,
    connect: Callable[[_Location], _Conn] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """In the driver (the broker): ends of leases ``key << LEASE_SHIFT + n`` reach it at ``endpoint``.

    ``count(lease, +1 / -1)`` hears of every end made, and closed or
    collected, in this process; ``share(lease)`` of every end encoded here;
    ``connect(location)``, if given, makes an end's connection instead of a
    DEALER socket, and ``clock`` is what the ends' timeouts run on
    (:class:`~phalanx.testing.SimRuntime`: its connection and its virtual clock).
    """
    _drivers[key] = _Location(endpoint, None, b"d%d" % os.getpid(), alive, release, released, limits, count, share,
                              connect, clock)


def _in_driver(lease: int) -> _Location | None:
    """The location of ``lease``'s broker, if it is in this process."""
    where = _drivers.get(lease >> LEASE_SHIFT)
    return where if where is not None and where.pid == os.getpid() else None


def unregister_driver(key: int) -> None:
    """The runtime of ``key`` shut down: its ends fail with RuntimeClosedError from now on."""
    _drivers.pop(key, None)


def _locate(lease: int) -> _Location:
    pid = os.getpid()
    where = _drivers.get(lease >> LEASE_SHIFT)
    if where is not None and where.pid == pid and where.connect is not None:
        return where  # a simulated runtime's lease: its ends are in this process, in its workers too
    inside = _worker_location()
    if inside is not None and inside.pid == pid:
        return inside
    if where is not None and where.pid == pid:
        return where
    raise RuntimeClosedError(
        f"a channel end of lease {lease:#x} was used outside its runtime: ends work in the "
        "driver process that leased them and in that runtime's workers"
    )


def _context() -> zmq.Context[zmq.Socket[bytes]]:
    global _ctx, _ctx_pid
    with _lock:
        if _ctx is None or _ctx_pid != os.getpid():
            _ctx = zmq.Context()
            _ctx_pid = os.getpid()
            _conns.clear()
        return _ctx


def close_all() -> None:
    """Close every end's socket in this process at once (linger 0): at exit."""
    with _lock:
        conns = list(_conns)
        _conns.clear()
    for conn in conns:
        if conn.pid == os.getpid() and not conn.sock.closed:
            conn.sock.close(linger=0)


atexit.register(close_all)


class _Conn:
    """One end's DEALER socket in this process, connected to its driver's results ROUTER."""

    __slots__ = ("sock", "ident", "pid", "where", "__weakref__")

    def __init__(self, where: _Location) -> None:
        ctx = _context()
        self.where = where
        self.pid = os.getpid()
        # Unguessable after the "~": the broker sends this end's messages to whoever holds the
        # identity, so another authorized key must not be able to claim it if this connection breaks.
        self.ident = where.prefix + b"~%d-%s" % (next(_ids), secrets.token_hex(8).encode())
        self.sock = sockets.dealer(ctx, where.endpoint, self.ident, where.curve, where.limits)
        with _lock:
            _conns.add(self)

    def send(self, msg: Any) -> None:
        if self.pid != os.getpid():  # an end inherited through fork: the socket is the parent's
            raise ChannelClosedError("a channel end cannot be used across fork", "end closed")
        try:
            self.sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # closed, or (never with windows) a full pipe
            raise ChannelClosedError(f"the channel end's socket cannot send: {exc}", "end closed") from None

    def replies(self, timeout_ms: int) -> list[ChannelReply]:
        """What the broker sent, waiting up to ``timeout_ms`` for the first frame."""
        sock = self.sock
        out: list[ChannelReply] = []
        if self.pid != os.getpid():
            raise ChannelClosedError("a channel end cannot be used across fork", "end closed")
        if timeout_ms > 0 and not sock.poll(timeout_ms):
            return out
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                out.append(decode_channel(frame))
            except ProtocolError:
                continue  # bad input never kills: the frame is dropped

    def close(self, goodbye: Any = None, linger: int = 0) -> None:
        """Close the socket (never blocks); ``goodbye`` is sent first, ``linger`` ms to deliver it."""
        if self.pid != os.getpid():
            return  # a forked child: the socket is its parent's
        with _lock:
            _conns.discard(self)
        sock = self.sock
        if sock.closed:
            return
        if goodbye is not None:
            try:
                sock.send(encode(goodbye), zmq.NOBLOCK)
                linger = max(linger, _GOODBYE_LINGER)
            except zmq.ZMQError:
                pass
        sock.close(linger=linger)


def _open(where: _Location) -> _Conn:
    """A connection for an end: a DEALER socket, or what the location makes instead."""
    return _Conn(where) if where.connect is None else where.connect(where)


def _clock(lease: int) -> Callable[[], float]:
    """The clock ``lease``'s ends measure timeouts on: a simulated runtime's own, else the monotonic clock."""
    where = _drivers.get(lease >> LEASE_SHIFT)
    if where is not None and where.connect is not None and where.pid == os.getpid():
        return where.clock
    return time.monotonic


def _deadline(timeout: float | None, lease: int) -> float | None:
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0, got {timeout}")
    return _clock(lease)() + timeout


class _Cancelled(Exception):
    """An ``async`` wait's task was cancelled: its thread gives up."""


def _wait_slice(where: _Location, deadline: float | None, what: str, cancel: threading.Event | None) -> int:
    """Milliseconds to poll for next; raises if the wait must end (timeout, runtime gone, cancelled)."""
    if cancel is not None and cancel.is_set():
        raise _Cancelled
    if not where.alive():
        raise RuntimeClosedError(f"the runtime shut down while a channel end waited to {what}")
    if deadline is None:
        return int(_SLICE * 1000)
    remaining = deadline - where.clock()
    if remaining <= 0:
        raise ChannelTimeoutError(f"channel {what} timed out")
    return max(1, int(min(remaining, _SLICE) * 1000))


# --------------------------------------------------------------------------- #
# Sender
# --------------------------------------------------------------------------- #


class _End:
    """What a sender and a receiver share: their lease, its kind, and a socket opened on first use."""

    __slots__ = ("_lease", "_kind", "_conn", "_closed", "_answers", "_finalizer", "_counted", "__weakref__")

    def __init__(self, lease: int, kind: ChannelKind) -> None:
        self._lease = lease
        self._kind = kind
        self._conn: _Conn | None = None
        self._closed = False
        #: answers of the broker to this end's requests, by nonce
        self._answers: dict[int, int] = {}
        self._finalizer: weakref.finalize[Any, Any] | None = None
        #: in the driver: tells the broker once that this end is gone (closed or collected)
        self._counted: weakref.finalize[Any, Any] | None = None
        where = _in_driver(lease)
        if where is not None and where.count is not None:
            where.count(lease, 1)
            self._counted = weakref.finalize(self, where.count, lease, -1)
            self._counted.atexit = False

    def _gone(self) -> None:
        """This end is closed: the broker frees a lease none of whose ends is left."""
        if self._counted is not None:
            self._counted()

    @property
    def lease_id(self) -> int:
        """The id of the lease this end belongs to."""
        return self._lease

    @property
    def kind(self) -> ChannelKind:
        """ExactlyOnce or Broadcast."""
        return self._kind


class Sender(_End, Generic[T]):
    """The sending end of a lease, made by :meth:`phalanx.Runtime.lease`.

    ``send(value)`` queues a value on the lease. Pass the sender to
    operations and actor methods as an argument; each copy is an independent
    end of the same lease, and any copy may ``close()`` the lease's sending
    side. Dropping a copy does not close anything.

    ``send`` returns once the value is on its way: up to ``SEND_WINDOW`` sends
    may be in flight, and it waits (up to ``timeout``) while the lease holds
    more than its capacity of unconsumed messages. ``flush()`` waits until
    the broker has everything sent so far; ``close()`` flushes, then closes.
    A sender dropped without either still delivers what it sent unless its
    process exits at once.
    """

    __slots__ = ("_window", "_seq", "_acked", "_status")

    def __init__(self, lease: int, kind: ChannelKind, window: int = SEND_WINDOW) -> None:
        super().__init__(lease, kind)
        self._window = max(1, min(window, SEND_WINDOW))
        self._seq = 0
        self._acked = 0
        self._status = CHAN_OK

    @property
    def closed(self) -> bool:
        """True once this end was closed, or learnt that the lease's sending side was."""
        return self._closed or self._status != CHAN_OK

    def __repr__(self) -> str:
        return f"Sender(lease={self._lease:#x}, kind={self._kind.name})"

    def _connect(self) -> _Conn:
        conn = self._conn
        if conn is None:
            conn = self._conn = _open(_locate(self._lease))
            # Dropped without close(): let ZeroMQ deliver the last sends, never block.
            self._finalizer = weakref.finalize(self, conn.close, None, _GOODBYE_LINGER)
            self._finalizer.atexit = False
        return conn

    def _read(self, conn: _Conn, timeout_ms: int) -> None:
        for msg in conn.replies(timeout_ms):
            if isinstance(msg, ChanAck) and msg.lease == self._lease:
                if msg.status == CHAN_OK:
                    self._acked = max(self._acked, min(msg.seq + 1, self._seq))
                else:  # refused from here on: nothing in flight will be queued
                    self._status = msg.status
                    self._acked = self._seq
            elif isinstance(msg, ChanReply) and msg.lease == self._lease:
                self._answers[msg.nonce] = msg.status

    def _wait(self, conn: _Conn, done: Callable[[], bool], deadline: float | None, what: str,
              cancel: threading.Event | None = None) -> None:
        self._read(conn, 0)
        while not done() and self._status == CHAN_OK:
            self._read(conn, _wait_slice(conn.where, deadline, what, cancel))

    def _check(self) -> None:
        if self._closed:
            raise ChannelClosedError("this sender was closed", "end closed")
        if self._status != CHAN_OK:
            raise _closed_error(self._status, self._lease)

    def send(self, value: T, timeout: float | None = None) -> None:
        """Queue ``value`` on the lease.

        Raises :class:`~phalanx.EncodeError` (before sending) for a value
        msgpack cannot carry, :class:`~phalanx.ChannelClosedError` once the
        lease is closed or released (a send already in flight then is
        dropped and counted), :class:`~phalanx.ChannelTimeoutError` if the
        lease stays full for ``timeout`` seconds (the value is not sent).
        """
        self._send(value, timeout, None)

    def _send(self, value: Any, timeout: float | None, cancel: threading.Event | None) -> None:
        self._check()
        data = encode_value(value, "a channel message")  # tuples, sets, big ints arrive as themselves
        conn = self._connect()
        deadline = _deadline(timeout, self._lease)
        self._wait(conn, lambda: self._seq - self._acked < self._window, deadline, "send", cancel)
        self._check()
        conn.send(ChanSend(self._lease, self._seq, data))
        self._seq += 1

    async def asend(self, value: T, timeout: float | None = None) -> None:
        """:meth:`send` without blocking the event loop (a full lease is waited for in a thread).

        A cancelled ``asend`` that had to wait sends nothing, unless room
        came at the very moment it was cancelled.
        """
        self._check()
        if self._conn is not None and self._seq - self._acked < self._window:
            self._send(value, timeout, None)  # room in the window: never waits
            return
        import asyncio  # only ever awaited under a running event loop: imported by then

        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, functools.partial(self._send, value, timeout, cancel))
        except asyncio.CancelledError:
            cancel.set()
            raise

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the broker has queued everything this end sent.

        Raises :class:`~phalanx.ChannelClosedError` if some of it was refused
        (the lease was closed or released meanwhile).
        """
        if self._closed:
            return
        conn = self._conn
        if conn is None:
            return
        self._wait(conn, lambda: self._acked >= self._seq, _deadline(timeout, self._lease), "flush")
        if self._status != CHAN_OK:
            raise _closed_error(self._status, self._lease)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then close the lease's sending side; idempotent.

        Receivers end once everything sent before is delivered and
        acknowledged. Later sends from any copy raise
        :class:`~phalanx.ChannelClosedError`. Closing a released lease does
        nothing.
        """
        if self._closed:
            return
        if self._status != CHAN_OK:
            self._close_socket()
            return
        deadline = _deadline(timeout, self._lease)
        try:
            conn = self._connect()
            self._wait(conn, lambda: self._acked >= self._seq, deadline, "close")
            if self._status == CHAN_OK:
                nonce = next(_nonces)
                conn.send(ChanClose(self._lease, nonce))
                self._wait(conn, lambda: nonce in self._answers, deadline, "close")
        except RuntimeClosedError:
            pass  # the runtime, and its leases, are gone: nothing left to close
        self._close_socket()  # not on a timeout: the lease is still open, close() may be retried

    async def aclose(self, timeout: float | None = None) -> None:
        """:meth:`close` without blocking the event loop."""
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)

    def _close_socket(self) -> None:
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._conn is not None:
            self._conn.close()
        self._gone()

    def __enter__(self) -> Sender[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# --------------------------------------------------------------------------- #
# Receiver
# --------------------------------------------------------------------------- #


class Message(Generic[T]):
    """A received message waiting for :meth:`ack` or :meth:`nack` (see :meth:`Receiver.recv_message`)."""

    __slots__ = ("value", "id", "_rx", "_settled")

    def __init__(self, rx: Receiver[T], msg_id: int, value: T) -> None:
        #: the value sent
        self.value = value
        #: the message's id within its lease
        self.id = msg_id
        self._rx = rx
        self._settled = False

    def ack(self) -> None:
        """Done with it: it will not be delivered again. A second ack or nack does nothing."""
        if not self._settled:
            self._settled = True
            self._rx._settle(self.id, True)

    def nack(self) -> None:
        """Not done: put it back at the front of the queue, for any receiver (maybe this one)."""
        if not self._settled:
            self._settled = True
            self._rx._settle(self.id, False)

    def __repr__(self) -> str:
        return f"Message(id={self.id}, value={self.value!r})"


def _drop_receiver(conn: _Conn, lease: int, sub: int, acks: list[int]) -> None:
    """A receiver was collected: ack what it consumed; the broker redelivers what else it held."""
    conn.close(ChanDetach(lease, sub, 0, list(acks)))


class Receiver(_End, Generic[T]):
    """The receiving end of a lease, made by :meth:`phalanx.Runtime.lease`.

    Iterate it (``for x in rx`` or ``async for x in rx``) until the channel
    ends: after the sender closed and everything was delivered and
    acknowledged, or at once when the lease is released. Iteration
    acknowledges each message when it asks for the next one (or the loop
    ends); :meth:`recv` acknowledges at once; :meth:`recv_message` and
    :meth:`messages` leave it to you (:class:`Message` ``.ack()`` /
    ``.nack()``).

    For an ExactlyOnce lease every receiver (each copy passed to an
    operation) takes messages from the lease's one queue. A Broadcast
    receiver *is* a subscription: its copies share it; :meth:`subscribe`
    makes a new one. A receiver holds at most ``prefetch`` unacknowledged
    messages; dropping or closing it gives them back to the queue.
    """

    __slots__ = ("_sub", "_prefetch", "_buffer", "_acks", "_ended", "_streaming", "_holding", "_waiting", "_sent",
                 "_busy")

    def __init__(self, lease: int, kind: ChannelKind, sub: int = 0, prefetch: int = 8) -> None:
        super().__init__(lease, kind)
        self._sub = sub
        self._prefetch = max(1, min(prefetch, MAX_PREFETCH))
        self._buffer: deque[tuple[int, bytes]] = deque()
        #: consumed, acked with the next request (mutated in place: the finalizer holds it)
        self._acks: list[int] = []
        self._ended = CHAN_OK
        #: an iteration runs: keep ``prefetch`` messages coming (else ask one at a time)
        self._streaming = False
        #: messages handed out by recv_message and not yet acked or nacked
        self._holding = 0
        #: a recv waits for one message
        self._waiting = 0
        #: the window last told to the broker
        self._sent = 0
        self._busy = threading.Lock()

    @property
    def prefetch(self) -> int:
        """Most unacknowledged messages this receiver holds (the rest wait for other receivers)."""
        return self._prefetch

    @prefetch.setter
    def prefetch(self, n: int) -> None:
        if not 1 <= n <= MAX_PREFETCH:
            raise ValueError(f"prefetch must be 1..{MAX_PREFETCH}, got {n}")
        self._prefetch = n

    def __repr__(self) -> str:
        sub = f", subscription={self._sub:#x}" if self._kind is Broadcast else ""
        return f"Receiver(lease={self._lease:#x}, kind={self._kind.name}{sub})"

    # ---- talking to the broker ----------------------------------------------------

    def _connect(self) -> _Conn:
        conn = self._conn
        if conn is None:
            conn = self._conn = _open(_locate(self._lease))
            self._finalizer = weakref.finalize(self, _drop_receiver, conn, self._lease, self._sub, self._acks)
            self._finalizer.atexit = False
        return conn

    def _read(self, conn: _Conn, timeout_ms: int) -> None:
        lease, sub = self._lease, self._sub
        for msg in conn.replies(timeout_ms):
            if isinstance(msg, ChanDeliver):
                if msg.lease == lease and msg.sub == sub and self._ended == CHAN_OK:
                    self._buffer.extend(zip(msg.ids, msg.data))
            elif isinstance(msg, ChanEnd):
                if msg.lease == lease and msg.sub == sub:
                    self._ended = msg.reason if msg.reason != CHAN_OK else CHAN_UNKNOWN
                    if self._ended != CHAN_CLOSED:
                        self._buffer.clear()  # released: nothing late
            elif isinstance(msg, ChanReply) and msg.lease == lease:
                self._answers[msg.nonce] = msg.status

    def _window(self) -> int:
        """How many unacked messages this end wants to hold at the broker now.

        While iterating, ``prefetch`` beyond those it holds; otherwise only
        what it holds, plus one while a ``recv`` waits: an idle receiver
        takes nothing other receivers could have.
        """
        held = self._holding + (self._prefetch if self._streaming else len(self._buffer) + self._waiting)
        return min(held, MAX_PREFETCH)

    def _pull(self, conn: _Conn, nacks: list[int] | None = None) -> None:
        acks = self._acks
        window = self._sent = self._window()
        conn.send(ChanPull(self._lease, self._sub, window, list(acks), nacks or []))
        acks.clear()

    def _take(self, deadline: float | None, stream: bool,
              cancel: threading.Event | None = None) -> tuple[int, bytes]:
        """The next message (id, data), acking what was consumed; raises ChannelClosedError at the end."""
        with self._busy:
            if self._closed:
                raise ChannelClosedError("this receiver was closed", "end closed")
            conn = self._connect()
            buffer = self._buffer
            released = conn.where.released
            if released is not None and self._ended == CHAN_OK and released(self._lease):
                # In the driver: after release() returns, nothing more is yielded.
                self._ended = CHAN_RELEASED
                buffer.clear()
            if self._ended == CHAN_OK:
                self._read(conn, 0)  # an End that already arrived wins over what is buffered
                self._streaming = stream
                if self._acks or self._window() != self._sent:
                    self._pull(conn)
                if not buffer and not stream:
                    self._waiting = 1
                    self._pull(conn)
            try:
                while not buffer:
                    if self._ended != CHAN_OK:
                        raise _closed_error(self._ended, self._lease)
                    self._read(conn, _wait_slice(conn.where, deadline, "receive", cancel))
            except (ChannelTimeoutError, _Cancelled):
                if self._waiting and self._ended == CHAN_OK:
                    self._waiting = 0
                    self._pull(conn)  # gave up: withdraw the request (one already sent waits in the buffer)
                raise
            finally:
                self._waiting = 0
            return buffer.popleft()

    def _took(self, msg_id: int, ack: bool) -> None:
        """After a recv: ack at once (``ack``) or count it as held; ask for nothing more."""
        conn = self._conn
        if ack:
            self._acks.append(msg_id)
        else:
            self._holding += 1
        if ack and conn is not None and self._ended == CHAN_OK:
            self._pull(conn)

    def _settle(self, msg_id: int, ack: bool) -> None:
        conn = self._conn
        self._holding = max(0, self._holding - 1)
        if self._closed or conn is None or self._ended != CHAN_OK:
            return  # nothing to settle: the broker forgot what this end held
        if ack:
            self._acks.append(msg_id)
            self._pull(conn)
        else:
            self._pull(conn, [msg_id])

    def _pause(self) -> None:
        """A loop ended early: ack what it consumed, give back what it had not reached."""
        conn = self._conn
        self._streaming = False
        if conn is None or self._closed or self._ended != CHAN_OK:
            return
        try:
            back = [mid for mid, _ in self._buffer]
            self._buffer.clear()
            self._pull(conn, back)
        except PhalanxError:
            pass

    # ---- receiving --------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> T:
        """The next value, acknowledged at once.

        Raises :class:`~phalanx.ChannelClosedError` once the channel has
        ended (``reason`` says why), :class:`~phalanx.ChannelTimeoutError`
        after ``timeout`` seconds without one, :class:`~phalanx.DecodeError`
        for a message that cannot be decoded (it is acknowledged).
        """
        msg_id, data = self._take(_deadline(timeout, self._lease), False)
        self._took(msg_id, True)
        return decode_value(data)  # type: ignore[no-any-return]

    def recv_message(self, timeout: float | None = None) -> Message[T]:
        """The next message, unacknowledged: call its ``ack()`` or ``nack()``.

        Until then it counts against ``prefetch``; if this receiver is
        closed, collected or its process dies first, it is redelivered.
        """
        return self._message(*self._take(_deadline(timeout, self._lease), False))

    def _message(self, msg_id: int, data: bytes) -> Message[T]:
        try:
            value = decode_value(data)
        except PhalanxError:
            self._took(msg_id, True)
            raise
        self._took(msg_id, False)
        return Message(self, msg_id, value)

    def __iter__(self) -> Iterator[T]:
        return self._iterate()

    def _iterate(self) -> Iterator[T]:
        with contextlib.closing(self._received()) as received:
            for msg_id, data in received:
                self._acks.append(msg_id)  # acked when the next is asked for, or the loop ends
                yield decode_value(data)

    def messages(self) -> Iterator[Message[T]]:
        """Iterate :class:`Message` objects, to ack or nack each yourself."""
        with contextlib.closing(self._received()) as received:
            for msg_id, data in received:
                yield self._message(msg_id, data)

    def _received(self) -> Generator[tuple[int, bytes], None, None]:
        """(id, encoded value) of each message until the channel ends; pauses if left early."""
        finished = False
        try:
            while True:
                try:
                    msg_id, data = self._take(None, True)
                except ChannelClosedError as exc:
                    if exc.reason in _ENDINGS:
                        finished = True
                        return
                    raise
                yield msg_id, data
        finally:
            if not finished:
                self._pause()

    # ---- asyncio --------------------------------------------------------------------

    async def _atake(self, deadline: float | None, stream: bool) -> tuple[int, bytes]:
        if self._buffer and self._conn is not None and not self._closed:
            return self._take(deadline, stream)  # buffered: never waits
        cancel = threading.Event()
        handover = threading.Lock()
        box: list[tuple[int, bytes]] = []

        def wait() -> tuple[int, bytes]:
            item = self._take(deadline, stream, cancel)
            with handover:
                if cancel.is_set():  # nobody will read it: back to the buffer
                    with self._busy:
                        self._buffer.appendleft(item)
                    raise _Cancelled
                box.append(item)
            return item

        import asyncio

        try:
            return await asyncio.get_running_loop().run_in_executor(None, wait)
        except asyncio.CancelledError:
            with handover:
                cancel.set()  # a waiting thread gives up within _SLICE
                if box:  # it finished, but its result is lost with the cancelled future
                    self._buffer.appendleft(box.pop())
            raise

    async def arecv(self, timeout: float | None = None) -> T:
        """:meth:`recv` without blocking the event loop."""
        msg_id, data = await self._atake(_deadline(timeout, self._lease), False)
        self._took(msg_id, True)
        return decode_value(data)  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncIterator[T]:
        return self._aiterate()

    async def _aiterate(self) -> AsyncIterator[T]:
        finished = False
        try:
            while True:
                try:
                    msg_id, data = await self._atake(None, True)
                except ChannelClosedError as exc:
                    if exc.reason in _ENDINGS:
                        finished = True
                        return
                    raise
                self._acks.append(msg_id)
                yield decode_value(data)
        finally:
            if not finished:
                self._pause()

    # ---- subscriptions and closing -----------------------------------------------------------

    def subscribe(self, timeout: float | None = None) -> Receiver[T]:
        """A new receiver of the same lease.

        Broadcast: a new, independent subscription, registered at the
        broker before this returns: it gets every message sent after that.
        ExactlyOnce: another receiver of the lease's one queue.
        """
        if self._kind is ExactlyOnce:
            return Receiver(self._lease, self._kind, 0, self._prefetch)
        if self._closed:
            raise ChannelClosedError("this receiver was closed", "end closed")
        with self._busy:
            conn = self._connect()
            sub = secrets.randbits(62) + 2  # 1 is the lease's first subscription
            nonce = next(_nonces)
            conn.send(ChanSubscribe(self._lease, sub, nonce))
            deadline = _deadline(timeout, self._lease)
            self._read(conn, 0)
            while nonce not in self._answers:
                self._read(conn, _wait_slice(conn.where, deadline, "subscribe", None))
            status = self._answers.pop(nonce)
        if status != CHAN_OK:
            raise _closed_error(status, self._lease)
        return Receiver(self._lease, self._kind, sub, self._prefetch)

    @property
    def closed(self) -> bool:
        """True once this end was closed."""
        return self._closed

    def close(self, timeout: float | None = None) -> None:
        """Stop receiving; idempotent.

        What this end consumed is acknowledged; what it held besides goes
        back to the queue for other receivers. Closing a Broadcast receiver
        ends its subscription, for every copy of it.
        """
        if self._closed:
            return
        unsubscribe = self._kind is Broadcast
        conn = self._conn
        try:
            if conn is None and unsubscribe:
                conn = self._connect()
            if conn is not None and conn.where.alive() and self._ended == CHAN_OK:
                with self._busy:
                    nonce = next(_nonces)
                    conn.send(ChanDetach(self._lease, self._sub, nonce, list(self._acks), unsubscribe))
                    self._acks.clear()
                    self._buffer.clear()
                    deadline = _deadline(CLOSE_TIMEOUT if timeout is None else timeout, self._lease)
                    self._read(conn, 0)
                    while nonce not in self._answers:
                        self._read(conn, _wait_slice(conn.where, deadline, "close", None))
        except (RuntimeClosedError, ChannelTimeoutError, ChannelClosedError):
            pass  # the broker redelivers what this end held when it finds it gone
        finally:
            self._closed = True
            self._buffer.clear()
            if self._finalizer is not None:
                self._finalizer.detach()
            if conn is not None:
                conn.close()
            self._gone()

    def __enter__(self) -> Receiver[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# --------------------------------------------------------------------------- #
# The pair
# --------------------------------------------------------------------------- #


class Lease(NamedTuple, Generic[T]):
    """``(sender, receiver)`` of one lease, from :meth:`phalanx.Runtime.lease`.

    Unpack it (``tx, rx = rt.lease()``) or use it as a context manager
    (``with rt.lease() as (tx, rx):``), which releases the lease on exit.
    """

    sender: Sender[T]
    receiver: Receiver[T]

    @property
    def id(self) -> int:
        """The lease id."""
        return self.sender.lease_id

    def release(self) -> None:
        """Drop the lease in the driver; idempotent.

        Receivers end at once (nothing queued or buffered is delivered
        after), later sends are dropped and counted
        (``RuntimeStats.channel_messages_dropped``) and the senders then
        raise :class:`~phalanx.ChannelClosedError`.
        """
        where = _drivers.get(self.id >> LEASE_SHIFT)
        if where is not None and where.release is not None and where.pid == os.getpid():
            where.release(self.id)

    def __enter__(self) -> Lease[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


# --------------------------------------------------------------------------- #
# Ends on the wire: msgpack extension types 1 and 2
# --------------------------------------------------------------------------- #

SENDER_EXT = 1
RECEIVER_EXT = 2
_SENDER_FORM = msgspec.msgpack.Decoder(tuple[int, int, int])
_RECEIVER_FORM = msgspec.msgpack.Decoder(tuple[int, int, int, int])


def _shared(end: _End) -> None:
    where = _in_driver(end._lease)
    if where is not None and where.share is not None:
        where.share(end._lease)  # a copy may live on elsewhere: only close or release frees the lease


def _sender_to_bytes(tx: Sender[Any]) -> bytes:
    _shared(tx)
    return msgspec.msgpack.encode((tx._lease, _KIND_CODE[tx._kind], tx._window))


def _sender_from_bytes(data: memoryview) -> Sender[Any]:
    lease, kind, window = _SENDER_FORM.decode(data)
    if lease <= 0 or not 0 <= kind < len(_KINDS) or not 1 <= window <= SEND_WINDOW:
        raise ValueError("malformed channel sender")
    return Sender(lease, _KINDS[kind], window)


def _receiver_to_bytes(rx: Receiver[Any]) -> bytes:
    _shared(rx)
    return msgspec.msgpack.encode((rx._lease, _KIND_CODE[rx._kind], rx._sub, rx._prefetch))


def _receiver_from_bytes(data: memoryview) -> Receiver[Any]:
    lease, kind, sub, prefetch = _RECEIVER_FORM.decode(data)
    if (
        lease <= 0
        or not 0 <= kind < len(_KINDS)
        or sub < 0
        or (kind == 0 and sub != 0)
        or not 1 <= prefetch <= MAX_PREFETCH
    ):
        raise ValueError("malformed channel receiver")
    return Receiver(lease, _KINDS[kind], sub, prefetch)


def lease_ends(lease_id: int, sub: int, kind: ChannelKind, capacity: int, prefetch: int) -> Lease[Any]:
    """The two ends of a lease the broker state opened (both hosts' ``rt.lease``)."""
    return Lease(Sender(lease_id, kind, min(SEND_WINDOW, capacity)), Receiver(lease_id, kind, sub, prefetch))


register_ext(SENDER_EXT, Sender, _sender_to_bytes, _sender_from_bytes)
register_ext(RECEIVER_EXT, Receiver, _receiver_to_bytes, _receiver_from_bytes)
