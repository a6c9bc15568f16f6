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
    from phalanx import forkserver
    from phalanx import worker as worker_module

    if when == "before-hello":
        install = worker_module.install_worker_output

        def dying_install(worker_id: str, *args: Any, **kwargs: Any) -> None:
            if worker_id == "w1":
                time.sleep(1.0)  # the other worker is ready by then
                os.kill(os.getpid(), signal.SIGKILL)
            install(worker_id, *args, **kwargs)

        # (the fork server's workers install it before their greeting, the others in run_worker)
        monkeypatch.setattr(forkserver, "install_worker_output", dying_install)
        monkeypatch.setattr(worker_module, "install_worker_output", dying_install)
    else:
        say_ready = worker_module._say_ready
        say_greeting = forkserver.say_greeting

        def dying_ready(pipe: Any, spec: WorkerSpec, host: str) -> None:
            if spec.worker_id != "w1":
                return say_ready(pipe, spec, host)
            time.sleep(1.0)  # the other worker is ready by then
            say_ready(pipe, spec, host)
            os.kill(os.getpid(), signal.SIGKILL)

        def dying_greeting(fd: int, greeting: bytes) -> None:
            if b"w1" not in greeting:
                return say_greeting(fd, greeting)
            time.sleep(1.0)  # the other worker is ready by then
            say_greeting(fd, greeting)
            os.kill(os.getpid(), signal.SIGKILL)

        monkeypatch.setattr(worker_module, "_say_ready", dying_ready)
        monkeypatch.setattr(forkserver, "say_greeting", dying_greeting)
    # Forked from this process: the fork server and its workers run the patched functions.
    rt = phalanx.Runtime(workers=2, start_timeout=15.0, shutdown_timeout=2.0)
    try:
        assert list(rt.map(square, range(2000), timeout=T)) == [x * x for x in range(2000)]
        # w1's exit is handled, and its replacement started once its tasks are redelivered, which
        # may be after the map's last result: waited for (bounded), not assumed.
        deadline = time.monotonic() + T
        while True:
            stats = rt.stats()
            alive = [w.id for w in stats.workers if w.alive]
            if (len(alive) == 2 and "w1" not in alive) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert len(alive) == 2 and "w1" not in alive, stats.workers
        assert stats.worker_deaths == 1, stats
    finally:
        rt.shutdown()


@pytest.mark.parametrize("which", [1, 2])
def test_a_first_worker_the_fork_server_cannot_fork_fails_the_start_with_worker_start_error(
    monkeypatch: pytest.MonkeyPatch, which: int
) -> None:
    """The fork server's fork of the ``which``-th first worker fails (EAGAIN: the user's
    process limit, say): the constructor raises :class:`~phalanx.WorkerStartError` (as it
    promises; before: the bare OSError of the fork server's reply), saying why, and leaves no
    process and no descriptor behind."""
    import errno

    import phalanx

    driver = os.getpid()
    fork = os.fork
    forks = [0]

    def failing_fork() -> int:
        if os.getpid() != driver:  # in the fork server (a copy of this process)
            forks[0] += 1
            if forks[0] == which:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return fork()

    fds = set(os.listdir("/proc/self/fd"))
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # (the suite's own helpers)

    def left() -> tuple[set[int], set[str]]:
        return {p.pid for p in psutil.Process().children(recursive=True)} - before, \
            set(os.listdir("/proc/self/fd")) - fds

    monkeypatch.setattr(os, "fork", failing_fork)
    with pytest.raises(phalanx.WorkerStartError, match=f"w{which}.*BlockingIOError") as info:
        phalanx.Runtime(workers=2, start_timeout=T, shutdown_timeout=2.0)
    assert isinstance(info.value.__cause__, OSError), info.value.__cause__
    monkeypatch.undo()
    deadline = time.monotonic() + T
    while any(left()):
        assert time.monotonic() < deadline, left()
        time.sleep(0.01)


