"""Raw transport ceilings on this machine, with no phalanx code in the path.

``python -m benchmarks.raw`` measures, in one run:

* the round trip of a 40-byte message, blocking, ROUTER <-> DEALER over ipc
  (what one ``submit().result()`` rides on) against ``multiprocessing.Pipe``;
* the one-way bandwidth of 8 MB frames over ipc through sockets made by
  ``phalanx.transport.sockets`` (what W5 rides on).

These explain the W2/W3 and W5 figures of ``python -m benchmarks``: phalanx
cannot be faster than the transport under it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from multiprocessing.connection import Connection

import zmq

from phalanx.transport import sockets

MB = 1 << 20


def _zmq_echo(endpoint: str) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"hi")
    while (msg := sock.recv()) != b"q":
        sock.send(msg)
    sock.close(linger=0)
    ctx.term()


def _pipe_echo(conn: Connection) -> None:
    while (msg := conn.recv_bytes()) != b"q":
        conn.send_bytes(msg)


def _sink(tasks: str, results: str) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    inbox = sockets.dealer(ctx, tasks, b"w1")
    outbox = sockets.dealer(ctx, results, b"w1")
    outbox.send(b"hello")
    while True:
        while not inbox.poll(200):
            pass
        if len(inbox.recv()) == 1:
            break
        outbox.send(b"ok")
    sockets.close(inbox, outbox)
    ctx.term()


def round_trips(n: int, tmp: str) -> dict[str, float]:
    endpoint = f"ipc://{tmp}/rtt"
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    proc = mp.Process(target=_zmq_echo, args=(endpoint,))
    proc.start()
    ident, _ = router.recv_multipart()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        router.send_multipart([ident, b"x" * 40])
        router.recv_multipart()
        times.append(time.perf_counter() - t)
    router.send_multipart([ident, b"q"])
    proc.join(10)
    router.close(linger=0)
    ctx.term()
    ours, theirs = mp.Pipe()
    proc = mp.Process(target=_pipe_echo, args=(theirs,))
    proc.start()
    pipe = []
    for _ in range(n):
        t = time.perf_counter()
        ours.send_bytes(b"x" * 40)
        ours.recv_bytes()
        pipe.append(time.perf_counter() - t)
    ours.send_bytes(b"q")
    proc.join(10)
    skip = n // 20
    return {"zmq_rtt_us": statistics.median(times[skip:]) * 1e6, "pipe_rtt_us": statistics.median(pipe[skip:]) * 1e6}


def bandwidth(reps: int, tmp: str) -> float:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    tasks = sockets.router(ctx, f"ipc://{tmp}/tasks", send_only=True)
    results = sockets.router(ctx, f"ipc://{tmp}/results")
    proc = mp.Process(target=_sink, args=(f"ipc://{tmp}/tasks", f"ipc://{tmp}/results"))
    proc.start()
    results.recv_multipart()
    time.sleep(0.2)  # the inbox connects after the outbox said hello
    data = os.urandom(8 * MB)
    for i in range(reps + 2):
        if i == 2:
            start = time.perf_counter()
        tasks.send(b"w1", zmq.SNDMORE)
        tasks.send(data, copy=False)
        results.recv_multipart()
    elapsed = time.perf_counter() - start
    tasks.send(b"w1", zmq.SNDMORE)
    tasks.send(b"x")
    proc.join(10)
    sockets.close(tasks, results)
    ctx.term()
    return reps * 8 / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="round trips (default 2000)")
    parser.add_argument("--reps", type=int, default=10, help="8 MB frames (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="phalanx-raw-") as tmp:
        rtt = round_trips(args.n, tmp)
        mbps = bandwidth(args.reps, tmp)
    print(f"round trip, 40 bytes, blocking: ZeroMQ ROUTER<->DEALER ipc median {rtt['zmq_rtt_us']:.1f} us; "
          f"multiprocessing.Pipe median {rtt['pipe_rtt_us']:.1f} us")
    print(f"8 MB frames over ipc, one way, zero-copy send: {mbps:,.0f} MB/s")


if __name__ == "__main__":
    main()
