"""A simulated worker process: its inbox and outbox, its task runner, its actors.

Runs in the calling (test) process, on the scheduler's thread, one message at
a time when :class:`~phalanx.testing.SimRuntime` picks it. What it does with a
task is the core's (:class:`phalanx.core.execute.TaskRunner`) and with an
actor message :class:`phalanx.actors.host.ActorHost`'s, the code a real
worker runs, on the virtual clock: a task takes ``task_time`` per call plus
the :func:`sleep` of its operations, and a call that sleeps past its
per-call timeout is reported as a real worker's control thread would.

Invariant kept: **one outcome per task**, as on a real worker (the timeout
report replaces the task's own outcome), and every frame it sends goes
through the fault engine, the simulated link.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .. import worker as _worker_module
from ..actors.host import ActorHost
from ..core.execute import TaskRunner, abort
from ..core.tasks import Task
from ..errors import EncodeError, ProtocolError, TaskCancelledError, TaskTimeoutError
from ..registry.operations import Operation
from ..transport.codec import decode_inbox, encode, error_info
from ..transport.messages import (
    ActorCall,
    ActorEvent,
    ActorState,
    Call,
    Chunk,
    Err,
    ErrorInfo,
    Outcome,
    Results,
    SaveActor,
    SpawnActor,
    Stop,
    StopActor,
)

if TYPE_CHECKING:
    from .sim import SimRuntime

__all__ = ["sleep", "SimWorker"]

#: virtual seconds from a worker's death to the driver noticing it
NOTICE_DELAY = 0.0


class _Elapsed:
    """Virtual time inside the task a simulated worker runs (``sleep`` adds to it)."""

    __slots__ = ("slept", "late_at", "late_values", "overran")

    def __init__(self) -> None:
        self.slept = 0.0
        #: when a call overran the task's timeout (seconds into the task; -1: none did)
        self.late_at = -1.0
        #: the values done by then (what the timeout error carries)
        self.late_values: list[Any] = []
        #: how long that call ran in all
        self.overran = 0.0


#: the tasks simulated workers run right now, innermost last (see ``sleep``)
_RUNNING: list[_Elapsed] = []


def sleep(seconds: float) -> None:
    """Sleep inside an operation: virtual time on a SimRuntime, real time elsewhere.

    Use it in operations under test instead of ``time.sleep`` so that
    timeouts and slow tasks are simulated without waiting. A call that
    sleeps past its task's per-call timeout is noticed as a real worker's
    control thread would: the timeout is reported with the values done
    before it, and the task is flagged to abort.
    """
    if not _RUNNING:
        time.sleep(seconds)
        return
    elapsed = _RUNNING[-1]
    elapsed.slept += max(0.0, seconds)
    ctx = _worker_module._current
    if ctx is None or ctx.timeout <= 0:
        return
    ran = elapsed.slept - ctx.started
    if elapsed.late_at < 0 and ran > ctx.timeout:
        elapsed.late_at = ctx.started + ctx.timeout
        elapsed.late_values = list(ctx.values)
        abort(ctx)
    if elapsed.late_at >= 0 and ctx.started + ctx.timeout == elapsed.late_at:
        elapsed.overran = max(elapsed.overran, ran)


# --------------------------------------------------------------------------- #
# Driver-side records (mirror phalanx.driver.Task / Job)
# --------------------------------------------------------------------------- #


class SimWorker:
    """A simulated worker process and the driver's record of it."""

    def __init__(self, sim: SimRuntime, worker_id: str, pid: int, tags: tuple[str, ...]) -> None:
        self.sim = sim
        self.id = worker_id
        self.ident = worker_id.encode()
        self.pid = pid
        #: the process runs (False once killed or exited)
        self.running = True
        #: the driver's view (False once it noticed the death)
        self.alive = True
        self.ready = False
        self.free = 0
        self.inflight: dict[tuple[int, int], Task] = {}
        self.inbox: deque[bytes] = deque()
        #: frames on their way to the driver: (available at, identity, frame)
        self.outbox: deque[tuple[float, bytes, bytes]] = deque()
        self.busy_until = 0.0
        self.tasks = 0
        self.items = 0
        self.busy = 0.0
        self.tasks_done = 0
        self.dispatched = 0
        self.expect_kill = False
        self.retiring = False
        self.lost = False
        self.terminated: set[int] = set()
        #: the worker tags it serves
        self.tags = tags
        #: the actors it hosts, as on a real worker (on the virtual clock)
        self.host = ActorHost(worker_id, self.host_send, sim._runner.call, lambda: sim.now)
        #: when what its actor host sends now reaches the link (virtual time)
        self.at = 0.0

    def send(self, msg: Any, at: float, side: bool = False) -> str | None:
        """A worker sends ``msg`` to the driver; returns the engine's kill verdict."""
        frame = encode(msg)
        ident = self.ident + b"!" if side else self.ident
        frames = [frame]
        kill: str | None = None
        if self.sim.engine is not None:
            frames, kill = self.sim.engine.incoming(ident, frame, self.sim.now)
        for f in frames:
            self.outbox.append((at, ident, f))
        return kill


    def run(self) -> None:
        """The worker handles the next message of its inbox (the core runs its tasks, ActorHost its actors)."""
        frame = self.inbox.popleft()
        try:
            msg = decode_inbox(frame)
        except ProtocolError:
            self.sim._counters["frames_dropped"] += 1
            return
        start = self.sim.now
        if isinstance(msg, (Call, Chunk)):
            self.sim._record("run", self.id, type(msg).__name__, msg.job, msg.seq, msg.attempt)
            outcome, elapsed = self._execute(msg)
            duration = elapsed.slept + self.sim.task_time * max(1, _calls(msg, outcome))
            if elapsed.late_at >= 0:
                self._timed_out(msg, elapsed, start, duration)
            else:
                self._finish(msg, outcome, start, duration)
        elif isinstance(msg, ActorCall):
            self.sim._record("run", self.id, "ActorCall", msg.job, msg.seq, msg.method)
            _RUNNING.append(_Elapsed())
            try:
                outcome = self.host.call(msg)
            finally:
                duration = _RUNNING.pop().slept + self.sim.task_time
            # As a real worker does: the checkpoint goes out before the reply.
            if self.running and self.host.checkpoint_due(msg.instance):
                self.at = start + duration
                self.host.save(msg.instance, 0)
            kill = self._finish(msg, outcome, start, duration, defer_kill=True)
            if kill == "after":
                self._doom(start + duration)
        elif isinstance(msg, (SpawnActor, SaveActor, StopActor)):
            self.sim._record("run", self.id, type(msg).__name__, msg.instance)
            self.at = self.sim.now + self.sim.task_time
            self.host.handle(msg)
        elif isinstance(msg, Stop):
            self.running = False
            self.sim._timer(NOTICE_DELAY, f"{self.id} exit noticed", lambda: self.sim._on_exit(self, 0))

    def _finish(self, msg: Call | Chunk | ActorCall, outcome: Outcome, start: float,
                duration: float, defer_kill: bool = False) -> str | None:
        self.tasks_done += 1
        self.busy_until = start + duration
        try:
            encode(outcome)
        except EncodeError as exc:
            name = msg.method if isinstance(msg, ActorCall) else msg.op
            err2 = EncodeError(f"result of {name} cannot be sent: {exc.__cause__ or exc}")
            outcome = Err(outcome.job, outcome.seq, outcome.attempt, error_info(err2))
        kill = self.send(Results(self.id, [outcome], duration), start + duration)
        if kill == "now":
            self.sim._kill(self)
            return None
        if kill == "after" and not defer_kill:
            self._doom(start + duration)
            return None
        return kill

    def _doom(self, at: float) -> None:
        """Be killed once the task it runs is over and sent (it runs nothing else meanwhile)."""
        self.busy_until = math.inf
        self.sim._timer(at - self.sim.now, f"{self.id} killed after its task", lambda: self.sim._kill(self))

    def _execute(self, task: Call | Chunk) -> tuple[Outcome, _Elapsed]:
        """Run ``task`` with the core's TaskRunner (the same code as a real worker's)."""
        elapsed = _Elapsed()
        if task.job in self.terminated:
            info = error_info(TaskCancelledError(f"job {task.job} was terminated"))
            info = ErrorInfo(type=info.type, message=info.message, args=info.args, traceback="")
            return Err(task.job, task.seq, task.attempt, info), elapsed
        ctx = _worker_module.TaskContext(task.job, task.seq, task.attempt, task.timeout)
        ctx.started = 0.0  # seconds into the task: the runner's clock (see _task_clock)
        previous = _worker_module._current
        _worker_module._current = ctx
        _RUNNING.append(elapsed)
        try:
            outcome = self.sim._runner.execute(task, ctx)
        finally:
            _RUNNING.pop()
            _worker_module._current = previous
        return outcome, elapsed

    def _timed_out(self, msg: Call | Chunk, elapsed: _Elapsed, start: float, duration: float) -> None:
        """A call of ``msg`` overran its timeout: the control thread's report, then the abort or the kill."""
        self.tasks_done += 1
        self.busy_until = start + duration
        err = TaskTimeoutError(f"task {msg.seq} of job {msg.job} ran longer than its timeout of {msg.timeout:g} s")
        info = error_info(err)
        info = ErrorInfo(type=info.type, message=info.message, args=info.args, traceback="")
        values = elapsed.late_values
        late = Err(msg.job, msg.seq, msg.attempt, info, len(values), values)
        kill = self.send(Results(self.id, [late]), start + elapsed.late_at, side=True)
        if kill == "now":
            self.sim._kill(self)
        elif elapsed.overran > msg.timeout + self.sim.config.abort_grace:
            # The call ignored its abort flag for abort_grace: the worker ends itself.
            self.expect_kill = True
            self.sim._timer(elapsed.late_at + self.sim.config.abort_grace, f"{self.id} killed (task ignored its timeout)",
                        lambda: self.sim._kill(self))

    def host_send(self, msg: ActorEvent | ActorState) -> None:
        """What a simulated worker's actor host sends (an actor event, a checkpoint)."""
        try:
            self.send(msg, self.at)
        except EncodeError as exc:
            if not isinstance(msg, ActorState):
                raise
            err = EncodeError(f"the state of actor instance {msg.instance} cannot be sent: {exc}")
            self.send(ActorState(self.id, msg.instance, msg.nonce, error=error_info(err)), self.at)


async def _awaited(value: Any) -> Any:
    return await value


def _task_clock() -> float:
    """Seconds into the task a simulated worker runs (when each call of a chunk starts)."""
    return _RUNNING[-1].slept if _RUNNING else 0.0


def _settle(value: Any) -> Any:
    import asyncio

    return asyncio.run(_awaited(value))


def _calls(task: Call | Chunk, outcome: Outcome) -> int:
    """Operation calls a task made (its virtual duration is ``task_time`` each)."""
    if isinstance(task, Call):
        return 1
    n = len(task.items)
    if isinstance(outcome, Err) and not task.fold:
        n = outcome.index + 1  # a map chunk stops at the failing item
    if task.fold:
        return n * len(task.stages) + max(0, n - 1)
    return n * (len(task.stages) + 1)
