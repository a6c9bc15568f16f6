"""No orphans (invariant 4): when the driver ends, by any means, nothing it started survives.

Runs in the test process, which starts a *driver script* in a subprocess with
a unique ``PHALANX_TEST_MARKER`` in its environment. Everything the driver
starts inherits that environment -- its workers and the grandchild
(``sleep 60``) a task spawns -- so after the driver is gone the test scans
every process on the machine for the marker: none may still be alive 1 s
later (a zombie counts as dead). Whatever it finds is killed by pid before
the test fails, so a failure leaves nothing behind.

The driver ends three ways: (a) SIGKILL, (b) the script falls off its end
without ``shutdown()``, (c) an exception escapes ``with Runtime()``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

import phalanx

from chaos_ops import death_signal, kill_child
from marked import processes_marked

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
MARKER = "PHALANX_TEST_MARKER"

DRIVER = textwrap.dedent(
    """
    import json, os, sys, time

    import phalanx
    import chaos_ops


    def report(rt):
        grandchild = rt.submit(chaos_ops.spawn_sleeper).result(timeout=30)
        pids = {"driver": os.getpid(), "workers": rt.worker_pids(), "grandchild": grandchild}
        print(json.dumps(pids), flush=True)
        print("READY", flush=True)


    def main(mode):
        if mode == "raise":
            with phalanx.Runtime(workers=2) as rt:
                report(rt)
                raise RuntimeError("the driver failed inside `with Runtime()`")
        rt = phalanx.Runtime(workers=2)
        report(rt)
        if mode == "sigkill":
            time.sleep(120)
        # mode "fall-off": the script ends without rt.shutdown()


    if __name__ == "__main__":
        main(sys.argv[1])
    """
)


def _marked(marker: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries ``marker``."""
    return processes_marked(MARKER, marker)


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for proc in procs:
        try:
            out.append(f"pid {proc.pid} ppid {proc.ppid()} {proc.status()}: {' '.join(proc.cmdline())[:100]}")
        except psutil.Error:
            out.append(f"pid {proc.pid}: gone")
    return out


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=3)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Driver:
    """The driver script in a subprocess; ``start()`` returns once it printed READY.

    Its output goes to files, not pipes: a surviving grandchild would hold a
    pipe open and make reading it block.
    """

    def __init__(self, tmp_path: Path, mode: str) -> None:
        self.marker = str(uuid.uuid4())
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        self.out = tmp_path / "driver.out"
        self.err = tmp_path / "driver.err"
        env = dict(os.environ)
        env[MARKER] = self.marker
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), mode], env=env, cwd=tmp_path,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )
        self.pids: dict[str, Any] = {}

    def start(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.out.read_text().splitlines()
            if "READY" in lines:
                self.pids = json.loads(lines[lines.index("READY") - 1])
                return self.pids
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(f"driver did not get ready:\n{self.out.read_text()}\n{self.err.read_text()}")

    def worker_pids(self) -> list[int]:
        return list(self.pids["workers"].values())

    def cleanup(self) -> None:
        _kill_all(_marked(self.marker))
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def _survivors_after(driver: Driver, grace: float = 1.0) -> list[psutil.Process]:
    time.sleep(grace)
    return _marked(driver.marker)


def _check(driver: Driver, survivors: list[psutil.Process], what: str, when: str) -> None:
    """Fail if ``survivors`` include the workers (``what="workers"``) or the grandchild."""
    if what == "workers":
        pids = set(driver.worker_pids())
        bad = [p for p in survivors if p.pid != driver.pids["grandchild"]]  # anything but the grandchild
        assert pids.isdisjoint(p.pid for p in survivors), "worker alive " + when
    else:
        bad = [p for p in survivors if p.pid == driver.pids["grandchild"]]
    assert not bad, f"alive {when}:\n  " + "\n  ".join(_describe(bad))


WHAT = ["workers", "grandchild"]


@pytest.mark.chaos
@pytest.mark.parametrize("what", ["workers", "grandchild"])
def test_driver_sigkilled_leaves_no_orphan(tmp_path: Path, what: str) -> None:
    driver = Driver(tmp_path, "sigkill")
    try:
        pids = driver.start()
        watched = [*driver.worker_pids(), pids["grandchild"]]
        assert all(_alive(pid) for pid in watched), pids
        killed_at = time.monotonic()
        os.kill(pids["driver"], signal.SIGKILL)
        driver.proc.wait(timeout=10)
        vanished: dict[int, float] = {}
        while len(vanished) < len(watched) and time.monotonic() - killed_at < 5.0:
            for pid in watched:
                if pid not in vanished and not _alive(pid):
                    vanished[pid] = time.monotonic() - killed_at
            time.sleep(0.001)
        survivors = _survivors_after(driver, max(0.0, 1.0 - (time.monotonic() - killed_at)))
        workers_gone = [vanished[p] for p in driver.worker_pids() if p in vanished]
        print(f"driver SIGKILLed: workers gone after "
              f"{', '.join(f'{t * 1000:.1f} ms' for t in sorted(workers_gone))}; grandchild after "
              f"{vanished.get(pids['grandchild'], float('nan')) * 1000:.1f} ms")
        _check(driver, survivors, what, "1 s after the driver was SIGKILLed")
        if what == "workers":
            assert len(workers_gone) == 2 and max(workers_gone) < 1.0
    finally:
        driver.cleanup()


@pytest.mark.chaos
@pytest.mark.parametrize("what", WHAT)
def test_driver_falling_off_the_end_leaves_no_orphan(tmp_path: Path, what: str) -> None:
    driver = Driver(tmp_path, "fall-off")
    try:
        driver.start()
        assert driver.proc.wait(timeout=30) == 0, driver.err.read_text()
        _check(driver, _survivors_after(driver), what, "1 s after the driver exited")
    finally:
        driver.cleanup()


@pytest.mark.chaos
@pytest.mark.parametrize("what", WHAT)
def test_driver_raising_inside_with_leaves_no_orphan(tmp_path: Path, what: str) -> None:
    driver = Driver(tmp_path, "raise")
    try:
        driver.start()
        assert driver.proc.wait(timeout=30) == 1
        assert "the driver failed inside" in driver.err.read_text()
        _check(driver, _survivors_after(driver), what, "1 s after the driver exited")
    finally:
        driver.cleanup()


def _live_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if _alive(p.pid)
            and "resource_tracker" not in " ".join(p.cmdline())}


