"""Who the driver's workers are: their records, the handshake, remote joins, heartbeats, leaving.

:class:`Membership` admits workers and keeps track of them: local workers
say Hello on their pipe, remote ones on the tcp endpoints (CURVE keys from
``authorized_keys``, checked by ZAP in the authenticator thread); the driver
answers Welcome and dispatches to them once they are Ready. A local worker
says Ready right after Hello (it hears control messages on its own control
pipe, which holds them until it reads); a remote one only once a Sync came
through its SUB (a subscription takes effect some time after it connects),
so the pump publishes Sync while one is joining. A remote worker sends
Alive heartbeats; when they stop for ``heartbeat_timeout`` it is declared
lost, and one that says Goodbye has left: in both cases its tasks are redelivered (``Lifecycle.on_exit``).

Threads: the pump thread runs everything here except :meth:`Membership.secure_tcp`
(the driver's constructor) and :meth:`Membership.close_security` (shutdown).
Locks: worker records (``_Worker``) and the driver's table of them are
read and changed under the driver's lock, as the ``*_locked`` names say;
``holders`` and ``monitors`` are the pump's own.

Invariants kept:

* one record per worker identity; a local worker's name (``w<N>``) is
  never a tcp peer's;
* a remote worker's identities (``X``, ``X!``, ``X~N``) belong to the CURVE
  key that said Hello as ``X``, and its tasks go out only on a tasks
  connection that key opened (``holders``);
* bad input (a malformed Hello, a frame under someone else's identity) is
  counted in ``frames_dropped`` and never acted on.
"""

from __future__ import annotations

import itertools
import logging
import re
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from .core.tasks import Task
from .errors import ProtocolError
from .policy import DEFAULT_TAG, check_tag
from .transport import sockets
from .transport.codec import decode_driver, encode
from .transport.messages import PROTOCOL_VERSION, Alive, Goodbye, Heartbeat, Hello, Ready, Sync, Welcome, is_inbox
from .transport.pipe import FramePipe

if TYPE_CHECKING:
    from .driver import Driver

__all__ = ["Membership", "_Worker", "REMOTE_HEARTBEAT_TIMEOUT", "MAX_TAGS", "MAX_HOLDERS"]

log = logging.getLogger("phalanx.driver")
auth_log = logging.getLogger("phalanx.auth")

#: seconds without a remote worker's Alive before it is declared lost (default)
REMOTE_HEARTBEAT_TIMEOUT = 10.0
#: most tags a remote worker may announce
MAX_TAGS = 64
#: tasks-ROUTER identities whose holder the driver remembers (the oldest are forgotten)
MAX_HOLDERS = 65536
#: the names of the driver's own (local) workers: no tcp peer may use or claim them
_LOCAL_ID = re.compile(rb"w\d+\Z")


