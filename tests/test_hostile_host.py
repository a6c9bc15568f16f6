"""A host holding an authorized key but acting against the runtime (tcp + CURVE, loopback).

Runs in the test process; the hostile host is a set of ZeroMQ sockets made
here with the authorized host key (``remote_host.Keys``), honest hosts are
``phalanx worker`` subprocesses. Checks the threat model's promise that such
a host cannot crash the driver, act as another host or as a local worker,
or receive another host's tasks:

* one frame, or a flood mixed with ZMTP PINGs, on any port, from a peer that
  then hangs up, while a task runs: the driver (a subprocess here, so an
  abort cannot take the test down) keeps serving;
* forged ``Results`` under a local worker's side-channel identity (``w1!``)
  are dropped and counted, never delivered to ``submit`` or ``map``;
* a peer connecting to the tasks port under a joined remote worker's
  identity receives none of its tasks, and the worker keeps getting them;
* a peer cannot join under a local worker's name, nor speak under a remote
  worker's identities (plain, ``!``, ``~``) with its own key.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
import zmq

import phalanx
from phalanx.transport import keys as curve_keys
from phalanx.transport import messages

import multihost_ops as ops
from remote_host import TESTS, Keys, Lines, RemoteHost

pytestmark = pytest.mark.timeout(120)

LISTEN = "tcp://127.0.0.1:0"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


@pytest.fixture
def hostile_ctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


def ports(address: str) -> tuple[str, str, str]:
    """The tasks, results and control endpoints of a runtime listening at ``address``."""
    host, port = address.rsplit(":", 1)
    return tuple(f"{host}:{int(port) + i}" for i in range(3))  # type: ignore[return-value]


def hostile(ctx: zmq.Context[Any], keys: Keys, endpoint: str, identity: bytes | None,
            kind: int = zmq.DEALER, heartbeat_ms: int = 0, key: str | None = None) -> zmq.Socket[Any]:
    """A socket of an authorized host (the host1 key, or ``key``), connected to ``endpoint``."""
    public, secret = curve_keys.load_secret(key or keys.host_secret)
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.curve_serverkey = curve_keys.load_public(keys.driver_public)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    if heartbeat_ms:
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    _monitors[sock] = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sock.connect(endpoint)
    return sock


_monitors: dict[zmq.Socket[Any], zmq.Socket[Any]] = {}


def connected(sock: zmq.Socket[Any], timeout: float = 20.0) -> None:
    """Wait until ``sock`` finished its CURVE handshake with the driver."""
    mon = _monitors.pop(sock)
    try:
        assert mon.poll(int(timeout * 1000)), "the handshake did not complete"
    finally:
        sock.disable_monitor()
        mon.close(linger=0)


# --------------------------------------------------------------------------- #
# Item 8: nothing a peer sends aborts the driver process
# --------------------------------------------------------------------------- #

ABORT_DRIVER = textwrap.dedent("""
    import sys, time
    import phalanx
    import multihost_ops as ops
    if __name__ == "__main__":  # (workers may be started by re-importing this script)
        with phalanx.Runtime(workers=1, listen="tcp://127.0.0.1:0", server_key=sys.argv[1],
                             authorized_keys=sys.argv[2]) as rt:
            running = rt.submit(ops.slow_where, 1, 2.0)   # a local worker runs a task meanwhile
            print(rt.address, flush=True)
            sys.stdin.readline()                          # the peers sent, then hung up
            time.sleep(2.5)                               # past the sockets' 1 s timers
            assert running.result(timeout=30) == (2, "local")
            assert rt.submit(ops.where, 3).result(timeout=30) == (6, "local")
            print("served", rt.stats().frames_dropped, flush=True)
