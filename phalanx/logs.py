"""Logging: the ``phalanx.*`` loggers, and worker output prefixed with the worker id.

Runs in the driver (importing :mod:`phalanx` attaches a ``NullHandler`` to
the ``phalanx`` logger, as a library should: the application decides where
records go; :func:`configure` is there for applications and the CLI) and in
every worker (:func:`install_worker_output`, called once by
:func:`phalanx.worker.run_worker` before it imports anything of the user's and
before it says Ready: the inherited handlers' code it runs may fail the start).

Every phalanx module logs to a logger under ``phalanx`` (its module name), so
``logging.getLogger("phalanx").setLevel(logging.DEBUG)`` shows them all. The
``log_level`` option (``Runtime(log_level="DEBUG")`` or
``PHALANX_LOG_LEVEL=DEBUG``) adds a stderr handler at that level with
:func:`configure`, in the driver and in its workers.

What a worker sets up costs no thread, no socket and no message: a worker
started on this machine (fork or spawn) inherits the driver's file
descriptors 1 and 2, so its lines go straight to wherever the driver's
output goes (its terminal, a pipe, a file)::

    worker w3:  print(...), tracebacks, logging StreamHandlers
                  └─▶ sys.stdout / sys.stderr = PrefixedStream("[w3] ")
                        └─▶ the process's original stream ──▶ fd 1 / fd 2 (shared with the driver)
                logging records made in w3 carry ``record.phalanx_worker == "w3"``
                a record no handler takes (WARNING and above) ──▶ "[w3] WARNING name: message" on stderr

Under fork a worker inherits the driver's logging configuration (handlers,
levels, formats), whose stream handlers are pointed at the prefixed
streams; under spawn it starts unconfigured, and warnings and errors still
show, through the worker's last-resort handler. The ``log_level`` option
configures the ``phalanx`` loggers of spawned workers too. A driver-side format may name the worker with
``logging.Formatter(fmt, defaults={"phalanx_worker": "driver"})``.

``prefix_output=False`` (``PHALANX_PREFIX_OUTPUT=0``, the worker spec's ``prefix_output``) leaves
the streams alone; the last-resort handler then names the worker itself.

Invariant kept: with the prefix on, every line a worker writes through
``sys.stdout`` or ``sys.stderr`` starts with ``[<worker id>] `` and is
written whole, in one write, when it ends, so lines of different workers
never interleave mid-line (for lines up to the pipe's atomic write size, 4
KiB on Linux). An unfinished line waits for its end or a ``flush()`` (the
worker flushes at exit; a worker killed outright loses it). Output written
straight to file descriptors 1 and 2 (C extensions, subprocesses,
``sys.stdout.buffer``) is not prefixed.
"""

from __future__ import annotations

import _thread
import io
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

__all__ = [
    "PrefixedStream",
    "install_worker_output",
    "prefix_output_enabled",
    "configure",
    "ensure_configured",
    "LOG_LEVEL_ENV",
    "PREFIX_ENV",
    "WORKER_ATTR",
]

#: environment variable read by :func:`configure` (and the ``log_level`` option)
LOG_LEVEL_ENV = "PHALANX_LOG_LEVEL"
#: environment variable of the ``prefix_output`` option (``0``, ``false``, ``no``, ``off``: no prefix)
PREFIX_ENV = "PHALANX_PREFIX_OUTPUT"
#: the attribute every ``LogRecord`` made in a worker carries: the worker id
WORKER_ATTR = "phalanx_worker"

logging.getLogger("phalanx").addHandler(logging.NullHandler())


class PrefixedStream(io.TextIOBase):
    """A text stream that writes ``prefix`` at the start of every line to ``target``.

    Line-buffered, whatever the target's buffering (``PYTHONUNBUFFERED``
    makes every ``write`` a system call): a line is held until it ends and
    then written and flushed whole, in one write, so lines of processes
    sharing the target's file never interleave mid-line. A ``\r`` ends a
    line too (a redrawn progress line keeps its prefix); ``flush()`` writes
    a partial line out (``input()`` prompts do that), as does a partial line
    longer than :attr:`MAX_PARTIAL` characters. Thread-safe. Anything else
    (``encoding``, ``fileno()``, ``buffer``...) is the target's.
    """

    #: characters of an unfinished line held before they are written anyway
    MAX_PARTIAL = 65536

    def __init__(self, target: TextIO, prefix: str) -> None:
        # (No super().__init__(): io.TextIOBase has none of its own, and a worker makes two of
        # these as it starts.)
        self._target = target
        self._prefix = prefix
        self._at_line_start = True
        self._partial: list[str] = []
        self._partial_len = 0
        self._lock = _thread.allocate_lock()

    @property
    def target(self) -> TextIO:
        """The wrapped stream."""
        return self._target

    def write(self, s: str) -> int:
        if not s:
            return 0
        with self._lock:
            partial = self._partial
            done: list[str] = []
            for piece in s.splitlines(keepends=True):
                if self._at_line_start:
                    partial.append(self._prefix)
                    self._partial_len += len(self._prefix)
                partial.append(piece)
                self._partial_len += len(piece)
                self._at_line_start = piece.endswith(("\n", "\r"))
                if self._at_line_start:
                    done.extend(partial)
                    partial.clear()
                    self._partial_len = 0
            if self._partial_len > self.MAX_PARTIAL:
                done.extend(partial)
                partial.clear()
                self._partial_len = 0
            if done:
                self._target.write("".join(done))
                self._flush_target()
        return len(s)

    def _flush_target(self) -> None:
        try:
            self._target.flush()
        except (OSError, ValueError):
            pass

    def flush(self) -> None:
        with self._lock:
            if self._partial:
                text = "".join(self._partial)
                self._partial.clear()
                self._partial_len = 0
                try:
                    self._target.write(text)
                except (OSError, ValueError):
                    return
            self._flush_target()

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


