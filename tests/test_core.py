"""The core without a host: feed it events, check what comes out (h11's style).

Runs in the test process only: no worker, no socket, no thread, no clock.
Each test builds the records a host would (jobs, tasks, outcomes), calls the
core and asserts its return values and outbox; races that need sleeps and
real processes to reproduce on a runtime are written here as a plain
sequence of calls.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import phalanx
from phalanx.core import SKIPPED, Job, Outcomes, Task
from phalanx.core.window import COMPLETE, FAILED, READY, WAIT, ChunkSizer, MapWindow
from phalanx.errors import ActorDiedError, RuntimeBrokenError, WorkerCrashedError
from phalanx.policy import TaskOptions
from phalanx.transport.codec import encode, error_info
from phalanx.transport.messages import ActorCall, Call, Chunk, Err, Ok

CORE = Path(phalanx.__file__).parent / "core"
#: modules that do I/O, wait or read the clock: none may be imported under phalanx/core/
FORBIDDEN = {"threading", "zmq", "socket", "select", "time", "os", "asyncio", "subprocess", "multiprocessing",
             "signal", "selectors", "queue"}


def test_the_core_imports_no_io() -> None:
    found = []
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found += [(path.name, name) for name in names if name.split(".")[0] in FORBIDDEN]
    assert len(list(CORE.glob("*.py"))) >= 4
    assert found == []


# ---- helpers: what a host would build ---------------------------------------------


class Sink:
    """A job's callbacks, recording what the host delivers."""

    def __init__(self) -> None:
        self.got: list[tuple[int, Any]] = []
        self.failed: list[BaseException] = []

    def deliver(self, seq: int, outcome: Any) -> None:
        self.got.append((seq, outcome))

    def fail(self, exc: BaseException) -> None:
        self.failed.append(exc)


def core(max_attempts: int = 3, restart_limit: int = 2, restart_window: float = 10.0) -> Outcomes:
    return Outcomes({}, max_attempts, restart_limit, restart_window)


def open_job(o: Outcomes, job_id: int = 1, autoclose: bool = False, **options: Any) -> Job:
    sink = Sink()
    job = Job(job_id, "op", sink.deliver, sink.fail, autoclose=autoclose,
              options=TaskOptions(**options) if options else None)
    o.jobs[job_id] = job
    return job


def call(job: Job, seq: int) -> Task:
    msg = Call(job.id, seq, 0, "op", [seq])
    task = Task(msg, encode(msg))
    job.outstanding[seq] = task
    return task


def chunk(job: Job, seq: int, items: list[Any]) -> Task:
    msg = Chunk(job.id, seq, 0, "op", items)
    task = Task(msg, encode(msg), len(items))
    job.outstanding[seq] = task
    return task


def actor_call(job: Job, seq: int) -> Task:
    msg = ActorCall(job.id, seq, 0, 1, "incr", [])
    task = Task(msg, encode(msg))
    job.outstanding[seq] = task
    return task


def err(task: Task, index: int = 0, partial: list[Any] | None = None, transient: bool = False) -> Err:
    return Err(task.job, task.seq, task.attempt, error_info(ValueError(f"item {index}")), index, partial, transient)


# ---- outcome resolution -------------------------------------------------------------


def test_an_ok_outcome_is_delivered_once_and_closes_an_autoclose_job() -> None:
    o = core()
    job = open_job(o, autoclose=True)
    task = call(job, 0)
    ok = Ok(1, 0, 0, 42)
    assert o.resolve(job, task, ok) is ok
    assert job.outstanding == {} and o.jobs == {}
    assert (o.tasks_completed, o.items_completed, o.requeue, o.later) == (1, 1, [], [])


def test_a_transient_error_with_a_delay_waits_for_its_timer_then_goes_again() -> None:
    o = core()
    job = open_job(o, retry=phalanx.After(2.0, 3))
    task = call(job, 0)
    assert o.resolve(job, task, err(task, transient=True)) is None
    assert o.next_deadline() is None  # not armed yet: the host arms with its clock
    o.arm(100.0)
    assert o.next_deadline() == 102.0
    assert o.due(101.9) == []
    (again,) = o.due(102.0)
    assert again.attempt == 1 and again.retries == 1 and job.outstanding[0] is again
    assert o.retried == 1 and o.next_deadline() is None


