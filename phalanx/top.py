"""``phalanx top``: watch a running runtime's workers and actors.

Runs in its own process (the user's terminal), never in the runtime. It
finds runtimes on this machine through the ``runtime.json`` each one writes
into its private ipc directory (only its user can read it), or connects to
``--connect ENDPOINT`` (the runtime's results endpoint, for tcp). It sends an
``InspectQuery`` from a DEALER socket and prints the tree it gets back.

Invariant kept: a runtime that does not answer is reported, never waited on
forever (each query has a timeout).
"""

from __future__ import annotations

import itertools
import math
import sys
import time
import uuid
from typing import Any

import msgspec
import zmq

from .actors.system import RuntimeTree
from .transport import sockets
from .transport.codec import decode_client, encode
from .transport.endpoints import adverts
from .transport.messages import InspectQuery

__all__ = ["find_runtimes", "query", "run_top"]


def find_runtimes() -> list[dict[str, Any]]:
    """Runtimes of this user on this machine whose driver is still alive, oldest first.

    A SIGKILLed driver cannot remove its ``runtime.json``; a later process
    may get its pid, so the start the file records must match too.
    """
    found = [info for _, info, alive in adverts() if alive]
    found.sort(key=lambda r: float(r.get("started", 0.0)) if isinstance(r.get("started"), (int, float)) else 0.0)
    return found


def query(endpoint: str, timeout: float = 2.0) -> RuntimeTree | None:
    """One inspect tree from the runtime whose results socket is ``endpoint``."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = sockets.dealer(ctx, endpoint, f"top-{uuid.uuid4().hex[:12]}".encode())
    try:
        nonce = 1
        sock.send(encode(InspectQuery(nonce, min(1.0, timeout / 2))))
        if not sock.poll(int(timeout * 1000)):
            return None
        answer = decode_client(sock.recv())
        return msgspec.convert(answer.tree, RuntimeTree)
    finally:
        sock.close(linger=0)
        ctx.term()


def run_top(connect: str | None, pid: int | None, interval: float, once: bool) -> int:
    """The ``phalanx top`` loop; returns the exit status."""
    if not (math.isfinite(interval) and interval > 0):
        print(f"phalanx top: --interval must be a positive number of seconds, got {interval}", file=sys.stderr)
        return 2
    if connect is None:
        runtimes = find_runtimes()
        if pid is not None:
            runtimes = [r for r in runtimes if int(r["pid"]) == pid]
        if not runtimes:
            print("phalanx top: no running runtime found (use --connect ENDPOINT)", file=sys.stderr)
            return 1
        if len({int(r["pid"]) for r in runtimes}) > 1:
            print("phalanx top: several runtimes; pick one with --pid:", file=sys.stderr)
            for r in runtimes:
                print(f"  pid {r['pid']}: {' '.join(r.get('argv', []))}", file=sys.stderr)
            return 2
        # One process may run several runtimes: show each, oldest first.
        targets = [(str(r["pid"]), str(r["results"])) for r in runtimes]
    else:
        targets = [(str(pid) if pid is not None else connect, connect)]
    live = sys.stdout.isatty() and not once
    for round_ in itertools.count():
        trees = [(label, query(endpoint, timeout=max(1.0, interval))) for label, endpoint in targets]
        if live:
            sys.stdout.write("\033[H\033[J")
        stamp = time.strftime("%H:%M:%S")
        silent = False
        for label, tree in trees:
            if tree is None:
                print(f"{stamp} runtime {label}: no answer")
                silent = True
            else:
                print(f"{stamp} runtime {label}")
                print(tree)
        sys.stdout.flush()
        if silent and (once or round_ > 0):
            return 1
        if once:
            return 0
        time.sleep(interval)
    return 0