class _Worker:
    __slots__ = (
        "id", "ident", "pid", "hello", "welcomed", "ready", "alive", "free", "inflight",
        "tasks", "items", "busy", "died_at", "retiring", "dispatched",
        "remote", "host", "seen", "stop_sent", "tags", "frames_dropped", "pipe", "pipe_done",
        "reader", "leftover", "broken", "delivering", "deferred", "held", "held_at",
        "head_since", "expired", "stopped_since", "key", "oldest", "reclaiming", "inbox", "credits",
        "control",
    )

    def __init__(self, worker_id: str, tags: tuple[str, ...] = (DEFAULT_TAG,)) -> None:
        self.id = worker_id
        #: work routed to one of these tags may go to it
        self.tags = tags
        self.ident = worker_id.encode()
        self.pid = 0
        self.hello = False
        self.welcomed = False
        self.ready = False
        self.alive = True
        self.free = 0
        #: the tasks it takes at once (its Ready's credits)
        self.credits = 0
        self.inflight: dict[tuple[int, int], Task] = {}
        self.tasks = 0
        self.items = 0
        self.busy = 0.0
        self.died_at = 0.0
        self.retiring = False
        self.dispatched = 0
        #: joined over tcp (not ours to spawn, watch or replace)
        self.remote = False
        self.host = ""
        #: a remote worker's CURVE key (z85; b"" on an insecure runtime): only frames
        #: under its identities (plain, "!", "~...") that this key sent are its own
        self.key: bytes | None = None
        #: a remote worker's secret routing identity on the tasks ROUTER, from its Hello (see
        #: messages.Hello): its tasks go there, never to ``ident``, which other hosts can know
        self.inbox = b""
        #: last time anything arrived from it (remote workers' liveness)
        self.seen = 0.0
        self.stop_sent = 0.0
        #: malformed frames the worker reports it dropped (a running total)
        self.frames_dropped = 0
        #: a local worker's socketpair (None: ZeroMQ, remote workers)
        self.pipe: FramePipe | None = None
        #: set by the pump once it read the pipe to its end (everything the worker wrote is handled)
        self.pipe_done = threading.Event()
        #: held while reading the pipe and handling what was read (the pump, or a caller: phalanx.direct)
        self.reader = threading.Lock()
        #: frames a caller read but left to the pump (anything but outcomes), handled before the next read
        self.leftover: list[bytes] = []
        #: a caller's read found a frame above max_frame (the pump then ends the pipe)
        self.broken = False
        #: callers delivering outcomes they read here: frames after them wait (see phalanx.direct)
        self.delivering = 0
        #: the pump passed this pipe by while callers delivered: the last of them calls it back
        self.deferred = False
        #: task frames for this (busy) local worker not yet written, and since when (monotonic)
        self.held: list[bytes] = []
        self.held_at = 0.0
        #: since when the first task in ``inflight`` (the one it runs: tasks run in order) is first
        self.head_since = 0.0
        #: (job, seq) of the task it was killed for, having overrun timeout + abort_grace
        self.expired: tuple[int, int] | None = None
        #: since when shutdown found its process stopped (SIGSTOP), 0.0: not stopped
        self.stopped_since = 0.0
        #: its oldest task in flight at the pump's last look, and whether a Reclaim awaits its answer
        self.oldest: tuple[int, int] | None = None
        self.reclaiming = False
        #: a local worker's control pipe, the driver's end (SOCK_SEQPACKET, non-blocking;
        #: None: a remote worker, which hears control messages on the PUB)
        self.control: socket.socket | None = None

    def close_control(self) -> None:
        """Close its control pipe (it is gone, or the runtime is; under the driver's lock)."""
        control, self.control = self.control, None
        if control is not None:
            control.close()




