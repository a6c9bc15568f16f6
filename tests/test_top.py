"""``phalanx top``: finding a running runtime and printing its workers and actors.

Runs in the test (driver) process, which holds the ``phalanx.Runtime`` being
watched; ``python -m phalanx top`` runs in a subprocess, as a user would run
it, and finds the runtime through the ``runtime.json`` the runtime writes into
its private ipc directory. Other runtimes of this user may be running on the
machine at the same time, so the tests pick theirs with ``--pid`` (or
``--connect``) wherever the answer must be this process's runtime.

Checked: ``--once`` prints one snapshot listing every worker with its pid and
the actors it hosts, and exits 0; ``--connect`` reaches a runtime by its
results endpoint; without ``--once`` the snapshot is refreshed until the
command is stopped; with no runtime found, or one that does not answer, a
clear message and a non-zero exit; several runtimes without ``--pid`` are
listed, not guessed between, while several runtimes of one process are all
shown; a file a killed driver left behind is ignored even when its pid was
reused; ``--help`` documents the options.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

import msgspec
import pytest

import phalanx
from actor_ops import Counter
from phalanx.transport.endpoints import adverts, start_ticks

pytestmark = pytest.mark.timeout(120)

T = 60.0  # seconds: generous bound on any subprocess or wait (never an assertion on speed)


def top(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m phalanx top ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "phalanx", "top", *args],
                          capture_output=True, text=True, timeout=T)


def snapshot(pid: int) -> subprocess.CompletedProcess[str]:
    """One ``--once`` snapshot of the runtime of driver ``pid``.

    The refresh interval is also the bound on the wait for the answer; a long
    one keeps a busy machine from turning a slow answer into "no answer".
    """
    return top("--once", "--pid", str(pid), "--interval", "10")


def ipc_dir_of(rt: phalanx.Runtime) -> Path:
    results = rt.endpoints[1]
    assert results.startswith("ipc://"), results
    return Path(results[len("ipc://"):]).parent


def worker_lines(out: str) -> dict[str, tuple[int, list[str]]]:
    """Worker id -> (pid, the lines of its actors), parsed from the printed tree."""
    workers: dict[str, tuple[int, list[str]]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        m = re.search(r"worker (\S+) pid (\d+)", line)
        if m:
            current = []
            workers[m.group(1)] = (int(m.group(2)), current)
        elif "actor " in line and current is not None:
            current.append(line)
    return workers


# --------------------------------------------------------------------------- #
# The command line
# --------------------------------------------------------------------------- #


def test_top_help() -> None:
    result = top("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: phalanx top")
    for option in ("--once", "--pid", "--connect", "--interval"):
        assert option in result.stdout
    assert "runtime.json" in result.stdout  # how runtimes are found
    listing = subprocess.run([sys.executable, "-m", "phalanx", "--help"], capture_output=True, text=True,
                             timeout=T)
    assert listing.returncode == 0
    assert re.search(r"^\s+top\s+\S", listing.stdout, re.MULTILINE), listing.stdout


@pytest.mark.parametrize("args", [
    ["--pid", "not-a-pid"],
    ["--interval", "-1"],
    ["--interval", "0"],
    ["--interval", "nan"],
    ["--interval", "inf", "--once"],
])
def test_top_bad_usage(args: list[str]) -> None:
    """A usage error is exit status 2 with a message naming the option, never a traceback."""
    result = top(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert args[0] in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- #
# A running runtime
# --------------------------------------------------------------------------- #


def test_runtime_advertises_itself(runtime: phalanx.Runtime) -> None:
    info = msgspec.json.decode((ipc_dir_of(runtime) / "runtime.json").read_bytes())
    assert info["pid"] == os.getpid()
    assert info["results"] == runtime.endpoints[1]
    assert info["workers"] == 2


def test_once_lists_workers_pids_and_actor(runtime: phalanx.Runtime) -> None:
    rt = runtime
    ref = rt.spawn(Counter, 0, name="top-probe")
    for _ in range(3):
        ref.incr().result(timeout=T)
    result = snapshot(os.getpid())
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\033[" not in out  # one plain snapshot: no screen control codes
    assert re.match(rf"\d\d:\d\d:\d\d runtime {os.getpid()}\n", out), out
    workers = worker_lines(out)
    assert {wid: pid for wid, (pid, _) in workers.items()} == rt.worker_pids()
    # the actor is listed under the worker hosting it, and only there
    for wid, (_, actors) in workers.items():
        mine = [line for line in actors if f"actor {ref.id} " in line]
        if wid == ref.worker:
            assert len(mine) == 1, out
            assert f"actor {ref.id} top-probe (actor_ops:Counter) running" in mine[0]
            assert "calls 3" in mine[0]
        else:
            assert not mine, out
    ref.stop()
    ref.join(T)
    # a stopped actor is no longer listed
    after = snapshot(os.getpid())
    assert after.returncode == 0, after.stderr
    assert "top-probe" not in after.stdout
    assert {wid: pid for wid, (pid, _) in worker_lines(after.stdout).items()} == rt.worker_pids()


def test_connect_to_results_endpoint(runtime: phalanx.Runtime) -> None:
    result = top("--once", "--connect", runtime.endpoints[1], "--interval", "10")
    assert result.returncode == 0, result.stderr
    workers = worker_lines(result.stdout)
    assert {wid: pid for wid, (pid, _) in workers.items()} == runtime.worker_pids()


def _lines(stream: IO[str], into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def test_live_mode_refreshes_until_stopped(runtime: phalanx.Runtime) -> None:
    me = os.getpid()
    # The interval also bounds each wait for an answer; in live mode a runtime that
    # stops answering ends the command, so it is not made short on a busy machine.
    proc = subprocess.Popen([sys.executable, "-m", "phalanx", "top", "--pid", str(me), "--interval", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None
    reader = threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        headers = 0
        seen: list[str] = []
        while headers < 2:
            line = lines.get(timeout=T)
            assert line is not None, f"phalanx top exited ({proc.wait(T)}): {''.join(seen)}"
            seen.append(line)
            headers += bool(re.match(rf"\d\d:\d\d:\d\d runtime {me}$", line.rstrip("\n")))
        assert "no answer" not in "".join(seen)
        assert proc.poll() is None  # still refreshing
    finally:
        proc.terminate()
        proc.wait(T)
        reader.join(T)
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    assert all(str(pid) in "".join(seen) for pid in runtime.worker_pids().values())


# --------------------------------------------------------------------------- #
# No runtime, no answer, several runtimes
# --------------------------------------------------------------------------- #


def test_no_runtime_then_runtime_then_shut_down() -> None:
    me = os.getpid()
    absent = snapshot(me)
    assert absent.returncode == 1
    assert "no running runtime found" in absent.stderr
    assert absent.stdout == ""
    rt = phalanx.Runtime(workers=1)
    try:
        ipc_dir = ipc_dir_of(rt)
        present = snapshot(me)
        assert present.returncode == 0, present.stderr
        assert list(worker_lines(present.stdout)) == list(rt.worker_pids())
    finally:
        rt.shutdown()
    assert not (ipc_dir / "runtime.json").exists()
    gone = snapshot(me)
    assert gone.returncode == 1
    assert "no running runtime found" in gone.stderr


def test_a_file_left_by_a_dead_runtime_whose_pid_was_reused_is_ignored() -> None:
    """A SIGKILLed driver leaves its runtime.json behind; a later process may get its pid.

    The stale file names this very process's pid and sorts before any real
    runtime's directory; only its process's recorded start tells it apart.
    """
    me = os.getpid()
    stale = Path(tempfile.mkdtemp(prefix="phalanx-0", dir="/tmp"))
    try:
        (stale / "runtime.json").write_bytes(msgspec.json.encode({
            "pid": me, "results": f"ipc://{stale}/results", "workers": 1, "started": 0.0,
            "start_ticks": start_ticks(me) - 60 * os.sysconf("SC_CLK_TCK"), "argv": ["a driver that was killed"]}))
        absent = snapshot(me)
        assert absent.returncode == 1
        assert "no running runtime found" in absent.stderr
        with phalanx.Runtime(workers=1) as rt:
            present = snapshot(me)
            assert present.returncode == 0, (present.stdout, present.stderr)
            assert "no answer" not in present.stdout
            assert list(worker_lines(present.stdout)) == list(rt.worker_pids())
        # a runtime's shutdown also removes what dead drivers of this user left behind
        assert not stale.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def test_shutdown_removes_dirs_of_dead_drivers_only() -> None:
    # A runtime an earlier test dropped shuts down (and sweeps) from a thread of its own
    # when collected: let those finish first, so the only sweep here is this test's.
    gc.collect()
    for thread in threading.enumerate():
        if thread.name == "phalanx-collected":
            thread.join(timeout=T)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, timeout=T, check=True)
    dead_pid = int(dead.stdout)
    dirs = {name: Path(tempfile.mkdtemp(prefix=f"phalanx-{name}-", dir="/tmp"))
            for name in ("dead", "starting", "garbled", "alive")}
    try:
        # written without a start: a pid with no process is enough
        (dirs["dead"] / "runtime.json").write_bytes(msgspec.json.encode({"pid": dead_pid, "results": ""}))
        (dirs["garbled"] / "runtime.json").write_bytes(b"{not json")
        (dirs["alive"] / "runtime.json").write_bytes(msgspec.json.encode({
            "pid": os.getpid(), "results": "", "start_ticks": start_ticks(os.getpid())}))
        # (Whether it is still there while the runtime runs is not checked: any runtime of this
        # user on the machine, another test run's too, sweeps it when it shuts down.)
        with phalanx.Runtime(workers=1):
            pass
        assert not dirs["dead"].exists()
        assert all(dirs[name].exists() for name in ("starting", "garbled", "alive"))
    finally:
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)


def test_start_ticks_names_a_process_even_with_parentheses_and_spaces_in_its_name(tmp_path: Path) -> None:
    """The start is read past the command name, which may hold ``)`` and spaces; a reaped
    process has none."""
    import psutil

    odd = tmp_path / "x) 1 2 (y"
    shutil.copy("/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "30"])
    try:
        assert psutil.Process(proc.pid).name() == odd.name
        ticks = start_ticks(proc.pid)
        assert ticks is not None
        wall = ticks / os.sysconf("SC_CLK_TCK") + psutil.boot_time()
        assert abs(wall - psutil.Process(proc.pid).create_time()) < 0.05
    finally:
        proc.kill()
        proc.wait(timeout=T)
    assert start_ticks(proc.pid) is None


def test_a_step_of_the_boot_time_leaves_a_live_runtime_found_and_its_directory_in_place(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A process's creation time read as wall-clock time moves when the boot time it is
    computed from steps (``/proc/stat``'s btime is the clock less the uptime: NTP, a resumed
    VM). A live runtime must not look dead then: the next runtime's shutdown would remove its
    directory, and ``phalanx top`` would not find it."""
    from psutil import _pslinux

    with phalanx.Runtime(workers=1) as first:
        d = ipc_dir_of(first)
        boot_time = _pslinux.boot_time
        monkeypatch.setattr(_pslinux, "boot_time", lambda: boot_time() + 1.0)
        assert [alive for dd, _, alive in adverts() if Path(dd) == d] == [True]
        with phalanx.Runtime(workers=1):
            pass  # its shutdown sweeps the directories of dead drivers
        assert (d / "runtime.json").exists()
        assert first.spawn(Counter, 0).incr().result(timeout=T) == 1


