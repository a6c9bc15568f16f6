"""``phalanx worker --connect tcp://HOST:PORT``: a worker supervisor on another host.

Runs in the process a user starts on a remote host (by ssh, Slurm ``srun``,
a Kubernetes pod ...). It checks that the driver is reachable and accepts
this host's CURVE key, then starts N local worker processes that connect to
the driver's tcp endpoints (``PORT``: tasks, ``PORT+1``: results, ``PORT+2``:
control) and join the runtime, serving the worker tags given with ``--tag``
("default" when none is), and watches them:

* a worker that dies while the driver lives is replaced by a new one (a new
  id, the same tags; the driver redelivers the dead one's tasks once its
  heartbeats stop);
* the driver shutting down (Shutdown broadcast) stops the workers and ends
  this process with status 0;
* the driver vanishing (no heartbeat for ``heartbeat_timeout``) stops the
  workers; then this process exits with status 4, or with ``--reconnect``
  waits for the driver to come back (at the same address) and starts fresh
  workers;
* SIGTERM or SIGINT stops the workers with a leave signal at once: each tells the
  driver it leaves (Goodbye), so the driver redelivers their tasks without
  waiting for its heartbeat timeout.
* with ``--keys-from-stdin`` (how ``Runtime(hosts=...)`` and ``slurm=True``
  start it, over ssh or srun) the keys come as the first line of stdin, never
  from a file or the command line, and stdin closing (the driver's session
  ended, the driver died) stops the workers the same way: a thread of this
  process watches it.

Invariant kept: **no orphans on remote hosts either.** Workers carry the
parent-death signal and a watchdog tied to this process, and each one exits
on its own after ``heartbeat_timeout`` without the driver; this process
stops them all before it exits, on any path.

Exit status: 0 driver shut down (or SIGTERM), 2 usage (bad options, or a
``--import`` module that cannot be imported), 3 refused by the driver (wrong,
missing or unauthorised key), 4 driver lost, 130 interrupted (SIGINT).
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from typing import Any

import msgspec
import zmq

from .config import DEFAULT_START_METHOD, Config, check_host_name
from .forkserver import ForkServer
from .errors import ProtocolError
from .policy import DEFAULT_TAG, check_tag
from .supervisor import Supervisor
from .transport import sockets
from .transport.codec import decode_control
from .transport.endpoints import Endpoints, connect_endpoints
from .transport.messages import Heartbeat, Shutdown
from .worker import LEAVE_SIGNAL, WorkerSpec

__all__ = ["RemoteOptions", "RemoteSupervisor", "EXIT_REFUSED", "EXIT_LOST"]

log = logging.getLogger("phalanx.remote")

EXIT_SHUTDOWN = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_LOST = 4
EXIT_INTERRUPTED = 130
#: worker deaths within RESTART_WINDOW seconds after which this host gives up
RESTART_LIMIT = 20
RESTART_WINDOW = 10.0


#: phalanx.Config's defaults, which a remote host's workers share
_CONFIG = Config()


class RemoteOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What ``phalanx worker`` was asked to do."""

    connect: str
    workers: int
    imports: list[str] = []
    credits: int = 16
    key: str | None = None
    server_key: str | None = None
    insecure: bool = False
    heartbeat_timeout: float = 10.0
    heartbeat_interval: float = 0.5
    connect_timeout: float = 30.0
    reconnect: bool = False
    start_method: str = DEFAULT_START_METHOD
    #: worker tags every worker of this host serves (empty: "default")
    tags: list[str] = []
    # The options below are those of phalanx.Config, for this host's workers (its defaults too).
    abort_grace: float = _CONFIG.abort_grace
    max_memory_per_worker: int = _CONFIG.max_memory_per_worker
    hwm: int = _CONFIG.hwm
    max_frame: int = _CONFIG.max_frame
    spin: float = _CONFIG.spin
    log_level: str | None = _CONFIG.log_level
    prefix_output: bool = _CONFIG.prefix_output
    implicit_operations: bool = _CONFIG.implicit_operations
    #: this host's name in the driver's inspect tree and worker ids (None: its hostname)
    host_name: str | None = _CONFIG.host_name
    #: read the keys from the first line of stdin and stop when stdin closes
    keys_from_stdin: bool = False


class Refused(Exception):
    """The driver refused this host during the security handshake."""


def _say(message: str) -> None:
    log.warning(message)
    print(f"phalanx worker: {message}", file=sys.stderr, flush=True)


