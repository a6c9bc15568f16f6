"""What phalanx objects freed by the garbage collector leave to do, run where it cannot hang.

Runs in the driver's process. A dropped map iterator ends its job, a dropped
actor ref releases its actor, a dropped directive handle cancels its job: each
takes the driver's lock (or an actor's, or the system's). The cyclic collector
runs finalizers on whatever thread allocated when it started, the pump's
included, possibly while that thread holds one of those locks; the driver's is
not re-entrant, so taking it there would hang the runtime for good.

Invariants kept:

* During a collection no finalizer of ours takes a lock; it hands its work to
  the ``phalanx-finalize`` thread (a :class:`queue.SimpleQueue`, whose ``put``
  is safe in finalizers). Outside a collection (a reference count reaching zero
  in user code) the work runs at once, as before.
* The thread runs only while a runtime does: each runtime's pump thread holds
  it while it runs (:func:`hold`, :func:`release`), and starts it once the
  first workers are ready (:func:`start`), off the way to the first result.
  Work handed over before then waits in the queue. Once the last runtime's
  pump ends, the thread ends, after the work queued before: the next runtime's
  fork server is then forked from a process with no thread of phalanx's, and
  so is a fork of the user's own.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import threading
from typing import Any, Callable

log = logging.getLogger("phalanx")

_queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
_collecting = 0
#: the process whose collections hand work over (a fork of it runs its finalizers at once)
_pid = 0
_lock = threading.Lock()
#: runtimes not shut down yet
_holders = 0
#: the thread, from its start until it ends (no runtime holds it: see _serve)
_thread: threading.Thread | None = None
#: the thread the last release() told to end (for join())
_ending: threading.Thread | None = None


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    global _collecting
    _collecting += 1 if phase == "start" else -1


def _serve() -> None:
    global _thread
    while True:
        item = _queue.get()
        if item is None:  # the last runtime was shut down, unless another one started since
            with _lock:
                if not _holders:
                    _thread = None
                    return
            continue
        fn, args = item
        try:
            fn(*args)
        except Exception:  # a finalizer's work: nobody else would hear of it
            log.debug("clean-up of a collected object failed", exc_info=True)
        del fn, args, item


def _start_locked() -> None:
    global _thread
    if _thread is None:
        _thread = threading.Thread(target=_serve, name="phalanx-finalize", daemon=True)
        _thread.start()


def hold() -> None:
    """A runtime's pump starts (before any object of the runtime's exists): collections hand
    work over from now on, and the thread runs from :func:`start` until :func:`release`."""
    global _pid, _holders, _thread, _ending
    with _lock:
        if _pid != os.getpid():  # a fork of a process that held it: its thread is not here
            _pid, _holders, _thread, _ending = os.getpid(), 0, None, None
        _holders += 1
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def start() -> None:
    """Start the thread if a runtime holds it (its pump, once the first workers are ready)."""
    with _lock:
        if _holders and _pid == os.getpid():
            _start_locked()


def release() -> None:
    """A runtime's pump ended: the last one ends the thread, after the work queued before
    (work queued while none ran is done first)."""
    global _holders, _ending
    with _lock:
        if _pid != os.getpid() or not _holders:
            return
        _holders -= 1
        if _holders:
            return
        if _thread is None and not _queue.empty():
            _start_locked()
        if _thread is not None:
            _ending = _thread
            _queue.put(None)


def join(timeout: float) -> None:
    """Wait up to ``timeout`` seconds for the thread the last :func:`release` told to end
    (unless a runtime holds it again); never from that thread itself."""
    with _lock:
        thread = _ending if not _holders else None
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)


def run(fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` now, or on the ``phalanx-finalize`` thread while a collection runs."""
    if _collecting and _pid == os.getpid():
        _queue.put((fn, args))
    else:
        fn(*args)
