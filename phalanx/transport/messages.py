"""Every message phalanx puts on the wire, in one place.

Runs in the driver and in every worker. Each message is a frozen, tagged
``msgspec.Struct`` encoded as a msgpack array (``array_like``: the tag first,
then the fields in order), so a frame is small and decodes in one pass.

Invariant kept: **no pickle on the wire**. User values inside messages
(``args``, ``value``, ...) are plain msgpack data; they are converted to the
operation's declared types with ``msgspec.convert`` on the receiving side.

Sockets and the messages each one carries::

    driver                                   worker
    ROUTER "tasks"   --- Welcome, Call, Chunk, Stop, --->  DEALER inbox (a remote worker's
                         SpawnActor, ActorCall,            under its secret Hello.inbox;
                         StopActor, SaveActor              it sends Hello there on each
                                                           connect)
    ROUTER "results" <-- Hello, Ready, Results, Retire,   DEALER outbox
                         Goodbye, ActorEvent, ActorState
    ROUTER "results" <-- Results (timeouts), ----------  DEALER side (control thread)
                         InspectReply, Alive, Reclaimed
    PUB "control"    --- Sync, Terminate, Shutdown, --->  SUB
                         Heartbeat, InspectRequest, Reclaim

    any process holding a channel end (phalanx.channels)    driver
    DEALER "<id>~<n>" -- ChanSend, ChanClose, ChanPull, -->  ROUTER "results" (broker)
                         ChanSubscribe, ChanDetach
                     <-- ChanAck, ChanDeliver, ChanEnd, --
                         ChanReply, ChanPing

Tasks are addressed to one worker (credit-based dispatch, see
``phalanx.runtime``); each carries ``(job, seq, attempt)`` so the driver can
redeliver and deduplicate. Every ``Call`` or ``Chunk`` is answered by exactly
one ``Ok`` or ``Err`` inside a ``Results`` batch, which also returns the
credit the task used.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any, Union

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "ErrorInfo",
    "Welcome",
    "Call",
    "Chunk",
    "Stop",
    "Sync",
    "Terminate",
    "Shutdown",
    "Heartbeat",
    "Reclaim",
    "Hello",
    "INBOX_LENGTH",
    "new_inbox",
    "is_inbox",
    "Ready",
    "Alive",
    "Reclaimed",
    "Ok",
    "Err",
    "Results",
    "Retire",
    "Goodbye",
    "SpawnActor",
    "ActorCall",
    "StopActor",
    "SaveActor",
    "ActorEvent",
    "ActorState",
    "InspectRequest",
    "InspectReply",
    "ActorInfo",
    "InspectQuery",
    "InspectAnswer",
    "ChanSend",
    "ChanClose",
    "ChanPull",
    "ChanSubscribe",
    "ChanDetach",
    "ChanAck",
    "ChanDeliver",
    "ChanEnd",
    "ChanReply",
    "ChanPing",
    "CHAN_OK",
    "CHAN_CLOSED",
    "CHAN_RELEASED",
    "CHAN_UNKNOWN",
    "CHAN_UNSUBSCRIBED",
    "ChannelRequest",
    "ChannelReply",
    "InboxMessage",
    "ControlMessage",
    "DriverMessage",
    "Outcome",
]

#: 2: Chunk.stages, Hello.tags (a version-1 worker would ignore them);
#: 3: Hello.inbox (a remote worker's inbox identity, which the driver requires)
PROTOCOL_VERSION = 3


class _Msg(msgspec.Struct, frozen=True, array_like=True, tag=True, gc=False):
    """Base of every wire message: frozen, tagged by class name, array-encoded.

    Untracked by the garbage collector (``gc=False``): a message never refers back
    to anything that holds it, and tens of thousands may be in flight at once.
    """


class ErrorInfo(msgspec.Struct, frozen=True, array_like=True):
    """An exception raised in a worker, in a form that survives the wire.

    ``type`` is ``module:qualname`` of the exception class, ``args`` the
    constructor arguments from its ``__reduce__`` (which is ``args`` for most
    exceptions) when msgpack can carry them (else ``None``), ``traceback`` the
    formatted remote traceback.
    """

    type: str
    message: str
    args: list[Any] | None
    traceback: str
    #: the exception's instance attributes, when msgpack can carry them
    state: dict[str, Any] | None = None


# ---- driver -> one worker (tasks ROUTER -> inbox DEALER) -------------------


class Welcome(_Msg, frozen=True):
    """First message on a worker's inbox: the driver can route to it.

    ``max_frame``: the largest frame the driver accepts (0: not said); a
    worker sends none larger, whatever its own limit (a larger one would be
    taken for an attack).
    """

    worker: str
    max_frame: int = 0


class Call(_Msg, frozen=True):
    """Run ``op(*args, **kwargs)`` once."""

    job: int
    seq: int
    attempt: int
    op: str
    #: a list when decoded; the driver passes the caller's tuple as it is
    args: Sequence[Any]
    kwargs: dict[str, Any] | None = None
    #: seconds the call may run before it is aborted (0: no limit)
    timeout: float = 0.0


class Chunk(_Msg, frozen=True):
    """Run ``op`` over several items of one job in one message.

    ``fold=False``: map, the outcome value is the list of ``op(item)``
    (``op(*item)`` when ``star``). ``fold=True``: reduce the items in order
    with ``op(lower, upper)``, exactly ``len(items) - 1`` calls.

    ``stages`` (a directive chain) are operations applied to each item, in
    order, before ``op``: a map chunk's values are ``op(sN(...s1(item)))``; a
    fold chunk maps every item so, then reduces the mapped values with
    ``op``. Empty (the default, and what older senders mean) for plain
    ``map``/``fold``.
    """

    job: int
    seq: int
    attempt: int
    op: str
    items: list[Any]
    star: bool = False
    fold: bool = False
    #: seconds each call may run before it is aborted (0: no limit)
    timeout: float = 0.0
    #: operations applied to each item before ``op`` (directive chains)
    stages: list[str] = []


class Stop(_Msg, frozen=True):
    """Finish the current task, send what is pending and exit."""


# ---- driver -> every worker (control PUB -> SUB) ---------------------------


class Sync(_Msg, frozen=True):
    """Published until every new worker has seen one: its SUB is live."""

    nonce: int


class Terminate(_Msg, frozen=True):
    """Job ``job`` is over: drop its queued tasks, abort its running one."""

    job: int


class Shutdown(_Msg, frozen=True):
    """The runtime is shutting down: every worker exits."""


class Heartbeat(_Msg, frozen=True):
    """The driver is alive (published every ``heartbeat_interval``)."""

    seq: int


class Reclaim(_Msg, frozen=True):
    """Worker ``worker``: give back ``tasks`` (``[job, seq, attempt]`` each, sent after
    ``running``) unstarted, if ``running`` is the task it runs now (its answer: Reclaimed)."""

    worker: str
    running: list[int]
    tasks: list[list[int]]


# ---- worker -> driver (outbox DEALER -> results ROUTER) --------------------


class Hello(_Msg, frozen=True):
    """A worker connected; ``worker`` is also its routing identity on the results ROUTER.

    ``inbox``: a remote worker's routing identity on the tasks ROUTER, a secret
    it drew at random (:func:`new_inbox`) and says only to the driver, over
    CURVE: nobody else can connect under it, so nobody else can receive its
    tasks, even while its inbox reconnects. It sends this Hello on both
    sockets; the driver sends it work only once the same key said it on both.
    """

    worker: str
    pid: int
    host: str
    version: int = PROTOCOL_VERSION
    #: the worker tags it serves (empty from an older worker: "default")
    tags: list[str] = []
    inbox: str = ""


#: length of a remote worker's inbox identity: 32 hex digits, 128 random bits
INBOX_LENGTH = 32


def new_inbox() -> str:
    """A fresh secret inbox identity for a remote worker (see :class:`Hello`)."""
    return secrets.token_hex(INBOX_LENGTH // 2)


def is_inbox(ident: bytes) -> bool:
    """Whether ``ident`` has the form of an inbox identity :func:`new_inbox` draws."""
    return len(ident) == INBOX_LENGTH and all(c in b"0123456789abcdef" for c in ident)


class Ready(_Msg, frozen=True):
    """The worker saw Welcome and a Sync: it takes ``credits`` tasks at once."""

    worker: str
    credits: int


class Alive(_Msg, frozen=True):
    """A worker's heartbeat (over tcp): the driver declares it lost when they stop."""

    worker: str
    seq: int


