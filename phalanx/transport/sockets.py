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
* The two limits (the ``hwm`` and ``max_frame`` options) are :class:`Limits`:
  the driver passes its runtime's to the sockets it binds; a worker process
  serves one runtime, so :func:`run_worker <phalanx.worker.run_worker>` makes
  its spec's limits the process default with :func:`set_default_limits`.
* Over TCP: keepalive, and CURVE (server on the driver's tcp endpoints,
  client on remote workers') unless the runtime is insecure. Connecting
  sockets (remote workers) add ZMTP heartbeats.
* The driver's tcp binds face hosts that may be hostile, so they avoid two
  states of libzmq (4.3.5) that abort the process with ``Assertion failed:
  !_io_error (src/stream_engine_base.cpp:310)``: a connection whose input
  stopped on a full receive pipe and then hung up still runs its ZMTP
  heartbeat timer, and still answers a PING left in its buffer when the
  reader catches up; both call ``out_event`` on the dead connection (libzmq
  issues #4364, #4841). So on those binds the receive high-water mark is 0
  (input never stops: the driver reads every such socket and drops what it
  does not expect) and the driver sends no ZMTP heartbeats (TCP keepalive,
  tuned short, finds vanished peers; remote workers send Alive).
* No ``ROUTER_HANDOVER``: a connection cannot take over an identity that
  another one holds (a host could otherwise receive another's tasks). A
  remote worker's inbox connects under a secret identity besides (see
  ``messages.Hello``), so no other host can take it while it reconnects.
"""

from __future__ import annotations

import msgspec
import zmq

from .endpoints import Endpoints

__all__ = [
    "ZERO_COPY_MIN",
    "Limits",
    "set_default_limits",
    "default_limits",
    "Curve",
    "router",
    "dealer",
    "publisher",
    "subscriber",
    "driver_sockets",
    "close",
    "curve_server",
    "curve_client",
    "monitor",
    "events",
    "handshake_failures",
    "HANDSHAKE_FAILURES",
]


class Curve(msgspec.Struct, frozen=True):
    """CURVE keys (z85) of one side: ``server_public`` is set on clients only."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None


#: monitor events that mean a peer was refused during the ZMTP handshake
HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def events(mon: zmq.Socket[bytes]) -> list[int]:
    """Drain a :func:`monitor` socket; the codes of the events it reported."""
    from zmq.utils.monitor import recv_monitor_message

    codes: list[int] = []
    while True:
        try:
            event = recv_monitor_message(mon, zmq.NOBLOCK)
        except zmq.ZMQError:  # nothing more (EAGAIN), or the socket is closing
            return codes
        codes.append(int(event["event"]))


def handshake_failures(mon: zmq.Socket[bytes]) -> list[int]:
    """Drain a :func:`monitor` socket; the codes of the handshake failures it reported."""
    return [code for code in events(mon) if code & HANDSHAKE_FAILURES]


def monitor(sock: zmq.Socket[bytes], events: int) -> zmq.Socket[bytes]:
    """A PAIR socket receiving ``sock``'s monitor ``events`` (read with zmq.utils.monitor).

    A socket watched already returns the same monitor. Watch a socket before it
    connects or binds (the builders' ``watch=``): ZeroMQ does not retry a refused
    handshake, so a refusal that comes before the monitor is never reported.
    """
    mon: zmq.Socket[bytes] = sock.get_monitor_socket(events)
    mon.setsockopt(zmq.LINGER, 0)
    return mon


def curve_server(sock: zmq.Socket[bytes], keys: Curve) -> None:
    """Make a socket (before bind) a CURVE server; ZAP decides who may connect."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 0)


def curve_client(sock: zmq.Socket[bytes], keys: Curve) -> None:
    """Make a socket (before connect) a CURVE client of ``keys.server_public``."""
    assert keys.server_public is not None
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


#: frames at least this long are sent without a copy (smaller ones copy faster than
#: ZeroMQ can track a zero-copy buffer; pyzmq's own threshold is the same)
ZERO_COPY_MIN = 65536


class Limits(msgspec.Struct, frozen=True):
    """High-water mark and largest accepted frame of a socket (the ``hwm`` and ``max_frame`` options)."""

    #: frames queued per peer before sends fail with EAGAIN (never reached with credits)
    hwm: int = 100_000
    #: largest frame a socket accepts from a peer, in bytes
    max_frame: int = 256 * 1024 * 1024


#: kept (not only the process default until a worker sets its own): a worker replacing it frees
#: nothing, which cost it page faults as it started
_DEFAULT_LIMITS = Limits()
_default_limits = _DEFAULT_LIMITS


def set_default_limits(limits: Limits) -> None:
    """The limits of sockets made without explicit ones in this process (a worker's, from its spec)."""
    global _default_limits
    _default_limits = limits


def default_limits() -> Limits:
    """The limits of sockets made without explicit ones in this process."""
    return _default_limits


def _tcp_options(sock: zmq.Socket[bytes], bound: bool = False) -> None:
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.HANDSHAKE_IVL, 10000)
    if bound:
        # The driver's side (see the module docstring): the kernel, not ZMTP, finds a
        # vanished peer: probes after 5 s of silence, gone after 5 unanswered, or
        # after 15 s of unacknowledged data.
        sock.setsockopt(zmq.HEARTBEAT_IVL, 0)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 5)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 5)
        sock.setsockopt(zmq.TCP_MAXRT, 15000)
        sock.setsockopt(zmq.RCVHWM, 0)
        return
    # ZMTP heartbeats: a vanished driver is disconnected instead of lingering.
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 10000)


