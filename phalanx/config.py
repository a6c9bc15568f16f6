"""Configuration: every option, from arguments and ``PHALANX_*`` environment variables.

Runs in the driver (:meth:`Config.load`, called by :class:`phalanx.Runtime`)
and in ``phalanx worker`` (which loads the options its workers use from its
flags). :data:`OPTIONS` declares every option once: its argument name, its
environment variable, how that variable is read, and a one-line meaning;
:class:`Config` holds their types and defaults. ``docs/gen_api.py``
generates the one configuration table (``docs/configuration.md``) from both,
and ``tests/test_config.py`` checks that each option is settable both ways.

Invariant kept: an explicit argument wins over the environment, which wins
over the default, and a value that is not valid raises ``ValueError`` naming
the argument or the variable, never silently falling back to a default.

``workers`` also takes a dict of worker tag -> count
(``PHALANX_WORKERS=default=2,io=4``); :meth:`Config.load` turns it into
``workers`` (the total) and ``tags`` (the counts per tag).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from .policy import DEFAULT_TAG, check_tag
from .transport.endpoints import parse_listen

__all__ = ["Config", "Option", "OPTIONS", "usable_cpus", "parse_bool", "DEFAULT_START_METHOD", "check_host_name"]

#: "phalanx": workers are forked (in milliseconds) by phalanx's own single-threaded fork
#: server, a copy of the driver made before it starts any thread (phalanx.forkserver);
#: it needs Linux (fork, SCM_RIGHTS, prctl). Elsewhere, multiprocessing's spawn.
DEFAULT_START_METHOD = "phalanx" if sys.platform.startswith("linux") else "spawn"
#: every accepted start method
START_METHODS = ("phalanx", "spawn", "forkserver", "fork")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


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


def parse_bool(raw: str) -> bool:
    """``1/0``, ``true/false``, ``yes/no``, ``on/off`` (any case); ``ValueError`` otherwise."""
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {raw!r}")


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """The options of a :class:`phalanx.Runtime` (``rt.config``), with their types and defaults."""

    workers: int = 0
    #: local workers to start per worker tag ({}: all ``workers`` are "default");
    #: set by passing ``workers`` a dict, not an option of its own
    tags: dict[str, int] = {}
    route_timeout: float = 30.0
    start_method: str = DEFAULT_START_METHOD
    listen: str | None = None
    credits: int = 16
    start_timeout: float = 60.0
    shutdown_timeout: float = 5.0
    max_attempts: int = 3
    restart_limit: int = 50
    restart_window: float = 10.0
    abort_grace: float = 2.0
    max_tasks_per_worker: int = 0
    max_memory_per_worker: int = 0
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = -1.0
    reconnect: bool = False
    server_key: str | None = None
    authorized_keys: str | None = None
    insecure: bool = False
    prefix_output: bool = True
    actor_restart_limit: int = 3
    actor_restart_window: float = 60.0
    actor_timeout: float = 60.0
    hwm: int = 100_000
    max_frame: int = 256 * 1024 * 1024
    spin: float = 0.0
    log_level: str | None = None
    implicit_operations: bool = False
    local_pickle: bool = False
    host_name: str | None = None
    hosts: list[str] = []
    workers_per_host: int = 0
    min_hosts: int = 0
    remote_python: str | None = None
    ssh_config: str | None = None
    slurm: bool = False
    shm_threshold: int = 2 * 1024 * 1024

    def __post_init__(self) -> None:
        # Each message starts with the option's name: Config.load names its variable instead.
        for tag, count in self.tags.items():
            try:
                check_tag(tag)
            except ValueError as exc:
                raise ValueError(f"workers: {exc}") from None
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"workers: the count of tag {tag!r} must be an int >= 0, got {count!r}")
        if self.tags and sum(self.tags.values()) != self.workers:
            raise ValueError(f"workers={self.workers} is not the sum of the per-tag counts {self.tags}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.start_method not in START_METHODS:
            raise ValueError(f"start_method must be phalanx, spawn, forkserver or fork, got {self.start_method!r}")
        if self.start_method == "phalanx" and not sys.platform.startswith("linux"):
            raise ValueError("start_method 'phalanx' needs Linux (prctl, SCM_RIGHTS): use spawn here")
        if self.listen is not None:
            parse_listen(self.listen)
        for name in ("credits", "max_attempts", "hwm"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_tasks_per_worker", "max_memory_per_worker", "restart_limit", "actor_restart_limit",
                     "shm_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("start_timeout", "restart_window", "heartbeat_interval", "actor_restart_window",
                     "actor_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name in ("shutdown_timeout", "abort_grace", "route_timeout", "spin"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if math.isnan(self.heartbeat_timeout):
            raise ValueError("heartbeat_timeout must be a number (<= 0: the default), got nan")
        if self.max_frame < 4096:
            # the CURVE handshake's own commands and the larger control messages must fit
            raise ValueError(f"max_frame must be >= 4096 bytes, got {self.max_frame}")
        if self.log_level is not None and not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise ValueError(f"log_level must be a logging level name (DEBUG, INFO, ...), got {self.log_level!r}")
        self._check_launch()
        if (self.listen is not None and not self.insecure and not (self.server_key and self.authorized_keys)
                and not self.launches):
            raise ValueError(
                "tcp needs server_key= (a .key_secret file) and authorized_keys= (a directory of "
                "worker .key files): run `phalanx keygen`; or pass insecure=True for plaintext"
            )
        if self.local_pickle and self.listen is not None:
            raise ValueError(
                "local_pickle cannot be combined with listen: pickles go to local workers only, "
                "never over tcp (unpickling runs code)"
            )
        if self.host_name is not None:
            try:
                check_host_name(self.host_name)
            except ValueError as exc:
                raise ValueError(f"host_name: {exc}") from None

    @property
    def launches(self) -> bool:
        """Whether the runtime starts hosts itself (``hosts=`` or ``slurm=True``), with keys of its own."""
        return bool(self.hosts) or self.slurm

    def _check_launch(self) -> None:
        if self.hosts and self.slurm:
            raise ValueError("hosts: give hosts= or slurm=True, not both")
        for host in self.hosts:
            if not isinstance(host, str) or not host or any(c.isspace() for c in host) or host.startswith("-"):
                raise ValueError(f"hosts: {host!r} is not a host ([USER@]HOST[:PORT])")
        if len(set(self.hosts)) != len(self.hosts):
            raise ValueError(f"hosts: a host is named twice in {self.hosts} (workers_per_host= sets the count)")
        for name in ("workers_per_host", "min_hosts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hosts and self.min_hosts > len(self.hosts):
            raise ValueError(f"min_hosts={self.min_hosts} is more than the {len(self.hosts)} hosts given")
        if self.launches and self.insecure:
            raise ValueError("hosts: a runtime that starts its hosts always uses CURVE keys; drop insecure=True")

    def worker_groups(self) -> dict[str, int]:
        """Local workers to start, per tag."""
        return dict(self.tags) if self.tags else {DEFAULT_TAG: self.workers}

    @classmethod
    def load(cls, **overrides: Any) -> Config:
        """Defaults, then ``PHALANX_<NAME>`` variables, then non-None ``overrides``.

        Raises ``TypeError`` for an unknown option and ``ValueError``, naming
        the argument or the variable, for a value that is not valid.
        """
        values: dict[str, Any] = {}
        from_env: dict[str, str] = {}
        for option in OPTIONS.values():
            if not option.runtime:
                continue
            raw = os.environ.get(option.env)
            if raw is not None and raw.strip() != "":
                try:
                    values[option.name] = option.parse(raw)
                except ValueError as exc:
                    raise ValueError(f"{option.env}={raw!r}: {exc}") from None
                from_env[option.name] = f"{option.env}={raw!r}"
        for name, value in overrides.items():
            if name not in OPTIONS or not OPTIONS[name].runtime:
                raise TypeError(f"unknown option {name!r}")
            if value is not None:
                values[name] = value
                from_env.pop(name, None)
        groups = values.get("workers")
        if isinstance(groups, dict):
            values["tags"] = dict(groups)
            values["workers"] = sum(c for c in groups.values() if isinstance(c, int))
        try:
            config = msgspec.convert(values, cls)
        except msgspec.ValidationError as exc:
            raise ValueError(_explain(exc, from_env)) from None
        if config.workers == 0 and "workers" not in values and not config.launches:
            config = msgspec.structs.replace(config, workers=usable_cpus())
        return config


def _explain(exc: msgspec.ValidationError, from_env: dict[str, str]) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.credits`" as "credits: expected `int`, got `str`".

    An option that came from the environment is named by its variable.
    """
    text = str(exc)
    message, sep, where = text.rpartition(" - at `$.")
    if sep:  # a value of the wrong type
        name = where.rstrip("`").split(".")[0].split("[")[0]
        name = "workers" if name == "tags" else name
        return f"{from_env.get(name, name)}: {message[:1].lower()}{message[1:]}"
    # a check of __post_init__, whose message starts with the option's name
    name = text.split(" ")[0].split("=")[0].rstrip(":")
    return f"{from_env[name]}: {text}" if name in from_env else text


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


