"""The wire format: every message round-trips, and no frame can crash a decoder.

Runs in the test process only (no sockets, no workers). Strategies are built
from the messages' own field annotations, so a field or message added to
:mod:`phalanx.transport.messages` is covered without editing this file (and a
field type the builder does not know fails loudly).
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Union

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import phalanx
from phalanx.transport import codec, messages

# --------------------------------------------------------------------------- #
# Families: which decoder accepts which messages
# --------------------------------------------------------------------------- #

Decoder = Callable[[Any], Any]

FAMILIES: dict[str, tuple[tuple[type[msgspec.Struct], ...], Decoder]] = {
    "inbox": (typing.get_args(messages.InboxMessage), codec.decode_inbox),
    "control": (typing.get_args(messages.ControlMessage), codec.decode_control),
    "driver": (typing.get_args(messages.DriverMessage), codec.decode_driver),
    "client": ((messages.InspectAnswer,), codec.decode_client),
    "broker": (typing.get_args(messages.ChannelRequest), codec.decode_broker),
    "channel": (typing.get_args(messages.ChannelReply), codec.decode_channel),
}

ALL_MESSAGES: list[tuple[str, type[msgspec.Struct]]] = [
    (family, cls) for family, (classes, _) in FAMILIES.items() for cls in classes
]

def _public_structs() -> list[type[msgspec.Struct]]:
    out = []
    for name in messages.__all__:
        obj = getattr(messages, name)
        if inspect.isclass(obj) and issubclass(obj, msgspec.Struct):
            out.append(obj)
    return out


def _tagged(cls: type[msgspec.Struct]) -> bool:
    return cls.__struct_config__.tag is not None


#: structs that only travel inside other messages: the untagged ones
#: (ErrorInfo, ...) and the outcomes a Results batch carries
NESTED: tuple[type[msgspec.Struct], ...] = (
    *(cls for cls in _public_structs() if not _tagged(cls)),
    *typing.get_args(messages.Outcome),
)


def test_every_message_belongs_to_exactly_one_family() -> None:
    for cls in _public_structs():
        homes = [family for family, (classes, _) in FAMILIES.items() if cls in classes]
        if cls in NESTED:
            assert homes == [], f"{cls.__name__} is nested-only but in {homes}"
        else:
            assert len(homes) == 1, f"{cls.__name__} is in families {homes}"


def test_messages_are_frozen_tagged_arrays() -> None:
    for cls in _public_structs():
        cfg = cls.__struct_config__
        assert cfg.frozen, cls
        assert cfg.array_like, cls
    for _, cls in ALL_MESSAGES:
        assert cls.__struct_config__.tag == cls.__name__, cls
    for cls in typing.get_args(messages.Outcome):
        assert cls.__struct_config__.tag == cls.__name__, cls


# --------------------------------------------------------------------------- #
# Strategies from annotations
# --------------------------------------------------------------------------- #

INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FLOAT = st.floats(allow_nan=False)

#: anything msgpack carries and msgspec decodes back equal as ``Any``
PLAIN: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | INT | FLOAT | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy of values of annotation ``tp`` that survive msgpack unchanged."""
    if tp is Any:
        return PLAIN
    if tp is type(None) or tp is None:
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return INT
    if tp is float:
        return FLOAT
    if tp is str:
        return st.text(max_size=30)
    if tp is bytes:
        return st.binary(max_size=30)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return st.one_of(*(strategy_for(a) for a in args))
    if origin is list or origin is collections.abc.Sequence:  # a Sequence field decodes as a list
        return st.lists(strategy_for(args[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=4)
    if tp is msgspec.Raw:  # a value kept encoded (ActorState.state on the driver's side)
        return PLAIN.map(lambda v: msgspec.Raw(msgspec.msgpack.encode(v)))
    if inspect.isclass(tp) and issubclass(tp, msgspec.Struct):
        fields = {f.name: strategy_for(f.type) for f in msgspec.structs.fields(tp)}
        return st.builds(tp, **fields)
    raise NotImplementedError(f"no strategy for field type {tp!r}: extend strategy_for")


def _family_of(cls: type[msgspec.Struct]) -> str:
    for family, (classes, _) in FAMILIES.items():
        if cls in classes:
            return family
    raise KeyError(cls)


def any_message() -> st.SearchStrategy[Any]:
    return st.one_of(*(strategy_for(cls) for _, cls in ALL_MESSAGES))


# --------------------------------------------------------------------------- #
# Round trips
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(("family", "cls"), ALL_MESSAGES, ids=lambda v: getattr(v, "__name__", v))
def test_round_trip(family: str, cls: type[msgspec.Struct]) -> None:
    decode = FAMILIES[family][1]

    @given(msg=strategy_for(cls))
    def check(msg: msgspec.Struct) -> None:
        frame = codec.encode(msg)
        assert isinstance(frame, bytes)
        back = decode(frame)
        assert type(back) is cls
        assert back == msg
        assert codec.encode(back) == frame
        assert decode(memoryview(frame)) == msg
        # plain msgpack, tag first: nothing but msgpack on the wire
        raw = msgspec.msgpack.decode(frame)
        assert isinstance(raw, list) and raw[0] == cls.__name__

    check()


def test_round_trip_with_defaults() -> None:
    """Messages built with only their required fields decode to equal messages."""
    samples = [
        messages.Call(1, 2, 0, "m:f", [1, "a"]),
        messages.Chunk(1, 2, 3, "m:f", [[1], [2]]),
        messages.Hello("w1", 123, "host"),
        messages.Results("w1", [messages.Ok(1, 0, 0, None)]),
        messages.Stop(),
        messages.Shutdown(),
    ]
    for msg in samples:
        decode = FAMILIES[_family_of(type(msg))][1]
        assert decode(codec.encode(msg)) == msg


# --------------------------------------------------------------------------- #
# Bad frames never escape as anything but ProtocolError
# --------------------------------------------------------------------------- #


def _decode_or_protocol_error(family: str, data: bytes) -> None:
    classes, decode = FAMILIES[family]
    try:
        msg = decode(data)
    except phalanx.ProtocolError as exc:
        assert isinstance(exc, phalanx.PhalanxError)
        assert isinstance(exc, ValueError)
    else:
        assert type(msg) in classes


@pytest.mark.parametrize("family", FAMILIES)
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_protocol_error_only(family: str, data: bytes) -> None:
    _decode_or_protocol_error(family, data)


@pytest.mark.parametrize("family", FAMILIES)
@given(msg=any_message(), data=st.data())
def test_mutated_frames_raise_protocol_error_only(family: str, msg: Any, data: st.DataObject) -> None:
    frame = bytearray(codec.encode(msg))
    how = data.draw(st.sampled_from(["truncate", "flip", "insert", "delete", "append"]))
    if how == "truncate":
        frame = frame[: data.draw(st.integers(0, max(0, len(frame) - 1)))]
    elif how == "flip" and frame:
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] ^= data.draw(st.integers(1, 255))
    elif how == "insert":
        i = data.draw(st.integers(0, len(frame)))
        frame[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    elif how == "delete" and frame:
        i = data.draw(st.integers(0, len(frame) - 1))
        del frame[i : i + data.draw(st.integers(1, 4))]
    else:
        frame += data.draw(st.binary(min_size=1, max_size=8))
    _decode_or_protocol_error(family, bytes(frame))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x91" * 200_000 + b"\xc0", id="deep-nesting"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array32-huge-length"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="map32-huge-length"),
        pytest.param(b"\xdb\xff\xff\xff\xff", id="str32-huge-length"),
        pytest.param(b"\xc6\xff\xff\xff\xff", id="bin32-huge-length"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\xd6\xff\x00\x00\x00\x00", id="timestamp-ext"),
        pytest.param(b"\xd4\x01\x00", id="unknown-ext"),
        pytest.param(msgspec.msgpack.encode(["NoSuchMessage", 1, 2]), id="unknown-tag"),
        pytest.param(msgspec.msgpack.encode([]), id="empty-array"),
        pytest.param(msgspec.msgpack.encode([1, 2, 3]), id="int-tag"),
        pytest.param(msgspec.msgpack.encode({"type": "Hello"}), id="map"),
        pytest.param(msgspec.msgpack.encode("Stop"), id="bare-string"),
        pytest.param(msgspec.msgpack.encode(["Call", 1]), id="call-missing-fields"),
        pytest.param(msgspec.msgpack.encode(["Call", "x", 0, 0, "m:f", []]), id="call-wrong-type"),
        pytest.param(msgspec.msgpack.encode(["Hello", "w", -1.5, "h"]), id="hello-float-pid"),
        pytest.param(msgspec.msgpack.encode(["Results", "w", [["Bogus", 1]]]), id="bad-outcome"),
        pytest.param(msgspec.msgpack.encode(["Terminate", "1"]), id="str-for-int"),
    ],
)
def test_known_bad_frames(family: str, frame: bytes) -> None:
    classes, decode = FAMILIES[family]
    with pytest.raises(phalanx.ProtocolError):
        decode(frame)


