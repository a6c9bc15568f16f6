"""A short, self-checking demonstration of :class:`phalanx.Runtime` (``phalanx demo``).

Which process runs what
-----------------------
::

    driver process (phalanx demo)                         worker processes (xN)
    ┌───────────────────────────────────────┐  tasks   ┌────────────────────────┐
    │ run(): build inputs, rt.map / rt.fold │ ───────▶ │ pi_batch([seed, n])    │
    │ consume the ordered result stream,    │          │ count_words(doc)       │
    │ SIGKILL a worker mid-map, hot-restart │          │ merge_counts(a, b)     │
    │ an actor; progress, checks, summary   │ ◀─────── │ crunch(x), Tally actor │
    └───────────────────────────────────────┘ results  └────────────────────────┘

:func:`run` runs in the driver.  The *operations* (:func:`pi_batch`,
:func:`count_words`, :func:`merge_counts`, :func:`crunch`) and the actor
class :class:`Tally` are module-level and registered with
:func:`phalanx.operation` / :func:`phalanx.actor`; workers resolve them by
name (``phalanx.demo:pi_batch`` ...) by importing this module, so they must
stay at module level and this module must import without side effects.

Parts
-----
1. *Monte Carlo pi* (``Runtime.map``): ``samples`` are split into up to
   :data:`PI_BATCHES` tasks ``[seed, n]``; each draws ``n`` points with
   ``random.Random(seed)`` and returns the number inside the unit circle.
2. *Word count* (``Runtime.map`` then ``Runtime.fold``): deterministic text
   from a fixed :data:`VOCABULARY` (``random.Random(0)``, Zipf-like weights)
   is cut into documents of :data:`DOC_WORDS` words; each document is counted
   on a worker, then the per-document counts are merged by the associative
   :func:`merge_counts` (exactly n-1 combines).
3. *A worker killed mid-map* (what sets phalanx apart): while ``Runtime.map``
   streams :func:`crunch` results, the demo SIGKILLs a worker; the runtime
   starts a replacement and sends again what the dead worker held, and every
   result arrives once, in order.
4. *Hot restart* of an actor: a :class:`Tally` actor with state moves to
   another worker process (``ActorRef.restart``); ``save()`` hands its state
   to ``restore()`` there and the next call sees it.

Checks (exit status 1 if any fails): every task returned a result; the
first and last pi batches equal a local recomputation (so results are
correct and in order); the estimate lies within 6 standard deviations of
pi; the folded word counts equal a local count and their total equals the
number of generated words; after the kill, every crunch result arrived
exactly once and in order, and a worker was replaced; the actor runs in
another process after its hot restart, with its state.

Arguments and results are plain ints, strs, lists and dicts, so they
travel as msgpack (no pickle).
"""

from __future__ import annotations

import importlib
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

import msgspec

import phalanx

__all__ = [
    "DOC_WORDS",
    "PI_BATCHES",
    "VOCABULARY",
    "Tally",
    "TallyState",
    "count_words",
    "crunch",
    "make_documents",
    "merge_counts",
    "pi_batch",
    "pi_tasks",
    "run",
]

#: Maximum number of Monte Carlo tasks the samples are split into.
PI_BATCHES = 200
#: Words per generated document (the last one may be shorter).
DOC_WORDS = 1000
#: Seed of the text generator, so every run counts the same text.
TEXT_SEED = 0
#: Parts of the demo, for the "[k/N]" headings.
PARTS = 4
#: Upper bound, in seconds, for each blocking map/fold call (no hang).
CALL_TIMEOUT = 120.0

#: The fixed vocabulary of the generated text, most frequent first.
VOCABULARY: tuple[str, ...] = (
    "the", "of", "and", "to", "a", "in", "is", "it", "that", "for",
    "on", "was", "with", "as", "worker", "task", "driver", "actor", "job", "lease",
    "channel", "queue", "socket", "frame", "result", "message", "process", "future", "map",
    "fold", "stream", "batch", "retry", "timeout", "signal", "supervisor", "restart", "state",
    "host", "core", "memory", "pipe", "router", "dealer", "publish", "subscribe", "encode",
    "decode", "combine", "merge",
)  # fmt: skip

T = TypeVar("T")


# --------------------------------------------------------------------------- operations
# These run in the worker processes.


@phalanx.operation
def pi_batch(task: list[int]) -> int:
    """Draw ``n`` points in the unit square with ``random.Random(seed)``; count hits.

    ``task`` is ``[seed, n]``.  Returns how many points fall inside the
    quarter circle ``x*x + y*y <= 1``.  Deterministic for a given task.
    """
    seed, n = task
    rand = random.Random(seed).random
    hits = 0
    for _ in range(n):
        x = rand()
        y = rand()
        if x * x + y * y <= 1.0:
            hits += 1
    return hits


