"""Multi-host figures: ``python -m benchmarks.multihost`` (as root, Linux).

Runs in the user's process, which builds a driver namespace and one worker
namespace joined by a veth pair (tests/netns.py), starts the driver there
(tests/netns_driver.py) and ``phalanx worker --connect`` with 2 workers in
the worker namespace, over tcp with CURVE; then, in the same run, the same
workload on a local 2-worker runtime over ipc. It prints tasks/s through
``map``, tasks/s of a submit loop, and the median and p99 round trip of
``submit(noop).result()``, with the ratio tcp+CURVE / ipc; then the
link-down scenario (a host's link taken down mid-job): the time from the link
going down to its tasks being redelivered, and to the job being done.

:func:`w8_remote` is W8's remote part for ``python -m benchmarks`` (it runs
in the ``run_one --remote`` child): 1 ms sleep tasks on hosts x workers
remote workers, the driver (tests/netns_driver.py ``w8``) timing them with
the same code as the local rows. Every namespace, veth end and process it
made is gone when it returns or raises; if its process is killed instead,
:func:`sweep` (called by the orchestrator after the child) removes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import netns  # noqa: E402
from remote_host import Keys, Lines, RemoteHost  # noqa: E402

if TYPE_CHECKING:
    from .workloads import Outcome

#: seconds the remote hosts get to join the driver (8 hosts start at once on a shared 2-core machine)
JOIN_TIMEOUT = 120.0
#: seconds the driver may take to time the tasks once the hosts have joined
RUN_TIMEOUT = 180.0
#: heartbeat timeout of driver and hosts in W8: long, so a loaded machine does not declare workers lost
W8_HEARTBEAT_TIMEOUT = 10.0


def _driver(prefix: list[str], args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([*prefix, sys.executable, str(TESTS / "netns_driver.py"), *args],
                            stdout=subprocess.PIPE, text=True, env=env)


def remote(keys: Keys, mode: str, extra: list[str], hosts_n: int, env: dict[str, str],
           down: bool = False) -> dict[str, object]:
    """Run netns_driver.py ``mode`` with ``hosts_n`` hosts of 2 workers; its JSON line.

    ``down``: pass the driver-side interface of the first host's link as ``--iface``.
    """
    with netns.Hosts(hosts_n) as hosts:
        iface = ["--iface", hosts.links[0][0]] if down else []
        drv = _driver(hosts.exec_prefix(hosts.driver),
                      [mode, "--server-key", keys.driver_secret, "--authorized-keys", str(keys.authorized),
                       "--workers", str(2 * hosts_n), *iface, *extra], env)
        assert drv.stdout is not None
        port = drv.stdout.readline().strip().rsplit(":", 1)[1]
        workers = [RemoteHost(f"tcp://{addr}:{port}", f"host-{i}", keys.worker_args(), netns=ns,
                              heartbeat_timeout=3.0, host_name=f"host-{i}")
                   for i, ((_, addr), ns) in enumerate(zip(hosts.links, hosts.workers))]
        try:
            line = drv.stdout.readline()
            drv.wait(timeout=300)
        finally:
            for w in workers:
                w.close()
            if drv.poll() is None:
                drv.kill()
            drv.wait()
            drv.stdout.close()
        return json.loads(line)  # type: ignore[no-any-return]


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def w8_remote(hosts_n: int, per_host: int, tasks: int) -> Outcome:
    """W8 on ``hosts_n`` namespace hosts of ``per_host`` workers over tcp+CURVE: an Outcome.

    Raises ``benchmarks.workloads.NotAvailable`` (saying why) where namespaces
    cannot be made, RuntimeError when the driver reports no figures.
    """
    from .workloads import NotAvailable

    why = netns.unavailable()
    if why:
        raise NotAvailable(f"skipped: {why} (remote hosts are network namespaces)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    workers = hosts_n * per_host
    with tempfile.TemporaryDirectory() as tmp, netns.Hosts(hosts_n) as hosts:
        keys = Keys(Path(tmp))
        drv = _driver(hosts.exec_prefix(hosts.driver),
                      ["w8", "--server-key", keys.driver_secret, "--authorized-keys", str(keys.authorized),
                       "--workers", str(workers), "--tasks", str(tasks),
                       "--heartbeat-timeout", str(W8_HEARTBEAT_TIMEOUT), "--join-timeout", str(JOIN_TIMEOUT)],
                      env)
        assert drv.stdout is not None
        lines = Lines(drv.stdout)
        remotes: list[RemoteHost] = []
        try:
            port = lines.readline(timeout=60).strip().rsplit(":", 1)[1]
            for i, ((_, addr), ns) in enumerate(zip(hosts.links, hosts.workers)):
                remotes.append(RemoteHost(f"tcp://{addr}:{port}", f"host-{i}", keys.worker_args(),
                                          workers=per_host, netns=ns, heartbeat_timeout=W8_HEARTBEAT_TIMEOUT,
                                          extra=["--import", "benchmarks.ops"], host_name=f"host-{i}", env=env))
            line = lines.readline(timeout=JOIN_TIMEOUT + RUN_TIMEOUT)
            drv.wait(timeout=60)
        finally:
            _stop(drv)
            for host in remotes:
                host.close()
            lines.join()
    # what the hosts said, for a run that failed (a host that could not import, was refused, ...)
    said = "; ".join(f"{h.name} exited {h.proc.returncode}: {h.err.strip()[-300:]}" for h in remotes
                     if h.proc.returncode)
    if not line:
        raise RuntimeError(f"the driver exited with status {drv.returncode} and no figures; {said}")
    result: dict[str, Any] = json.loads(line)
    if "error" in result:
        raise RuntimeError(f"the driver: {result['error']}; {said}")
    result["info"].update(hosts=hosts_n, workers_per_host=per_host, transport="tcp+CURVE")
    return {"metrics": result["metrics"], "info": result["info"]}


def sweep() -> list[str]:
    """Remove the namespaces (and what runs in them) of runs whose process is gone; their names."""
    if netns.unavailable():
        return []
    swept: list[str] = netns.sweep_stale()
    return swept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--trips", type=int, default=1000)
    args = parser.parse_args()
    why = netns.unavailable()
    if why:
        print(f"benchmarks.multihost: {why}", file=sys.stderr)
        return 1
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    bench = ["--tasks", str(args.tasks), "--trips", str(args.trips)]
    with tempfile.TemporaryDirectory() as tmp:
        keys = Keys(Path(tmp))
        tcp = remote(keys, "bench", bench, 1, env)
        local = _driver([], ["bench-local", *bench], env)
        assert local.stdout is not None
        ipc = json.loads(local.stdout.readline())
        local.wait(timeout=300)
        local.stdout.close()
        hosts_down = remote(keys, "link-down", [], 2, env, down=True)
    print(f"2 workers; {args.tasks} tiny tasks; {args.trips} round trips")
    print(f"{'metric':<22}{'tcp+CURVE (netns)':>20}{'ipc (local)':>14}{'ratio':>8}")
    for key in ("map_tasks_per_s", "submit_tasks_per_s", "rtt_median_us", "rtt_p99_us"):
        a, b = float(tcp[key]), float(ipc[key])  # type: ignore[arg-type]
        print(f"{key:<22}{a:>20.0f}{b:>14.0f}{a / b:>8.2f}")
    print("link down mid-job (2 hosts x 2 workers, heartbeat_timeout 1 s):", json.dumps(hosts_down))
    print(json.dumps({"tcp_curve": tcp, "ipc": ipc, "link_down": hosts_down}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
