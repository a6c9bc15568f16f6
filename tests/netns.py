"""Hosts made of Linux network namespaces, for multi-host tests and benchmarks.

Runs in the test (or benchmark) process, as root. :class:`Hosts` creates a
driver namespace and N worker namespaces, each worker namespace joined to
the driver's by its own veth pair with link-local addresses
(169.254.<10+i>.1 on the driver's side, .2 on the worker's). Nothing is
routed anywhere else: traffic stays between namespaces the caller made.

Invariant kept: **nothing outlives its run.** On exit, whatever happened
(an exception, or pytest-timeout's ``signal`` method raising in the test),
:meth:`Hosts.close` kills every process still inside its namespaces (a
process inside keeps a namespace, and its veth ends, alive after ``ip netns
del``), then deletes the namespaces, which deletes the veth ends: both are
created directly inside them, never in the caller's namespace. What a run
killed outright (SIGKILL, a ``thread``-method timeout) leaves behind is swept
by the next :class:`Hosts`: namespace names carry the pid of the process that
made them (``phx-<pid>-<tag>-<role>``), and those whose maker is gone are
deleted with the processes inside. Namespaces another live run made are never
touched; names without a pid (an older layout) are swept only once older
than :data:`STALE_AGE`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from typing import Any

import psutil

#: every namespace and veth end made here starts with it
PREFIX = "phx"
#: seconds after which a namespace named without its maker's pid counts as stale
STALE_AGE = 900.0

_WITH_PID = re.compile(r"^phx-(\d+)-[0-9a-f]+-[a-z0-9]+$")
_VETH = re.compile(r"^phx([0-9a-f]{6})[dw]\d+$")


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}-probe"
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


def namespaces() -> list[str]:
    """Names of the network namespaces that exist (``ip netns list``)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def links() -> list[str]:
    """Names of the network interfaces of the caller's namespace."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def pids_in(ns: str) -> list[int]:
    """Pids of the processes inside namespace ``ns``."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def inode(ns: str) -> int:
    """The inode of namespace ``ns`` (what ``/proc/<pid>/ns/net`` of a process inside shows)."""
    return os.stat(f"/run/netns/{ns}").st_ino


def holders(inodes: set[int]) -> list[int]:
    """Pids of live processes in any of the namespaces with these inodes, named or not."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes and _alive(int(entry)):
                found.append(int(entry))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill(pids: list[int], timeout: float = 10.0) -> None:
    """SIGKILL ``pids`` and wait until each is gone or a zombie (a zombie holds no namespace).

    Zombies are left to their parent to reap (a test's Popen, say), so it keeps its exit code.
    """
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def _remove(names: list[str]) -> None:
    """Kill what runs inside these namespaces, then delete them."""
    _kill([pid for ns in names for pid in pids_in(ns)])
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _stale(name: str, now: float) -> bool:
    m = _WITH_PID.match(name)
    if m is not None:
        pid = int(m.group(1))
        return pid != os.getpid() and not psutil.pid_exists(pid)
    try:
        return now - os.stat(f"/run/netns/{name}").st_mtime > STALE_AGE
    except OSError:
        return False


def sweep_stale() -> list[str]:
    """Delete the namespaces (and what runs in them) left by runs that died; their names.

    Also deletes veth ends named like ours left in the caller's namespace
    whose namespaces are gone (none is ever made there; this is belt and braces).
    """
    now = time.time()
    stale = [ns for ns in namespaces() if ns.startswith(f"{PREFIX}-") and _stale(ns, now)]
    _remove(stale)
    left = " ".join(namespaces())
    for link in links():
        m = _VETH.match(link)
        if m is not None and f"-{m.group(1)}-" not in left:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
    return stale


class Hosts:
    """A driver namespace and ``n`` worker namespaces linked to it (a star)."""

    def __init__(self, n: int) -> None:
        self.tag = uuid.uuid4().hex[:6]
        base = f"{PREFIX}-{os.getpid()}-{self.tag}"
        self.driver = f"{base}-d"
        self.workers = [f"{base}-w{i}" for i in range(n)]
        #: per worker: (its interface in the driver namespace, the driver's address it connects to)
        self.links: list[tuple[str, str]] = []
        #: veth end names (IFNAMSIZ allows 15 characters: no pid in them)
        self.veths: list[str] = []

    @property
    def names(self) -> list[str]:
        return [self.driver, *self.workers]

    def __enter__(self) -> Hosts:
        sweep_stale()
        try:
            _ip("netns", "add", self.driver)
            _ip("link", "set", "lo", "up", netns=self.driver)
            for i, ns in enumerate(self.workers):
                _ip("netns", "add", ns)
                _ip("link", "set", "lo", "up", netns=ns)
                near, far = f"{PREFIX}{self.tag}d{i}", f"{PREFIX}{self.tag}w{i}"
                _ip("link", "add", near, "netns", self.driver, "type", "veth", "peer", "name", far, "netns", ns)
                self.veths += [near, far]
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
        """Kill every process inside the namespaces, then delete them (and so their veth ends)."""
        _remove(self.names)

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]