@phalanx.operation
def count_words(doc: str) -> dict[str, int]:
    """Count the whitespace-separated words of one document."""
    counts: dict[str, int] = {}
    for word in doc.split():
        counts[word] = counts.get(word, 0) + 1
    return counts


@phalanx.operation
def merge_counts(lower: dict[str, int], upper: dict[str, int]) -> dict[str, int]:
    """Return a new dict with the counts of ``lower`` and ``upper`` summed.

    Associative (and commutative), so ``Runtime.fold`` may combine in any
    tree shape; the inputs are not modified.
    """
    merged = dict(lower)
    for word, count in upper.items():
        merged[word] = merged.get(word, 0) + count
    return merged


@phalanx.operation
def crunch(x: int) -> int:
    """A small deterministic task that takes a few milliseconds (the crash part's work)."""
    time.sleep(0.002)
    return x * x + 1


class TallyState(msgspec.Struct):
    """What a :class:`Tally` hands from one instance to the next (hot restart)."""

    total: int
    calls: int


@phalanx.actor
class Tally:
    """A stateful actor: a running total, and the process it runs in."""

    def __init__(self) -> None:
        self.total = 0
        self.calls = 0

    def add(self, x: int) -> int:
        self.total += x
        self.calls += 1
        return self.total

    def where(self) -> list[int]:
        """``[pid, total, calls]``: which process holds which state."""
        return [os.getpid(), self.total, self.calls]

    def save(self) -> TallyState:
        return TallyState(self.total, self.calls)

    @classmethod
    def restore(cls, state: TallyState) -> Tally:
        obj = cls.__new__(cls)
        obj.total, obj.calls = state.total, state.calls
        return obj


# --------------------------------------------------------------------------- inputs
# These run in the driver.


def pi_tasks(samples: int, batches: int = PI_BATCHES) -> list[list[int]]:
    """Split ``samples`` into at most ``batches`` tasks ``[seed, n]`` whose ``n`` sum to it."""
    batches = max(1, min(batches, samples))
    size, extra = divmod(samples, batches)
    return [[seed, size + (1 if seed < extra else 0)] for seed in range(batches)]


def make_documents(words: int, doc_words: int = DOC_WORDS) -> list[str]:
    """Generate ``words`` deterministic pseudo-random words, as documents of ``doc_words``."""
    rng = random.Random(TEXT_SEED)
    weights = [1.0 / rank for rank in range(1, len(VOCABULARY) + 1)]  # Zipf-like
    text = rng.choices(VOCABULARY, weights=weights, k=words)
    return [" ".join(text[i : i + doc_words]) for i in range(0, words, doc_words)]


# --------------------------------------------------------------------------- progress


