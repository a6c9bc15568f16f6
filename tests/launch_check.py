"""Helpers for the tests of runtimes that start their own hosts (tests/test_ssh.py, tests/test_slurm.py).

Runs in the test process. :class:`Driver` runs ``launch_driver.py`` inside a
namespace (JSON events out, "go" in); :func:`secrets_exposed` hunts for a
run's secret keys in every process's command line and environment and in
files written since the run began.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from remote_host import TESTS, Lines

#: where a careless launcher could leave a key file (the namespaces share this filesystem)
SCAN = ["/tmp", "/var/tmp", "/dev/shm", "/run", os.path.expanduser("~")]


class Driver:
    """``PREFIX python launch_driver.py MODE OPTIONS`` (PREFIX enters a namespace); JSON events out, "go" in."""

    def __init__(self, prefix: list[str], mode: str, options: dict[str, Any],
                 env: dict[str, str] | None = None) -> None:
        env = dict(env or os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(TESTS / "launch_driver.py"), mode,
             json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out, self.err = Lines(self.proc.stdout), Lines(self.proc.stderr)

    def event(self, timeout: float = 120) -> dict[str, Any]:
        line = self.out.readline(timeout)
        assert line, f"the driver ended: {self.err.text()}"
        event: dict[str, Any] = json.loads(line)
        return event

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.out.join()
        self.err.join()


def secrets_exposed(secrets: list[str], since: float) -> list[str]:
    """Where any secret shows: process command lines and environments now, files written since ``since``."""
    found = []
    needles = [s.encode() for s in secrets]
    for proc in psutil.process_iter():
        for what in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{proc.pid}/{what}").read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                found.append(f"/proc/{proc.pid}/{what}")
    for top in SCAN:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d not in (".cache", ".pyenv", ".cargo", ".rustup", "netns")]
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                    if st.st_mtime < since or st.st_size > 1 << 20 or not os.path.isfile(path):
                        continue
                    data = Path(path).read_bytes()
                except OSError:
                    continue
                if any(n in data for n in needles):
                    found.append(path)
    return found


