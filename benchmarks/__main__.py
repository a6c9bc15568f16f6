"""The orchestrator: ``python -m benchmarks [--quick] [--only W1,W2] [--repeats N] [--json PATH]``.

Runs in the user's process and does no measuring itself::

    for each workload, for each size, for r in range(repeats):
        for each runner (order rotated by r):
            python -m benchmarks.run_one --runner R --workload W ...   (fresh child)
            -> parse its BENCH-RESULT line, reap anything it left behind

Each measurement runs in a fresh child so one peer's start-up, threads,
memory and stray processes cannot affect the next; the files a peer writes
(ipyparallel's profile, dask's worker directories) go to a scratch directory
of the child's, removed after it. A child past its timeout is SIGKILLed with
every process under it, by pid (peers start daemons in sessions of their own,
out of its process group). This process makes itself
a *child subreaper* (Linux), so worker processes orphaned by a child are
re-parented here; any still alive 3 s after their child exited are reported
and killed by pid.

It also reports how much CPU processes outside the benchmark used meanwhile
(machine busy time minus its own tree's), since a concurrent workload on a
2-core machine skews every figure.

At the end it prints, per workload, the median (min-max) of every metric for
every runner and the ratios phalanx/peer (saying whether higher or lower is
better), the foundation figures, the overhead of ``phalanx.Executor`` over
the plain runtime (W1, W2), and the total wall time; ``--json`` writes every
raw number. The exit code is 1 if any measurement failed (a wrong
result, a crash, a timeout), else 0.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from .report import (
    adapter_overhead,
    aggregate,
    format_adapter_overhead,
    format_foundation,
    format_workload,
    foundation,
)
from .run_one import MARKER
from .runners import (OPTIONAL_PEERS, RUNNERS, WORKERS, available_runners, end_processes, kill_all, peer_available,
                      peers_present, ray_available)
from .workloads import WORKLOADS, Workload

#: the directory holding the ``benchmarks`` package (children run from here)
ROOT = Path(__file__).resolve().parent.parent
#: seconds a child may run
CHILD_TIMEOUT = 300.0
CHILD_TIMEOUT_QUICK = 90.0
#: seconds processes a child left behind get to exit on their own
LEFTOVER_GRACE = 3.0
#: a 1-minute load average above this before starting means the machine is not idle
LOAD_WARNING = 0.5


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="phalanx (and its phalanx.Executor adapter) against multiprocessing.Pool, "
        "ProcessPoolExecutor, loky (and Ray, Dask distributed, ipyparallel, mpire when installed), "
        f"{WORKERS} workers each, every measurement in a fresh child process.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per runner (default 3)")
    parser.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W2")
    parser.add_argument("--runners", default="", help=f"comma-separated subset of {','.join(RUNNERS)}")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write all raw numbers here")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per child measurement")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def _become_subreaper() -> bool:
    """Re-parent orphaned descendants to this process (Linux PR_SET_CHILD_SUBREAPER)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _busy_cpu() -> float:
    """Non-idle CPU seconds of the whole machine since boot."""
    t = psutil.cpu_times()
    return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)