class _LastResort(logging.Handler):
    """A worker's ``logging.lastResort``: records no handler took, at WARNING and above.

    Writes to the current ``sys.stderr`` (the prefixed stream), naming the
    level and the logger, where the standard one writes the bare message.
    """

    def __init__(self, fmt: str) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter(fmt))

    def createLock(self) -> None:
        # Not on logging's list of locks to renew in every forked child (a Python call per handler
        # in each one): only the one a worker installs is, by a hook in C (see install_worker_output).
        self.lock = threading.RLock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            if stream is None:
                return
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


#: a worker's last-resort handler, with its prefixed streams and without them: made at import
#: (in the driver) and inherited, not made by each worker as it starts (a handler and a
#: formatter cost a forked worker ~0.2 ms of page faults)
_LAST_RESORT = {
    True: _LastResort("%(levelname)s %(name)s: %(message)s"),
    False: _LastResort(f"[%({WORKER_ATTR})s] %(levelname)s %(name)s: %(message)s"),
}


def prefix_output_enabled(value: bool | None = None) -> bool:
    """``value`` when given (a worker spec's setting), else ``PHALANX_PREFIX_OUTPUT`` (default on).

    The variable reads as the ``prefix_output`` option does: a word that is
    not a boolean raises ``ValueError``.
    """
    if value is not None:
        return bool(value)
    from .config import parse_bool

    raw = os.environ.get(PREFIX_ENV, "")
    return parse_bool(raw) if raw.strip() else True


_installed: str | None = None
#: the record factory a worker had before install_worker_output (logging's LogRecord, or the user's)
_make_record: Callable[..., logging.LogRecord] = logging.LogRecord


def _worker_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """A worker's log record factory: the previous one's record, naming the worker."""
    record = _make_record(*args, **kwargs)
    setattr(record, WORKER_ATTR, _installed)
    return record


def install_worker_output(worker_id: str, prefix: bool | None = None, log_level: str | None = None) -> None:
    """Set up a worker process's output: see the module docstring.

    ``prefix`` (None: from ``PHALANX_PREFIX_OUTPUT``) says whether to prefix
    ``sys.stdout`` and ``sys.stderr`` lines with ``[worker_id] ``;
    ``log_level`` (the option) adds a stderr handler unless one was
    inherited. Call once in the worker, before user code runs; later calls
    do nothing.
    """
    global _installed, _make_record
    if _installed is not None:
        return
    _installed = worker_id
    # A function of the module, not a closure: a worker just forked makes no function object.
    _make_record = logging.getLogRecordFactory()
    logging.setLogRecordFactory(_worker_record)

    enabled = bool(prefix) if prefix is not None else prefix_output_enabled()
    if enabled:
        _prefix_streams(f"[{worker_id}] ")
    last_resort = logging.lastResort = _LAST_RESORT[enabled]
    # A process this worker forks (a task may) starts with the handler's lock unlocked.
    os.register_at_fork(after_in_child=last_resort.lock._at_fork_reinit)  # type: ignore[union-attr]

    if log_level:
        ensure_configured(log_level)  # a spawned worker: the driver's handler was not inherited


def _prefix_streams(prefix: str) -> None:
    swaps: dict[int, PrefixedStream] = {}
    stream = sys.stdout
    # (type(), not isinstance(): PrefixedStream is an io ABC, whose isinstance runs Python code)
    if stream is not None and type(stream) is not PrefixedStream:
        swaps[id(stream)] = sys.stdout = PrefixedStream(stream, prefix)
    stream = sys.stderr
    if stream is not None and type(stream) is not PrefixedStream:
        swaps[id(stream)] = sys.stderr = PrefixedStream(stream, prefix)
    if not swaps:
        return
    # Handlers inherited from the driver (fork) that wrote to the old streams. Every handler is
    # on logging's own list (as weak references, for its shutdown), handlers on no logger too:
    # a few objects to look at in a worker just forked, where every logger object the driver
    # made would be copied into it to be read.
    for ref in list(logging._handlerList):  # type: ignore[attr-defined]
        handler = ref()
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


def ensure_configured(level: str) -> None:
    """The ``log_level`` option: :func:`configure` at ``level`` unless the ``phalanx`` logger has a handler.

    A handler already there (the application's, or one inherited through
    fork) is kept, and only the level is set: a second runtime, or a forked
    worker, does not print every record twice.
    """
    logger = logging.getLogger("phalanx")
    if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.setLevel(level.strip().upper())
    else:
        configure(level)