class Membership:
    """Admission and liveness of the driver's workers (see the module docstring).

    What it uses of the driver: its lock and condition, the worker table, the
    tasks ROUTER and control PUB, ``_send_raw_locked``, the routing's live set
    (``_add_live_locked``/``_remove_live_locked``, ``_dispatch_locked``), counters,
    and ``lifecycle`` (stop, exit).
    """

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        #: the ZAP authenticator of a listening, secure runtime
        self.auth: Any = None
        #: handshake-failure monitors of the tcp endpoints -> the endpoint
        self.monitors: dict[zmq.Socket[bytes], str] = {}
        #: inbox identities on the tasks ROUTER -> the key whose Hello arrived there under it
        self.holders: dict[bytes, bytes] = {}
        self.sync_nonce = itertools.count()
        config = driver.config
        self.remote_timeout = config.heartbeat_timeout if config.heartbeat_timeout > 0 else REMOTE_HEARTBEAT_TIMEOUT
        #: when the pump last published a Heartbeat and a Sync, and the Heartbeats' numbers. The
        #: first Heartbeat goes out one interval after the start, not while the first workers
        #: start up (each would wake to read it; none watches for heartbeats that early)
        self.last_beat = time.monotonic()
        self.last_sync = 0.0
        self.beats = itertools.count()

    def tick(self, now: float, handshaking: bool) -> None:
        """Heartbeats out and in (every ``heartbeat_interval``), Sync while workers start (pump thread)."""
        driver = self.driver
        if now - self.last_beat >= driver.config.heartbeat_interval:
            self.last_beat = now
            with driver._lock:
                driver.publish_locked(encode(Heartbeat(next(self.beats))))
            if driver.address is not None:
                self.check_remote(now)
        if handshaking and now - self.last_sync > 0.001:
            self.last_sync = now
            self.greet()

    def close_security(self) -> None:
        """Close the handshake monitors and stop the authenticator (before the context ends)."""
        for mon in self.monitors:
            mon.close(linger=0)
        self.monitors.clear()
        auth, self.auth = self.auth, None
        if auth is not None:
            auth.stop()

    def secure_tcp(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> sockets.Curve | None:
        """Start the authenticator on ``ctx`` and load the server key (None: ipc only, or insecure)."""
        driver = self.driver
        config = driver.config
        if driver.address is None:
            return None
        if config.insecure:
            message = (f"phalanx: WARNING: listening on {config.listen} WITHOUT CURVE (insecure=True): "
                       "anyone who can reach it can run registered operations and read results")
            log.warning(message)
            print(message, file=sys.stderr, flush=True)
            return None
        from .transport import keys

        run = driver.run_keys
        if run is not None and config.server_key is None:
            public, secret = run.server
        else:
            assert config.server_key is not None
            public, secret = keys.load_secret(config.server_key)
        assert config.authorized_keys is not None or run is not None
        self.auth = keys.Authenticator(ctx, config.authorized_keys, run)
        self.auth.start()
        return sockets.Curve(public, secret)

    def on_monitor(self, mon: zmq.Socket[bytes]) -> None:
        """Log peers refused during the handshake on a tcp endpoint (wrong, no or plaintext key)."""
        for code in sockets.handshake_failures(mon):
            self.driver.peers_refused += 1
            if code == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                kind = "its CURVE key is not authorized"
            elif code == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                kind = "protocol error (a plaintext or mismatched peer?)"
            else:
                kind = "the security handshake failed (a peer without the right keys?)"
            auth_log.warning("refused a peer on %s: %s", self.monitors[mon], kind)

    def origin(self, frame: zmq.Frame) -> bytes | None:
        """Who sent ``frame`` to a listening runtime: None over ipc (our own processes),
        else the CURVE key that ZAP accepted (z85), or b"" over insecure tcp."""
        try:
            return str(frame.get("User-Id")).encode()
        except zmq.ZMQError:  # no ZAP: ipc, or tcp without CURVE
            pass
        if self.auth is None and not str(frame.get("Peer-Address")).startswith("localhost:"):
            return b""  # tcp peers carry their address; ipc ones "localhost:uid:gid:pid"
        return None

    def admit(self, ident: bytes, origin: bytes) -> bool:
        """Whether a tcp peer whose key is ``origin`` may speak as ``ident`` (pump thread).

        A worker's identities (``X``, its side channel ``X!``, its channel ends
        ``X~N``) belong to the key that said Hello as ``X``; local workers' belong
        to none. A stranger may use a plain identity outside the local workers'
        names (to join with Hello; on an insecure runtime also to inspect).
        """
        base = ident.partition(b"~")[0]
        if base.endswith(b"!"):
            base = base[:-1]
        w = self.driver._workers.get(base)
        if w is None:
            return base == ident and _LOCAL_ID.match(ident) is None
        return w.remote and w.key == origin

    def drain_tasks(self) -> None:
        """Read what peers wrote to the tasks ROUTER, so its tcp connections' input never
        stops (see transport/sockets.py). Pump thread.

        A remote worker writes one frame there, its Hello, when its inbox connects
        under the secret identity the Hello names (``inbox``): the key that sent it
        holds the identity tasks for that worker go to, and the worker is welcomed
        (given anything) only if that is the key it joined with. Everything else is
        dropped and counted.
        """
        driver = self.driver
        with driver._lock:
            tasks = driver._tasks
            for _ in range(4096):
                if tasks is None or tasks.closed:
                    return
                try:
                    frames = tasks.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.ZMQError:
                    return
                origin = self.origin(frames[-1])
                if len(frames) == 2 and origin is not None:
                    ident = frames[0].bytes
                    try:
                        msg = decode_driver(frames[1].bytes)
                    except ProtocolError:
                        msg = None
                    if isinstance(msg, Hello) and msg.inbox.encode() == ident and is_inbox(ident):
                        if ident not in self.holders:
                            self.holders[ident] = origin
                            if len(self.holders) > MAX_HOLDERS:
                                self.holders.pop(next(iter(self.holders)))
                            continue
                        if self.holders[ident] == origin:
                            self.inbox_back_locked(ident, origin)
                            continue
                driver.frames_dropped += 1

    def inbox_back_locked(self, inbox: bytes, key: bytes) -> None:
        """A remote worker's inbox said Hello again, having reconnected: if a send to it
        failed meanwhile (it then takes no new work), it takes work again."""
        driver = self.driver
        for w in driver._workers.values():
            if w.inbox == inbox and w.key == key:
                if (w.alive and w.ready and not w.retiring and not w.stop_sent and w.expired is None
                        and not driver._closed and w not in driver._live):
                    w.free = max(0, w.credits - sum(not t.directed for t in w.inflight.values()))
                    driver._add_live_locked(w)
                    driver._dispatch_locked()
                return

    def check_remote(self, now: float) -> None:
        """Declare remote workers lost whose heartbeats stopped (pump thread)."""
        driver = self.driver
        lost = []
        with driver._lock:
            for w in driver._workers.values():
                if w.remote and w.alive and now - w.seen > self.remote_timeout:
                    lost.append(w.id)
        for wid in lost:
            log.warning("remote worker %s lost: no heartbeat for %.1f s; redelivering its tasks",
                        wid, self.remote_timeout)
            # A helper thread: exit listeners (actor supervision) may wait on the pump.
            threading.Thread(target=driver.lifecycle.on_exit, args=(wid, None, True), daemon=True,
                             name="phalanx-lost").start()

    def handshaking(self) -> bool:
        """A remote worker is joining (the pump then publishes Sync every millisecond). A local
        worker needs no Sync: its Hello and Ready come on its pipe, which wakes the pump."""
        return any(w.alive and not w.ready and w.remote for w in list(self.driver._workers.values()))

    def greet(self) -> None:
        """Welcome workers that said Hello; publish Sync until they are Ready."""
        driver = self.driver
        with driver._lock:
            control = driver._control
            if control is None or control.closed:
                return
            control.send(encode(Sync(next(self.sync_nonce))))
            for w in driver._workers.values():
                if w.alive and w.hello and not w.welcomed:
                    self.welcome_locked(w)

    def welcome_locked(self, w: _Worker) -> None:
        driver = self.driver
        if w.remote and self.holders.get(w.inbox) != w.key:
            return  # its tasks connection is not shown to be its own (yet): _greet retries
        if driver._closed:
            # A replacement that connected after shutdown sent Stop and Shutdown:
            # answer its Hello with Stop, so it exits now rather than at the timeout.
            driver.lifecycle.stop_locked(w)
            return
        try:
            driver._send_raw_locked(w.ident, encode(Welcome(w.id, driver.limits.max_frame)))
        except zmq.ZMQError:
            return  # the inbox is not connected yet: _greet retries
        w.welcomed = True

    def reap_dead(self) -> None:
        driver = self.driver
        now = time.monotonic()
        with driver._lock:  # the supervisor thread adds replacements meanwhile
            ttl = driver.dead_worker_ttl
            dead = [k for k, w in driver._workers.items() if not w.alive and now - w.died_at > ttl]
            for k in dead:
                driver._workers.pop(k, None)

    def on_alive(self, ident: bytes, msg: Alive) -> None:
        driver = self.driver
        with driver._lock:
            w = driver._workers.get(ident)
            if w is None or msg.worker != w.id:
                driver.frames_dropped += 1
                return
            now = time.monotonic()
            w.seen = now
            if not w.alive and w.remote and now - w.stop_sent > 1.0:
                # Declared lost, but back (a healed partition): its tasks went
                # elsewhere; tell it to stop, its host starts a fresh worker.
                driver.lifecycle.stop_locked(w)

    def on_goodbye(self, ident: bytes, msg: Goodbye) -> None:
        """A remote worker leaves: send it nothing more, acknowledge, redeliver what it held now."""
        driver = self.driver
        with driver._lock:
            w = driver._workers.get(ident)
            if w is None or msg.worker != w.id or not w.remote:
                driver.frames_dropped += 1
                return
            driver.lifecycle.stop_locked(w)  # the acknowledgement the worker waits for before it exits
            if not w.alive:
                return
            w.free = 0
            driver._remove_live_locked(w)
            held = len(w.inflight)
        log.info("remote worker %s left; redelivering the %d tasks it held", w.id, held)
        # A helper thread, as for a lost worker: exit listeners may wait on the pump.
        threading.Thread(target=driver.lifecycle.on_exit, args=(w.id, None), kwargs={"left": True}, daemon=True,
                         name="phalanx-left").start()

    def join_locked(self, ident: bytes, msg: Hello, origin: bytes | None) -> _Worker | None:
        """A remote worker's first Hello: add it, owned by the key ``origin`` (listening runtimes only)."""
        driver = self.driver
        if (
            driver.address is None
            or driver._closed
            or msg.worker.encode() != ident
            or not msg.worker
            or b"!" in ident
            or b"~" in ident
            or _LOCAL_ID.match(ident) is not None
            or msg.version != PROTOCOL_VERSION
            or len(msg.tags) > MAX_TAGS
            or not is_inbox(msg.inbox.encode())
            or any(v.inbox == msg.inbox.encode() for v in driver._workers.values())
        ):
            return None
        try:
            tags = tuple(dict.fromkeys(check_tag(t) for t in msg.tags)) or (DEFAULT_TAG,)
        except ValueError:
            return None  # a malformed tag: refuse the worker rather than guess
        w = _Worker(msg.worker, tags)
        w.remote = True
        w.key = origin
        w.inbox = msg.inbox.encode()
        w.host = msg.host
        w.seen = time.monotonic()
        driver._workers[ident] = w
        driver.workers_joined += 1
        log.info("remote worker %s joined from %s (pid %d, tags %s)", msg.worker, msg.host, msg.pid,
                 ",".join(tags))
        return w

    def on_hello(self, ident: bytes, msg: Hello, origin: bytes | None = None) -> None:
        driver = self.driver
        with driver._lock:
            w = driver._workers.get(ident)
            if w is None:
                w = self.join_locked(ident, msg, origin)
            if w is None or msg.worker != w.id or not w.alive or w.hello:
                driver.frames_dropped += 1
                return
            w.pid = msg.pid
            w.hello = True
            self.welcome_locked(w)

    def on_ready(self, ident: bytes, msg: Ready) -> None:
        driver = self.driver
        with driver._lock:
            w = driver._workers.get(ident)
            if w is not None and not w.remote and w.stop_sent and not w.welcomed and msg.worker == w.id:
                return  # a local worker told to Stop on its Hello (shut down): its Ready came anyway
            if w is None or msg.worker != w.id or not w.alive or not w.welcomed or w.ready:
                driver.frames_dropped += 1
                return
            w.ready = True
            w.free = w.credits = max(1, msg.credits)
            driver._add_live_locked(w)
            driver._dispatch_locked()
            driver._changed.notify_all()
        for listener in driver.ready_listeners:
            try:
                listener(w.id)
            except Exception:
                pass
