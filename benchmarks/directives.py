"""D1: a directive chain run as one job against ``Pool.map`` + ``functools.reduce``.

``python -m benchmarks.directives [--n 1000000] [--repeats 3] [--only squares|digits] [--json PATH]``

Runs in this one process (the driver of both runners, measured in the same
invocation, one after the other), 2 worker processes each, two computations
over ``range(n)``:

* ``squares``: ``map(square).fold(add)``, a tiny op on ints (the per-item
  cost of each runner shows);
* ``digits``: ``map(digit_counts).fold(merge_counts)``, a word count over
  the digits of the numbers (a dict per item, merged).

::

    pool     multiprocessing fork Pool(2): reduce(monoid, pool.map(op, range(n), chunksize), empty)
             -- every mapped value comes back to this process, which reduces them alone
    phalanx  Runtime(workers=2): rt.run(Literal(range(n)).map(op).fold(monoid)).result()
             -- mapped values are reduced where they were made; one partial per chunk comes back

The Pool runs first, before any phalanx thread exists (it forks). Start-up is
excluded: each runner is warmed up, then timed ``--repeats`` times. Both
results must equal each other and the value computed here directly, or the
run fails (exit code 1). It prints both timings (median and min), the ratio
pool/phalanx (above 1: phalanx is faster), and one line
``BENCH-RESULT {json}``; ``--json`` also writes the numbers to a file.

Spawned workers re-import this module as ``__mp_main__``: it does its work
only under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "MARKER"]

#: prefix of the result line on stdout
MARKER = "BENCH-RESULT "
#: seconds one timed run may take before the benchmark fails
RESULT_TIMEOUT = 600.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.directives", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10**6, help="items (default 10^6)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per runner (default 3)")
    parser.add_argument("--only", choices=["squares", "digits"], default=None, help="one computation (default both)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the numbers here")
    args = parser.parse_args(argv)
    if args.n < 0 or args.repeats < 1:
        parser.error("--n must be >= 0 and --repeats >= 1")
    return args


#: the computations: name -> (map op, monoid, what it computes)
COMPUTATIONS = {
    "squares": ("square", "add", "sum of squares: map(square).fold(add)"),
    "digits": ("digit_counts", "merge_counts", "digit histogram (a word count): map(digit_counts).fold(merge_counts)"),
}


def _expected(name: str, n: int) -> Any:
    if name == "squares":
        return (n - 1) * n * (2 * n - 1) // 6 if n > 0 else 0
    return dict(collections.Counter("".join(map(str, range(n)))))


def _ops(name: str) -> tuple[Any, Any]:
    from . import ops

    fn, monoid, _ = COMPUTATIONS[name]
    return getattr(ops, fn), getattr(ops, monoid)


def _time_pool(names: list[str], n: int, repeats: int) -> dict[str, tuple[list[float], Any]]:
    from .runners import PoolRunner, pool_chunksize

    out: dict[str, tuple[list[float], Any]] = {}
    runner = PoolRunner()
    runner.start()
    try:
        for name in names:
            fn, monoid = _ops(name)
            empty = monoid_empty(monoid)
            functools.reduce(monoid, runner.map(fn, range(1000), None), empty)  # warm-up
            times, value = [], None
            for _ in range(repeats):
                t0 = time.perf_counter()
                value = functools.reduce(monoid, runner.map(fn, range(n), pool_chunksize(n)), monoid_empty(monoid))
                times.append(time.perf_counter() - t0)
            out[name] = (times, value)
    finally:
        runner.close()
    return out


def monoid_empty(monoid: Any) -> Any:
    """The monoid's ``empty`` value (what ``reduce`` starts from)."""
    from phalanx.registry.operations import monoid_empty as factory

    make = factory(monoid)
    assert make is not None, monoid
    return make()


def _time_phalanx(names: list[str], n: int, repeats: int) -> dict[str, tuple[list[float], Any, float]]:
    import phalanx

    from .runners import WORKERS

    out: dict[str, tuple[list[float], Any, float]] = {}
    with phalanx.Runtime(workers=WORKERS) as rt:
        for name in names:
            fn, monoid = _ops(name)
            rt.run(phalanx.Literal(range(1000)).map(fn).fold(monoid)).result(timeout=RESULT_TIMEOUT)  # warm-up
            times, value = [], None
            before = rt.stats().tasks_submitted
            for _ in range(repeats):
                t0 = time.perf_counter()
                value = rt.run(phalanx.Literal(range(n)).map(fn).fold(monoid)).result(timeout=RESULT_TIMEOUT)
                times.append(time.perf_counter() - t0)
            out[name] = (times, value, (rt.stats().tasks_submitted - before) / repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    n, repeats = args.n, args.repeats
    names = list(COMPUTATIONS) if args.only is None else [args.only]
    print(f"D1: Literal(range({n})).map(op).fold(monoid) as one phalanx job vs "
          f"functools.reduce(monoid, Pool.map(op, range({n}))), 2 workers each, {repeats} timed run(s) each",
          flush=True)
    pool = _time_pool(names, n, repeats)
    phx = _time_phalanx(names, n, repeats)
    ok = True
    records: dict[str, Any] = {}
    for name in names:
        pool_times, pool_value = pool[name]
        phalanx_times, phalanx_value, tasks = phx[name]
        expected = _expected(name, n)
        equal = pool_value == phalanx_value == expected
        ok = ok and equal
        pool_s, phalanx_s = statistics.median(pool_times), statistics.median(phalanx_times)
        ratio = pool_s / phalanx_s if phalanx_s > 0 else float("inf")
        print(f"\n  {COMPUTATIONS[name][2]}")
        print(f"    pool     Pool.map + functools.reduce : median {pool_s * 1000:9.1f} ms  "
              f"(min {min(pool_times) * 1000:.1f} ms)")
        print(f"    phalanx  rt.run(Literal.map.fold)    : median {phalanx_s * 1000:9.1f} ms  "
              f"(min {min(phalanx_times) * 1000:.1f} ms; {tasks:.0f} tasks per run)")
        print(f"    ratio pool/phalanx: {ratio:.2f} ({'phalanx faster' if ratio > 1 else 'pool faster'}); "
              f"results {'equal' if equal else 'DIFFER'}"
              + ("" if equal else f": pool {pool_value!r}, phalanx {phalanx_value!r}, expected {expected!r}"))
        records[name] = {
            "results_equal": equal,
            "pool_seconds": pool_times,
            "phalanx_seconds": phalanx_times,
            "pool_median": pool_s,
            "phalanx_median": phalanx_s,
            "ratio_pool_over_phalanx": ratio,
            "phalanx_tasks_per_run": tasks,
        }
    record = {"workload": "D1", "n": n, "repeats": repeats, "status": "ok" if ok else "error",
              "computations": records}
    print("\n" + MARKER + json.dumps(record), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