def test_a_retry_whose_job_ended_while_it_waited_is_not_sent() -> None:
    # On a runtime: close a map while a retry sleeps, then wait past the delay.
    o = core()
    job = open_job(o, retry=phalanx.After(1.0, 3))
    task = call(job, 0)
    o.resolve(job, task, err(task, transient=True))
    o.arm(0.0)
    del o.jobs[job.id]
    assert o.due(5.0) == []


def test_a_transient_error_mid_chunk_resumes_at_the_failed_item_keeping_the_values_before_it() -> None:
    o = core()
    job = open_job(o, retry=phalanx.Immediate(3))
    task = chunk(job, 0, [10, 11, 12, 13])
    assert o.resolve(job, task, err(task, index=2, partial=["a", "b"], transient=True)) is None
    (rest,) = o.take_requeue()
    assert isinstance(rest.msg, Chunk) and rest.msg.items == [12, 13] and rest.prefix == ["a", "b"]
    final = o.resolve(job, rest, Ok(1, 0, 1, ["c", "d"]))
    assert isinstance(final, Ok) and final.value == ["a", "b", "c", "d"]


def test_ignore_skips_the_failing_item_and_resumes_after_it() -> None:
    o = core()
    job = open_job(o, on_fatal=phalanx.Ignore)
    task = chunk(job, 0, [0, 1, 2])
    assert o.resolve(job, task, err(task, index=1, partial=["zero"])) is None
    (rest,) = o.take_requeue()
    assert isinstance(rest.msg, Chunk) and rest.msg.items == [2] and rest.prefix == ["zero", SKIPPED]
    assert job.skipped is not None and [(s, i) for s, i, _ in job.skipped] == [(0, 1)]
    final = o.resolve(job, rest, Ok(1, 0, 1, ["two"]))
    assert isinstance(final, Ok) and final.value == ["zero", SKIPPED, "two"]


def test_ignore_on_the_last_item_completes_the_chunk() -> None:
    o = core()
    job = open_job(o, on_fatal=phalanx.Ignore)
    task = chunk(job, 0, [0, 1])
    final = o.resolve(job, task, err(task, index=1, partial=["zero"]))
    assert isinstance(final, Ok) and final.value == ["zero", SKIPPED]
    assert o.requeue == [] and job.outstanding == {}


def test_terminate_reports_the_item_s_position_in_the_whole_chunk_after_a_resume() -> None:
    o = core()
    job = open_job(o, retry=phalanx.Immediate(1))
    task = chunk(job, 0, [0, 1, 2, 3])
    o.resolve(job, task, err(task, index=1, partial=["a"], transient=True))
    (rest,) = o.take_requeue()
    final = o.resolve(job, rest, err(rest, index=1, partial=["b"]))  # retries used up: fatal
    assert isinstance(final, Err) and final.index == 2 and final.partial == ["a", "b"]
    assert o.tasks_failed == 1


# ---- deaths ---------------------------------------------------------------------------


def test_a_crash_is_charged_to_the_task_the_worker_ran_first_only() -> None:
    o = core()
    job = open_job(o)
    running, queued = call(job, 0), call(job, 1)
    failed, requeue, broken = o.worker_died("w1", [running, queued], -9, planned=False, now=0.0)
    assert failed == [] and broken is None
    assert [(t.seq, t.attempt, t.crashes) for t in requeue] == [(0, 1, 1), (1, 1, 0)]
    assert job.outstanding[0] is requeue[0] and o.redelivered == 2


def test_a_planned_death_charges_no_crash_and_counts_no_restart() -> None:
    o = core(restart_limit=0)
    job = open_job(o)
    _, requeue, broken = o.worker_died("w1", [call(job, 0)], None, planned=True, now=0.0)
    assert requeue[0].crashes == 0 and broken is None and not o.restarts


def test_a_task_charged_max_attempts_crashes_fails_with_worker_crashed_error() -> None:
    o = core(max_attempts=2, restart_limit=10)
    job = open_job(o, autoclose=True)
    task = call(job, 0)
    _, (again,), _ = o.worker_died("w1", [task], -9, planned=False, now=0.0)
    failed, requeue, _ = o.worker_died("w2", [again], -9, planned=False, now=1.0)
    assert requeue == [] and o.jobs == {}
    ((j, seq, exc),) = failed
    assert j is job and seq == 0 and isinstance(exc, WorkerCrashedError)
    assert "died 2 times" in str(exc) and "signal 9" in str(exc)