def _own_cpu() -> float:
    """CPU seconds of this process and every descendant reaped so far (children, workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _reap_leftovers() -> list[str]:
    """Wait for descendants a finished child left behind; kill (by pid) those that stay."""
    me = psutil.Process()
    procs = me.children(recursive=True)
    if not procs:
        return []
    return end_processes(procs, wait=LEFTOVER_GRACE, then=LEFTOVER_GRACE)


def _kill_tree(pid: int) -> list[str]:
    """SIGKILL a child and every process under it, by pid; what was killed.

    Its process group is not enough: peers start daemons in sessions of their own
    (ipyparallel's controller and engines), which a killed child would orphan.
    """
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        tree = []
    killed = kill_all(tree)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return killed


def _sweep_namespaces() -> list[str]:
    """Namespaces left by remote children that are gone (removed now, with what ran inside)."""
    from .multihost import sweep

    return sweep()


def _run_child(workload: str, runner: str, size: int | None, quick: bool, timeout: float,
               remote: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.run_one", "--runner", runner, "--workload", workload]
    if size is not None:
        cmd += ["--size", str(size)]
    if quick:
        cmd.append("--quick")
    if remote:
        cmd.append("--remote")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    base: dict[str, Any] = {"workload": workload, "runner": runner, "size": size, "quick": quick}
    if remote:
        base["remote"] = True
    # the files the peers write (ipyparallel's profile and connection files, dask's worker
    # directories) go to a directory of this child's, removed after it even if it was killed
    scratch = tempfile.TemporaryDirectory(prefix="phalanx-bench-")
    env["IPYTHONDIR"] = os.path.join(scratch.name, "ipython")
    env["DASK_TEMPORARY_DIRECTORY"] = os.path.join(scratch.name, "dask")
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    base["pid"] = proc.pid
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        base["killed"] = _kill_tree(proc.pid)
        out, err = proc.communicate()
        base.update(status="error", error=f"timed out after {timeout:.0f} s", stderr=err[-4000:])
        return base
    finally:
        base["leftovers"] = _reap_leftovers()
        if remote:
            # a child killed before it could clean up leaves its namespaces: remove them now
            base["namespaces_swept"] = _sweep_namespaces()
        scratch.cleanup()
        base["wall_seconds"] = time.perf_counter() - started
    lines = [line for line in out.splitlines() if line.startswith(MARKER)]
    if not lines:
        base.update(status="error", error=f"exit code {proc.returncode}, no result line", stderr=err[-4000:])
        return base
    record: dict[str, Any] = json.loads(lines[-1][len(MARKER):])
    record.update(leftovers=base["leftovers"], wall_seconds=base["wall_seconds"], exit_code=proc.returncode,
                  pid=proc.pid)
    if remote:
        record["namespaces_swept"] = base["namespaces_swept"]
    if proc.returncode != 0 and record.get("status") != "error":
        record.update(status="error", error=f"exit code {proc.returncode}")
    if record.get("status") == "error":
        record["stderr"] = err[-4000:]
    return record


def _selected(only: str) -> list[Workload]:
    if not only:
        return list(WORKLOADS.values())
    ids = [w.strip().upper() for w in only.split(",") if w.strip()]
    unknown = [w for w in ids if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    return [WORKLOADS[w] for w in ids]


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("phalanx", "loky", "numpy", "zmq", "msgspec", "psutil"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            out[name] = None
    out["ray"] = "installed" if ray_available() else None
    for peer, module in OPTIONAL_PEERS.items():
        if peer == "ray":
            continue
        try:
            out[peer] = str(getattr(__import__(module), "__version__", "?"))
        except ImportError:
            out[peer] = None
    return out


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    workloads = _selected(args.only)
    chosen = {r.strip() for r in args.runners.split(",") if r.strip()}
    timeout = args.timeout or (CHILD_TIMEOUT_QUICK if args.quick else CHILD_TIMEOUT)
    subreaper = _become_subreaper()
    wall0 = time.perf_counter()
    busy0, own0 = _busy_cpu(), _own_cpu()
    meta: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "workers": WORKERS,
        "repeats": args.repeats,
        "quick": args.quick,
        "versions": _versions(),
        "peers_present": peers_present(),
        "phalanx_env": {k: v for k, v in os.environ.items() if k.startswith("PHALANX_")},
        "subreaper": subreaper,
        "loadavg_start": list(os.getloadavg()),
    }
    present = meta["peers_present"]
    peers_line = ", ".join(f"{p} {'present' if ok else 'absent (skipped)'}" for p, ok in present.items())
    print(
        f"phalanx benchmarks: {WORKERS} workers, {args.repeats} repeat(s){', quick sizes' if args.quick else ''}, "
        f"python {meta['python']}, {meta['cpus']} cpus; optional peers: {peers_line}",
        flush=True,
    )
    if meta["loadavg_start"][0] > LOAD_WARNING:
        print(f"WARNING: load average {meta['loadavg_start'][0]:.2f} at start: other processes compete "
              "for the cores and will skew the numbers", flush=True)
    records: list[dict[str, Any]] = []
    summaries: dict[str, Any] = {}
    sections: list[str] = []
    for workload in workloads:
        runners = [r for r in available_runners(workload.runners) if not chosen or r in chosen]
        if not runners:
            continue
        mine: list[dict[str, Any]] = []
        for size in workload.sizes(args.quick):
            for rep in range(args.repeats):
                shift = rep % len(runners)
                for runner in runners[shift:] + runners[:shift]:
                    record = _run_child(workload.id, runner, size, args.quick, timeout)
                    record["repeat"] = rep
                    mine.append(record)
                    status = record["status"]
                    detail = record.get("error") or record.get("reason") or ""
                    _progress(
                        f"  {workload.id} {runner:<8} size={size} repeat {rep + 1}/{args.repeats}: "
                        f"{status} ({record['wall_seconds']:.1f} s){' ' + detail if detail else ''}"
                    )
                    if record.get("leftovers"):
                        _progress(f"    WARNING: {runner} left processes behind (killed): {record['leftovers']}")
        if workload.remote is not None and "phalanx" in runners:
            for rep in range(args.repeats):
                record = _run_child(workload.id, "phalanx", None, args.quick, timeout, remote=True)
                record["repeat"] = rep
                mine.append(record)
                detail = record.get("error") or record.get("reason") or ""
                _progress(f"  {workload.id} phalanx  remote hosts repeat {rep + 1}/{args.repeats}: "
                          f"{record['status']} ({record['wall_seconds']:.1f} s){' ' + detail if detail else ''}")
                for key, what in (("leftovers", "processes behind (killed)"),
                                  ("namespaces_swept", "network namespaces behind (removed)")):
                    if record.get(key):
                        _progress(f"    WARNING: the remote run left {what}: {record[key]}")
                if record["status"] == "na":
                    break  # the reason will not change: one line says why
        records.extend(mine)
        summaries[workload.id] = aggregate(workload, args.quick, runners, mine)
        summaries[workload.id]["peers_absent"] = [r for r in workload.runners if r in OPTIONAL_PEERS
                                                  and not peer_available(r) and (not chosen or r in chosen)]
        sections.append(format_workload(workload, summaries[workload.id], args.quick, runners))
        print("\n" + sections[-1], flush=True)
    found = foundation(summaries)
    wall = time.perf_counter() - wall0
    meta["loadavg_end"] = list(os.getloadavg())
    print()
    adapter = adapter_overhead(summaries)
    if "W1" in summaries or "W2" in summaries:
        print(format_foundation(found))
        if any(row["executor"] is not None for row in adapter):
            print()
            print(format_adapter_overhead(adapter))
    failures = [r for r in records if r["status"] == "error"]
    leftovers = [r for r in records if r.get("leftovers")]
    if failures:
        print(f"\nFAILED: {len(failures)} measurement(s) failed:")
        for r in failures:
            print(f"  {r['workload']} {r['runner']} size={r['size']} repeat {r.get('repeat', 0) + 1}: {r.get('error')}")
            for line in (r.get("stderr") or "").strip().splitlines()[-8:]:
                print(f"      {line}")
    if leftovers:
        print(f"\nWARNING: {len(leftovers)} measurement(s) left processes behind (killed).")
    swept = [r for r in records if r.get("namespaces_swept")]
    if swept:
        print(f"\nWARNING: {len(swept)} remote measurement(s) left network namespaces behind (removed).")
    foreign = _busy_cpu() - busy0 - (_own_cpu() - own0)
    meta["foreign_cpu_seconds"] = foreign
    share = foreign / (wall * (os.cpu_count() or 1))
    print(f"\nCPU used by processes outside this benchmark during the run: {foreign:.1f} core-s "
          f"({share:.0%} of the machine){'  -> numbers are skewed by a concurrent workload' if share > 0.05 else ''}")
    print(f"Total wall time: {wall:.1f} s")
    if args.json is not None:
        payload = {
            "meta": meta,
            "wall_seconds": wall,
            "workloads": summaries,
            "foundation": found,
            "executor_overhead": adapter,
            "runs": records,
            "failed": len(failures),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"Raw numbers written to {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
