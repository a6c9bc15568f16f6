"""What phalanx objects freed by the garbage collector leave to do, run where it cannot hang.

Runs in the driver's process. A dropped map iterator ends its job, a dropped
actor ref releases its actor, a dropped directive handle cancels its job: each
takes the driver's lock (or an actor's, or the system's). The cyclic collector
runs finalizers on whatever thread allocated when it started, the pump's
included, possibly while that thread holds one of those locks; the driver's is
not re-entrant, so taking it there would hang the runtime for good.

Invariant kept: during a collection no finalizer of ours takes a lock; it hands
its work to the ``phalanx-finalize`` thread (a :class:`queue.SimpleQueue`,
whose ``put`` is safe in finalizers). Outside a collection (a reference count
reaching zero in user code) the work runs at once, as before.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import threading
from typing import Any, Callable

log = logging.getLogger("phalanx")

_queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
_collecting = 0
_thread_pid = 0


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    global _collecting
    _collecting += 1 if phase == "start" else -1


def _serve() -> None:
    while True:
        fn, args = _queue.get()
        try:
            fn(*args)
        except Exception:  # a finalizer's work: nobody else would hear of it
            log.debug("clean-up of a collected object failed", exc_info=True)
        del fn, args


def install() -> None:
    """Start the thread (once per process; a Runtime calls it before any object of its exists)."""
    global _thread_pid
    if _thread_pid == os.getpid():
        return
    _thread_pid = os.getpid()
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
    threading.Thread(target=_serve, name="phalanx-finalize", daemon=True).start()


def run(fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` now, or on the ``phalanx-finalize`` thread while a collection runs."""
    if _collecting and _thread_pid == os.getpid():
        _queue.put((fn, args))
    else:
        fn(*args)