class _Progress:
    """A progress display for one part: a tqdm bar, a plain final line, or nothing.

    tqdm (the optional ``progress`` extra) is used when it is importable,
    ``enabled`` is true and stdout is a terminal; otherwise, when ``enabled``,
    one plain line is printed at :meth:`close`.
    """

    def __init__(self, desc: str, total: int, unit: str, enabled: bool, out: TextIO) -> None:
        self._desc = desc
        self._total = total
        self._unit = unit
        self._enabled = enabled
        self._out = out
        self._count = 0
        self._start = time.perf_counter()
        self._bar: Any = None
        if enabled and out.isatty():
            try:
                tqdm: Any = importlib.import_module("tqdm")
            except ImportError:
                pass
            else:
                self._bar = tqdm.tqdm(
                    total=total,
                    desc=f"  {desc}",
                    unit=unit,
                    file=out,
                    leave=False,
                    dynamic_ncols=True,
                )

    def update(self, n: int = 1) -> None:
        self._count += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._enabled:
            elapsed = time.perf_counter() - self._start
            print(
                f"  {self._desc}: {self._count}/{self._total} {self._unit}s in {elapsed:.2f} s",
                file=self._out,
            )

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, counting each one; close the display at the end."""
        try:
            for item in items:
                self.update()
                yield item
        finally:
            self.close()


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class _Part:
    """Timing of one part of the demo, for the summary."""

    name: str
    tasks: int
    wall: float


@dataclass
class _Checks:
    """Collects named pass/fail checks and prints each one."""

    out: TextIO
    failed: int = 0

    def check(self, ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}", file=self.out)
        if not ok:
            self.failed += 1


def _run_pi(
    rt: phalanx.Runtime, samples: int, progress: bool, checks: _Checks, out: TextIO
) -> _Part:
    tasks = pi_tasks(samples)
    print(
        f"\n[1/{PARTS}] Monte Carlo pi: {samples:,} samples in {len(tasks)} tasks (Runtime.map)",
        file=out,
    )
    start = time.perf_counter()
    bar = _Progress("pi_batch", len(tasks), "task", progress, out)
    hits: list[int] = list(bar.track(rt.map(pi_batch, tasks, timeout=CALL_TIMEOUT)))
    wall = time.perf_counter() - start

    total_hits = sum(hits)
    estimate = 4.0 * total_hits / samples
    error = abs(estimate - math.pi)
    p = math.pi / 4.0
    sigma = 4.0 * math.sqrt(p * (1.0 - p) / samples)
    print(f"  pi ~ {estimate:.6f}  (error {error:.2e}, {error / sigma:.1f} sigma)", file=out)
    checks.check(len(hits) == len(tasks), f"{len(hits)} results for {len(tasks)} tasks")
    if hits:
        first, last = tasks[0], tasks[-1]
        checks.check(
            hits[0] == pi_batch(first) and hits[-1] == pi_batch(last),
            "first and last batch match a local recomputation (correct, in order)",
        )
    checks.check(error <= 6.0 * sigma, f"error within 6 sigma ({6.0 * sigma:.2e})")
    return _Part("pi (map)", len(tasks), wall)


def _run_words(
    rt: phalanx.Runtime, words: int, progress: bool, checks: _Checks, out: TextIO
) -> list[_Part]:
    docs = make_documents(words)
    print(
        f"\n[2/{PARTS}] word count: {words:,} words in {len(docs)} documents "
        "(Runtime.map, then Runtime.fold)",
        file=out,
    )
    start = time.perf_counter()
    bar = _Progress("count_words", len(docs), "doc", progress, out)
    per_doc: list[dict[str, int]] = list(
        bar.track(rt.map(count_words, docs, timeout=CALL_TIMEOUT))
    )
    map_wall = time.perf_counter() - start

    start = time.perf_counter()
    totals: dict[str, int] = rt.fold(merge_counts, per_doc, timeout=CALL_TIMEOUT)
    fold_wall = time.perf_counter() - start

    top = sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:5]
    print("  top 5: " + ", ".join(f"{word} ({count:,})" for word, count in top), file=out)
    expected = Counter(word for doc in docs for word in doc.split())
    total = sum(totals.values())
    checks.check(len(per_doc) == len(docs), f"{len(per_doc)} results for {len(docs)} documents")
    checks.check(total == words, f"total {total:,} == generated words {words:,}")
    checks.check(totals == dict(expected), "folded counts equal a local count")
    return [
        _Part("words (map)", len(docs), map_wall),
        _Part("words (fold)", max(0, len(per_doc) - 1), fold_wall),
    ]


def _run_crash(
    rt: phalanx.Runtime, items: int, checks: _Checks, out: TextIO
) -> _Part:
    print(
        f"\n[3/{PARTS}] a worker SIGKILLed in the middle of a map: {items:,} items (Runtime.map)",
        file=out,
    )
    before = rt.stats()
    workers = rt.n_workers
    start = time.perf_counter()
    results: list[int] = []
    victim = 0
    for value in rt.map(crunch, range(items), chunksize=4, timeout=CALL_TIMEOUT):
        results.append(value)
        if len(results) == items // 4:
            from .supervisor import signal_worker_pid  # through its pidfd: never a reused pid

            victim = max(rt.worker_pids().values())
            signal_worker_pid(victim, signal.SIGKILL)
            print(f"  killed worker process {victim} after {len(results)} of {items} results", file=out)
    wall = time.perf_counter() - start
    rt.wait_for_workers(workers, timeout=CALL_TIMEOUT)  # the replacement is ready
    after = rt.stats()
    redelivered = after.redelivered - before.redelivered
    restarts = after.worker_restarts - before.worker_restarts
    print(
        f"  the runtime started a replacement ({restarts} worker restart(s)) and sent again the "
        f"{redelivered} chunk(s) the dead worker held",
        file=out,
    )
    checks.check(victim > 0, "a worker was killed mid-map")
    checks.check(
        results == [crunch(x) for x in range(items)],
        f"all {items:,} results arrived exactly once, in order, despite the kill",
    )
    checks.check(restarts >= 1, "the killed worker was replaced")
    return _Part("crash (map)", items, wall)


def _run_hot_restart(rt: phalanx.Runtime, checks: _Checks, out: TextIO) -> None:
    print(f"\n[4/{PARTS}] hot restart: an actor moves to another process with its state", file=out)
    tally = rt.spawn(Tally)
    try:
        for x in range(1, 11):
            tally.add(x).result(timeout=CALL_TIMEOUT)
        pid, total, calls = tally.where().result(timeout=CALL_TIMEOUT)
        print(f"  Tally on worker {tally.worker} (pid {pid}): total {total} after {calls} calls", file=out)
        moved = tally.restart(timeout=CALL_TIMEOUT)
        new_pid, new_total, new_calls = tally.where().result(timeout=CALL_TIMEOUT)
        print(
            f"  restarted on worker {tally.worker} (pid {new_pid}): total {new_total} after {new_calls} calls; "
            f"save() handed the state to restore() there",
            file=out,
        )
        after = tally.add(45).result(timeout=CALL_TIMEOUT)
        checks.check(moved and new_pid != pid, "the actor now runs in another process")
        checks.check((new_total, new_calls, after) == (total, calls, 100), "its state came along (55, then 55 + 45)")
    finally:
        tally.stop()


def _print_summary(
    rt: phalanx.Runtime, parts: Sequence[_Part], wall: float, out: TextIO
) -> None:
    print("\nsummary", file=out)
    print(f"  {'part':<14}{'tasks':>8}{'wall s':>9}{'tasks/s':>10}   (task = one operation call)", file=out)
    for part in parts:
        rate = part.tasks / part.wall if part.wall > 0 else float("inf")
        print(f"  {part.name:<14}{part.tasks:>8}{part.wall:>9.2f}{rate:>10,.0f}", file=out)
    total_tasks = sum(part.tasks for part in parts)
    print(f"  {'total':<14}{total_tasks:>8}{wall:>9.2f}{total_tasks / wall:>10,.0f}", file=out)
    print(
        "\n  A map sends its items (inputs) to the workers in chunks: one chunk is one task\n"
        "  message carrying several items, so a worker's 'chunks' counts messages and its\n"
        "  'items' the inputs they carried (a fold chunk of k items makes k-1 combines).",
        file=out,
    )

    # The runtime batches items into chunks: a worker's ``tasks`` counts chunks
    # (messages), its ``items`` the inputs they carried (a fold chunk of k items
    # makes k-1 combines, so items can exceed the number of calls).
    stats = rt.stats()
    print(
        f"\n  {'worker':<10}{'pid':>8}{'chunks':>8}{'items':>8}{'busy s':>9}{'util':>7}"
        f"   (util = busy / {wall:.2f} s wall)",
        file=out,
    )
    for worker in sorted(stats.workers, key=lambda w: w.id):
        util = worker.busy / wall if wall > 0 else 0.0
        print(
            f"  {worker.id:<10}{worker.pid:>8}{worker.tasks:>8}{worker.items:>8}"
            f"{worker.busy:>9.2f}{util:>7.0%}",
            file=out,
        )
    print(
        f"  runtime stats: {stats.tasks_completed} chunks completed, "
        f"{stats.items_completed} items, {stats.redelivered} chunks redelivered after the kill, "
        f"{stats.worker_restarts} worker(s) replaced",
        file=out,
    )


def run(
    workers: int | None = None,
    samples: int = 2_000_000,
    words: int = 200_000,
    crash_items: int = 400,
    progress: bool = True,
    out: TextIO | None = None,
) -> int:
    """Run the demo in this (driver) process; return 0 if every check passed, else 1.

    ``workers=None`` uses one worker per usable CPU.  ``crash_items`` is the
    length of the map during which a worker is killed.  ``progress=False``
    suppresses progress bars and progress lines.  Output goes to ``out``
    (default: ``sys.stdout``).
    """
    out = sys.stdout if out is None else out
    checks = _Checks(out)
    start = time.perf_counter()
    with phalanx.Runtime(workers=workers) as rt:
        ready = time.perf_counter()
        print(
            f"phalanx demo: {rt.n_workers} worker processes, runtime up in "
            f"{ready - start:.2f} s",
            file=out,
        )
        parts = [_run_pi(rt, samples, progress, checks, out)]
        parts += _run_words(rt, words, progress, checks, out)
        parts.append(_run_crash(rt, crash_items, checks, out))
        if rt.n_workers > 1:
            _run_hot_restart(rt, checks, out)
        else:
            print(f"\n[4/{PARTS}] hot restart: skipped (it needs 2 workers to move between)", file=out)
        wall = time.perf_counter() - ready
        _print_summary(rt, parts, wall, out)
        closing = time.perf_counter()
    print(f"  runtime shut down in {time.perf_counter() - closing:.2f} s", file=out)

    if checks.failed:
        print(f"\n{checks.failed} check(s) FAILED", file=out)
        return 1
    print("\nall checks passed", file=out)
    return 0
