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

Over insecure tcp only random identities are used (``insecure=True`` gives
up telling hosts apart). Nor does the tcp fuzz send a well-formed Hello
naming its own identity: over tcp that is a remote worker joining, not bad
input.

Last, an authorized but hostile host: a runtime with CURVE, a local worker
and an honest ``phalanx worker`` host, a job in flight, and a peer holding
the authorized key sending the frames above on every port under every
identity form (random, the local worker's plain / ``!`` / ``~`` names, the
remote worker's, an inbox identity of its own claiming the remote worker's
name, none, 255 bytes long). Every result must arrive once and
be the honest one, no frame may reach the hostile peer, and no worker may
be replaced or join.

Afterwards the runtime must still serve (``submit`` and ``map`` correct, same
workers, none died), and every message that reached the results ROUTER from
an unknown identity must have been counted in ``frames_dropped``.
Peers are kept open until the end of a test, so that nothing queued is lost
to linger 0, and then closed with linger 0.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgspec
import msgspec.inspect as mi
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
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
        #: the one open peer per side channel name (``<worker id>!``)
        self.named: dict[bytes, zmq.Socket[Any]] = {}

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
        self.named.clear()


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
        # One peer per side channel name: a ROUTER would refuse a second one holding it.
        if who == "worker!":
            sock = peers.named.get(ident) or peers.named.setdefault(ident, peers.open(ident))
        else:
            sock = peers.open(peers.unique(ident))
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
        # speaks on its pipe only (its control thread too), so one using its name or
        # its side channel's name on the ROUTER is counted too.
        expected_drops = peers.sent["random"] + peers.sent["worker"] + peers.sent["worker!"] - peers.requests
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


# --------------------------------------------------------------------------- #
# An authorized but hostile host (tcp + CURVE)
# --------------------------------------------------------------------------- #

#: an identity of the form of a remote worker's secret inbox identity (not the honest worker's)
INBOX = b"0" * messages.INBOX_LENGTH
#: identity forms a hostile host may try: a random one, a local worker's (plain, side
#: channel, channel end), the honest remote worker's (the same three), an inbox identity
#: of its own, none, very long
hostile_identities = st.one_of(
    random_identity.map(lambda b: ("random", b)),
    st.sampled_from(["local", "local!", "local~", "remote", "remote!", "remote~", "inbox", "none", "long"])
    .map(lambda k: (k, b"")),
)


class Hostile(NamedTuple):
    """A CURVE runtime with a local worker and an honest remote host, and the hostile host's keys."""

    rt: phalanx.Runtime
    endpoints: tuple[str, str, str]
    keys: Any
    remote: str


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    from remote_host import Keys, RemoteHost

    keys = Keys(tmp_path_factory.mktemp("keys"))
    check = ProcessLeakCheck().__enter__()
    rt = phalanx.Runtime(workers=1, listen="tcp://127.0.0.1:0", heartbeat_timeout=30.0, **keys.runtime_kwargs())
    try:
        with RemoteHost(rt.address or "", "honest", keys.worker_args(), workers=1, heartbeat_timeout=60) as host:
            assert rt.wait_for_workers(2, timeout=60) == 2, host.err
            (remote,) = [w.id for w in rt.stats().workers if w.remote]
            tcp = rt._driver.address
            assert tcp is not None
            yield Hostile(rt, (tcp.tasks, tcp.results, tcp.control), keys, remote)
            assert host.proc.poll() is None, host.err
    finally:
        rt.shutdown()
        report = check.check()
        assert not report, f"the hostile-host runtime leaked child processes: {report}"