def _parse_optional_str(raw: str) -> str:
    return raw.strip()


def _parse_hosts(raw: str) -> list[str]:
    """``host1,user@host2:22`` (commas or spaces between hosts)."""
    return [h for h in raw.replace(",", " ").split() if h]


class Option(NamedTuple):
    """One option: how to set it, and what it means (a row of the configuration table)."""

    #: the argument name: ``Runtime(name=...)`` and the :class:`Config` field
    name: str
    #: reads the environment variable's text (raises ValueError when it is not valid)
    parse: Callable[[str], Any]
    #: what it does, in one line (Markdown)
    doc: str
    #: the default as the table shows it, when it is not simply the Config field's default
    default: str | None = None
    #: an argument of ``Runtime(...)`` (False: a ``phalanx worker`` option only)
    runtime: bool = True
    #: the ``phalanx worker`` flag that sets it for the workers of that host, if any
    worker_flag: str | None = None

    @property
    def env(self) -> str:
        """The environment variable: ``PHALANX_<NAME>``."""
        return f"PHALANX_{self.name.upper()}"


def _options(*options: Option) -> dict[str, Option]:
    return {o.name: o for o in options}


#: every option, in the order of the configuration table
OPTIONS: dict[str, Option] = _options(
    Option("workers", _parse_workers,
           "worker processes to start; a dict `{\"default\": 2, \"io\": 4}` (env `default=2,io=4`) starts "
           "that many per worker tag", default="usable CPUs (0 with `hosts=` or `slurm=True`)"),
    Option("start_method", str, "how workers start: `phalanx` (forked by phalanx's own fork server, made "
           "before the driver starts threads; Linux), or multiprocessing's `spawn`, `forkserver` or `fork`",
           default="phalanx on Linux, else spawn", worker_flag="--start-method"),
    Option("listen", str, "`tcp://HOST:PORT`: also listen on `PORT`..`PORT+2` for remote workers "
           "(`PORT` 0 picks free ones; see `rt.address`)"),
    Option("credits", int, "tasks a worker may hold at once (prefetch depth)", worker_flag="--credits"),
    Option("start_timeout", float, "seconds to wait for all workers to connect"),
    Option("shutdown_timeout", float, "seconds a worker gets to exit after Stop before it is terminated"),
    Option("max_attempts", int, "runs of a task that may end in its worker's death before it fails with "
           "`WorkerCrashedError`"),
    Option("restart_limit", int, "worker deaths tolerated within `restart_window` before the runtime breaks"),
    Option("restart_window", float, "seconds over which `restart_limit` is counted"),
    Option("abort_grace", float, "seconds an aborted or timed-out task may keep running before its worker "
           "is killed", worker_flag="--abort-grace"),
    Option("max_tasks_per_worker", int, "tasks after which a worker is replaced (0: never)"),
    Option("max_memory_per_worker", int, "worker RSS in bytes above which it is replaced between tasks "
           "(0: never)", worker_flag="--max-memory-per-worker"),
    Option("heartbeat_interval", float, "seconds between heartbeats: the driver's on its control socket, a "
           "remote worker's to the driver", worker_flag="--heartbeat-interval"),
    Option("heartbeat_timeout", float, "seconds without a remote worker's heartbeat before it is declared "
           "lost and its tasks redelivered, and without the driver's before a remote worker gives up (-1: "
           "10 s); a local worker applies it to the driver only when set (the parent-death signal covers it)",
           worker_flag="--heartbeat-timeout"),
    Option("reconnect", parse_bool, "a worker that lost its driver's heartbeats waits for them instead of "
           "exiting", worker_flag="--reconnect"),
    Option("server_key", str, "the driver's CURVE key (`phalanx keygen`): for `Runtime(listen=...)` its "
           "`.key_secret` file, for `phalanx worker` its public `.key` file", worker_flag="--server-key"),
    Option("authorized_keys", str, "directory of the `.key` files of hosts allowed to join, needed with "
           "`listen`"),
    Option("key", str, "this host's `.key_secret` file, with which `phalanx worker` joins the driver",
           default="None", runtime=False, worker_flag="--key"),
    Option("insecure", parse_bool, "tcp in plaintext without authentication (prints a warning)",
           worker_flag="--insecure"),
    Option("prefix_output", parse_bool, "prefix every line a worker prints or logs with `[<worker id>] `",
           worker_flag="--prefix-output"),
    Option("route_timeout", float, "seconds work routed to a worker tag (`on=\"io\"`) waits for a live "
           "worker holding it before it fails with `NoWorkerError`"),
    Option("actor_restart_limit", int, "supervised restarts (`restart_policy=\"on-failure\"`) of one actor "
           "within `actor_restart_window`; the next death is final"),
    Option("actor_restart_window", float, "seconds over which `actor_restart_limit` is counted"),
    Option("actor_timeout", float, "seconds an actor's spawn, restart or stop waits for its worker when no "
           "`timeout=` is given"),
    Option("hwm", int, "ZeroMQ high-water mark: frames queued per peer and socket before a send fails "
           "(credits keep far below it)", worker_flag="--hwm"),
    Option("max_frame", int, "largest frame, in bytes, a socket accepts from a peer (a larger one "
           "disconnects the peer)", default="268435456 (256 MiB)", worker_flag="--max-frame"),
    Option("spin", float, "seconds an idle worker polls for its next task before it blocks (0: blocks at "
           "once; trades CPU for latency)", worker_flag="--spin"),
    Option("log_level", _parse_optional_str, "level of a stderr handler on the `phalanx` loggers, in the "
           "driver and its workers (None: phalanx adds no handler)", worker_flag="--log-level"),
    Option("implicit_operations", parse_bool, "workers also run unregistered module-level functions, by "
           "`module:qualname` (`phalanx.Executor` sets it; for trusted code only)",
           worker_flag="--implicit-operations"),
    Option("local_pickle", parse_bool, "carry what msgpack cannot (lambdas, closures, methods, partials, "
           "classes, arbitrary objects) to and from local workers by cloudpickle (`pip install "
           "'phalanx[pickle]'`); never over tcp, so not with `listen`; for trusted code only"),
    Option("host_name", str, "the name of this host in `rt.inspect()` and `phalanx top`; remote "
           "worker ids start with it", default="its hostname", worker_flag="--host-name"),
    Option("hosts", _parse_hosts, "`[\"host1\", \"user@host2:22\"]` (env `host1,user@host2:22`): start "
           "`phalanx worker` on each host over ssh, with fresh keys for this run ([multihost.md]"
           "(multihost.md#over-ssh))", default="[]"),
    Option("workers_per_host", int, "workers `hosts=` or `slurm=True` start on each host (0: the host's usable "
           "CPUs; with Slurm, the CPUs allocated on the node)"),
    Option("min_hosts", int, "hosts that must start for the runtime to start; the others are reported in one "
           "line each and left out (0: every host)"),
    Option("remote_python", str, "the interpreter that runs `phalanx worker` on the hosts of `hosts=` and "
           "`slurm=True`", default="the driver's `sys.executable`"),
    Option("ssh_config", str, "an ssh_config file for the ssh client that starts `hosts=` (`ssh -F`; "
           "None: the user's `~/.ssh/config`)"),
    Option("slurm", parse_bool, "inside a Slurm allocation, start `phalanx worker` on every allocated node with "
           "`srun`, with fresh keys for this run ([multihost.md](multihost.md#under-slurm))"),
    Option("shm_threshold", int, "bytes from which a numpy array in a task or result between the driver and "
           "a local worker travels through a shared-memory segment in `/dev/shm` (only its name is sent; "
           "0: never). Off while the driver has a runtime with `listen`. The driver reuses its segments; below "
           "2 MiB copies through the pipe measured as fast", default="2097152 (2 MiB)"),
)

# msgspec builds Config's conversion information on first use (~0.5 ms evaluating its
# annotations): built with this module, not by the first Runtime() before it forks its workers.
msgspec.convert({}, Config)
