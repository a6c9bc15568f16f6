"""phalanx's fork server: no fork in a threaded process, it dies with the driver, child containment.

Runs in the test process (a driver) and in driver scripts it starts with the
same interpreter (``sys.executable``: run this file under 3.11 and 3.13).
Everything is real: processes, signals, ``psutil`` scans of the process table.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import phalanx

from chaos_ops import start_daemon, start_three_children

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
#: the promise: what a dead worker started is gone within this many seconds
CONTAINMENT = 3.0


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _greeted_then_gone(pairs: list[Any], wids: tuple[str, ...], pids: list[int]) -> None:
    """Read each worker's Hello from the driver's end of its pipe, then close those ends
    (the driver is "gone": each worker ends)."""
    import select

    from phalanx.transport import pipe as pipes
    from phalanx.transport.codec import decode_driver
    from phalanx.transport.messages import Hello

    ours = [pipes.FramePipe(end, 1 << 20) for end, _ in pairs]
    try:
        for wid, end in zip(wids, ours):
            frames: list[bytes] = []
            while not frames:
                assert select.select([end.fileno()], [], [], 30)[0], f"{wid} never spoke on its pipe"
                got = end.recv()
                assert got is not None, f"{wid} closed its pipe"
                frames = got
            hello = decode_driver(frames[0])
            assert isinstance(hello, Hello) and hello.worker == wid and hello.pid in pids
    finally:
        for end in ours:
            end.close()


def _exit_recorder(count: int) -> tuple[dict[str, int | None], threading.Event, Callable[[str, int | None], None]]:
    """A fork server's exit callback that records each exit; the event is set at the ``count``-th."""
    exits: dict[str, int | None] = {}
    reported = threading.Event()

    def on_exit(worker_id: str, code: int | None) -> None:
        exits[worker_id] = code
        if len(exits) == count:
            reported.set()

    return exits, reported, on_exit


