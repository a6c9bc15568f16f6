"""A driver that leases, uses and closes channels in a loop, for tests/test_lease_lifetime.py.

Run as ``python lease_loop.py N`` (a fresh process, so that its memory says
what the loop did and nothing else): 1000 cycles to warm up, then N more;
prints one JSON line: the broker's open leases and receivers afterwards, and
how much the process grew over the N cycles: in memory Python allocated
(tracemalloc: what phalanx keeps) and in RSS (which also moves with the
allocator's arenas and ZeroMQ's sockets, in steps).
"""

from __future__ import annotations

import gc
import json
import sys
import time
import tracemalloc

import psutil

import phalanx


def main() -> None:
    n = int(sys.argv[1])
    with phalanx.Runtime(workers=1) as rt:

        def cycles(count: int) -> None:
            for i in range(count):
                tx, rx = rt.lease()
                tx.send(i)
                assert rx.recv(timeout=60) == i
                tx.close()

        cycles(1000)
        gc.collect()
        tracemalloc.start()
        traced = tracemalloc.get_traced_memory()[0]
        rss = psutil.Process().memory_info().rss
        cycles(n)
        gc.collect()
        broker = rt._driver.channels
        assert broker is not None
        deadline = time.monotonic() + 60
        while broker.state.open_leases and time.monotonic() < deadline:
            time.sleep(0.01)
        grown = psutil.Process().memory_info().rss - rss
        kept = tracemalloc.get_traced_memory()[0] - traced
        print(json.dumps({"leases": broker.state.open_leases, "ends": broker.state.receivers, "kept": kept, "rss": grown}),
              flush=True)


if __name__ == "__main__":
    main()
