"""Large arrays through shared memory between the driver and its local workers (phalanx.transport.shm).

Runs in the test process; the runtime tests start real worker processes (the
autouse fixture checks none leaked) and the driver-kill test a driver script
in a subprocess. Every test checks that ``/dev/shm`` holds no segment of ours
afterwards, waiting a bounded time where a process has to die first.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import phalanx
from phalanx.transport import shm
from phalanx.transport.codec import decode_driver, decode_inbox, encode
from phalanx.transport.messages import Call, Ok, Results
from tests import array_ops

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not shm.available(), reason="no /dev/shm"),
]

ROOT = Path(__file__).resolve().parent.parent
BIG = 2 * 1024 * 1024  # bytes of the arrays sent
SHM = 1024 * 1024  # the runtimes' shm_threshold: below BIG


def _mine(pid: int | None = None) -> list[str]:
    """Our segments in /dev/shm (of driver ``pid``, else of this process)."""
    return [n for n in shm.ours() if n.startswith(f"phalanx-{pid or os.getpid()}-")]


def _wait_gone(pid: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while _mine(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _mine(pid)


def _big(seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).random(BIG // 8)


def test_large_array_round_trip_both_ways_through_a_segment() -> None:
    a = _big()
    before = a.copy()
    with phalanx.Runtime(workers=2, shm_threshold=SHM) as rt:
        info = rt.submit(array_ops.view_info, a).result(timeout=30)
        # The worker's array is a mapping of the segment, writable, and its own.
        assert info == {"mapped": True, "writeable": True, "sum": float(before.sum())}
        np.testing.assert_array_equal(a, before)
        back = rt.submit(array_ops.echo, a).result(timeout=30)
        np.testing.assert_array_equal(back, a)
        assert array_ops._mapped(back) and back.flags.writeable
        back[:] = 0  # the driver's result is its own too
        np.testing.assert_array_equal(a, before)
        made = rt.submit(array_ops.ramp, BIG // 8).result(timeout=30)
        np.testing.assert_array_equal(made, np.arange(BIG // 8, dtype=np.float64))
        assert list(rt.map(array_ops.total, [a, a * 2])) == [float(before.sum()), float((before * 2).sum())]
        # The results' segments were unlinked by their receiver; the driver keeps its pool.
        assert set(_mine()) == set(shm.pooled()) and 1 <= len(_mine()) <= 3
    assert _mine() == []


def test_small_arrays_and_disabled_threshold_travel_inline() -> None:
    a = _big()
    with phalanx.Runtime(workers=1, shm_threshold=0) as rt:
        assert shm.threshold() == 0
        info = rt.submit(array_ops.view_info, a).result(timeout=30)
        assert info["mapped"] is False and info["sum"] == float(a.sum())
        assert not array_ops._mapped(rt.submit(array_ops.echo, a).result(timeout=30))
    with phalanx.Runtime(workers=1, shm_threshold=SHM) as rt:
        small = np.arange(10, dtype=np.float64)
        assert rt.submit(array_ops.view_info, small).result(timeout=30)["mapped"] is False
    default = phalanx.Config().shm_threshold
    with phalanx.Runtime(workers=1) as rt:  # the default threshold: from it on, through a segment
        below = np.zeros(default // 8 - 1)
        assert rt.submit(array_ops.view_info, below).result(timeout=30)["mapped"] is False
        assert rt.submit(array_ops.view_info, np.zeros(default // 8)).result(timeout=30)["mapped"] is True


def test_a_value_that_fails_to_encode_leaves_no_segment() -> None:
    with phalanx.Runtime(workers=1, shm_threshold=SHM) as rt:
        with pytest.raises(phalanx.EncodeError):
            rt.submit(array_ops.add, _big(), object())
        # Only the driver's pool is left, and the segment went back to it: the next array reuses it.
        pool = _mine()
        assert set(pool) == set(shm.pooled()) and len(pool) == 1
        assert rt.submit(array_ops.total, _big(1)).result(timeout=30) == float(_big(1).sum())
        assert _mine() == pool
    assert _mine() == []


def test_worker_killed_mid_task_leaves_no_segment(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    with phalanx.Runtime(workers=1, max_attempts=1, shm_threshold=SHM) as rt:
        held = rt.submit(array_ops.hold, _big(1), str(marker))
        # Queued behind it, in the driver or in the worker's pipe: segments not yet mapped.
        queued = [rt.submit(array_ops.total, _big(i)) for i in range(2, 6)]
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        with pytest.raises(phalanx.WorkerCrashedError):
            held.result(timeout=30)
        # The tasks it held run again on its replacement, from the same segments or new ones.
        assert [f.result(timeout=30) for f in queued] == [float(_big(i).sum()) for i in range(2, 6)]
    assert _wait_gone(os.getpid()) == []



def _full(i: int) -> np.ndarray[Any, Any]:
    return np.full(BIG // 8, float(i))


def test_arrays_kept_by_a_worker_are_never_overwritten_by_later_calls() -> None:
    """A pooled segment is reused only once nothing reads it: a worker keeps views of the arrays
    it got while many more calls (writing into every reusable segment) run."""
    with phalanx.Runtime(workers=1, shm_threshold=SHM) as rt:
        for i in range(4):
            rt.submit(array_ops.keep, _full(i)).result(timeout=30)
        for i in range(4, 20):  # each writes -7 into its segment: reused ones must not be kept ones
            assert rt.submit(array_ops.overwrite, _full(i)).result(timeout=30) == 4
            assert rt.submit(array_ops.total, _full(i)).result(timeout=30) == float(i) * (BIG // 8)
        assert rt.submit(array_ops.kept).result(timeout=30) == [(float(i), float(i)) for i in range(4)]
        # The calls that kept nothing shared a few segments (reuse), the kept ones one each.
        assert 5 <= len(shm.pooled()) <= 7
    assert _mine() == []


def test_a_worker_killed_holding_pooled_segments_leaves_nothing(tmp_path: Path) -> None:
    with phalanx.Runtime(workers=1, shm_threshold=SHM) as rt:
        pid = rt.submit(array_ops.keep, _full(1)).result(timeout=30)
        rt.submit(array_ops.keep, _full(2)).result(timeout=30)
        os.kill(pid, signal.SIGKILL)
        psutil.wait_procs([psutil.Process(pid)] if psutil.pid_exists(pid) else [], timeout=10)
        # Its replacement gets fresh arrays right, while the dead worker's segments stay out of use.
        for i in range(3, 8):
            assert rt.submit(array_ops.total, _full(i)).result(timeout=30) == float(i) * (BIG // 8)
        assert rt.submit(array_ops.kept).result(timeout=30) == []
    assert _wait_gone(os.getpid()) == []

DRIVER = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import phalanx
    from tests import array_ops

    marker = sys.argv[1]
    rt = phalanx.Runtime(workers=1, shm_threshold=1024 * 1024)
    big = [np.full(256 * 1024, float(i)) for i in range(6)]
    held = rt.submit(array_ops.hold, big[0], marker)
    queued = [rt.submit(array_ops.total, a) for a in big[1:]]
    while not os.path.exists(marker):
        time.sleep(0.01)
    print("READY", os.getpid(), flush=True)
    time.sleep(600)
    """
)