def _wait_gone(pids: list[int], within: float) -> list[int]:
    """Wait up to ``within`` seconds for ``pids`` to die; those still alive."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.01)
    return [p for p in pids if _alive(p)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    return env


SINGLE_THREADED = textwrap.dedent(
    """
    import os, signal, sys, time
    import psutil
    import phalanx

    @phalanx.operation
    def parent(x: int = 0) -> int:
        return os.getppid()

    if __name__ == "__main__":
        with phalanx.Runtime(workers=2) as rt:
            server = rt.submit(parent).result(timeout=30)
            assert server != os.getpid(), "workers are forked by the driver itself"
            first = set(rt.worker_pids().values())
            os.kill(next(iter(first)), signal.SIGKILL)   # its replacement is forked now
            deadline = time.monotonic() + 30
            while first & set(rt.worker_pids().values()) == first or len(rt.worker_pids()) < 2:
                assert time.monotonic() < deadline, "no replacement"
                time.sleep(0.01)
            parents = {psutil.Process(p).ppid() for p in rt.worker_pids().values()}
            assert parents == {server}, (parents, server)
            assert psutil.Process(server).num_threads() == 1, psutil.Process(server).threads()
            assert sorted(rt.map(parent, range(8))) == [server] * 8
        print("OK", flush=True)
    """
)


def _passes_under_w_error(tmp_path: Path, source: str) -> None:
    """Run ``source`` as a driver script under ``-W error``: it prints OK and no warning."""
    script = tmp_path / "driver.py"
    script.write_text(source)
    proc = subprocess.run([sys.executable, "-W", "error", str(script)], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr


def test_workers_are_forked_by_a_single_threaded_server_without_a_warning(tmp_path: Path) -> None:
    """First workers and replacements come from a one-thread process; -W error sees no fork warning."""
    _passes_under_w_error(tmp_path, SINGLE_THREADED)


SLEEPING_DRIVER = textwrap.dedent(
    """
    import json, os, sys, time
    import phalanx
    import chaos_ops

    if __name__ == "__main__":
        rt = phalanx.Runtime(workers=2)
        workers = rt.worker_pids()
        server = rt._driver._supervisor._server.pid
        children = rt.submit(chaos_ops.start_three_children, sys.argv[1]).result(timeout=30)
        print(json.dumps({"server": server, "workers": list(workers.values()),
                          "children": list(children.values())}), flush=True)
        time.sleep(120)
    """
)


@contextlib.contextmanager
def _driver_script(tmp_path: Path, text: str, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Any, list[int]]]:
    """Run a driver script that prints one JSON line then sleeps; yield the driver process,
    that line, and a list the test fills with the pids SIGKILLed at the end if still alive."""
    script = tmp_path / "driver.py"
    script.write_text(text)
    out = tmp_path / "out"
    with open(out, "w") as f:
        driver = subprocess.Popen([sys.executable, str(script), *args], env=_env(), cwd=tmp_path, stdout=f,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    watched: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not out.read_text().strip():
            assert driver.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.01)
        yield driver, json.loads(out.read_text().splitlines()[0]), watched
    finally:
        for pid in watched:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=10)


@pytest.mark.chaos
def test_the_fork_server_and_everything_below_it_die_with_a_sigkilled_driver(tmp_path: Path) -> None:
    with _driver_script(tmp_path, SLEEPING_DRIVER, str(tmp_path / "pids")) as (driver, pids, watched):
        watched += [pids["server"], *pids["workers"], *pids["children"]]
        assert all(_alive(p) for p in watched)
        driver.kill()
        driver.wait(timeout=10)
        left = _wait_gone([pids["server"], *pids["workers"]], within=1.0)
        assert not left, f"alive 1 s after the driver was SIGKILLed: {left} of {pids}"
        left = _wait_gone(pids["children"], within=CONTAINMENT)
        assert not left, f"the workers' children alive {CONTAINMENT} s after: {left}"


@pytest.mark.chaos
@pytest.mark.parametrize("death", ["sigkill", "exit", "sigterm"])
def test_everything_a_dead_worker_started_is_gone_within_3_s(tmp_path: Path, death: str) -> None:
    """A task starts ``sleep`` in its group, in a new session and double-forked; the worker dies."""
    path = str(tmp_path / "pids")
    with phalanx.Runtime(workers=1, max_attempts=1) as rt:
        (worker,) = rt.worker_pids().values()
        if death == "exit":
            fut = rt.submit(start_three_children, path, 3)
            with pytest.raises(phalanx.WorkerCrashedError):
                fut.result(timeout=30)
            pids = json.loads(Path(path).read_text())
        else:
            pids = rt.submit(start_three_children, path).result(timeout=30)
            assert all(_alive(p) for p in pids.values())
            os.kill(worker, signal.SIGKILL if death == "sigkill" else signal.SIGTERM)
        left = _wait_gone(list(pids.values()), within=CONTAINMENT)
        assert not left, f"alive {CONTAINMENT} s after the worker's death ({death}): " + ", ".join(
            f"{k}={p}" for k, p in pids.items() if p in left)
        # The runtime goes on with a replacement.
        assert rt.submit(start_daemon).result(timeout=30) > 0


@pytest.mark.chaos
def test_a_live_workers_daemon_survives_another_workers_death(tmp_path: Path) -> None:
    """Containment kills what the dead worker started, not what a live one did."""
    with phalanx.Runtime(workers={"a": 1, "b": 1}) as rt:
        daemon = rt.options(on="a").submit(start_daemon).result(timeout=30)
        victim = rt.worker_pids()
        b_pid = next(pid for wid, pid in victim.items() if rt._driver.worker_tags()[wid] == ("b",))
        assert psutil.Process(daemon).ppid() != b_pid
        os.kill(b_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while b_pid in rt.worker_pids().values() or len(rt.worker_pids()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(1.5)  # past the fork server's sweeps after that death
        assert _alive(daemon), "a live worker's daemon was killed when another worker died"
        a_pid = next(pid for wid, pid in rt.worker_pids().items() if rt._driver.worker_tags()[wid] == ("a",))
        os.kill(a_pid, signal.SIGKILL)
        assert not _wait_gone([daemon], within=CONTAINMENT)


INTERACTIVE = """\
import phalanx

@phalanx.operation
def square(x):
    return x * x

with phalanx.Runtime(workers=1) as rt:
    print(rt.submit(square, 7).result(timeout=30))

    @phalanx.operation
    def late(x):
        return x

    try:
        rt.submit(late, 1).result(timeout=30)
    except phalanx.UnknownOperationError as exc:
        print(exc)
