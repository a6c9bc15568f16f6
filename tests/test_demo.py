"""``phalanx demo``: it runs, its checks pass, and it shows and explains what it claims.

Runs the command as a user would, in a subprocess (its workers are real
processes, one of them SIGKILLed by the demo itself), with small sizes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "phalanx", "demo", "--samples", "20000", "--words", "5000", "--no-progress", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )


@pytest.fixture(scope="module")
def two_workers() -> subprocess.CompletedProcess[str]:
    """One run of the demo with 2 workers, read by several tests."""
    return _demo("--workers", "2")


def test_demo_runs_and_every_check_passes(two_workers: subprocess.CompletedProcess[str]) -> None:
    proc = two_workers
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "all checks passed" in out
    assert "FAIL" not in out
    assert [int(k) for k in re.findall(r"^\[(\d)/4\]", out, re.M)] == [1, 2, 3, 4]


def test_demo_kills_a_worker_mid_map_and_every_result_arrives_once(two_workers: subprocess.CompletedProcess[str]) -> None:
    out = two_workers.stdout
    killed = re.search(r"killed worker process (\d+) after (\d+) of (\d+) results", out)
    assert killed, out
    assert "[ok] all 400 results arrived exactly once, in order, despite the kill" in out
    assert "[ok] the killed worker was replaced" in out
    pids = {int(p) for p in re.findall(r"^  w\d+\s+(\d+)", out, re.M)}
    assert int(killed.group(1)) in pids  # the summary lists the dead worker beside its replacement


def test_demo_moves_an_actor_with_its_state(two_workers: subprocess.CompletedProcess[str]) -> None:
    out = two_workers.stdout
    before = re.search(r"Tally on worker \S+ \(pid (\d+)\): total 55 after 10 calls", out)
    after = re.search(r"restarted on worker \S+ \(pid (\d+)\): total 55 after 10 calls", out)
    assert before and after, out
    assert before.group(1) != after.group(1)
    assert "[ok] the actor now runs in another process" in out


def test_demo_explains_chunks_and_items(two_workers: subprocess.CompletedProcess[str]) -> None:
    out = two_workers.stdout
    assert "chunks" in out and "items" in out
    assert "one chunk is one task" in out and "'items' the inputs they carried" in out


def test_demo_with_one_worker_skips_the_move_and_passes() -> None:
    proc = _demo("--workers", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hot restart: skipped" in proc.stdout
    assert "[ok] all 400 results arrived exactly once" in proc.stdout
