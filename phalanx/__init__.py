"""phalanx: a Ray-free actor and task runtime on multiprocessing and ZeroMQ.

Runs in the user's (driver) process; importing it starts nothing. The public
API is exactly :data:`__all__`; everything else is private and may change.
(PYTEST_DONT_REWRITE: phalanx ships a pytest plugin, which makes pytest
rewrite the package's asserts; this module keeps only its own names.)

::

    import phalanx

    @phalanx.operation
    def square(x: int) -> int:
        return x * x

    with phalanx.Runtime(workers=2) as rt:
        assert rt.submit(square, 7).result(timeout=10) == 49
"""

from .config import Config
from .driver import RuntimeStats, WorkerStats
from .errors import (
    ActorDiedError,
    ChannelClosedError,
    ChannelTimeoutError,
    DecodeError,
    EncodeError,
    FrameTooLargeError,
    NoWorkerError,
    PhalanxError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    RuntimeBrokenError,
    RuntimeClosedError,
    TaskCancelledError,
    TaskTimeoutError,
    UnknownOperationError,
    Transient,
    UnsupportedActorError,
    ValidationError,
    WorkerCrashedError,
    WorkerStartError,
)
from .actors import Failed, RestartFailed, Started, Stopped
from .actors.ref import ActorRef
from .actors.system import ActorNode, RuntimeTree, WorkerNode
from .jobs import Future, MapIterator
from .channels import Broadcast, ChannelKind, ExactlyOnce, Lease, Message, Receiver, Sender
from .directives import Chain, Directive, Fold, IndexedChain, IndexedStream, JobHandle, JobProgress, Literal
from .policy import (
    After,
    Exponential,
    FatalStrategy,
    Ignore,
    Immediate,
    RetryStrategy,
    Terminate,
)
from .registry import actor, operation
from .runtime import JobOptions, Runtime
from .aio import AsyncActorRef, AsyncJobOptions, AsyncRuntime
from .executor import Executor
from . import logs as _logs  # noqa: F401  (NullHandler on the phalanx logger)
from .worker import TaskContext, current_task

import typing as _typing

if _typing.TYPE_CHECKING:
    from . import testing as testing
else:

    def __getattr__(name: str) -> object:
        # ``phalanx.testing`` (the test harness) is imported on first use only.
        if name == "testing":
            import importlib

            return importlib.import_module(".testing", __name__)
        raise AttributeError(f"module 'phalanx' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "ActorDiedError",
    "ActorNode",
    "ActorRef",
    "After",
    "AsyncActorRef",
    "AsyncJobOptions",
    "AsyncRuntime",
    "Broadcast",
    "Chain",
    "ChannelClosedError",
    "ChannelKind",
    "ChannelTimeoutError",
    "Config",
    "DecodeError",
    "Directive",
    "EncodeError",
    "ExactlyOnce",
    "Executor",
    "Exponential",
    "Failed",
    "FatalStrategy",
    "Fold",
    "FrameTooLargeError",
    "Future",
    "Ignore",
    "Immediate",
    "IndexedChain",
    "IndexedStream",
    "JobHandle",
    "JobOptions",
    "JobProgress",
    "Lease",
    "Literal",
    "MapIterator",
    "Message",
    "NoWorkerError",
    "PhalanxError",
    "ProtocolError",
    "Receiver",
    "RemoteError",
    "RemoteTraceback",
    "RestartFailed",
    "RetryStrategy",
    "Runtime",
    "RuntimeBrokenError",
    "RuntimeClosedError",
    "RuntimeStats",
    "RuntimeTree",
    "Sender",
    "Started",
    "Stopped",
    "TaskCancelledError",
    "TaskContext",
    "TaskTimeoutError",
    "Terminate",
    "Transient",
    "UnknownOperationError",
    "UnsupportedActorError",
    "ValidationError",
    "WorkerCrashedError",
    "WorkerNode",
    "WorkerStartError",
    "WorkerStats",
    "__version__",
    "actor",
    "current_task",
    "operation",
]
