"""Operations the fault-tolerance tests run on workers.

Imported by the test (driver) process and, by name, by every worker process
(``tests/`` is on ``sys.path`` in both), so everything here is module-level
and importing it has no side effects.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import phalanx

#: seconds each chaos task sleeps, so that kills land mid-task
TASK_SLEEP = 0.0006


def expected(x: int) -> int:
    """What :func:`triple_plus_one` returns for ``x`` (computed locally)."""
    return x * 3 + 1


@phalanx.operation
def triple_plus_one(x: int) -> int:
    time.sleep(TASK_SLEEP)
    return x * 3 + 1


@phalanx.operation
def add(a: int, b: int) -> int:
    time.sleep(TASK_SLEEP)
    return a + b


@phalanx.operation
def slow_triple_plus_one(x: int, delay: float) -> int:
    time.sleep(delay)
    return x * 3 + 1


@phalanx.operation
def spawn_sleeper() -> int:
    """Start a grandchild process (``sleep 60``) and return its pid."""
    proc = subprocess.Popen(["sleep", "60"])
    return proc.pid


@phalanx.operation
def whoami(x: int) -> int:
    return x


# --------------------------------------------------------------------------- #
# Driver-side helpers (used by the tests only; workers never call them)
# --------------------------------------------------------------------------- #


class Killer:
    """A background thread that SIGKILLs a random live worker every lo..hi seconds.

    Picks from ``rt.worker_pids()`` with ``random.Random(seed)``; only kills a
    pid that is a live (non-zombie) child of this process, so a stale or
    reused pid is never signalled.
    """

    def __init__(self, rt: phalanx.Runtime, seed: int, lo: float = 0.1, hi: float = 0.3) -> None:
        import random
        import threading

        self.rt = rt
        self.rng = random.Random(seed)
        self.lo, self.hi = lo, hi
        self.kills = 0
        self.killed_pids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-killer", daemon=True)

    def start(self) -> Killer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def __enter__(self) -> Killer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(self.lo, self.hi)):
            pids = self.rt.worker_pids()
            if not pids:
                continue
            wid = self.rng.choice(sorted(pids))
            if kill_child(pids[wid]):
                self.kills += 1
                self.killed_pids.append(pids[wid])


def kill_child(pid: int) -> bool:
    """SIGKILL ``pid`` if it is a live child of this process; True if signalled."""
    from phalanx.testing.inject import kill_child as kill  # test process only: workers never call it

    return kill(pid)


def replacement_times(rt: phalanx.Runtime, kills: int = 10, timeout: float = 15.0) -> list[float]:
    """Seconds from SIGKILL of a ready worker until a new worker is ready, ``kills`` times."""
    times: list[float] = []
    for _ in range(kills):
        before = {w.id for w in rt.stats().workers}
        ready = {w.id: w.pid for w in rt.stats().workers if w.alive and w.ready}
        wid = sorted(ready)[0]
        start = time.monotonic()
        if not kill_child(ready[wid]):
            raise RuntimeError(f"could not kill {wid} (pid {ready[wid]})")
        while True:
            new = [w for w in rt.stats().workers if w.id not in before and w.alive and w.ready]
            if new:
                times.append(time.monotonic() - start)
                break
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"no replacement for {wid} ready within {timeout} s")
            time.sleep(0.001)
    return times


class DriverThreadDied(AssertionError):
    """A phalanx driver thread (pump, supervisor) died of an uncaught exception.

    Without that thread nothing more is delivered: every open future or
    iterator would hang, so the tests fail fast with this error instead.
    """


class ThreadWatch:
    """Records uncaught exceptions of ``phalanx-*`` threads while active.

    Installs a ``threading.excepthook`` that keeps such exceptions (and passes
    any other thread's to the previous hook), so a dying driver thread becomes
    a :class:`DriverThreadDied` in the test instead of a hang.
    """

    def __init__(self) -> None:
        self.errors: list[tuple[str, BaseException | None]] = []
        self._prev: Any = None

    def __enter__(self) -> ThreadWatch:
        import threading

        self._prev = threading.excepthook

        def hook(args: Any) -> None:
            name = args.thread.name if args.thread is not None else ""
            if name.startswith("phalanx-"):
                self.errors.append((name, args.exc_value))
            else:
                self._prev(args)

        threading.excepthook = hook
        return self

    def __exit__(self, *exc: Any) -> None:
        import threading

        threading.excepthook = self._prev

    def check(self) -> None:
        if self.errors:
            name, exc = self.errors[0]
            raise DriverThreadDied(
                f"driver thread {name} died: {type(exc).__name__}: {exc}"
            ) from exc


def run_guarded(fn: Any, timeout: float, watch: ThreadWatch) -> Any:
    """``fn()`` in a helper thread; fail fast if a driver thread dies, or past ``timeout``."""
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="chaos-consumer", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive():
        thread.join(0.1)
        watch.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result within {timeout} s (hang)")
    watch.check()
    if "error" in box:
        raise box["error"]
    return box["value"]


def results_of(futures: list[Any], timeout: float) -> list[Any]:
    """Every future's result, in order; TimeoutError past ``timeout`` overall."""
    import concurrent.futures

    deadline = time.monotonic() + timeout
    pending = set(futures)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{len(pending)} of {len(futures)} futures unresolved after {timeout} s")
        _, pending = concurrent.futures.wait(pending, timeout=min(remaining, 0.5))
    return [f.result(timeout=0) for f in futures]


def wait_settled(rt: phalanx.Runtime, workers: int = 2, deaths: int = 0, timeout: float = 15.0,
                 ready: bool = True) -> None:
    """Wait until ``deaths`` worker deaths were noticed and ``workers`` workers are alive and ready.

    With ``ready=False`` (a runtime whose pump died), only until every
    replacement process has been started (no respawn still in flight).

    Chaos tests call this before shutting a runtime down, so that shutdown
    never races a replacement still being started (see
    ``test_orphans.SHUTDOWN_RESPAWN_BUG``); it also checks that the runtime
    gets back to full strength after the kills.
    """
    deadline = time.monotonic() + timeout
    while True:
        stats = rt.stats()
        alive = [w for w in stats.workers if w.alive]
        if (stats.worker_deaths >= deaths and len(alive) == workers
                and all((w.ready or not ready) and w.pid for w in alive)):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"runtime did not settle within {timeout} s: deaths {stats.worker_deaths}/{deaths}, "
                f"workers {[(w.id, w.alive, w.ready) for w in stats.workers]}"
            )
        time.sleep(0.005)