def test_an_actor_call_on_a_dead_worker_fails_and_is_never_run_again() -> None:
    o = core()
    job = open_job(o)
    failed, requeue, _ = o.worker_died("w1", [actor_call(job, 0)], -9, planned=False, now=0.0)
    assert requeue == [] and isinstance(failed[0][2], ActorDiedError) and job.outstanding == {}


def test_a_result_that_arrived_before_the_death_was_noticed_is_not_redelivered() -> None:
    # On a runtime: a worker sends its result, then dies; the supervisor notices late.
    o = core()
    job = open_job(o)
    task = call(job, 0)
    o.resolve(job, task, Ok(1, 0, 0, 1))
    failed, requeue, _ = o.worker_died("w1", [task], -9, planned=False, now=0.0)
    assert failed == [] and requeue == []


def test_too_many_unplanned_deaths_within_the_window_break_the_runtime() -> None:
    o = core(restart_limit=2, restart_window=10.0)
    assert o.worker_died("w1", [], -9, False, now=0.0)[2] is None
    assert o.worker_died("w2", [], -9, False, now=5.0)[2] is None
    assert o.worker_died("w3", [], -9, False, now=20.0)[2] is None  # the first one left the window
    assert o.worker_died("w4", [], -9, False, now=21.0)[2] is None
    broken = o.worker_died("w5", [], -9, False, now=22.0)[2]
    assert isinstance(broken, RuntimeBrokenError) and "3 worker deaths within 10 s" in str(broken)


# ---- the map window ------------------------------------------------------------------


def window(source: Iterator[Any], ordered: bool = True, convert: Any = None, chunksize: int = 1,
           workers: int = 2) -> MapWindow:
    job = Job(1, "op", lambda s, o: None, lambda e: None)
    return MapWindow(job, "op", [], source, False, ChunkSizer(chunksize, None, workers), workers, ordered,
                     False, convert, None)


def counting() -> tuple[list[int], Iterator[int]]:
    pulled: list[int] = []

    def gen() -> Iterator[int]:
        i = 0
        while True:
            pulled.append(i)
            yield i
            i += 1

    return pulled, gen()


def test_an_ordered_window_behind_a_straggler_reads_no_further() -> None:
    pulled, source = counting()
    w = window(source)
    w.fill(0.0)
    sent = w.take()
    assert len(sent) == w.window == 10
    for task in sent[1:]:  # everything but the first comes back
        w.received(task.seq, Ok(1, task.seq, 0, [task.seq]), 1.0)
        assert w.take() == [] and w.step(1.0) == WAIT
    assert len(pulled) == 10
    w.received(0, Ok(1, 0, 0, [0]), 2.0)
    got = []
    while w.step(2.0) == READY:
        got.extend(w.ready.popleft())
    assert got == list(range(10))
    assert len(w.take()) == 10  # room again: the next ten go out


def test_a_value_failing_conversion_mid_chunk_fails_after_the_values_before_it() -> None:
    def convert(v: Any) -> int:
        if not isinstance(v, int):
            raise phalanx.ValidationError("not an int")
        return v

    w = window(iter(range(5)), convert=convert, chunksize=5)
    w.fill(0.0)
    (task,) = w.take()
    w.received(task.seq, Ok(1, 0, 0, [0, 1, 2, "three", 4]), 1.0)
    assert w.step(1.0) == READY and list(w.ready) == [[0, 1, 2]]
    w.ready.clear()
    assert w.step(1.0) == FAILED and isinstance(w.take_error(), phalanx.ValidationError)


def test_an_ordered_failure_forgets_later_chunks_but_waits_for_earlier_ones() -> None:
    w = window(iter(range(4)))
    w.fill(0.0)
    a, b, c, d = w.take()
    _, drop = w.received(c.seq, Err(1, c.seq, 0, error_info(ValueError("x")), 0, [], False), 1.0)
    assert drop == c.seq and d.seq not in w.sent_at
    assert w.step(1.0) == WAIT  # a and b are still out
    w.received(a.seq, Ok(1, a.seq, 0, ["a"]), 1.0)
    w.received(b.seq, Ok(1, b.seq, 0, ["b"]), 1.0)
    assert w.step(1.0) == READY and list(w.ready) == [["a"]]
    w.ready.clear()
    assert w.step(1.0) == READY and list(w.ready) == [["b"]]
    w.ready.clear()
    assert w.step(1.0) == FAILED