@pytest.mark.chaos
def test_shutdown_right_after_a_worker_death_leaves_no_worker() -> None:
    """shutdown() racing the respawn of a just-died worker leaks no replacement.

    Deterministic reduction: the replacement is started 0.3 s late (a busy
    supervisor thread), and ``shutdown()`` runs in that window. ``spawn``
    workers take long enough to start that the parent-death signal, tied to
    the supervisor thread that forked them, is not armed before that thread
    ends (with ``fork`` the same race leaks less often)."""
    before = _live_children()
    rt = phalanx.Runtime(workers=2, start_method="spawn")
    spawn = rt._driver.lifecycle.spawn

    def late_spawn(*args: Any) -> str:
        time.sleep(0.3)
        return spawn(*args)

    rt._driver.lifecycle.spawn = late_spawn  # type: ignore[method-assign]
    wid, pid = sorted(rt.worker_pids().items())[0]
    assert kill_child(pid)
    deadline = time.monotonic() + 10
    while any(w.id == wid and w.alive for w in rt.stats().workers) and time.monotonic() < deadline:
        time.sleep(0.001)  # until the driver noticed the death: the respawn is under way
    rt.shutdown()
    time.sleep(1.0)
    leaked = [psutil.Process(p) for p in _live_children() - before if _alive(p)]
    described = _describe(leaked)
    _kill_all(leaked)  # never leave it behind, whatever the outcome
    assert not leaked, "alive 1 s after shutdown() returned:\n  " + "\n  ".join(described)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("start_method", ["phalanx", "spawn"])
def test_every_worker_asks_for_the_parent_death_signal(start_method: str) -> None:
    """Each worker, first ones and replacements, armed SIGTERM as its parent-death signal (the
    libc prctl a worker calls is found once in the driver and inherited, not loaded again)."""
    with phalanx.Runtime(workers=2, start_method=start_method) as rt:
        signals = [rt.submit(death_signal).result(timeout=30) for _ in range(8)]
        pid = sorted(rt.worker_pids().values())[0]
        assert kill_child(pid)
        deadline = time.monotonic() + 30
        while pid in rt.worker_pids().values() or len(rt.worker_pids()) < 2:
            assert time.monotonic() < deadline, "the killed worker was never replaced"
            time.sleep(0.01)
        signals += [rt.submit(death_signal).result(timeout=30) for _ in range(8)]
    assert set(signals) == {signal.SIGTERM}


GUARDED_WORKER = textwrap.dedent(
    """
    import sys, time
    from phalanx.worker import guard_against_orphaning

    guard_against_orphaning(int(sys.argv[1]))  # its parent (the test) lives on: only the watchdog can see
    print("guarded", flush=True)
    time.sleep(120)
    """
)


def test_a_guarded_worker_whose_parent_lives_on_dies_with_its_driver(tmp_path: Path) -> None:
    """The orphan guard's watchdog alone (no parent-death signal: the parent stays) ends a
    worker whose driver is SIGKILLed, with what it started."""
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    script = tmp_path / "worker.py"
    script.write_text(GUARDED_WORKER)
    worker = subprocess.Popen([sys.executable, str(script), str(driver.pid)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "guarded"
        assert worker.poll() is None
        driver.kill()
        driver.wait(timeout=10)
        worker.wait(timeout=10)  # raises if the watchdog never ended it
        assert worker.returncode != 0
    finally:
        for proc in (driver, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if worker.stdout is not None:
            worker.stdout.close()
