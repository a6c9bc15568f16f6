"""Runtime configuration from arguments and ``PHALANX_*`` environment variables.

Runs in the driver. An explicit argument wins over the environment, which
wins over the default. Every option is listed in :data:`OPTIONS` (the README
table is generated from the same names). ``workers`` also takes a dict of
worker tag -> count (``PHALANX_WORKERS=default=2,io=4``); :meth:`Config.load`
turns it into ``workers`` (the total) and ``tags`` (the counts per tag).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from .policy import DEFAULT_TAG, check_tag

__all__ = ["Config", "OPTIONS", "usable_cpus", "DEFAULT_START_METHOD", "check_host_name"]

#: fork is fastest (a worker starts in milliseconds) and is what multiprocessing
#: uses on Linux before 3.12; from 3.12 on, forking a threaded process warns, so spawn.
DEFAULT_START_METHOD = "fork" if sys.platform.startswith("linux") and sys.version_info < (3, 12) else "spawn"


def check_host_name(name: object) -> str:
    """``name`` if it can name a host (``host_name``, ``phalanx worker --host-name``), else ValueError.

    A host name is 1 to 255 printable characters without whitespace.
    """
    if not isinstance(name, str) or not 0 < len(name) <= 255 or any(c.isspace() or not c.isprintable() for c in name):
        raise ValueError(f"a host name is 1 to 255 printable characters without spaces: got {name!r}")
    return name


def usable_cpus() -> int:
    """CPUs this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """Every knob of a :class:`phalanx.Runtime`."""

    #: worker processes to start (default: usable CPUs)
    workers: int = 0
    #: local workers to start per worker tag ({}: all ``workers`` are "default");
    #: set by passing ``workers`` a dict, not an option of its own
    tags: dict[str, int] = {}
    #: seconds work routed to a tag waits for a live worker holding it before NoWorkerError
    route_timeout: float = 30.0
    #: multiprocessing start method for workers: fork, forkserver or spawn
    #: (default: fork on Linux with Python < 3.12, like multiprocessing; else spawn)
    start_method: str = DEFAULT_START_METHOD
    #: ``tcp://HOST:PORT`` to listen on instead of private ipc endpoints
    listen: str | None = None
    #: tasks a worker may hold at once (prefetch depth)
    credits: int = 16
    #: seconds to wait for all workers to connect
    start_timeout: float = 60.0
    #: seconds a worker gets to exit after Stop before it is terminated
    shutdown_timeout: float = 5.0
    #: runs of a task that may end in its worker's death before it fails with WorkerCrashedError
    max_attempts: int = 3
    #: worker deaths tolerated within ``restart_window`` before the runtime breaks
    restart_limit: int = 50
    #: seconds over which ``restart_limit`` is counted
    restart_window: float = 10.0
    #: seconds an aborted or timed-out task may keep running before its worker is killed
    abort_grace: float = 2.0
    #: tasks after which a worker is replaced (0: never)
    max_tasks_per_worker: int = 0
    #: worker RSS in bytes above which it is replaced between tasks (0: never)
    max_memory_per_worker: int = 0
    #: seconds between driver heartbeats on the control socket
    heartbeat_interval: float = 0.5
    #: seconds without a remote worker's heartbeat before it is declared lost (-1: 10 s);
    #: local workers apply it to the driver only when set (the parent-death signal covers them)
    heartbeat_timeout: float = -1.0
    #: a local worker that lost its driver's heartbeats waits for them instead of exiting
    reconnect: bool = False
    #: the driver's CURVE ``.key_secret`` file (tcp)
    server_key: str | None = None
    #: directory of the ``.key`` files of workers allowed to connect (tcp)
    authorized_keys: str | None = None
    #: allow plaintext, unauthenticated tcp (prints a warning)
    insecure: bool = False
    #: prefix every line a worker prints or logs with "[<worker id>] "
    prefix_output: bool = True
    #: the name of this host in ``rt.inspect()`` and ``phalanx top`` (None: its hostname)
    host_name: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.start_method not in ("spawn", "forkserver", "fork"):
            raise ValueError(f"start_method must be spawn, forkserver or fork, got {self.start_method!r}")
        if self.credits < 1:
            raise ValueError(f"credits must be >= 1, got {self.credits}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("max_tasks_per_worker", "max_memory_per_worker", "restart_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be > 0, got {self.heartbeat_interval}")
        if self.listen is not None and not self.insecure and not (self.server_key and self.authorized_keys):
            raise ValueError(
                "tcp needs server_key= (a .key_secret file) and authorized_keys= (a directory of "
                "worker .key files): run `phalanx keygen`; or pass insecure=True for plaintext"
            )
        if self.abort_grace < 0:
            raise ValueError(f"abort_grace must be >= 0, got {self.abort_grace}")
        if not (math.isfinite(self.route_timeout) and self.route_timeout >= 0):
            raise ValueError(f"route_timeout must be a finite number >= 0, got {self.route_timeout}")
        for tag, count in self.tags.items():
            check_tag(tag)
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"the worker count of tag {tag!r} must be an int >= 0, got {count!r}")
        if self.host_name is not None:
            check_host_name(self.host_name)
        if self.tags and sum(self.tags.values()) != self.workers:
            raise ValueError(f"workers={self.workers} is not the sum of the per-tag counts {self.tags}")

    def worker_groups(self) -> dict[str, int]:
        """Local workers to start, per tag."""
        return dict(self.tags) if self.tags else {DEFAULT_TAG: self.workers}

    @classmethod
    def load(cls, **overrides: Any) -> Config:
        """Defaults, then ``PHALANX_<NAME>`` variables, then non-None ``overrides``."""
        values: dict[str, Any] = {}
        for name, parse in OPTIONS.items():
            raw = os.environ.get(f"PHALANX_{name.upper()}")
            if raw is not None and raw != "":
                try:
                    values[name] = parse(raw)
                except ValueError as exc:
                    raise ValueError(f"PHALANX_{name.upper()}={raw!r}: {exc}") from None
        for name, value in overrides.items():
            if name not in OPTIONS:
                raise TypeError(f"unknown option {name!r}")
            if value is not None:
                values[name] = value
        groups = values.get("workers")
        if isinstance(groups, dict):
            values["tags"] = dict(groups)
            values["workers"] = sum(c for c in groups.values() if isinstance(c, int))
        config = cls(**values)
        if config.workers == 0 and "workers" not in values:
            config = msgspec.structs.replace(config, workers=usable_cpus())
        return config