"""

LATE = ("unknown operation '__main__:late': no such function in the workers' __main__: it was defined after "
        "the runtime's workers started: define it before `Runtime()`, or in a module")


@pytest.mark.parametrize("how", ["-c", "stdin"])
def test_python_c_and_a_script_on_stdin_run_operations(tmp_path: Path, how: str) -> None:
    """``python -c`` and ``python - <<EOF``: operations run; a late one gets the clear error."""
    args, stdin = ([sys.executable, "-c", INTERACTIVE], None) if how == "-c" else ([sys.executable, "-"], INTERACTIVE)
    proc = subprocess.run(args, input=stdin, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["49", LATE], proc.stdout + proc.stderr


def test_output_the_driver_buffered_before_the_runtime_is_printed_once(tmp_path: Path) -> None:
    """Workers are copies of the driver: what sat in its stdout buffer must not be copied out again."""
    program = textwrap.dedent(
        """
        import phalanx
        print("before the runtime")   # block-buffered: stdout is a pipe
        with phalanx.Runtime(workers=2) as rt:
            assert len(rt.worker_pids()) == 2
        print("after")
        """
    )
    proc = subprocess.run([sys.executable, "-c", program], env=_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["before the runtime", "after"], proc.stdout


@pytest.mark.chaos
def test_a_killed_fork_server_breaks_the_runtime_loudly_and_takes_its_workers() -> None:
    """No new worker can start without it: the runtime breaks (no hang), and no worker survives."""
    with phalanx.Runtime(workers=2) as rt:
        server = rt._driver._supervisor._server
        assert server is not None
        workers = list(rt.worker_pids().values())
        os.kill(server.pid, signal.SIGKILL)
        assert not _wait_gone(workers, within=1.0), "workers outlived their fork server"
        deadline = time.monotonic() + 30
        while rt._driver.broken is None:
            assert time.monotonic() < deadline, "the runtime did not notice its fork server died"
            time.sleep(0.01)
        with pytest.raises(phalanx.RuntimeBrokenError, match="fork server"):
            rt.submit(start_daemon).result(timeout=30)


def test_spawn_many_forks_every_worker_at_once_a_bad_request_fails_alone_and_no_exit_is_lost() -> None:
    """One request for three workers: the good ones run and say Hello on their own pipes, the
    bad one gets its error; their exits, before the reader thread started, still all come."""
    from phalanx.forkserver import ForkServer
    from phalanx.transport import pipe as pipes
    from phalanx.transport.endpoints import local_endpoints
    from phalanx.worker import WorkerSpec

    exits, reported, on_exit = _exit_recorder(2)
    endpoints = local_endpoints()
    server = ForkServer(on_exit, start=False)
    try:
        pairs = [pipes.socketpair() for _ in range(2)]
        specs = [WorkerSpec(worker_id=f"w{i}", endpoints=endpoints, credits=1, parent_pid=os.getpid(),
                            prefix_output=False) for i in (1, 2)]
        started = server.spawn_many([("w1", specs[0], pairs[0][1]), ("bad", {"worker_id": "bad"}, None),
                                     ("w2", specs[1], pairs[1][1])])
        for _, theirs in pairs:
            theirs.close()
        assert isinstance(started[1], OSError) and "bad" in str(started[1])
        pids = []
        for handle in (started[0], started[2]):
            assert not isinstance(handle, BaseException)
            assert handle.pid is not None and psutil.Process(handle.pid).ppid() == server.pid
            pids.append(handle.pid)
        _greeted_then_gone(pairs, ("w1", "w2"), pids)
        assert _wait_gone(pids, 30) == []
        assert not reported.is_set()  # nobody reads the exits yet
        server.start()
        assert reported.wait(30), exits
        assert set(exits) == {"w1", "w2"}
    finally:
        server.close()
        endpoints.remove()


def _first_workers(endpoints: Any, count: int) -> tuple[list[Any], list[Any], tuple[Any, ...]]:
    """``count`` first workers "w1".. for ``ForkServer(first=)``: the requests, the driver's and
    the workers' pipe ends (pairs, as ``_greeted_then_gone`` takes them), and the driver's ends."""
    from phalanx.transport import pipe as pipes
    from phalanx.worker import WorkerSpec

    pairs = [pipes.socketpair() for _ in range(count)]
    first = [(f"w{i + 1}", WorkerSpec(worker_id=f"w{i + 1}", endpoints=endpoints, credits=1,
                                      parent_pid=os.getpid(), prefix_output=False), theirs)
             for i, (_, theirs) in enumerate(pairs)]
    return first, pairs, tuple(ours for ours, _ in pairs)


def test_first_workers_are_forked_with_the_server_and_later_ones_on_request() -> None:
    """Two first workers (forked with the server, before it serves), one SIGKILLed before
    their replies are read, then a spawn: the replies name both first workers, the survivor
    and the spawned one serve, and exactly the three exits come, each once."""
    from phalanx.forkserver import ForkServer
    from phalanx.transport import pipe as pipes
    from phalanx.transport.endpoints import local_endpoints
    from phalanx.worker import WorkerSpec

    exits, reported, on_exit = _exit_recorder(3)
    endpoints = local_endpoints()
    first, pairs, ours = _first_workers(endpoints, 2)
    server = ForkServer(on_exit, start=False, first=first, drivers_ends=ours)
    try:
        for _, theirs in pairs:
            theirs.close()
        deadline = time.monotonic() + 30
        while len(psutil.Process(server.pid).children()) < 2:
            assert time.monotonic() < deadline, "the server forked no first workers"
            time.sleep(0.001)
        killed = psutil.Process(server.pid).children()[0].pid
        os.kill(killed, signal.SIGKILL)
        handles = server.first_replies()
        pids = []
        for handle in handles:
            assert not isinstance(handle, BaseException), handle
            assert handle.pid is not None
            pids.append(handle.pid)
        assert killed in pids, (killed, pids)
        (survivor,) = set(pids) - {killed}  # (the killed one may be reaped by now)
        assert psutil.Process(survivor).ppid() == server.pid
        live = [(pair, wid, pid) for pair, wid, pid in zip(pairs, ("w1", "w2"), pids) if pid != killed]
        later = pipes.socketpair()
        spec = WorkerSpec(worker_id="w3", endpoints=endpoints, credits=1, parent_pid=os.getpid(), prefix_output=False)
        (spawned,) = server.spawn_many([("w3", spec, later[1])])
        later[1].close()
        assert not isinstance(spawned, BaseException) and spawned.pid is not None, spawned
        live.append((later, "w3", spawned.pid))
        _greeted_then_gone([pair for pair, _, _ in live], tuple(w for _, w, _ in live), [p for _, _, p in live])
        assert _wait_gone([*pids, spawned.pid], 30) == []
        server.start()
        assert reported.wait(30), exits
        time.sleep(0.2)
        assert set(exits) == {"w1", "w2", "w3"}, exits
        assert exits[("w1", "w2")[pids.index(killed)]] == -signal.SIGKILL, exits
    finally:
        for end, theirs in pairs:
            end.close()
            theirs.close()
        server.close()
        endpoints.remove()


def test_a_fork_server_closed_before_its_first_replies_are_read_leaves_no_worker() -> None:
    from phalanx.forkserver import ForkServer
    from phalanx.transport.endpoints import local_endpoints

    endpoints = local_endpoints()
    first, pairs, ours = _first_workers(endpoints, 2)
    server = ForkServer(lambda wid, code: None, first=first, drivers_ends=ours)
    try:
        for _, theirs in pairs:
            theirs.close()
        deadline = time.monotonic() + 30
        while len(kids := psutil.Process(server.pid).children()) < 2:
            assert time.monotonic() < deadline, "the server forked no first workers"
            time.sleep(0.001)
    finally:
        server.close()
        for end, _ in pairs:
            end.close()
        endpoints.remove()
    assert _wait_gone([server.pid, *(k.pid for k in kids)], 5) == []


#: a driver script whose fork server is forked with two first workers (the pipe ends the
#: driver keeps are held, as a driver's are, so the workers wait for it)
FIRST_WORKERS = """
    import os, socket
    from phalanx.forkserver import ForkServer
    from phalanx.transport import pipe as pipes
    from phalanx.transport.endpoints import local_endpoints
    from phalanx.worker import WorkerSpec

    def first_workers():
        endpoints = local_endpoints()
        pairs = [pipes.socketpair() for _ in range(2)]
        first = [(f"w{i + 1}", WorkerSpec(worker_id=f"w{i + 1}", endpoints=endpoints, credits=1,
                                          parent_pid=os.getpid(), prefix_output=False), theirs)
                 for i, (_, theirs) in enumerate(pairs)]
        server = ForkServer(lambda wid, code: None, first=first, drivers_ends=tuple(o for o, _ in pairs))
        for _, theirs in pairs:
            theirs.close()
        return server, pairs