def _common(sock: zmq.Socket[bytes], endpoint: str = "", curve: Curve | None = None,
            limits: Limits | None = None, watch: int = 0) -> None:
    if limits is None:
        limits = _default_limits
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, limits.hwm)
    sock.setsockopt(zmq.RCVHWM, limits.hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_frame)
    if endpoint.startswith("tcp://"):
        _tcp_options(sock)
    if curve is not None:
        curve_client(sock, curve)
    if watch:
        monitor(sock, watch)


def _bind(sock: zmq.Socket[bytes], endpoint: str, tcp: str | None, curve: Curve | None, watch: int = 0) -> None:
    """Bind ``endpoint`` (plaintext), then ``tcp`` with tcp options and CURVE.

    ZeroMQ copies a socket's options when an endpoint is bound, so the
    private ipc endpoint of local workers stays plaintext while the tcp one
    of remote workers demands CURVE. ``watch``: see :func:`monitor`.
    """
    sock.bind(endpoint)
    if tcp is not None:
        if watch:
            monitor(sock, watch)  # before any tcp peer can come
        _tcp_options(sock, bound=True)
        # The CURVE handshake's own commands (~250 bytes) count against MAXMSGSIZE.
        sock.setsockopt(zmq.MAXMSGSIZE, max(4096, sock.getsockopt(zmq.MAXMSGSIZE)))
        if curve is not None:
            curve_server(sock, curve)
        sock.bind(tcp)


def router(
    ctx: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    send_only: bool = False,
    tcp: str | None = None,
    curve: Curve | None = None,
    limits: Limits | None = None,
    watch: int = 0,
) -> zmq.Socket[bytes]:
    """A bound ROUTER that refuses to drop unroutable messages.

    ``send_only``: nobody reads it, so it accepts one tiny frame per peer at
    most (a peer that writes to it is stalled by ZeroMQ, not buffered).
    ``tcp``: also bind this address (with ``curve`` when given).
    ``watch``: monitor these events on ``tcp`` from the start (see :func:`monitor`).
    """
    sock = ctx.socket(zmq.ROUTER)
    _common(sock, endpoint, limits=limits)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if send_only:
        # Read only to drop what peers send (see the module docstring about tcp).
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, 64)
    _bind(sock, endpoint, tcp, curve, watch)
    return sock


def dealer(
    ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, identity: bytes, curve: Curve | None = None,
    limits: Limits | None = None, watch: int = 0,
) -> zmq.Socket[bytes]:
    """A DEALER connected to ``endpoint`` whose routing identity is ``identity``.

    ``watch``: monitor these events from before the connection (see :func:`monitor`).
    """
    sock = ctx.socket(zmq.DEALER)
    _common(sock, endpoint, curve, limits, watch)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(endpoint)
    return sock


def publisher(
    ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, tcp: str | None = None, curve: Curve | None = None,
    limits: Limits | None = None, watch: int = 0,
) -> zmq.Socket[bytes]:
    """A bound PUB for control broadcasts (peers may only send subscriptions).

    ``watch``: monitor these events on ``tcp`` from the start (see :func:`monitor`).
    """
    sock = ctx.socket(zmq.PUB)
    _common(sock, endpoint, limits=limits)
    sock.setsockopt(zmq.MAXMSGSIZE, 1024)
    _bind(sock, endpoint, tcp, curve, watch)
    return sock


def subscriber(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, curve: Curve | None = None,
               limits: Limits | None = None, watch: int = 0) -> zmq.Socket[bytes]:
    """A SUB connected to ``endpoint`` and subscribed to everything.

    ``watch``: monitor these events from before the connection (see :func:`monitor`).
    """
    sock = ctx.socket(zmq.SUB)
    _common(sock, endpoint, curve, limits, watch)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


def driver_sockets(
    ctx: zmq.Context[zmq.Socket[bytes]], ipc: Endpoints, tcp: Endpoints | None, curve: Curve | None,
    limits: Limits, made: list[zmq.Socket[bytes]],
) -> dict[zmq.Socket[bytes], str]:
    """The driver's tasks ROUTER, results ROUTER and control PUB, bound to ``ipc`` (and ``tcp``).

    Each is appended to ``made`` as soon as it exists (the caller closes them if a later one
    fails). Returns, with ``tcp``, the handshake-failure monitor of each -> its tcp endpoint.
    """
    watch = HANDSHAKE_FAILURES if tcp is not None else 0
    made.append(router(ctx, ipc.tasks, send_only=True, tcp=tcp.tasks if tcp else None, curve=curve,
                       limits=limits, watch=watch))
    made.append(router(ctx, ipc.results, tcp=tcp.results if tcp else None, curve=curve, limits=limits,
                       watch=watch))
    made.append(publisher(ctx, ipc.control, tcp=tcp.control if tcp else None, curve=curve, limits=limits,
                          watch=watch))
    if tcp is None:
        return {}
    return {monitor(sock, watch): ep for sock, ep in zip(made, (tcp.tasks, tcp.results, tcp.control))}


def close(*socks: zmq.Socket[bytes] | None) -> None:
    """Close sockets at once (linger 0), ignoring ones already closed."""
    for sock in socks:
        if sock is not None and not sock.closed:
            sock.close(linger=0)
