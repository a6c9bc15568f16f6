"""Real OpenSSH servers in network-namespace hosts, for the ``Runtime(hosts=...)`` tests and docs.

Runs in the test process, as root, around ``netns.Hosts``. :class:`SshHosts`
generates (in a private temp dir) a client key, one host key per host, an
``authorized_keys`` file, a ``known_hosts`` file and an ``ssh_config`` for
the client, then starts Debian's ``sshd -D`` inside each worker namespace,
listening on that host's address only, with key login for root and nothing
else (no password, no PAM). ``lacking`` names hosts where phalanx is not
installed: their sshd runs in a mount namespace of its own in which the
venv's site-packages is an empty directory (the interpreter is there,
phalanx is not).

Invariant kept: **nothing outlives the run**: :meth:`SshHosts.close` stops
every sshd it started (``netns.Hosts`` then kills whatever else is inside),
and the temp dir is removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import netns

TESTS = Path(__file__).resolve().parent


def unavailable() -> str | None:
    """Why sshd hosts cannot be made here (None when they can)."""
    why = netns.unavailable()
    if why is not None:
        return why
    for tool in ("/usr/sbin/sshd", shutil.which("ssh"), shutil.which("ssh-keygen"), shutil.which("unshare")):
        if tool is None or not os.path.exists(tool):
            return f"{tool or 'ssh'} is not installed (apt-get install openssh-server)"
    return None


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)], check=True,
                   capture_output=True)
    return path.with_suffix(".pub").read_text().strip()


class SshHosts:
    """sshd in each worker namespace of ``hosts``; ``ssh_config`` logs in to them as root."""

    def __init__(self, hosts: netns.Hosts, lacking: tuple[int, ...] = (), pythonpath: tuple[str, ...] = ()) -> None:
        self.hosts = hosts
        self.lacking = lacking
        #: more directories on the hosts' PYTHONPATH (a docs example's modules)
        self.pythonpath = pythonpath
        #: names ``ssh_config`` gives the hosts (``host1`` is the first worker namespace)
        self.names = [f"host{i + 1}" for i in range(len(hosts.workers))]
        self.root = Path(tempfile.mkdtemp(prefix="phx-ssh-"))  # 0700
        #: the address of each worker namespace (sshd listens there, port 22)
        self.addresses = [addr.rsplit(".", 1)[0] + ".2" for _, addr in hosts.links]
        self.ssh_config = str(self.root / "ssh_config")
        self.sshd: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> SshHosts:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        root = self.root
        client = _keygen(root / "client")
        (root / "authorized_keys").write_text(client + "\n")
        known = []
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        empty = root / "empty"
        empty.mkdir()
        site = sysconfig.get_paths()["purelib"]
        # (not a directory holding phalanx itself: the hosts get it from the venv, or lack it)
        env_path = os.pathsep.join([*self.pythonpath, str(TESTS), *(
            p for p in sys.path if p and p != site and not os.path.isdir(os.path.join(p, "phalanx")))])
        for i, (ns, addr) in enumerate(zip(self.hosts.workers, self.addresses)):
            host_key = _keygen(root / f"host{i}")
            known.append(f"{addr} {host_key}")
            config = root / f"sshd{i}_config"
            config.write_text("\n".join([
                f"ListenAddress {addr}:22",
                f"HostKey {root / f'host{i}'}",
                f"PidFile {root / f'sshd{i}.pid'}",
                f"AuthorizedKeysFile {root / 'authorized_keys'}",
                "StrictModes no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "X11Forwarding no",
                "AllowTcpForwarding no",
                # The operations the tests send live in tests/ (and PHX_HOST names the host in results).
                f"SetEnv PYTHONPATH={env_path} PHX_HOST=host{i}",
                "LogLevel ERROR",
                "",
            ]))
            sshd = ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)]
            if i in self.lacking:  # the interpreter is there, its site-packages (phalanx) is not
                sshd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(empty), site, *sshd]
            with open(root / f"sshd{i}.log", "wb") as log:
                self.sshd.append(subprocess.Popen([*self.hosts.exec_prefix(ns), *sshd], stdin=subprocess.DEVNULL,
                                                  stderr=log))
        (root / "known_hosts").write_text("\n".join(known) + "\n")
        aliases = [f"Host {name}\n  HostName {addr}" for name, addr in zip(self.names, self.addresses)]
        Path(self.ssh_config).write_text("\n".join([
            *aliases,
            "Host *",
            "  User root",
            f"  IdentityFile {root / 'client'}",
            "  IdentitiesOnly yes",
            "  IdentityAgent none",
            f"  UserKnownHostsFile {root / 'known_hosts'}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  LogLevel ERROR",
            "",
        ]))
        deadline = time.monotonic() + 30
        for i, (ns, addr) in enumerate(zip(self.hosts.workers, self.addresses)):
            while f"{addr}:22" not in subprocess.run([*self.hosts.exec_prefix(ns), "ss", "-ltnH"],
                                                     capture_output=True, text=True).stdout:
                if self.sshd[i].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd {i} did not start: {(root / f'sshd{i}.log').read_text()}")
                time.sleep(0.05)

    def sshd_pids(self, i: int) -> set[int]:
        """The listening sshd of host ``i`` (and the unshare/sh in front of it, replaced by exec)."""
        return {self.sshd[i].pid}

    def close(self) -> None:
        for proc in self.sshd:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
