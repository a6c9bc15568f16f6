"""``Runtime(hosts=...)`` against real OpenSSH servers in network-namespace hosts.

Runs in the test process (as root), which builds the hosts (``netns.Hosts``),
starts Debian's ``sshd`` in each worker namespace with a key login it
generates (``ssh_hosts.SshHosts``), and runs ``launch_driver.py`` in the driver
namespace: that driver starts its hosts with one ``Runtime(hosts=...)`` line
and no key step. Checks, on the real processes:

* a job spreads over the three hosts; a host killed outright mid-job (every
  process in its namespace, sshd included) loses and duplicates nothing;
* the run's secrets are never on a command line or in an environment (every
  ``/proc/*/cmdline`` and ``environ`` while it runs) nor in any file written
  during the run; a host key that is not this run's is refused;
* after shutdown, and after the driver is SIGKILLed, no process of the run
  is left in any namespace (only the test's own sshd listeners);
* an unreachable host and a host without phalanx each give one line saying
  so, and ``min_hosts`` decides whether the runtime starts without them.

Skipped, saying why, where namespaces or sshd cannot be made.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import netns
import ssh_hosts
from launch_check import Driver, secrets_exposed

_why = ssh_hosts.unavailable()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(240, method="signal"),
    pytest.mark.skipif(_why is not None, reason=f"cannot make ssh hosts: {_why}"),
]


@pytest.fixture
def three() -> Iterator[tuple[netns.Hosts, ssh_hosts.SshHosts]]:
    with netns.Hosts(3) as hosts, ssh_hosts.SshHosts(hosts) as sshd:
        yield hosts, sshd


def options(sshd: ssh_hosts.SshHosts, **more: Any) -> dict[str, Any]:
    return dict(hosts=sshd.addresses, workers_per_host=2, ssh_config=sshd.ssh_config, **more)


def left_on_hosts(hosts: netns.Hosts, sshd: ssh_hosts.SshHosts, timeout: float) -> dict[str, list[str]]:
    """Processes of the run still in any namespace after ``timeout`` s (the test's sshd listeners excepted)."""
    deadline = time.monotonic() + timeout
    while True:
        left: dict[str, list[str]] = {}
        for i, ns in enumerate(hosts.names):
            keep = sshd.sshd_pids(i - 1) if i else set()
            for pid in set(netns.pids_in(ns)) - keep:
                try:
                    p = psutil.Process(pid)
                    if p.status() != psutil.STATUS_ZOMBIE:
                        left.setdefault(ns, []).append(f"{pid} {' '.join(p.cmdline())}")
                except psutil.Error:
                    continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_a_job_across_three_ssh_hosts_survives_a_killed_host_and_leaves_nothing(
    three: tuple[netns.Hosts, ssh_hosts.SshHosts], tmp_path: Path,
) -> None:
    hosts, sshd = three
    since = time.time() - 1
    driver = Driver(hosts.exec_prefix(hosts.driver), "run", options(sshd, heartbeat_timeout=2.0))
    try:
        ready = driver.event()
        assert ready["event"] == "ready", ready
        # One Runtime(hosts=...) line: three hosts named by their address, two workers each.
        assert sorted(ready["hosts"]) == sorted(sshd.addresses), ready["hosts"]
        assert all(len(ids) == 2 for ids in ready["hosts"].values()), ready["hosts"]
        assert ready["workers"] == 6
        assert secrets_exposed(ready["secrets"], since) == []

        # A key that is not this run's is refused, though it knows the address and the driver's key.
        stranger = tmp_path / "stranger"
        subprocess.run([sys.executable, "-m", "phalanx", "keygen", str(stranger)], check=True, capture_output=True)
        (tmp_path / "driver.key").write_text(
            f'metadata\ncurve\n    public-key = "{ready["server_public"]}"\n')
        intruder = subprocess.run(
            [*hosts.exec_prefix(hosts.workers[1]), sys.executable, "-m", "phalanx", "worker", "--connect",
             ready["address"][sshd.addresses[1]], "--key", f"{stranger}.key_secret", "--server-key",
             str(tmp_path / "driver.key"), "--connect-timeout", "20"],
            capture_output=True, text=True, timeout=60)
        assert intruder.returncode == 3, intruder.stderr

        driver.go()
        mid = driver.event()
        assert mid["event"] == "midjob", mid
        assert set(mid["spread"]) == {f"host{i}" for i in range(3)}, mid  # the job ran on every host
        doomed = netns.pids_in(hosts.workers[0])  # the whole host: sshd, its session, phalanx worker, workers
        assert len(doomed) >= 4, doomed
        netns._kill(doomed)
        driver.go()
        done = driver.event()
        assert done["values"] == [2 * x for x in range(300)]  # every result, exactly once
        assert done["workers_lost"] == 2 and done["redelivered"] > 0, done
        assert done["ended"] == [sshd.addresses[0]], done
        assert done["peers_refused"] >= 1
        assert driver.proc.wait(timeout=60) == 0, driver.err.text()
        failures = [line for line in driver.err.text().splitlines() if line.startswith("phalanx: host")]
        assert len(failures) == 1 and sshd.addresses[0] in failures[0] and "session ended" in failures[0], \
            driver.err.text()
        assert left_on_hosts(hosts, sshd, timeout=15) == {}
        assert secrets_exposed(ready["secrets"], since) == []
    finally:
        driver.close()
    print(f"3 ssh hosts ready in {ready['seconds']:.2f} s; shutdown {done['shutdown_seconds']:.2f} s")


def test_a_driver_killed_outright_leaves_nothing_on_any_host(three: tuple[netns.Hosts, ssh_hosts.SshHosts]) -> None:
    hosts, sshd = three
    since = time.time() - 1
    # Heartbeats would end the hosts only after 120 s: the sessions' end must do it.
    driver = Driver(hosts.exec_prefix(hosts.driver), "hold", options(sshd, heartbeat_timeout=120.0))
    try:
        ready = driver.event()
        assert ready["workers"] == 6, ready
        running = {ns: netns.pids_in(ns) for ns in hosts.workers}
        assert all(len(pids) >= 5 for pids in running.values()), running  # sshd x2, phalanx worker, 2 workers
        os.kill(driver.proc.pid, signal.SIGKILL)
        driver.proc.wait(timeout=10)
        # Its ssh clients see their stdin close, so do the hosts: every session and worker ends.
        assert left_on_hosts(hosts, sshd, timeout=30) == {}
        assert secrets_exposed(ready["secrets"], since) == []
    finally:
        driver.close()


def lines_about(text: str, host: str) -> list[str]:
    return [line for line in text.splitlines() if host in line]


@pytest.mark.parametrize("min_hosts", [1, 0])
def test_unreachable_host_and_host_without_phalanx_say_so_in_one_line(min_hosts: int) -> None:
    with netns.Hosts(2) as hosts, ssh_hosts.SshHosts(hosts, lacking=(1,)) as sshd:
        good, lacking = sshd.addresses
        nobody = good.rsplit(".", 1)[0] + ".3"  # on host 0's link, where no one answers
        driver = Driver(hosts.exec_prefix(hosts.driver), "start", dict(hosts=[good, nobody, lacking], workers_per_host=1,
                                              ssh_config=sshd.ssh_config, min_hosts=min_hosts))
        try:
            result = driver.event()
            assert driver.proc.wait(timeout=60) == 0, driver.err.text()
            err = driver.err.text()
            unreachable, missing = lines_about(err, nobody), lines_about(err, lacking)
            assert len(unreachable) == 1 and "cannot reach it over ssh" in unreachable[0], err
            assert len(missing) == 1 and "phalanx is not installed" in missing[0], err
            assert lines_about(err, good) == [], err
            if min_hosts == 1:  # starts with the host that could
                assert result == {"event": "started", "hosts": [good], "workers": 1, "where": ["host0"]}, result
            else:  # every host was needed
                assert result["event"] == "error" and result["type"] == "WorkerStartError", result
                assert "1 of 3 hosts started, 3 needed" in result["message"], result
                assert nobody in result["message"] and lacking in result["message"]
            assert left_on_hosts(hosts, sshd, timeout=15) == {}
        finally:
            driver.close()


def test_phalanx_run_starts_the_hosts_of_a_script(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import json, sys\n"
        "import phalanx\n"
        "import multihost_ops as ops\n"
        "if __name__ == '__main__':\n"
        "    with phalanx.Runtime() as rt:\n"
        "        print(json.dumps([sys.argv[1:], sorted({h for _, h in rt.map(ops.where, range(40))}),\n"
        "                          rt.n_workers]))\n"
        "        assert rt.submit(ops.say, 'hello').result(timeout=30).startswith('host')\n")
    with netns.Hosts(2) as hosts, ssh_hosts.SshHosts(hosts) as sshd:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
        done = subprocess.run(
            [*hosts.exec_prefix(hosts.driver), sys.executable, "-m", "phalanx", "run", "--hosts",
             ",".join(sshd.addresses), "--ssh-config", sshd.ssh_config, "--workers-per-host", "1",
             "--listen", "tcp://0.0.0.0:0",  # every interface: each host is told the address on its route
             str(script), "--flag", "x"],
            capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        first, *printed = done.stdout.splitlines()
        assert json.loads(first) == [["--flag", "x"], ["host0", "host1"], 2]
        # What a task prints on a host reaches the driver's stdout and stderr, prefixed with its worker id.
        assert len(printed) == 1 and re.fullmatch(r"\[169\.254\.1[01]\.2-\d+-\d+\] hello on host[01]", printed[0]), \
            done.stdout
        assert re.search(r"\] hello on host[01] \(stderr\)", done.stderr), done.stderr
        assert left_on_hosts(hosts, sshd, timeout=15) == {}


def test_a_missing_interpreter_says_so_in_one_line() -> None:
    with netns.Hosts(1) as hosts, ssh_hosts.SshHosts(hosts) as sshd:
        (host,) = sshd.addresses
        driver = Driver(hosts.exec_prefix(hosts.driver), "start",
                        dict(hosts=[host], ssh_config=sshd.ssh_config, remote_python="/nonexistent/python3"))
        try:
            result = driver.event()
            assert driver.proc.wait(timeout=60) == 0, driver.err.text()
            assert result["event"] == "error" and "0 of 1 hosts started" in result["message"], result
            said = lines_about(driver.err.text(), host)
            assert len(said) == 1 and "no interpreter /nonexistent/python3 there" in said[0], said
            assert left_on_hosts(hosts, sshd, timeout=15) == {}
        finally:
            driver.close()
