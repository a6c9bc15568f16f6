"""Starting ``phalanx worker`` on other hosts through the engines clusters run: OpenSSH and Slurm.

Runs in the driver process. ``Runtime(hosts=[...])`` and ``Runtime(slurm=True)``
build a :class:`Launch` before the driver listens (it makes the keys and picks
the address), then :meth:`Launch.start` runs one session per host and waits
for its workers; :meth:`Launch.close` ends the sessions at shutdown::

  driver process                                            host (one per entry)
  ┌──────────────────────────────────────┐  ssh -T HOST 'exec PY -m phalanx worker
  │ Launch ── one ssh (or srun) child ───┼──▶ --connect tcp://ADDR:PORT --keys-from-stdin ...'
  │   per host; its stdin: one line of   │   stdin ─▶ phalanx worker ─▶ N worker processes
  │   keys, then held open until close   │            ◀── tcp+CURVE ──▶ the driver's sockets
  │ one thread per host reads the        │
  │   session's output (last lines kept) │
  └──────────────────────────────────────┘

The system ``ssh`` client is used (not an SSH library): it honours the
user's ``~/.ssh/config``, agent, known hosts and ``ProxyJump`` as a login
does, and adds no dependency. Under Slurm, one ``srun`` step per allocated
node does the same job.

Invariants kept:

* **Keys of a run are its own and never on disk.** The driver makes a fresh
  CURVE key pair per host (and one for itself, unless ``server_key=`` is
  given), accepts exactly those public keys (:class:`~phalanx.transport.keys.RunKeys`,
  in memory), and writes each host's secret to that host's session stdin,
  never on a command line, in the environment or in a file.
* **A session is the host's lifetime.** The remote ``phalanx worker`` stops
  when its stdin closes: at shutdown (after the driver's Shutdown broadcast)
  and when the driver dies (its end of every pipe closes with it).
* **One line per host that fails to start**, saying why (unreachable, no
  interpreter, no phalanx, refused, too slow), logged on ``phalanx.launch``
  and printed on stderr; the runtime starts if at least ``min_hosts`` hosts
  did (0: all), else raises :class:`~phalanx.WorkerStartError` with those lines.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from typing import IO, Any

from .config import OPTIONS, Config
from .errors import WorkerStartError
from .transport import keys

__all__ = ["Launch", "HostSession", "ssh_command", "srun_command", "slurm_nodes", "route_source"]

log = logging.getLogger("phalanx.launch")

#: seconds a session gets to end by itself at shutdown before it is killed
CLOSE_GRACE = 5.0
#: the line ``phalanx worker`` prints once its workers are started (remote.py)
_JOINED = re.compile(r"phalanx worker: (\d+) workers of (\S+) joined")
#: remote ``phalanx worker`` exit statuses (remote.py) and what they mean here
_EXITS = {2: "phalanx worker refused its options", 3: "the driver refused its key",
          4: "it could not reach the driver at {address}"}
#: options passed on to every host's ``phalanx worker`` when they differ from the default
_PASSED_ON = ("credits", "abort_grace", "max_memory_per_worker", "heartbeat_interval", "heartbeat_timeout",
              "prefix_output", "hwm", "max_frame", "spin", "log_level", "implicit_operations")


def _say(line: str) -> None:
    log.warning(line)
    print(f"phalanx: {line}", file=sys.stderr, flush=True)


def route_source(host: str, port: int = 22) -> str:
    """The local address the kernel would send from to reach ``host`` (no packet is sent).

    OSError when ``host`` does not resolve or no route leads to it.
    """
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)  # a UDP connect only picks the route
        return str(s.getsockname()[0])


def _ssh_target(spec: str, ssh_config: str | None) -> tuple[str, int]:
    """(host name, port) ssh itself resolves ``[USER@]HOST[:PORT]`` to (``ssh -G``: config, aliases)."""
    user_host, port = _split_port(spec)
    argv = ["ssh", *(["-F", ssh_config] if ssh_config else []), "-G", *(["-p", port] if port else []), user_host]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    values = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    if done.returncode != 0 or "hostname" not in values:
        raise OSError((done.stderr.strip().splitlines() or ["ssh -G failed"])[-1])
    return values["hostname"], int(values.get("port", "22"))


def _split_port(spec: str) -> tuple[str, str | None]:
    """``user@host:22`` -> (``user@host``, ``22``); IPv6 literals in brackets: ``[::1]:22``."""
    user, at, host = spec.rpartition("@")
    port: str | None = None
    if host.startswith("["):
        addr, _, rest = host[1:].partition("]")
        host, port = addr, rest[1:] if rest.startswith(":") else None
    elif host.count(":") == 1:
        host, port = host.split(":")
    if port is not None and not port.isdigit():
        raise ValueError(f"hosts: {spec!r}: the port is not a number")
    return user + at + host, port


def _host_name(spec: str) -> str:
    """How the driver names a host's workers: the spec without ``user@``."""
    return spec.rpartition("@")[2]


