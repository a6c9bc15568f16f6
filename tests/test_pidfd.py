"""No process is signalled by mistake: workers are signalled through pidfds, never by a pid
that may have been reaped and reused (docs/faults.md).

Runs in the test process, which starts driver scripts (tests/pid_reuse_driver.py) as
pid 1 of new pid namespaces (``unshare``, as root) to give a stranger a chosen pid, and
real runtimes of its own (the descriptor count over many worker replacements).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _unshare_refusal() -> str | None:
    """Why a new pid namespace cannot be made here (None: it can)."""
    if not sys.platform.startswith("linux"):
        return "pid namespaces are Linux's"
    if shutil.which("unshare") is None:
        return "no unshare command"
    if os.geteuid() != 0:
        return "unshare --pid and writing ns_last_pid need root"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare --pid is not permitted here: {probe.stderr.decode(errors='replace').strip()}"
    return None


_REFUSAL = _unshare_refusal()
needs_pidns = pytest.mark.skipif(_REFUSAL is not None, reason=str(_REFUSAL))


def _run_in_pidns(*args: str) -> dict[str, int]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    # unshare's child is pid 1 of the namespace: when it ends, the kernel kills whatever is left there.
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                           str(TESTS / "pid_reuse_driver.py"), *args],
                          env=env, capture_output=True, timeout=90, stdin=subprocess.DEVNULL)
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, out + done.stderr.decode(errors="replace")
    result: dict[str, int] = json.loads(out.strip().splitlines()[-1])
    return result


@needs_pidns
@pytest.mark.parametrize("method", ["phalanx", "forkserver", "fork", "spawn"])
@pytest.mark.parametrize("path", ["kill", "stop", "leave"])
def test_a_stranger_that_took_a_reaped_workers_pid_is_never_signalled(method: str, path: str) -> None:
    """A worker exits and is reaped before the driver heard of it; another process takes
    exactly its pid; the driver's kill, stop and leave paths aim at the worker: the
    stranger gets nothing (it dies of the SIGVTALRM the test sends it last)."""
    got = _run_in_pidns(method, path)
    assert got["stranger"] == got["pid"], got  # the attack took place
    assert got["status"] == -signal.SIGVTALRM, f"the driver signalled a stranger: {got}"


@needs_pidns
def test_the_harness_never_kills_a_stranger_that_took_a_workers_pid() -> None:
    """phalanx.testing's kill_child, given a worker's old pid that a child of the driver
    (not a worker) took meanwhile, leaves that child alone."""
    got = _run_in_pidns("phalanx", "harness")
    assert got["stranger"] == got["pid"], got
    assert got["status"] == -signal.SIGVTALRM, f"the harness killed a stranger: {got}"


def _pidfds() -> int:
    """This process's open pidfds."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[pidfd]"
        except OSError:
            pass
    return count


def _replace_workers(method: str, total: int, batch: int) -> tuple[int, int, int]:
    """Start ``total`` workers ``batch`` at a time through one supervisor, each ending at
    once (the driver closes its ends of their pipes), waiting for every exit report.
    (descriptors after the first batch, pidfds seen while a batch ran, descriptors after
    the last: the first batch may open what stays, such as multiprocessing's fork server's)."""
    import threading

    from phalanx.supervisor import Supervisor
    from phalanx.transport.endpoints import local_endpoints
    from phalanx.worker import WorkerSpec

    exited = threading.Semaphore(0)
    sup = Supervisor(method, lambda wid, code: exited.release())
    endpoints = local_endpoints()
    try:
        sup.start()
        before = 0
        seen = 0
        for first in range(0, total, batch):
            specs = [WorkerSpec(worker_id=f"w{i}", endpoints=endpoints, credits=1, parent_pid=os.getpid(),
                                prefix_output=False) for i in range(first, first + batch)]
            started = sup.spawn_piped_many(specs)
            seen = max(seen, _pidfds())
            for one in started:
                assert not isinstance(one, BaseException), one
                _, pipe, control = one
                pipe.close()  # the worker sees its driver gone and ends
                control.close()
            for _ in specs:
                assert exited.acquire(timeout=60), "a worker's exit was never reported"
            before = before or len(os.listdir("/proc/self/fd"))
        after = len(os.listdir("/proc/self/fd"))
    finally:
        sup.stop(5.0)
        endpoints.remove()
    return before, seen, after


@pytest.mark.timeout(300)  # hundreds of worker starts: a minute or more on a loaded 2-core machine
@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfds on this platform")
@pytest.mark.parametrize(("method", "total", "batch"), [("phalanx", 500, 50), ("forkserver", 20, 5)])
def test_no_pidfd_is_left_open_over_hundreds_of_worker_replacements(method: str, total: int, batch: int) -> None:
    """Every worker gets a pidfd; each is closed when its worker's exit is reported."""
    before, seen, after = _replace_workers(method, total, batch)
    assert seen >= batch  # the workers of a batch were held by pidfds
    assert _pidfds() == 0
    assert after == before


def _pidfds_of(pid: int) -> int:
    """Process ``pid``'s open pidfds."""
    return len(_pidfd_targets(pid))


def _pidfd_targets(pid: int) -> list[int]:
    """The processes process ``pid``'s open pidfds name (their fdinfo's ``Pid:``)."""
    targets: list[int] = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[pidfd]":
                continue
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # closed meanwhile
        targets.append(int(fields.get("Pid", "0").strip()))
    return targets


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfds on this platform")
@pytest.mark.parametrize("first", ["forkserver", "phalanx"])
def test_a_fork_server_and_its_workers_hold_no_other_runtimes_pidfds(first: str) -> None:
    """A runtime started while another one runs (whose workers the driver holds by pidfds,
    opened by multiprocessing's start or received from a fork server): its fork server
    and its workers hold no pidfd, nor does a process one of its tasks starts."""
    import phalanx

    with phalanx.Runtime(workers=2, start_method=first) as other:
        other.wait_for_workers(2, timeout=60)
        assert _pidfds() >= 2  # the driver holds the other runtime's workers by pidfds
        with phalanx.Runtime(workers=2) as rt:
            rt.wait_for_workers(2, timeout=60)
            server = rt._driver._supervisor._server
            assert server is not None
            workers = list(rt.worker_pids().values())
            # The server may still hold, for a moment after its Ready, the pidfd it opened
            # for a worker of its own to send to the driver; never one of another runtime's.
            assert set(_pidfd_targets(server.pid)) <= set(workers)
            assert {pid: _pidfds_of(pid) for pid in workers} == dict.fromkeys(workers, 0)
    assert _pidfds() == 0


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfds on this platform")
def test_a_pidfd_dropped_without_close_is_closed_and_no_fork_server_inherits_it() -> None:
    """A Pidfd nobody holds any more can signal nothing: its descriptor is closed with it,
    not left open in the driver (where the next fork server, which closes only the pidfds
    still held, would inherit it)."""
    import gc

    import phalanx
    from phalanx.forkserver import Pidfd

    child = subprocess.Popen(["sleep", "30"])
    try:
        dropped = Pidfd.open(child.pid)
        assert _pidfds() == 1
        del dropped
        gc.collect()
        assert _pidfds() == 0
        with phalanx.Runtime(workers=1) as rt:
            rt.wait_for_workers(1, timeout=60)
            server = rt._driver._supervisor._server
            assert server is not None
            assert child.pid not in _pidfd_targets(server.pid)
    finally:
        child.kill()
        child.wait(timeout=30)
