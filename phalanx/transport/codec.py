"""Encoding and decoding of wire messages and user payloads.

Runs in the driver and in every worker. One encoder, one decoder per socket
role; decoders only accept the messages that socket may carry, so a frame of
the wrong kind is a :class:`~phalanx.errors.ProtocolError`, never a crash.

Tasks (``Call``, ``Chunk``, ``ActorCall``) and ``Results`` are encoded with
large numpy arrays in shared-memory segments while
:func:`phalanx.transport.shm.threshold` is set (a driver with only local
workers, a local worker); everything else, channel messages included, carries
arrays inline.

Invariant kept: a value msgspec cannot encode raises
:class:`~phalanx.errors.EncodeError` (a ``TypeError``) *before* anything is
sent, and nothing here unpickles unless its caller, a local pipe's end
(``local_pickle``), asks for it: every decoder of tcp frames refuses a pickle.

User values keep their Python types without annotations (:func:`pack`):
tuples, sets, frozensets, ints beyond 64 bits and numpy scalars travel as
msgpack extension records. Plain data (ints, strings, lists and dicts of
them) is left as it is and pays one type test per value, and a C-level
scan of a list's or dict's items (see :func:`_plain_items`).
"""

from __future__ import annotations

import concurrent.futures.process
import gc
import operator
import pickle
import sys
import traceback as _tb
import types
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from ..errors import (
    DecodeError,
    EncodeError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
)
from . import shm as _shm
from .messages import (
    ActorCall,
    ActorEvent,
    ActorState,
    Call,
    Chunk,
    ChannelReply,
    ChannelRequest,
    ClientMessage,
    Chunk,
    ControlMessage,
    DriverMessage,
    ErrorInfo,
    Err,
    InboxMessage,
    Ok,
    Outcome,
    Results,
    SpawnActor,
)

__all__ = [
    "encode",
    "encode_error",
    "decode_inbox",
    "inbox_decoder",
    "driver_decoder",
    "DECODE_ERRORS",
    "decode_control",
    "decode_driver",
    "decode_client",
    "convert",
    "error_info",
    "rebuild_error",
    "distrust_exits",
    "type_path",
    "register_ext",
    "decode_broker",
    "decode_channel",
    "decode_value",
    "pack",
    "pack_message",
    "encode_value",
    "PICKLE_EXT",
    "PickleFailed",
    "UnpickleFailed",
    "salvage_inbox",
    "salvage_results",
]

T = TypeVar("T")

# Extension types: values msgpack has no type for (channel ends, arrays) travel as
# msgpack ``Ext`` records, so they arrive as themselves whatever the receiving
# side's annotation (an ``Any`` argument too). The hooks run only for such
# values: plain data never pays for them.
_EXT_ENCODE: dict[type, tuple[int, Callable[[Any], bytes]]] = {}
_EXT_DECODE: dict[int, Callable[[memoryview], Any]] = {}


def register_ext(code: int, cls: type, to_bytes: Callable[[Any], bytes], from_bytes: Callable[[memoryview], Any]) -> None:
    """Carry instances of ``cls`` as msgpack extension ``code`` (0-127, unique).

    ``to_bytes`` must be safe to call on any instance and ``from_bytes`` on
    any bytes from the wire: it raises ``ValueError`` for a malformed payload,
    which becomes a :class:`~phalanx.errors.ProtocolError`. Never pickle.
    """
    if not 0 <= code <= 127:
        raise ValueError(f"extension codes are 0-127, got {code}")
    known = _EXT_DECODE.get(code)
    if known is not None and known is not from_bytes:
        raise ValueError(f"extension code {code} is already registered")
    _EXT_ENCODE[cls] = (code, to_bytes)
    _EXT_DECODE[code] = from_bytes


