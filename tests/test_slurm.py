"""``Runtime(slurm=True)`` inside a real single-node Slurm allocation (slurm-wlm + munge).

Runs in the test process (as root): ``slurm_cluster.SlurmCluster`` starts
munged, slurmctld and slurmd inside a network namespace; ``launch_driver.py``
runs under ``salloc`` there and starts one ``phalanx worker`` per allocated
node with ``srun``, its keys on the step's stdin. Checks: the workers per
node follow the allocation's CPUs, a job runs on them, the run's secrets
appear in no command line, environment or file, and after shutdown, and
after the driver is SIGKILLed, no process of the run is left (only the
Slurm daemons). The ``srun`` and ``ssh`` command lines the launcher builds
are checked as data too, and so is the parsing of the allocation's
variables; those run everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import netns
import slurm_cluster
from launch_check import Driver, secrets_exposed
from phalanx.launch import _expand_counts, srun_command, ssh_command, worker_args
from phalanx.config import Config

_why = slurm_cluster.unavailable()


def left_in(hosts: netns.Hosts, slurm: slurm_cluster.SlurmCluster, timeout: float) -> list[str]:
    """Processes in the namespace other than the Slurm daemons, after up to ``timeout`` s."""
    keep = slurm.daemon_pids
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for pid in set(netns.pids_in(hosts.driver)) - keep:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {' '.join(p.cmdline())}")
            except psutil.Error:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.mark.netns
@pytest.mark.timeout(240, method="signal")
@pytest.mark.skipif(_why is not None, reason=f"cannot start a Slurm cluster: {_why}")
@pytest.mark.parametrize("how", ["shutdown", "driver SIGKILL"])
def test_slurm_allocation_runs_a_job_and_leaves_nothing(how: str) -> None:
    since = time.time() - 1
    with netns.Hosts(1) as hosts, slurm_cluster.SlurmCluster(hosts) as slurm:
        mode = "serve" if how == "shutdown" else "hold"
        driver = Driver([*slurm.prefix, "salloc", "--nodes=1", "--cpus-per-task=2", "--quiet"], mode,
                        {"slurm": True, "heartbeat_timeout": 120.0}, env=slurm.env)
        try:
            ready = driver.event()
            assert ready["event"] == "ready", ready
            assert ready["hosts"] == {slurm.node: ready["hosts"][slurm.node]}, ready
            assert ready["workers"] == 2, ready  # the allocation's CPUs on the node
            assert secrets_exposed(ready["secrets"], since) == []
            if how == "shutdown":
                driver.go()
                done = driver.event()
                assert done["values"] == [2 * x for x in range(300)]
                assert len(done["workers"]) == 2 and all(w.startswith(f"{slurm.node}-") for w in done["workers"])
                assert driver.proc.wait(timeout=60) == 0, driver.err.text()
            else:
                # The python under salloc, not salloc: the driver dies; its srun steps see stdin close.
                python = [p for p in psutil.Process(driver.proc.pid).children(recursive=True)
                          if "launch_driver.py" in " ".join(p.cmdline())]
                assert len(python) == 1, python
                os.kill(python[0].pid, signal.SIGKILL)
                driver.proc.wait(timeout=60)
            assert left_in(hosts, slurm, timeout=30) == [], slurm.log()
            assert secrets_exposed(ready["secrets"], since) == []
        finally:
            driver.close()


@pytest.mark.netns
@pytest.mark.timeout(240, method="signal")
@pytest.mark.skipif(_why is not None, reason=f"cannot start a Slurm cluster: {_why}")
def test_phalanx_slurm_runs_a_script_in_the_allocation(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import json, sys\n"
        "import phalanx\n"
        "import multihost_ops as ops\n"
        "if __name__ == '__main__':\n"
        "    with phalanx.Runtime() as rt:\n"
        "        print(json.dumps([sys.argv[1:], sorted(rt.inspect(timeout=10).hosts()), rt.n_workers,\n"
        "                          sum(v for v, _ in rt.map(ops.where, range(100)))]))\n")
    with netns.Hosts(1) as hosts, slurm_cluster.SlurmCluster(hosts) as slurm:
        env = dict(slurm.env, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
        done = subprocess.run([*slurm.prefix, "salloc", "--nodes=1", "--cpus-per-task=2", "--quiet",
                               sys.executable, "-m", "phalanx", "slurm", "--workers-per-host", "1", str(script), "a"],
                              capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr + slurm.log()
        assert json.loads(done.stdout) == [["a"], [slurm.node], 1, 9900]
        assert left_in(hosts, slurm, timeout=30) == []


def test_srun_step_per_node_carries_the_keys_on_stdin_only() -> None:
    config = Config.load(slurm=True, heartbeat_timeout=3.0)
    remote = ["/opt/py", *worker_args(config, "tcp://10.0.0.1:5555", "node7", 8)]
    argv = srun_command("node7", 8, remote)
    assert argv[:argv.index("/opt/py")] == [
        "srun", "--nodes=1", "--ntasks=1", "--nodelist=node7", "--cpus-per-task=8", "--overlap",
        "--kill-on-bad-exit=1", "--job-name=phalanx-worker"]
    assert argv[argv.index("/opt/py"):] == [
        "/opt/py", "-m", "phalanx", "worker", "--connect", "tcp://10.0.0.1:5555", "--keys-from-stdin",
        "--host-name", "node7", "--workers", "8", "--heartbeat-timeout", "3.0"]
    assert not any("key" in a and a != "--keys-from-stdin" for a in argv)


def test_ssh_command_runs_the_worker_without_a_terminal_or_a_password_prompt() -> None:
    argv = ssh_command("alice@box:2222", ["/opt/my env/python", "-m", "phalanx", "worker"], "/tmp/cfg")
    assert argv == ["ssh", "-T", "-F", "/tmp/cfg", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                    "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-p", "2222", "alice@box",
                    "--", "exec '/opt/my env/python' -m phalanx worker"]
    assert ssh_command("[::1]:22", ["py"])[-4:] == ["22", "::1", "--", "exec py"]
    assert ssh_command("box", ["py"])[-3:] == ["box", "--", "exec py"]


@pytest.mark.parametrize("text, counts", [("4", [4]), ("4(x2),2", [4, 4, 2]), ("36(x3)", [36, 36, 36])])
def test_allocation_cpus_per_node(text: str, counts: list[int]) -> None:
    assert _expand_counts(text) == counts


@pytest.mark.parametrize("kwargs, says", [
    (dict(hosts=["a", "b"], slurm=True), "not both"),
    (dict(hosts=["a", "a"]), "named twice"),
    (dict(hosts=["a"], min_hosts=2), "more than the 1 hosts"),
    (dict(hosts=["-oProxyCommand=x"]), "is not a host"),
    (dict(hosts=["a"], insecure=True), "always uses CURVE"),
])
def test_bad_host_options_are_refused(kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Config.load(**kwargs)


def test_slurm_outside_an_allocation_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import phalanx

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(phalanx.WorkerStartError, match="needs a Slurm allocation"):
        phalanx.Runtime(slurm=True)