@pytest.mark.timeout(300)
def test_an_authorized_hostile_host_misleads_nothing(hostile_target: Hostile, fuzz_ctx: zmq.Context[Any]) -> None:
    """Any frames, any port, any identity, with the host's own authorized key, while tasks run:
    every result arrives exactly once and is the honest one, no task reaches the hostile
    host, the honest workers serve on (none replaced, none joined besides the honest one)."""
    import multihost_ops as ops
    from phalanx.transport import keys as curve_keys

    rt, keys, remote = hostile_target.rt, hostile_target.keys, hostile_target.remote
    public, secret = curve_keys.load_secret(keys.host_secret)
    server = curve_keys.load_public(keys.driver_public)
    pids, deaths = rt.worker_pids(), rt.stats().worker_deaths
    n = 400
    running = rt.map(ops.slow_where, range(n), [0.03] * n, chunksize=1)  # in flight throughout
    first = [next(running) for _ in range(3)]
    socks: list[tuple[int, zmq.Socket[Any]]] = []
    longs = itertools.count()
    sent = 0

    def identity(form: str, raw: bytes) -> bytes | None:
        return {
            "random": raw, "local": b"w1", "local!": b"w1!", "local~": b"w1~3",
            "remote": remote.encode(), "remote!": remote.encode() + b"!", "remote~": remote.encode() + b"~1",
            "inbox": INBOX, "none": None, "long": (b"%d-" % next(longs)).ljust(255, b"x"),
        }[form]

    def forged(worker: str) -> bytes:
        """Results for whatever a young runtime may have in flight, as ``worker``."""
        return msgspec.msgpack.encode(messages.Results(
            worker, [messages.Ok(job, seq, 0, [-1, "forged"]) for job in range(1, 4) for seq in range(n)]))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(port=st.sampled_from([0, 1, 2]), who=hostile_identities, messages=st.lists(multipart, min_size=1, max_size=3))
    # the attacks of issue 18 (item 10), always tried: take over the remote worker's tasks
    # connection, answer as the local worker's side channel or as the remote worker
    @example(port=0, who=("remote", b""), messages=[[b"hello"]])
    @example(port=0, who=("remote", b""), messages=[[msgspec.msgpack.encode(messages.Hello(remote, 1, "h"))]])
    # an inbox identity of its own, claiming the remote worker's name
    @example(port=0, who=("inbox", b""),
             messages=[[msgspec.msgpack.encode(messages.Hello(remote, 1, "h", inbox=INBOX.decode()))]])
    @example(port=1, who=("local!", b""), messages=[[forged("w1")]])
    @example(port=1, who=("remote!", b""), messages=[[forged(remote)]])
    @example(port=1, who=("random", b"x"), messages=[[forged(remote)]])
    def fuzz(port: int, who: tuple[str, bytes], messages: list[list[bytes]]) -> None:
        nonlocal sent
        sock = fuzz_ctx.socket(zmq.XSUB if port == 2 else zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server, public, secret
        ident = identity(*who)
        if ident is not None and port != 2:
            sock.setsockopt(zmq.ROUTING_ID, ident)
        sock.connect(hostile_target.endpoints[port])
        socks.append((port, sock))
        for parts in messages:
            if port != 2 and ident is not None and _is_join(parts, ident):
                continue  # a host joining under a fresh name of its own is no attack
            sock.send_multipart(parts, zmq.NOBLOCK)
            sent += 1

    try:
        fuzz()
        got = first + list(running)
        assert [v for v, _ in got] == [2 * x for x in range(n)]  # exactly once, none forged
        assert {h for _, h in got} <= {"local", "honest"}
        assert [v for v, _ in rt.map(ops.where, range(100), chunksize=3, timeout=30)] == [2 * x for x in range(100)]
        assert rt.submit(ops.where, 7).result(timeout=30)[0] == 14
        leaked = [(port, s.recv_multipart()) for port, s in socks if port != 2 and s.poll(0)]
        assert not leaked, f"the hostile host received {leaked[:3]!r}"
        stats = rt.stats()
        assert rt.worker_pids() == pids and stats.worker_deaths == deaths
        assert stats.workers_joined == 1 and {w.id for w in stats.workers if w.remote} == {remote}
        assert rt._driver.broken is None
    finally:
        for _, s in socks:
            s.close(linger=0)
    print(f"hostile host: {sent} messages on {len(socks)} connections, frames_dropped {rt.stats().frames_dropped}")