#: extension code of numpy arrays (phalanx.transport.buffers, imported on first use)
NDARRAY_EXT = 16
#: extension codes of Python values msgpack would turn into something else (:func:`pack`)
TUPLE_EXT, SET_EXT, FROZENSET_EXT, BIGINT_EXT, NPSCALAR_EXT = 17, 18, 19, 20, 21
#: a cloudpickle payload: made and accepted only on a local pipe with ``local_pickle``
PICKLE_EXT = 22
#: every extension code on the wire, by name (a test checks that they are distinct)
EXT_CODES = {
    "ndarray": NDARRAY_EXT, "tuple": TUPLE_EXT, "set": SET_EXT, "frozenset": FROZENSET_EXT,
    "bigint": BIGINT_EXT, "numpy scalar": NPSCALAR_EXT, "pickle": PICKLE_EXT, "shared-memory array": _shm.SHM_NDARRAY,
}


def _ndarray_from_bytes(data: memoryview) -> Any:
    from .buffers import ndarray_from_bytes

    return ndarray_from_bytes(data)


def _enc_hook(value: Any) -> Any:
    return _hook(value, False)


def _enc_hook_shm(value: Any) -> Any:
    return _hook(value, True)


def _hook(value: Any, shm: bool) -> Any:
    for cls in type(value).__mro__:
        entry = _EXT_ENCODE.get(cls)
        if entry is not None:
            code, to_bytes = entry
            return msgspec.msgpack.Ext(code, to_bytes(value))
    if type(value).__module__ == "numpy":
        import numpy

        from .buffers import ndarray_to_bytes

        if isinstance(value, numpy.ndarray):
            if shm and value.nbytes >= _shm.threshold() > 0 and value.dtype.kind in _SHM_KINDS \
                    and value.dtype.fields is None:
                record = _shm.write_array(value)
                if record is not None:
                    return msgspec.msgpack.Ext(_shm.SHM_NDARRAY, record)
            return msgspec.msgpack.Ext(NDARRAY_EXT, ndarray_to_bytes(value))
        if isinstance(value, numpy.generic):  # a numpy scalar: as a 0-d array, read back as a scalar
            return msgspec.msgpack.Ext(NPSCALAR_EXT, ndarray_to_bytes(numpy.asarray(value)))
    raise TypeError(f"Encoding objects of type {type(value).__name__} is unsupported")


def _npscalar_from_bytes(data: memoryview) -> Any:
    from .buffers import ndarray_from_bytes

    array = ndarray_from_bytes(data)
    if array.ndim != 0:
        raise ValueError("a numpy scalar record holds an array")
    return array[()]


def _bigint_from_bytes(data: memoryview) -> int:
    return int.from_bytes(data, "little", signed=True)


class UnpickleFailed(DecodeError, concurrent.futures.process.BrokenProcessPool):
    """A pickle from a local pipe did not load (its error is the ``__cause__``).

    The frame is well formed: the task or result it carries fails with this
    error (see :func:`salvage_inbox`, :func:`salvage_results`), it is not bad input.
    Also a ``BrokenProcessPool``: what ``ProcessPoolExecutor`` raises for a
    task or result that fails to load on the other side (there, the pool breaks;
    here, only that task fails).
    """


class PickleFailed(EncodeError, pickle.PicklingError):
    """A value could not be pickled for a local pipe (``local_pickle``; its error is the ``__cause__``).

    Also a ``pickle.PicklingError``, as ``ProcessPoolExecutor`` reports it.
    """