class RemoteSupervisor:
    """Starts, watches and stops the workers of this host (see the module docstring)."""

    def __init__(self, options: RemoteOptions, stdin_keys: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.options = options
        #: (this host's public, its secret, the driver's public) key, z85, read from stdin
        self._stdin_keys = stdin_keys
        #: the tags every worker of this host serves
        self.tags: tuple[str, ...] = tuple(dict.fromkeys(check_tag(t) for t in options.tags)) or (DEFAULT_TAG,)
        self.endpoints: Endpoints = connect_endpoints(options.connect)
        self.limits = sockets.Limits(options.hwm, options.max_frame)
        self.curve = self._load_keys()
        self.host = check_host_name(options.host_name) if options.host_name is not None else socket.gethostname()
        self._ids = itertools.count(1)
        self._exits: deque[tuple[str, int | None]] = deque()
        self._stopping = threading.Event()
        self._deaths: deque[float] = deque()
        #: forks this host's workers (start method "phalanx"; made by run())
        self._server: ForkServer | None = None

    def _load_keys(self) -> sockets.Curve | None:
        o = self.options
        if self._stdin_keys is not None:
            if o.insecure or o.key or o.server_key:
                raise ValueError("--keys-from-stdin excludes --insecure, --key and --server-key")
            public, secret, server = self._stdin_keys
            return sockets.Curve(public, secret, server)
        if o.insecure:
            if o.key or o.server_key:
                raise ValueError("--insecure and --key/--server-key exclude each other")
            _say(f"WARNING: connecting to {o.connect} WITHOUT CURVE (--insecure): traffic is plaintext")
            return None
        if not (o.key and o.server_key):
            raise ValueError(
                "over tcp a worker needs --key (its .key_secret file) and --server-key (the driver's "
                ".key file), made by `phalanx keygen`; or --insecure against an insecure runtime"
            )
        from .transport import keys

        public, secret = keys.load_secret(o.key)
        return sockets.Curve(public, secret, keys.load_public(o.server_key))

    # ---- the driver's heartbeats ---------------------------------------------------

    def _subscribe(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        events = sockets.HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED
        sub = sockets.subscriber(ctx, self.endpoints.control, self.curve, self.limits, watch=events)
        return sub, sockets.monitor(sub, events)

    def _wait_for_driver(self, sub: zmq.Socket[bytes], mon: zmq.Socket[bytes], timeout: float | None) -> bool:
        """Block until a driver heartbeat arrives; False on timeout; raise Refused."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        while not self._stopping.is_set():
            wait = 200 if deadline is None else int(max(0.0, min(0.2, deadline - time.monotonic())) * 1000)
            events = dict(poller.poll(wait))
            if mon in events:
                self._check_monitor(mon)
            if sub in events and self._drain(sub) is not None:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return False

    def _check_monitor(self, mon: zmq.Socket[bytes]) -> None:
        if sockets.handshake_failures(mon):
            raise Refused(
                f"refused by the driver at {self.options.connect}: the security handshake failed "
                "(is this host's public key in the driver's authorized_keys, and --server-key the "
                "driver's key? is the runtime insecure while this worker uses keys, or the reverse?)"
            )

    def _drain(self, sub: zmq.Socket[bytes]) -> str | None:
        """Read what the driver published: "beat", "shutdown" or None (nothing useful)."""
        seen: str | None = None
        while True:
            try:
                frame = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return seen
            try:
                msg = decode_control(frame)
            except ProtocolError:
                continue
            if isinstance(msg, Shutdown):
                return "shutdown"
            seen = "beat" if isinstance(msg, Heartbeat) or seen is None else seen

    # ---- workers -----------------------------------------------------------------

    def _spec(self) -> WorkerSpec:
        o = self.options
        return WorkerSpec(
            worker_id=f"{self.host}-{os.getpid()}-{next(self._ids)}",
            endpoints=self.endpoints,
            credits=o.credits,
            parent_pid=os.getpid(),
            imports=list(o.imports),
            heartbeat_timeout=o.heartbeat_timeout,
            heartbeat_interval=o.heartbeat_interval,
            curve=self.curve,
            tags=self.tags,
            abort_grace=o.abort_grace,
            max_memory=o.max_memory_per_worker,
            limits=self.limits,
            spin=o.spin,
            log_level=o.log_level,
            prefix_output=o.prefix_output,
            implicit_operations=o.implicit_operations,
            host=self.host,
            goodbye=True,
        )

    def _on_exit(self, worker_id: str, exitcode: int | None) -> None:
        self._exits.append((worker_id, exitcode))

    def _serve(self, sub: zmq.Socket[bytes], mon: zmq.Socket[bytes]) -> int:
        """Run workers until the driver shuts down or is lost."""
        o = self.options
        supervisor = Supervisor(o.start_method, self._on_exit, server=self._server)
        try:
            for _ in range(o.workers):
                supervisor.spawn(self._spec())
            supervisor.start()
            print(f"phalanx worker: {o.workers} workers of {self.host} joined {o.connect}"
                  f" (tags: {','.join(self.tags)})",
                  file=sys.stderr, flush=True)
            heard = time.monotonic()
            while not self._stopping.is_set():
                if sub.poll(100):
                    what = self._drain(sub)
                    if what == "shutdown":
                        print("phalanx worker: the driver shut down", file=sys.stderr, flush=True)
                        return EXIT_SHUTDOWN
                    if what is not None:
                        heard = time.monotonic()
                if mon.poll(0):
                    try:
                        self._check_monitor(mon)
                    except Refused:
                        pass  # a reconnect refused: the heartbeat timeout decides
                if time.monotonic() - heard > o.heartbeat_timeout:
                    _say(f"no heartbeat from the driver for {o.heartbeat_timeout:g} s: driver lost")
                    return EXIT_LOST
                self._replace_exited(supervisor)
            return EXIT_SHUTDOWN
        finally:
            # Told to stop (SIGTERM, Ctrl-C): the workers say Goodbye, so the driver
            # redelivers their tasks now rather than after its heartbeat timeout.
            supervisor.stop(timeout=2.0, leave_signal=LEAVE_SIGNAL if self._stopping.is_set() else None)

    def _replace_exited(self, supervisor: Supervisor) -> None:
        while self._exits:
            wid, code = self._exits.popleft()
            now = time.monotonic()
            self._deaths.append(now)
            while self._deaths and now - self._deaths[0] > RESTART_WINDOW:
                self._deaths.popleft()
            if len(self._deaths) > RESTART_LIMIT:
                _say(f"{len(self._deaths)} worker exits within {RESTART_WINDOW:g} s: not replacing {wid}")
                continue
            print(f"phalanx worker: {wid} exited (code {code}); starting a replacement",
                  file=sys.stderr, flush=True)
            try:
                supervisor.spawn(self._spec())
            except Exception as exc:  # the supervisor is stopping, or the host is out of processes
                _say(f"cannot start a replacement worker: {exc}")

    def run(self) -> int:
        """Serve the driver; return the exit status (see the module docstring)."""
        o = self.options
        # The fork server first: a copy of this process before ZeroMQ's I/O threads exist.
        self._server = ForkServer(self._on_exit) if o.start_method == "phalanx" else None
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            while True:
                sub, mon = self._subscribe(ctx)
                try:
                    timeout = None if o.reconnect else o.connect_timeout
                    try:
                        if not self._wait_for_driver(sub, mon, timeout):
                            if self._stopping.is_set():
                                return EXIT_SHUTDOWN
                            _say(f"no driver answered at {o.connect} within {o.connect_timeout:g} s")
                            return EXIT_LOST
                    except Refused as exc:
                        _say(str(exc))
                        return EXIT_REFUSED
                    status = self._serve(sub, mon)
                finally:
                    sockets.close(sub, mon)
                if status != EXIT_LOST or not o.reconnect or self._stopping.is_set():
                    return status  # only a lost driver is waited for again
                print(f"phalanx worker: waiting for a driver at {o.connect}", file=sys.stderr, flush=True)
        finally:
            ctx.destroy(linger=0)
            if self._server is not None:
                self._server.close()

    def stop(self) -> None:
        """Ask :meth:`run` to stop the workers and return (any thread, or a signal handler)."""
        self._stopping.set()


def _import_all(modules: list[str]) -> str | None:
    """Import every ``--import`` module; what went wrong with the first that fails, or None.

    Done here, once, so a missing module is one clear line and exit status 2
    rather than a traceback in every worker.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # whatever the module raises, SystemExit included
            if isinstance(exc, KeyboardInterrupt):
                raise
            if isinstance(exc, ModuleNotFoundError) and exc.name == module:
                return (f"--import {module}: no module named {module!r} here "
                        f"(is it installed, or in the directory where phalanx worker runs?)")
            return f"--import {module}: importing it failed: {type(exc).__name__}: {exc}"
    return None


#: the first word of the line ``--keys-from-stdin`` reads: KEYS_LINE public secret server-public
KEYS_LINE = "phalanx-keys-1"


def _read_stdin_keys() -> tuple[bytes, bytes, bytes]:
    """The keys on the first line of stdin (ValueError when it is not such a line)."""
    line = sys.stdin.buffer.readline(512)
    words = line.split()
    if len(words) != 4 or words[0] != KEYS_LINE.encode() or any(len(w) != 40 for w in words[1:]):
        raise ValueError("--keys-from-stdin: the first line of stdin holds no keys"
                         + (" (stdin closed)" if not line else ""))
    return words[1], words[2], words[3]


def _watch_stdin(sup: RemoteSupervisor, closed: list[bool]) -> None:
    """Stop ``sup`` when stdin closes: the driver's ssh or srun session ended (thread)."""
    try:
        while os.read(sys.stdin.fileno(), 4096):
            pass
    except OSError:
        pass
    closed.append(True)
    sup.stop()


def main(options: RemoteOptions) -> int:
    """Entry point of ``phalanx worker``: SIGTERM and SIGINT stop it cleanly."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # --import finds modules next to the user, like python -m
    try:
        stdin_keys = _read_stdin_keys() if options.keys_from_stdin else None
        sup = RemoteSupervisor(options, stdin_keys)
    except (ValueError, OSError) as exc:
        print(f"phalanx worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problem = _import_all(options.imports)
    if problem is not None:
        print(f"phalanx worker: {problem}", file=sys.stderr)
        return EXIT_USAGE

    stopped_by: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopped_by.append(signum)
        sup.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    closed: list[bool] = []
    if options.keys_from_stdin:
        threading.Thread(target=_watch_stdin, args=(sup, closed), name="phalanx-stdin", daemon=True).start()
    status = sup.run()
    if closed and not stopped_by:
        print("phalanx worker: stdin closed (the driver's session ended): workers stopped",
              file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED if stopped_by[:1] == [signal.SIGINT] else status
