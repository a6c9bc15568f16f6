"""One exception hierarchy for phalanx.

Runs in every process: the driver raises these to callers, workers build the
wire form (:class:`phalanx.transport.messages.ErrorInfo`) of whatever a task
raised, and the driver rebuilds it here.

Invariant kept: every error phalanx raises is a :class:`PhalanxError` *and*,
where one exists, the stdlib error a user would already catch
(``TypeError``, ``LookupError``, ``TimeoutError``,
``concurrent.futures.BrokenExecutor``). A failure that happened in a worker
carries the remote traceback text as its ``__cause__``
(:class:`RemoteTraceback`), the way ``concurrent.futures`` does.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import concurrent.futures.process

__all__ = [
    "PhalanxError",
    "RemoteError",
    "RemoteTraceback",
    "UnknownOperationError",
    "EncodeError",
    "FrameTooLargeError",
    "DecodeError",
    "ValidationError",
    "ProtocolError",
    "TaskTimeoutError",
    "TaskCancelledError",
    "NoWorkerError",
    "WorkerCrashedError",
    "WorkerStartError",
    "RuntimeBrokenError",
    "RuntimeClosedError",
    "UnsupportedActorError",
    "ActorDiedError",
    "Transient",
    "ChannelClosedError",
    "ChannelTimeoutError",
]


class PhalanxError(Exception):
    """Base class of every error phalanx raises."""


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a worker.

    Attached as ``__cause__`` of the rebuilt exception so that the standard
    traceback printer shows the remote frames.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(PhalanxError):
    """An exception raised by an operation that could not be rebuilt locally.

    The driver rebuilds a remote exception as its own type only from modules
    it already imported, never a ``BaseException`` that is not an
    ``Exception`` (``GeneratorExit``...) other than the builtin
    ``SystemExit`` and ``KeyboardInterrupt`` of a local worker (from a host
    over tcp, they are this), nor a ``StopIteration``, and only when
    its constructor takes the remote ``args``; anything else is this.
    ``type_name`` is the remote exception's ``module:qualname``; ``message``
    its ``str()``; ``remote_traceback`` the formatted remote traceback.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.remote_traceback))


class UnknownOperationError(PhalanxError, LookupError):
    """The worker has no operation of that name, or its module failed to import."""

    def __init__(self, name: str, reason: str = "") -> None:
        text = f"unknown operation {name!r}"
        if reason:
            text += f": {reason}"
        super().__init__(text)
        self.name = name
        self.reason = reason

    def __reduce__(self) -> tuple[type[UnknownOperationError], tuple[str, str]]:
        return (type(self), (self.name, self.reason))


class EncodeError(PhalanxError, TypeError):
    """A value cannot be encoded for the wire (raised before anything is sent)."""


class FrameTooLargeError(PhalanxError, ValueError):
    """A value's encoded message is larger than ``max_frame``, the largest frame a peer accepts.

    A ``ValueError``: the value is of a type that can be sent, only too big
    (an ``OverflowError`` is about arithmetic). ``size`` is the encoded size
    in bytes, ``limit`` the ``max_frame`` it passed.
    """

    def __init__(self, message: str, size: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit

    def __reduce__(self) -> tuple[type[FrameTooLargeError], tuple[str, int, int]]:
        return (type(self), (str(self), self.size, self.limit))


class DecodeError(PhalanxError, ValueError):
    """A payload could not be decoded into the type it was declared as."""


class ValidationError(PhalanxError, TypeError):
    """A decoded argument or result does not match the operation's declared type."""


class ProtocolError(PhalanxError, ValueError):
    """A frame is not a valid phalanx message."""


class TaskTimeoutError(PhalanxError, builtins.TimeoutError):
    """A task or a wait on its result exceeded its timeout."""


class TaskCancelledError(PhalanxError, concurrent.futures.CancelledError):
    """The task's job was cancelled or terminated before it produced a result."""


class NoWorkerError(PhalanxError, builtins.TimeoutError):
    """Work routed to a tag (``on="gpu"``) found no live worker holding it in time.

    Work for a tag waits ``route_timeout`` seconds for such a worker (one may
    join or restart) before it fails with this error. ``tag`` is the tag
    asked for; ``available`` the tags that did have live workers then.
    """

    def __init__(self, message: str, tag: str = "", available: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.tag = tag
        self.available = available

    def __reduce__(self) -> tuple[type[NoWorkerError], tuple[str, str, tuple[str, ...]]]:
        return (type(self), (str(self), self.tag, self.available))


class WorkerCrashedError(PhalanxError, ChildProcessError, concurrent.futures.process.BrokenProcessPool):
    """A worker process died while it held the task, too many times.

    Also a ``concurrent.futures.process.BrokenProcessPool`` (what
    ``ProcessPoolExecutor`` raises when a worker dies), so code written for
    it keeps catching the failure.

    ``exitcode`` is the process exit code; a negative value ``-N`` means it
    was killed by signal ``N``. ``index`` is, for an item of a ``map``, its
    position in the input (None otherwise).
    """

    def __init__(self, message: str, exitcode: int | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.index = index

    def __reduce__(self) -> tuple[type[WorkerCrashedError], tuple[str, int | None, int | None]]:
        return (type(self), (str(self), self.exitcode, self.index))


class WorkerStartError(PhalanxError, RuntimeError):
    """Worker processes did not start or connect within the start timeout."""


class RuntimeBrokenError(PhalanxError, concurrent.futures.BrokenExecutor):
    """The runtime can no longer run tasks (for example workers keep dying)."""


class RuntimeClosedError(PhalanxError, RuntimeError):
    """The runtime was shut down; no new work is accepted."""


class UnsupportedActorError(PhalanxError, LookupError):
    """No actor type of that name exists on the worker ("unsupported worker")."""


class ActorDiedError(PhalanxError):
    """The actor's process died while a call to it was in flight."""


class Transient(PhalanxError):
    """Raise this from an operation to say "try again later".

    The task is retried under the operation's (or job's)
    :class:`~phalanx.RetryStrategy`; when retries run out the error is treated
    as fatal. ``raise phalanx.Transient("db busy") from exc`` keeps the cause.
    """


class ChannelClosedError(PhalanxError):
    """A channel end was used after its channel closed (after trio's ``ClosedResourceError``).

    Raised by ``send`` once the lease's sending side was closed (by any copy
    of the sender) or the lease was released, by ``recv`` once the channel
    ended, and by any use of an end you closed yourself. ``reason`` is one of
    ``"closed"``, ``"released"``, ``"unsubscribed"``, ``"unknown"`` (not a lease
    of this runtime) or ``"end closed"``.
    """

    def __init__(self, message: str, reason: str = "closed") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ChannelClosedError], tuple[str, str]]:
        return (type(self), (str(self), self.reason))


class ChannelTimeoutError(PhalanxError, builtins.TimeoutError):
    """A channel ``send`` (the lease is full) or ``recv`` (nothing arrived) passed its timeout."""
