"""Operations and an actor the channel tests use (tests/test_channels.py).

Imported by the test (driver) process and, by name, by every worker process
(``tests/`` is on ``sys.path`` in both), so everything here is module-level
and importing it has no side effects.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import phalanx


@phalanx.operation
def collect(rx: phalanx.Receiver[int]) -> list[int]:
    """Every value until the channel ends (iteration acks each one)."""
    return list(rx)


@phalanx.operation
def collect_any(rx) -> list[Any]:  # type: ignore[no-untyped-def]
    """``collect`` with an unannotated parameter: the end still arrives as itself."""
    assert isinstance(rx, phalanx.Receiver), type(rx)
    return list(rx)


@phalanx.operation
def produce(tx: phalanx.Sender[int], start: int, n: int, close: bool = True) -> int:
    """Send ``start .. start+n-1``, then close the lease's sending side (or just flush)."""
    for i in range(start, start + n):
        tx.send(i)
    if close:
        tx.close()
    else:
        tx.flush()
    return n


@phalanx.operation
def nacker(rx: phalanx.Receiver[int], every: int) -> tuple[list[int], int]:
    """Ack everything, except that every ``every``-th reception of a message not
    nacked here before is nacked once. Returns (values acked, nacks sent)."""
    acked: list[int] = []
    nacked: set[int] = set()
    seen = 0
    for msg in rx.messages():
        seen += 1
        if seen % every == 0 and msg.value not in nacked:
            nacked.add(msg.value)
            msg.nack()
        else:
            acked.append(msg.value)
            msg.ack()
    return acked, len(nacked)


@phalanx.operation
def hog(rx: phalanx.Receiver[int], n: int, flag: str) -> int:
    """Take ``n`` messages without acking them, say so in ``flag``, then wait to be killed.

    A redelivered run (after the kill) does nothing.
    """
    if phalanx.current_task().attempt > 0:
        return -1
    held = [rx.recv_message(timeout=60) for _ in range(n)]
    tmp = flag + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "held": [m.value for m in held]}, f)
    os.replace(tmp, flag)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return -2


@phalanx.operation
def send_until_closed(tx: phalanx.Sender[int]) -> int:
    """Send 0, 1, 2, ... until the lease refuses; the number of sends that returned."""
    sent = 0
    try:
        while sent < 10_000_000:
            tx.send(sent, timeout=60)
            sent += 1
    except phalanx.ChannelClosedError as exc:
        assert exc.reason == "released", exc.reason
        return sent
    return -1


@phalanx.operation
def echo_to(rx: phalanx.Receiver[int], tx: phalanx.Sender[int]) -> int:
    """Forward every value of ``rx`` to ``tx`` doubled, then close ``tx``."""
    n = 0
    for x in rx:
        tx.send(2 * x)
        n += 1
    tx.close()
    return n


@phalanx.operation
def return_receiver(rx: phalanx.Receiver[int]) -> phalanx.Receiver[int]:
    """Hand the end back: it crosses the wire both ways as itself."""
    return rx


@phalanx.actor
class Sink:
    """An actor whose method drains a channel."""

    def __init__(self) -> None:
        self.total = 0

    def drain(self, rx: phalanx.Receiver[int]) -> list[int]:
        got = list(rx)
        self.total += sum(got)
        return got

    def get_total(self) -> int:
        return self.total


@phalanx.operation
def take_some(rx: phalanx.Receiver[int], k: int) -> list[int]:
    """Leave the loop after ``k`` values: what was prefetched goes back to the queue."""
    out: list[int] = []
    for x in rx:
        out.append(x)
        if len(out) == k:
            break
    return out


@phalanx.operation
def hold_and_drop(rx: phalanx.Receiver[int], k: int) -> list[int]:
    """Take ``k`` messages and return without acking: dropping the end gives them back."""
    return [rx.recv_message(timeout=60).value for _ in range(k)]


@phalanx.operation
def end_in_a_forked_child(rx: phalanx.Receiver[int]) -> tuple[str, int]:
    """What a process this task forks gets from ``rx`` (it is no worker: its ends do not work
    there), asked before this worker used any end itself; then one value received here."""
    import warnings

    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # a fork with threads running (3.12+)
        pid = os.fork()
    if pid == 0:
        try:
            rx.recv(timeout=5)
            verdict = "received"
        except phalanx.RuntimeClosedError:
            verdict = "RuntimeClosedError"
        except BaseException as exc:
            verdict = type(exc).__name__
        os.write(w, verdict.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        verdict = f.read().decode()
    return verdict, rx.recv(timeout=10)
