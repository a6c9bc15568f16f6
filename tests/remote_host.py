"""Test helpers: key files and ``phalanx worker`` processes standing for remote hosts.

Runs in the test (driver) process. :class:`RemoteHost` starts ``phalanx
worker --connect ...`` as a subprocess (optionally inside a network
namespace, through ``ip netns exec``) and, when closed, stops it with SIGTERM
and then kills whatever is left of its process tree, by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

TESTS = Path(__file__).resolve().parent


class Keys:
    """A driver key pair, an authorized host key pair and an unauthorized one, in ``root``."""

    def __init__(self, root: Path) -> None:
        from phalanx.transport import keys

        self.root = root
        self.authorized = root / "authorized"
        self.authorized.mkdir(parents=True, exist_ok=True)
        _, self.driver_secret = keys.generate(str(root), "driver")
        self.driver_public = str(root / "driver.key")
        _, self.host_secret = keys.generate(str(self.authorized), "host1")
        _, self.stranger_secret = keys.generate(str(root), "stranger")

    def runtime_kwargs(self) -> dict[str, Any]:
        return {"server_key": self.driver_secret, "authorized_keys": str(self.authorized)}

    def worker_args(self) -> list[str]:
        return ["--key", self.host_secret, "--server-key", self.driver_public]


class RemoteHost:
    """One ``phalanx worker`` process (a "host") joining the runtime at ``address``."""

    def __init__(
        self,
        address: str,
        name: str,
        args: list[str],
        workers: int = 2,
        netns: str | None = None,
        heartbeat_timeout: float = 10.0,
        extra: list[str] | None = None,
        host_name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``env``: the environment of ``phalanx worker`` (default: this one, PYTHONPATH
        the tests and this ``sys.path``); ``PHX_HOST`` is set to ``name`` either way."""
        if env is None:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
        env = dict(env, PHX_HOST=name)
        cmd = [sys.executable, "-m", "phalanx", "worker", "--connect", address, "--workers", str(workers),
               "--import", "multihost_ops", "--heartbeat-timeout", str(heartbeat_timeout),
               "--heartbeat-interval", "0.2", "--connect-timeout", "20", *args, *(extra or [])]
        if host_name is not None:
            cmd += ["--host-name", host_name]
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.name = name
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out = ""
        self.err = ""

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._collect()
        return code

    def _collect(self) -> None:
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.out += self.proc.stdout.read()
            self.proc.stdout.close()
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.err += self.proc.stderr.read()
            self.proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL the host's whole process tree at once (a host that vanished)."""
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self.proc.wait(timeout=5)
        self._collect()

    def __enter__(self) -> RemoteHost:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