def test_a_window_whose_chunks_all_came_back_completes() -> None:
    w = window(iter(range(2)), ordered=False)
    w.fill(0.0)
    for task in w.take():
        w.received(task.seq, Ok(1, task.seq, 0, [task.seq]), 1.0)
    assert sorted(w.ready) == [[0], [1]]
    w.ready.clear()
    assert w.step(1.0) == COMPLETE


def test_closing_a_window_twice_ends_it_once() -> None:
    w = window(iter(range(3)))
    assert w.close() is True and w.close() is False


# ---- the actor lifecycle ------------------------------------------------------------------

from collections import deque  # noqa: E402

from phalanx.core import actors as life  # noqa: E402
from phalanx.transport.messages import ActorEvent, ActorState  # noqa: E402


def test_every_transition_leads_to_a_state_and_terminal_states_absorb_every_event() -> None:
    states = {life.STARTING, life.RUNNING, life.RESTARTING, life.STOPPING, life.STOPPED, life.FAILED}
    events = {event for _, event in life.TRANSITIONS}
    assert {state for state, _ in life.TRANSITIONS} | set(life.TRANSITIONS.values()) <= states
    for state in life.TERMINAL:
        for event in events:
            assert life.advance(state, event) == state


def test_a_hot_restart_holds_calls_then_runs_or_reverts() -> None:
    state = life.advance(life.advance(life.STARTING, "started"), "restart")
    assert state == life.RESTARTING
    assert life.advance(state, "started") == life.RUNNING
    assert life.advance(state, "revert") == life.RUNNING


def test_an_event_a_state_cannot_take_is_a_bug() -> None:
    with pytest.raises(ValueError, match="starting cannot take the event 'restart'"):
        life.advance(life.STARTING, "restart")
    with pytest.raises(ValueError):
        life.advance(life.STOPPING, "stop")


def test_supervision_restarts_at_most_limit_times_within_the_window() -> None:
    restarts: deque[float] = deque()
    assert [life.may_restart(restarts, t, 2, 10.0) for t in (0.0, 1.0, 2.0)] == [True, True, False]
    assert life.may_restart(restarts, 11.5, 2, 10.0)  # the first two left the window


def test_what_workers_say_about_actors() -> None:
    assert life.reply_of(ActorState("w1", 3, 0, {"n": 1})) == ("checkpoint", 3, {"n": 1})
    assert life.reply_of(ActorState("w1", 3, 0, None, error_info(ValueError("x"))))[0] == "nothing"
    assert life.reply_of(ActorState("w1", 3, 7, 5)) == ("state", 7, (5, None))
    assert life.reply_of(ActorEvent("w1", 3, "stopped")) == ("stopped", 3, None)
    what, number, (kind, error) = life.reply_of(ActorEvent("w1", 3, "failed", error_info(KeyError("k"))))
    assert (what, number, kind, type(error)) == ("event", 3, "failed", KeyError)


def test_an_instance_goes_to_the_worker_hosting_fewest_actors_then_holding_fewest_tasks() -> None:
    live = {b"w1": 0, b"w2": 5, b"w3": 1}
    assert life.least_loaded(live, [b"w1", b"w3"], None) == b"w2"
    assert life.least_loaded(live, [], None) == b"w1"
    assert life.least_loaded(live, [], b"w1") == b"w3"
    assert life.least_loaded({b"w1": 0}, [], b"w1") == b"w1"  # alone: even the excluded one


# ---- routing and credits -------------------------------------------------------------------

from phalanx.core.routing import Routing  # noqa: E402


class Worker:
    def __init__(self, name: str, tags: tuple[str, ...], free: int) -> None:
        self.name, self.tags, self.free, self.dispatched = name, tags, free, 0
        self.inflight: dict[tuple[int, int], Task] = {}

    def __repr__(self) -> str:
        return self.name


def routed(tag: str = "default") -> tuple[Routing[Worker], Job]:
    jobs: dict[int, Job] = {}
    r: Routing[Worker] = Routing(jobs)
    job = Job(1, "op", lambda s, o: None, lambda e: None, options=TaskOptions(on=tag))
    jobs[1] = job
    return r, job


