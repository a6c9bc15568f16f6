"""The channel broker: the driver's side of ``rt.lease(kind)`` channels.

Runs in the driver process. It hosts the state of every lease, the core's
:class:`~phalanx.core.channels.ChannelState` (which decides who gets which
message and what is redelivered; :class:`~phalanx.testing.SimRuntime` runs
the same state on its virtual clock); the broker adds the lock, the clock,
decoding and the sockets. The ends (:mod:`phalanx.channels`) are handles
that talk to it over the results ROUTER, from any process of the runtime.
Threads and what they do::

    pump thread ──── a frame from an identity with "~" ──▶ Broker.handle: decode, update,
                                                            queue the answers          [broker lock]
                └─── every pump round ─────────────────▶ Broker.flush: send them on the results
                                                            ROUTER; a receiver found gone gives
                                                            back what it held, a round later
                                                                                       [broker lock]
    user threads ─── rt.lease / Lease.release ──────────▶ Broker.open / release       [broker lock]
    supervisor thread ─ a worker exited ───────────────▶ Broker.worker_exited: its receivers'
                                                            messages go back to the queue
                                                                                       [broker lock]
    any thread ─ an end made, closed or collected ─────▶ Broker._count: queued, no lock (a
                 in the driver; an end encoded            collection may run inside it); the
                                                          next flush counts it  /  Broker._share

Only the pump sends on the ROUTER; other threads queue their frames and wake
it. Per lease: its kind, capacity, whether its sending side is closed, and
its subscriptions (one, id 0, for ExactlyOnce; one per subscriber for
Broadcast). Per subscription: a queue of ``(message id, data)``, its
receivers in round-robin order, and how many messages they hold. Per
receiver (routing identity): its window (most unacked messages it takes)
and the messages it holds unacked.

Invariants kept:

1. **Exactly-once (ExactlyOnce).** A message is in exactly one place until
   its first ack removes it: the queue, or one receiver's unacked set. A
   receiver that nacks it, closes, is collected, cannot be reached, or whose
   worker dies puts it back at the front of the queue. An ack from a
   receiver that no longer holds the message is ignored. So each message is
   acknowledged exactly once; user code sees it again only if its holder
   did not ack it (execution is at-least-once, as for tasks).
   A receiver that cannot be reached (a send to it failed: its socket is
   closed) may still have frames unread in the ROUTER, sent before it went:
   acks, a goodbye. It gets nothing more, and gives back what it holds only
   at the next pump round with no frame from it: that round's read took
   whatever it had sent (a frame from it first makes it a receiver again).
2. **Lease isolation.** A message is only ever queued on its own lease's
   subscriptions; lease ids are unique per runtime (a random base). After
   ``release`` nothing of the lease is delivered: its receivers are told to
   end and drop what they buffered, later sends are dropped and counted
   (``channel_messages_dropped``) and refused.
3. **Order per subscription (Broadcast).** Each subscription gets every
   message sent after it subscribed, appended in the order sends reach the
   broker (one sender: its send order); a nack breaks the order for that
   message only.
4. **No hang.** Receivers end once the lease is closed, the subscription's
   queue is empty and nothing is held unacked; a receiver holding messages
   that has gone quiet is probed, and one found gone gives them back (the
   round after, see 1).
6. **Bad input never kills.** An undecodable frame, a frame for a lease this
   runtime never issued, or a request that contradicts what the identity
   is (a receiver of another lease, an impossible window) is counted in
   ``frames_dropped`` and dropped; the sender of the frame is told when
   that helps a stale end end.
7. **Bounded memory.** A send is acknowledged only while the lease holds at
   most ``capacity`` unconsumed messages (queued or unacked, the longest
   subscription for Broadcast); a sender has at most ``SEND_WINDOW`` sends
   unacknowledged, so a lease holds ``capacity + SEND_WINDOW`` per sender
   at most. A lease is freed (nothing of it kept but one bit, set if it
   was released) once it is closed, consumed and its receivers ended, or
   once every end of it in the driver is closed or collected and none was
   ever encoded (passed on), or at ``release``. A late frame for a freed
   lease is answered as for a closed (or released) one.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .channels import ChannelKind, Lease, lease_ends, register_driver, unregister_driver
from .core.channels import PROBE_EVERY, ChannelState, check_lease
from .errors import ProtocolError, RuntimeClosedError
from .transport.codec import decode_broker, encode

if TYPE_CHECKING:
    from .driver import Driver

__all__ = ["Broker", "broker_of", "lease", "DEFAULT_CAPACITY", "PROBE_EVERY"]

#: unconsumed messages a lease holds before sends wait (default of ``rt.lease``)
DEFAULT_CAPACITY = 10_000


class Broker:
    """Every lease of one driver: the core's :class:`ChannelState` behind a lock, on the driver's sockets."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self._lock = threading.Lock()
        self.state = ChannelState(secrets.randbits(30) + 1, driver)
        self._base = self.state.base
        #: (lease, +1 or -1): ends made, and closed or collected, in the driver (any thread, no lock)
        self._counts: deque[tuple[int, int]] = deque()
        register_driver(self._base, driver.endpoints.results, lambda: not driver.closed, self.release,
                        self.state.released, driver.limits, self._count, self.state.share)
        driver.exit_listeners.append(self.worker_exited)

    def close(self) -> None:
        """The runtime shut down: forget where its ends connect (nothing here outlives it)."""
        unregister_driver(self._base)

    # ---- user threads -------------------------------------------------------------

    def open(self, kind: ChannelKind, capacity: int) -> tuple[int, int]:
        """A new lease: (its id, the id of its first subscription)."""
        with self._lock:
            self._driver.check_open()
            return self.state.open(kind, capacity)

    def release(self, lease_id: int) -> None:
        """Drop the lease: its receivers end at once, what it queued is dropped and counted."""
        with self._lock:
            self.state.release(lease_id)
        self._driver.wake()

    def _count(self, lease_id: int, change: int) -> None:
        """An end of ``lease_id`` was made (+1) or closed or collected (-1) in the driver.

        Any thread, even a garbage collection inside the broker lock: only
        queued here, applied by the pump's next flush.
        """
        if self._driver.closed:
            return  # shut down: its wake pipe may be closed, and its fd reused
        self._counts.append((lease_id, change))
        if change < 0:
            self._driver.wake()

    # ---- supervisor thread -----------------------------------------------------------

    def worker_exited(self, worker_id: str, exitcode: int | None) -> None:
        """A worker died: what its receivers held goes back to the front of their queues."""
        with self._lock:
            gone = self.state.worker_exited(worker_id.encode(), time.monotonic())
        if gone:
            self._driver.wake()

    # ---- pump thread ---------------------------------------------------------------------

    def handle(self, ident: bytes, frame: bytes) -> None:
        """A frame from a channel end (an identity containing "~")."""
        try:
            msg = decode_broker(frame)
        except ProtocolError:
            self._driver.frames_dropped += 1
            return
        with self._lock:
            self.state.handle(ident, msg, time.monotonic())

    def flush(self) -> None:
        """Send what is queued (pump thread, every round); probe quiet receivers that hold messages.

        A receiver a send fails to is only marked lost: this round's read
        may have missed frames it sent before its socket closed. The next
        flush comes after the pump's next read, which takes all of them
        (ZeroMQ queues a peer's frames before it reports the peer gone): a
        receiver still lost then gives back what it holds.
        """
        now = time.monotonic()
        state, counts = self.state, self._counts
        if not counts and state.idle(now):
            return
        send = self._driver.send_from_pump
        with self._lock:
            while counts:
                state.count(*counts.popleft())
            out = state.flush(now)
        gone = [ident for ident, msg in out if not send(ident, encode(msg))]
        if not gone:
            return
        with self._lock:
            if not state.unreachable(gone):
                return
        self._driver.wake()  # a next round soon: it reads what they sent, then gives back the rest


_brokers_lock = threading.Lock()


def broker_of(driver: Driver) -> Broker:
    """The driver's broker, created (and handed the channel frames) at the first call."""
    if driver.channels is None:
        driver.make_sockets()  # its ends connect to the results socket: bound before any exists
    with _brokers_lock:
        broker = driver.channels
        if broker is None:
            driver.check_open()
            broker = Broker(driver)
            driver.channels = broker
        return broker


def lease(driver: Driver, kind: ChannelKind, capacity: int, prefetch: int) -> Lease[Any]:
    """:meth:`phalanx.Runtime.lease`."""
    check_lease(kind, capacity, prefetch)
    if driver.closed:
        raise RuntimeClosedError("the runtime is shut down")
    lease_id, sub = broker_of(driver).open(kind, capacity)
    return lease_ends(lease_id, sub, kind, capacity, prefetch)