@pytest.mark.parametrize("family", FAMILIES)
def test_message_of_wrong_family_is_protocol_error(family: str) -> None:
    classes, decode = FAMILIES[family]
    strangers = [cls for _, cls in ALL_MESSAGES if cls not in classes] + list(NESTED)
    assert strangers
    for cls in strangers:

        @given(msg=strategy_for(cls))
        def check(msg: Any) -> None:
            with pytest.raises(phalanx.ProtocolError):
                decode(codec.encode(msg))

        check()


def test_hello_to_inbox_is_protocol_error() -> None:
    frame = codec.encode(messages.Hello("w1", 1, "h"))
    with pytest.raises(phalanx.ProtocolError):
        codec.decode_inbox(frame)
    with pytest.raises(phalanx.ProtocolError):
        codec.decode_control(frame)
    assert codec.decode_driver(frame) == messages.Hello("w1", 1, "h")


# --------------------------------------------------------------------------- #
# Encoding what msgpack cannot carry
# --------------------------------------------------------------------------- #


class _Opaque:
    pass


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(object(), id="object"),
        pytest.param(_Opaque(), id="instance"),
        pytest.param(lambda: 1, id="lambda"),
        pytest.param(1 + 2j, id="complex"),
        pytest.param({1j: 1}, id="complex-key"),
        pytest.param([1, [2, [object()]]], id="nested"),
    ],
)
def test_encode_unsupported_value_is_encode_error(value: Any) -> None:
    with pytest.raises(phalanx.EncodeError) as info:
        codec.encode(value)
    assert isinstance(info.value, TypeError)
    with pytest.raises(phalanx.EncodeError, match="the arguments of m:f"):
        codec.encode(messages.Call(1, 0, 0, "m:f", [value]), "the arguments of m:f")
    with pytest.raises(phalanx.EncodeError):
        codec.encode(messages.Ok(1, 0, 0, value))


