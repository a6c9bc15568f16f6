"""Logging: ``phalanx.*`` loggers, and worker prints and logs reaching the driver's output prefixed.

Runs in the test (driver) process. The end-to-end cases start a driver
script in a subprocess (so its standard output and error are plain pipes
the test reads whole) whose operation, ``eco_ops.say``, prints to stdout
and stderr and logs; the script reports which worker ran which call, and
the test checks that every line the workers wrote arrived whole, once,
prefixed with that worker's id.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import phalanx
from exec_ops import square
from phalanx import logs

TESTS = Path(__file__).resolve().parent
#: seconds a driver subprocess may take (it takes well under one)
LIMIT = 60.0
#: calls of ``say`` per run, run one per task on two workers at once
CALLS = 40

DRIVER = textwrap.dedent(
    """
    import logging
    import os

    import phalanx
    from eco_ops import say

    if __name__ == "__main__":
        setup = os.environ.get("LOG_SETUP", "")
        if setup == "basic":
            logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
        elif setup == "worker-format":
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(
                "%(phalanx_worker)s|%(levelname)s:%(name)s:%(message)s", defaults={"phalanx_worker": "driver"}
            ))
            logging.getLogger().addHandler(handler)
        with phalanx.Runtime(workers=2) as rt:
            worker_of = {pid: wid for wid, pid in rt.worker_pids().items()}
            texts = [f"t{i}" for i in range(int(os.environ["CALLS"]))]
            pids = list(rt.map(say, texts, chunksize=1))
            for text, pid in zip(texts, pids):
                print(f"RAN {text} {worker_of[pid]}", flush=True)
        logging.getLogger("driver").warning("driver log")
        print("driver line", flush=True)
    """
)

#: the lines ``say(text)`` writes to stdout
OUT_LINES = ("out: {t}", "two", "lines: {t}", "partial line: {t}")


def run_driver(tmp_path: Path, **env: str) -> tuple[str, str, dict[str, str]]:
    """Run the driver script; (stdout, stderr, {text: worker id that ran it})."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    full = {k: v for k, v in os.environ.items() if k not in (logs.PREFIX_ENV, logs.LOG_LEVEL_ENV)}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), full.get("PYTHONPATH", "")) if p)
    full["CALLS"] = str(CALLS)
    full.update(env)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=full, cwd=tmp_path,
        timeout=LIMIT, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    ran = dict(m.groups() for m in re.finditer(r"^RAN (t\d+) (w\d+)$", proc.stdout, re.M))
    assert len(ran) == CALLS, proc.stdout
    return proc.stdout, proc.stderr, ran


def worker_lines(text: str) -> list[str]:
    """The lines a worker wrote (everything but the driver's own)."""
    return [line for line in text.splitlines() if not line.startswith("RAN ") and "driver" not in line]


def check_prefixed(stdout: str, stderr: str, ran: dict[str, str], log_lines: list[str]) -> None:
    """Each line of each call once, whole, prefixed by the worker that ran it; nothing else."""
    expected_out = sorted(f"[{w}] " + line.format(t=t) for t, w in ran.items() for line in OUT_LINES)
    assert sorted(worker_lines(stdout)) == expected_out
    expected_err = sorted(
        [f"[{w}] err: {t}" for t, w in ran.items()]
        + [f"[{w}] " + line.format(t=t, w=w) for t, w in ran.items() for line in log_lines]
    )
    assert sorted(worker_lines(stderr)) == expected_err
    assert "driver line" in stdout.splitlines()  # the driver's own output is not prefixed


# --------------------------------------------------------------------------- #
# End to end: a driver whose operations print and log
# --------------------------------------------------------------------------- #


def test_prints_and_logs_are_prefixed_with_the_worker(tmp_path: Path) -> None:
    stdout, stderr, ran = run_driver(tmp_path)
    # No logging configured anywhere: warnings still show, with level and logger.
    check_prefixed(stdout, stderr, ran, ["WARNING eco_ops: log: {t}"])
    assert "driver log" in stderr.splitlines()  # the driver's own last resort: bare message


def test_spawned_workers_are_prefixed_too(tmp_path: Path) -> None:
    stdout, stderr, ran = run_driver(tmp_path, PHALANX_START_METHOD="spawn")
    check_prefixed(stdout, stderr, ran, ["WARNING eco_ops: log: {t}"])


def test_driver_logging_configuration_is_inherited_by_forked_workers(tmp_path: Path) -> None:
    stdout, stderr, ran = run_driver(tmp_path, LOG_SETUP="basic", PHALANX_START_METHOD="fork")
    check_prefixed(stdout, stderr, ran, ["WARNING:eco_ops:log: {t}", "INFO:eco_ops:info: {t}"])
    assert "WARNING:driver:driver log" in stderr.splitlines()


def test_records_carry_the_worker_id(tmp_path: Path) -> None:
    stdout, stderr, ran = run_driver(tmp_path, LOG_SETUP="worker-format", PHALANX_START_METHOD="fork")
    check_prefixed(stdout, stderr, ran, ["{w}|WARNING:eco_ops:log: {t}"])
    assert "driver|WARNING:driver:driver log" in stderr.splitlines()


