"""Runs a conformance suite in supervised child processes and prints its counts.

Runs in the interpreter that invoked ``python -m tests.conformance``; the tests
themselves run in child processes (one per CPython test class, one pytest run
for joblib), each in a process group of its own. The parent reads the events
the child appends (``start`` / ``end`` per test); when no test ends within
``--hang`` seconds, the running test is counted as hung, the child's process
group is killed (phalanx ends the workers of a driver that dies) and a new
child runs the tests not run yet. A child that dies counts its running test as
an error. Every test selected is reported once: passed, failed, error,
skipped, expected failure, unexpected success or hung.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: tests.conformance.swap.ENV (not imported here: importing it could swap in this process)
SWAP_ENV = "PHALANX_CONFORMANCE_SWAP"
OUTCOMES = ("passed", "failed", "error", "hung", "skipped", "expected failure", "unexpected success")


def _run_child(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this harness created for the child
    except ProcessLookupError:
        pass
    proc.wait()


#: where a child hung outside any test body (module cleanups...): reported, not counted as a test
fixture_hangs: list[str] = []


def ran_last(todo: list[str], results: dict[str, tuple[str, str]]) -> str:
    done = [i for i in todo if i in results]
    return done[-1] if done else ""


def supervise(ids: list[str], command: Callable[[list[str], str], list[str]], env: dict[str, str],
              hang: float, workdir: Path, label: str) -> dict[str, tuple[str, str]]:
    """Run ``ids`` (in order) through children built by ``command(todo, events_path)``."""
    results: dict[str, tuple[str, str]] = {}
    fixture_hangs.clear()
    todo = list(ids)
    attempt = 0
    while todo:
        attempt += 1
        events = workdir / f"{label}.{attempt}.events"
        events.write_text("")
        proc = _run_child(command(todo, str(events)), env, workdir / f"{label}.log")
        seen = 0
        running: str | None = None
        last = time.monotonic()
        hung = False
        while True:
            lines = events.read_text().splitlines()
            for line in lines[seen:]:
                if not line.endswith("}"):
                    break
                ev = json.loads(line)
                seen += 1
                last = time.monotonic()
                if ev["event"] == "start":
                    running = ev["id"]
                elif ev["event"] == "end":
                    results[ev["id"]] = (ev["outcome"], ev.get("detail", ""))
                    running = None
            if proc.poll() is not None:
                break
            if time.monotonic() - last > hang:
                hung = True
                _kill_group(proc)
                break
            time.sleep(0.2)
        lines = events.read_text().splitlines()  # what was written before the child ended
        for line in lines[seen:]:
            if line.endswith("}"):
                ev = json.loads(line)
                if ev["event"] == "end":
                    results[ev["id"]] = (ev["outcome"], ev.get("detail", ""))
                    running = None
                elif ev["event"] == "start":
                    running = ev["id"]
        if running is not None and running not in results:
            results[running] = ("hung", f"no result within {hang:.0f} s") if hung else (
                "error", f"the test process exited with code {proc.returncode} during the test")
        elif hung:  # stuck outside any test body (a module cleanup, interpreter exit): the next child goes on
            fixture_hangs.append(f"after {ran_last(todo, results) or 'the start'}")
        _kill_group(proc)  # leftovers of a child that exited
        remaining = [i for i in todo if i not in results]
        if len(remaining) == len(todo):  # the child ran nothing: do not loop forever
            why = f"no progress within {hang:.0f} s before any test" if hung else (
                f"the test process exited with code {proc.returncode} before any test")
            results[remaining[0]] = ("hung" if hung else "error", why)
            remaining = remaining[1:]
        todo = remaining
    return results


def report(results: dict[str, tuple[str, str]], group: Callable[[str], str], title: str,
           verbose: bool) -> Counter[str]:
    by_group: dict[str, Counter[str]] = {}
    for tid, (outcome, _) in results.items():
        by_group.setdefault(group(tid), Counter())[outcome] += 1
    cols = ("passed", "failed", "error", "hung", "skipped", "xfail", "xpass")
    width = max([len(g) for g in by_group] + [5])
    print(f"\n{title}")
    print(f"{'':{width}}  " + " ".join(f"{c:>6}" for c in cols))
    total: Counter[str] = Counter()
    for g, counts in by_group.items():
        total.update(counts)
        print(f"{g:{width}}  " + " ".join(f"{counts[o]:>6}" for o in OUTCOMES))
    print(f"{'total':{width}}  " + " ".join(f"{total[o]:>6}" for o in OUTCOMES))
    print(f"{sum(total.values())} tests: {total['passed']} passed, {total['failed']} failed, "
          f"{total['error']} errors, {total['hung']} hung, {total['skipped']} skipped")
    for where in fixture_hangs:
        print(f"a test process hung outside any test ({where}); it was killed and the next one went on")
    bad = [(t, o, d) for t, (o, d) in results.items() if o in ("failed", "error", "hung", "unexpected success")]
    if bad:
        print("\nnot passing:")
        for tid, outcome, detail in bad:
            last = [ln for ln in detail.strip().splitlines() if ln.strip()][-1:] or [""]
            print(f"  {outcome:7} {tid}\n          {last[0][:200]}")
            if verbose and detail:
                print("          " + detail.replace("\n", "\n          "))
    return total


def _env(pickle: bool, *first: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(SWAP_ENV, None)
    paths = [str(p) for p in first] + [str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("PHALANX_LOCAL_PICKLE", None)
    if pickle:
        env["PHALANX_LOCAL_PICKLE"] = "1"
    return env


def interpreter(workdir: Path) -> str:
    """The Python the cf suite runs on: a venv in ``workdir`` over this interpreter's packages.

    Its start-up imports :mod:`tests.conformance.swap` (a ``.pth`` file), so every
    process the tests start, ``python -I`` ones too, swaps phalanx's executor in
    when ``PHALANX_CONFORMANCE_SWAP`` is set. Nothing outside ``workdir`` changes.
    """
    import sysconfig
    import venv

    home = workdir / "python"
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(home)
    python = home / "bin" / "python"
    purelib = subprocess.run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_path("purelib")
    (Path(purelib) / "phalanx_conformance.pth").write_text(
        f"import site, sys; site.addsitedir({ours!r}); sys.path.append({str(ROOT)!r}); import tests.conformance.swap\n")
    return str(python)


def run_cf(args: argparse.Namespace, workdir: Path) -> Counter[str]:
    try:
        import test.test_concurrent_futures  # noqa: F401
    except ImportError:
        sys.exit(f"{sys.executable} (Python {sys.version.split()[0]}) has no test.test_concurrent_futures "
                 "package; run with an interpreter that ships its test suite (here: pyenv's 3.13.0)")
    env = _env(args.pickle)
    if not args.baseline:
        env[SWAP_ENV] = "1"
    child = [interpreter(workdir), "-m", "tests.conformance.cf_child"] + (["--baseline"] if args.baseline else [])
    listing = subprocess.run(child + ["--list"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    ids = json.loads(listing.stdout)
    if args.k:
        ids = [i for i in ids if args.k in i]
    results = supervise(ids, lambda todo, ev: child + ["--run", ev] + todo, env, args.hang, workdir, "cf")
    what = "ProcessPoolExecutor" if args.baseline else "phalanx.Executor" + (
        " (PHALANX_LOCAL_PICKLE=1)" if args.pickle else "")
    title = f"CPython {sys.version.split()[0]} test.test_concurrent_futures, process-pool classes, {what}"
    return report(results, lambda t: t.split(".")[-2], title, args.verbose)


def run_joblib(args: argparse.Namespace, workdir: Path) -> Counter[str]:
    import joblib

    site = Path(joblib.__file__).resolve().parents[1]
    test_file = site / "joblib" / "test" / "test_parallel.py"
    if not test_file.exists():
        sys.exit(f"{test_file} not found: this joblib does not ship its tests")
    ini = workdir / "pytest.ini"
    ini.write_text("[pytest]\n")
    env = _env(args.pickle, Path(__file__).parent / "site")  # registers the backend in every interpreter
    base = [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(site), "-p", "no:cacheprovider",
            "--assert=plain", "-p", "tests.conformance.joblib_plugin", "-q", "-o", "timeout_method=signal",
            "--timeout", str(int(args.hang * 0.8))]
    listing = workdir / "joblib.ids"
    subprocess.run(base + ["--collect-only", str(test_file)], cwd=ROOT, env=dict(env, PHALANX_CONFORMANCE_LIST=str(listing)),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    ids = json.loads(listing.read_text())
    if args.k:
        ids = [i for i in ids if args.k in i]

    def command(todo: list[str], events: str) -> list[str]:
        env["PHALANX_CONFORMANCE_EVENTS"] = events
        return base + [str(site / t) for t in todo]

    results = supervise(ids, command, env, args.hang, workdir, "joblib")
    title = (f"joblib {joblib.__version__} test_parallel.py, phalanx backend, Python {sys.version.split()[0]}"
             + (" (PHALANX_LOCAL_PICKLE=1)" if args.pickle else ""))
    return report(results, lambda t: t.split("::")[-1].split("[")[0], title, args.verbose)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.conformance", description=__doc__)
    parser.add_argument("suite", choices=["cf", "joblib"])
    parser.add_argument("--no-pickle", dest="pickle", action="store_false",
                        help="run without PHALANX_LOCAL_PICKLE=1 (default: with it)")
    parser.add_argument("--baseline", action="store_true", help="cf: the stock ProcessPoolExecutor, for comparison")
    parser.add_argument("--hang", type=float, default=90.0, help="seconds without a test ending: hung (default 90)")
    parser.add_argument("-k", default="", help="only tests whose id contains this string")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each failure's traceback")
    parser.add_argument("--keep", metavar="DIR", help="keep the children's logs and events in DIR")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="phalanx-conformance-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        total = run_cf(args, workdir) if args.suite == "cf" else run_joblib(args, workdir)
    return 0 if not (total["failed"] or total["error"] or total["hung"]) else 1
