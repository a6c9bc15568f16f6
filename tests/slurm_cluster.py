"""A single-node Slurm cluster (Debian's slurm-wlm with munge) inside a network namespace, for tests.

Runs in the test process, as root. :class:`SlurmCluster` writes a munge key
and a ``slurm.conf`` into a private temp dir, then starts ``munged``,
``slurmctld`` and ``slurmd`` in the foreground inside the namespace it is
given (all their traffic stays on that namespace's loopback; its link to
a worker namespace gives it the non-loopback address without which
getaddrinfo's AI_ADDRCONFIG, and so slurmctld, finds no address), and waits
until the node is idle. The node is this machine's hostname, reached at
127.0.0.1, with 2 CPUs. ``env`` is what a Slurm client (``salloc``,
``srun``, ``scontrol``) needs to talk to it.

Invariant kept: **nothing outlives the run**: :meth:`SlurmCluster.close`
kills the daemons it started (the namespace's clean-up kills whatever else
runs inside, job steps included), and the temp dir is removed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

import netns

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")


def unavailable() -> str | None:
    """Why a Slurm cluster cannot be started here (None when it can)."""
    why = netns.unavailable()
    if why is not None:
        return why
    for tool in (*DAEMONS, shutil.which("salloc"), shutil.which("mungekey")):
        if tool is None or not os.path.exists(tool):
            return f"{tool or 'salloc'} is not installed (apt-get install slurm-wlm munge)"
    return None


class SlurmCluster:
    """munged + slurmctld + slurmd in namespace ``ns``; ``env`` for its clients."""

    def __init__(self, hosts: netns.Hosts) -> None:
        self.hosts = hosts
        self.ns = hosts.driver
        self.root = Path(tempfile.mkdtemp(prefix="phx-slurm-"))  # 0700
        self.node = socket.gethostname()
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))
        self.daemons: list[subprocess.Popen[bytes]] = []
        #: the daemons and the helpers they start for themselves
        self.daemon_pids: set[int] = set()
        #: runs a command in the namespace; unlike ``ip netns exec`` it keeps this /sys (slurmd needs its cgroups)
        self.prefix = ["nsenter", f"--net=/run/netns/{self.ns}"]

    def __enter__(self) -> SlurmCluster:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def log(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def _start(self) -> None:
        root = self.root
        root.chmod(0o711)  # munged wants every directory above its socket searchable; nothing is listable
        for d in ("state", "spool"):
            (root / d).mkdir()
        subprocess.run(["mungekey", "--create", "--keyfile", str(root / "munge.key")], check=True, capture_output=True)
        sock = root / "munge.sock"
        (root / "slurm.conf").write_text("\n".join([
            "ClusterName=phx",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={sock}",
            "CredType=cred/munge",
            "SlurmctldPort=6817",
            "SlurmdPort=6818",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
            "PartitionName=phx Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        prefix = self.prefix
        commands = [
            ["/usr/sbin/munged", "--foreground", f"--key-file={root / 'munge.key'}", f"--socket={sock}",
             f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
             f"--seed-file={root / 'munge.seed'}"],
            ["/usr/sbin/slurmctld", "-D", "-f", str(root / "slurm.conf")],
            ["/usr/sbin/slurmd", "-D", "-f", str(root / "slurm.conf")],
        ]
        for i, command in enumerate(commands):
            with open(root / f"daemon{i}.log", "wb") as out:
                self.daemons.append(subprocess.Popen([*prefix, *command], stdin=subprocess.DEVNULL, stdout=out,
                                                     stderr=subprocess.STDOUT, env=self.env))
            if i == 0:
                self._wait(lambda: sock.exists(), "munged")
        self._wait(self._idle, "the node to become idle")
        for proc in self.daemons:  # and their helpers (slurmctld's slurmscriptd), not job steps: none ran yet
            self.daemon_pids |= {proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))}

    def _idle(self) -> bool:
        out = subprocess.run([*self.prefix, "sinfo", "-h", "-o", "%t"], capture_output=True,
                             text=True, env=self.env).stdout
        return out.strip() == "idle"

    def _wait(self, ready: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args for p in self.daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"slurm: waiting for {what}: {'exited: ' + str(dead) if dead else 'timed out'}"
                                   f"\n{self.log()}")
            time.sleep(0.1)

    def close(self) -> None:
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
