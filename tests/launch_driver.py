"""A phalanx driver that starts its hosts (over ssh or srun), run inside a namespace of ``netns.Hosts``.

Runs as ``ip netns exec DRIVER_NS python launch_driver.py MODE OPTIONS_JSON``
(under ``salloc`` for Slurm), started by tests/test_ssh.py and
tests/test_slurm.py; OPTIONS_JSON are the Runtime's arguments. Talks JSON lines:
events on stdout, commands ("go") on stdin, so the test can act on the hosts
(look for secrets, kill one) at known points.

``run``: ``Runtime(hosts=...)``, report the start time and the run's secrets
(read from the runtime's private state, for the test's leak hunt only), run
a map across the hosts, then a map of slow tasks during which the test kills
one host; report every result, then shut down and report how long that took.
``serve``: start, report, run a map, shut down, report.
``hold``: start, report, then wait to be killed. ``start``: start with the
given options and report what started, or the error. ``time``: start and shut
down N times, reporting each start time.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from typing import Any

import phalanx

import multihost_ops as ops


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def wait_go() -> None:
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected go")


def secrets(rt: phalanx.Runtime) -> list[str]:
    launch = rt._launch
    assert launch is not None
    return [launch.keys.server[1].decode()] + [s.pair[1].decode() for s in launch.sessions]


def main() -> None:
    mode, raw = sys.argv[1], sys.argv[2]
    options: dict[str, Any] = json.loads(raw)
    if mode == "time":
        for _ in range(options.pop("repeat")):
            t0 = time.perf_counter()
            with phalanx.Runtime(**options) as rt:
                emit(event="ready", seconds=time.perf_counter() - t0, workers=rt.n_workers)
        return
    if mode == "start":
        try:
            with phalanx.Runtime(**options) as rt:
                emit(event="started", hosts=sorted(rt.inspect(timeout=10).hosts()), workers=rt.n_workers,
                     where=sorted({h for _, h in rt.map(ops.where, range(50))}))
        except phalanx.WorkerStartError as exc:
            emit(event="error", type=type(exc).__name__, message=str(exc))
        return
    t0 = time.perf_counter()
    rt = phalanx.Runtime(**options)
    started = time.perf_counter() - t0
    tree = rt.inspect(timeout=10)
    launch = rt._launch
    assert launch is not None
    emit(event="ready", seconds=started, workers=rt.n_workers, secrets=secrets(rt),
         hosts={h: sorted(w.id for w in ws) for h, ws in tree.hosts().items()},
         address={s.name: s.address for s in launch.sessions}, server_public=launch.keys.server[0].decode())
    if mode == "hold":
        time.sleep(600)
        return
    wait_go()
    if mode == "serve":
        got = list(rt.map(ops.where, range(300), chunksize=1))
        workers = sorted(w.id for w in rt.stats().workers)
        rt.shutdown()
        emit(event="done", values=[v for v, _ in got], by_host=Counter(h for _, h in got), workers=workers)
        return
    spread = Counter(h for _, h in rt.map(ops.where, range(600), chunksize=1))
    n = 300
    it = rt.map(ops.slow_where, range(n), [0.02] * n, chunksize=1)
    got = [next(it) for _ in range(n // 5)]
    emit(event="midjob", spread=spread)
    wait_go()  # the test killed a host meanwhile
    got += list(it)
    stats = rt.stats()
    ended = launch.ended()
    t0 = time.perf_counter()
    rt.shutdown()
    emit(event="done", values=[v for v, _ in got], by_host=Counter(h for _, h in got),
         workers_lost=stats.workers_lost, redelivered=stats.redelivered, peers_refused=stats.peers_refused,
         ended=ended, shutdown_seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    main()
