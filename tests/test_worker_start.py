"""A local worker's start: it says Hello and Ready first, and nothing that waited for it is lost.

Runs in the test (driver) process, which plays the driver's end of a worker's
pipe and control pipe, and in driver scripts it starts (``sys.executable``).
The workers are real processes forked by phalanx's fork server (on request, or
forked with the server as a runtime's first workers are), reading real socketpairs.

What is attacked:

* a local worker says Hello then Ready, once each, however early the driver
  writes: a Welcome, tasks and control messages sent before the worker could
  read anything are all served, each task answered exactly once, in order;
* a worker whose start fails never said Ready: an ``imports`` module that
  raises, or a logging handler of the driver's that refuses the worker's
  prefixed stream, still fails the runtime's start (``WorkerStartError``).
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from ops import square
from phalanx.forkserver import ForkedWorker, ForkServer
from phalanx.transport import pipe as pipes
from phalanx.transport.codec import decode_driver, encode
from phalanx.transport.endpoints import local_endpoints
from phalanx.transport.messages import Call, Hello, Ok, Ready, Results, Stop, Terminate, Welcome
from phalanx.worker import WorkerSpec

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
#: seconds any one step may take (they take milliseconds)
T = 30.0
#: tasks written before the worker could read any of them
TASKS = 50

assert square(3) == 9  # registered in this process: the fork server and its workers inherit it


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pid: int, why: str) -> None:
    """Wait up to T for ``pid`` to exit; fail with ``why`` otherwise."""
    deadline = time.monotonic() + T
    while _alive(pid):
        assert time.monotonic() < deadline, why
        time.sleep(0.005)


def _read_until(end: pipes.FramePipe, done: Any, got: list[Any]) -> None:
    """Read and decode frames from the worker into ``got`` until ``done(got)`` (or T seconds)."""
    deadline = time.monotonic() + T
    while not done(got):
        left = deadline - time.monotonic()
        assert left > 0, f"the worker said only {got}"
        if not select.select([end.fileno()], [], [], left)[0]:
            continue
        frames = end.recv()
        if frames is None:
            return  # the worker closed its pipe
        got.extend(decode_driver(f) for f in frames)


@contextmanager
def _worker(first: bool, **spec: Any) -> Iterator[tuple[ForkedWorker, pipes.FramePipe, socket.socket]]:
    """A worker "w1" forked by a fork server (``first``: with the server, as a runtime's first
    workers are; else on request); its handle and the driver's ends of its pipes."""
    # Forked on request: the server is made first, so it holds no copy of the worker's ends.
    server = None if first else ForkServer(lambda wid, code: None)
    endpoints = local_endpoints()
    ours, theirs = pipes.socketpair()
    control, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    spec_ = WorkerSpec(worker_id="w1", endpoints=endpoints, credits=2, parent_pid=os.getpid(),
                       prefix_output=False, **spec)
    end = pipes.FramePipe(ours, 1 << 20)
    try:
        if server is None:
            server = ForkServer(lambda wid, code: None, first=[("w1", spec_, (theirs, control_theirs))],
                                drivers_ends=(ours, control))
            handle = server.first_replies()[0]
        else:
            handle = server.spawn("w1", spec_, (theirs, control_theirs))
        theirs.close()
        control_theirs.close()
        assert isinstance(handle, ForkedWorker) and handle.pid is not None, handle
        yield handle, end, control
    finally:
        theirs.close()
        control_theirs.close()
        end.close()
        control.close()
        if server is not None:
            server.close()
        endpoints.remove()


