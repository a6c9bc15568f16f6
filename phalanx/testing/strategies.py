"""Hypothesis strategies for fault plans, seeds and schedules.

Runs in the test process, wherever Hypothesis draws examples. Every strategy
here shrinks towards "no fault, seed 0": a plan shrinks by dropping steps
and by moving each step to earlier tasks and messages, so a failing plan
ends up as the few steps that matter, printed as valid Python.

::

    from hypothesis import given
    from phalanx.testing import SimRuntime, strategies as pst

    @given(plan=pst.fault_plans(), seed=pst.seeds())
    def test_squares(plan, seed):
        with SimRuntime(workers=2, seed=seed, faults=plan) as rt:
            assert list(rt.map(square, range(20))) == [x * x for x in range(20)]

Invariant kept: every step drawn is valid (its constructor accepted it), so
a shrunk plan pasted back into a test builds the same faults.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover  (hypothesis is a test dependency)
    raise ImportError(
        "phalanx.testing.strategies needs Hypothesis: pip install 'phalanx[testing]'"
    ) from exc

from .faults import (
    DelayMessage,
    DropMessage,
    DuplicateMessage,
    FailRestart,
    Fault,
    KillWorker,
    PartitionHost,
    ReorderMessages,
)

__all__ = [
    "kill_workers",
    "drop_messages",
    "delay_messages",
    "duplicate_messages",
    "reorder_messages",
    "fail_restarts",
    "partitions",
    "faults",
    "fault_plans",
    "seeds",
    "schedules",
    "SAFE",
    "ALL",
]

#: fault kinds phalanx promises to tolerate without a hang or a lost or repeated
#: result: process deaths, late, repeated and reordered frames, partitions that heal
SAFE: tuple[str, ...] = ("kill", "delay", "duplicate", "reorder", "partition")
#: every fault kind (a dropped frame can leave a caller waiting forever: see HangError)
ALL: tuple[str, ...] = SAFE + ("drop", "fail_restart")

_MESSAGE_KINDS = ("result", "task", "event", "control")


def kill_workers(max_task: int = 20) -> st.SearchStrategy[KillWorker]:
    """``KillWorker(task=..., when=...)`` with ``task`` in ``0..max_task``."""
    return st.builds(KillWorker, task=st.integers(0, max_task),
                     when=st.sampled_from(("during", "before", "after")))


def _kinds(kinds: Sequence[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(list(kinds))


def drop_messages(max_index: int = 20, kinds: Sequence[str] = _MESSAGE_KINDS) -> st.SearchStrategy[DropMessage]:
    """``DropMessage(kind=..., index=...)``."""
    return st.builds(DropMessage, kind=_kinds(kinds), index=st.integers(0, max_index))


def delay_messages(max_index: int = 20, kinds: Sequence[str] = _MESSAGE_KINDS,
                   max_seconds: float = 0.5) -> st.SearchStrategy[DelayMessage]:
    """``DelayMessage(kind=..., index=..., seconds=...)``, seconds from a few round values."""
    seconds = st.sampled_from([s for s in (0.01, 0.05, 0.2, 0.5, 1.0) if s <= max_seconds] or [max_seconds])
    return st.builds(DelayMessage, kind=_kinds(kinds), index=st.integers(0, max_index), seconds=seconds)


def duplicate_messages(max_index: int = 20,
                       kinds: Sequence[str] = ("result", "event")) -> st.SearchStrategy[DuplicateMessage]:
    """``DuplicateMessage(kind=..., index=...)``; by default only worker -> driver frames.

    A duplicated *task* frame makes a worker run the task twice, which
    phalanx never does by itself (execution is at-least-once only across
    crashes); pass ``kinds=("task", ...)`` to test idempotence anyway.
    """
    return st.builds(DuplicateMessage, kind=_kinds(kinds), index=st.integers(0, max_index))


def reorder_messages(max_index: int = 20,
                     kinds: Sequence[str] = _MESSAGE_KINDS) -> st.SearchStrategy[ReorderMessages]:
    """``ReorderMessages(kind=..., index=...)``."""
    return st.builds(ReorderMessages, kind=_kinds(kinds), index=st.integers(0, max_index))


def fail_restarts(max_restart: int = 3) -> st.SearchStrategy[FailRestart]:
    """``FailRestart(restart=...)``."""
    return st.builds(FailRestart, restart=st.integers(0, max_restart))


def partitions(max_task: int = 20, max_seconds: float = 0.5) -> st.SearchStrategy[PartitionHost]:
    """``PartitionHost(task=..., seconds=...)``."""
    seconds = st.sampled_from([s for s in (0.05, 0.2, 0.5, 2.0) if s <= max_seconds] or [max_seconds])
    return st.builds(PartitionHost, task=st.integers(0, max_task), seconds=seconds)


def faults(kinds: Sequence[str] = SAFE, max_task: int = 20, max_index: int = 20) -> st.SearchStrategy[Fault]:
    """One fault step of the given kinds (see :data:`SAFE` and :data:`ALL`)."""
    table: dict[str, st.SearchStrategy[Fault]] = {
        "kill": kill_workers(max_task),
        "drop": drop_messages(max_index),
        "delay": delay_messages(max_index),
        "duplicate": duplicate_messages(max_index),
        "reorder": reorder_messages(max_index),
        "fail_restart": fail_restarts(),
        "partition": partitions(max_task),
    }
    unknown = [k for k in kinds if k not in table]
    if unknown or not kinds:
        raise ValueError(f"fault kinds must be among {sorted(table)}, got {list(kinds)}")
    return st.one_of([table[k] for k in kinds])


def fault_plans(kinds: Sequence[str] = SAFE, max_steps: int = 4, max_task: int = 20,
                max_index: int = 20) -> st.SearchStrategy[list[Fault]]:
    """Fault plans: lists of up to ``max_steps`` steps, shrinking to fewer and earlier ones."""
    return st.lists(faults(kinds, max_task, max_index), max_size=max_steps)


def seeds() -> st.SearchStrategy[int]:
    """Scheduler seeds for :class:`~phalanx.testing.SimRuntime` (shrink towards 0)."""
    return st.integers(0, 2**32 - 1)


def schedules() -> st.SearchStrategy[random.Random]:
    """Schedules Hypothesis controls and shrinks choice by choice.

    Pass the drawn value as ``SimRuntime(seed=...)``: every scheduling
    decision then comes from Hypothesis, which can shrink the interleaving
    itself, not only its seed.
    """
    return st.randoms(use_true_random=False)
