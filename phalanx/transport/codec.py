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
sent, and nothing here ever unpickles.
"""

from __future__ import annotations

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
    Call,
    ChannelReply,
    ChannelRequest,
    ClientMessage,
    Chunk,
    ControlMessage,
    DriverMessage,
    ErrorInfo,
    InboxMessage,
    Results,
)

__all__ = [
    "encode",
    "encode_error",
    "decode_inbox",
    "decode_control",
    "decode_driver",
    "decode_client",
    "convert",
    "error_info",
    "rebuild_error",
    "type_path",
    "register_ext",
    "decode_broker",
    "decode_channel",
    "decode_value",
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
        if isinstance(value, numpy.generic):  # a numpy scalar: its Python value
            return value.item()
    raise TypeError(f"Encoding objects of type {type(value).__name__} is unsupported")


def _ext_hook(code: int, data: memoryview) -> Any:
    from_bytes = _EXT_DECODE.get(code)
    if from_bytes is None:
        raise ValueError(f"unknown extension type {code}")
    try:
        return from_bytes(data)
    except ValueError:
        raise
    except Exception as exc:  # a malformed payload must never escape as anything else
        raise ValueError(f"malformed extension {code}: {exc}") from None


_EXT_DECODE[NDARRAY_EXT] = _ndarray_from_bytes
_EXT_DECODE[_shm.SHM_NDARRAY] = _shm.read_array
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
# Channel frames carry user values as opaque bytes: neither decoder runs extension hooks.
_broker = msgspec.msgpack.Decoder(ChannelRequest)
_channel = msgspec.msgpack.Decoder(ChannelReply)


def _value_ext_hook(code: int, data: memoryview) -> Any:
    if code == _shm.SHM_NDARRAY:  # channel messages never name segments
        raise ValueError(f"unknown extension type {code}")
    return _ext_hook(code, data)


_value = msgspec.msgpack.Decoder(ext_hook=_value_ext_hook)


def encode(msg: Any, what: str = "message", name: str = "") -> bytes:
    """Encode ``msg`` to msgpack, or raise :class:`EncodeError` naming ``what``.

    ``what`` may contain ``{}``, filled with ``name`` only on failure (so the
    hot path builds no message).
    """
    try:
        if type(msg) in _SHM_MESSAGES and _shm.threshold():
            with _shm.writing():
                return _shm_encoder.encode(msg)
        return _encoder.encode(msg)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise encode_error(exc, what.format(name) if name else what) from exc


def encode_error(exc: BaseException, what: str) -> EncodeError:
    """The :class:`EncodeError` for ``exc`` raised while encoding ``what``.

    A ``RecursionError`` (a value that contains itself or nests deeper than
    the interpreter's recursion limit) is said so, not passed on.
    """
    if isinstance(exc, RecursionError):
        return EncodeError(f"cannot encode {what}: the value nests too deep or contains itself ({exc})")
    return EncodeError(f"cannot encode {what}: {exc}")


def _decode(decoder: msgspec.msgpack.Decoder[Any], frame: bytes | memoryview) -> Any:
    try:
        return decoder.decode(frame)
    except (msgspec.DecodeError, TypeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"malformed frame ({len(frame)} bytes): {exc}") from None


def decode_inbox(frame: bytes | memoryview) -> InboxMessage:
    """Decode a frame received on a worker's inbox."""
    return _decode(_inbox, frame)  # type: ignore[no-any-return]


def decode_control(frame: bytes | memoryview) -> ControlMessage:
    """Decode a frame received on a worker's control SUB socket."""
    return _decode(_control, frame)  # type: ignore[no-any-return]


def decode_driver(frame: bytes | memoryview) -> DriverMessage:
    """Decode a frame received on the driver's results ROUTER."""
    return _decode(_driver, frame)  # type: ignore[no-any-return]


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


def _resolve_type(path: str) -> type[BaseException] | None:
    """The exception class ``module:qualname`` names, looked up without running any code.

    Only modules the driver already imported count (``sys.modules``): a peer
    naming a module must never make the driver import it. The walk reads the
    module's and classes' own ``__dict__`` (no ``getattr``: no module
    ``__getattr__``, property or descriptor runs).
    """
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
    imported on a peer's word), and must be an ``Exception``: a remote
    ``SystemExit``, ``KeyboardInterrupt`` or ``GeneratorExit`` is never
    raised as such, nor a ``StopIteration`` (it would end a ``map``
    iteration as if it were complete). Anything else, or a constructor that fails (with any
    exception) or returns something that is not an instance of an
    ``Exception`` type, gives a :class:`~phalanx.errors.RemoteError`
    carrying the type's name and the remote traceback. The result carries the
    remote traceback as ``__cause__``. Never raises.
    """
    exc: BaseException | None = None
    cls = _resolve_type(info.type)
    if cls is not None:
        try:
            built = cls(*info.args) if info.args is not None else cls(info.message)
            if issubclass(type(built), Exception):  # type(): an object cannot pretend
                exc = built
                if info.state:
                    built.__dict__.update(info.state)
        except BaseException:  # noqa: B036 - a hostile constructor may raise SystemExit too
            pass
    if exc is None:
        exc = RemoteError(info.type, info.message, info.traceback)
    exc.__cause__ = RemoteTraceback(info.traceback)
    return exc