def worker_args(config: Config, address: str, host_name: str, workers: int) -> list[str]:
    """``phalanx worker`` arguments for one host: where to connect, its name, its workers, options."""
    args = ["-m", "phalanx", "worker", "--connect", address, "--keys-from-stdin", "--host-name", host_name]
    if workers:
        args += ["--workers", str(workers)]
    default = Config()
    for name in _PASSED_ON:
        value = getattr(config, name)
        if value == getattr(default, name) or (name == "heartbeat_timeout" and value <= 0):
            continue
        flag = OPTIONS[name].worker_flag
        assert flag is not None
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def ssh_command(spec: str, remote: list[str], ssh_config: str | None = None) -> list[str]:
    """The ``ssh`` command that runs ``remote`` (argv) on host ``spec`` (``[USER@]HOST[:PORT]``).

    ``-T``: no terminal, so stdin is a plain pipe whose end the remote side sees;
    ``BatchMode``: never a password prompt (a host without key login fails at once);
    ``ServerAlive*``: a session whose host went silent ends within ~15 s.
    """
    user_host, port = _split_port(spec)
    return ["ssh", "-T", *(["-F", ssh_config] if ssh_config else []),
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            *(["-p", port] if port else []), user_host, "--", "exec " + shlex.join(remote)]


def srun_command(node: str, cpus: int, remote: list[str]) -> list[str]:
    """The ``srun`` step that runs ``remote`` (argv) on allocated node ``node``, its stdin forwarded.

    One step per node, so each node's stdin carries that node's keys alone.
    ``--overlap`` lets the steps share the allocation with the driver's own step.
    """
    return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={node}", f"--cpus-per-task={cpus}",
            "--overlap", "--kill-on-bad-exit=1", "--job-name=phalanx-worker", *remote]


def _expand_counts(text: str) -> list[int]:
    """Slurm's ``SLURM_JOB_CPUS_PER_NODE``: ``4(x2),2`` -> ``[4, 4, 2]``."""
    counts: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ValueError(f"SLURM_JOB_CPUS_PER_NODE={text!r} is not understood")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_nodes(environ: dict[str, str] | None = None) -> list[tuple[str, str, int]]:
    """(node, its address, CPUs allocated on it) for every node of the current Slurm allocation.

    WorkerStartError outside an allocation. ``scontrol`` expands the node list and
    gives each node's ``NodeAddr`` (the address Slurm itself reaches it at).
    """
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist or "SLURM_JOB_ID" not in env:
        raise WorkerStartError("slurm=True needs a Slurm allocation (run under sbatch or salloc): "
                               "SLURM_JOB_ID and SLURM_JOB_NODELIST are not set")
    nodes = _scontrol("show", "hostnames", nodelist).split()
    addrs: dict[str, str] = {}
    for line in _scontrol("--oneliner", "show", "node", nodelist).splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "NodeName" in fields:
            addrs[fields["NodeName"]] = fields.get("NodeAddr", fields["NodeName"])
    raw = env.get("SLURM_JOB_CPUS_PER_NODE")
    counts = _expand_counts(raw) if raw else [int(env.get("SLURM_CPUS_ON_NODE", "1"))] * len(nodes)
    if len(counts) != len(nodes):
        raise WorkerStartError(f"SLURM_JOB_CPUS_PER_NODE={raw!r} does not match the {len(nodes)} nodes {nodes}")
    return [(node, addrs.get(node, node), cpus) for node, cpus in zip(nodes, counts)]