@phalanx.operation
def start_three_children(path: str, then_exit: int | None = None) -> dict[str, int]:
    """Start ``sleep`` three ways (in the worker's group, in a new session, double-forked).

    Their pids are written to ``path`` (JSON) and returned. ``then_exit``: the
    worker then ends itself with this exit status instead of returning.
    """
    in_group = subprocess.Popen(["sleep", "1000"])
    new_session = subprocess.Popen(["sleep", "1001"], start_new_session=True)
    sh = subprocess.Popen(["sh", "-c", "sleep 1002 & echo $!"], stdout=subprocess.PIPE, text=True)
    assert sh.stdout is not None
    double_forked = int(sh.stdout.readline())
    sh.wait()
    pids = {"group": in_group.pid, "session": new_session.pid, "double": double_forked}
    with open(path + ".tmp", "w") as f:
        json.dump(pids, f)
    os.replace(path + ".tmp", path)
    if then_exit is not None:
        os._exit(then_exit)
    return pids


@phalanx.operation
def start_daemon() -> int:
    """Start a double-forked ``sleep`` (re-parented away from the worker at once); its pid."""
    sh = subprocess.Popen(["sh", "-c", "sleep 1003 & echo $!"], stdout=subprocess.PIPE, text=True)
    assert sh.stdout is not None
    pid = int(sh.stdout.readline())
    sh.wait()
    return pid


@phalanx.operation
def death_signal() -> int:
    """The signal this worker gets when its parent dies (prctl PR_GET_PDEATHSIG; 0: none)."""
    import ctypes

    sig = ctypes.c_int(-1)
    if ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(sig)) != 0:  # PR_GET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_GET_PDEATHSIG) failed")
    return sig.value
