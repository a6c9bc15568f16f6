"""One actor driven by a Hypothesis state machine, checked against a model.

Runs in the test (driver) process against a real ``phalanx.Runtime`` with
two worker processes, shared by every example of the machine. The machine
holds one supervised ``actor_ops.Counter`` (``restart_policy="on-failure"``,
a checkpoint after every call) and interleaves:

* calls (``incr`` by k, pipelined), each result checked against the model;
* hot restarts (``ref.restart()`` onto the other worker, the same worker, or
  a worker that does not exist) that succeed -- the state moves to a new
  instance -- or fail -- ``save()`` or ``restore()`` raise on request, or the
  target is unknown -- so that ``RestartFailed`` is emitted and the old
  instance keeps serving with its state;
* SIGKILLs of the worker process hosting the actor (its pid taken from the
  actor's inspect node), with calls in flight: the actor resumes on a live
  worker from its last checkpoint -- in-flight calls either succeed, in
  order, or fail with ``ActorDiedError``, and the resumed value is the
  checkpoint of the value before one of the successful ones -- or, when the
  checkpoint itself cannot be restored, fails for good;
* stops, after which calls fail with ``ActorDiedError`` and the machine
  spawns a fresh actor.

The model covers the actor's value, the generation its ``restore()`` counts,
its failure flags, the checkpoint the driver holds, the pid serving it, and
the exact sequence of ``ref.events()``: ``Started(worker, restored)``,
``RestartFailed(error)``, ``Failed(error, final)`` and ``Stopped``.
"""

from __future__ import annotations

import itertools
import os
import signal
from typing import Any, NamedTuple

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import phalanx
from actor_ops import ActorOpsError, Counter, wait_settled

T = 30.0  # seconds: generous bound on any single wait (never an assertion on speed)

#: Supervised restarts the actor system allows per actor within its window.
MAX_SUPERVISED_RESTARTS = 3

MACHINE_SETTINGS = settings(max_examples=20, stateful_step_count=12, deadline=None)


class Checkpoint(NamedTuple):
    """What ``Counter.save()`` returned last, as far as the driver holds it."""

    n: int
    fail_restore: bool
    generation: int


def event_key(event: Any) -> tuple[Any, ...]:
    """An event reduced to what the model predicts."""
    if isinstance(event, phalanx.Started):
        return ("Started", event.worker, event.restored)
    if isinstance(event, phalanx.Stopped):
        return ("Stopped",)
    if isinstance(event, (phalanx.Failed, phalanx.RestartFailed)):
        error = event.error
        detail = str(error) if isinstance(error, ActorOpsError) else ""
        if isinstance(event, phalanx.Failed):
            return ("Failed", event.final, type(error).__name__, detail)
        return ("RestartFailed", type(error).__name__, detail)
    raise AssertionError(f"not an actor event: {event!r}")


def events_so_far(ref: phalanx.ActorRef[Any]) -> list[tuple[Any, ...]]:
    """Every event of ``ref`` so far, without waiting for more."""
    got: list[tuple[Any, ...]] = []
    try:
        for event in ref.events(timeout=0.05):
            got.append(event_key(event))
    except phalanx.TaskTimeoutError:
        pass  # a live actor: no further event for now
    return got


def first_events(ref: phalanx.ActorRef[Any], n: int) -> list[tuple[Any, ...]]:
    """The first ``n`` events of ``ref``, waiting for them."""
    return [event_key(e) for e in itertools.islice(ref.events(timeout=T), n)]


def running_sums(start: int, ks: list[int]) -> list[int]:
    return list(itertools.accumulate(ks, initial=start))[1:]


SAVE_FAILED = ("RestartFailed", "ActorOpsError", "save failed on purpose")
RESTORE_FAILED = ("RestartFailed", "ActorOpsError", "restore failed on purpose")
NO_SUCH_WORKER = ("RestartFailed", "LookupError", "")
KILLED = ("Failed", False, "ActorDiedError", "")
UNRESTORABLE = ("Failed", True, "ActorOpsError", "restore failed on purpose")
STOPPED = ("Stopped",)