"""

FIRST_DRIVER = textwrap.dedent(FIRST_WORKERS + """
    import json, time
    import psutil

    if __name__ == "__main__":
        server, pairs = first_workers()
        pids = [w.pid for w in server.first_replies()]
        print(json.dumps({"server": server.pid, "first": pids}), flush=True)
        time.sleep(120)
    """
)


@pytest.mark.chaos
def test_first_workers_die_with_a_driver_sigkilled_before_it_read_them(tmp_path: Path) -> None:
    with _driver_script(tmp_path, FIRST_DRIVER) as (driver, pids, watched):
        watched += [pids["server"], *pids["first"]]
        assert len(watched) == 3 and all(_alive(p) for p in watched)
        driver.kill()
        driver.wait(timeout=10)
        left = _wait_gone(watched, within=1.0)
        assert not left, f"alive 1 s after the driver was SIGKILLed: {left} of {pids}"


@pytest.mark.timeout(120)
def test_a_driver_holding_descriptors_past_1023_starts_and_ends_a_runtime() -> None:
    """A driver with over a thousand descriptors open (a server's connections, say): the
    fork server it forks waits on its sockets with poll, not select (which stops at
    descriptor 1023): the runtime starts, runs a task, and shuts down."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"at most {hard} descriptors here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if hard == resource.RLIM_INFINITY
                                                else min(hard, max(soft, 1200)), hard))
    held = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(1100)]
    try:
        assert max(held) > 1023
        with phalanx.Runtime(workers=1) as rt:
            assert rt.submit("ops:square", 9).result(timeout=60) == 81
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


