"""Every ZeroMQ socket phalanx opens is made here, with its options.

Runs in the driver and in every worker. Keeping the options in one place is
how the transport keeps its promises:

* ``LINGER=0``: closing a socket never blocks the process on unsent frames.
* ``ROUTER_MANDATORY`` on every ROUTER: a message to an identity that is not
  connected raises ``EHOSTUNREACH`` instead of vanishing; the driver then
  treats the worker as gone and redelivers.
* Explicit high-water marks: credits keep the number of frames in flight far
  below them, so a send never blocks the driver.
* ``MAXMSGSIZE`` on sockets that accept frames from peers: a huge frame drops
  the peer's connection instead of exhausting memory (invariant 6).
"""

from __future__ import annotations

import os

import zmq

__all__ = ["SocketOptions", "router", "dealer", "publisher", "subscriber", "close"]


class SocketOptions:
    """High-water marks and size limit shared by all phalanx sockets."""

    #: frames queued per peer before sends fail with EAGAIN (never reached with credits)
    hwm: int = int(os.environ.get("PHALANX_HWM", "100000"))
    #: largest frame a socket accepts from a peer, in bytes
    max_frame: int = int(os.environ.get("PHALANX_MAX_FRAME", str(256 * 1024 * 1024)))


def _common(sock: zmq.Socket[bytes]) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SocketOptions.hwm)
    sock.setsockopt(zmq.RCVHWM, SocketOptions.hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, SocketOptions.max_frame)


def router(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, send_only: bool = False) -> zmq.Socket[bytes]:
    """A bound ROUTER that refuses to drop unroutable messages.

    ``send_only``: nobody reads it, so it accepts one tiny frame per peer at
    most (a peer that writes to it is stalled by ZeroMQ, not buffered).
    """
    sock = ctx.socket(zmq.ROUTER)
    _common(sock)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if send_only:
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, 64)
    sock.bind(endpoint)
    return sock


def dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, identity: bytes) -> zmq.Socket[bytes]:
    """A DEALER connected to ``endpoint`` whose routing identity is ``identity``."""
    sock = ctx.socket(zmq.DEALER)
    _common(sock)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(endpoint)
    return sock


def publisher(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    """A bound PUB for control broadcasts (peers may only send subscriptions)."""
    sock = ctx.socket(zmq.PUB)
    _common(sock)
    sock.setsockopt(zmq.MAXMSGSIZE, 1024)
    sock.bind(endpoint)
    return sock


def subscriber(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    """A SUB connected to ``endpoint`` and subscribed to everything."""
    sock = ctx.socket(zmq.SUB)
    _common(sock)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


def close(*socks: zmq.Socket[bytes] | None) -> None:
    """Close sockets at once (linger 0), ignoring ones already closed."""
    for sock in socks:
        if sock is not None and not sock.closed:
            sock.close(linger=0)