# --------------------------------------------------------------------------- #
# Errors on the wire
# --------------------------------------------------------------------------- #


class _TwoArgs(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(a + b)


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_error_info_round_trip_rebuilds_type_and_cause() -> None:
    info = codec.error_info(_raised(KeyError("k")))
    back = codec.decode_driver(
        codec.encode(messages.Results("w1", [messages.Err(1, 2, 0, info)]))
    )
    err = codec.rebuild_error(back.outcomes[0].error)
    assert type(err) is KeyError and err.args == ("k",)
    assert isinstance(err.__cause__, phalanx.RemoteTraceback)
    assert "KeyError" in str(err.__cause__)


def test_rebuild_error_fallbacks() -> None:
    unbuildable = codec.rebuild_error(codec.error_info(_raised(_TwoArgs(1, 2))))
    assert isinstance(unbuildable, phalanx.RemoteError)
    unknown = codec.rebuild_error(messages.ErrorInfo("no_such_module:Err", "msg", ["msg"], "tb"))
    assert isinstance(unknown, phalanx.RemoteError) and unknown.message == "msg"
    not_an_exc = codec.rebuild_error(messages.ErrorInfo("builtins:len", "msg", ["msg"], "tb"))
    assert isinstance(not_an_exc, phalanx.RemoteError)
    rebuilt = codec.rebuild_error(codec.error_info(_raised(GeneratorExit())))
    assert isinstance(rebuilt, phalanx.RemoteError)
    for base in (SystemExit(1), KeyboardInterrupt()):  # as ProcessPoolExecutor gives them
        rebuilt = codec.rebuild_error(codec.error_info(_raised(base)))
        assert type(rebuilt) is type(base) and rebuilt.args == base.args, base
        assert isinstance(rebuilt.__cause__, phalanx.RemoteTraceback)
    unencodable_args = codec.error_info(_raised(ValueError(object())))
    assert unencodable_args.args is None
    codec.encode(unencodable_args)  # the wire form itself always encodes
    assert isinstance(codec.rebuild_error(unencodable_args), ValueError)


def test_extension_codes_are_distinct() -> None:
    # Two features once took the same code: an array in a segment decoded as a tuple.
    from phalanx.transport import codec

    assert len(set(codec.EXT_CODES.values())) == len(codec.EXT_CODES)