def test_prefix_can_be_turned_off(tmp_path: Path) -> None:
    stdout, stderr, ran = run_driver(tmp_path, **{logs.PREFIX_ENV: "0"})
    # The streams are left alone (so lines of two workers may interleave, as with
    # multiprocessing); each single write still arrives in one piece.
    assert not any(line.startswith("[w") for line in stdout.splitlines())
    for t, w in ran.items():
        assert f"two\nlines: {t}" in stdout
        # Records no handler takes still name their worker.
        assert f"[{w}] WARNING eco_ops: log: {t}\n" in stderr
    assert "driver line" in stdout.splitlines()


# --------------------------------------------------------------------------- #
# The pieces
# --------------------------------------------------------------------------- #


class _Recorder(io.StringIO):
    """A target stream that counts flushes."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_prefixed_stream_prefixes_every_line_once() -> None:
    target = _Recorder()
    stream = logs.PrefixedStream(target, "[w7] ")
    stream.write("a\nb")
    stream.write("c\n")
    stream.write("")
    stream.write("progress 1\rprogress 2\r")
    stream.write("\n")
    print("x", "y", file=stream)
    assert target.getvalue() == "[w7] a\n[w7] bc\n[w7] progress 1\r[w7] progress 2\r[w7] \n[w7] x y\n"


def test_prefixed_stream_is_line_buffered() -> None:
    target = _Recorder()
    stream = logs.PrefixedStream(target, "[w1] ")
    stream.write("partial")
    assert target.getvalue() == "" and target.flushes == 0  # held until the line ends
    stream.write(" line\nnext")
    assert target.getvalue() == "[w1] partial line\n" and target.flushes == 1
    stream.flush()  # a prompt: the partial line goes out
    assert target.getvalue() == "[w1] partial line\n[w1] next" and target.flushes == 2
    stream.write(" done\n")
    assert target.getvalue() == "[w1] partial line\n[w1] next done\n"
    assert stream.writable() and not stream.isatty()


def test_prefixed_stream_writes_a_very_long_partial_line() -> None:
    target = _Recorder()
    stream = logs.PrefixedStream(target, "[w1] ")
    stream.write("x" * (logs.PrefixedStream.MAX_PARTIAL + 1))
    assert target.getvalue() == "[w1] " + "x" * (logs.PrefixedStream.MAX_PARTIAL + 1)


def test_prefixed_stream_writes_whole_lines() -> None:
    """Each line reaches the target in one write, however it was written."""
    writes: list[str] = []

    class Target(io.StringIO):
        def write(self, s: str) -> int:
            writes.append(s)
            return super().write(s)

    stream = logs.PrefixedStream(Target(), "[w1] ")
    print("a", "b", "c", file=stream)
    stream.write("d")
    stream.write("e\nf\n")
    assert writes == ["[w1] a b c\n", "[w1] de\n[w1] f\n"]


def test_prefixed_stream_keeps_lines_whole_across_threads() -> None:
    target = io.StringIO()
    stream = logs.PrefixedStream(target, "[w1] ")

    def write(n: int) -> None:
        for i in range(300):
            stream.write(f"thread {n} ")
            stream.write(f"line {i}\n")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = target.getvalue().splitlines()
    assert len(lines) == 1200
    assert all(line.startswith("[w1] ") for line in lines)


@pytest.mark.parametrize(
    ("raw", "given", "enabled"),
    [(None, None, True), ("0", None, False), ("off", None, False), ("1", None, True), ("0", True, True),
     (None, False, False)],
)
def test_prefix_setting(monkeypatch: pytest.MonkeyPatch, raw: str | None, given: bool | None, enabled: bool) -> None:
    if raw is None:
        monkeypatch.delenv(logs.PREFIX_ENV, raising=False)
    else:
        monkeypatch.setenv(logs.PREFIX_ENV, raw)
    assert logs.prefix_output_enabled(given) is enabled


def test_library_logger_is_silent_by_default(phalanx_logger: logging.Logger) -> None:
    assert any(isinstance(h, logging.NullHandler) for h in phalanx_logger.handlers)


def test_configure(phalanx_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(logs.LOG_LEVEL_ENV, raising=False)
    assert logs.configure() is None  # nothing asked for
    monkeypatch.setenv(logs.LOG_LEVEL_ENV, "debug")
    stream = io.StringIO()
    assert logs.configure(stream=stream) is not None
    logging.getLogger("phalanx.something").debug("hello %s", "there")
    assert re.search(r"phalanx\.something DEBUG: hello there$", stream.getvalue().strip())


def test_modules_log_under_phalanx(phalanx_logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="phalanx")
    with phalanx.Executor(max_workers=1) as ex:
        assert ex.submit(square, 3).result(LIMIT) == 9
    names = {r.name for r in caplog.records}
    assert "phalanx.executor" in names
    assert all(name.startswith("phalanx.") for name in names)
