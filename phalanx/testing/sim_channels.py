"""Channels on a SimRuntime: the core's broker state, hosted on the simulator's thread.

Runs in the calling (test) process, on the scheduler's thread. The leases,
subscriptions, deliveries, acks, nacks and redeliveries are decided by
:class:`phalanx.core.channels.ChannelState`, the code the real broker
(:mod:`phalanx.broker`) runs; the ends are the real
:class:`~phalanx.Sender` and :class:`~phalanx.Receiver`, whose connection
(:class:`SimLink`) hands their frames (encoded and decoded as on the wire) to
that state at once, on the virtual clock, and queues its answers for them.
An end used by the test waits by running the scheduler; an end used inside a
simulated worker (an operation or actor method) takes what is already there
and never runs the scheduler from inside a step. The ends' timeouts run on
the virtual clock (``register_driver(clock=...)``), as they run on the real
one on a :class:`phalanx.Runtime`.

Invariants kept: **exactly-once** and **redelivery on death** come from the
core: a simulated worker killed gives back what its receivers held
(:meth:`SimChannels.worker_exited`), and a frame to an end whose worker is dead
or that was closed fails, as a send to a gone peer does. **Same seed, same
run**: nothing here draws randomness or reads a clock but the virtual one.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import TYPE_CHECKING, Any

from ..channels import ChannelKind, Lease, _Conn, _Location, lease_ends, register_driver, unregister_driver
from ..core.channels import ChannelState, check_lease
from ..errors import ChannelClosedError, RuntimeClosedError
from ..transport.codec import decode_broker, decode_channel, encode
from ..transport.messages import ChannelReply
from .sim_jobs import HangError

if TYPE_CHECKING:
    from .sim import SimRuntime

__all__ = ["SimChannels", "SimLink"]

#: lease-id bases of simulated runtimes: one per SimRuntime in this process, never a real one's
#: (a real base is below 2**30 + 1)
_bases = itertools.count(1 << 31)


class SimLink(_Conn):
    """An end's connection on a SimRuntime: frames go to the simulated broker at once."""

    __slots__ = ("channels", "closed")

    def __init__(self, where: _Location, channels: SimChannels) -> None:  # no socket
        self.where = where
        self.channels = channels
        self.pid = where.pid
        running = channels.sim._running
        prefix = running.id.encode() if running is not None else b"driver"
        self.ident = prefix + b"~%d" % next(channels.ids)
        self.closed = False
        channels.links[self.ident] = self

    def send(self, msg: Any) -> None:
        if self.closed or self.ident not in self.channels.links:
            raise ChannelClosedError("the channel end's link is closed", "end closed")
        self.channels.receive(self.ident, encode(msg))

    def replies(self, timeout_ms: int) -> list[ChannelReply]:
        channels = self.channels
        inbox = channels.inboxes.setdefault(self.ident, deque())
        if not inbox and timeout_ms > 0:
            sim = channels.sim
            if sim._running is not None:
                raise HangError(
                    "a channel end inside a simulated worker waits for a message that is not there yet: "
                    "a SimRuntime runs one worker step at a time, so it cannot wait inside one "
                    "(send first, or receive in the test's thread)")
            deadline = sim.now + timeout_ms / 1000
            while not inbox and sim.step(deadline):
                pass
            if not inbox:
                sim.now = max(sim.now, deadline)
        out = [decode_channel(frame) for frame in inbox]
        inbox.clear()
        return out

    def close(self, goodbye: Any = None, linger: int = 0) -> None:
        if self.closed:
            return
        if goodbye is not None:
            try:
                self.send(goodbye)
            except ChannelClosedError:
                pass
        self.closed = True
        self.channels.links.pop(self.ident, None)
        self.channels.inboxes.pop(self.ident, None)


class SimChannels:
    """The leases of one SimRuntime: :class:`ChannelState` and the links of its ends."""

    def __init__(self, sim: SimRuntime) -> None:
        self.sim = sim
        self.frames_dropped = 0
        self.channel_messages_dropped = 0
        self.channel_redelivered = 0
        self.state = ChannelState(next(_bases), self)
        self.ids = itertools.count(1)
        #: live links by routing identity, and the frames waiting for each
        self.links: dict[bytes, SimLink] = {}
        self.inboxes: dict[bytes, deque[bytes]] = {}
        #: ends made (+1) and gone (-1): a collection may run at any point, so applied at the next flush
        self._counts: deque[tuple[int, int]] = deque()
        register_driver(self.state.base, "sim://", lambda: not sim.closed, self.release, self.state.released,
                        None, self._count, self.state.share, self._link, lambda: sim.now)

    def _link(self, where: _Location) -> _Conn:
        return SimLink(where, self)

    def _count(self, lease_id: int, change: int) -> None:
        self._counts.append((lease_id, change))

    def close(self) -> None:
        unregister_driver(self.state.base)

    def lease(self, kind: ChannelKind, capacity: int, prefetch: int) -> Lease[Any]:
        """:meth:`phalanx.Runtime.lease`, checked the same way."""
        check_lease(kind, capacity, prefetch)
        if self.sim.closed:
            raise RuntimeClosedError("the runtime is shut down")
        lease_id, sub = self.state.open(kind, capacity)
        self.sim._record("lease", kind.value)
        return lease_ends(lease_id, sub, kind, capacity, prefetch)

    def release(self, lease_id: int) -> None:
        self.state.release(lease_id)
        self.flush()

    def receive(self, ident: bytes, frame: bytes) -> None:
        """A frame from the end ``ident`` (decoded as the broker decodes it)."""
        self.state.handle(ident, decode_broker(frame), self.sim.now)
        self.flush()

    def worker_exited(self, worker_id: str) -> None:
        """A simulated worker died: its links are gone and what its receivers held is given back."""
        prefix = worker_id.encode() + b"~"
        for ident in [i for i in self.links if i.startswith(prefix)]:
            self.links.pop(ident).closed = True
            self.inboxes.pop(ident, None)
        if self.state.worker_exited(worker_id.encode(), self.sim.now):
            self.sim._record("channels", "redelivered from", worker_id)
        self.flush()

    def flush(self) -> None:
        """Hand what the state sends to the links; a frame to a gone end makes it unreachable."""
        state, counts = self.state, self._counts
        while True:
            while counts:
                state.count(*counts.popleft())
            gone = []
            for ident, msg in state.flush(self.sim.now):
                if ident in self.links:
                    self.inboxes.setdefault(ident, deque()).append(encode(msg))
                else:
                    gone.append(ident)
            if not gone or not state.unreachable(gone):
                return

