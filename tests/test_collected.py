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
