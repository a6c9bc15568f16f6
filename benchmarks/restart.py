"""The time for a hot restart of an actor holding a large state (10 MiB by default).

``python -m benchmarks.restart [--mb 10] [--repeats 5]``

Runs in this one process (the driver) with ``phalanx.Runtime(workers=2)``::

    driver                         worker A                      worker B
    ref.restart() ── SaveActor ──▶ save(): the state
                  ◀── state ─────┘
                  ── SpawnActor(state) ──────────────────────▶  restore(state)
                  ◀── started ────────────────────────────────┘
                  ── StopActor ──▶ (old instance dropped)

It spawns one ``benchmarks.ops:Holder`` holding ``--mb`` MiB of random bytes,
moves it once untimed (warm-up), then times ``--repeats`` calls of
``ref.restart()``, each moving it to the other worker. After every move the
actor must still hold the same bytes (size and crc32) and count the move, or
the run fails (exit code 1). Prints the median (min-max) in ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import phalanx

from .ops import Holder

#: seconds one restart (or call) may take before the benchmark fails
TIMEOUT = 120.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.restart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=10.0, help="MiB of state the actor holds (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed hot restarts (default 5)")
    args = parser.parse_args(argv)
    if args.mb < 0 or args.repeats < 1:
        parser.error("--mb must be >= 0 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    size = int(args.mb * 2**20)
    times: list[float] = []
    with phalanx.Runtime(workers=2) as rt:
        ref = rt.spawn(Holder, size, timeout=TIMEOUT)
        length, crc, moves = ref.digest().result(timeout=TIMEOUT)
        for k in range(args.repeats + 1):
            before = ref.worker
            t0 = time.perf_counter()
            moved = ref.restart(timeout=TIMEOUT)
            elapsed = time.perf_counter() - t0
            if not moved or ref.worker == before:
                print(f"restart {k} did not move the actor (events: {list(ref.events(timeout=1))})")
                return 1
            if ref.digest().result(timeout=TIMEOUT) != (length, crc, moves + k + 1):
                print(f"restart {k} lost or changed the state")
                return 1
            if k > 0:  # the first move is the warm-up
                times.append(elapsed)
        ref.stop()
        ref.join(TIMEOUT)
    ms = [t * 1000 for t in times]
    print(f"hot restart of an actor holding {size / 2**20:g} MiB, 2 workers, {len(ms)} restart(s): "
          f"median {statistics.median(ms):.1f} ms ({min(ms):.1f}-{max(ms):.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
