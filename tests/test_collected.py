"""Objects the garbage collector frees while the thread it interrupted holds a lock of phalanx.

A dropped map iterator ends its job and a dropped actor ref releases its actor;
both take the driver's lock, which is not re-entrant. The cyclic collector may
run their finalizers on any thread, the pump's included, in the middle of a
``with driver._lock:`` block: that once hung the runtime for good. Each case
runs in its own interpreter, so a hang is a failed test, not a stuck suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

_SCRIPT = """
import gc, os, sys, threading, time
import phalanx

@phalanx.operation
def ident(x: int) -> int:
    return x

@phalanx.actor
class Box:
    def get(self) -> int:
        return 1

if __name__ == "__main__":
    what = sys.argv[1]
    with phalanx.Runtime(workers=1) as rt:
        gc.disable()  # only the collection below frees the cycle
        if what == "map":
            dropped = rt.map(ident, range(100_000), chunksize=1)
            next(iter(dropped))
        else:
            dropped = rt.spawn(Box, name="box")
            dropped.get().result(timeout=30)
        cycle: list = [dropped]
        cycle.append(cycle)
        del dropped, cycle
        done = threading.Event()

        def collect_under_the_lock() -> None:
            with rt._driver._lock:
                gc.collect()  # the finalizer runs here, on the thread holding the lock
            done.set()

        threading.Thread(target=collect_under_the_lock, daemon=True).start()
        if not done.wait(20):
            print("the collection hung", file=sys.stderr)
            os._exit(1)
        # The work the finalizer left is done once the lock is free.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if what == "map" and rt.stats().jobs_open == 0:
                break
            if what == "actor":
                try:
                    rt.get_actor("box")
                except LookupError:
                    break
            time.sleep(0.01)
        else:
            print("the dropped object's job or actor is still there", file=sys.stderr)
            os._exit(1)
    print("ok")
"""


@pytest.mark.parametrize("what", ["map", "actor"])
def test_an_object_collected_under_the_driver_lock_does_not_hang_and_is_cleaned_up(what: str, tmp_path: Path) -> None:
    script = tmp_path / "collected.py"
    script.write_text(_SCRIPT)
    done = subprocess.run([sys.executable, str(script), what], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


_NO_THREAD_LEFT = """
import gc, os, sys, threading, time, warnings
import phalanx
from phalanx import collected

@phalanx.operation
def ident(x: int) -> int:
    return x

def ours() -> list:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("phalanx-"))

def drop_a_map_in_a_cycle(rt) -> None:
    gc.disable()
    dropped = rt.map(ident, range(100_000), chunksize=1)
    next(iter(dropped))
    cycle: list = [dropped]
    cycle.append(cycle)
    del dropped, cycle
    gc.collect()  # its finalizer hands the job's end over
    gc.enable()

if __name__ == "__main__":
    for _ in range(2):
        with phalanx.Runtime(workers=1) as rt:
            assert rt.submit(ident, 1).result(timeout=30) == 1
            deadline = time.monotonic() + 10
            while "phalanx-finalize" not in ours():  # it runs while a runtime does
                assert time.monotonic() < deadline, ours()
                time.sleep(0.01)
            drop_a_map_in_a_cycle(rt)
            while rt.stats().jobs_open:
                assert time.monotonic() < deadline + 10, "the dropped map's job is still open"
                time.sleep(0.01)
        assert ours() == [], f"after the last runtime's shutdown: {ours()}"
    # Work handed over before the thread started (right after the start), by a runtime shut
    # down at once, is still done, and leaves no thread either.
    with phalanx.Runtime(workers=1) as rt:
        drop_a_map_in_a_cycle(rt)
    assert collected._queue.empty(), "work handed over was never done"
    assert ours() == [], f"after a runtime shut down right after its start: {ours()}"
    # The user's own fork now runs in a process with one thread: Python 3.12+ has nothing to say.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], [str(w.message) for w in caught]
    print("ok")
"""


def test_no_thread_of_phalanx_outlives_the_last_runtime(tmp_path: Path) -> None:
    """The thread that runs what collections hand over runs while a runtime does and ends
    with the last one, after the work it was given: a later fork (the next runtime's fork
    server, the user's own) happens in a process with no thread of phalanx's."""
    script = tmp_path / "no_thread_left.py"
    script.write_text(_NO_THREAD_LEFT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