class _Pickle:
    """A pickle left unread (:func:`salvage_results`)."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = bytes(data)


def _unpickle(data: bytes | memoryview) -> Any:
    try:
        return pickle.loads(data)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: B036 - a pickle may exit (SystemExit) as it loads: that value's failure
        raise UnpickleFailed(f"a pickled value failed to load: {type(exc).__name__}: {exc}") from exc


def _make_ext_hook(unpickle: bool | None) -> Callable[[int, memoryview], Any]:
    """The ext hook of a decoder; ``unpickle``: it reads pickles (a local pipe's end only;
    None: leaves them unread, as :class:`_Pickle`)."""
    inner: msgspec.msgpack.Decoder[Any]

    def ext_hook(code: int, data: memoryview) -> Any:
        try:
            if code == TUPLE_EXT:
                return tuple(inner.decode(data))
            if code == SET_EXT:
                return set(inner.decode(data))
            if code == FROZENSET_EXT:
                return frozenset(inner.decode(data))
            if code == PICKLE_EXT:
                if unpickle is None:
                    return _Pickle(data)
                if not unpickle:
                    raise ValueError("a pickled value: refused (local_pickle reads pickles from local pipes only)")
                return _unpickle(data)
            from_bytes = _EXT_DECODE.get(code)
            if from_bytes is None:
                raise ValueError(f"unknown extension type {code}")
            return from_bytes(data)
        except ValueError:
            raise
        except Exception as exc:  # a malformed payload must never escape as anything else
            raise ValueError(f"malformed extension {code}: {exc}") from None

    inner = msgspec.msgpack.Decoder(ext_hook=ext_hook)
    return ext_hook


_EXT_DECODE[NDARRAY_EXT] = _ndarray_from_bytes
_EXT_DECODE[_shm.SHM_NDARRAY] = _shm.read_array
_EXT_DECODE[NPSCALAR_EXT] = _npscalar_from_bytes
_EXT_DECODE[BIGINT_EXT] = _bigint_from_bytes
_ext_hook = _make_ext_hook(False)
_ext_hook_unpickle = _make_ext_hook(True)
_ext_hook_unread = _make_ext_hook(None)
_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
# Tasks and results between a driver and its local workers: large arrays through
# shared memory (phalanx.transport.shm), only while shm.threshold() is set.
_shm_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook_shm)
_SHM_MESSAGES = frozenset({Call, Chunk, ActorCall, Results})
_SHM_KINDS = frozenset("biufcmM?")
_inbox = msgspec.msgpack.Decoder(InboxMessage, ext_hook=_ext_hook)
_control = msgspec.msgpack.Decoder(ControlMessage, ext_hook=_ext_hook)
_driver = msgspec.msgpack.Decoder(DriverMessage, ext_hook=_ext_hook)
_client = msgspec.msgpack.Decoder(ClientMessage, ext_hook=_ext_hook)
# Decoders of a local pipe's frames when its runtime has ``local_pickle``: they also unpickle.
_inbox_unpickle = msgspec.msgpack.Decoder(InboxMessage, ext_hook=_ext_hook_unpickle)
_driver_unpickle = msgspec.msgpack.Decoder(DriverMessage, ext_hook=_ext_hook_unpickle)
_inbox_unread = msgspec.msgpack.Decoder(InboxMessage, ext_hook=_ext_hook_unread)
_driver_unread = msgspec.msgpack.Decoder(DriverMessage, ext_hook=_ext_hook_unread)
# Channel frames carry user values as opaque bytes: neither decoder runs extension hooks.
_broker = msgspec.msgpack.Decoder(ChannelRequest)
_channel = msgspec.msgpack.Decoder(ChannelReply)


def _value_ext_hook(code: int, data: memoryview) -> Any:
    if code == _shm.SHM_NDARRAY:  # channel messages never name segments
        raise ValueError(f"unknown extension type {code}")
    return _ext_hook(code, data)


_value = msgspec.msgpack.Decoder(ext_hook=_value_ext_hook)


# --------------------------------------------------------------------------- #
# User values as Python made them
# --------------------------------------------------------------------------- #

#: types msgpack carries exactly (a big int fails to encode and takes the slow path)
_ATOMS = frozenset({int, str, float, bool, type(None), bytes, msgspec.msgpack.Ext})
_SEQ_EXT: dict[type, int] = {tuple: TUPLE_EXT, set: SET_EXT, frozenset: FROZENSET_EXT}
#: what arrives as itself under local_pickle without a pickle (the rest is pickled there)
_EXACT = _ATOMS | {list, dict, tuple, set, frozenset}


def pack(value: Any, pickled: bool = False) -> Any:
    """``value`` with what msgpack would change made an extension record.

    Tuples, sets and frozensets become records (their items packed too);
    lists and dicts are copied only if they hold such values. ``pickled``
    (``local_pickle``, a local worker only): any other object msgspec would
    not return as itself (a function, a class, a dataclass instance...) is
    a cloudpickle record. Returns ``value`` itself when nothing changes.
    """
    t = type(value)
    if t in _ATOMS:
        return value
    if t is list:
        if _plain_items(value, pickled):
            return value
        out = [pack(x, pickled) for x in value]
        return value if all(map(_same, out, value)) else out
    if t is dict:
        if _plain_items(value, pickled):
            return value
        items = {k: pack(x, pickled) for k, x in value.items()}
        return value if all(map(_same, items.values(), value.values())) else items
    code = _SEQ_EXT.get(t)
    if code is not None:
        return msgspec.msgpack.Ext(code, _encode_plain([pack(x, pickled) for x in value]))
    if pickled and t not in _EXACT and t not in _EXT_ENCODE and t.__module__ != "numpy":
        return msgspec.msgpack.Ext(PICKLE_EXT, _pickle(value))
    return value


#: above this many items, a list or dict is scanned by reference, not by type (see _plain_items)
SCAN_BY_TYPE = 64


def _plain_items(value: list[Any] | dict[Any, Any], pickled: bool) -> bool:
    """Whether no item of a list (no value of a dict) needs packing, checked in C.

    Up to :data:`SCAN_BY_TYPE` items, by the set of their types (exact, about
    15 ns an item). Beyond, by what the items refer to (about 2 ns an item,
    so that large plain data costs next to nothing): an item that refers to
    nothing is a plain value, or an *empty* tuple or set, which that scan
    cannot tell from one (it then arrives as an empty list; the limit the
    docs state). Under ``pickled``, always by type: any object is pickled.
    """
    items = value if type(value) is list else value.values()  # type: ignore[union-attr]
    if pickled or len(value) <= SCAN_BY_TYPE:
        return _ATOMS.issuperset(map(type, items))
    return not gc.get_referents(*items)


def _same(a: Any, b: Any) -> bool:
    return a is b


def _pickle(value: Any) -> bytes:
    try:
        import cloudpickle  # type: ignore[import-untyped]
    except ImportError:
        raise EncodeError("local_pickle needs cloudpickle: pip install 'phalanx[pickle]'") from None
    try:
        return cloudpickle.dumps(value)  # type: ignore[no-any-return,unused-ignore]
    except Exception as exc:
        raise PickleFailed(f"cannot pickle {type(value).__name__}: {exc}") from exc


def _encode_shm(msg: Any) -> bytes:
    """``msg`` with its large arrays in shared-memory segments; a failed attempt removes
    the segments it wrote (a plain call and no context manager: this runs per task)."""
    try:
        try:
            frame = _shm_encoder.encode(msg)
        except OverflowError:
            _shm.discard_written()
            frame = _shm_encoder.encode(_bigints(msg))
    except BaseException:
        _shm.discard_written()
        raise
    _shm.keep_written()
    return frame


def _encode_plain(value: Any) -> bytes:
    try:
        return _encoder.encode(value)
    except OverflowError:
        return _encoder.encode(_bigints(value))


def _bigints(value: Any) -> Any:
    """``value`` with every int beyond 64 bits as a record (the rare path: encoding overflowed)."""
    t = type(value)
    if t is int:
        if -(2**63) <= value < 2**64:
            return value
        return msgspec.msgpack.Ext(BIGINT_EXT, value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True))
    if t is list:
        return [_bigints(x) for x in value]
    if t is tuple:  # a message's own tuples (a user's are records already)
        return tuple(_bigints(x) for x in value)
    if t is dict:
        return {_bigints(k): _bigints(x) for k, x in value.items()}
    if isinstance(value, msgspec.Struct):
        fields = {f: _bigints(getattr(value, f)) for f in value.__struct_fields__}
        return msgspec.structs.replace(value, **fields)
    return value


def _pack_args(msg: Any, pickled: bool) -> Any:
    atoms = _ATOMS
    args = msg.args
    for a in args:  # a loop: calls have few arguments
        if type(a) not in atoms:
            args = [pack(a, pickled) for a in args]
            break
    kwargs = msg.kwargs
    if kwargs:
        for v in kwargs.values():
            if type(v) not in atoms:
                kwargs = {k: pack(v, pickled) for k, v in kwargs.items()}
                break
    if args is msg.args and kwargs is msg.kwargs:
        return msg
    return msgspec.structs.replace(msg, args=args, kwargs=kwargs)


def _pack_items(msg: Chunk, pickled: bool) -> Chunk:
    items = pack(msg.items, pickled)
    return msg if items is msg.items else msgspec.structs.replace(msg, items=items)


_value_of = operator.attrgetter("value")


def _plain_results(msg: Results) -> bool:
    """Every outcome an ``Ok`` of a plain value (checked in C)."""
    try:
        return _ATOMS.issuperset(map(type, map(_value_of, msg.outcomes)))
    except AttributeError:
        return False  # an Err among them


def _pack_results(msg: Results, pickled: bool) -> Results:
    outcomes = msg.outcomes
    if _plain_results(msg):
        return msg
    changed: list[Outcome] | None = None
    for i, outcome in enumerate(outcomes):
        if type(outcome) is Ok:
            value = outcome.value
            if type(value) in _ATOMS:
                continue
            packed = pack(value, pickled)
            if packed is value:
                continue
            fixed: Outcome = msgspec.structs.replace(outcome, value=packed)
        elif isinstance(outcome, Err) and outcome.partial:
            packed = pack(outcome.partial, pickled)
            if packed is outcome.partial:
                continue
            fixed = msgspec.structs.replace(outcome, partial=packed)
        else:
            continue
        if changed is None:
            changed = list(outcomes)
        changed[i] = fixed
    return msg if changed is None else msgspec.structs.replace(msg, outcomes=changed)


#: messages whose packer returns them unchanged only when every argument is a plain value
_ARGS_MESSAGES = frozenset({Call, ActorCall, SpawnActor})
#: messages carrying user values, and how to pack them
_PACKERS: dict[type, Callable[[Any, bool], Any]] = {
    Call: _pack_args, ActorCall: _pack_args, SpawnActor: _pack_args, Chunk: _pack_items, Results: _pack_results,
}


def pack_message(msg: Any, pickled: bool) -> Any:
    """``msg`` with its user values packed (:func:`pack`), so that encoding it again,
    for a retry, needs no flag and pickles nothing twice."""
    packer = _PACKERS.get(type(msg))
    return msg if packer is None else packer(msg, pickled)


def encode(msg: Any, what: str = "message", name: str = "", pickled: bool = False) -> bytes:
    """Encode ``msg`` to msgpack, or raise :class:`EncodeError` naming ``what``.

    ``what`` may contain ``{}``, filled with ``name`` only on failure (so the
    hot path builds no message). The user values of a task, a result or an
    actor call are packed first (:func:`pack`); ``pickled``: the frame goes
    to a local pipe of a ``local_pickle`` runtime.
    """
    try:
        kind = type(msg)
        # The common messages, checked in C: a (actor) call of plain positional arguments, results of
        # plain values. Nothing to pack, no array for shared memory: msgspec encodes them as is.
        if kind is Call or kind is ActorCall:
            plain = not msg.kwargs and _ATOMS.issuperset(map(type, msg.args))
        elif kind is Results:
            try:
                plain = _ATOMS.issuperset(map(type, map(_value_of, msg.outcomes)))
            except AttributeError:
                plain = False  # an Err among them
        else:
            plain = False
        if plain:
            try:
                return _encoder.encode(msg)
            except OverflowError:
                return _encoder.encode(_bigints(msg))
        packer = _PACKERS.get(kind)
        if packer is not None:
            packed = packer(msg, pickled)
            if packed is msg and kind in _ARGS_MESSAGES:
                return _encode_plain(msg)  # every argument plain (_pack_args kept the message)
            msg = packed
        if type(msg) in _SHM_MESSAGES and _shm.threshold():
            return _encode_shm(msg)
        return _encode_plain(msg)
    except EncodeError as exc:  # from pack: a value that could not be pickled
        kind = PickleFailed if isinstance(exc, PickleFailed) else EncodeError  # a PicklingError stays one
        raise kind(f"cannot encode {what.format(name) if name else what}: {exc}") from exc.__cause__
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise encode_error(exc, what.format(name) if name else what) from exc


def encode_value(value: Any, what: str) -> bytes:
    """Encode one user value (a channel message) as :func:`pack` makes it, or raise EncodeError."""
    try:
        value = pack(value)
    except RecursionError as exc:
        raise encode_error(exc, what) from exc
    return encode(value, what)


def encode_error(exc: BaseException, what: str) -> EncodeError:
    """The :class:`EncodeError` for ``exc`` raised while encoding ``what``.

    A ``RecursionError`` (a value that contains itself or nests deeper than
    the interpreter's recursion limit) is said so, not passed on.
    """
    if isinstance(exc, RecursionError):
        return EncodeError(f"cannot encode {what}: the value nests too deep or contains itself ({exc})")
    return EncodeError(f"cannot encode {what}: {exc}")


#: what decoding a malformed frame raises (bad input: counted, never fatal)
DECODE_ERRORS = (msgspec.DecodeError, TypeError, ValueError, RecursionError)


def _decode(decoder: msgspec.msgpack.Decoder[Any], frame: bytes | memoryview) -> Any:
    try:
        return decoder.decode(frame)
    except DECODE_ERRORS as exc:
        cause = exc if isinstance(exc, UnpickleFailed) else None  # not bad input: see salvage_*
        raise ProtocolError(f"malformed frame ({len(frame)} bytes): {exc}") from cause


def salvage_inbox(frame: bytes | memoryview) -> InboxMessage | None:
    """A local pipe's task whose pickle failed to load, read without its pickles (None: not even that).

    The worker answers it with the loading error, as the task's failure.
    """
    try:
        return _inbox_unread.decode(frame)
    except Exception:
        return None


def salvage_results(frame: bytes | memoryview) -> Results | None:
    """A local pipe's Results where some pickle failed to load: each such value becomes that task's error."""
    try:
        msg = _driver_unread.decode(frame)
    except Exception:
        return None
    if not isinstance(msg, Results):
        return None
    outcomes: list[Outcome] = []
    for outcome in msg.outcomes:
        try:
            if isinstance(outcome, Ok):
                outcome = msgspec.structs.replace(outcome, value=_load_all(outcome.value))
            elif outcome.partial:
                outcome = msgspec.structs.replace(outcome, partial=_load_all(outcome.partial))
        except UnpickleFailed as exc:
            exc.__suppress_context__ = True  # the frame's first, failed, decode is no part of it
            outcome = Err(outcome.job, outcome.seq, outcome.attempt, error_info(exc))
        outcomes.append(outcome)
    return msgspec.structs.replace(msg, outcomes=outcomes)


def _load_all(value: Any) -> Any:
    """``value`` with every unread pickle loaded (the failure path only)."""
    t = type(value)
    if t is _Pickle:
        return _unpickle(value.data)
    if t in (list, tuple, set, frozenset):
        return t(_load_all(x) for x in value)
    if t is dict:
        return {_load_all(k): _load_all(x) for k, x in value.items()}
    return value


def decode_inbox(frame: bytes | memoryview, unpickle: bool = False) -> InboxMessage:
    """Decode a frame received on a worker's inbox (``unpickle``: a local pipe under local_pickle)."""
    return _decode(_inbox_unpickle if unpickle else _inbox, frame)  # type: ignore[no-any-return]


def inbox_decoder(unpickle: bool = False) -> Callable[[bytes | memoryview], InboxMessage]:
    """:func:`decode_inbox` without its wrapper, for a worker's hot path: a malformed frame
    raises one of :data:`DECODE_ERRORS` (an :class:`UnpickleFailed` among them), not ProtocolError."""
    return (_inbox_unpickle if unpickle else _inbox).decode


def driver_decoder(unpickle: bool = False) -> Callable[[bytes | memoryview], DriverMessage]:
    """:func:`decode_driver` without its wrapper, for a caller reading its reply: a malformed
    frame raises one of :data:`DECODE_ERRORS` (an :class:`UnpickleFailed` among them), not ProtocolError."""
    return (_driver_unpickle if unpickle else _driver).decode


def decode_control(frame: bytes | memoryview) -> ControlMessage:
    """Decode a frame received on a worker's control SUB socket."""
    return _decode(_control, frame)  # type: ignore[no-any-return]


def decode_driver(frame: bytes | memoryview, unpickle: bool = False) -> DriverMessage:
    """Decode a frame received on the driver's results ROUTER (``unpickle``: a local pipe under local_pickle)."""
    return _decode(_driver_unpickle if unpickle else _driver, frame)  # type: ignore[no-any-return]


def decode_client(frame: bytes | memoryview) -> ClientMessage:
    """Decode a frame a client (``phalanx top``) received from the driver."""
    return _decode(_client, frame)  # type: ignore[no-any-return]


def decode_broker(frame: bytes | memoryview) -> ChannelRequest:
    """Decode a frame a channel end sent to the driver's broker."""
    return _decode(_broker, frame)  # type: ignore[no-any-return]


def decode_channel(frame: bytes | memoryview) -> ChannelReply:
    """Decode a frame a channel end received from the broker."""
    return _decode(_channel, frame)  # type: ignore[no-any-return]


def decode_value(data: bytes | memoryview) -> Any:
    """Decode one user value made by :func:`encode` (a channel message), or raise DecodeError."""
    try:
        return _value.decode(data)
    except (msgspec.DecodeError, TypeError, ValueError, RecursionError) as exc:
        raise DecodeError(f"undecodable channel message ({len(data)} bytes): {exc}") from None


def convert(value: Any, typ: Any) -> Any:
    """Convert plain decoded data to ``typ`` (``Any`` and ``object`` pass)."""
    if typ is Any or typ is object:
        return value
    return msgspec.convert(value, typ)


def type_path(cls: type) -> str:
    """``module:qualname`` of a class, with the spawned ``__mp_main__`` as ``__main__``."""
    module = cls.__module__
    if module == "__mp_main__":
        module = "__main__"
    return f"{module}:{cls.__qualname__}"


def error_info(exc: BaseException) -> ErrorInfo:
    """The wire form of ``exc``: type path, message, args if encodable, traceback."""
    args: list[Any] | None = list(exc.args)
    state: dict[str, Any] | None = None
    try:
        reduced = exc.__reduce__()
        if isinstance(reduced, tuple) and len(reduced) >= 2 and reduced[0] is type(exc):
            args = list(reduced[1])
            if len(reduced) >= 3 and isinstance(reduced[2], dict) and reduced[2]:
                state = dict(reduced[2])
    except Exception:
        pass
    try:
        _encoder.encode(args)
    except Exception:
        args = None
    if state is not None:
        try:
            _encoder.encode(state)
        except Exception:
            state = None
    text = "".join(_tb.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {type(exc).__name__}>"
    return ErrorInfo(type=type_path(type(exc)), message=message, args=args, traceback=text, state=state)


_CONTROL_FLOW = (StopIteration, StopAsyncIteration)
#: the only exceptions that are not ``Exception`` rebuilt as themselves: what a task may raise to end
#: or interrupt a program, which ``ProcessPoolExecutor`` also raises at ``result()``
_EXITS: dict[str, type[BaseException]] = {"builtins:SystemExit": SystemExit,
                                          "builtins:KeyboardInterrupt": KeyboardInterrupt}


#: marks, in its ``state``, an exit a network peer named (:func:`distrust_exits`)
_UNTRUSTED = "__phalanx_untrusted__"


def _distrusted(info: ErrorInfo) -> ErrorInfo:
    return msgspec.structs.replace(info, state={**(info.state or {}), _UNTRUSTED: True})


def distrust_exits(msg: DriverMessage) -> DriverMessage:
    """``msg`` as received from the network (not a local worker's pipe), any ``SystemExit`` or
    ``KeyboardInterrupt`` it names marked so that :func:`rebuild_error` gives a ``RemoteError``.

    A local worker runs code this driver sent, so its exit is the task's, as under
    ``ProcessPoolExecutor``; a host on the network must not make a caller's
    ``result()`` raise ``SystemExit``. Returns ``msg`` itself when it names none.
    """
    if isinstance(msg, Results):
        exits = _EXITS
        if not any(type(o) is Err and o.error.type in exits for o in msg.outcomes):
            return msg
        outcomes: list[Outcome] = [
            msgspec.structs.replace(o, error=_distrusted(o.error)) if type(o) is Err and o.error.type in exits else o
            for o in msg.outcomes]
        return msgspec.structs.replace(msg, outcomes=outcomes)
    if isinstance(msg, (ActorEvent, ActorState)) and msg.error is not None and msg.error.type in _EXITS:
        return msgspec.structs.replace(msg, error=_distrusted(msg.error))
    return msg


def _resolve_type(path: str) -> type[BaseException] | None:
    """The exception class ``module:qualname`` names, looked up without running any code.

    Only modules the driver already imported count (``sys.modules``): a peer
    naming a module must never make the driver import it. The walk reads the
    module's and classes' own ``__dict__`` (no ``getattr``: no module
    ``__getattr__``, property or descriptor runs).
    """
    exit_type = _EXITS.get(path)
    if exit_type is not None:
        return exit_type
    module_name, _, qualname = path.partition(":")
    module = sys.modules.get(module_name)
    if module is None or not qualname:
        return None
    obj: Any = module
    for part in qualname.split("."):
        if obj is not module and not isinstance(obj, type):
            return None
        try:
            namespace = object.__getattribute__(obj, "__dict__")
        except AttributeError:
            return None
        obj = namespace.get(part) if isinstance(namespace, (dict, types.MappingProxyType)) else None
        if obj is None:
            return None
    # StopIteration raised by a rebuilding iterator would end it silently, as if complete.
    if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, _CONTROL_FLOW):
        return obj
    return None


def rebuild_error(info: ErrorInfo) -> BaseException:
    """Rebuild a remote exception as its own type when the driver has that type.

    The type is looked up only in modules already imported here (nothing is
    imported on a peer's word), and must be an ``Exception``, or exactly the
    builtin ``SystemExit`` or ``KeyboardInterrupt`` from a local worker (a
    task that exits or is interrupted fails with that exception, as under
    ``ProcessPoolExecutor``; it is raised only where the caller asks for the
    result; from a host on the network, see :func:`distrust_exits`). A remote
    ``GeneratorExit`` or subclass of those two is never raised as such, nor a
    ``StopIteration`` (it would end a ``map`` iteration as if it were
    complete). Anything else, or a constructor that fails (with any
    exception) or returns something that is not an instance of the type it
    was looked up as, gives a :class:`~phalanx.errors.RemoteError`
    carrying the type's name and the remote traceback. The result carries the
    remote traceback as ``__cause__``. Never raises.
    """
    exc: BaseException | None = None
    cls = _resolve_type(info.type)
    if cls is not None and info.state and info.state.get(_UNTRUSTED) is True and not issubclass(cls, Exception):
        cls = None  # an exit a host on the network named (distrust_exits)
    if cls is not None:
        try:
            built = cls(*info.args) if info.args is not None else cls(info.message)
            if issubclass(type(built), Exception) or type(built) is cls:  # type(): an object cannot pretend
                exc = built
                if info.state:
                    built.__dict__.update(info.state)
        except BaseException:  # noqa: B036 - a hostile constructor may raise SystemExit too
            pass
    if exc is None:
        exc = RemoteError(info.type, info.message, info.traceback)
    exc.__cause__ = RemoteTraceback(info.traceback)
    return exc
