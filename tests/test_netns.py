"""Real multi-host on one machine: a driver and two worker hosts in network namespaces.

Runs in the test process (as root), which builds the hosts (``netns.Hosts``:
a driver namespace and two worker namespaces, veth pairs, link-local
addresses), starts ``netns_driver.py`` in the driver namespace and one
``phalanx worker --connect --host-name ...`` per worker namespace, all over
tcp with CURVE. Namespaces share the machine's host name, so each host is
named: ``rt.inspect().hosts()`` must group the workers by those names. A
fifth of the way into a map of slow tasks the driver takes the link to the
first host down: the job must still complete with every result exactly once,
the lost host's tasks redelivered to the other one.

Clean-up is tested too: a scenario that fails on purpose once its processes
run leaves no namespace, veth or process behind, and namespaces a dead run
left are swept by the next one while a live run's are not. Timeouts use
pytest-timeout's ``signal`` method, which raises in the test so the
``with`` blocks clean up (the ``thread`` method would end the process on the
spot); every read of a child's output has its own deadline. Skipped, saying
why, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

import netns
from remote_host import TESTS, Keys, Lines, RemoteHost

_why = netns.unavailable()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(180, method="signal"),
    pytest.mark.skipif(_why is not None, reason=f"cannot make network namespaces: {_why}"),
]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))


def _start_driver(hosts: netns.Hosts, keys: Keys, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*hosts.exec_prefix(hosts.driver), sys.executable, str(TESTS / "netns_driver.py"), "link-down",
         "--server-key", keys.driver_secret, "--authorized-keys", str(keys.authorized), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )


def test_link_down_mid_job_every_result_exactly_once(tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    with netns.Hosts(2) as hosts:
        (down_iface, addr_a), (_, addr_b) = hosts.links
        driver = _start_driver(hosts, keys, "--workers", "4", "--iface", down_iface,
                               "--tasks", "400", "--delay", "0.02")
        assert driver.stdout is not None and driver.stderr is not None
        out, err = Lines(driver.stdout), Lines(driver.stderr)
        try:
            address = out.readline(timeout=60).strip()
            assert address.startswith("tcp://"), err.text()
            port = address.rsplit(":", 1)[1]
            with RemoteHost(f"tcp://{addr_a}:{port}", "host-a", keys.worker_args(), netns=hosts.workers[0],
                            heartbeat_timeout=3.0, host_name="host-a") as host_a, \
                 RemoteHost(f"tcp://{addr_b}:{port}", "host-b", keys.worker_args(), netns=hosts.workers[1],
                            heartbeat_timeout=3.0, host_name="host-b") as host_b:
                line = out.readline(timeout=120)
                assert driver.wait(timeout=60) == 0, err.text()
                result = json.loads(line)
                assert host_b.wait(timeout=30) == 0, host_b.err  # the driver shut down
                assert host_a.wait(timeout=30) == 4, host_a.err  # cut off: driver lost, workers stopped
        finally:
            if driver.poll() is None:
                driver.kill()
            driver.wait(timeout=10)
            out.join()
            err.join()
    print("link down mid-job:", json.dumps(result))
    assert "error" not in result, result
    assert result["ok"], result
    assert result["workers_lost"] == 2
    assert result["redelivered"] > 0
    assert set(result["by_host"]) == {"host-a", "host-b"}
    # Both namespaces have the machine's host name: only --host-name tells the hosts apart.
    grouped = result["inspect_hosts"]
    assert sorted(grouped) == ["host-a", "host-b"], grouped
    assert all(len(ids) == 2 for ids in grouped.values()), grouped
    assert all(i.startswith("host-a-") for i in grouped["host-a"]), grouped
    assert result["inspect_resolved"], result


def test_a_failing_scenario_leaves_no_namespace_veth_or_process(tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    driver: subprocess.Popen[str] | None = None
    host: RemoteHost | None = None
    inside: list[int] = []
    hosts = netns.Hosts(1)
    try:
        with pytest.raises(RuntimeError, match="on purpose"):
            with hosts:
                inodes = {netns.inode(ns) for ns in hosts.names}
                assert set(hosts.veths) == {f"phx{hosts.tag}d0", f"phx{hosts.tag}w0"}
                driver = _start_driver(hosts, keys, "--workers", "4")
                assert driver.stdout is not None
                out = Lines(driver.stdout)
                port = out.readline(timeout=60).strip().rsplit(":", 1)[1]
                (_, addr), = hosts.links
                # Neither process is stopped by this test: only Hosts' clean-up may end them.
                host = RemoteHost(f"tcp://{addr}:{port}", "doomed", keys.worker_args(), netns=hosts.workers[0],
                                  host_name="doomed")
                host.stderr.wait_for("joined", timeout=60)
                inside = [pid for ns in hosts.names for pid in netns.pids_in(ns)]
                assert driver.pid in inside and host.proc.pid in inside
                assert set(host.worker_pids()) <= set(inside) and len(host.worker_pids()) == 2
                raise RuntimeError("a netns scenario failing on purpose")
        assert not set(hosts.names) & set(netns.namespaces())
        assert netns.holders(inodes) == []  # no process keeps a deleted namespace (and its veths) alive
        assert not [link for link in netns.links() if link.startswith(f"phx{hosts.tag}")]
        alive = [pid for pid in inside if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"processes outlived their namespaces: {alive}"
    finally:
        hosts.close()
        if driver is not None:
            if driver.poll() is None:
                driver.kill()
            driver.wait(timeout=10)
            if driver.stderr is not None:
                driver.stderr.close()
        if host is not None:
            host.close()


def test_namespaces_of_a_dead_run_are_swept_and_a_live_runs_are_not() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = f"phx-{gone.pid}-{uuid.uuid4().hex[:6]}-d"
    live = f"phx-{os.getpid()}-{uuid.uuid4().hex[:6]}-d"
    leftover: subprocess.Popen[bytes] | None = None
    try:
        for ns in (dead, live):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        # What a killed run leaves: a process still running inside its namespace.
        leftover = subprocess.Popen(["ip", "netns", "exec", dead, sys.executable, "-c",
                                     "import time; time.sleep(120)"])
        inodes = {netns.inode(dead)}
        deadline = time.monotonic() + 30
        while leftover.pid not in netns.pids_in(dead):
            assert leftover.poll() is None and time.monotonic() < deadline, "the leftover never ran"
            time.sleep(0.02)
        with netns.Hosts(1) as hosts:
            existing = netns.namespaces()
            assert dead not in existing
            assert live in existing and hosts.driver in existing
        assert leftover.wait(timeout=10) != 0
        assert netns.holders(inodes) == []
    finally:
        if leftover is not None and leftover.poll() is None:
            leftover.kill()
            leftover.wait(timeout=10)
        for ns in (dead, live):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