def _parse_workers(raw: str) -> int | dict[str, int]:
    """``4``, or ``default=2,io=4`` (worker tag -> count)."""
    if "=" not in raw:
        return int(raw)
    groups: dict[str, int] = {}
    for part in raw.split(","):
        tag, sep, count = part.partition("=")
        if not sep:
            raise ValueError(f"expected TAG=COUNT, got {part!r}")
        groups[check_tag(tag.strip())] = int(count)
    return groups


OPTIONS: dict[str, Callable[[str], Any]] = {
    "workers": _parse_workers,
    "start_method": str,
    "listen": str,
    "credits": int,
    "start_timeout": float,
    "shutdown_timeout": float,
    "max_attempts": int,
    "restart_limit": int,
    "restart_window": float,
    "abort_grace": float,
    "max_tasks_per_worker": int,
    "max_memory_per_worker": int,
    "heartbeat_interval": float,
    "heartbeat_timeout": float,
    "reconnect": lambda raw: raw.strip().lower() in ("1", "true", "yes", "on"),
    "server_key": str,
    "authorized_keys": str,
    "insecure": lambda raw: raw.strip().lower() in ("1", "true", "yes", "on"),
    "prefix_output": lambda raw: raw.strip().lower() not in ("0", "false", "no", "off"),
    "route_timeout": float,
    "host_name": str,
}