def test_a_fork_server_that_cannot_be_forked_fails_the_start_with_worker_start_error(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's fork of the fork server fails (EAGAIN): the constructor raises
    :class:`~phalanx.WorkerStartError` (before: the bare BlockingIOError), and every socket
    made for the server is closed, not left to the garbage collector (ResourceWarning)."""
    import errno
    import gc
    import warnings

    import phalanx

    def failing_fork() -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    before = {p.pid for p in psutil.Process().children(recursive=True)}  # (the suite's own helpers)
    monkeypatch.setattr(os, "fork", failing_fork)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(phalanx.WorkerStartError, match="BlockingIOError|Resource temporarily") as info:
            phalanx.Runtime(workers=2, start_timeout=T, shutdown_timeout=2.0)
        assert isinstance(info.value.__cause__, OSError), info.value.__cause__
        del info
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before


STOPPED_SERVER = textwrap.dedent(
    """
    import os, signal, time
    import psutil
    import phalanx

    DRIVER = os.getpid()


    def stop_the_server():
        if os.getppid() == DRIVER:  # the fork server, just forked: it stops before it forks a worker
            os.kill(os.getpid(), signal.SIGSTOP)


    if __name__ == "__main__":
        os.register_at_fork(after_in_child=stop_the_server)
        try:
            phalanx.Runtime(workers=2, start_timeout=1.0, shutdown_timeout=0.5)
        except phalanx.WorkerStartError as exc:
            print("WorkerStartError", exc, flush=True)
        deadline = time.monotonic() + 10
        while psutil.Process().children(recursive=True) and time.monotonic() < deadline:
            time.sleep(0.02)
        print("children", len(psutil.Process().children(recursive=True)), flush=True)
    """
)


def test_a_fork_server_that_never_answers_fails_the_start_within_start_timeout(tmp_path: Path) -> None:
    """The fork server stops (SIGSTOP) as soon as it is forked: it forks no first worker and
    never replies. The constructor fails with WorkerStartError once ``start_timeout`` passed
    (before: it waited for the server's replies for ever), and the stopped server is ended."""
    script = tmp_path / "driver.py"
    script.write_text(STOPPED_SERVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the constructor never returned: {out} {err}")
    assert proc.returncode == 0, err
    assert out.splitlines() == ["WorkerStartError only 0 of 2 workers connected within 1.0 s", "children 0"], \
        out + err


def test_a_start_timeout_far_off_is_taken() -> None:
    """A finite ``start_timeout`` too large for one ``poll()`` (1e10 s): the wait for the fork
    server's first replies, bounded by it, waits in slices instead of failing (OverflowError)."""
    import phalanx

    rt = phalanx.Runtime(workers=1, start_timeout=1e10, shutdown_timeout=2.0)
    try:
        assert rt.submit(square, 4).result(T) == 16
    finally:
        rt.shutdown()


# --------------------------------------------------------------------------- #
# Exits during and right after the start (the fork server's exit reports are read
# only once a worker's pipe ends, or soon after the start: see Lifecycle.start_workers)
# --------------------------------------------------------------------------- #


def test_a_first_worker_that_dies_before_its_hello_fails_the_start_with_its_exit_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The runtime's only worker exits (code 3) before it says Hello: the constructor raises
    WorkerStartError naming that exit code, not a start_timeout that never passes here."""
    import phalanx
    from phalanx import forkserver
    from phalanx import worker as worker_module

    install = worker_module.install_worker_output

    def dying_install(worker_id: str, *args: Any, **kwargs: Any) -> None:
        if worker_id == "w1":
            os._exit(3)
        install(worker_id, *args, **kwargs)

    # (the fork server's workers install it before their greeting, the others in run_worker)
    monkeypatch.setattr(forkserver, "install_worker_output", dying_install)
    monkeypatch.setattr(worker_module, "install_worker_output", dying_install)
    with pytest.raises(phalanx.WorkerStartError, match="w1 exited with code 3"):
        phalanx.Runtime(workers=1, start_timeout=600.0, shutdown_timeout=2.0)


def test_a_worker_killed_right_after_the_start_is_replaced_and_its_exit_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker SIGKILLed as soon as the constructor returned (before anything was sent):
    its exit is reported and counted, it is replaced, and the runtime serves. (The work the
    pump leaves for after the start is put off past this test: the end of the worker's pipe
    alone must have its exit read.)"""
    import signal

    import phalanx
    import phalanx.pump

    monkeypatch.setattr(phalanx.pump, "SOCKETS_AFTER", 600.0)
    rt = phalanx.Runtime(workers=2, shutdown_timeout=2.0)
    try:
        os.kill(rt.worker_pids()["w1"], signal.SIGKILL)
        assert list(rt.map(square, range(500), timeout=T)) == [x * x for x in range(500)]
        deadline = time.monotonic() + T
        while rt.stats().worker_deaths < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = rt.stats()
        assert stats.worker_deaths == 1, stats
        assert rt.wait_for_workers(2, T) == 2
        assert "w1" not in rt.worker_pids()
    finally:
        rt.shutdown()


@pytest.mark.timeout(60)
def test_a_runtime_shut_down_right_after_its_start_does_not_wait_for_its_shutdown_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Shut down as soon as the constructor returned, with a shutdown_timeout longer than
    this test's timeout: the workers' exits are read, so stopping them waits for them
    only, not for the timeout (ends them all, leaves no process). (The work the pump leaves
    for after the start is put off past this test: the shutdown alone must have them read.)"""
    import phalanx
    import phalanx.pump

    monkeypatch.setattr(phalanx.pump, "SOCKETS_AFTER", 600.0)
    for _ in range(3):
        rt = phalanx.Runtime(workers=2, shutdown_timeout=300.0)
        pids = list(rt.worker_pids().values())
        rt.shutdown()
        assert not [pid for pid in pids if _alive(pid)]
