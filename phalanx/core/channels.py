"""The channel broker's state: leases, subscriptions, receivers, who gets which message.

No I/O and no clock: the host hands it decoded frames from channel ends (with
``now``), tells it of ends made, gone and encoded, and of workers that
exited, and sends what :meth:`ChannelState.flush` returns. Two hosts run it:
:class:`phalanx.broker.Broker` in the driver (pump, supervisor and user
threads, under the broker's lock; ZeroMQ) and
:class:`phalanx.testing.sim_channels.SimChannels` (the simulator's thread,
virtual clock). Message ids, delivery order and redelivery are decided here
only.

Per lease: its kind, capacity, whether its sending side is closed, and its
subscriptions (one, id 0, for ExactlyOnce; one per subscriber for
Broadcast). Per subscription: a queue of ``(message id, data)``, its
receivers in round-robin order, and how many messages they hold. Per
receiver (routing identity ``<worker id>~<n>``): its window (most unacked
messages it takes) and the messages it holds unacked.

Invariants kept (the broker's docstring, :mod:`phalanx.broker`, says how the
host keeps its part):

1. **Exactly-once (ExactlyOnce).** A message is in exactly one place until
   its first ack removes it: the queue, or one receiver's unacked set. A
   receiver that nacks it, closes, is collected, cannot be reached, or whose
   worker dies puts it back at the front of the queue. An ack from a
   receiver that no longer holds the message is ignored.
2. **Lease isolation.** A message is only ever queued on its own lease's
   subscriptions; after ``release`` nothing of the lease is delivered.
3. **Order per subscription (Broadcast).** Each subscription gets every
   message sent after it subscribed, in the order sends reach the state.
4. **No hang.** Receivers end once the lease is closed, drained and nothing
   is held; a quiet receiver holding messages is probed.
7. **Bounded memory.** Sends are acknowledged only while the lease holds at
   most ``capacity`` unconsumed messages; a lease is freed once closed,
   consumed and its receivers ended, once every end of it in the driver is
   closed or collected and none was ever encoded, or at ``release``.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any, Protocol

from ..transport.messages import (
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
    ChanPing,
    ChanPull,
    ChanReply,
    ChanSend,
    ChanSubscribe,
)

__all__ = [
    "ChannelState", "Counters", "PROBE_EVERY", "MAX_SUBSCRIPTIONS", "MAX_DEAD",
    "ChannelKind", "ExactlyOnce", "Broadcast", "LEASE_SHIFT", "MAX_PREFETCH", "check_lease",
]


class ChannelKind(enum.Enum):
    """How a lease delivers its messages (see :meth:`phalanx.Runtime.lease`)."""

    #: each message goes to exactly one receiver: receivers share the work
    EXACTLY_ONCE = "exactly_once"
    #: each message goes to every subscription, in send order
    BROADCAST = "broadcast"


ExactlyOnce = ChannelKind.EXACTLY_ONCE
Broadcast = ChannelKind.BROADCAST

#: a lease id is ``base + n``; ``id >> LEASE_SHIFT`` names its runtime within the driver process
LEASE_SHIFT = 32
#: most unacked messages one receiver may hold
MAX_PREFETCH = 10_000


def check_lease(kind: object, capacity: object, prefetch: object) -> None:
    """The checks of ``rt.lease(kind, capacity=..., prefetch=...)``'s arguments (TypeError, ValueError)."""
    if not isinstance(kind, ChannelKind):
        raise TypeError(f"kind must be phalanx.ExactlyOnce or phalanx.Broadcast, got {kind!r}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 1 <= prefetch <= MAX_PREFETCH:
        raise ValueError(f"prefetch must be an int in 1..{MAX_PREFETCH}, got {prefetch!r}")


#: seconds a receiver holding messages may stay quiet before the broker checks it is there
PROBE_EVERY = 1.0
#: subscriptions one Broadcast lease may have
MAX_SUBSCRIPTIONS = 10_000
#: dead workers remembered (their late frames are ignored)
MAX_DEAD = 10_000


class Counters(Protocol):
    """Where the state counts bad input, dropped and redelivered messages (the host's stats)."""

    frames_dropped: int
    channel_messages_dropped: int
    channel_redelivered: int


class _Sub:
    __slots__ = ("id", "queue", "order", "held")

    def __init__(self, sub_id: int) -> None:
        self.id = sub_id
        self.queue: deque[tuple[int, bytes]] = deque()
        #: identities of its receivers, in round-robin order
        self.order: deque[bytes] = deque()
        #: messages its receivers hold unacked
        self.held = 0


class _End:
    """A receiver end, by routing identity."""

    __slots__ = ("ident", "lease", "sub", "window", "unacked", "seen", "lost")

    def __init__(self, ident: bytes, lease: int, sub: int, now: float) -> None:
        self.ident = ident
        self.lease = lease
        self.sub = sub
        self.window = 0
        self.unacked: dict[int, bytes] = {}
        self.seen = now
        #: a send to it failed: out of its subscription's order, what it holds kept until dropped
        self.lost = False


class _Lease:
    __slots__ = ("id", "kind", "capacity", "closed", "subs", "next_id", "deferred", "ends", "shared")

    def __init__(self, lease_id: int, kind: ChannelKind, capacity: int) -> None:
        self.id = lease_id
        self.kind = kind
        self.capacity = capacity
        self.closed = False
        self.subs: dict[int, _Sub] = {}
        self.next_id = 1
        #: (sender identity, seq) of sends queued while the lease was over capacity: acked later
        self.deferred: deque[tuple[bytes, int]] = deque()
        #: its ends alive in the driver process (counted as the pump learns of them)
        self.ends = 0
        #: an end of it was encoded (passed to an operation or actor, sent, returned): copies may live elsewhere
        self.shared = False

    def backlog(self) -> int:
        subs = self.subs
        if not subs:
            return 0
        return max(len(s.queue) + s.held for s in subs.values())


class ChannelState:
    """Every lease of one runtime (see the module docstring); the host serialises calls."""

    def __init__(self, base: int, counters: Counters) -> None:
        #: lease ids are ``base << LEASE_SHIFT + n``: unique per runtime
        self.base = base
        self.counters = counters
        self._issued = 0
        self._leases: dict[int, _Lease] = {}
        self._ends: dict[bytes, _End] = {}
        #: identity prefixes (worker ids) of dead workers -> when they died
        self._dead: dict[bytes, float] = {}
        self._out: list[tuple[bytes, Any]] = []
        #: coalesced send acks, one per sender identity: (lease, seq)
        self._acks: dict[bytes, tuple[int, int]] = {}
        #: receivers found unreachable by the last flush: dropped by the next unless heard from
        self._lost: list[_End] = []
        self._probed = 0.0
        #: leases released by release() (bit n: the n-th issued): a late end hears "released", else "closed"
        self._released_bits = bytearray()

    @property
    def open_leases(self) -> int:
        """Leases not freed yet."""
        return len(self._leases)

    @property
    def receivers(self) -> int:
        """Receivers known (routing identities)."""
        return len(self._ends)

    def queued_for(self, ident: bytes) -> bool:
        """Is a message waiting to be sent to ``ident``?"""
        return any(who == ident for who, _ in self._out)

    # ---- inputs ----------------------------------------------------------------------

    def open(self, kind: ChannelKind, capacity: int) -> tuple[int, int]:
        """A new lease: (its id, the id of its first subscription)."""
        self._issued += 1
        lease_id = (self.base << LEASE_SHIFT) + self._issued
        lease = self._leases[lease_id] = _Lease(lease_id, kind, capacity)
        sub = 0 if kind is ExactlyOnce else 1
        lease.subs[sub] = _Sub(sub)
        return lease_id, sub

    def release(self, lease_id: int) -> None:
        """Drop the lease: its receivers end at once, what it queued is dropped and counted."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return
        n = lease_id - (self.base << LEASE_SHIFT)
        bits = self._released_bits
        if len(bits) <= n >> 3:
            bits.extend(bytes((n >> 3) + 1 - len(bits)))
        bits[n >> 3] |= 1 << (n & 7)
        self._free(lease, CHAN_RELEASED)

    def count(self, lease_id: int, change: int) -> None:
        """An end of ``lease_id`` was made (+1) or closed or collected (-1) in the driver.

        A lease none is left of, none ever encoded, is freed: nobody can send
        to it or receive from it any more.
        """
        lease = self._leases.get(lease_id)
        if lease is None:
            return
        lease.ends += change
        if lease.ends <= 0 and not lease.shared:
            self._free(lease, None)

    def share(self, lease_id: int) -> None:
        """An end of ``lease_id`` was encoded: it may live on outside the driver (a lookup: no lock needed)."""
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.shared = True

    def worker_exited(self, prefix: bytes, now: float) -> bool:
        """A worker died: what its receivers held goes back to the front of their queues; True if any."""
        if len(self._dead) >= MAX_DEAD:
            for old in sorted(self._dead, key=self._dead.__getitem__)[: MAX_DEAD // 2]:
                del self._dead[old]
        self._dead[prefix] = now
        gone = [e for ident, e in self._ends.items() if ident.rpartition(b"~")[0] == prefix]
        for end in gone:
            self._drop_end(end)
        return bool(gone)

    def handle(self, ident: bytes, msg: Any, now: float) -> None:
        """A decoded frame from the channel end ``ident``."""
        end = self._ends.get(ident)
        if end is not None and end.lost:
            self._reinstate(end)  # still there, or its last frames: what they ack must count
        lease = self._leases.get(msg.lease)
        if lease is None:
            self._no_lease(ident, msg)
        elif isinstance(msg, ChanSend):
            self._on_send(lease, ident, msg)
        elif isinstance(msg, ChanPull):
            self._on_pull(lease, ident, msg, now)
        elif isinstance(msg, ChanDetach):
            self._on_detach(lease, ident, msg)
        elif isinstance(msg, ChanSubscribe):
            self._on_subscribe(lease, ident, msg)
        else:
            self._on_close(lease, ident, msg)

    def idle(self, now: float) -> bool:
        """Nothing to send, nobody to drop or probe (a lookup: the host may skip :meth:`flush`)."""
        return not self._out and not self._acks and not self._lost and (
            not self._ends or now - self._probed < PROBE_EVERY)

    def flush(self, now: float) -> list[tuple[bytes, Any]]:
        """What to send now, as (identity, message).

        Receivers a send failed to at the last flush (see :meth:`unreachable`)
        and not heard from since give back what they hold; quiet receivers
        holding messages are probed every ``PROBE_EVERY`` seconds.
        """
        lost, self._lost = self._lost, []
        for end in lost:
            if end.lost and self._ends.get(end.ident) is end:
                self._drop_end(end)
        if now - self._probed >= PROBE_EVERY:
            self._probed = now
            self._probe(now)
        out = self._out
        self._out = []
        out.extend((ident, ChanAck(lease, seq)) for ident, (lease, seq) in self._acks.items())
        self._acks.clear()
        return out

    def unreachable(self, idents: list[bytes]) -> bool:
        """Sends to ``idents`` failed: deliver nothing more to them; True if a next flush must drop them.

        The host's next read may still take frames they sent before going:
        only the flush after it drops a receiver still not heard from.
        """
        for ident in idents:
            found = self._ends.get(ident)
            if found is not None and not found.lost:
                self._lose(found)
        return bool(self._lost)

    # ---- requests --------------------------------------------------------------------

    def released(self, lease_id: int) -> bool:
        """Was ``lease_id`` released by release()? (Lookups only: safe without the host's lock.)"""
        if lease_id in self._leases or not self._issued_here(lease_id):
            return False
        n = lease_id - (self.base << LEASE_SHIFT)
        bits = self._released_bits
        return len(bits) > n >> 3 and bool(bits[n >> 3] & (1 << (n & 7)))

    def _issued_here(self, lease_id: int) -> bool:
        return lease_id >> LEASE_SHIFT == self.base and 0 < lease_id - (self.base << LEASE_SHIFT) <= self._issued

    def _no_lease(self, ident: bytes, msg: Any) -> None:
        """A frame for a lease that is not open: released or freed (late), or never ours (dropped).

        A lease freed once closed and consumed (or once no end of it was
        left) answers as a closed one: requests that would succeed on it
        (close, detach, subscribe) do, sends are refused, receivers end.
        """
        issued = self._issued_here(msg.lease)
        status = (CHAN_RELEASED if self.released(msg.lease) else CHAN_CLOSED) if issued else CHAN_UNKNOWN
        if not issued:
            self.counters.frames_dropped += 1
        end = self._ends.pop(ident, None)
        if end is not None:
            self._drop_end(end)
        if isinstance(msg, ChanSend):
            if issued:
                self.counters.channel_messages_dropped += 1
            self._emit(ident, ChanAck(msg.lease, msg.seq, status))
        elif isinstance(msg, ChanPull):
            self._emit(ident, ChanEnd(msg.lease, msg.sub, status))
        elif msg.nonce:  # ChanClose, ChanSubscribe, ChanDetach
            self._emit(ident, ChanReply(msg.lease, msg.nonce, CHAN_OK if status == CHAN_CLOSED else status))

    def _on_send(self, lease: _Lease, ident: bytes, msg: ChanSend) -> None:
        if lease.closed:
            self.counters.channel_messages_dropped += 1
            self._emit(ident, ChanAck(lease.id, msg.seq, CHAN_CLOSED))
            return
        item = (lease.next_id, msg.data)
        lease.next_id += 1
        subs = lease.subs.values()
        for sub in subs:
            sub.queue.append(item)
        if lease.deferred or lease.backlog() > lease.capacity:
            lease.deferred.append((ident, msg.seq))  # backpressure: the sender's window fills
        else:
            self._acks[ident] = (lease.id, msg.seq)
        for sub in subs:
            self._deliver(lease, sub)

    def _on_pull(self, lease: _Lease, ident: bytes, msg: ChanPull, now: float) -> None:
        if self._dead and ident.rpartition(b"~")[0] in self._dead:
            self.counters.frames_dropped += 1  # late, from a dead worker: what it held is redelivered
            return
        end = self._ends.get(ident)
        if (end is not None and (end.lease != lease.id or end.sub != msg.sub)) or not 0 <= msg.window <= MAX_PREFETCH:
            self.counters.frames_dropped += 1
            return
        sub = lease.subs.get(msg.sub)
        if sub is None:
            self._emit(ident, ChanEnd(lease.id, msg.sub, CHAN_UNSUBSCRIBED))
            return
        if end is None:
            end = self._ends[ident] = _End(ident, lease.id, sub.id, now)
            sub.order.append(ident)
        end.seen = now
        acked = self._ack(end, sub, msg.acks)
        if msg.nacks:
            back = [(mid, data) for mid in msg.nacks if (data := end.unacked.pop(mid, None)) is not None]
            if back:
                sub.held -= len(back)
                sub.queue.extendleft(reversed(sorted(back)))
                self.counters.channel_redelivered += len(back)
        end.window = msg.window
        if acked:
            self._release_deferred(lease)
        self._deliver(lease, sub)
        self._check_end(lease, sub)
        self._free_if_done(lease)

    def _on_detach(self, lease: _Lease, ident: bytes, msg: ChanDetach) -> None:
        end = self._ends.get(ident)
        sub = lease.subs.get(msg.sub)
        if end is not None and end.lease == lease.id and end.sub == msg.sub and sub is not None:
            if self._ack(end, sub, msg.acks):
                self._release_deferred(lease)
            self._drop_end(end)
        if msg.unsubscribe and lease.kind is Broadcast and sub is not None:
            self._unsubscribe(lease, sub)
        if msg.nonce:
            self._emit(ident, ChanReply(lease.id, msg.nonce, CHAN_OK))
        self._free_if_done(lease)

    def _on_subscribe(self, lease: _Lease, ident: bytes, msg: ChanSubscribe) -> None:
        if lease.kind is not Broadcast or msg.sub <= 1 or msg.sub in lease.subs or len(lease.subs) >= MAX_SUBSCRIPTIONS:
            self.counters.frames_dropped += 1
            self._emit(ident, ChanReply(lease.id, msg.nonce, CHAN_UNKNOWN))
            return
        lease.subs[msg.sub] = _Sub(msg.sub)
        self._emit(ident, ChanReply(lease.id, msg.nonce, CHAN_OK))

    def _on_close(self, lease: _Lease, ident: bytes, msg: ChanClose) -> None:
        lease.closed = True
        self._emit(ident, ChanReply(lease.id, msg.nonce, CHAN_OK))
        for sub in lease.subs.values():
            self._check_end(lease, sub)
        self._free_if_done(lease)

    def _emit(self, ident: bytes, msg: Any) -> None:
        ack = self._acks.pop(ident, None)
        if ack is not None:  # the sender's earlier acks go first
            self._out.append((ident, ChanAck(ack[0], ack[1])))
        self._out.append((ident, msg))

    def _ack(self, end: _End, sub: _Sub, ids: list[int]) -> int:
        unacked = end.unacked
        acked = 0
        for mid in ids:
            if unacked.pop(mid, None) is not None:
                acked += 1
        sub.held -= acked
        return acked

    def _release_deferred(self, lease: _Lease) -> None:
        if lease.deferred and lease.backlog() <= lease.capacity:
            acks = self._acks
            for ident, seq in lease.deferred:
                acks[ident] = (lease.id, seq)
            lease.deferred.clear()

    def _deliver(self, lease: _Lease, sub: _Sub) -> None:
        """Hand queued messages to receivers with room in their window, round robin."""
        queue, order, ends = sub.queue, sub.order, self._ends
        while queue and order:
            for _ in range(len(order)):
                ident = order[0]
                order.rotate(-1)
                end = ends[ident]
                room = end.window - len(end.unacked)
                if room > 0:
                    break
            else:
                return
            ids: list[int] = []
            data: list[bytes] = []
            unacked = end.unacked
            while room and queue:
                mid, value = queue.popleft()
                unacked[mid] = value
                ids.append(mid)
                data.append(value)
                room -= 1
            sub.held += len(ids)
            self._emit(ident, ChanDeliver(lease.id, sub.id, ids, data))

    def _check_end(self, lease: _Lease, sub: _Sub) -> None:
        """Closed and drained: every receiver of the subscription ends."""
        if lease.closed and not sub.queue and sub.held == 0 and sub.order:
            for ident in sub.order:
                self._ends.pop(ident, None)
                self._emit(ident, ChanEnd(lease.id, sub.id, CHAN_CLOSED))
            sub.order.clear()

    def _place_of(self, end: _End) -> tuple[_Lease | None, _Sub | None]:
        """The lease and subscription a receiver belongs to (None where they are gone)."""
        lease = self._leases.get(end.lease)
        return lease, lease.subs.get(end.sub) if lease is not None else None

    def _lose(self, end: _End) -> None:
        """A send to ``end`` failed: deliver nothing more to it; the next flush drops it unless it is heard from."""
        end.lost = True
        self._lost.append(end)
        _, sub = self._place_of(end)
        if sub is not None:
            try:
                sub.order.remove(end.ident)
            except ValueError:
                pass

    def _reinstate(self, end: _End) -> None:
        """A frame from a lost receiver: it takes part again (a failed send marks it lost again)."""
        end.lost = False
        _, sub = self._place_of(end)
        if sub is None:
            self._ends.pop(end.ident, None)  # released or unsubscribed meanwhile: its frame is answered as such
        elif end.ident not in sub.order:
            sub.order.append(end.ident)

    def _drop_end(self, end: _End) -> None:
        """Forget a receiver; what it held goes back to the front of its queue, for the others."""
        self._ends.pop(end.ident, None)
        lease, sub = self._place_of(end)
        if lease is None or sub is None:
            return
        try:
            sub.order.remove(end.ident)
        except ValueError:
            pass
        if end.unacked:
            back = sorted(end.unacked.items())
            end.unacked.clear()
            sub.held -= len(back)
            sub.queue.extendleft(reversed(back))
            self.counters.channel_redelivered += len(back)
        self._deliver(lease, sub)
        self._check_end(lease, sub)
        self._free_if_done(lease)

    def _unsubscribe(self, lease: _Lease, sub: _Sub) -> None:
        del lease.subs[sub.id]
        for ident in sub.order:
            self._ends.pop(ident, None)
            self._emit(ident, ChanEnd(lease.id, sub.id, CHAN_UNSUBSCRIBED))
        sub.order.clear()
        sub.queue.clear()
        sub.held = 0
        self._release_deferred(lease)

    def _free_if_done(self, lease: _Lease) -> None:
        """Free a closed lease once every message was consumed and every receiver ended."""
        if lease.closed and self._leases.get(lease.id) is lease and all(
                not sub.queue and not sub.held and not sub.order for sub in lease.subs.values()):
            self._free(lease, None)

    def _free(self, lease: _Lease, status: int | None) -> None:
        """Forget ``lease``: queued messages are dropped and counted; receivers end with ``status``."""
        del self._leases[lease.id]
        queued = {mid for sub in lease.subs.values() for mid, _ in sub.queue}
        self.counters.channel_messages_dropped += len(queued)
        for sub in lease.subs.values():
            for ident in sub.order:
                self._ends.pop(ident, None)
                if status is not None:
                    self._emit(ident, ChanEnd(lease.id, sub.id, status))
            sub.order.clear()
            sub.queue.clear()
        for ident, seq in lease.deferred:
            self._emit(ident, ChanAck(lease.id, seq, CHAN_OK if status is None else status))
        lease.deferred.clear()

    def _probe(self, now: float) -> None:
        for end in self._ends.values():
            if end.unacked and not end.lost and now - end.seen >= PROBE_EVERY:
                self._out.append((end.ident, ChanPing(end.lease)))