@pytest.mark.parametrize("first", [False, True], ids=["forked", "first"])
def test_a_local_worker_says_hello_then_ready_once_and_serves_all_that_waited_for_it(first: bool) -> None:
    """Welcome, TASKS calls, a Terminate of a job it never ran and a Stop are all written the
    moment the fork server answers, before the worker can have read anything. The worker's
    first two frames are Hello then Ready, it never says either again, it answers every call
    exactly once and in order, and it exits on the Stop."""
    with _worker(first) as (handle, end, control):
        frames = [encode(Welcome("w1", 1 << 20))]
        frames += [encode(Call(7, seq, 0, "ops:square", [seq])) for seq in range(TASKS)]
        assert not end.send_many(frames)  # all in the kernel at once
        control.send(encode(Terminate(99)))
        got: list[Any] = []
        outcomes: list[Any] = []

        def answered(msgs: list[Any]) -> bool:
            outcomes[:] = [o for m in msgs if isinstance(m, Results) for o in m.outcomes]
            return len(outcomes) >= TASKS

        _read_until(end, answered, got)
        assert isinstance(got[0], Hello) and got[0].worker == "w1" and got[0].pid == handle.pid, got[:2]
        assert isinstance(got[1], Ready) and got[1].worker == "w1" and got[1].credits == 2, got[:2]
        assert [type(m) for m in got[2:] if isinstance(m, (Hello, Ready))] == [], got
        assert all(isinstance(o, Ok) for o in outcomes), outcomes
        assert [(o.job, o.seq, o.value) for o in outcomes] == [(7, s, s * s) for s in range(TASKS)]
        assert not end.send(encode(Stop()))
        late: list[Any] = []
        _read_until(end, lambda msgs: False, late)  # to its end: nothing more, then EOF
        assert late == [], late
        _wait_gone(handle.pid, "the worker never exited on Stop")


@pytest.mark.parametrize("first", [False, True], ids=["forked", "first"])
def test_a_worker_whose_import_raises_never_says_ready(first: bool) -> None:
    """A spec with ``imports`` naming a module that raises: the worker dies before it says Ready
    (so the driver reports a failed start, not a ready worker that crashed)."""
    with _worker(first, imports=["broken_mod"]) as (handle, end, control):
        assert handle.pid is not None
        got: list[Any] = []
        _read_until(end, lambda msgs: False, got)  # until the worker's end closes
        assert not [m for m in got if isinstance(m, Ready)], got
        _wait_gone(handle.pid, "the worker lives on after its import failed")


REFUSING_HANDLER = textwrap.dedent(
    """
    import logging
    import phalanx
    from ops import square

    class Stubborn(logging.StreamHandler):
        def setStream(self, stream):
            raise RuntimeError("this handler keeps its stream")

    if __name__ == "__main__":
        logging.basicConfig(handlers=[Stubborn()])
        try:
            with phalanx.Runtime(workers=1, restart_limit=3) as rt:
                print("started", rt.submit(square, 3).result(timeout=30), flush=True)
        except phalanx.WorkerStartError as exc:
            print("WorkerStartError", exc, flush=True)
        except Exception as exc:
            print("other", type(exc).__name__, exc, flush=True)
    """
)


