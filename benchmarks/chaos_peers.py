"""Chaos against peers: ``python -m benchmarks.chaos_peers [--tasks N] [--seed S]``.

Runs in the user's process. The same workload runs on each executor in turn,
each with 2 worker processes::

    submit N tiny tasks (x -> 3x+1, 0.6 ms each)        main thread
    SIGKILL a random worker every 100-300 ms            killer thread (random.Random(seed))
    collect: a result that makes no progress for
    HANG_AFTER seconds means the executor hung          main thread

=========  ============================================================
phalanx    ``phalanx.Runtime(workers=2, restart_limit=1000, max_attempts=20)``
pool       ``multiprocessing.Pool(2)``, ``apply_async`` + ``get(timeout)``
ppe        ``concurrent.futures.ProcessPoolExecutor(2)``
=========  ============================================================

For each it prints: tasks completed with the right value, wrong values, lost
(never answered), errors by type, hung (yes/no), kills and wall time. The
whole run stops by itself (about 1 minute when every peer hangs, a hard stop
at ``HARD_LIMIT``), and every process it started is killed by pid before it
exits.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil

import phalanx

#: seconds without a new result after which an executor counts as hung
HANG_AFTER = 20.0
#: seconds after which the whole run kills everything and exits
HARD_LIMIT = 150.0
TASK_SLEEP = 0.0006


@phalanx.operation
def chaos_task(x: int) -> int:
    time.sleep(TASK_SLEEP)
    return x * 3 + 1


def _is_live_child(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.ppid() == os.getpid() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Killer(threading.Thread):
    """SIGKILLs a random pid from ``pids()`` every 100-300 ms until stopped."""

    def __init__(self, pids: Callable[[], list[int]], seed: int) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.pids = pids
        self.rng = random.Random(seed)
        self.kills = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.rng.uniform(0.1, 0.3)):
            try:
                pids = sorted(self.pids())
            except Exception:  # the pool is being torn down
                continue
            if not pids:
                continue
            pid = self.rng.choice(pids)
            if _is_live_child(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        self.stopped.set()
        self.join(5.0)


class Outcome:
    """What happened to the N tasks on one executor."""

    def __init__(self, name: str, n: int) -> None:
        self.name = name
        self.n = n
        self.correct = 0
        self.wrong = 0
        self.errors: Counter[str] = Counter()
        self.hung = False
        self.kills = 0
        self.wall = 0.0
        self.note = ""

    @property
    def lost(self) -> int:
        return self.n - self.correct - self.wrong - sum(self.errors.values())


def _collect(
    n: int,
    done: Callable[[int], bool],
    value: Callable[[int], Any],
    out: Outcome,
) -> None:
    """Poll tasks 0..n-1 until all are done or none finished for HANG_AFTER seconds."""
    pending = set(range(n))
    last_progress = time.monotonic()
    while pending:
        finished = [i for i in pending if done(i)]
        for i in finished:
            pending.discard(i)
            try:
                v = value(i)
            except BaseException as exc:  # the executor's error for this task
                out.errors[type(exc).__name__] += 1
                continue
            if v == i * 3 + 1:
                out.correct += 1
            else:
                out.wrong += 1
        if finished:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > HANG_AFTER:
            out.hung = True
            return
        time.sleep(0.02)


def _submit_and_collect(submit: Callable[..., Any], n: int, out: Outcome) -> None:
    """Submit ``chaos_task(x)`` for x < n (a refused submit counts as that task's error), collect."""
    futures: list[concurrent.futures.Future[int] | BaseException] = []
    for x in range(n):
        try:
            futures.append(submit(chaos_task, x))
        except Exception as exc:  # e.g. BrokenProcessPool once a worker died
            futures.append(exc)

    def done(i: int) -> bool:
        f = futures[i]
        return isinstance(f, BaseException) or f.done()

    def value(i: int) -> Any:
        f = futures[i]
        if isinstance(f, BaseException):
            raise f
        return f.result(timeout=0)

    _collect(n, done, value, out)


def run_phalanx(n: int, seed: int) -> Outcome:
    out = Outcome("phalanx", n)
    died: list[str] = []
    previous_hook = threading.excepthook

    def hook(args: Any) -> None:
        if args.thread is not None and args.thread.name.startswith("phalanx-"):
            died.append(f"{args.thread.name}: {args.exc_type.__name__}: {args.exc_value}")
        else:
            previous_hook(args)

    threading.excepthook = hook
    rt = phalanx.Runtime(workers=2, restart_limit=1000, max_attempts=20)
    try:
        killer = Killer(lambda: list(rt.worker_pids().values()), seed)
        start = time.monotonic()
        killer.start()
        _submit_and_collect(rt.submit, n, out)
        out.wall = time.monotonic() - start
        killer.stop()
        out.kills = killer.kills
        if died:
            out.note = "driver thread died: " + died[0]
    finally:
        rt.shutdown(wait=False)
        threading.excepthook = previous_hook
    return out


def run_pool(n: int, seed: int) -> Outcome:
    out = Outcome("multiprocessing.Pool", n)
    pool = multiprocessing.Pool(2)
    try:
        killer = Killer(lambda: [p.pid for p in list(pool._pool) if p.pid is not None], seed)  # type: ignore[attr-defined]
        start = time.monotonic()
        killer.start()
        results = [pool.apply_async(chaos_task, (x,)) for x in range(n)]
        _collect(n, lambda i: results[i].ready(), lambda i: results[i].get(timeout=0), out)
        out.wall = time.monotonic() - start
        killer.stop()
        out.kills = killer.kills
        if out.hung:
            out.note = "a killed worker's task is never answered; get() waits forever without a timeout"
    finally:
        # Pool.terminate() itself can wait forever on a pool whose workers were
        # SIGKILLed: kill them by pid, then give terminate() a bounded time.
        for proc in list(pool._pool):  # type: ignore[attr-defined]
            if proc.pid is not None and _is_live_child(proc.pid):
                os.kill(proc.pid, signal.SIGKILL)
        closer = threading.Thread(target=pool.terminate, name="pool-terminate", daemon=True)
        closer.start()
        closer.join(10.0)
        if closer.is_alive():
            out.note += "; Pool.terminate() did not return within 10 s"
    return out


def run_ppe(n: int, seed: int) -> Outcome:
    out = Outcome("ProcessPoolExecutor", n)
    ex = concurrent.futures.ProcessPoolExecutor(2)
    try:
        ex.submit(chaos_task, 0).result(timeout=30)  # start the workers
        killer = Killer(lambda: list(ex._processes or {}), seed)  # type: ignore[attr-defined]
        start = time.monotonic()
        killer.start()
        _submit_and_collect(ex.submit, n, out)
        out.wall = time.monotonic() - start
        killer.stop()
        out.kills = killer.kills
        if out.errors:
            out.note = "one killed worker breaks the pool: every pending and later task fails"
    finally:
        pids = list(ex._processes or {})  # type: ignore[attr-defined]
        ex.shutdown(wait=False, cancel_futures=True)
        for pid in pids:
            if _is_live_child(pid):
                os.kill(pid, signal.SIGKILL)
    return out


def reap_descendants(grace: float = 3.0) -> list[int]:
    """Kill (by pid) every process still descending from this one; return their pids."""
    me = psutil.Process()
    deadline = time.monotonic() + grace
    while True:
        left = [p for p in me.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(me.children(recursive=True), timeout=3)
    multiprocessing.active_children()  # reap what multiprocessing owns
    return [p.pid for p in left]


def _hard_stop() -> None:
    time.sleep(HARD_LIMIT)
    print(f"chaos_peers: still running after {HARD_LIMIT:.0f} s; killing everything", file=sys.stderr, flush=True)
    for proc in psutil.Process().children(recursive=True):
        try:
            proc.kill()
        except psutil.Error:
            pass
    os._exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default="phalanx,pool,ppe", help="comma-separated: phalanx,pool,ppe")
    args = parser.parse_args(argv)
    threading.Thread(target=_hard_stop, name="chaos-hard-stop", daemon=True).start()

    runners = {"phalanx": run_phalanx, "pool": run_pool, "ppe": run_ppe}
    total = time.monotonic()
    outcomes = []
    for name in args.only.split(","):
        print(f"running {name} ...", flush=True)
        outcome = runners[name](args.tasks, args.seed)
        leftovers = reap_descendants()
        if leftovers:
            outcome.note += f" (killed {len(leftovers)} leftover processes)"
        outcomes.append(outcome)

    print()
    print(f"chaos: {args.tasks} tasks (x -> 3x+1, {TASK_SLEEP * 1000:.1f} ms) on 2 workers, "
          f"a worker SIGKILLed every 100-300 ms (seed {args.seed}); hung = no result for {HANG_AFTER:.0f} s")
    header = f"{'executor':<22}{'correct':>8}{'wrong':>7}{'lost':>6}  {'errors':<28}{'hung':>5}{'kills':>6}{'wall s':>8}"
    print(header)
    print("-" * len(header))
    for o in outcomes:
        errors = ", ".join(f"{k} x{v}" for k, v in o.errors.items()) or "-"
        print(f"{o.name:<22}{o.correct:>8}{o.wrong:>7}{o.lost:>6}  {errors:<28}{'yes' if o.hung else 'no':>5}"
              f"{o.kills:>6}{o.wall:>8.1f}")
    for o in outcomes:
        if o.note:
            print(f"  {o.name}: {o.note.strip()}")
    print(f"total {time.monotonic() - total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
