"""Logging: the ``phalanx.*`` loggers and worker output prefixed with the worker id.

Runs in the driver (importing :mod:`phalanx` attaches a ``NullHandler`` to
the ``phalanx`` logger, as a library should: the application decides where
records go) and in every worker (:func:`install_worker_output`, called once
at worker start, before any task runs).

Every module logs to ``logging.getLogger(__name__)``, so
``logging.getLogger("phalanx").setLevel(logging.DEBUG)`` (or
``PHALANX_LOG_LEVEL=DEBUG`` with :func:`configure`) shows them all.

Invariant kept: in a worker, every line written to ``sys.stdout`` or
``sys.stderr`` (``print``, ``logging``'s stream handlers, tracebacks) reaches
the terminal the driver writes to, with ``[<worker id>] `` at the start of
each line, and a line is never split by the prefix. Output written straight
to file descriptors 1 and 2 (C extensions, subprocesses) is not prefixed.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from typing import Any, TextIO

__all__ = ["PrefixedStream", "install_worker_output", "configure", "LOG_LEVEL_ENV"]

#: environment variable read by :func:`configure`
LOG_LEVEL_ENV = "PHALANX_LOG_LEVEL"

logging.getLogger("phalanx").addHandler(logging.NullHandler())


class PrefixedStream(io.TextIOBase):
    """A text stream that writes ``prefix`` at the start of every line to ``target``.

    Partial lines are written through at once (so a progress line or a
    prompt still shows) and the prefix is only written before the first
    character of each line. Thread-safe. Anything else (``encoding``,
    ``fileno()``, ``buffer``...) is the target's.
    """

    def __init__(self, target: TextIO, prefix: str) -> None:
        super().__init__()
        self._target = target
        self._prefix = prefix
        self._at_line_start = True
        self._lock = threading.Lock()

    @property
    def target(self) -> TextIO:
        """The wrapped stream."""
        return self._target

    def write(self, s: str) -> int:
        if not s:
            return 0
        with self._lock:
            out: list[str] = []
            for line in s.splitlines(keepends=True):
                if self._at_line_start:
                    out.append(self._prefix)
                out.append(line)
                self._at_line_start = line.endswith(("\n", "\r"))
            self._target.write("".join(out))
        return len(s)

    def flush(self) -> None:
        try:
            self._target.flush()
        except (OSError, ValueError):
            pass

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._target.isatty()

    def fileno(self) -> int:
        return self._target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def install_worker_output(worker_id: str) -> None:
    """Prefix this worker's stdout and stderr lines with ``[worker_id] ``.

    Call once in the worker process, before user code runs. Logging stream
    handlers inherited from the driver (a forked worker) that wrote to the
    old streams are pointed at the new ones. Idempotent. Does nothing when
    ``PHALANX_WORKER_PREFIX=0``.
    """
    if os.environ.get("PHALANX_WORKER_PREFIX", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    prefix = f"[{worker_id}] "
    swaps: dict[int, PrefixedStream] = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, PrefixedStream):
            continue
        wrapped = PrefixedStream(stream, prefix)
        swaps[id(stream)] = wrapped
        setattr(sys, name, wrapped)
    if not swaps:
        return
    loggers: list[Any] = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in swaps:
                handler.setStream(swaps[id(handler.stream)])


def configure(level: int | str | None = None, *, stream: TextIO | None = None) -> logging.Handler | None:
    """Send ``phalanx.*`` records at ``level`` or above to ``stream`` (stderr).

    ``level`` defaults to ``PHALANX_LOG_LEVEL``; with neither, nothing is
    configured and None is returned. For applications and the CLI; a
    library using phalanx should leave logging to its application.
    """
    if level is None:
        level = os.environ.get(LOG_LEVEL_ENV) or None
    if level is None:
        return None
    if isinstance(level, str):
        level = level.strip().upper()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("phalanx")
    root.setLevel(level)
    root.addHandler(handler)
    return handler