def test_driver_killed_leaves_no_segment(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(marker)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY"), proc.stderr.read() if proc.stderr else line
        pid = int(line.split()[1])
        assert _mine(pid), "the queued tasks' arrays should be waiting in segments"
        workers = [p.pid for p in psutil.Process(pid).children(recursive=True)]
        proc.kill()
        proc.wait(timeout=10)
        psutil.wait_procs([psutil.Process(w) for w in workers if psutil.pid_exists(w)], timeout=10)
        # The worker that outlived its driver removed what the driver never sent or read.
        assert _wait_gone(pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


def _dead_and_alive_segments() -> tuple[Path, Path]:
    """A segment of a driver that is gone and one of a live driver (this test's parent)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(shm.SHM_DIR) / f"phalanx-{dead.pid}-{'ab' * 16}"
    alive = Path(shm.SHM_DIR) / f"phalanx-{os.getppid()}-{'cd' * 16}"  # a live driver's: kept
    stale.write_bytes(b"x" * 64)
    alive.write_bytes(b"y" * 64)
    return stale, alive


def test_runtime_start_sweeps_segments_of_dead_drivers() -> None:
    # Swept once the first workers are ready (off the way to the first result), while the
    # runtime runs: the test waits for it, bounded, without shutting the runtime down.
    stale, alive = _dead_and_alive_segments()
    try:
        with phalanx.Runtime(workers=1) as rt:
            assert rt.submit(array_ops.view_info, np.zeros(4)).result(timeout=30)["mapped"] is False
            deadline = time.monotonic() + 10
            while stale.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not stale.exists()
            assert alive.exists()
    finally:
        for path in (stale, alive):
            path.unlink(missing_ok=True)


def test_a_runtime_shut_down_before_its_start_sweep_still_sweeps() -> None:
    # The start's sweep waits for the pump; a runtime that ends at once never runs it: its
    # shutdown removes what dead drivers left all the same.
    stale, alive = _dead_and_alive_segments()
    try:
        phalanx.Runtime(workers=1).shutdown()
        assert not stale.exists()
        assert alive.exists()
    finally:
        for path in (stale, alive):
            path.unlink(missing_ok=True)


def test_remote_runtime_keeps_the_frame_path() -> None:
    """While a runtime of this driver accepts remote workers, no segment name is ever sent."""
    with phalanx.Runtime(workers=1, listen="tcp://127.0.0.1:0", insecure=True, shm_threshold=SHM) as rt:
        assert shm.threshold() == 0
        info = rt.submit(array_ops.view_info, _big()).result(timeout=30)
        assert info["mapped"] is False
        frame = encode(Call(1, 0, 0, "m:f", [_big()]))
        assert b"phalanx-" not in frame and _mine() == []
    with phalanx.Runtime(workers=1, shm_threshold=SHM):
        assert shm.threshold() == SHM


def _record(name: str, nbytes: int = 64, gen: int = 0) -> bytes:
    """A Results frame claiming the array of ``nbytes`` bytes lives in segment ``name``
    (``gen`` > 0: a pooled segment, sent with that generation)."""
    import msgspec

    header = msgspec.msgpack.encode((name, "<f8", (nbytes // 8,), gen) if gen else (name, "<f8", (nbytes // 8,)))
    payload = len(header).to_bytes(4, "little") + header
    ext = msgspec.msgpack.Ext(shm.SHM_NDARRAY, payload)
    return msgspec.msgpack.encode(Results("w1", [Ok(1, 0, 0, ext)]))


@pytest.mark.parametrize("case", ["other driver", "foreign file", "symlink", "wrong size", "missing",
                                  "pooled, never sent", "pooled, too large"])
def test_a_record_naming_anything_but_our_segment_is_a_protocol_error(case: str, tmp_path: Path) -> None:
    """A hostile or buggy peer naming a file: nothing outside our own live segments is opened."""
    with phalanx.Runtime(workers=1, shm_threshold=SHM):
        me = os.getpid()
        victim = tmp_path / "secret"
        victim.write_bytes(b"s" * 64)
        made: list[Path] = []
        if case == "other driver":
            name = f"phalanx-{me + 1}-{'0' * 32}"
        elif case == "foreign file":
            name = "../../" + str(victim)
        elif case == "symlink":
            name = f"phalanx-{me}-{'1' * 32}"
            link = Path(shm.SHM_DIR) / name
            link.symlink_to(victim)
            made.append(link)
        elif case == "wrong size":
            name = f"phalanx-{me}-{'2' * 32}"
            (Path(shm.SHM_DIR) / name).write_bytes(b"z" * 32)
        elif case.startswith("pooled"):
            name = f"phalanx-{me}-{'5' * 32}"
            size = shm.HEAD + (64 if case.endswith("sent") else shm.POOL_BYTES + 4096)
            with open(Path(shm.SHM_DIR) / name, "wb") as f:
                if case.endswith("large"):  # its header says generation 1 was sent: only its size is wrong
                    f.write((1).to_bytes(8, "little"))
                f.truncate(size)
            made.append(Path(shm.SHM_DIR) / name)
        else:
            name = f"phalanx-{me}-{'3' * 32}"
        try:
            with pytest.raises(phalanx.ProtocolError):
                decode_driver(_record(name, gen=1 if case.startswith("pooled") else 0))
            assert victim.read_bytes() == b"s" * 64
        finally:
            for path in made:
                path.unlink(missing_ok=True)
        assert _mine() == []


def test_channel_messages_never_carry_segments() -> None:
    from phalanx.transport.codec import decode_value

    with pytest.raises(phalanx.DecodeError):
        decode_value(_record(f"phalanx-{os.getpid()}-{'4' * 32}"))


def test_inbox_frame_from_the_driver_maps_once() -> None:
    """A worker-side decode of a task frame maps the array; a second decode of the same frame fails."""
    with phalanx.Runtime(workers=1, shm_threshold=SHM):
        a = _big()
        frame = encode(Call(1, 0, 0, "m:f", [a]))
        assert len(frame) < 1024 and len(_mine()) == 1
        got = decode_inbox(frame).args[0]  # type: ignore[union-attr]
        np.testing.assert_array_equal(got, a)
        pool = _mine()
        assert pool == shm.pooled()  # the driver's own, kept for the next array
        with pytest.raises(phalanx.ProtocolError):
            decode_inbox(frame)
        # While the decoded array lives its segment is not reused: a second one is made.
        b = a * 2
        frame2 = encode(Call(1, 1, 0, "m:f", [b]))
        assert len(_mine()) == 2
        np.testing.assert_array_equal(got, a)
        del got
        gc.collect()
        # Handed back: the next array goes into it, and the old record no longer reads.
        frame3 = encode(Call(1, 2, 0, "m:f", [a * 3]))
        assert len(_mine()) == 2
        with pytest.raises(phalanx.ProtocolError):
            decode_inbox(frame)
        np.testing.assert_array_equal(decode_inbox(frame2).args[0], b)  # type: ignore[union-attr]
        np.testing.assert_array_equal(decode_inbox(frame3).args[0], a * 3)  # type: ignore[union-attr]
    assert _mine() == []


def test_a_dropped_runtime_stops_using_segments() -> None:
    """A runtime collected without shutdown(): tasks of this process stop going through segments."""
    import gc

    rt = phalanx.Runtime(workers=1, shm_threshold=SHM)
    assert shm.threshold() == SHM
    workers = [psutil.Process(p) for p in rt.worker_pids().values()]
    del rt
    gc.collect()
    assert shm.threshold() == 0
    psutil.wait_procs(workers, timeout=10)
    assert _mine() == []


_COLLECTED_UNDER_LOCK = """
import gc, os, threading
from phalanx.transport import shm
class Runtime: pass
gc.disable()
runtimes = [Runtime() for _ in range(20)]
for rt in runtimes:
    shm.runtime_started(rt, 1 << 25, False)
    rt.cycle = rt  # freed by the collector only
del runtimes, rt
done = threading.Event()
def collect_under_the_lock():
    with shm._lock:
        gc.collect()  # the runtimes' finalizers run here
    done.set()
threading.Thread(target=collect_under_the_lock, daemon=True).start()
os._exit(0 if done.wait(10) else 1)
"""


def test_a_runtime_collected_while_the_segment_lock_is_held_does_not_deadlock() -> None:
    # A garbage collection can run at any allocation, also inside shm's lock; it once
    # hung a whole test run when a runtime's finalizer took the same lock again.
    done = subprocess.run([sys.executable, "-c", _COLLECTED_UNDER_LOCK], timeout=60)
    assert done.returncode == 0


_COLLECTED_IN_A_FORKED_WORKER = """
import gc, os
from phalanx.transport import shm
class Runtime: pass
rt = Runtime()
shm.runtime_started(rt, 1 << 20, False)
pid = os.fork()
if pid == 0:
    shm.set_worker(os.getppid(), 1 << 20)
    del rt
    gc.collect()  # the parent's runtime, copied by the fork, is collected here
    os._exit(0 if shm.threshold() == 1 << 20 else 1)
_, status = os.waitpid(pid, 0)
shm.runtime_stopped(rt)
os._exit(os.waitstatus_to_exitcode(status))
"""


def test_a_runtime_collected_in_a_forked_worker_keeps_its_segments_on() -> None:
    # A worker forked from a driver holds copies of its runtimes; collecting one there
    # turned the worker's segments off (its results then went inline).
    done = subprocess.run([sys.executable, "-c", _COLLECTED_IN_A_FORKED_WORKER], timeout=60)
    assert done.returncode == 0