def test_a_driver_handler_that_refuses_the_prefixed_stream_fails_the_start(tmp_path: Path) -> None:
    """The driver's logging has a StreamHandler (inherited by its workers) whose setStream
    raises: a worker's set-up runs that user code as it prefixes its output, so the start
    fails, reported as a failed start (before: the worker had said Ready before, and the
    runtime broke later, at the first call)."""
    script = tmp_path / "driver.py"
    script.write_text(REFUSING_HANDLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and lines[0].startswith("WorkerStartError worker failed to start: w1 exited with code 1"), \
        proc.stdout + proc.stderr
    assert "this handler keeps its stream" in proc.stderr, proc.stderr


PREFIXED = textwrap.dedent(
    """
    import logging, os, select, socket, sys
    from phalanx.forkserver import ForkServer
    from phalanx.transport import pipe as pipes
    from phalanx.transport.codec import decode_driver, encode
    from phalanx.transport.endpoints import local_endpoints
    from phalanx.transport.messages import Call, Results, Stop, Welcome
    from phalanx.worker import WorkerSpec
    from eco_ops import say

    if __name__ == "__main__":
        # A handler on stderr: the worker inherits it, and must point it at its prefixed stderr.
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
        first = sys.argv[1] == "first"  # forked with the server, as a runtime's first workers are
        server = None if first else ForkServer(lambda wid, code: None)  # made before the pipes
        endpoints = local_endpoints()
        ours, theirs = pipes.socketpair()
        control, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = WorkerSpec(worker_id="w1", endpoints=endpoints, credits=1, parent_pid=os.getpid())
        if server is None:
            server = ForkServer(lambda wid, code: None, first=[("w1", spec, (theirs, control_theirs))],
                                drivers_ends=(ours, control))
            server.first_replies()
        else:
            server.spawn("w1", spec, (theirs, control_theirs))
        theirs.close()
        control_theirs.close()
        end = pipes.FramePipe(ours, 1 << 20)
        end.send_many([encode(Welcome("w1", 1 << 20)), encode(Call(1, 0, 0, "eco_ops:say", ["first"]))])
        done = False
        while not done:
            assert select.select([end.fileno()], [], [], 30)[0], "no result"
            frames = end.recv()
            assert frames is not None, "the worker closed its pipe"
            done = any(isinstance(decode_driver(f), Results) for f in frames)
        end.send(encode(Stop()))
        while True:  # until the worker's end closes: it exited, its output is all written
            assert select.select([end.fileno()], [], [], 30)[0], "the worker never exited"
            if end.recv() is None:
                break
        end.close()
        control.close()
        server.close()
        endpoints.remove()
        print("done", flush=True)
    """
)


@pytest.mark.parametrize("mode", ["forked", "first"])
def test_a_workers_first_task_prints_and_logs_prefixed(tmp_path: Path, mode: str) -> None:
    """The first task of a worker (forked on request, or with the server) prints and logs:
    every line it writes starts with ``[w1] ``, the inherited stderr handler's lines too."""
    script = tmp_path / "driver.py"
    script.write_text(PREFIXED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1:] == ["done"], proc.stdout + proc.stderr
    out = [line for line in proc.stdout.splitlines() if line != "done"]
    err = proc.stderr.splitlines()
    assert out == ["[w1] out: first", "[w1] two", "[w1] lines: first", "[w1] partial line: first"], proc.stdout
    assert err == ["[w1] err: first", "[w1] WARNING:eco_ops:log: first", "[w1] INFO:eco_ops:info: first"], \
        proc.stderr


@pytest.mark.parametrize("when", ["before-hello", "after-ready"])
def test_a_first_worker_killed_as_it_starts_is_replaced_and_the_start_succeeds(
    monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The first worker is SIGKILLed as it starts, once the other worker is ready (a second
    after its fork): ``before-hello``, or ``after-ready``: the moment its Hello and Ready are
    written, perhaps before the driver read them or welcomed it. The runtime's
    start does not wait ``start_timeout`` for a worker that is gone: its replacement is
    waited for instead, and every task sent straight after the constructor is answered
    exactly once."""
    import signal

    import phalanx
    from phalanx import worker as worker_module

    if when == "before-hello":
        install = worker_module.install_worker_output

        def dying_install(worker_id: str, *args: Any, **kwargs: Any) -> None:
            if worker_id == "w1":
                time.sleep(1.0)  # the other worker is ready by then
                os.kill(os.getpid(), signal.SIGKILL)
            install(worker_id, *args, **kwargs)

        monkeypatch.setattr(worker_module, "install_worker_output", dying_install)
    else:
        say_ready = worker_module._say_ready

        def dying_ready(pipe: Any, spec: WorkerSpec, host: str) -> None:
            if spec.worker_id != "w1":
                return say_ready(pipe, spec, host)
            time.sleep(1.0)  # the other worker is ready by then
            say_ready(pipe, spec, host)
            os.kill(os.getpid(), signal.SIGKILL)

        monkeypatch.setattr(worker_module, "_say_ready", dying_ready)
    # Forked from this process: the fork server and its workers run the patched functions.
    rt = phalanx.Runtime(workers=2, start_timeout=15.0, shutdown_timeout=2.0)
    try:
        assert list(rt.map(square, range(2000), timeout=T)) == [x * x for x in range(2000)]
        stats = rt.stats()
        alive = [w.id for w in stats.workers if w.alive]
        assert len(alive) == 2 and "w1" not in alive, stats.workers
        assert stats.worker_deaths == 1, stats
    finally:
        rt.shutdown()