def test_each_task_goes_to_the_live_worker_of_its_tag_with_most_free_credits() -> None:
    r, job = routed("gpu")
    cpu, gpu1, gpu2 = Worker("cpu", ("default",), 9), Worker("gpu1", ("gpu",), 1), Worker("gpu2", ("gpu",), 2)
    for w in (cpu, gpu1, gpu2):
        r.add_live(w)
    tasks = [call(job, seq) for seq in range(4)]
    assert r.enqueue("gpu", tasks)
    batch = r.dispatch()
    assert {w.name: [t.seq for t in ts] for w, ts in batch.items()} == {"gpu2": [0, 2], "gpu1": [1]}
    assert [t.seq for t in r.pending["gpu"]] == [3]  # no credit left for it
    assert (gpu1.free, gpu2.free, set(gpu2.inflight)) == (0, 0, {(1, 0), (1, 2)})


def test_work_queued_while_every_worker_is_full_goes_out_in_order_as_credits_come_back() -> None:
    r, job = routed()
    w1, w2 = Worker("w1", ("default",), 1), Worker("w2", ("default",), 1)
    for w in (w1, w2):
        r.add_live(w)
    first = [call(job, seq) for seq in range(2)]
    r.enqueue("default", first)
    assert sum(len(ts) for ts in r.dispatch().values()) == 2
    later = [call(job, seq) for seq in range(2, 6)]
    for task in later:  # submitted one by one, each followed by a dispatch that finds no credit
        r.enqueue("default", [task])
        assert r.dispatch() == {}
    assert [t.seq for t in r.pending["default"]] == [2, 3, 4, 5]
    w2.free += 1  # an outcome came back
    assert {w.name: [t.seq for t in ts] for w, ts in r.dispatch().items()} == {"w2": [2]}
    w1.free += 2
    assert {w.name: [t.seq for t in ts] for w, ts in r.dispatch().items()} == {"w1": [3, 4]}
    assert [t.seq for t in r.pending["default"]] == [5]


def test_work_with_no_route_waits_then_fails_with_no_worker_error_while_other_work_flows() -> None:
    r, job = routed("tpu")
    r.add_live(Worker("cpu", ("default",), 4))
    stranded = call(job, 0)
    assert not r.enqueue("tpu", [stranded])
    r.unroutable("tpu", [stranded], now=0.0)  # the virtual clock's 0 is a time like any other
    assert r.dispatch() == {} and r.next_deadline(30.0) == 30.0
    assert r.expire(29.9, 30.0) == []
    ((j, seq, exc),) = r.expire(30.0, 30.0)
    assert (j, seq) == (job, 0) and isinstance(exc, phalanx.NoWorkerError) and exc.tag == "tpu"
    assert r.pending == {} and r.unrouted == {}


def test_a_worker_joining_a_tag_clears_its_route_wait() -> None:
    r, job = routed("gpu")
    task = call(job, 0)
    r.enqueue("gpu", [task])
    r.unroutable("gpu", [task], now=5.0)
    gpu = Worker("gpu", ("gpu",), 1)
    r.add_live(gpu)
    assert task.unrouted == -1.0 and r.unrouted == {}
    assert r.dispatch() == {gpu: [task]}
    r.remove_live(gpu, now=7.0)
    r.enqueue("gpu", [call(job, 1)])
    assert r.unrouted == {}  # nothing was pending when it left; the host marks new work unroutable


def test_a_cancelled_future_vetoes_its_first_dispatch_and_a_worker_at_max_tasks_is_retired() -> None:
    r, job = routed()
    r.max_tasks = 1
    w = Worker("w", ("default",), 5)
    r.add_live(w)
    vetoed = [False]

    def veto() -> bool:
        vetoed[0] = True
        return False

    job.on_dispatch = veto
    r.enqueue("default", [call(job, 0)])
    assert r.dispatch() == {} and vetoed[0] and job.outstanding == {}
    job.on_dispatch = None
    r.enqueue("default", [call(job, 1), call(job, 2)])
    assert [t.seq for t in r.dispatch()[w]] == [1]
    assert r.take_retire() == [w] and w.free == 0


# ---- taking a worker's outcomes: credits, dedupe, late results -------------------------------


class Holder:
    def __init__(self) -> None:
        self.alive, self.retiring, self.free, self.tasks, self.items = True, False, 0, 0, 0
        self.inflight: dict[tuple[int, int], Task] = {}