""")


@pytest.mark.parametrize("how", ["one frame", "flood with pings"])
def test_a_peer_that_sends_and_hangs_up_never_aborts_the_driver(
    keys: Keys, tmp_path: Path, hostile_ctx: zmq.Context[Any], how: str,
) -> None:
    script = tmp_path / "driver.py"
    script.write_text(ABORT_DRIVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    driver = subprocess.Popen([sys.executable, str(script), keys.driver_secret, str(keys.authorized)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    assert driver.stdin is not None and driver.stdout is not None and driver.stderr is not None
    out, err = Lines(driver.stdout), Lines(driver.stderr)
    try:
        address = out.readline(timeout=60).strip()
        assert address.startswith("tcp://"), err.text()
        for endpoint, kind in zip(ports(address), (zmq.DEALER, zmq.DEALER, zmq.XSUB)):
            sock = hostile(hostile_ctx, keys, endpoint, b"evil" if kind == zmq.DEALER else None, kind,
                           heartbeat_ms=1 if how == "flood with pings" else 0)
            connected(sock)
            if how == "one frame":
                sock.send(b"hello")
            else:
                for i in range(20_000):
                    sock.send(b"x" * 100, zmq.NOBLOCK)
            time.sleep(0.3)
            sock.close(linger=0)  # hang up (a reset, with data unread on the driver's side)
        driver.stdin.write("go\n")
        driver.stdin.flush()
        line = out.readline(timeout=60)
        assert driver.wait(timeout=60) == 0, f"driver exit {driver.returncode}: {err.text()}"
        assert line.startswith("served"), (line, err.text())
        assert "Assertion failed" not in err.text()
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait(timeout=10)
        driver.stdin.close()
        out.join()
        err.join()


# --------------------------------------------------------------------------- #
# Item 10: identities belong to keys
# --------------------------------------------------------------------------- #


def forged_results(worker: str, value: Any) -> bytes:
    """Results for every (job, seq, attempt) a young runtime may have in flight."""
    outcomes = [messages.Ok(job, seq, attempt, value) for job in range(1, 4) for seq in range(8)
                for attempt in range(2)]
    return msgspec.msgpack.encode(messages.Results(worker, outcomes))  # type: ignore[arg-type]


def test_forged_results_on_a_local_side_channel_are_never_delivered(
    keys: Keys, hostile_ctx: zmq.Context[Any],
) -> None:
    with phalanx.Runtime(workers=1, listen=LISTEN, **keys.runtime_kwargs()) as rt:
        assert rt.address is not None
        _, results_ep, _ = ports(rt.address)
        before = rt.stats().frames_dropped
        fut = rt.submit(ops.slow_where, 1, 1.5)
        it = rt.map(ops.slow_where, range(1, 6), [0.3] * 5, chunksize=1)
        # The side channel's own name (held by w1: ZeroMQ refuses a second holder), and
        # the worker's plain name and a channel end's (free: the driver must refuse them).
        socks = [hostile(hostile_ctx, keys, results_ep, name) for name in (b"w1!", b"w1", b"w1~7")]
        forged = forged_results("w1", [666, "forged"])
        for sock in socks:
            connected(sock)
        for _ in range(5):
            for sock in socks:
                sock.send(forged)
            time.sleep(0.1)
        assert fut.result(timeout=30) == (2, "local")
        assert list(it) == [(2 * x, "local") for x in range(1, 6)]
        assert rt.stats().frames_dropped >= before + 10  # each forged frame under a free name counted
        assert rt.stats().worker_deaths == 0
        for sock in socks:
            sock.close(linger=0)


def test_another_hosts_worker_id_gets_none_of_its_tasks(keys: Keys, hostile_ctx: zmq.Context[Any]) -> None:
    with phalanx.Runtime(workers=0, listen=LISTEN, **keys.runtime_kwargs()) as rt:
        assert rt.address is not None
        tasks_ep, results_ep, _ = ports(rt.address)
        with RemoteHost(rt.address, "victim", keys.worker_args(), workers=1) as host:
            assert rt.wait_for_workers(1, timeout=30) == 1, host.err
            (victim,) = [w.id for w in rt.stats().workers]
            thief = hostile(hostile_ctx, keys, tasks_ep, victim.encode())
            connected(thief)
            # And one speaking as the victim (plain, side channel, channel end) on the results port.
            speakers = [hostile(hostile_ctx, keys, results_ep, victim.encode() + suffix)
                        for suffix in (b"-x", b"!", b"~1")]
            for s in speakers:
                connected(s)
                s.send(forged_results(victim, [666, "forged"]))
            futures = [rt.submit(ops.where, x) for x in range(20)]
            assert [f.result(timeout=30) for f in futures] == [(2 * x, "victim") for x in range(20)]
            assert not thief.poll(500), f"the thief received {thief.recv_multipart()!r}"
            assert list(rt.map(ops.where, range(50))) == [(2 * x, "victim") for x in range(50)]
            assert not thief.poll(100)
            assert host.proc.poll() is None
            stats = rt.stats()
            assert stats.workers_joined == 1 and stats.worker_deaths == 0
            for s in (thief, *speakers):
                s.close(linger=0)


def test_a_peer_cannot_join_as_a_local_worker(keys: Keys, hostile_ctx: zmq.Context[Any]) -> None:
    with phalanx.Runtime(workers=1, listen=LISTEN, **keys.runtime_kwargs()) as rt:
        assert rt.address is not None
        tasks_ep, results_ep, _ = ports(rt.address)
        socks = []
        for name in ("w1", "w2", "w99"):  # a live local worker, its next replacement, any local name
            inbox = hostile(hostile_ctx, keys, tasks_ep, name.encode())
            outbox = hostile(hostile_ctx, keys, results_ep, name.encode())
            connected(outbox)
            outbox.send(msgspec.msgpack.encode(messages.Hello(name, os.getpid(), "evil")))
            socks += [inbox, outbox]
        assert rt.submit(ops.where, 4).result(timeout=30) == (8, "local")
        os.kill(rt.worker_pids()["w1"], signal.SIGKILL)  # its replacement, w2, is local and serves
        assert rt.submit(ops.where, 5).result(timeout=30) == (10, "local")
        assert list(rt.worker_pids()) == ["w2"]
        stats = rt.stats()
        assert stats.workers_joined == 0 and not any(w.remote for w in stats.workers)
        for s in socks:
            assert not s.poll(10)
            s.close(linger=0)


def test_a_name_taken_before_its_worker_connects_gets_nothing(
    keys: Keys, hostile_ctx: zmq.Context[Any],
) -> None:
    """A host that knows a worker's name in advance holds it on the tasks port first (and
    says Hello there): it gets nothing, and the worker, whose inbox connects under a
    secret identity of its own, joins and serves all the same."""
    _, other = curve_keys.generate(str(keys.authorized), "host2")  # the squatter's own authorized key
    with phalanx.Runtime(workers=1, listen=LISTEN, **keys.runtime_kwargs()) as rt:
        assert rt.address is not None
        tasks_ep, results_ep, _ = ports(rt.address)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]), PHX_HOST="squatted")
        # The host stops itself before it runs: its pid, hence its first worker's name, is known first.
        cmd = [sys.executable, "-m", "phalanx", "worker", "--connect", rt.address, "--workers", "1",
               "--import", "multihost_ops", "--host-name", "h", "--connect-timeout", "20", *keys.worker_args()]
        host = subprocess.Popen(["sh", "-c", 'kill -STOP $$; exec "$@"', "sh", *cmd],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while psutil.Process(host.pid).status() != psutil.STATUS_STOPPED:
            time.sleep(0.01)
        assert host.stderr is not None
        err = Lines(host.stderr)
        try:
            name = f"h-{host.pid}-1".encode()
            squatter = hostile(hostile_ctx, keys, tasks_ep, name, key=other)
            connected(squatter)
            squatter.send(msgspec.msgpack.encode(messages.Hello(name.decode(), 1, "h")))  # even claiming it
            os.kill(host.pid, signal.SIGCONT)
            futures = [rt.submit(ops.slow_where, x, 0.05) for x in range(40)]
            got = [f.result(timeout=60) for f in futures]
            assert [x for x, _ in got] == [2 * x for x in range(40)]
            assert rt.wait_for_workers(2, timeout=30) == 2  # the worker joined and is ready
            assert [w.ready for w in rt.stats().workers if w.remote] == [True]
            later = [rt.submit(ops.slow_where, x, 0.05) for x in range(40)]
            assert {h for _, h in (f.result(timeout=60) for f in later)} <= {"local", "squatted"}
            assert not squatter.poll(1000), f"the squatter received {squatter.recv_multipart()!r}"
        finally:
            host.terminate()
            try:
                host.wait(timeout=20)
            except subprocess.TimeoutExpired:
                host.kill()
                host.wait(timeout=10)
            for p in psutil.Process().children(recursive=True):  # the host's worker, if it outlived it
                if p.pid != host.pid and "worker" in " ".join(p.cmdline()):
                    p.kill()
            err.join()
        squatter.close(linger=0)


def _cut(a: int, b: int) -> None:
    """Reset the loopback TCP connection between ports ``a`` and ``b``, both ends (``ss -K``)."""
    expr = f"( sport = :{a} and dport = :{b} ) or ( sport = :{b} and dport = :{a} )"
    subprocess.run(["ss", "-K", "-t", "-n", expr], check=True, capture_output=True)


def _tasks_connection(pid: int, tasks_port: int) -> int | None:
    """The local port of process ``pid``'s established connection to ``tasks_port``."""
    for conn in psutil.Process(pid).net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == tasks_port and conn.status == psutil.CONN_ESTABLISHED:
            return int(conn.laddr.port)
    return None


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ss") is None,
                    reason="resetting a connection (ss -K) needs root and iproute2")