class Reclaimed(_Msg, frozen=True):
    """The tasks of a Reclaim the worker will never run (empty: it gives back none)."""

    worker: str
    tasks: list[list[int]]


class Ok(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """Task ``(job, seq, attempt)`` succeeded with ``value``."""

    job: int
    seq: int
    attempt: int
    value: Any


class Err(msgspec.Struct, frozen=True, array_like=True, tag=True):
    """Task ``(job, seq, attempt)`` failed.

    For a map chunk, ``index`` is the failing item and ``partial`` the values
    of the items before it.
    """

    job: int
    seq: int
    attempt: int
    error: ErrorInfo
    index: int = 0
    partial: list[Any] | None = None
    #: the operation raised ``phalanx.Transient`` or one of its transient types
    transient: bool = False


Outcome = Union[Ok, Err]


class Results(_Msg, frozen=True):
    """Outcomes of finished tasks; each returns one credit to the worker.

    ``busy`` is the time in seconds the worker spent running these tasks;
    ``dropped`` how many malformed frames the worker has dropped since it
    started (a running total).
    """

    worker: str
    outcomes: list[Outcome]
    busy: float = 0.0
    dropped: int = 0


class Retire(_Msg, frozen=True):
    """The worker passed a recycling limit: send it nothing more, then Stop it."""

    worker: str
    reason: str


class Goodbye(_Msg, frozen=True):
    """A remote worker leaves now (its host was told to stop): redeliver what it holds.

    The driver acknowledges with Stop on the worker's inbox; the worker waits
    for it briefly, so the Goodbye is on the wire before the process ends.
    """

    worker: str


# ---- actors ---------------------------------------------------------------


class SpawnActor(_Msg, frozen=True):
    """Create actor instance ``instance`` of class ``cls`` on this worker.

    From ``args``/``kwargs`` through ``__init__``, or, when ``state`` is not
    None, through ``cls.restore(state)`` (hot restart, supervision).
    Answered by an ``ActorEvent`` (``started`` or ``failed``).
    """

    instance: int
    cls: str
    args: list[Any]
    kwargs: dict[str, Any] | None
    state: Any = None
    restored: bool = False
    #: save() after this many calls (0: never)
    checkpoint_every: int = 0
    #: save() when this many seconds passed since the last save (0: never)
    checkpoint_interval: float = 0.0


class ActorCall(_Msg, frozen=True):
    """Call ``method`` on actor ``instance``; answered as task ``(job, seq)``."""

    job: int
    seq: int
    attempt: int
    instance: int
    method: str
    #: a list when decoded; the caller's tuple goes in as it is
    args: Sequence[Any]
    kwargs: dict[str, Any] | None = None


class StopActor(_Msg, frozen=True):
    """Drop instance ``instance`` after the calls queued before this message.

    ``quiet``: an internal stop (the old instance of a hot restart): no event.
    """

    instance: int
    quiet: bool = False


class SaveActor(_Msg, frozen=True):
    """Call ``save()`` on ``instance`` (after the calls queued before this); answered by ActorState."""

    instance: int
    nonce: int


class ActorEvent(_Msg, frozen=True):
    """An instance ``started``, ``stopped`` or ``failed`` (with ``error``)."""

    worker: str
    instance: int
    kind: str
    error: ErrorInfo | None = None


class ActorState(_Msg, frozen=True):
    """The result of ``save()``: ``state``, or ``error``; ``nonce`` 0 is a checkpoint.

    The worker sends the state's value; the driver decodes it as
    ``msgspec.Raw``, the encoded bytes, which it only keeps and sends back
    (``SpawnActor.state``): a checkpoint costs the driver a reference, not
    a decode of every object in the state.
    """

    worker: str
    instance: int
    nonce: int
    state: msgspec.Raw = None  # type: ignore[assignment]  # the worker's side sends any value
    error: ErrorInfo | None = None


class InspectRequest(_Msg, frozen=True):
    """Every worker answers with an InspectReply carrying ``nonce``."""

    nonce: int


class ActorInfo(msgspec.Struct, frozen=True, array_like=True):
    """One actor instance as its worker sees it."""

    instance: int
    cls: str
    mailbox: int
    calls: int


class InspectReply(_Msg, frozen=True):
    """A worker's view of itself, sent by its control thread."""

    worker: str
    nonce: int
    pid: int
    host: str
    cpu_percent: float
    rss: int
    queued: int
    tasks_done: int
    actors: list[ActorInfo]
    #: malformed frames the worker has dropped since it started
    frames_dropped: int = 0


class InspectQuery(_Msg, frozen=True):
    """From a client such as ``phalanx top``: send me the runtime's inspect tree."""

    nonce: int
    timeout: float = 1.0


class InspectAnswer(_Msg, frozen=True):
    """The driver's answer to an InspectQuery: ``tree`` is a RuntimeTree as plain data."""

    nonce: int
    tree: Any


# ---- channels (a channel end's DEALER <-> the broker on the results ROUTER) ----
#
# User values travel as ``data``: the msgpack of the value, made by the sending
# end with the usual encoder. The broker never decodes it (a value it cannot
# read cannot hurt it); the receiving end does.

#: status of a ChanAck / ChanReply, reason of a ChanEnd
CHAN_OK = 0
#: the lease's sending side was closed (and, for ChanEnd, everything was delivered and acked)
CHAN_CLOSED = 1
#: the lease was released: nothing more is delivered
CHAN_RELEASED = 2
#: no such lease in this runtime
CHAN_UNKNOWN = 3
#: the Broadcast subscription was closed
CHAN_UNSUBSCRIBED = 4


class ChanSend(_Msg, frozen=True):
    """A sender's message for lease ``lease``; answered by a ChanAck covering ``seq``."""

    lease: int
    seq: int
    data: bytes


class ChanClose(_Msg, frozen=True):
    """Close the sending side of ``lease``; answered by ChanReply ``nonce``."""

    lease: int
    nonce: int


class ChanPull(_Msg, frozen=True):
    """A receiver of subscription ``sub``: ack ``acks``, return ``nacks`` for redelivery,
    and hold at most ``window`` unacked messages (0: send me nothing more)."""

    lease: int
    sub: int
    window: int
    acks: list[int] = []
    nacks: list[int] = []


class ChanSubscribe(_Msg, frozen=True):
    """Add Broadcast subscription ``sub`` to ``lease``; answered by ChanReply ``nonce``."""

    lease: int
    sub: int
    nonce: int


class ChanDetach(_Msg, frozen=True):
    """A receiver is done: ack ``acks``, redeliver what else it holds, and with
    ``unsubscribe`` end its Broadcast subscription; answered by ChanReply ``nonce`` (0: no answer)."""

    lease: int
    sub: int
    nonce: int
    acks: list[int] = []
    unsubscribe: bool = False


class ChanAck(_Msg, frozen=True):
    """Sends up to ``seq`` were queued (``status`` CHAN_OK), or refused from ``seq`` on."""

    lease: int
    seq: int
    status: int = CHAN_OK


class ChanDeliver(_Msg, frozen=True):
    """Messages ``ids[i]`` with values ``data[i]`` for a receiver of (``lease``, ``sub``)."""

    lease: int
    sub: int
    ids: list[int]
    data: list[bytes]


class ChanEnd(_Msg, frozen=True):
    """Subscription ``sub`` of ``lease`` ended for ``reason`` (a CHAN_* status)."""

    lease: int
    sub: int
    reason: int


class ChanReply(_Msg, frozen=True):
    """The answer to the request ``nonce`` (ChanClose, ChanSubscribe, ChanDetach)."""

    lease: int
    nonce: int
    status: int = CHAN_OK


class ChanPing(_Msg, frozen=True):
    """Is this receiver still there? (a send to a closed end fails at the broker)."""

    lease: int


ChannelRequest = Union[ChanSend, ChanClose, ChanPull, ChanSubscribe, ChanDetach]
ChannelReply = Union[ChanAck, ChanDeliver, ChanEnd, ChanReply, ChanPing]

InboxMessage = Union[Welcome, Call, Chunk, Stop, SpawnActor, ActorCall, StopActor, SaveActor]
ControlMessage = Union[Sync, Terminate, Shutdown, Heartbeat, InspectRequest, Reclaim]
DriverMessage = Union[
    Hello, Ready, Results, Retire, Goodbye, ActorEvent, ActorState, InspectReply, InspectQuery, Alive, Reclaimed
]
ClientMessage = Union[InspectAnswer]
