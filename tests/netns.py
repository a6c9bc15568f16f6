"""Hosts made of Linux network namespaces, for multi-host tests and benchmarks.

Runs in the test (or benchmark) process, as root. :class:`Hosts` creates a
driver namespace and N worker namespaces, each worker namespace joined to
the driver's by its own veth pair with link-local addresses
(169.254.<10+i>.1 on the driver's side, .2 on the worker's), and deletes
them all on exit, whatever happened (deleting a namespace deletes its veth
ends). Nothing is routed anywhere else: traffic stays between namespaces the
caller made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from typing import Any


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"phx-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *args] if netns is None else ["ip", "-n", netns, *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


class Hosts:
    """A driver namespace and ``n`` worker namespaces linked to it (a star)."""

    def __init__(self, n: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.driver = f"phx-{tag}-d"
        self.workers = [f"phx-{tag}-w{i}" for i in range(n)]
        #: per worker: (its interface in the driver namespace, the driver's address it connects to)
        self.links: list[tuple[str, str]] = []
        self._tag = tag

    def __enter__(self) -> Hosts:
        try:
            _ip("netns", "add", self.driver)
            _ip("link", "set", "lo", "up", netns=self.driver)
            for i, ns in enumerate(self.workers):
                _ip("netns", "add", ns)
                _ip("link", "set", "lo", "up", netns=ns)
                near, far = f"phx{self._tag}d{i}", f"phx{self._tag}w{i}"
                _ip("link", "add", near, "netns", self.driver, "type", "veth", "peer", "name", far, "netns", ns)
                subnet = f"169.254.{10 + i}"
                _ip("addr", "add", f"{subnet}.1/24", "dev", near, netns=self.driver)
                _ip("addr", "add", f"{subnet}.2/24", "dev", far, netns=ns)
                _ip("link", "set", near, "up", netns=self.driver)
                _ip("link", "set", far, "up", netns=ns)
                self.links.append((near, f"{subnet}.1"))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for ns in [self.driver, *self.workers]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]