def test_a_result_from_a_dead_worker_wins_and_the_redelivered_attempt_s_result_is_a_duplicate() -> None:
    # On a runtime: SIGKILL a worker right after it wrote its result, while the
    # supervisor notices the death first and redelivers; both results then arrive.
    o = core()
    job = open_job(o)
    task = call(job, 0)
    w1, w2 = Holder(), Holder()
    w1.inflight[(1, 0)] = task
    w1.alive = False
    _, (retry,), _ = o.worker_died("w1", list(w1.inflight.values()), -9, planned=False, now=0.0)
    w2.inflight[(1, 0)] = retry
    out: list[tuple[Job, int, Any]] = []
    assert o.take(w1, [Ok(1, 0, 0, "first")], out) == 0
    assert o.take(w2, [Ok(1, 0, 1, "second")], out) == 0
    assert [(seq, r.value) for _, seq, r in out] == [(0, "first")]
    assert (o.duplicates_dropped, w1.free, w2.free) == (1, 0, 1)  # a dead worker gets no credit back


def test_a_result_for_a_closed_job_is_late_and_one_for_a_task_the_worker_never_held_is_a_stray() -> None:
    o = core()
    job = open_job(o)
    w = Holder()
    w.inflight[(1, 0)] = call(job, 0)
    del o.jobs[1]
    out: list[tuple[Job, int, Any]] = []
    assert o.take(w, [Ok(1, 0, 0, 1), Ok(1, 5, 0, 1), Ok(9, 0, 0, 1)], out) == 2
    assert out == [] and o.late_results_dropped == 1 and w.free == 1


# ---- a crash in a map chunk is split down to its item; a task the driver timed out ----------


def test_a_crashing_map_chunk_is_split_not_charged_until_the_crash_is_one_item_s() -> None:
    o = core(max_attempts=1)
    job = open_job(o)
    task = chunk(job, 0, [0, 1, 2, 3])
    failed, (half,), _ = o.worker_died("w1", [task], -9, planned=False, now=0.0)
    assert failed == [] and isinstance(half.msg, Chunk)
    assert (half.msg.items, half.rest, half.crashes) == ([0, 1], [2, 3], 0)
    # The first half comes back whole: the rest of the chunk goes on, a fresh task.
    assert o.resolve(job, half, Ok(1, 0, 1, ["a", "b"])) is None
    (more,) = o.take_requeue()
    assert isinstance(more.msg, Chunk) and more.msg.items == [2, 3] and more.prefix == ["a", "b"]
    # It crashes again: split again; the lone item 3 crashing is charged and, at max_attempts=1, fails.
    _, (quarter,), _ = o.worker_died("w2", [more], -9, planned=False, now=1.0)
    assert o.resolve(job, quarter, Ok(1, 0, 3, ["c"])) is None
    (last,) = o.take_requeue()
    failed, requeue, _ = o.worker_died("w3", [last], -9, planned=False, now=2.0)
    ((_, _, final),) = failed
    assert requeue == [] and isinstance(final, Err) and final.index == 3 and final.partial == ["a", "b", "c"]


def test_a_call_whose_worker_the_driver_killed_for_overrunning_fails_with_task_timeout_error() -> None:
    o = core()
    o.abort_grace = 2.0
    job = open_job(o, autoclose=True)
    task = call(job, 0)
    failed, requeue, broken = o.worker_died("w1", [task], None, planned=True, now=0.0, expired=(1, 0))
    ((_, _, exc),) = failed
    assert requeue == [] and broken is None and o.jobs == {}
    assert isinstance(exc, phalanx.TaskTimeoutError) and "abort_grace of 2 s" in str(exc)


# ---- the channel broker's state (phalanx.core.channels) ------------------------------------

from phalanx.channels import Broadcast, ExactlyOnce  # noqa: E402
from phalanx.core.channels import PROBE_EVERY, ChannelState  # noqa: E402
from phalanx.transport.messages import (  # noqa: E402
    CHAN_CLOSED,
    ChanAck,
    ChanClose,
    ChanDeliver,
    ChanEnd,
    ChanPull,
    ChanSend,
    ChanSubscribe,
)


class _Counts:
    frames_dropped = 0
    channel_messages_dropped = 0
    channel_redelivered = 0


def _delivered(out: list[tuple[bytes, Any]], ident: bytes) -> list[int]:
    return [mid for who, msg in out if who == ident and isinstance(msg, ChanDeliver) for mid in msg.ids]