KILLED_AT_ONCE = textwrap.dedent(FIRST_WORKERS + """
    import signal, sys, time

    if __name__ == "__main__":
        server, pairs = first_workers()
        time.sleep(float(sys.argv[1]))
        print(server.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.chaos
@pytest.mark.parametrize("delay", [0.0, 0.001, 0.003, 0.01])
def test_a_driver_sigkilled_while_the_server_forks_its_first_workers_leaves_nothing(
        tmp_path: Path, delay: float) -> None:
    """The server forks its first workers first of all, before its loop ever checks the
    driver: a driver killed before, during or right after those forks leaves no process."""
    import uuid

    from marked import processes_marked

    marker = uuid.uuid4().hex
    script = tmp_path / "driver.py"
    script.write_text(KILLED_AT_ONCE)
    env = _env()
    env["PHALANX_TEST_MARKER"] = marker
    out = tmp_path / "out"
    with open(out, "w") as f:  # a file, not a pipe: a process left behind would hold a pipe open
        driver = subprocess.Popen([sys.executable, str(script), str(delay)], env=env, cwd=tmp_path,
                                  stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        assert driver.wait(timeout=60) == -signal.SIGKILL, out.read_text()
        deadline = time.monotonic() + 2.0
        left = processes_marked("PHALANX_TEST_MARKER", marker)
        while left and time.monotonic() < deadline:
            time.sleep(0.01)
            left = processes_marked("PHALANX_TEST_MARKER", marker)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=10)
        stray = processes_marked("PHALANX_TEST_MARKER", marker)
        for p in stray:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(stray, timeout=3)
    assert not left, f"alive 2 s after the driver was SIGKILLed (server {out.read_text().strip()}): {left}"


@pytest.mark.parametrize("workers", [1, {"a": 1, "b": 2}], ids=["one", "groups"])
def test_every_process_below_the_server_is_a_worker_of_the_runtime(workers: int | dict[str, int]) -> None:
    """The server forks exactly the runtime's first workers: every process below it is one,
    with a single worker and with tag groups alike."""
    with phalanx.Runtime(workers=workers) as rt:
        server = rt._driver._supervisor._server
        assert server is not None
        expected = 1 if isinstance(workers, int) else sum(workers.values())
        pids = set(rt.worker_pids().values())
        assert len(pids) == expected
        below = {p.pid for p in psutil.Process(server.pid).children()}
        assert below == pids, f"below the server: {below}; the runtime's workers: {pids}"
        for pid in pids:
            assert psutil.Process(pid).ppid() == server.pid


THREADED_DRIVER = textwrap.dedent(
    """
    import threading
    import phalanx

    if __name__ == "__main__":
        stop = threading.Event()
        mine = threading.Thread(target=stop.wait)   # the user's own thread, running
        mine.start()
        with phalanx.Runtime(workers=1) as rt:
            assert rt.submit("ops:square", 3).result(timeout=30) == 9
        stop.set()
        mine.join()
        print("OK", flush=True)
    """
)


def test_a_driver_running_a_thread_of_its_own_starts_a_runtime_without_a_fork_warning(tmp_path: Path) -> None:
    """The one fork from a threaded process (the server's) is silenced, even under -W error."""
    _passes_under_w_error(tmp_path, THREADED_DRIVER)


def test_a_first_worker_dead_before_the_supervisor_starts_is_reported_once_after_it() -> None:
    """The server's reader thread runs from the first spawn (which forks the server with its
    worker) on, before Supervisor.start():
    an exit it reads meanwhile is held until start(), then reported exactly once."""
    from phalanx.supervisor import Supervisor
    from phalanx.transport.endpoints import local_endpoints
    from phalanx.worker import WorkerSpec

    reports: list[tuple[str, int | None]] = []
    reported = threading.Event()

    def on_exit(worker_id: str, code: int | None) -> None:
        reports.append((worker_id, code))
        reported.set()

    endpoints = local_endpoints()
    sup = Supervisor("phalanx", on_exit)
    try:
        spec = WorkerSpec(worker_id="w1", endpoints=endpoints, credits=1, parent_pid=os.getpid(),
                          prefix_output=False)
        (started,) = sup.spawn_piped_many([spec])
        assert not isinstance(started, BaseException), started
        pid, end, control = started
        server = sup._server
        assert server is not None and server._reader is not None and server._reader.is_alive()
        os.kill(pid, signal.SIGKILL)
        assert _wait_gone([pid], 30) == []
        time.sleep(0.3)  # time for the server to reap it and the reader to read its exit
        assert reports == [], "an exit was reported before the supervisor started"
        sup.start()
        assert reported.wait(30), "the held exit was never reported"
        time.sleep(0.2)
        assert reports == [("w1", -signal.SIGKILL)], reports
        end.close()
        control.close()
    finally:
        sup.stop(0.0)
        endpoints.remove()


def _held(pid: int) -> tuple[set[str], int]:
    """The sockets ``pid`` holds (``socket:[inode]``) and how many pidfds."""
    sockets: set[str] = set()
    pidfds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:"):
            sockets.add(target)
        elif target == "anon_inode:[pidfd]":
            pidfds += 1
    return sockets, pidfds


def test_a_worker_holds_none_of_the_drivers_sockets_nor_any_pidfd() -> None:
    """Every worker, forked with the server or on request, holds none of the driver's ends of
    its fork server's sockets and of the workers' pipes, none of another runtime's fork server
    sockets, and no pidfd: an EOF the server or a worker waits for would come late, and a task
    could reach processes that are not its own."""
    def sockets_of(server: Any) -> set[str]:
        return {os.readlink(f"/proc/self/fd/{sock.fileno()}") for sock in (server._ctl, server._events)}

    with phalanx.Runtime(workers=1) as other:
        other.endpoints  # its ZeroMQ sockets now (else they come ~50 ms after its start, during the next one)
        before, _ = _held(os.getpid())
        with phalanx.Runtime(workers=2) as rt:
            drivers, _ = _held(os.getpid())
            drivers -= before  # what this runtime's driver made: its server's ends, its pipes' ends
            assert sockets_of(rt._driver._supervisor._server) <= drivers
            others = sockets_of(other._driver._supervisor._server)
            first = rt.worker_pids()
            victim = next(iter(first.values()))
            os.kill(victim, signal.SIGKILL)  # its replacement is forked on request
            deadline = time.monotonic() + 30
            while (victim in rt.worker_pids().values() or len(rt.worker_pids()) < 2) and time.monotonic() < deadline:
                time.sleep(0.01)
            pids = rt.worker_pids()
            assert victim not in pids.values() and len(pids) == 2, pids
            assert set(pids.values()) & set(first.values()), "a first worker should still run"
            for wid, pid in pids.items():
                sockets, pidfds = _held(pid)
                assert not sockets & drivers, f"{wid} holds the driver's {sorted(sockets & drivers)}"
                assert not sockets & others, f"{wid} holds the other runtime's server sockets"
                assert pidfds == 0, f"{wid} holds {pidfds} pidfds"


def _socket_names(pid: int) -> set[str]:
    """What each socket process ``pid`` holds is bound to: an ipc path, or ``tcp:PORT``
    (from /proc/net/unix and /proc/net/tcp{,6}, by inode)."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    names: set[str] = set()
    with open("/proc/net/unix") as f:
        for line in list(f)[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[6] in inodes:
                names.add(fields[7])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    names.add(f"tcp:{int(fields[1].rsplit(':', 1)[1], 16)}")
    return names


def test_a_runtime_started_beside_a_listening_one_holds_none_of_its_sockets() -> None:
    """A runtime's fork server is a copy of the driver: started while another runtime of the
    same process runs, it (and every worker it forks) must hold none of the sockets that one
    bound or accepted. Else, once that runtime shut down, its tcp ports stay taken (a new
    runtime listening on them fails with "address already in use") and its connections stay
    open, as long as the second runtime runs. Nor may they hold the driver's ends of that
    runtime's worker pipes: its workers would see no EOF when its driver closes them."""
    before, _ = _held(os.getpid())
    with phalanx.Runtime(workers=2, listen="tcp://127.0.0.1:0", insecure=True) as first:
        address = first._driver.address
        assert address is not None
        ports = {int(a.rsplit(":", 1)[1]) for a in (address.tasks, address.results, address.control)}
        ipc_dir = first._driver.endpoints.ipc_dir
        assert ipc_dir is not None
        first.endpoints  # its ipc sockets too, now
        firsts, _ = _held(os.getpid())
        firsts -= before
        second = phalanx.Runtime(workers=1)
    try:
        server = second._driver._supervisor._server
        assert server is not None
        for pid in (server.pid, *second.worker_pids().values()):
            held = _socket_names(pid)
            assert not {n for n in held if n.startswith(ipc_dir + "/")}, (pid, held)
            assert not held & {f"tcp:{p}" for p in ports}, (pid, held)
            sockets, _ = _held(pid)
            assert not sockets & firsts, (pid, sorted(sockets & firsts))
        for port in sorted(ports):
            with socket.socket() as again:
                again.bind(("127.0.0.1", port))  # no "address already in use"
                again.listen()
    finally:
        second.shutdown()


ORPHANED_WORKER = textwrap.dedent(
    """
    import os, sys
    from phalanx import forkserver

    if __name__ == "__main__":
        server = os.getpid()
        pid = os.fork()
        if pid == 0:
            # A worker whose server died before the worker set its parent-death signal: its
            # parent is no longer that server (here: told a pid that is not its parent's).
            forkserver._worker(None, [], server + 1 if server + 1 != os.getpid() else server + 2, ())
        _, status = os.waitpid(pid, 0)
        print("exit", os.waitstatus_to_exitcode(status), flush=True)
    """
)


def test_a_worker_whose_fork_server_is_gone_as_it_starts_exits_at_once(tmp_path: Path) -> None:
    """A worker whose fork server is gone before the worker made the server's death its own
    (the parent-death signal) exits at once and runs nothing: no one would reap it, report
    its exit, or sweep what it starts."""
    script = tmp_path / "orphaned.py"
    script.write_text(ORPHANED_WORKER)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "exit 1", out.stdout
    assert out.stderr == "", f"it ran further than its first check:\n{out.stderr}"
