"""phalanx's benchmark suite: phalanx against multiprocessing, concurrent.futures, loky (and, when
installed with the ``bench`` extra, Dask distributed, ipyparallel, mpire; Ray if installed).

Run it with ``python -m benchmarks`` (see ``python -m benchmarks --help``).

Processes::

    python -m benchmarks  (orchestrator, benchmarks/__main__.py)
        │  for each workload, for each repeat, for each runner (order rotated):
        └─▶ python -m benchmarks.run_one --runner R --workload W [--size N]   (fresh child)
                │  starts the runner's pool (phalanx.Runtime, multiprocessing.Pool, ...)
                │  with 2 workers, warms it up, times the workload, checks every result,
                └─▶ prints one ``BENCH-RESULT {json}`` line, shuts the pool down, exits
        └─▶ python -m benchmarks.run_one --runner phalanx --workload W8 --remote   (W8's remote rows)
                │  as root: makes a driver namespace and 8 host namespaces (veth pairs,
                │  169.254.0.0/16), runs tests/netns_driver.py in the first and
                │  ``phalanx worker --connect`` (2 workers, tcp+CURVE) in each host,
                └─▶ prints the driver's figures, removes every namespace and process it made

Modules:

* ``__main__``   the orchestrator: runs children, aggregates, prints tables, writes JSON
* ``run_one``    the child entry point (one measurement of one runner on one workload)
* ``workloads``  W1..W8: what is measured, metric metadata, correctness checks (child side)
* ``runners``    one adapter per executor behind a common interface (child side)
* ``ops``        the module-level operations the workers run (imported by workers too)
* ``ops_numpy``  operations on numpy arrays (kept apart so ``ops`` stays cheap to import)
* ``report``     number formatting and the result tables (orchestrator side)
* ``multihost``  hosts made of network namespaces: W8's remote rows, and ``python -m
  benchmarks.multihost`` (tcp+CURVE against ipc, a link going down)

Importing this package starts nothing and imports nothing heavy: workers spawned
with ``-m benchmarks.run_one`` as their main module re-import it.
"""

from __future__ import annotations

__all__: list[str] = []
