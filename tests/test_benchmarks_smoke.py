"""Smoke test of the benchmark suite: ``python -m benchmarks --quick`` (and ``python -m
benchmarks.directives``, ``benchmarks.raw`` and ``benchmarks.restart`` at tiny sizes) runs and reports every
workload, the foundation figures and the Executor adapter's overhead.

Runs in the test process, which only starts the suite in a subprocess (with a
timeout) and reads the JSON it writes; the suite starts its own children and
workers and must leave none behind (the autouse leak check verifies it).
Marked ``slow`` (about 20-60 s) but part of the default run.

The optional peers (Dask, ipyparallel, mpire: the ``bench`` extra, which CI does
not install) get tests of their own that skip the peers not installed: a quick
run of every workload each one claims (about 4.5 minutes with all three), and a
measurement child killed mid-way (as on a timeout) that must leave no process of
its peer, even those in sessions of their own.

W8's remote rows run phalanx with hosts made of network namespaces (as
root): the quick run includes them where namespaces can be made and must
say why it skipped them where they cannot (tested by hiding the ``ip``
command); a remote run killed mid-way must leave no namespace, veth end or
process once the orchestrator has swept after it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import netns
from marked import processes_marked

ROOT = Path(__file__).resolve().parent.parent

#: workloads run by phalanx and by Pool, PPE and loky: each must give numbers
TASK_WORKLOADS = ("W1", "W2", "W4", "W5", "W6", "W7")
#: many workers: phalanx, Pool and loky (not PPE), and the ceiling (Pool, one chunk per worker)
W8_PEERS = ("pool", "loky", "static")
#: the optional peers (Dask, ipyparallel, mpire) are left to tests of their own: they take long to start
CORE_RUNNERS = "phalanx,inline,executor,pool,ppe,loky,manager,ray,static"
#: the actor workload, compared with peers of its own (a BaseManager proxy, Ray), not Pool/PPE/loky
OWN_PEERS = ("W3",)
PEERS = ("pool", "ppe", "loky")


def run_module(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m <args>`` from the repository root; fails the test (with its output) unless it exits 0."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_benchmark_run_reports_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_module(["benchmarks", "--quick", "--repeats", "1", "--runners", CORE_RUNNERS, "--json", str(out)],
                      timeout=240)
    assert "Foundation figures" in proc.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["failed"] == 0
    assert data["meta"]["quick"] is True
    workloads = data["workloads"]
    for wid in TASK_WORKLOADS:
        assert wid in workloads, f"no entry for {wid}"
        entry = workloads[wid]
        assert entry["status"]["phalanx"] == "ok", (wid, entry["status"], entry["reasons"])
        for peer in PEERS:
            assert entry["status"][peer] == "ok", (wid, peer, entry["status"], entry["reasons"])
        for key, metric in entry["metrics"].items():
            for runner in ("phalanx", *PEERS):
                stats = metric["runners"].get(runner, {})
                if "na" in stats:
                    continue
                median = stats.get("median")
                assert median is not None, (wid, key, runner, stats)
                assert median > 0 if metric["better"] == "higher" else median >= 0, (wid, key, runner, stats)
    # W8 at 2 and 4 workers: throughput, share of the ideal and the driver's CPU per task, for each runner.
    w8 = workloads["W8"]
    for runner in ("phalanx", *W8_PEERS):
        assert w8["status"][runner] == "ok", (runner, w8["status"], w8["reasons"])
        for workers in (2, 4):
            for key in (f"tps_{workers}", f"ideal_{workers}", f"cpu_{workers}"):
                assert w8["metrics"][key]["runners"][runner]["median"] > 0, (key, runner)
    # ... and where the CPU went: the driver's threads and the workers, per task
    for run in data["runs"]:
        if run["workload"] == "W8" and run["runner"] == "phalanx":
            assert run["info"]["driver_thread_cpu_us_per_task"].get("MainThread", 0) > 0, run["info"]
            assert run["info"]["workers_cpu_us_per_task"] > 0, run["info"]
    # W8's remote rows: figures where namespaces can be made, else one line saying why not.
    why = netns.unavailable()
    remote = [run for run in data["runs"] if run.get("remote")]
    assert remote, "W8's remote part did not run"
    if why is None:
        for key in ("tps_remote", "ideal_remote", "cpu_remote"):
            assert w8["metrics"][key]["runners"]["phalanx"]["median"] > 0, (key, w8["metrics"][key])
        assert remote[0]["info"]["workers"] == 4 and remote[0]["info"]["transport"] == "tcp+CURVE", remote[0]
        # each remote child removed its own namespaces: nothing left for the orchestrator to sweep
        assert all(run["namespaces_swept"] == [] for run in remote), remote
        assert not [ns for ns in netns.namespaces() for run in remote if ns.startswith(f"phx-{run['pid']}-")]
    else:
        assert f"remote rows: skipped: {why}" in proc.stdout
    # W5 runs phalanx with and without shared memory in the same invocation.
    assert workloads["W5"]["status"]["inline"] == "ok", workloads["W5"]["reasons"]
    for wid in OWN_PEERS:
        assert wid in workloads, f"no entry for {wid}"
        assert workloads[wid]["status"]["phalanx"] == "ok", (wid, workloads[wid]["reasons"])
    assert all(not run.get("leftovers") for run in data["runs"]), "a runner left processes behind"
    # The foundation figures are present and computed from phalanx and PPE.
    figures = data["foundation"]
    assert len(figures) >= 3
    assert all(f["phalanx"] and f["ppe"] for f in figures)
    # The Executor adapter next to the Runtime it wraps (W1, W2), with its cost per task.
    for wid in ("W1", "W2"):
        assert workloads[wid]["status"]["executor"] == "ok", (wid, workloads[wid]["reasons"])
    assert "phalanx.Executor adapter vs phalanx.Runtime" in proc.stdout
    overhead = data["executor_overhead"]
    assert {row["figure"].rsplit("(", 1)[-1].rstrip(")") for row in overhead} >= {"W1a", "W1b2", "W2"}
    for row in overhead:
        assert row["executor"] and row["runtime"], row
        assert row["ratio"] > 0 and row["extra_us"] is not None, row


@pytest.mark.timeout(180)
def test_directives_benchmark_compares_one_job_with_pool_map_and_reduce(tmp_path: Path) -> None:
    """D1 at a tiny size: both runners in one invocation, equal results, both timings and their ratio."""
    out = tmp_path / "d1.json"
    proc = run_module(["benchmarks.directives", "--n", "3000", "--repeats", "1", "--json", str(out)], timeout=150)
    assert "ratio pool/phalanx" in proc.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["workload"] == "D1" and data["status"] == "ok" and data["n"] == 3000
    assert set(data["computations"]) == {"squares", "digits"}
    for name, entry in data["computations"].items():
        assert entry["results_equal"] is True, name
        assert entry["pool_median"] > 0 and entry["phalanx_median"] > 0, (name, entry)
        assert entry["ratio_pool_over_phalanx"] > 0, (name, entry)


@pytest.mark.timeout(120)
def test_raw_transport_ceilings_run() -> None:
    proc = run_module(["benchmarks.raw", "--n", "50", "--reps", "1"], timeout=100)
    assert "multiprocessing.Pipe median" in proc.stdout and "MB/s" in proc.stdout


@pytest.mark.timeout(120)
def test_hot_restart_benchmark_runs() -> None:
    """``benchmarks.restart`` at a tiny state: every move keeps the bytes, one figure is printed."""
    proc = run_module(["benchmarks.restart", "--mb", "0.25", "--repeats", "2"], timeout=100)
    assert "hot restart of an actor holding 0.25 MiB" in proc.stdout and "median" in proc.stdout


#: each optional peer (the ``bench`` extra) and the workloads it claims
PEER_WORKLOADS = {
    "dask": ("W1", "W2", "W4", "W5", "W6", "W8"),
    "ipyparallel": ("W1", "W2", "W4", "W5", "W6", "W8"),
    "mpire": ("W1", "W2", "W4", "W5", "W6", "W7", "W8"),
}
#: the workloads whose optional peers are sized by a probe, with the size labels each reports
SIZED = {"W1": ("(a)", "(b1)", "(b2)"), "W2": ("calls",), "W8": ("2 workers", "4 workers")}


def _installed_peers() -> list[str]:
    from benchmarks.runners import PEER_RUNNERS, peers_present

    present = peers_present()
    return [peer for peer in PEER_RUNNERS if present[peer]]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_optional_peers_run_every_workload_they_claim_when_installed(tmp_path: Path) -> None:
    """Dask, ipyparallel and mpire (the ``bench`` extra), quick sizes: every workload each one claims
    gives numbers, the sizes they ran are in the JSON and the table, none leaves a process behind;
    absent peers are named, not run. About 4.5 minutes here with all three installed (264 s, load average ~12)."""
    from benchmarks.runners import PEER_RUNNERS, peers_present
    from benchmarks.workloads import WORKLOADS

    out = tmp_path / "peers.json"
    proc = run_module(["benchmarks", "--quick", "--repeats", "1", "--runners", ",".join(PEER_RUNNERS),
                       "--json", str(out)], timeout=840)
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["failed"] == 0
    present = peers_present()
    assert data["meta"]["peers_present"] == present
    workloads = data["workloads"]
    for peer in PEER_RUNNERS:
        claimed = [wid for wid, w in WORKLOADS.items() if peer in w.runners]
        if not present[peer]:
            assert all(peer not in workloads.get(wid, {}).get("status", {}) for wid in claimed)
            assert f"{peer} absent (skipped)" in proc.stdout  # named in the header, not run
            continue
        assert claimed == list(PEER_WORKLOADS[peer]), (peer, claimed)
        for wid in claimed:
            entry = workloads[wid]
            assert entry["status"][peer] == "ok", (wid, peer, entry["reasons"])
            numbers = [m["runners"][peer]["median"] for m in entry["metrics"].values()
                       if "median" in m["runners"].get(peer, {})]
            assert numbers and all(v > 0 for v in numbers), (wid, peer, entry["metrics"])
        for wid, labels in SIZED.items():
            sizes = workloads[wid]["sizes"][peer]
            na = {key for key, m in workloads[wid]["metrics"].items() if "na" in m["runners"].get(peer, {})}
            expected = [label for label in labels if not (wid == "W1" and label == "(b2)" and na)]
            assert list(sizes) == expected, (wid, peer, sizes)
            assert all(k >= 1 for ks in sizes.values() for k in ks), (wid, peer, sizes)
        assert "tasks per measurement: " in proc.stdout and f"{peer} (a) " in proc.stdout
    assert all(not run.get("leftovers") for run in data["runs"]), \
        [(run["workload"], run["runner"], run["leftovers"]) for run in data["runs"] if run.get("leftovers")]


#: a long measurement of each peer (seconds at least), and what shows its workers are up: the processes
#: whose command line holds a marker, and how many
PEER_PROCESSES = {
    "dask": (["--workload", "W1"], "spawn_main", 2),  # the worker processes the nannies spawn
    "ipyparallel": (["--workload", "W1"], "ipyparallel.engine.nanny", 2),  # started last, by each engine
    "mpire": (["--workload", "W7", "--size", "1000000"], "run_one", 3),  # the child and its two forked workers
}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("peer", tuple(PEER_PROCESSES))
def test_a_peer_child_killed_by_the_timeout_leaves_no_process(peer: str, tmp_path: Path) -> None:
    """SIGKILL a peer's measurement child as the orchestrator does on a timeout, once its workers run:
    no process of the peer survives, not even those in sessions of their own (ipyparallel's controller,
    engines and nannies), which killing the child's process group alone left running."""
    if peer not in _installed_peers():
        pytest.skip(f"{peer} is not installed (pip install -e '.[bench]')")
    from benchmarks.__main__ import _kill_tree

    tag = f"{peer}-{os.getpid()}-{time.monotonic_ns()}"
    # the peers' files in the test's directory, as the orchestrator puts them in a scratch directory
    env = dict(os.environ, BENCH_LEAK_TAG=tag, IPYTHONDIR=str(tmp_path / "ipython"),
               DASK_TEMPORARY_DIRECTORY=str(tmp_path / "dask"),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    args, marker, count = PEER_PROCESSES[peer]
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.run_one", "--runner", peer, *args], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len([p for p in _tagged(tag) if marker in " ".join(_cmdline(p))]) < count:
            assert child.poll() is None, f"the {peer} child ended before its workers were seen"
            assert time.monotonic() < deadline, f"the {peer} workers never started"
            time.sleep(0.05)
        killed = _kill_tree(child.pid)
        child.wait(timeout=10)
        assert killed, "nothing was killed"
        deadline = time.monotonic() + 5
        while (alive := _tagged(tag)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive == [], f"{peer} processes outlived the killed child: {[_cmdline(p) for p in alive]}"
    finally:
        for proc in _tagged(tag):
            try:
                proc.kill()
            except psutil.Error:
                pass
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _tagged(tag: str) -> list[psutil.Process]:
    """Every live process (not a zombie) whose environment carries ``BENCH_LEAK_TAG=tag`` (inherited from the child)."""
    return processes_marked("BENCH_LEAK_TAG", tag)


@pytest.mark.timeout(180)
def test_w8_remote_rows_say_why_they_are_skipped_without_namespaces(tmp_path: Path) -> None:
    """Without the ip command (a PATH that lacks it) W8's local rows run and one line says why the remote ones did not."""
    out = tmp_path / "w8.json"
    env = dict(os.environ, PATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "W8", "--runners", "phalanx",
                           "--repeats", "1", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=150)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    reason = "skipped: the ip command (iproute2) is not installed (remote hosts are network namespaces)"
    assert f"remote rows: {reason}" in proc.stdout
    w8 = json.loads(out.read_text())["workloads"]["W8"]
    assert w8["remote_skipped"] == reason and w8["status"]["phalanx"] == "ok"
    assert w8["metrics"]["tps_2"]["runners"]["phalanx"]["median"] > 0
    assert w8["metrics"]["tps_remote"]["runners"] == {}


@pytest.mark.netns
@pytest.mark.timeout(180, method="signal")
@pytest.mark.skipif(netns.unavailable() is not None, reason=f"cannot make network namespaces: {netns.unavailable()}")
def test_a_remote_run_killed_midway_leaves_nothing_once_swept() -> None:
    """SIGKILL W8's remote child (its process group, as the orchestrator does on a timeout) once its
    hosts run: the orchestrator's sweep removes its namespaces, their veth ends and every process inside."""
    from benchmarks.__main__ import _sweep_namespaces

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.run_one", "--runner", "phalanx", "--workload", "W8",
                              "--remote", "--quick"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    mine: list[str] = []
    inside: list[int] = []
    try:
        # the driver namespace and both host namespaces each hold a process: the hosts are starting
        deadline = time.monotonic() + 120
        while len(mine) < 3 or not all(netns.pids_in(ns) for ns in mine):
            assert child.poll() is None, "the remote run ended before its hosts were seen"
            assert time.monotonic() < deadline, f"the hosts never started: {mine}"
            mine = [ns for ns in netns.namespaces() if ns.startswith(f"phx-{child.pid}-")]
            time.sleep(0.01)
        inodes = {netns.inode(ns) for ns in mine}
        tags = {ns.split("-")[2] for ns in mine}
        inside = [pid for ns in mine for pid in netns.pids_in(ns)]
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        swept = _sweep_namespaces()
        assert set(mine) <= set(swept), (mine, swept)
        assert not set(mine) & set(netns.namespaces())
        assert netns.holders(inodes) == []
        assert not [link for link in netns.links() for tag in tags if link.startswith(f"phx{tag}")]
        alive = [pid for pid in inside if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"processes outlived their namespaces: {alive}"
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
        netns.sweep_stale()


def test_peer_size_probes_only_optional_peers_and_bounds_their_measurement() -> None:
    """Phalanx and the core peers keep the full size without a probe; an optional peer gets as many
    tasks as its probed rate does in the target time, never fewer than the floor nor more than the full size."""
    from benchmarks.workloads import PEER_TARGET_S, PEER_TARGET_S_QUICK, PROBE_S, peer_size

    probes: list[int] = []

    def at(rate: float) -> Any:
        def run(k: int) -> float:
            probes.append(k)
            return k / rate
        return run

    for core in ("phalanx", "pool", "ppe", "loky", "executor"):
        assert peer_size(core, 20_000, 500, False, at(10.0)) == 20_000
    assert probes == []
    # 1,000 tasks/s: probes grow until one lasts PROBE_S, then ~4 s worth
    assert peer_size("dask", 20_000, 500, False, at(1000.0)) == int(1000 * PEER_TARGET_S)
    assert probes[-1] / 1000.0 >= PROBE_S and all(k / 1000.0 < PROBE_S for k in probes[:-1])
    assert peer_size("ipyparallel", 2_000, 50, True, at(1000.0)) == int(1000 * PEER_TARGET_S_QUICK)
    # fast enough for the full size: the full size; very slow: the floor
    assert peer_size("mpire", 20_000, 500, False, at(100_000.0)) == 20_000
    assert peer_size("dask", 20_000, 500, False, at(20.0)) == 500
    assert peer_size("dask", 300, 500, False, at(20.0)) == 300