def test_a_broken_tasks_connection_cannot_be_taken_over_by_another_key(
    keys: Keys, hostile_ctx: zmq.Context[Any],
) -> None:
    """A remote worker's tasks connection breaks while it holds tasks; before it reconnects,
    another authorized key connects to the tasks port under the worker's name (and says
    Hello there): it receives nothing, and every caller gets its result once."""
    _, other = curve_keys.generate(str(keys.authorized), "host2")  # the thief's own authorized key
    with phalanx.Runtime(workers=1, listen=LISTEN, heartbeat_timeout=60.0, **keys.runtime_kwargs()) as rt:
        assert rt.address is not None
        tasks_ep, _, _ = ports(rt.address)
        tasks_port = int(tasks_ep.rsplit(":", 1)[1])
        with RemoteHost(rt.address, "victim", keys.worker_args(), workers=1) as host:
            assert rt.wait_for_workers(2, timeout=30) == 2, host.err
            (victim,) = [w.id for w in rt.stats().workers if w.remote]
            (pid,) = host.worker_pids()
            futures = [rt.submit(ops.slow_where, x, 0.1) for x in range(60)]
            while not any(w.remote and w.inflight for w in rt.stats().workers):
                time.sleep(0.01)
            os.kill(pid, signal.SIGSTOP)  # it cannot reconnect meanwhile
            try:
                port = _tasks_connection(pid, tasks_port)
                assert port is not None
                _cut(port, tasks_port)
                time.sleep(1.0)  # the driver's ROUTER lets the reset connection go
                thief = hostile(hostile_ctx, keys, tasks_ep, victim.encode(), key=other)
                connected(thief)
                thief.send(msgspec.msgpack.encode(messages.Hello(victim, pid, "victim")))
                time.sleep(0.5)  # the driver took the thief's connection
            finally:
                os.kill(pid, signal.SIGCONT)
            try:
                got = [f.result(timeout=60) for f in futures]
            except TimeoutError:
                stolen = thief.recv_multipart() if thief.poll(0) else None
                raise AssertionError(f"results missing; the thief received {stolen!r}") from None
            assert [x for x, _ in got] == [2 * x for x in range(60)]
            assert not thief.poll(500), f"the thief received {thief.recv_multipart()!r}"
            # The victim, reconnected, keeps working.
            later = [rt.submit(ops.slow_where, x, 0.05) for x in range(40)]
            got = [f.result(timeout=60) for f in later]
            assert [x for x, _ in got] == [2 * x for x in range(40)]
            assert "victim" in {h for _, h in got}
            assert not thief.poll(100), f"the thief received {thief.recv_multipart()!r}"
            assert host.proc.poll() is None
            thief.close(linger=0)
