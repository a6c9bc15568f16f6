"""Progress bars of ``rt.map(..., progress=True)``: drawn on a terminal, never elsewhere.

Runs in the test (driver) process. The terminal cases start a driver
script in a subprocess whose standard error is the slave side of a pty
(``pty.openpty()``), read everything it writes from the master side, and
look for tqdm's bar with its rate and ETA. The script's workers inherit that
terminal too, and the read ends when the last of them has closed it.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

import phalanx
from eco_ops import square
from phalanx.progress import progress_bar

pytest.importorskip("tqdm")

TESTS = Path(__file__).resolve().parent
#: seconds the driver subprocess may take (it takes well under one)
LIMIT = 60.0

DRIVER = textwrap.dedent(
    """
    import asyncio
    import os
    import sys

    if os.environ.get("BLOCK_TQDM"):
        sys.modules["tqdm"] = None  # as if the progress extra were not installed

    import phalanx
    from eco_ops import GateError, fail_at, square


    async def main() -> None:
        async with phalanx.AsyncRuntime(workers=2) as art:
            got = [x async for x in art.map(square, range(30), chunksize=3, progress=True)]
            assert got == [i * i for i in range(30)]


    if __name__ == "__main__":
        asyncio.run(main())
        with phalanx.Runtime(workers=2) as rt:
            got = list(rt.map(square, range(300), chunksize=10, progress=True))
            assert got == [i * i for i in range(300)]
            got = list(rt.map(square, (i for i in range(50)), progress=True))
            assert got == [i * i for i in range(50)]
            try:
                list(rt.map(fail_at, range(100), [60] * 100, chunksize=5, progress=True))
            except GateError:
                pass
            else:
                raise AssertionError("fail_at did not fail")
            got = list(rt.options(timeout=30).map(square, range(40), chunksize=4, progress=True))
            assert got == [i * i for i in range(40)]
        print("driver done", flush=True)
    """
)

#: a finished bar of a known length: count, elapsed<remaining (the ETA), rate
SIZED_BAR = re.compile(r"100%\|[^|]*\| 300/300 \[\d\d:\d\d<\d\d:\d\d, *\d+(\.\d+)?(item/s|s/item)\]")
#: a bar of an iterator of unknown length: count, elapsed, rate (no ETA)
UNSIZED_BAR = re.compile(r" 50item \[\d\d:\d\d, *\d+(\.\d+)?(item/s|s/item)\]")
#: anything tqdm draws
ANY_BAR = re.compile(r"item/s|s/item|\d+%\|")


def _driver(tmp_path: Path) -> Path:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return script


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    env.pop("PHALANX_LOG_LEVEL", None)
    env.update(extra)
    return env


def run_on_a_terminal(script: Path, **env: str) -> tuple[int, str, str]:
    """Run ``script`` with stderr on a fresh 100x24 pty; (exit code, stdout, what the pty got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
            env=_env(**env), cwd=script.parent,
        )
    finally:
        os.close(slave)
    got = bytearray()
    deadline = time.monotonic() + LIMIT
    try:
        while True:
            assert time.monotonic() < deadline, f"the driver did not finish; the pty got {bytes(got)!r}"
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every process holding the slave side has closed it
                break
            if not chunk:
                break
            got += chunk
        out, _ = proc.communicate(timeout=LIMIT)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.decode(), got.decode(errors="replace")


def test_bar_with_rate_and_eta_on_a_terminal(tmp_path: Path) -> None:
    code, out, tty = run_on_a_terminal(_driver(tmp_path))
    assert code == 0, tty
    assert "driver done" in out
    assert SIZED_BAR.search(tty), tty
    assert UNSIZED_BAR.search(tty), tty
    assert "eco_ops:square" in tty  # the bar is labelled with the operation
    assert re.search(r"\d+/100 \[", tty), tty  # the failed map drew (and closed) its bar too
    assert "40/40 [" in tty, tty  # rt.options(...).map
    assert "30/30 [" in tty, tty  # AsyncRuntime.map under async for


def test_no_bar_without_tqdm(tmp_path: Path) -> None:
    code, out, tty = run_on_a_terminal(_driver(tmp_path), BLOCK_TQDM="1")
    assert code == 0, tty
    assert "driver done" in out
    assert not ANY_BAR.search(tty), tty


def test_no_bar_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(_driver(tmp_path))], capture_output=True, text=True, env=_env(),
        cwd=tmp_path, timeout=LIMIT, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert "driver done" in proc.stdout
    assert not ANY_BAR.search(proc.stderr), proc.stderr
    assert not ANY_BAR.search(proc.stdout), proc.stdout


def test_progress_in_this_process_draws_nothing(
    module_runtime: phalanx.Runtime, capfd: pytest.CaptureFixture[str]
) -> None:
    assert not sys.stderr.isatty()  # pytest captures it
    assert list(module_runtime.map(square, range(100), progress=True)) == [i * i for i in range(100)]
    out, err = capfd.readouterr()
    assert not ANY_BAR.search(err) and not ANY_BAR.search(out), (out, err)


def test_progress_bar_only_for_terminals() -> None:
    assert progress_bar(10, file=io.StringIO()) is None
    stream = io.StringIO()
    bar = progress_bar(4, "demo", file=stream, force=True)
    assert bar is not None
    bar.update(2)
    bar.update(2)
    bar.close()
    assert re.search(r"demo: 100%\|[^|]*\| 4/4 \[\d\d:\d\d<\d\d:\d\d", stream.getvalue()), stream.getvalue()
