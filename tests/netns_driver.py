"""A phalanx driver run inside the driver namespace of ``netns.Hosts``.

Runs as ``ip netns exec DRIVER_NS python netns_driver.py MODE ...``, started
by tests/test_netns.py or benchmarks/multihost.py; prints its address first,
then one JSON line with what it measured.

``link-down``: wait for the remote workers, report how ``rt.inspect()``
groups them by host, run a map of slow tasks, take the link to one host down
(``ip link set IFACE down``, inside this namespace) a fifth of the way in,
and check that every result arrives exactly once; reports when the lost
host's tasks were redelivered.

``bench``: tasks/s of tiny tasks through ``map`` and the median round trip of
``submit(noop).result()`` against the remote workers.

``w8``: the benchmark suite's W8 on the remote workers (hosts started with
``--import benchmarks.ops``): ``--tasks`` sleep(1 ms) tasks, one message
each, timed by the same function as W8's local rows
(``benchmarks.workloads.measure_w8``); prints its outcome (metrics and info).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time
from collections import Counter

import phalanx

import multihost_ops as ops


def link_down(rt: phalanx.Runtime, iface: str, n: int, delay: float) -> dict[str, object]:
    tree = rt.inspect(timeout=10)
    grouped = {host: sorted(w.id for w in workers) for host, workers in tree.hosts().items()}
    it = rt.map(ops.slow_where, range(n), [delay] * n, chunksize=1)
    got = [next(it) for _ in range(n // 5)]
    before = rt.stats()
    down_at = time.monotonic()
    subprocess.run(["ip", "link", "set", iface, "down"], check=True)
    lost_at: list[float] = []

    def watch() -> None:
        while rt.stats().workers_lost < 2 and time.monotonic() - down_at < 60:
            time.sleep(0.005)
        lost_at.append(time.monotonic())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    got += list(it)
    wall = time.monotonic() - down_at
    watcher.join(65)
    after = rt.stats()
    values = [v for v, _ in got]
    return {
        "ok": values == [2 * x for x in range(n)],
        "tasks": n,
        "by_host": dict(Counter(h for _, h in got)),
        "workers_lost": after.workers_lost,
        "redelivered": after.redelivered - before.redelivered,
        "duplicates_dropped": after.duplicates_dropped,
        "late_results_dropped": after.late_results_dropped,
        "down_to_redelivered_s": round(lost_at[0] - down_at, 3) if lost_at else None,
        "down_to_done_s": round(wall, 3),
        "inspect_hosts": grouped,
        "inspect_resolved": all(w.resolved for w in tree.workers),
    }


def bench(rt: phalanx.Runtime, tasks: int, trips: int) -> dict[str, object]:
    out: dict[str, object] = {}
    list(rt.map(ops.where, range(1000)))  # warm up
    t0 = time.perf_counter()
    values = list(rt.map(ops.where, range(tasks)))
    out["map_tasks_per_s"] = round(tasks / (time.perf_counter() - t0))
    assert [v for v, _ in values] == [2 * x for x in range(tasks)]
    t0 = time.perf_counter()
    futures = [rt.submit(ops.noop) for _ in range(tasks // 4)]
    for f in futures:
        f.result(timeout=60)
    out["submit_tasks_per_s"] = round(len(futures) / (time.perf_counter() - t0))
    times = []
    for _ in range(trips):
        t0 = time.perf_counter()
        rt.submit(ops.noop).result(timeout=30)
        times.append(time.perf_counter() - t0)
    out["rtt_median_us"] = round(statistics.median(times) * 1e6)
    out["rtt_p99_us"] = round(sorted(times)[int(len(times) * 0.99) - 1] * 1e6)
    return out


def w8(rt: phalanx.Runtime, workers: int, tasks: int) -> dict[str, object]:
    from benchmarks.runners import PhalanxRunner
    from benchmarks.workloads import measure_w8

    runner = PhalanxRunner(workers)
    runner.rt = rt  # the runner's submit_gather on this runtime: the local rows' very code
    outcome = measure_w8(runner.submit_gather, workers, tasks, "remote", runner.worker_pids)
    outcome["info"]["workers_lost"] = rt.stats().workers_lost
    return dict(outcome)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["link-down", "bench", "bench-local", "w8"])
    parser.add_argument("--server-key")
    parser.add_argument("--authorized-keys")
    parser.add_argument("--workers", type=int, default=4, help="remote workers to wait for")
    parser.add_argument("--iface", help="link-down: the interface to take down")
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--trips", type=int, default=1000)
    parser.add_argument("--heartbeat-timeout", type=float, default=1.0)
    parser.add_argument("--join-timeout", type=float, default=60.0, help="seconds the workers get to join")
    args = parser.parse_args()
    if args.mode == "bench-local":
        with phalanx.Runtime(workers=2) as rt:
            print(json.dumps(bench(rt, args.tasks, args.trips)), flush=True)
        return
    with phalanx.Runtime(workers=0, listen="tcp://0.0.0.0:5555", server_key=args.server_key,
                         authorized_keys=args.authorized_keys, heartbeat_timeout=args.heartbeat_timeout) as rt:
        print(rt.address, flush=True)
        if rt.wait_for_workers(args.workers, timeout=args.join_timeout) < args.workers:
            print(json.dumps({"error": f"only {len(rt.stats().workers)} workers joined"}), flush=True)
            return
        if args.mode == "link-down":
            result = link_down(rt, args.iface, args.tasks, args.delay)
        elif args.mode == "w8":
            result = w8(rt, args.workers, args.tasks)
        else:
            result = bench(rt, args.tasks, args.trips)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
