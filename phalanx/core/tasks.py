"""Tasks and jobs: the records the core keeps for work in flight.

No I/O and no threads: these are plain records, built and changed by whoever
holds the runtime's state (the driver's pump and callers under its lock in
:mod:`phalanx.driver`, the scheduler's one thread in
:mod:`phalanx.testing.sim`). A :class:`Task` is one message of work with its
encoded frame; a :class:`Job` is a leased result channel: the tasks it still
waits for, and where their outcomes go.

Invariant kept: **exactly-once delivery** rests on ``Job.outstanding``: an
outcome is delivered only while its ``seq`` is there, and the entry goes as
it is delivered (see :mod:`phalanx.core.outcomes`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from ..policy import DEFAULT_TAG, FatalStrategy, RetryStrategy, TaskOptions
from ..transport.codec import encode
from ..transport.messages import ActorCall, Call, Chunk, Err, Ok

__all__ = ["Task", "Job", "SKIPPED", "Delivery"]

#: what a job is handed for one seq: an outcome, or an error the driver made up
Delivery = Ok | Err | BaseException


class _Skipped:
    def __repr__(self) -> str:
        return "SKIPPED"


#: stands in a map chunk's values for an item dropped under FatalStrategy.IGNORE
SKIPPED: Any = _Skipped()


class Task(msgspec.Struct, gc=False):
    """One message of work: its encoded frame plus what redelivery needs.

    ``crashes`` counts worker deaths charged to it, ``retries`` transient
    retries; ``prefix`` holds values of a map chunk's items already done
    before a retry or a skip, so the chunk resumes where it failed; ``rest``
    the items held back when a map chunk was split after a crash (they run
    once ``msg.items`` is done: see :meth:`split`).

    Untracked by the garbage collector (``gc=False``; it refers to no object
    that refers back to it): tens of thousands may be in flight, and each
    tracked one would make every full collection slower, and keep the job's
    ``outstanding`` dict tracked too.
    """

    msg: Call | Chunk | ActorCall
    frame: bytes
    items: int = 1
    crashes: int = 0
    retries: int = 0
    prefix: list[Any] | None = None
    rest: list[Any] | None = None
    #: the job's on_dispatch accepted it (a Future is running): never ask twice
    claimed: bool = False
    #: when it started waiting, pending, with no live worker of its tag (-1: it is not)
    unrouted: float = -1.0

    @property
    def job(self) -> int:
        return self.msg.job

    @property
    def seq(self) -> int:
        return self.msg.seq

    @property
    def attempt(self) -> int:
        return self.msg.attempt

    @property
    def directed(self) -> bool:
        """Sent to one worker outside the credit scheme (actor calls): never redelivered."""
        return isinstance(self.msg, ActorCall)

    def _copy(self, msg: Call | Chunk | ActorCall, items: int) -> Task:
        task = Task(msg, encode(msg), items)
        task.crashes, task.retries, task.prefix, task.rest = self.crashes, self.retries, self.prefix, self.rest
        return task

    def retry(self) -> Task:
        """The same work again, as the next attempt."""
        return self._copy(msgspec.structs.replace(self.msg, attempt=self.attempt + 1), self.items)

    def resume(self, start: int, done: list[Any]) -> Task:
        """A map chunk continuing at item ``start``, with ``done`` values before it."""
        msg = self.msg
        assert isinstance(msg, Chunk)
        rest = msg.items[start:]
        later = self.rest
        if not rest and later:
            rest, later = later, None  # the items held back by a split come next
        task = self._copy(msgspec.structs.replace(msg, attempt=self.attempt + 1, items=rest), len(rest))
        task.prefix = (self.prefix or []) + done
        task.rest = later
        return task

    def split(self) -> Task:
        """A map chunk after a crash: its first half as the next attempt, the other half after it.

        Bisecting down to the item charges a crash to the one item that
        causes it; the innocent items run again uncharged.
        """
        msg = self.msg
        assert isinstance(msg, Chunk)
        half = len(msg.items) // 2
        task = self._copy(msgspec.structs.replace(msg, attempt=self.attempt + 1, items=msg.items[:half]), half)
        task.rest = msg.items[half:] + (self.rest or [])
        return task

    @property
    def splits(self) -> bool:
        """A map chunk (not a fold's) of more than one item."""
        msg = self.msg
        return isinstance(msg, Chunk) and not msg.fold and len(msg.items) > 1


class Job:
    """A leased result channel: outstanding tasks and where outcomes go.

    ``deliver(seq, outcome)`` runs with no lock held (the driver's pump, or a
    caller reading its own reply); ``fail(exc)`` is called once if the job is
    ended from outside (runtime closed or broken). ``on_dispatch`` may veto a
    first dispatch (a cancelled future). ``tag`` is the worker tag its tasks
    are routed to (``options.on``).
    """

    __slots__ = (
        "id", "op", "outstanding", "deliver", "fail", "on_dispatch", "autoclose",
        "retry", "on_fatal", "timeout", "skipped", "dropped", "tag", "direct", "deliver_many",
    )

    def __init__(
        self,
        job_id: int,
        op: str,
        deliver: Callable[[int, Delivery], None],
        fail: Callable[[BaseException], None],
        on_dispatch: Callable[[], bool] | None = None,
        autoclose: bool = False,
        options: TaskOptions | None = None,
    ) -> None:
        self.setup(job_id, op, autoclose, options)
        self.deliver = deliver
        self.fail = fail
        self.on_dispatch = on_dispatch

    def setup(self, job_id: int, op: str, autoclose: bool, options: TaskOptions | None) -> None:
        """Everything but the three callbacks (a subclass may define them as methods instead)."""
        self.id = job_id
        self.op = op
        if options is None:
            self.retry: RetryStrategy | None = None
            self.on_fatal: FatalStrategy = FatalStrategy.TERMINATE
            self.timeout: float = 0.0
            self.tag: str = DEFAULT_TAG
        else:
            self.retry = options.retry
            self.on_fatal = options.on_fatal or FatalStrategy.TERMINATE
            self.timeout = options.timeout or 0.0
            self.tag = options.on or DEFAULT_TAG  # options.tag, without a property call per job
        #: (seq, index in chunk, error) of items dropped under IGNORE (None: none so far)
        self.skipped: list[tuple[int, int, Any]] | None = None
        #: tasks were forgotten while workers may still hold them
        self.dropped = False
        self.outstanding: dict[int, Task] = {}
        self.autoclose = autoclose
        #: ``deliver`` is thread-safe, so a caller reading its own reply may run it (see phalanx.direct)
        self.direct = False
        #: ``deliver`` for several outcomes at once, ``[(seq, outcome)]`` (optional: fewer lock rounds)
        self.deliver_many: Callable[[list[tuple[int, Delivery]]], None] | None = None
