"""Smoke test of the benchmark suite: ``python -m benchmarks --quick`` (and ``python -m
benchmarks.directives``, ``benchmarks.raw`` and ``benchmarks.restart`` at tiny sizes) runs and reports every
workload, the foundation figures and the Executor adapter's overhead.

Runs in the test process, which only starts the suite in a subprocess (with a
timeout) and reads the JSON it writes; the suite starts its own children and
workers and must leave none behind (the autouse leak check verifies it).
Marked ``slow`` (about 20-60 s) but part of the default run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: workloads run by phalanx and by Pool, PPE and loky: each must give numbers
TASK_WORKLOADS = ("W1", "W2", "W4", "W5", "W6", "W7")
#: many workers: phalanx, Pool and loky (not PPE)
W8_PEERS = ("pool", "loky")
#: the optional peers (Dask, ipyparallel, mpire) are left to their own test: they take long to start
CORE_RUNNERS = "phalanx,inline,executor,pool,ppe,loky,manager,ray"
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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_optional_peers_run_when_installed_and_are_skipped_otherwise(tmp_path: Path) -> None:
    """Dask, ipyparallel and mpire (the ``bench`` extra) in W2 at a tiny size; absent ones are named, not run."""
    from benchmarks.runners import PEER_RUNNERS, peers_present

    out = tmp_path / "peers.json"
    proc = run_module(["benchmarks", "--quick", "--repeats", "1", "--only", "W2", "--json", str(out)], timeout=240)
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["failed"] == 0
    present = peers_present()
    assert data["meta"]["peers_present"] == present
    status = data["workloads"]["W2"]["status"]
    for peer in PEER_RUNNERS:
        if present[peer]:
            assert status[peer] == "ok", (peer, data["workloads"]["W2"]["reasons"])
            assert data["workloads"]["W2"]["metrics"]["median_us"]["runners"][peer]["median"] > 0
        else:
            assert peer not in status
            assert "not installed (skipped): " in proc.stdout and peer in proc.stdout
    # Processes a peer leaves behind (a dask nanny or an ipyparallel engine slow to exit on a loaded
    # machine) are the peer's, reported and killed by the suite; phalanx must leave none.
    assert all(not run.get("leftovers") for run in data["runs"] if run["runner"] == "phalanx"), data["runs"]
