"""Invariant checkers users can reuse, on a SimRuntime or a real Runtime.

Runs in the test (driver) process. Each checker raises ``AssertionError``
with a message that says what broke:

* :class:`DeliveryLog` / :func:`check_exactly_once` -- **exactly-once
  delivery**: every outcome the driver hands to a job is handed over once,
  and every expected value arrives exactly once.
* :func:`check_per_caller_order` -- **per-caller ordering**: what one caller
  sent, in order, was observed in that order.
* :class:`ProcessLeakCheck` -- **no leaked process**: no process the test
  started outlives it, not even an orphan reparented to init (stragglers are
  killed and reported).
* :func:`check_bounded_mailbox` -- **bounded mailbox**: no actor has more
  than ``limit`` calls waiting.

Invariant kept: checkers only observe. :class:`DeliveryLog` wraps the
delivery and submit callbacks of the driver *instance* it watches and
changes nothing else; :class:`ProcessLeakCheck` only adds its mark to one
environment variable while it watches; nothing here sends a message or
alters a result.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from types import TracebackType
from typing import Any

import psutil

from ..transport.endpoints import start_ticks

__all__ = [
    "DeliveryLog",
    "check_exactly_once",
    "check_per_caller_order",
    "ProcessLeakCheck",
    "check_bounded_mailbox",
]


class DeliveryLog:
    """Counts every outcome a runtime's driver delivers, per ``(job, seq)``.

    On a :class:`~phalanx.testing.SimRuntime` it reads the simulation's own
    ledgers; on a :class:`phalanx.Runtime` it wraps ``_deliver`` (through
    which the driver hands every outcome over), ``submit`` and
    ``submit_directed`` of that runtime's driver instance (create the
    log before submitting the work to watch). ``check()`` fails on anything
    delivered twice; ``check(complete=True)`` also on anything given to the
    workers and never delivered (use it once every job has run to its end).
    """

    def __init__(self, rt: Any) -> None:
        from .sim import SimRuntime

        self._lock = threading.Lock()
        self._counts: Counter[tuple[int, int]] = Counter()
        self._kinds: Counter[str] = Counter()
        self._submitted: set[tuple[int, int]] = set()
        self._sim: SimRuntime | None = rt if isinstance(rt, SimRuntime) else None
        if self._sim is not None:
            self._sim_before = set(self._sim.submitted)
            return
        driver = rt._driver
        deliver = driver._deliver

        def counted(ready: list[tuple[Any, int, Any]]) -> None:
            with self._lock:
                for job, seq, outcome in ready:
                    self._counts[(job.id, seq)] += 1
                    self._kinds[type(outcome).__name__] += 1
            deliver(ready)

        driver._deliver = counted
        submit, directed = driver.submit, driver.submit_directed

        def submitted(job: Any, tasks: list[Any], *args: Any, **kwargs: Any) -> None:
            with self._lock:
                self._submitted.update((job.id, task.seq) for task in tasks)
            submit(job, tasks, *args, **kwargs)

        def submitted_directed(job: Any, msg: Any, *args: Any, **kwargs: Any) -> bool:
            sent: bool = directed(job, msg, *args, **kwargs)
            if sent:
                with self._lock:
                    self._submitted.add((job.id, msg.seq))
            return sent

        driver.submit = submitted
        driver.submit_directed = submitted_directed

    def counts(self) -> dict[tuple[int, int], int]:
        """Deliveries so far per ``(job, seq)``."""
        if self._sim is not None:
            return dict(self._sim.deliveries)
        with self._lock:
            return dict(self._counts)

    def kinds(self) -> dict[str, int]:
        """Deliveries so far per kind of outcome (``Ok``, ``Err``, or an exception's class name)."""
        if self._sim is not None:
            return dict(self._sim.delivered_kinds)
        with self._lock:
            return dict(self._kinds)

    def submitted(self) -> set[tuple[int, int]]:
        """Every ``(job, seq)`` given to the workers since the log was created."""
        if self._sim is not None:
            return set(self._sim.submitted) - self._sim_before
        with self._lock:
            return set(self._submitted)

    def repeated(self) -> dict[tuple[int, int], int]:
        """``(job, seq)`` delivered more than once."""
        return {k: n for k, n in self.counts().items() if n > 1}

    def missing(self) -> list[tuple[int, int]]:
        """``(job, seq)`` given to the workers and never delivered (so far), in order."""
        counts = self.counts()
        return sorted(k for k in self.submitted() if not counts.get(k))

    def check(self, complete: bool = False) -> None:
        """Raise AssertionError if anything was delivered twice (or, with ``complete``, never)."""
        repeated = self.repeated()
        assert not repeated, f"exactly-once delivery broken: delivered more than once: {repeated}"
        if complete:
            missing = self.missing()
            assert not missing, (
                f"exactly-once delivery broken: given to the workers, never delivered: {missing[:20]}"
                + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            )


def check_exactly_once(got: Iterable[Hashable], expected: Iterable[Hashable]) -> None:
    """Every expected value arrived exactly once, and nothing else arrived.

    Compares multisets: order does not matter (use :func:`check_per_caller_order`
    for order). The message lists what is missing and what is extra or repeated.
    """
    have, want = Counter(got), Counter(expected)
    if have == want:
        return
    missing = dict(want - have)
    extra = dict(have - want)
    raise AssertionError(f"exactly-once broken: missing {missing or '{}'}, extra or repeated {extra or '{}'}")


def check_per_caller_order(observed: Iterable[tuple[Hashable, int]],
                           sent: dict[Hashable, Sequence[int]] | None = None) -> None:
    """Each caller's messages were observed in the order that caller sent them.

    ``observed`` is the sequence of ``(caller, number)`` in the order the
    receiver (an actor, say) saw them, where each caller numbers its own
    messages increasingly. With ``sent``, also check that each caller's
    observed messages are exactly those it sent (none lost, none repeated).
    """
    seen: dict[Hashable, list[int]] = {}
    for caller, number in observed:
        seen.setdefault(caller, []).append(number)
    for caller, numbers in seen.items():
        for before, after in zip(numbers, numbers[1:]):
            assert before < after, (
                f"per-caller order broken for {caller!r}: {after} observed after {before} "
                f"(observed sequence {numbers})"
            )
    if sent is not None:
        for caller, sent_numbers in sent.items():
            assert seen.get(caller, []) == list(sent_numbers), (
                f"caller {caller!r} sent {list(sent_numbers)} but the receiver saw {seen.get(caller, [])}"
            )


def check_bounded_mailbox(rt: Any, limit: int, *, timeout: float = 1.0) -> None:
    """No actor of ``rt`` has more than ``limit`` calls waiting now (from ``rt.inspect(timeout)``).

    On a real :class:`phalanx.Runtime` these are the mailbox lengths the
    workers report to ``inspect()`` (a worker that does not answer within
    ``timeout`` is not checked). On a :class:`~phalanx.testing.SimRuntime`
    the high-water mark since it started (``rt.max_mailbox``) is checked
    too, not only the present.
    """
    peak = getattr(rt, "max_mailbox", None)
    if isinstance(peak, int):
        assert peak <= limit, f"bounded mailbox broken: an actor's mailbox reached {peak} > {limit}"
    for worker in rt.inspect(timeout).workers:
        for actor in worker.actors:
            assert actor.mailbox <= limit, (
                f"bounded mailbox broken: actor {actor.id} ({actor.cls}) on {worker.id} has "
                f"{actor.mailbox} calls waiting > {limit}"
            )


# --------------------------------------------------------------------------- #
# Process leaks
# --------------------------------------------------------------------------- #

#: the environment variable marking processes started inside a ProcessLeakCheck
LEAK_MARK = "PHALANX_TESTING_LEAK_MARK"
_MARKS = itertools.count(1)

#: per-interpreter multiprocessing helpers kept for the whole session (not leaks)
_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")

#: a process: its pid and its start in ticks since boot (not psutil's wall-clock creation
#: time, which moves when the clock steps, and would make a process seen on entry look new)
_Key = tuple[int, int]


def _ticks_now() -> int:
    """Clock ticks since boot now, as process starts are counted (``CLOCK_BOOTTIME``)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def _key(proc: psutil.Process) -> _Key | None:
    ticks = start_ticks(proc.pid)
    return None if ticks is None else (proc.pid, ticks)


def _children() -> set[_Key]:
    return {k for k in (_key(p) for p in psutil.Process().children(recursive=True)) if k is not None}


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "?"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ProcessLeakCheck:
    """No process started inside the block survives it (after ``grace`` seconds).

    ::

        with ProcessLeakCheck():
            with phalanx.Runtime(workers=2) as rt:
                ...

    It sees two kinds of process: descendants of this process that were not
    there on entry, and any process carrying this check's mark in its
    environment (``PHALANX_TESTING_LEAK_MARK``, set in ``os.environ`` on
    entry and inherited by whatever is started meanwhile) -- so an orphan
    that was reparented to init is still found. A process started with a
    cleaned environment, or forked from a server started before the check
    (multiprocessing's forkserver), is seen only while it is a descendant.
    Stragglers are SIGKILLed, reaped when they are our children, and
    reported in the AssertionError with their pids and command lines.
    ``check()`` does the same without raising and returns the report lines.
    """

    def __init__(self, grace: float = 3.0) -> None:
        self.grace = grace
        self.before: set[_Key] = set()
        self.mark = f"{os.getpid()}-{next(_MARKS)}-{os.urandom(4).hex()}"
        #: when the block began, in ticks since boot (see start_ticks)
        self._since = 0
        self._orphans: set[int] = set()

    def __enter__(self) -> ProcessLeakCheck:
        self.before = _children()
        self._since = _ticks_now()
        marks = os.environ.get(LEAK_MARK)
        os.environ[LEAK_MARK] = f"{marks}:{self.mark}" if marks else self.mark
        return self

    def _unmark(self) -> None:
        """Stop marking what is started from now on (the check is over)."""
        marks = [m for m in os.environ.get(LEAK_MARK, "").split(":") if m and m != self.mark]
        if marks:
            os.environ[LEAK_MARK] = ":".join(marks)
        else:
            os.environ.pop(LEAK_MARK, None)

    def _marked(self, seen: set[int]) -> list[psutil.Process]:
        """Live processes carrying this check's mark that are not our descendants."""
        out: list[psutil.Process] = []
        me = os.getpid()
        # Started within the block (a tick of slack: starts are counted in ticks).
        for proc in psutil.process_iter():
            ticks = start_ticks(proc.pid)
            if proc.pid == me or proc.pid in seen or ticks is None or ticks < self._since - 1:
                continue
            try:
                marks = proc.environ().get(LEAK_MARK, "")
            except psutil.Error:
                continue  # gone, or another user's
            if self.mark in marks.split(":") and _alive(proc):
                out.append(proc)
        return out

    def _new_live(self) -> list[psutil.Process]:
        # Let multiprocessing reap the children it knows about (its own waitpid
        # bookkeeping), then reap remaining zombie direct children ourselves --
        # never one multiprocessing still tracks, or its Process.join() would hang.
        mp_owned = {p.pid for p in multiprocessing.active_children()}
        out: list[psutil.Process] = []
        zombies: list[psutil.Process] = []
        me = os.getpid()
        descendants = psutil.Process().children(recursive=True)
        for proc in descendants:
            key = _key(proc)
            if key is None or key in self.before or any(h in _cmdline(proc) for h in _HELPERS):
                continue
            if _alive(proc):
                out.append(proc)
                continue
            try:
                if proc.ppid() == me and proc.pid not in mp_owned:
                    zombies.append(proc)
            except psutil.Error:
                pass
        if zombies:
            psutil.wait_procs(zombies, timeout=0)
        orphans = self._marked({p.pid for p in descendants})
        self._orphans = {p.pid for p in orphans}
        return out + orphans

    def check(self) -> list[str]:
        """Wait up to ``grace`` for new processes to exit; kill and report the rest."""
        self._unmark()
        deadline = time.monotonic() + self.grace
        leaked = self._new_live()
        while leaked and time.monotonic() < deadline:
            time.sleep(0.05)
            leaked = self._new_live()
        report = [f"pid {p.pid}: {_cmdline(p)}" + (" (an orphan: no longer a descendant of this process)"
                                                    if p.pid in self._orphans else "") for p in leaked]
        for proc in leaked:
            try:
                proc.kill()
            except psutil.Error:
                pass
        if leaked:
            psutil.wait_procs(leaked, timeout=self.grace)
            multiprocessing.active_children()  # reap what multiprocessing owns
        return report

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        report = self.check()
        if report and exc_type is None:
            raise AssertionError(
                f"leaked {len(report)} process(es) started by pid {os.getpid()} (killed):\n  " + "\n  ".join(report)
            )
