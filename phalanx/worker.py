"""The worker process: a small loop that runs tasks and sends their outcomes.

Runs in every worker process (started by :mod:`phalanx.supervisor`)::

    driver ROUTER "tasks" ──▶ inbox DEALER ─┐
    driver PUB "control"  ──▶ SUB ──────────┼─▶ poll ─▶ run task ─▶ outcome
    driver ROUTER "results" ◀── outbox DEALER ◀─ Results batch ◀────┘

Invariants kept:

* **Bad input never kills.** A malformed frame is counted and dropped; an
  unknown operation, an argument that does not convert, an exception (even
  ``SystemExit``) in user code, or a result that cannot be encoded becomes an
  ``Err`` outcome for that task, and the loop goes on.
* **One outcome per task.** Every ``Call``/``Chunk`` received gets exactly one
  ``Ok`` or ``Err``, which returns its credit to the driver.
* **No orphans.** The worker asks the kernel for SIGTERM when its parent dies
  (Linux ``PR_SET_PDEATHSIG``), runs in its own process group, and a watchdog
  thread also checks the parent every 100 ms; either way it kills its whole
  process group, so anything user code spawned goes with it.
* **Lone calls are not delayed.** Outcomes are batched only while more tasks
  are already waiting and the previous one was quick.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import os
import signal
import socket as _socket
import sys
import threading
import time
from collections import deque
from typing import Any

import msgspec
import zmq

from .errors import EncodeError, ProtocolError
from .registry.operations import resolve
from .transport import sockets
from .transport.codec import decode_control, decode_inbox, encode, error_info
from .transport.endpoints import Endpoints
from .transport.messages import (
    Call,
    Chunk,
    Err,
    ErrorInfo,
    Hello,
    Ok,
    Outcome,
    Ready,
    Results,
    Shutdown,
    Stop,
    Sync,
    Terminate,
    Welcome,
)

__all__ = ["WorkerSpec", "run_worker"]

#: outcomes sent in one Results message at most
BATCH_MAX = 256
#: a task quicker than this lets the next outcome share a message
QUICK_TASK = 0.0002
#: seconds an idle worker polls before it blocks (PHALANX_SPIN, 0 disables)
SPIN = float(os.environ.get("PHALANX_SPIN", "0"))
#: seconds between watchdog checks of the parent
WATCHDOG_PERIOD = 0.1


class WorkerSpec(msgspec.Struct, frozen=True):
    """What a worker process needs to know, given to it at spawn."""

    worker_id: str
    endpoints: Endpoints
    credits: int
    parent_pid: int
    imports: list[str] = []


def _kill_own_group() -> None:
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(1)


def _on_sigterm(signum: int, frame: Any) -> None:
    _kill_own_group()


def _guard_against_orphaning(parent_pid: int) -> None:
    """Die, with everything this worker spawned, when the parent dies."""
    try:
        if os.getpgrp() != os.getpid():
            os.setpgid(0, 0)  # own group: the driver's Ctrl-C is the driver's to handle
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    # Under forkserver the parent is the fork server, not the driver: watch both.
    initial_ppid = os.getppid()

    def driver_alive() -> bool:
        if os.getppid() != initial_ppid:
            return False
        if parent_pid != initial_ppid:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
        return True

    def watchdog() -> None:
        while True:
            if not driver_alive():
                _kill_own_group()
            time.sleep(WATCHDOG_PERIOD)

    if not driver_alive():  # the parent died before prctl took effect
        _kill_own_group()
    threading.Thread(target=watchdog, name="phalanx-watchdog", daemon=True).start()


class _Loop:
    """The worker's state: sockets, queued tasks, outcomes not yet sent."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.ident = spec.worker_id.encode()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.inbox = sockets.dealer(self.ctx, spec.endpoints.tasks, self.ident)
        self.outbox = sockets.dealer(self.ctx, spec.endpoints.results, self.ident)
        self.control = sockets.subscriber(self.ctx, spec.endpoints.control)
        self.todo: deque[Call | Chunk] = deque()
        self.out: list[Outcome] = []
        self.out_ops: list[str] = []
        self.busy = 0.0
        self.terminated: set[int] = set()
        self.terminated_order: deque[int] = deque()
        self.welcomed = False
        self.synced = False
        self.ready_sent = False
        self.stopping = False
        self.frames_dropped = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---- receiving ---------------------------------------------------------

    def drain_control(self) -> None:
        while True:
            try:
                frame = self.control.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode_control(frame)
            except ProtocolError:
                self.frames_dropped += 1
                continue
            if isinstance(msg, Sync):
                self.synced = True
            elif isinstance(msg, Terminate):
                self.terminate(msg.job)
            elif isinstance(msg, Shutdown):
                self.stopping = True

    def drain_inbox(self) -> None:
        while True:
            try:
                frame = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode_inbox(frame)
            except ProtocolError:
                self.frames_dropped += 1
                continue
            if isinstance(msg, (Call, Chunk)):
                self.todo.append(msg)
            elif isinstance(msg, Welcome):
                self.welcomed = True
            elif isinstance(msg, Stop):
                self.stopping = True

    def terminate(self, job: int) -> None:
        if job in self.terminated:
            return
        self.terminated.add(job)
        self.terminated_order.append(job)
        if len(self.terminated_order) > 10_000:
            self.terminated.discard(self.terminated_order.popleft())

    # ---- running -----------------------------------------------------------

    def call(self, op_name: str, args: list[Any], kwargs: dict[str, Any] | None) -> Any:
        op = resolve(op_name)
        a, kw = op.convert_args(args, kwargs)
        value = op.fn(*a, **kw)
        if inspect.isawaitable(value):
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
            value = self.loop.run_until_complete(value)
        return value

    def run(self, task: Call | Chunk) -> Outcome:
        if task.job in self.terminated:
            return Err(task.job, task.seq, task.attempt, _terminated(task.job))
        if isinstance(task, Call):
            try:
                value = self.call(task.op, task.args, task.kwargs)
            except BaseException as exc:  # user code may raise anything; the loop survives
                return Err(task.job, task.seq, task.attempt, error_info(exc))
            return Ok(task.job, task.seq, task.attempt, value)
        return self.run_chunk(task)

    def run_chunk(self, task: Chunk) -> Outcome:
        values: list[Any] = []
        items = task.items
        if task.fold:
            try:
                if not items:
                    raise ValueError("empty fold chunk")
                acc = items[0]
                for index in range(1, len(items)):
                    acc = self.call(task.op, [acc, items[index]], None)
            except BaseException as exc:
                return Err(task.job, task.seq, task.attempt, error_info(exc))
            return Ok(task.job, task.seq, task.attempt, acc)
        index = 0
        try:
            for index, item in enumerate(items):
                if task.star:
                    values.append(self.call(task.op, item, None))
                else:
                    values.append(self.call(task.op, [item], None))
        except BaseException as exc:
            return Err(task.job, task.seq, task.attempt, error_info(exc), index, values)
        return Ok(task.job, task.seq, task.attempt, values)

    # ---- sending -----------------------------------------------------------

    def flush(self) -> None:
        if not self.out:
            return
        outcomes, ops, busy = self.out, self.out_ops, self.busy
        self.out, self.out_ops, self.busy = [], [], 0.0
        try:
            frame = encode(Results(self.spec.worker_id, outcomes, busy))
        except EncodeError:
            frame = encode(Results(self.spec.worker_id, _encodable(outcomes, ops), busy))
        self.outbox.send(frame)

    def send(self, msg: Any) -> None:
        self.outbox.send(encode(msg))

    # ---- main loop -----------------------------------------------------------

    def serve(self) -> None:
        self.send(Hello(self.spec.worker_id, os.getpid(), _socket.gethostname()))
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        inbox, control = self.inbox, self.control
        while not self.stopping:
            if not self.todo:
                self.flush()
                timeout = None if self.ready_sent else 10
                if self.ready_sent and SPIN > 0:
                    # Spin briefly before blocking: waking a blocked process costs far
                    # more than a short spin, and the next task of a round trip is near.
                    deadline = time.perf_counter() + SPIN
                    while not inbox.poll(0) and time.perf_counter() < deadline:
                        pass
                events = dict(poller.poll(timeout))
                if control in events:
                    self.drain_control()
                if inbox in events:
                    self.drain_inbox()
                if not self.ready_sent and self.welcomed and self.synced:
                    self.send(Ready(self.spec.worker_id, self.spec.credits))
                    self.ready_sent = True
                continue
            task = self.todo.popleft()
            started = time.perf_counter()
            outcome = self.run(task)
            elapsed = time.perf_counter() - started
            self.busy += elapsed
            self.out.append(outcome)
            self.out_ops.append(task.op)
            # Batch only under load: more work waiting and this task was quick.
            if control.poll(0):
                self.drain_control()
            if inbox.poll(0):
                self.drain_inbox()
            if not self.todo or elapsed >= QUICK_TASK or len(self.out) >= BATCH_MAX:
                self.flush()
        self.flush()

    def close(self) -> None:
        sockets.close(self.inbox, self.outbox, self.control)
        self.ctx.term()


def _terminated(job: int) -> ErrorInfo:
    return ErrorInfo(
        type="phalanx.errors:TaskCancelledError",
        message=f"job {job} was terminated",
        args=None,
        traceback="",
    )


def _encodable(outcomes: list[Outcome], ops: list[str]) -> list[Outcome]:
    """Replace every outcome whose value cannot be encoded by an EncodeError."""
    fixed: list[Outcome] = []
    for outcome, op in zip(outcomes, ops):
        try:
            encode(outcome)
        except EncodeError as exc:
            err = EncodeError(f"result of {op} cannot be sent: {exc.__cause__ or exc}")
            outcome = Err(outcome.job, outcome.seq, outcome.attempt, error_info(err))
        fixed.append(outcome)
    return fixed


def run_worker(spec: WorkerSpec) -> None:
    """Entry point of a worker process (the target given to multiprocessing)."""
    _guard_against_orphaning(spec.parent_pid)
    for module in spec.imports:
        __import__(module)
    loop = _Loop(spec)
    try:
        loop.serve()
    finally:
        loop.close()