DIES_WITH_A_DIRECTORY = (
    "import os, sys\n"
    "from phalanx.transport.endpoints import local_endpoints\n"
    "print(local_endpoints().ipc_dir, flush=True)\n"
    "sys.stdin.read()\n"  # until told: then killed, as a driver SIGKILLed in its constructor
)


def test_a_directory_left_before_runtime_json_was_written_is_removed_once_its_driver_is_gone() -> None:
    """A driver SIGKILLed in its constructor, after it made its ipc directory and before it
    wrote runtime.json in it, leaves the directory empty. The next runtime's shutdown removes
    it once that driver is gone, and never while it runs (it may still be starting)."""
    gc.collect()
    for thread in threading.enumerate():
        if thread.name == "phalanx-collected":
            thread.join(timeout=T)
    left = Path("/nonexistent")
    with subprocess.Popen([sys.executable, "-c", DIES_WITH_A_DIRECTORY], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as driver:
        try:
            assert driver.stdout is not None
            left = Path(driver.stdout.readline().strip())
            assert left.is_dir() and not list(left.iterdir())
            with phalanx.Runtime(workers=1):
                pass
            assert left.is_dir(), "removed while its driver was still starting"
            driver.kill()
            driver.wait(timeout=T)
            with phalanx.Runtime(workers=1):
                pass
            assert not left.exists()
        finally:
            driver.kill()
            driver.wait(timeout=T)
            shutil.rmtree(left, ignore_errors=True)


def test_two_runtimes_in_one_process_are_both_shown() -> None:
    me = os.getpid()
    with phalanx.Runtime(workers=1) as first, phalanx.Runtime(workers=1) as second:
        shown = snapshot(me)
        assert shown.returncode == 0, (shown.stdout, shown.stderr)
        headers = re.findall(rf"^\d\d:\d\d:\d\d runtime {me}$", shown.stdout, re.MULTILINE)
        assert len(headers) == 2, shown.stdout
        pids = {int(p) for p in re.findall(r"worker \S+ pid (\d+)", shown.stdout)}
        assert pids == set(first.worker_pids().values()) | set(second.worker_pids().values())


def test_connect_to_silent_endpoint(ipc_dir: Path) -> None:
    result = top("--once", "--connect", f"ipc://{ipc_dir}/nobody", "--interval", "0.5")
    assert result.returncode == 1
    assert "no answer" in result.stdout


_CHILD_RUNTIME = """\
import json, sys
import phalanx
with phalanx.Runtime(workers=1) as rt:
    print(json.dumps(rt.worker_pids()), flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_several_runtimes_need_a_pid(runtime: phalanx.Runtime) -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD_RUNTIME], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        child_workers: dict[str, Any] = json.loads(child.stdout.readline())
        assert len(child_workers) == 1
        # without --pid, phalanx top lists the candidates instead of picking one
        several = top("--once", "--interval", "10")
        assert several.returncode == 2
        assert "several runtimes" in several.stderr
        assert f"pid {os.getpid()}:" in several.stderr
        assert f"pid {child.pid}:" in several.stderr
        # --pid picks the child's runtime: its worker, not ours
        theirs = snapshot(child.pid)
        assert theirs.returncode == 0, theirs.stderr
        assert f"runtime {child.pid}" in theirs.stdout
        workers = worker_lines(theirs.stdout)
        assert {wid: pid for wid, (pid, _) in workers.items()} == child_workers
        assert not set(child_workers.values()) & set(runtime.worker_pids().values())
        child.stdin.close()
        assert child.wait(T) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(T)
        for stream in (child.stdin, child.stdout):
            if stream is not None and not stream.closed:
                stream.close()


FAILED_START = """
import json, os

import phalanx
from phalanx.transport.endpoints import adverts


def main():
    try:
        phalanx.Runtime(workers=1, start_method="spawn")  # no main guard: its worker fails to start
    except phalanx.WorkerStartError:
        print("failed to start", flush=True)
    mine = [d for d, info, _ in adverts() if info.get("pid") == os.getpid()]
    print("left", json.dumps(mine), flush=True)


main()
"""


def test_a_runtime_that_fails_to_start_leaves_no_runtime_json(tmp_path: Path) -> None:
    """runtime.json is written while the first workers start: a start that fails removes it
    with its directory, so phalanx top never lists a runtime that never ran."""
    script = tmp_path / "failed_start.py"
    script.write_text(FAILED_START)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=T, env=env,
                          cwd=tmp_path)
    lines = proc.stdout.splitlines()
    assert "failed to start" in lines, proc.stdout + proc.stderr
    assert "left []" in lines, proc.stdout + proc.stderr