def _scontrol(*args: str) -> str:
    done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise WorkerStartError(f"scontrol {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


class HostSession:
    """One host: its keys, the session (ssh or srun child) that runs its ``phalanx worker``, what it said."""

    def __init__(self, spec: str, name: str, route: str | None) -> None:
        #: as the user gave it (``user@host:22``), or the Slurm node name
        self.spec = spec
        #: its workers' host name in the driver (``rt.inspect().hosts()``)
        self.name = name
        #: the address it connects back to (None: the listen address as it is)
        self.route = route
        self.pair: keys.KeyPair = keys.new_pair()
        self.argv: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        #: workers its ``phalanx worker`` said it started (None: not said yet)
        self.joined: int | None = None
        #: the reason it failed to start, in one line (None: it did not fail)
        self.failure: str | None = None
        #: the driver's address this host connects to
        self.address = ""
        self.ready = False
        #: set when the runtime ends the session (its end is then no news)
        self.closing = False
        self.engine = "ssh"
        self.tail: deque[str] = deque(maxlen=20)
        self._reader: threading.Thread | None = None

    def __repr__(self) -> str:  # never the secret
        return f"HostSession({self.spec!r}, ready={self.ready}, failure={self.failure!r})"

    def start(self, server_public: bytes) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdin is not None
        public, secret = self.pair
        line = b" ".join([b"phalanx-keys-1", public, secret, server_public]) + b"\n"
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except OSError:
            pass  # the session ended already: its output says why
        self._reader = threading.Thread(target=self._read, name=f"phalanx-launch-{self.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Forward the session's output (task prints), keep its last lines, note the join line."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        sel = selectors.DefaultSelector()
        streams: dict[IO[bytes], Any] = {proc.stdout: sys.stdout, proc.stderr: sys.stderr}
        for each in streams:
            sel.register(each, selectors.EVENT_READ)
        pending = {each: b"" for each in streams}
        try:
            while streams:
                for key, _ in sel.select():
                    stream: Any = key.fileobj
                    data = os.read(stream.fileno(), 65536)
                    if not data:
                        sel.unregister(stream)
                        out = streams.pop(stream)
                        data, pending[stream] = pending[stream], b""
                        if not data:
                            continue
                        data += b"\n"
                    else:
                        out = streams[stream]
                    lines = (pending[stream] + data).split(b"\n")
                    pending[stream] = lines.pop()
                    for raw in lines:
                        self._line(raw.decode("utf-8", "replace"), out)
        except (OSError, ValueError):
            return  # end() closed the pipes after giving up on this thread (a process still held them)
        finally:
            sel.close()
        status = proc.wait()
        if self.ready and not self.closing:
            _say(f"host {self.spec}: its {self.engine} session ended (status {status}); its workers are "
                 f"lost: {(list(self.tail) or ['(no output)'])[-1]}")

    def _line(self, text: str, out: Any) -> None:
        self.tail.append(text)
        m = _JOINED.search(text)
        if m is not None:
            self.joined = int(m.group(1))
        if text.startswith("phalanx worker:") or not self.ready:
            # its own progress, or output before it started (kept in tail: a failure quotes it)
            log.info("%s: %s", self.name, text)
            return
        try:
            print(text, file=out, flush=True)
        except (OSError, ValueError):
            pass

    def explain(self, status: int, python: str) -> str:
        """Why a session that ended with ``status`` before its workers were ready failed, in one line."""
        said = [line.strip() for line in self.tail if line.strip() and "WARNING" not in line]
        last = said[-1] if said else "(no output)"
        text = "\n".join(said)
        engine, address = self.engine, self.address
        if engine == "ssh" and status == 255:
            return f"host {self.spec}: cannot reach it over ssh: {last}"
        if status == 127 or f"{python}: No such file" in text or "No such file or directory" in last:
            return f"host {self.spec}: no interpreter {python} there (set remote_python=): {last}"
        if "No module named phalanx" in text or "No module named 'phalanx'" in text:
            return f"host {self.spec}: phalanx is not installed for {python} there ({last})"
        if status in _EXITS:
            return f"host {self.spec}: {_EXITS[status].format(address=address)}: {last}"
        return f"host {self.spec}: {engine} ended with status {status} before its workers were ready: {last}"

    def close_stdin(self) -> None:
        if self.proc is not None and self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def end(self, timeout: float) -> None:
        """Close the session: stdin first (the remote side stops), then kill the child if it lingers."""
        proc = self.proc
        if proc is None:
            return
        self.closing = True
        self.close_stdin()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(5.0)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


class Launch:
    """The hosts a runtime starts itself (``hosts=`` or ``slurm=True``); see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.engine = "srun" if config.slurm else "ssh"
        self.config = config
        self.python = config.remote_python or sys.executable
        server = keys.load_secret(config.server_key) if config.server_key else keys.new_pair()
        self.keys = keys.RunKeys(server)
        self.sessions: list[HostSession] = []
        #: the sessions that failed to start (one line each), in the order they failed
        self.failures: list[str] = []
        self._cpus: dict[str, int] = {}
        #: where each host is reached (ssh: resolved by ``ssh -G`` later; Slurm: its NodeAddr)
        self._addrs: dict[str, str] = {}
        if config.slurm:
            for node, addr, cpus in slurm_nodes():
                self.sessions.append(HostSession(node, node, None))
                self._cpus[node], self._addrs[node] = cpus, addr
        else:
            for spec in config.hosts:
                self.sessions.append(HostSession(spec, _host_name(spec), None))
        self.listen = config.listen or self._derive_listen()
        for session in self.sessions:
            self.keys.authorized.add(session.pair[0])

    def _route(self, session: HostSession) -> str | None:
        """The local address towards ``session``'s host (None, and its failure set, when there is none)."""
        try:
            if self.engine == "ssh":
                target, port = _ssh_target(session.spec, self.config.ssh_config)
            else:
                target, port = self._addrs[session.spec], 22
            session.route = route_source(target, port)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            session.failure = (f"host {session.spec}: cannot find a route to it ({exc}); set listen= to an "
                               "address it can reach")
        return session.route

    def _derive_listen(self) -> str:
        """Listen where the hosts can reach: the source address of the route to them (port 0: free ports).

        When the routes to the hosts leave from different addresses, listen on every
        interface and tell each host its own (CURVE still refuses every other key).
        """
        sources = {route for session in self.sessions if (route := self._route(session)) is not None}
        if len(sources) == 1:
            (only,) = sources
            return f"tcp://[{only}]:0" if ":" in only else f"tcp://{only}:0"
        return "tcp://0.0.0.0:0" if sources else "tcp://127.0.0.1:0"

    def start(self, address: str, ready: Any, timeout: float) -> None:
        """Start every session; wait until each host's workers are ready (``ready(name) -> int``) or it failed.

        ``address`` is the driver's tcp address (``tcp://HOST:PORT``). Raises
        WorkerStartError when fewer than ``min_hosts`` hosts started.
        """
        host, _, port = address.rpartition(":")
        wildcard = host in ("tcp://0.0.0.0", "tcp://[::]", "tcp://*")
        for session in self.sessions:
            if session.failure is not None:
                continue
            connect = address
            if wildcard:  # every interface: the host connects to the address on its route
                route = session.route or self._route(session)
                if route is None:
                    continue
                connect = f"tcp://[{route}]:{port}" if ":" in route else f"tcp://{route}:{port}"
            workers = self.config.workers_per_host or self._cpus.get(session.spec, 0)
            remote = [self.python, *worker_args(self.config, connect, session.name, workers)]
            if self.engine == "ssh":
                session.argv = ssh_command(session.spec, remote, self.config.ssh_config)
            else:
                session.argv = srun_command(session.spec, self._cpus[session.spec], remote)
            session.address, session.engine = connect, self.engine
            try:
                session.start(self.keys.server[0])
            except OSError as exc:
                session.failure = f"host {session.spec}: cannot run {session.argv[0]}: {exc}"
        deadline = time.monotonic() + timeout
        while True:
            waiting = False
            for session in self.sessions:
                if session.failure is not None or session.ready:
                    continue
                assert session.proc is not None
                status = session.proc.poll()
                if session.joined is not None and ready(session.name) >= session.joined:
                    session.ready = True
                elif status is not None:
                    if session._reader is not None:
                        session._reader.join(5.0)  # all of its output, for the reason
                    session.failure = session.explain(status, self.python)
                elif time.monotonic() >= deadline:
                    session.failure = (f"host {session.spec}: its workers were not ready within {timeout:g} s "
                                       f"(start_timeout): {(list(session.tail) or ['(no output)'])[-1]}")
                else:
                    waiting = True
            if not waiting:
                break
            time.sleep(0.02)
        started = [s for s in self.sessions if s.ready]
        for session in self.sessions:
            if session.failure is not None:
                self.failures.append(session.failure)
                _say(session.failure)
                session.end(timeout=0.0)
        needed = self.config.min_hosts or len(self.sessions)
        if len(started) < needed:
            raise WorkerStartError(
                f"{len(started)} of {len(self.sessions)} hosts started, {needed} needed (min_hosts): "
                + "; ".join(self.failures)
            )

    def close(self) -> None:
        """End every session (after the driver's Shutdown, so the hosts mostly ended already)."""
        deadline = time.monotonic() + CLOSE_GRACE
        for session in self.sessions:
            session.closing = True
            session.close_stdin()
        for session in self.sessions:
            session.end(timeout=max(0.0, deadline - time.monotonic()))

    def ended(self) -> list[str]:
        """Hosts whose session ended while the runtime ran (their workers are lost or left)."""
        return [s.spec for s in self.sessions if s.ready and s.proc is not None and s.proc.poll() is not None]