class ActorMachine(RuleBasedStateMachine):
    """One supervised Counter actor against its model (see the module docstring)."""

    rt: phalanx.Runtime  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        self.deaths = self.rt.stats().worker_deaths  # worker deaths expected so far
        self.ref: phalanx.ActorRef[Counter] | None = None
        # the model of the current actor (reset by _spawn)
        self.start = 0
        self.n = 0
        self.generation = 0
        self.fail_restore = False
        self.fail_save = False
        self.checkpointing = True  # save() after every call (else only at hot restarts)
        self.checkpoint: Checkpoint | None = None
        self.supervised = 0  # supervised restarts of this actor
        self.pid = 0
        self.events: list[tuple[Any, ...]] = []

    # ---- helpers -----------------------------------------------------------------------

    @property
    def actor(self) -> phalanx.ActorRef[Counter]:
        assert self.ref is not None
        return self.ref

    def _spawn(self, start: int, checkpointing: bool) -> None:
        self.ref = self.rt.spawn(Counter, start, restart_policy="on-failure",
                                 checkpoint_every=1 if checkpointing else 0, timeout=T)
        self.checkpointing = checkpointing
        self.start = self.n = start
        self.generation = 0
        self.fail_restore = self.fail_save = False
        self.checkpoint = None
        self.supervised = 0
        self.pid = self.rt.worker_pids()[self.actor.worker]
        self.events = [("Started", self.actor.worker, False)]

    @property
    def saves(self) -> bool:
        """Whether the instance checkpoints its state after each call."""
        return self.checkpointing and not self.fail_save

    def _served(self) -> None:
        """A call was served: the instance saves its state after it, if it checkpoints."""
        if self.saves:
            self.checkpoint = Checkpoint(self.n, self.fail_restore, self.generation)

    def _check_events(self) -> None:
        assert events_so_far(self.actor) == self.events

    def _check_dead(self, state: str) -> None:
        """An actor that ended: its log is complete, calls and restarts fail, stop is a no-op."""
        ref = self.actor
        ref.join(T)
        assert ref.state == state
        assert [event_key(e) for e in ref.events(timeout=T)] == self.events
        with pytest.raises(phalanx.ActorDiedError):
            ref.incr(1).result(timeout=T)
        with pytest.raises(phalanx.ActorDiedError):
            ref.restart(timeout=T)
        ref.stop()
        assert ref.state == state

    # ---- rules -------------------------------------------------------------------------

    @initialize(start=st.integers(-100, 100), checkpointing=st.booleans())
    def spawn(self, start: int, checkpointing: bool) -> None:
        self._spawn(start, checkpointing)

    @rule(ks=st.lists(st.integers(-50, 50), min_size=1, max_size=4))
    def incr(self, ks: list[int]) -> None:
        futures = [self.actor.incr(k) for k in ks]
        assert [f.result(timeout=T) for f in futures] == running_sums(self.n, ks)
        for k in ks:
            self.n += k
            self._served()

    @rule(flag=st.sampled_from(["restore", "save"]), value=st.booleans())
    def set_flag(self, flag: str, value: bool) -> None:
        """Make the instance's save() or the next restore() of its state raise (or not)."""
        assert self.actor.call(f"set_fail_{flag}", value).result(timeout=T) is value
        setattr(self, f"fail_{flag}", value)
        self._served()

    @rule(where=st.sampled_from(["other", "same", "missing"]),
          arm=st.sampled_from([None, None, "save", "restore"]))
    def hot_restart(self, where: str, arm: str | None) -> None:
        """``ref.restart()``; ``arm`` makes save() or restore() raise for this restart only."""
        if arm is not None:
            self.set_flag(arm, True)
        self._hot_restart(where)
        if arm is not None:
            self.set_flag(arm, False)

    def _hot_restart(self, where: str) -> None:
        ref = self.actor
        old_worker = ref.worker
        on = {"other": None, "same": old_worker, "missing": "no-such-worker"}[where]
        # restart() takes the state first (save), then places, then restores
        if self.fail_save:
            expected: tuple[Any, ...] | None = SAVE_FAILED
        elif where == "missing":
            expected = NO_SUCH_WORKER
        elif self.fail_restore:
            expected = RESTORE_FAILED
        else:
            expected = None
        ok = ref.restart(on=on, timeout=T)
        assert ok is (expected is None)
        assert ref.state == "running"
        if expected is not None:
            # reverted: the old instance keeps serving, with its state and flags
            assert ref.worker == old_worker
            self.events.append(expected)
            return
        if where == "same":
            assert ref.worker == old_worker
        else:
            assert ref.worker != old_worker
            self.pid = self.rt.worker_pids()[ref.worker]
        # the driver keeps the state save() handed over; restore() counts a generation
        self.checkpoint = Checkpoint(self.n, False, self.generation)
        self.generation += 1
        self.events.append(("Started", ref.worker, True))

    @precondition(lambda self: self.supervised < MAX_SUPERVISED_RESTARTS)
    @rule(inflight=st.lists(st.integers(1, 9), max_size=3), arm_restore=st.booleans(),
          start=st.integers(-100, 100), checkpointing=st.booleans())
    def kill_worker(self, inflight: list[int], arm_restore: bool, start: int, checkpointing: bool) -> None:
        """SIGKILL the actor's process; ``start``/``checkpointing`` spawn the next actor if it fails."""
        if arm_restore:
            self.set_flag("restore", True)  # checkpoints taken from now on cannot be restored
        ref = self.actor
        # Two calls first: the driver receives the checkpoint taken after a call before
        # the outcome of the next call, so the model's checkpoint is now the driver's.
        for _ in range(2):
            assert ref.get().result(timeout=T) == self.n
            self._served()
        nodes = ref.inspect(timeout=T).workers
        assert [w.id for w in nodes] == [ref.worker]
        assert [a.id for a in nodes[0].actors] == [ref.id]
        pid = nodes[0].pid
        assert pid == self.pid == self.rt.worker_pids()[ref.worker]
        killed_worker, before = ref.worker, self.n
        futures = [ref.incr(k) for k in inflight]
        os.kill(pid, signal.SIGKILL)
        self.deaths += 1
        self.supervised += 1
        ckpt = self.checkpoint
        unrestorable = ckpt is not None and ckpt.fail_restore
        got = first_events(ref, len(self.events) + 2)
        self.events.append(KILLED)
        if unrestorable:
            self.events.append(UNRESTORABLE)
        else:
            assert ref.worker != killed_worker
            self.events.append(("Started", ref.worker, ckpt is not None))
        assert got == self.events

        # In-flight calls: those that succeeded are a prefix, with the model's values;
        # the others failed with ActorDiedError (none is redelivered to the new instance).
        served: list[int | None] = []
        for fut in futures:
            try:
                served.append(fut.result(timeout=T))
            except phalanx.ActorDiedError:
                served.append(None)
        ok = [v for v in served if v is not None]
        assert served[: len(ok)] == ok, f"in-flight calls succeeded out of order: {served}"
        assert ok == running_sums(before, inflight)[: len(ok)]

        if unrestorable:
            self._check_dead("failed")
            wait_settled(self.rt, workers=2, deaths=self.deaths, timeout=T)
            self._spawn(start, checkpointing)
            return

        # Resumed from the checkpoint: the one taken before the kill or, when the
        # instance checkpoints, one taken after an in-flight call. That call may be one
        # whose caller got ActorDiedError: the worker ran it and sent its checkpoint,
        # and the driver read them after it had seen the process die (the outcome of
        # a call in flight at a death is unknown, not "not run").
        info = ref.info().result(timeout=T)
        if ckpt is None:
            candidates = [self.start]  # never checkpointed: a fresh instance from the arguments
            assert info["generation"] == 0
        else:
            assert ckpt.n == before or not self.saves
            candidates = [ckpt.n]
            if self.saves:
                candidates += running_sums(before, inflight)
            assert info["generation"] == ckpt.generation + 1
        assert info["n"] in candidates, (info, candidates, served)
        self.n, self.generation = info["n"], info["generation"]
        self.fail_restore = self.fail_save = False
        self.checkpoint = Checkpoint(self.n, False, ckpt.generation) if ckpt is not None else None
        self._served()  # the info() call
        self.pid = info["pid"]
        wait_settled(self.rt, workers=2, deaths=self.deaths, timeout=T)
        assert self.rt.worker_pids()[ref.worker] == self.pid

    @rule(pending=st.lists(st.integers(-9, 9), max_size=3), start=st.integers(-100, 100),
          checkpointing=st.booleans())
    def stop(self, pending: list[int], start: int, checkpointing: bool) -> None:
        ref = self.actor
        futures = [ref.incr(k) for k in pending]
        ref.stop()  # after the calls already made
        ref.join(T)
        assert [f.result(timeout=T) for f in futures] == running_sums(self.n, pending)
        self.events.append(STOPPED)
        self._check_dead("stopped")
        self._spawn(start, checkpointing)

    # ---- invariants -----------------------------------------------------------------------

    @invariant()
    def serves_model_state(self) -> None:
        if self.ref is None:
            return
        ref = self.actor
        assert ref.state == "running"
        info = ref.info().result(timeout=T)
        assert (info["n"], info["generation"], info["pid"]) == (self.n, self.generation, self.pid)
        self._served()
        assert self.rt.worker_pids()[ref.worker] == self.pid
        self._check_events()

    def teardown(self) -> None:
        ref = self.ref
        self.ref = None
        try:
            if ref is not None and ref.state == "running":
                ref.stop()
                ref.join(T)
        finally:
            # leave the shared runtime at full strength for the next example
            wait_settled(self.rt, workers=2, deaths=self.deaths, timeout=T)


@pytest.mark.timeout(600)
def test_actor_state_machine() -> None:
    with phalanx.Runtime(workers=2, restart_limit=10_000) as rt:
        ActorMachine.rt = rt
        try:
            run_state_machine_as_test(ActorMachine, settings=MACHINE_SETTINGS)
        finally:
            del ActorMachine.rt
