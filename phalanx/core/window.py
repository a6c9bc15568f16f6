"""The streaming map's window: which chunks to send, what to yield next, without I/O.

One :class:`MapWindow` per ``map`` (and directive chain), driven by the
consumer's thread through its host iterator (:class:`phalanx.MapIterator` on
a real runtime, :class:`phalanx.testing.SimMapIterator` on a simulated one).
The host feeds it outcomes with ``received(seq, outcome, now)``, asks
``step(now)`` what to do next (yield, fail, end, or wait for an outcome)
and sends the chunks it leaves in ``outbox``; it reads no clock and no
queue itself.

Invariants kept:

* **Bounded memory.** The input is read lazily; chunks in flight plus
  chunks received but held for an earlier, slower one never exceed
  ``window``, so an ordered map waiting on a straggler reads no further;
  nothing is kept per chunk once its values are placed, but the items
  skipped under Ignore (an endless map holds a window's worth, however
  long it runs).
* **Order and position of failures.** An ordered map yields chunk ``k``
  only after chunks ``0..k-1``; a failure (a task's, or a result that does
  not convert to the declared type) is raised after every value before it.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import WorkerCrashedError
from ..transport.codec import encode, pack_message, rebuild_error
from ..transport.messages import Chunk, Ok
from .tasks import SKIPPED, Delivery, Job, Task

__all__ = ["MapWindow", "ChunkSizer", "outcome_error", "at_index", "WAIT", "READY", "FAILED", "ENDED", "COMPLETE",
           "MAX_AUTO_CHUNK", "MAX_MAP_CHUNK", "RAMP_TARGET"]

#: largest automatic chunk of a fold (each chunk's partial result costs one more combine)
MAX_AUTO_CHUNK = 50_000
#: largest automatic chunk of a map: a worker decodes, runs and frees a chunk at a time, and
#: its values no larger than this reuse the same memory; 50,000 ints took fresh pages (a
#: page fault each 4 KB, a tenth of a map's worker CPU) every chunk
MAX_MAP_CHUNK = 4096
#: a streaming chunk keeps doubling while its round trip is faster than this
RAMP_TARGET = 0.02

#: what ``MapWindow.step`` asks of its host
WAIT, READY, FAILED, ENDED, COMPLETE = range(5)


def at_index(exc: BaseException, index: int) -> BaseException:
    """A map item's WorkerCrashedError, naming the item (the driver only knows its place in a chunk)."""
    if isinstance(exc, WorkerCrashedError) and exc.index is None:
        named = WorkerCrashedError(f"item {index} of the input: {exc}", exc.exitcode, index)
        named.__cause__ = exc.__cause__
        return named
    return exc


def outcome_error(outcome: Delivery) -> BaseException:
    """The exception a caller sees for a failed outcome."""
    if isinstance(outcome, BaseException):
        return outcome
    return rebuild_error(outcome.error)  # type: ignore[union-attr]


class ChunkSizer:
    """Chunk sizes: fixed, or from the input length (at most ``largest``), or ramping up while quick."""

    def __init__(self, chunksize: int | None, length: int | None, workers: int,
                 largest: int = MAX_AUTO_CHUNK) -> None:
        if chunksize is not None:
            if chunksize < 1:
                raise ValueError(f"chunksize must be >= 1, got {chunksize}")
            self.size, self.ramp = chunksize, False
        elif length is not None:
            self.size = min(largest, max(1, math.ceil(length / (4 * max(1, workers)))))
            self.ramp = False
        else:
            self.size, self.ramp = 1, True

    def observe(self, round_trip: float) -> None:
        if self.ramp and round_trip < RAMP_TARGET and self.size < MAX_MAP_CHUNK:
            self.size *= 2


