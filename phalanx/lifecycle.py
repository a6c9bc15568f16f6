"""Local workers' lives on the driver's side: start, retire, stop, kill, and what an exit means.

:class:`Lifecycle` spawns local workers (through the fork server, all of a
batch at once), retires and stops workers, kills those whose task overran
``timeout + abort_grace``, and turns a worker's exit into redelivery of what
it held, a replacement, or a broken runtime (the core's ``worker_died``
decides which).

Threads: :meth:`Lifecycle.on_exit` runs on the supervisor thread (and on
helper threads for remote workers lost or gone); :meth:`Lifecycle.start_workers`
on the thread that starts the runtime; the pump thread starts owed
replacements and expires overdue tasks; kills run on helper threads (killing
a worker's process tree may wait for it).

Locks: worker records, the job table and the routing are changed under the
driver's lock; ``owed`` and ``start_failures`` too (the pump reads ``owed``
unlocked to see whether to look). No lock is held while outcomes are
delivered, exit listeners run, or processes are spawned or killed.

Invariants kept:

* **No hang.** A worker's exit redelivers every task it held (after the
  pump read what it wrote before dying, so a finished task is neither
  redelivered nor charged); a task that overruns its deadline has its
  worker killed; a runtime that cannot replace its workers breaks.
* **Crash attribution.** A crash is charged to one task (the core's rule);
  planned exits (retiring, lost, left, aborted, expired) charge none.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil
import zmq

from .core.tasks import Delivery, Job
from .errors import RuntimeBrokenError, RuntimeClosedError, WorkerStartError
from .membership import _Worker
from .policy import DEFAULT_TAG
from .transport.codec import encode
from .transport.messages import Stop
from .worker import ABORT_EXIT, WorkerSpec, greeting

if TYPE_CHECKING:
    from .driver import Driver

__all__ = ["Lifecycle", "PIPE_DRAIN_WAIT", "EXPIRY_SLACK"]

log = logging.getLogger("phalanx.driver")

#: seconds a local worker's exit waits for the pump to read what it wrote before dying
PIPE_DRAIN_WAIT = 1.0

#: seconds past a task's ``timeout + abort_grace`` before the driver kills its worker: the
#: worker's own kill at that time comes first when it can (a planned exit either way)
EXPIRY_SLACK = 0.2

#: seconds between looks at whether the workers holding tasks are stopped, while shutdown waits
FROZEN_CHECK = 0.25
_STOPPED = (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


def _start_error(exc: OSError) -> WorkerStartError:
    """The runtime's first workers could not be started (``exc``): its start failed, as
    the constructor says it does."""
    return WorkerStartError(f"worker failed to start: {exc}")


class Lifecycle:
    """Starting, stopping and losing the driver's workers (see the module docstring).

    What it uses of the driver: its lock and condition, the worker and job
    tables, the routing, ``outcomes`` (``worker_died``), the supervisor, the
    pipes (``add``), ``_deliver``, ``break_runtime``, exit listeners, counters.
    """

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.worker_ids = itertools.count(1)
        #: why local workers failed to start (start_workers raises with them)
        self.start_failures: list[str] = []
        #: tags of retired workers whose replacements the pump still has to start
        self.owed: deque[tuple[str, ...]] = deque()
        #: the supervisor reports exits (started by start_workers, or by a shutdown before it)
        self.supervising = False
        #: the first workers were all ready (start_workers returned)
        self.started = False
        #: the first workers' pipe ends, asked for before the driver's pipes existed (start_workers adds them)
        self.unpiped: deque[tuple[_Worker, socket.socket]] = deque()
        #: the replacement of each worker that died before the first workers were all ready
        self.replaced: dict[str, str] = {}

    def close_unpiped(self) -> None:
        """Close the first workers' ends no pump took (a start that failed before it began)."""
        while self.unpiped:
            worker, end = self.unpiped.popleft()
            end.close()
            worker.close_control()

    def spawn_owed(self) -> None:
        """Start the replacements of retired workers (pump thread)."""
        driver = self.driver
        while self.owed:
            with driver._lock:
                if driver._closed or driver._broken is not None:
                    break
                tags = self.owed.popleft()
            try:
                self.spawn(tags)
            except Exception as exc:
                driver.break_runtime(RuntimeBrokenError(f"cannot start a worker: {exc}"))

    def request_workers(self, groups: dict[str, int], timeout: float | None = None) -> Callable[[], list[str]]:
        """Ask for so many workers per tag; the function that waits until they are forked
        (not ready) and returns their ids (call it once, before any other spawn). A fork
        server forked by this request that has not forked them within ``timeout`` fails the
        start (WorkerStartError), as workers not ready within it do.

        Their pipes are the pump's at once, before their pids are known: the pump, started
        before the fork server's replies are read, reads each Hello as soon as it is written."""
        return self._request([(tag,) for tag, count in groups.items() for _ in range(count)], early=True,
                             timeout=timeout)

    def start_workers(self, groups: dict[str, int], timeout: float,
                      requested: Callable[[], list[str]] | None = None) -> None:
        """Spawn so many workers per tag (``requested``: those already asked for instead) and
        wait until so many are connected, ready and alive (a worker that died before it was
        ready counts by its replacement); the watcher and the pump start in between."""
        driver = self.driver
        requested = requested or self.request_workers(groups, timeout)
        while self.unpiped:
            driver.pipes.add(*self.unpiped.popleft())
        driver._pump_thread.start()  # before the replies: the workers' Hellos do not wait for them
        ids = requested()
        n = len(ids)
        # Exits are reported from now on, but the fork server's are read (its reader thread
        # started) only when the pump sees a worker's pipe end, SOCKETS_AFTER the start (see
        # pump.Pump), at shutdown, or if the start takes a wait slice or more: a first worker
        # that dies ends its pipe, which the pump reads at once.
        driver._supervisor.start(watch=False)
        driver.pump.later.insert(0, driver._supervisor.watch)
        self.supervising = True
        deadline = time.monotonic() + timeout
        with driver._changed:
            while True:
                if self.start_failures:
                    raise WorkerStartError(
                        "worker failed to start: " + "; ".join(self.start_failures)
                        + " (does the main module start a Runtime outside "
                        "`if __name__ == \"__main__\":`?)"
                    )
                if driver._broken is not None:  # its workers cannot be replaced
                    raise WorkerStartError(f"workers failed to start: {driver._broken}") from driver._broken
                # A first worker that died once another was ready is replaced (see on_exit): it
                # is its replacement that is waited for, not a worker that will never be ready.
                ready = 0
                for i in ids:
                    while i in self.replaced:
                        i = self.replaced[i]
                    w = driver._workers[i.encode()]
                    ready += w.ready and w.alive
                if ready == n:
                    self.started = True
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerStartError(
                        f"only {ready} of {n} workers connected within {timeout:.1f} s"
                    )
                if not driver._changed.wait(min(remaining, 0.1)):
                    driver._supervisor.watch()  # a slow start: whatever ends a worker, its exit is read

    def spawn(self, tags: tuple[str, ...] = (DEFAULT_TAG,)) -> str:
        return self.spawn_many([tags])[0]

    def spawn_many(self, groups: list[tuple[str, ...]]) -> list[str]:
        """Start one local worker per tags tuple (the fork server gets every request at once); their ids."""
        return self._request(groups)()

    def _request(self, groups: list[tuple[str, ...]], early: bool = False,
                 timeout: float | None = None) -> Callable[[], list[str]]:
        """Send the requests of :meth:`spawn_many`; the function that finishes it."""
        driver = self.driver
        deadline = None if timeout is None else time.monotonic() + timeout
        workers: list[_Worker] = []
        specs: list[WorkerSpec] = []
        # Local workers run on this host: its name is asked once here, not by each of them.
        host = driver.config.host_name or socket.gethostname()
        for tags in groups:
            wid = f"w{next(self.worker_ids)}"
            worker = _Worker(wid, tags)
            with driver._lock:
                driver._workers[worker.ident] = worker
            spec = WorkerSpec(
                worker_id=wid,
                endpoints=driver.endpoints,
                credits=driver.config.credits,
                parent_pid=os.getpid(),
                abort_grace=driver.config.abort_grace,
                max_memory=driver.config.max_memory_per_worker,
                heartbeat_timeout=max(0.0, driver.config.heartbeat_timeout),
                heartbeat_interval=driver.config.heartbeat_interval,
                reconnect=driver.config.reconnect,
                prefix_output=driver.config.prefix_output,
                host=host,
                tags=tags,
                limits=driver.limits,
                spin=driver.config.spin,
                log_level=driver.config.log_level,
                implicit_operations=driver.config.implicit_operations,
                shm_threshold=driver.config.shm_threshold,
                local_pickle=driver.config.local_pickle,
                greeting=greeting(wid, host, tags, driver.config.credits),
            )
            workers.append(worker)
            specs.append(spec)
        def take_ends(ends: list[tuple[socket.socket, socket.socket]]) -> None:
            # Asked for while the driver is still being built: the pump gets them when it starts
            # (start_workers). A pipe whose worker is never forked ends at once (the server
            # closed its copy): the pump reads its end as any worker's.
            for worker, (end, control) in zip(workers, ends):
                worker.control = control
                self.unpiped.append((worker, end))

        try:
            # The first workers' exits are read from the fork server only once it matters (see
            # start_workers): the reader thread's start is no work on the way to the first result.
            finish = driver._supervisor.request_piped(specs, take_ends if early else None, deadline,
                                                      watch=not early)
        except OSError as exc:  # no socket, or no fork server (its fork failed)
            if not early:
                raise
            raise _start_error(exc) from exc

        def done() -> list[str]:
            try:
                return finished()
            except OSError as exc:  # no fork (the process limit, memory), or no fork server
                if not early:
                    raise
                if isinstance(exc, TimeoutError) and timeout is not None:  # the server forked none in time
                    raise WorkerStartError(f"only 0 of {len(workers)} workers connected within {timeout:.1f} s") \
                        from exc
                raise _start_error(exc) from exc

        def finished() -> list[str]:
            started = finish()
            failed: OSError | None = None
            for worker, result in zip(workers, started):
                if isinstance(result, OSError):
                    failed = failed or result
                    continue
                worker.pid, end, control = result
                if not early:
                    worker.control = control
                    driver.pipes.add(worker, end)
            if not early:
                # The pump polls the new pipes from its next round. (The first workers' pipes are
                # its own from its start: no round for nothing while they start up.)
                driver.wake()
            if failed is not None:
                raise failed
            return [w.id for w in workers]

        return done

    def on_exit(self, worker_id: str, exitcode: int | None, lost: bool = False, left: bool = False) -> None:
        """A worker process exited (supervisor thread): redeliver, replace, or break.

        ``lost``: a remote worker whose heartbeats stopped (pump, via a helper
        thread). Its tasks are redelivered without charging them a crash, it
        does not count towards the restart intensity, and it is not replaced
        here (its own host's ``phalanx worker`` does that). ``left``: the same
        for a remote worker that said Goodbye.
        """
        driver = self.driver
        failed: list[tuple[Job, int, Delivery]] = []
        broken: BaseException | None = None
        pending_worker = driver._workers.get(worker_id.encode())
        if pending_worker is not None and pending_worker.pipe is not None and driver._pump_thread.is_alive():
            # Handle what it wrote before it died first, so a finished task is never
            # redelivered nor charged the crash (bounded: a process it forked may hold the pipe).
            pending_worker.pipe_done.wait(PIPE_DRAIN_WAIT)
        with driver._lock:
            worker = driver._workers.get(worker_id.encode())
            if worker is None or not worker.alive:
                return
            worker.alive = False
            worker.died_at = time.monotonic()
            worker.close_control()
            driver._remove_live_locked(worker)
            if driver._closed:
                return
            # ABORT_EXIT: it ended itself, its task having ignored the abort flag for abort_grace;
            # expired: the driver killed it for that (a task holding the GIL, a frozen process).
            expired = worker.expired
            planned = worker.retiring or lost or left or exitcode == ABORT_EXIT or expired is not None
            if lost:
                driver.workers_lost += 1
            elif left:
                driver.workers_left += 1
            elif not planned:
                driver.worker_deaths += 1
            if not worker.ready and not planned and driver.worker_deaths == 1 and not driver._live:
                self.start_failures.append(f"{worker_id} exited with code {exitcode}")
                driver._changed.notify_all()
            # Redeliver everything it held; the core charges the crash (or splits the map
            # chunk it ran, until the crash is one item's) and counts the deaths.
            failed, requeue, broken = driver.outcomes.worker_died(
                worker_id, worker.inflight.values(), exitcode, planned, worker.died_at, expired)
            if driver.outcomes.requeue:
                driver._requeue_locked()  # a failed map chunk's rest, under Ignore
            # Back to the front of its tag's queue, in the order the worker held them.
            tags = {task.job: driver._jobs[task.job].tag for task in requeue}
            for tag in dict.fromkeys(tags.values()):
                driver._enqueue_locked(tag, [t for t in requeue if tags[t.job] == tag], front=True)
            respawn = broken is None and not worker.retiring and not self.start_failures and not worker.remote
            driver._dispatch_locked()
            driver._changed.notify_all()
        driver._deliver(failed)
        for listener in driver.exit_listeners:
            try:
                listener(worker_id, exitcode)
            except Exception:
                pass
        if broken is not None:
            driver.break_runtime(broken)
        elif respawn:
            with driver._lock:
                driver.worker_restarts += 1
            try:
                replacement = self.spawn(worker.tags)  # the replacement serves the same tags
                if not self.started:  # start_workers waits for it instead
                    with driver._changed:
                        self.replaced[worker_id] = replacement
                        driver._changed.notify_all()
            except RuntimeClosedError:
                pass  # shutdown() won the race: it stops everything spawn() started
            except Exception as exc:  # cannot start processes any more
                driver.break_runtime(RuntimeBrokenError(f"cannot respawn a worker: {exc}"))

    def retire_locked(self, w: _Worker) -> None:
        """Send ``w`` nothing more, start its replacement, Stop it once idle."""
        driver = self.driver
        if w.retiring or not w.alive:
            return
        w.retiring = True
        w.free = 0
        driver._remove_live_locked(w)
        driver.workers_recycled += 1
        if not w.remote:
            self.owed.append(w.tags)  # a remote worker's own host starts its replacement
        if not w.inflight:
            self.stop_locked(w)
        os.write(driver._wake_w, b"s")

    def stop_locked(self, w: _Worker) -> None:
        w.stop_sent = time.monotonic()
        try:
            self.driver._send_raw_locked(w.ident, encode(Stop()))
        except zmq.ZMQError:
            pass
        if w.remote and w.retiring and not w.inflight and w.alive:
            # Nobody watches a remote process: it is gone once told to stop idle.
            w.alive = False
            w.died_at = time.monotonic()

    def kill_soon(self, w: _Worker) -> None:
        """SIGKILL a local worker from a helper thread (killing its tree may wait for it)."""
        threading.Thread(target=self.driver._supervisor.kill, args=(w.id,), daemon=True, name="phalanx-kill").start()

    def expire_overdue(self, now: float) -> bool:
        """Kill workers whose running task overran ``timeout + abort_grace`` (pump thread).

        The worker enforces a task's timeout itself, but cannot when the task
        holds the GIL in C code or the process is frozen (SIGSTOP): then the
        driver does. A worker runs the tasks it holds in order, so only the
        first one runs; its clock starts when it became first (at the latest
        when it started). Its outcome is TaskTimeoutError (see :meth:`on_exit`);
        the other tasks the worker held are redelivered uncharged. True while
        a task with a timeout is in flight (the pump then looks often).
        """
        driver = self.driver
        grace = driver.config.abort_grace
        timed = False
        overdue: list[_Worker] = []
        with driver._lock:
            for w in driver._workers.values():
                if not w.alive or w.expired is not None or not w.inflight:
                    continue
                task = next(iter(w.inflight.values()))
                timeout = getattr(task.msg, "timeout", 0.0)
                if timeout <= 0:
                    continue
                timed = True
                if now - w.head_since < timeout * task.items + grace + EXPIRY_SLACK:
                    continue
                w.expired = (task.job, task.seq)
                w.free = 0
                driver._remove_live_locked(w)
                if w.remote:
                    self.stop_locked(w)
                overdue.append(w)
        for w in overdue:
            log.warning("worker %s ran a task past its timeout and abort_grace: killing it", w.id)
            if w.remote:  # not ours to kill: it is told to stop, and lost for the driver
                threading.Thread(target=self.on_exit, args=(w.id, None, True), daemon=True,
                                 name="phalanx-lost").start()
            else:
                self.kill_soon(w)
        return timed

    def wait_idle(self, timeout: float | None, frozen_after: float | None = None) -> bool:
        """Wait until no task is pending or in flight.

        ``frozen_after``: stop waiting (False) once every worker holding tasks
        has been stopped (SIGSTOP) that many seconds: they make no progress.
        """
        driver = self.driver
        deadline = None if timeout is None else time.monotonic() + timeout
        looked = 0.0
        with driver._changed:
            while driver._pending or any(w.inflight for w in driver._workers.values() if w.alive):
                if frozen_after is not None and time.monotonic() - looked >= FROZEN_CHECK:
                    looked = time.monotonic()
                    if self.frozen_locked(looked, frozen_after):
                        return False
                if any(tag not in driver._live_tags for tag in driver._pending):
                    # Cancelled work waits for no worker; the rest fails at its route timeout.
                    driver.routing.prune()
                    if not driver._pending and not any(w.inflight for w in driver._workers.values() if w.alive):
                        break
                if driver._broken is not None:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                driver._changed.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def frozen_locked(self, now: float, after: float) -> bool:
        """Some local workers hold tasks, and every one that does was stopped ``after`` s ago or more."""
        holders = [w for w in self.driver._workers.values() if w.alive and w.inflight]
        for w in holders:  # every one looked at: each one's clock starts now
            try:
                stopped = not w.remote and psutil.Process(w.pid).status() in _STOPPED
            except psutil.Error:
                stopped = False
            w.stopped_since = (w.stopped_since or now) if stopped else 0.0
        return bool(holders) and all(w.stopped_since and now - w.stopped_since >= after for w in holders)
