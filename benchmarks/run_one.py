"""Child entry point: one measurement of one runner on one workload.

Runs in a fresh child process started by the orchestrator
(``python -m benchmarks``)::

    python -m benchmarks.run_one --runner phalanx --workload W1 [--size N] [--quick]
    python -m benchmarks.run_one --runner phalanx --workload W8 --remote [--quick]

(``--remote``: phalanx with remote hosts built from network namespaces, for the
workloads that have a remote part; this child then makes the namespaces and
starts the driver and the hosts inside them, and removes them all before it exits.)

It prints exactly one line ``BENCH-RESULT {json}`` on stdout (worker
processes may print other lines; the orchestrator takes the last marked one)
and exits with:

* 0 and ``"status": "ok"`` -- the numbers are in ``metrics``;
* 0 and ``"status": "na"`` -- the runner cannot run this workload (yet);
* 1 and ``"status": "error"`` -- anything else, including a wrong result.

Spawned workers (phalanx, loky) re-import this module as ``__mp_main__``, so it
imports nothing heavy at module level and does its work only under
``if __name__ == "__main__"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from typing import Any

__all__ = ["MARKER", "main"]

#: prefix of the one result line on stdout
MARKER = "BENCH-RESULT "


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_one", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runner", required=True)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--remote", action="store_true", help="the workload's remote part (phalanx only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the measurement, print the result line, return the exit code."""
    args = _parse(argv)
    record: dict[str, Any] = {
        "workload": args.workload.upper(),
        "runner": args.runner,
        "size": args.size,
        "quick": args.quick,
    }
    if args.remote:
        record["remote"] = True
    started = time.perf_counter()
    code = 0
    try:
        from .workloads import NotAvailable, get

        workload = get(args.workload)
        try:
            if not args.remote:
                outcome = workload.run(args.runner, args.size, args.quick)
            elif workload.remote is None or args.runner != "phalanx":
                raise ValueError(f"{workload.id} has no remote part for {args.runner}")
            else:
                outcome = workload.remote(args.quick)
        except NotAvailable as exc:
            record.update(status="na", reason=str(exc))
        else:
            record.update(status="ok", metrics=outcome["metrics"], info=outcome["info"])
    except BaseException as exc:  # report everything, including a wrong result
        traceback.print_exc()
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
        code = 1
    record["child_seconds"] = time.perf_counter() - started
    sys.stdout.flush()
    print(MARKER + json.dumps(record), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