class MapWindow:
    """State of one streaming map (see the module docstring).

    ``convert`` turns one result into the declared return type (None: no
    conversion); ``convert_many`` converts a whole chunk at once or returns
    None. Both raise on a value that does not convert. ``pickled``: chunks go
    to local workers of a ``local_pickle`` runtime (their items packed once,
    so a retry re-encodes them as they are).
    """

    __slots__ = (
        "job", "op_name", "stages", "star", "input", "sizer", "window", "ordered", "indexed", "convert",
        "convert_many", "seqs", "starts", "read", "sent_at", "next", "buffer", "ready", "error",
        "exhausted", "done", "outbox", "pickled", "sequence", "skips", "skips_seen",
    )

    def __init__(self, job: Job, op_name: str, stages: Sequence[str], source: Iterator[Any] | list[Any], star: bool,
                 sizer: ChunkSizer, workers: int, ordered: bool, indexed: bool,
                 convert: Callable[[Any], Any] | None,
                 convert_many: Callable[[list[Any]], list[Any] | None] | None, pickled: bool = False) -> None:
        self.job = job
        self.pickled = pickled
        self.op_name = op_name
        self.stages = list(stages)
        #: a list input is read by slicing it (a copy in C), any other through its iterator
        self.sequence = source if type(source) is list else None
        self.input: Iterator[Any] = iter(()) if type(source) is list else source  # type: ignore[assignment]
        self.star = star
        self.sizer = sizer
        self.window = 4 * max(1, workers) + 2
        self.ordered = ordered
        self.indexed = indexed
        self.convert = convert
        self.convert_many = convert_many
        self.seqs = itertools.count()
        #: input index of each chunk's first item, while the chunk is in flight or held
        self.starts: dict[int, int] = {}
        #: ``(input index, error info)`` of the items skipped under Ignore so far, and how
        #: many of the job's skip records they cover (read while their chunks' starts are known)
        self.skips: list[tuple[int, Any]] = []
        self.skips_seen = 0
        #: items read from the input so far
        self.read = 0
        #: chunks in flight -> when they were sent
        self.sent_at: dict[int, float] = {}
        #: the next chunk an ordered map yields
        self.next = 0
        #: chunks received ahead of ``next``: (values, error after them)
        self.buffer: dict[int, tuple[list[Any], BaseException | None]] = {}
        #: values due to the consumer now, a chunk's list at a time (none empty): handed
        #: out as they are, with no copy per item
        self.ready: deque[list[Any]] = deque()
        #: raised once ``ready`` is empty
        self.error: BaseException | None = None
        self.exhausted = False
        self.done = False
        #: chunks to send (the host submits and clears it)
        self.outbox: list[Task] = []

    def fill(self, now: float) -> None:
        """Read chunks while the window has room; they go to ``outbox``."""
        tasks = self.outbox
        job = self.job
        sent_at, buffer, window = self.sent_at, self.buffer, self.window
        # Chunks received but held for an earlier, slower one count too: an ordered
        # map waiting on a straggler reads no further than the window.
        while not self.exhausted and len(sent_at) + len(buffer) < window:
            if self.sequence is not None:
                items = self.sequence[self.read:self.read + self.sizer.size]
            else:
                items = list(itertools.islice(self.input, self.sizer.size))
            if not items:
                self.exhausted = True
                break
            if self.star:
                items = [list(item) for item in items]
            seq = next(self.seqs)
            self.starts[seq] = self.read
            self.read += len(items)
            msg = Chunk(job.id, seq, 0, self.op_name, items, self.star, False, job.timeout, self.stages)
            if self.pickled:
                msg = pack_message(msg, True)
            tasks.append(Task(msg, encode(msg, "the arguments of {}", self.op_name), len(items)))
            sent_at[seq] = now

    def take(self) -> list[Task]:
        """Drain ``outbox``."""
        out, self.outbox = self.outbox, []
        return out

    def step(self, now: float) -> int:
        """What the consumer does next: READY (pop a list of values from ``ready``), FAILED (raise ``error``),
        ENDED (stop), COMPLETE (stop and close the job: all came back), or WAIT for an outcome."""
        while True:
            if self.ready:
                return READY
            if self.error is not None:
                return FAILED
            if self.done:
                return ENDED
            buffer = self.buffer
            if self.ordered and self.next in buffer:
                values, self.error = buffer.pop(self.next)
                self.next += 1
                if values:
                    self.ready.append(values)
                if not self.exhausted:
                    self.fill(now)  # the window has room again
                continue
            if self.exhausted and not self.sent_at and not buffer:
                self.done = True
                return COMPLETE
            return WAIT

    def take_error(self) -> BaseException:
        error, self.error = self.error, None
        assert error is not None
        return error

    def received(self, seq: int, outcome: Delivery, now: float) -> tuple[int, int | None]:
        """Chunk ``seq`` came back: (values it adds, a seq after which the job's tasks are dropped)."""
        sent = self.sent_at.pop(seq, None)
        if sent is not None:
            self.sizer.observe(now - sent)
        exc: BaseException | None
        if isinstance(outcome, Ok):
            values, exc = self.convert_chunk(outcome.value, seq)
        elif isinstance(outcome, BaseException):
            values, exc = [], outcome
        else:
            values, exc = self.convert_chunk(outcome.partial or [], seq)
            # The failed item's error, naming its input index when the driver raised it.
            exc = exc or at_index(rebuild_error(outcome.error), self.starts.get(seq, 0) + outcome.index)
        drop: int | None = None
        if self.ordered:
            if exc is not None:
                # Nothing after the failure will be yielded: stop feeding, forget
                # later chunks, but still wait for the earlier ones.
                self.exhausted = True
                drop = seq
                for later in [s for s in self.sent_at if s > seq]:
                    del self.sent_at[later]
                for later in [s for s in self.buffer if s > seq]:
                    del self.buffer[later]
            if seq >= self.next:
                self.buffer[seq] = (values, exc)
        else:
            if values:
                self.ready.append(values)
            self.error = exc
            if exc is not None:
                self.exhausted = True
                self.sent_at.clear()
        if self.job.skipped:
            self.take_skips()
        # Its values are placed: the chunk's start is no longer needed (one entry per chunk
        # would grow without bound over an endless input).
        self.starts.pop(seq, None)
        if not self.exhausted:
            self.fill(now)
        return len(values), drop

    def convert_chunk(self, values: list[Any], seq: int) -> tuple[list[Any], BaseException | None]:
        """The chunk's results as yielded, and the error of the first one that does not convert."""
        convert = self.convert
        skipped = self.job.skipped is not None
        if not self.indexed:
            if skipped:
                values = [v for v in values if v is not SKIPPED]
            if convert is None:
                return values, None
            if self.convert_many is not None:
                bulk = self.convert_many(values)
                if bulk is not None:
                    return bulk, None
            out: list[Any] = []
            try:
                for v in values:
                    out.append(convert(v))
            except Exception as exc:  # ValidationError: the result is not of the declared type
                return out, exc
            return out, None
        start = self.starts.get(seq, 0)
        pairs: list[Any] = []
        try:
            for i, v in enumerate(values):
                if skipped and v is SKIPPED:
                    continue
                pairs.append((start + i, v if convert is None else convert(v)))
        except Exception as exc:
            return pairs, exc
        return pairs, None

    def take_skips(self) -> None:
        """Record the job's new skip records by input index (their chunks' starts are still known:
        a chunk's skips are recorded before its outcome is delivered)."""
        records = self.job.skipped or []
        starts = self.starts
        for seq, index, info in records[self.skips_seen:]:
            self.skips.append((starts.get(seq, 0) + index, info))
        self.skips_seen = len(records)

    def skipped(self) -> list[tuple[int, BaseException]]:
        """``(input index, error)`` of every item dropped under ``on_fatal=Ignore``, in input order."""
        self.take_skips()
        return sorted(((i, at_index(rebuild_error(info), i)) for i, info in self.skips), key=lambda pair: pair[0])

    def close(self) -> bool:
        """End the map from the consumer's side; True if it was still running (the host terminates the job)."""
        if self.done:
            return False
        self.done = True
        self.exhausted = True
        self.ready.clear()
        self.buffer.clear()
        return True
