"""The driver's ZeroMQ sockets of a runtime that does not listen: made after the start, never missed.

Runs in the test process and in driver scripts it starts (``python SCRIPT``,
whose descriptors, threads and directories are counted without pytest's);
the operations are in ``channel_ops``. A runtime without ``listen=`` (nor
``hosts=``/``slurm=``) talks to its local workers over pipes, so its ZeroMQ
context and its three sockets (tasks, results, control) are made off the
start: at the latest once the first workers are ready, at once when
something needs them first (a lease, ``rt.endpoints``). What is attacked:

* a channel end connecting to the results socket, from a task or the
  driver, right after the constructor: no message is lost, either way;
* ``phalanx top`` (and its query) right after the constructor, before the
  socket is bound: it still gets its answer (ZeroMQ connects later);
* a connection made to an ipc path before its socket is bound gets through
  once it is (the ZeroMQ behaviour the above relies on);
* shutdown right after the constructor, and while the sockets are being
  made (by the pump, or by a lease on another thread): nothing is left,
  and a runtime made and shut down 50 times leaves no descriptor, thread
  (ZeroMQ's own included) or directory behind.

No assertion depends on timing; waits have generous timeouts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import zmq

import phalanx
from phalanx.top import query

import channel_ops
from marked import processes_marked

pytestmark = pytest.mark.timeout(180)

T = 60.0  # seconds: generous bound on any wait (never an assertion on speed)
TESTS = str(Path(__file__).parent)


def run_script(tmp_path: Path, source: str) -> str:
    """Run ``source`` as a driver script; its stdout (it must exit 0 and leave no process)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    marker = uuid.uuid4().hex
    env = {**os.environ, "PHALANX_TEST_MARKER": marker,
           "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    for name in ("PHALANX_WORKERS", "PHALANX_START_METHOD"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=150)
    deadline = time.monotonic() + 3.0
    left = processes_marked("PHALANX_TEST_MARKER", marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = processes_marked("PHALANX_TEST_MARKER", marker)
    for p in left:
        p.kill()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not left, f"processes left behind: {[p.pid for p in left]}"
    return proc.stdout


# --------------------------------------------------------------------------- #
# Channels and phalanx top right after the constructor
# --------------------------------------------------------------------------- #


def test_a_channel_used_by_a_task_right_after_the_constructor_loses_nothing() -> None:
    """Ends connect to the results socket: from a worker (a task sends) and from the driver
    (a task receives), each on a runtime whose constructor just returned."""
    for _ in range(3):
        with phalanx.Runtime(workers=2) as rt:
            tx, rx = rt.lease()
            sent = rt.submit(channel_ops.produce, tx, 0, 300)
            assert [rx.recv(timeout=T) for _ in range(300)] == list(range(300))
            assert sent.result(timeout=T) == 300
        with phalanx.Runtime(workers=2) as rt:
            tx, rx = rt.lease()
            got = rt.submit(channel_ops.collect, rx)
            for i in range(300):
                tx.send(i)
            tx.close()
            assert got.result(timeout=T) == list(range(300))


def test_top_right_after_the_constructor_gets_its_answer() -> None:
    """The results endpoint phalanx top reads from runtime.json may not be bound yet when the
    constructor returns: a query sent at once still gets the runtime's tree, and so does the
    command."""
    for _ in range(3):
        with phalanx.Runtime(workers=2) as rt:
            tree = query(rt._driver.endpoints.results, timeout=10.0)  # not rt.endpoints: that binds
            assert tree is not None, "no answer from a runtime just started"
            assert sorted(w.pid for w in tree.workers) == sorted(rt.worker_pids().values())
    with phalanx.Runtime(workers=2) as rt:
        out = subprocess.run([sys.executable, "-m", "phalanx", "top", "--once", "--pid", str(os.getpid()),
                              "--interval", "10"], capture_output=True, text=True, timeout=T)
        assert out.returncode == 0, out.stdout + out.stderr
        for pid in rt.worker_pids().values():
            assert f"pid {pid}" in out.stdout, out.stdout


def test_a_connection_made_before_the_ipc_socket_is_bound_gets_through(tmp_path: Path) -> None:
    """What the two tests above rely on: a DEALER connecting to an ipc path with no socket
    behind it yet retries, and what it queued meanwhile arrives once the socket is bound."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        endpoint = f"ipc://{tmp_path}/results"
        early = ctx.socket(zmq.DEALER)
        early.setsockopt(zmq.LINGER, 0)
        early.setsockopt(zmq.ROUTING_ID, b"early")
        early.connect(endpoint)
        early.send(b"queued before the bind")
        time.sleep(0.05)  # its first attempt has failed by now (no assertion on this)
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(endpoint)
        assert router.poll(int(T * 1000)), "the early connection never got through"
        assert router.recv_multipart() == [b"early", b"queued before the bind"]
        router.close()
        early.close()
    finally:
        ctx.term()


def test_a_listening_runtime_binds_its_tcp_endpoints_in_the_constructor(
        zmq_ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """Remote workers may connect as soon as the address is known: nothing is made later."""
    with phalanx.Runtime(workers=1, listen="tcp://127.0.0.1:0", insecure=True) as rt:
        assert rt.address is not None
        sock = zmq_ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        with pytest.raises(zmq.ZMQError):  # its address is taken: bound already
            sock.bind(rt.address)
        sock.close()


# --------------------------------------------------------------------------- #
# Shutdown at every moment of the sockets' making: nothing left
# --------------------------------------------------------------------------- #


LEFTOVERS = """
import gc, os, threading, time

import psutil

import ops
import phalanx
from phalanx.transport import shm


def threads():
    return len(os.listdir("/proc/self/task"))  # the OS's count: ZeroMQ's own threads too


def fds():
    return len(os.listdir("/proc/self/fd"))


def settle():
    # Imports and first-time set-up done: the channel ends' context (one per process), this
    # thread's wake-up for direct reads (one per thread).
    with phalanx.Runtime(workers=2) as rt:
        rt.submit(ops.pid).result(timeout=30)
        tx, rx = rt.lease()
        tx.send(0)
        rx.recv(timeout=30)
        tx.close()
        del tx, rx
    del rt
    gc.collect()
    return fds(), threads()


def leftovers(base, dirs):
    base_fds, base_threads = base
    deadline = time.monotonic() + 5.0
    while True:
        gc.collect()
        left = [f"process {p.pid}" for p in psutil.Process().children(recursive=True)]
        left += [f"thread {t.name}" for t in threading.enumerate() if t.name.startswith("phalanx-")]
        left += [f"{threads() - base_threads} OS threads"] if threads() > base_threads else []
        left += [f"{fds() - base_fds} descriptors"] if fds() > base_fds else []
        left += [f"dir {d}" for d in dirs if os.path.exists(d)]
        left += ["a runtime"] if any(type(o) is phalanx.Runtime for o in gc.get_objects()) else []
        left += ["a shared-memory user"] if shm._runtimes else []
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)
"""


def test_a_runtime_made_and_shut_down_50_times_leaves_nothing(tmp_path: Path) -> None:
    """Shut down right after the constructor (sockets not made yet, or being made), after one
    task, after a lease: 50 runtimes in all leave no descriptor, thread or directory."""
    out = run_script(tmp_path, LEFTOVERS + """
import channel_ops


def main():
    base = settle()
    dirs = []
    for i in range(50):
        rt = phalanx.Runtime(workers=2)
        dirs.append(rt._driver.endpoints.ipc_dir)
        if i % 5 == 1:
            assert rt.submit(ops.pid).result(timeout=30) in rt.worker_pids().values()
        elif i % 5 == 2:
            tx, rx = rt.lease()
            tx.send(i)
            assert rx.recv(timeout=30) == i
            tx.close()
            del tx, rx
        elif i % 5 == 3:
            time.sleep(0.2)  # the pump has made them by now
        rt.shutdown()
        del rt
    print("left", leftovers(base, dirs), flush=True)


if __name__ == "__main__":
    main()
""")
    assert out.splitlines() == ["left []"], out


def test_shutdown_while_the_sockets_are_being_made_leaves_nothing(tmp_path: Path) -> None:
    """Shutdown (on the main thread) runs while the sockets' making is held in the middle: by
    the pump, with or without a lease racing the shutdown on another thread, or by that lease
    itself. The lease gets its lease or RuntimeClosedError; nothing is left."""
    out = run_script(tmp_path, LEFTOVERS + """
import phalanx.driver
from phalanx.transport import sockets

making = {}
real_router = sockets.router


def slow_router(*args, **kwargs):
    name = threading.current_thread().name
    if name in making:
        making[name].set()
        time.sleep(0.3)  # the shutdown starts meanwhile
    return real_router(*args, **kwargs)


def main():
    base = settle()
    phalanx.driver.sockets.router = slow_router
    dirs = []
    outcomes = []
    for i in range(9):
        maker = "racer" if i % 3 == 2 else "phalanx-pump"
        making.clear()
        making[maker] = threading.Event()
        rt = phalanx.Runtime(workers=2)
        dirs.append(rt._driver.endpoints.ipc_dir)

        def lease():
            try:
                rt.lease()
                outcomes.append("leased")
            except phalanx.RuntimeClosedError:
                outcomes.append("closed")

        racer = threading.Thread(target=lease, name="racer")
        if maker == "racer":
            racer.start()
        assert making[maker].wait(30), f"{maker} never made the sockets"
        if i % 3 == 1:
            racer.start()
        rt.shutdown()
        if racer.ident is not None:
            racer.join(30)
            assert not racer.is_alive()
        del racer, rt, lease
    phalanx.driver.sockets.router = real_router
    assert len(outcomes) == 6 and set(outcomes) <= {"leased", "closed"}, outcomes
    print("left", leftovers(base, dirs), flush=True)


if __name__ == "__main__":
    main()
""")
    assert out.splitlines() == ["left []"], out


def test_no_descriptor_is_left_by_connections_to_a_runtime_just_started(tmp_path: Path) -> None:
    """A query right after the constructor, then shutdown: nothing of the runtime's is left
    (its sockets were made for the query's sake or by the pump, and closed by the shutdown)."""
    out = run_script(tmp_path, LEFTOVERS + """
from phalanx.top import query


def main():
    base = settle()
    dirs = []
    for _ in range(5):
        rt = phalanx.Runtime(workers=2)
        dirs.append(rt._driver.endpoints.ipc_dir)
        assert query(rt._driver.endpoints.results, timeout=10.0) is not None
        rt.shutdown()
        del rt
    print("left", leftovers(base, dirs), flush=True)


if __name__ == "__main__":
    main()
""")
    assert out.splitlines() == ["left []"], out
