"""Test helpers: key files, ``phalanx worker`` processes standing for remote hosts, line readers.

Runs in the test (driver) process. :class:`RemoteHost` starts ``phalanx
worker --connect ...`` as a subprocess (optionally inside a network
namespace, through ``ip netns exec``) and, when closed, stops it with SIGTERM
and then kills whatever is left of its process tree, by pid. :class:`Lines`
reads a child's pipe on a thread, so a test waits for a line with a deadline
instead of blocking in ``readline()``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import psutil

TESTS = Path(__file__).resolve().parent


class Lines:
    """The lines a child process writes to one text pipe, read by a daemon thread.

    The thread closes the pipe at end of file (when every process holding its
    write end is gone); until then nothing here blocks longer than asked.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._next = 0
        self._eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="test-lines", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._stream:
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            self._stream.close()
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def readline(self, timeout: float) -> str:
        """The next line not returned yet ("" at end of file); TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._next >= len(self._lines) and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no line within {timeout:g} s; read so far: {self.text()!r}")
                self._cond.wait(left)
            if self._next < len(self._lines):
                self._next += 1
                return self._lines[self._next - 1]
            return ""

    def wait_for(self, text: str, timeout: float, count: int = 1) -> None:
        """Wait until ``count`` lines (read so far, from the start) contain ``text``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(text in line for line in self._lines) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise TimeoutError(f"{count} x {text!r} not seen within {timeout:g} s: {self.text()!r}")
                self._cond.wait(left)

    def text(self) -> str:
        """Everything read so far."""
        with self._cond:
            return "".join(self._lines)

    def join(self, timeout: float = 5.0) -> None:
        """Wait for end of file (the pipe is then closed)."""
        self._thread.join(timeout)


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
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stdout = Lines(self.proc.stdout)
        self.stderr = Lines(self.proc.stderr)

    @property
    def out(self) -> str:
        return self.stdout.text()

    @property
    def err(self) -> str:
        return self.stderr.text()

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._collect()
        return code

    def _collect(self) -> None:
        self.stdout.join()
        self.stderr.join()

    def worker_pids(self) -> list[int]:
        """Pids of the host's worker processes.

        Workers are the descendants that lead a process group of their own
        (each worker calls ``setpgid(0, 0)``): not the fork server that forks
        them, not multiprocessing's resource tracker, not what tasks started.
        """
        try:
            below = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        pids = []
        for proc in below:
            try:
                if os.getpgid(proc.pid) == proc.pid:
                    pids.append(proc.pid)
            except OSError:
                pass
        return pids

    def kill(self) -> None:
        """SIGKILL the host's whole process tree at once (a host that vanished: no goodbye).

        Everything is stopped (SIGSTOP) before anything is killed, so no worker
        sees its supervisor die first and acts on it.
        """
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            procs = []
        for how in (signal.SIGSTOP, signal.SIGKILL):
            for p in procs:
                try:
                    p.send_signal(how)
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
