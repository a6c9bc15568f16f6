"""Fuzzing every socket the driver binds (invariant 6: bad input never kills).

Runs in the test (driver) process, against one ``Runtime(workers=2)`` per
module (``module_runtime``) on its private ipc endpoints, and against one
that also listens on tcp (``listen="tcp://127.0.0.1:0", insecure=True``) on
those three tcp binds. Hypothesis generates frames -- random bytes,
truncated msgpack of real wire messages, real messages with a wrong tag or a
field of the wrong type, valid messages nobody asked for, frames of a few MB
-- in multipart messages of 1-4 parts, and a ZeroMQ peer sends them:

* a DEALER to the results ROUTER and to the tasks ROUTER, with a random
  routing identity, or the identity of a live worker (``w1``) or of its
  control thread (``w1!``): ZeroMQ's ROUTER refuses a duplicate identity, so
  those messages never arrive, and the real worker's connection is unharmed;
* an XSUB to the control PUB (a PUB's peers can only send upstream frames).

Over tcp only random identities are used: the tcp ROUTERs set
``ROUTER_HANDOVER`` (a remote worker reconnecting keeps its identity), so a
peer there *may* take a worker's identity over -- which is what CURVE keys
guard against, and what ``insecure=True`` gives up. Nor does the tcp fuzz
send a well-formed Hello naming its own identity: over tcp that is a remote
worker joining, not bad input.

Afterwards the runtime must still serve (``submit`` and ``map`` correct, same
workers, none died), and every message that reached the results ROUTER from
an unknown identity must have been counted in ``frames_dropped``.
Peers are kept open until the end of a test, so that nothing queued is lost
to linger 0, and then closed with linger 0.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgspec
import msgspec.inspect as mi
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import phalanx
from phalanx.testing import ProcessLeakCheck
from phalanx.transport import messages
from phalanx.transport.codec import decode_driver

import chaos_ops
from chaos_ops import expected

# --------------------------------------------------------------------------- #
# Strategies
# --------------------------------------------------------------------------- #

_INT = st.integers(-(2**63), 2**64 - 1)
_SMALL_TEXT = st.text(max_size=20)
_PLAIN = st.recursive(
    st.none() | st.booleans() | _INT | st.floats(allow_nan=False) | _SMALL_TEXT | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_SMALL_TEXT, inner, max_size=4),
    max_leaves=10,
)


def _for_type(info: mi.Type) -> st.SearchStrategy[Any]:
    """Values msgspec would accept for ``info`` (enough of it for the wire messages)."""
    if isinstance(info, mi.StructType):
        fields = {f.name: _for_type(f.type) for f in info.fields}
        return st.builds(info.cls, **fields)
    if isinstance(info, mi.UnionType):
        return st.one_of([_for_type(t) for t in info.types])
    if isinstance(info, (mi.ListType, mi.VarTupleType)):
        return st.lists(_for_type(info.item_type), max_size=3)
    if isinstance(info, mi.DictType):
        return st.dictionaries(_for_type(info.key_type), _for_type(info.value_type), max_size=3)
    simple: dict[type, st.SearchStrategy[Any]] = {
        mi.IntType: _INT,
        mi.StrType: _SMALL_TEXT,
        mi.FloatType: st.floats(),
        mi.BoolType: st.booleans(),
        mi.NoneType: st.none(),
        mi.BytesType: st.binary(max_size=20),
    }
    for cls, strategy in simple.items():
        if isinstance(info, cls):
            return strategy
    return _PLAIN  # AnyType and anything else


def _wire_classes() -> list[type[msgspec.Struct]]:
    return [
        cls for name in messages.__all__
        if isinstance(cls := getattr(messages, name), type) and issubclass(cls, msgspec.Struct)
    ]


#: a real wire message of any kind (whichever socket it belongs to), encoded
real_frames = st.one_of([_for_type(mi.type_info(cls)) for cls in _wire_classes()]).map(msgspec.msgpack.encode)


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    frame = draw(real_frames)
    return frame[: draw(st.integers(0, max(0, len(frame) - 1)))]


@st.composite
def wrong_tag(draw: st.DrawFn) -> bytes:
    body = msgspec.msgpack.decode(draw(real_frames))
    if isinstance(body, list) and body:
        body[0] = draw(st.text(max_size=12) | _INT | st.none())
    else:
        body = [draw(st.text(max_size=12)), body]
    return msgspec.msgpack.encode(body)


@st.composite
def wrong_field_type(draw: st.DrawFn) -> bytes:
    body = msgspec.msgpack.decode(draw(real_frames))
    if isinstance(body, list) and len(body) > 1:
        i = draw(st.integers(1, len(body) - 1))
        body[i] = draw(_PLAIN)
        if draw(st.booleans()):
            body.append(draw(_PLAIN))  # and one field too many
    return msgspec.msgpack.encode(body)


@st.composite
def huge(draw: st.DrawFn) -> bytes:
    size = draw(st.integers(1_000_000, 4_000_000))
    if draw(st.booleans()):
        return bytes([draw(st.integers(0, 255))]) * size
    # valid msgpack: a Results whose outcome carries a few MB of text
    return msgspec.msgpack.encode(["Results", "w1", [["Ok", 1, 0, 0, "x" * size]], 0.0])


frames = st.one_of(
    st.binary(max_size=512),
    real_frames,
    truncated(),
    wrong_tag(),
    wrong_field_type(),
    huge(),
)
multipart = st.lists(frames, min_size=1, max_size=4)

#: routing identity: random (never a live worker's or one phalanx could hand out later) or a live worker's
_WORKERISH = re.compile(rb"^w\d+!?$")
random_identity = st.binary(min_size=1, max_size=32).filter(lambda b: b[0] != 0 and not _WORKERISH.match(b))
identities = st.one_of(
    random_identity.map(lambda b: ("random", b)),
    st.sampled_from([("worker", b""), ("worker!", b"")]),
)

# --------------------------------------------------------------------------- #
# Peers
# --------------------------------------------------------------------------- #


class Peers:
    """Fuzzing peers of one test: opened on demand, closed with linger 0 at the end."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, kind: int) -> None:
        self.ctx, self.endpoint, self.kind = ctx, endpoint, kind
        self.tcp = endpoint.startswith("tcp://")
        self.socks: list[zmq.Socket[Any]] = []
        self.sent: dict[str, int] = {"random": 0, "worker": 0, "worker!": 0}
        self.used: set[bytes] = set()
        #: messages that are legitimate requests from outside (answered, not dropped)
        self.requests = 0
        #: identities of local workers: the driver drops whatever comes under them on a ROUTER
        self.workers: set[bytes] = set()

    def unique(self, identity: bytes) -> bytes:
        """``identity``, made unique among this test's open peers (Hypothesis repeats
        values, and a ROUTER would refuse the second peer with the same identity)."""
        n = 0
        candidate = identity
        while candidate in self.used:
            n += 1
            candidate = identity + b"-%d" % n
        self.used.add(candidate)
        return candidate

    def open(self, identity: bytes | None) -> zmq.Socket[Any]:
        sock = self.ctx.socket(self.kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # never EAGAIN: everything sent is queued
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.connect(self.endpoint)
        self.socks.append(sock)
        return sock

    def send(self, sock: zmq.Socket[Any], parts: list[bytes], who: str) -> None:
        if self.tcp and _is_join(parts, sock.getsockopt(zmq.ROUTING_ID)):
            return  # a remote worker joining (tcp), not bad input: see the module docstring
        sock.send_multipart(parts, zmq.NOBLOCK)
        self.sent[who] += 1
        if who != "worker!" and _is_request(parts) and sock.getsockopt(zmq.ROUTING_ID) not in self.workers:
            self.requests += 1

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        self.socks.clear()


@pytest.fixture
def fuzz_ctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


def _decoded(parts: list[bytes]) -> object:
    """The message of a one-frame send the driver can decode, else None."""
    if len(parts) != 1:
        return None
    try:
        return decode_driver(parts[0])
    except phalanx.ProtocolError:
        return None


def _is_request(parts: list[bytes]) -> bool:
    """A well-formed inspect query (``phalanx top``): the driver answers those."""
    return type(_decoded(parts)).__name__ == "InspectQuery"


def _is_join(parts: list[bytes], identity: bytes) -> bool:
    """A well-formed Hello whose worker name is the sender's identity (a remote worker joining)."""
    msg = _decoded(parts)
    return isinstance(msg, messages.Hello) and msg.worker.encode() == identity


def _identity(rt: phalanx.Runtime, who: str, raw: bytes) -> bytes:
    if who == "random":
        return raw  # made unique by Peers.unique
    wid = sorted(rt.worker_pids())[0].encode()
    return wid + b"!" if who == "worker!" else wid


def _fuzz_dealer(rt: phalanx.Runtime, peers: Peers) -> None:
    @settings(max_examples=EXAMPLES[peers.tcp], deadline=None, suppress_health_check=list(HealthCheck))
    @given(identity=random_identity.map(lambda b: ("random", b)) if peers.tcp else identities,
           messages=st.lists(multipart, min_size=1, max_size=3))
    def fuzz(identity: tuple[str, bytes], messages: list[list[bytes]]) -> None:
        who, raw = identity
        ident = _identity(rt, who, raw)
        if who == "worker":
            peers.workers.add(ident)
        # A worker's side channel is held by the worker: a peer using its name is refused.
        sock = peers.open(ident if who == "worker!" else peers.unique(ident))
        for parts in messages:
            peers.send(sock, parts, who)

    fuzz()


def _assert_serves(rt: phalanx.Runtime, pids: dict[str, int], deaths: int) -> None:
    assert rt.submit(chaos_ops.triple_plus_one, 7).result(timeout=30) == expected(7)
    xs = list(range(200))
    assert list(rt.map(chaos_ops.triple_plus_one, xs, chunksize=7, timeout=30)) == [expected(x) for x in xs]
    assert rt.fold(chaos_ops.add, xs, chunksize=9, timeout=30) == sum(xs)
    assert rt.worker_pids() == pids, "a worker was replaced: bad input killed it"
    assert rt.stats().worker_deaths == deaths
    assert rt._driver.broken is None


def _wait_dropped(rt: phalanx.Runtime, at_least: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while rt.stats().frames_dropped < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    return rt.stats().frames_dropped


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #

#: examples per fuzzing test: ipc (False) and the tcp binds (True, fewer: same code behind them)
EXAMPLES = {False: 50, True: 25}


class Target(NamedTuple):
    """A runtime and the (tasks, results, control) endpoints to fuzz."""

    rt: phalanx.Runtime
    endpoints: tuple[str, str, str]


@pytest.fixture(scope="module", params=["ipc", "tcp"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """The shared ipc runtime's endpoints, then a tcp-listening runtime's tcp binds (loopback)."""
    if request.param == "ipc":
        rt = request.getfixturevalue("module_runtime")
        yield Target(rt, rt.endpoints)
        return
    check = ProcessLeakCheck().__enter__()
    rt = phalanx.Runtime(workers=2, listen="tcp://127.0.0.1:0", insecure=True)
    try:
        tcp = rt._driver.address
        assert tcp is not None and tcp.tasks.startswith("tcp://127.0.0.1:")
        yield Target(rt, (tcp.tasks, tcp.results, tcp.control))
        assert rt.stats().workers_joined == 0  # no fuzzing peer became a worker
    finally:
        rt.shutdown()
        report = check.check()
        assert not report, f"the tcp runtime leaked child processes: {report}"


@pytest.mark.timeout(180)
def test_results_router_survives_fuzz(target: Target, fuzz_ctx: zmq.Context[Any]) -> None:
    rt = target.rt
    tasks_ep, results_ep, control_ep = target.endpoints
    pids, deaths = rt.worker_pids(), rt.stats().worker_deaths
    before = rt.stats().frames_dropped
    peers = Peers(fuzz_ctx, results_ep, zmq.DEALER)
    try:
        _fuzz_dealer(rt, peers)
        # Every message from an unknown identity reaches the pump and is counted
        # (but for well-formed inspect requests, which are answered). A local worker
        # speaks on its pipe, so one using its name on the ROUTER is counted too;
        # one using its side channel's name is refused by ZeroMQ (the real one holds it).
        expected_drops = peers.sent["random"] + peers.sent["worker"] - peers.requests
        dropped = _wait_dropped(rt, before + expected_drops)
        _assert_serves(rt, pids, deaths)
    finally:
        peers.close()
    print(f"results ROUTER ({results_ep}): sent {peers.sent} ({peers.requests} inspect requests), "
          f"frames_dropped +{dropped - before}")
    assert expected_drops > 0
    # An inspect request is answered after asking every worker; a worker's reply that
    # comes after the request's own timeout (as short as 50 ms) is dropped and counted too.
    late_replies = peers.requests * len(pids)
    assert expected_drops <= dropped - before <= expected_drops + late_replies


@pytest.mark.timeout(180)
def test_tasks_router_survives_fuzz(target: Target, fuzz_ctx: zmq.Context[Any]) -> None:
    rt = target.rt
    pids, deaths = rt.worker_pids(), rt.stats().worker_deaths
    peers = Peers(fuzz_ctx, target.endpoints[0], zmq.DEALER)
    try:
        _fuzz_dealer(rt, peers)
        time.sleep(0.2)  # let ZeroMQ move what it will
        _assert_serves(rt, pids, deaths)
    finally:
        peers.close()
    print(f"tasks ROUTER ({target.endpoints[0]}): sent {peers.sent}")


@pytest.mark.timeout(180)
def test_control_pub_survives_fuzz(target: Target, fuzz_ctx: zmq.Context[Any]) -> None:
    rt = target.rt
    pids, deaths = rt.worker_pids(), rt.stats().worker_deaths
    peers = Peers(fuzz_ctx, target.endpoints[2], zmq.XSUB)
    sent = 0

    @settings(max_examples=EXAMPLES[peers.tcp], deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages=st.lists(multipart, min_size=1, max_size=3),
           subscribe=st.sampled_from([b"", b"\x01", b"\x00", b"\x01\x93"]))
    def fuzz(messages: list[list[bytes]], subscribe: bytes) -> None:
        nonlocal sent
        sock = peers.open(None)
        if subscribe:
            sock.send(subscribe, zmq.NOBLOCK)  # (un)subscription frames, as an XSUB sends them
        for parts in messages:
            sock.send_multipart(parts, zmq.NOBLOCK)
            sent += 1

    try:
        fuzz()
        time.sleep(0.2)
        _assert_serves(rt, pids, deaths)
    finally:
        peers.close()
    print(f"control PUB ({target.endpoints[2]}): sent {sent} messages")


def test_runtime_still_serves_after_all_fuzz(target: Target) -> None:
    """Last: each runtime is intact after every fuzzing test above."""
    rt = target.rt
    futures = [rt.submit(chaos_ops.triple_plus_one, x) for x in range(500)]
    assert [f.result(timeout=30) for f in futures] == [expected(x) for x in range(500)]
    assert rt.stats().worker_deaths == 0