def test_channel_state_gives_what_a_dead_worker_s_receiver_held_to_another_once() -> None:
    counts = _Counts()
    state = ChannelState(7, counts)
    lease, sub = state.open(ExactlyOnce, 100)
    for seq in range(4):
        state.handle(b"d1~1", ChanSend(lease, seq, b"v%d" % seq), 0.0)
    state.handle(b"w1~1", ChanPull(lease, sub, 2), 0.0)
    assert _delivered(state.flush(0.0), b"w1~1") == [1, 2]
    state.handle(b"w2~1", ChanPull(lease, sub, 10), 0.0)
    assert _delivered(state.flush(0.0), b"w2~1") == [3, 4]
    assert state.worker_exited(b"w1", 0.1)
    assert _delivered(state.flush(0.1), b"w2~1") == [1, 2]  # back at the front, to the live one
    # A late ack from the dead receiver's identity is dropped; its pull too.
    state.handle(b"w1~1", ChanPull(lease, sub, 2, [1, 2]), 0.2)
    assert counts.frames_dropped == 1 and counts.channel_redelivered == 2
    state.handle(b"w2~1", ChanPull(lease, sub, 10, [1, 2, 3, 4]), 0.3)
    state.handle(b"d1~1", ChanClose(lease, 9), 0.3)
    out = state.flush(0.3)
    assert (b"w2~1", ChanEnd(lease, sub, CHAN_CLOSED)) in out
    assert state.open_leases == 0  # closed, consumed, receivers ended: freed


def test_channel_state_gives_back_an_unreachable_receiver_s_messages_a_flush_later_unless_heard_from() -> None:
    state = ChannelState(7, _Counts())
    lease, sub = state.open(ExactlyOnce, 100)
    state.handle(b"d1~1", ChanSend(lease, 0, b"x"), 0.0)
    state.handle(b"w1~1", ChanPull(lease, sub, 1), 0.0)
    assert _delivered(state.flush(0.0), b"w1~1") == [1]
    assert state.unreachable([b"w1~1"])
    state.handle(b"w1~1", ChanPull(lease, sub, 0, [1]), 0.0)  # its last frame, read before the next flush
    state.flush(0.0)
    state.handle(b"w2~1", ChanPull(lease, sub, 1), 0.0)
    assert _delivered(state.flush(0.0), b"w2~1") == []  # the ack counted: nothing to redeliver
    state.handle(b"d1~1", ChanSend(lease, 1, b"y"), 0.0)
    out = state.flush(0.0)
    assert _delivered(out, b"w2~1") == [2] and (b"d1~1", ChanAck(lease, 1)) in out
    assert state.unreachable([b"w2~1"])
    assert state.flush(0.0) == []  # not heard from: dropped, its message back in the queue
    state.handle(b"w3~1", ChanPull(lease, sub, 1), 0.0)
    assert _delivered(state.flush(0.0), b"w3~1") == [2]


def test_channel_state_broadcasts_every_message_to_every_subscription_and_probes_quiet_holders() -> None:
    state = ChannelState(7, _Counts())
    lease, first = state.open(Broadcast, 100)
    state.handle(b"d1~2", ChanSubscribe(lease, 5, 1), 0.0)
    state.handle(b"d1~1", ChanPull(lease, first, 10), 0.0)
    state.handle(b"d1~2", ChanPull(lease, 5, 10), 0.0)
    for seq in range(3):
        state.handle(b"d1~9", ChanSend(lease, seq, b"%d" % seq), 0.0)
    out = state.flush(0.0)
    assert _delivered(out, b"d1~1") == [1, 2, 3] and _delivered(out, b"d1~2") == [1, 2, 3]
    assert not state.idle(PROBE_EVERY)
    pinged = {who for who, msg in state.flush(PROBE_EVERY) if type(msg).__name__ == "ChanPing"}
    assert pinged == {b"d1~1", b"d1~2"}


def test_importing_the_core_loads_no_socket_library() -> None:
    # The direct-import check above misses what an imported phalanx module pulls in. (The
    # standard library's socket comes with concurrent.futures.process, whose
    # BrokenProcessPool phalanx's errors subclass; ZeroMQ must not come at all.)
    code = (
        "import sys\n"
        "import phalanx.core, phalanx.core.channels, phalanx.core.actors, phalanx.core.execute\n"
        "import phalanx.core.outcomes, phalanx.core.routing, phalanx.core.tasks, phalanx.core.window\n"
        "print(sorted(m for m in sys.modules if m == 'zmq' or m.startswith('zmq.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout
