"""Functions annotated every way an operation can be (tests/test_operation_hints.py)."""

from __future__ import annotations

import functools
import typing
from typing import Any, Optional

import msgspec

NOT_A_TYPE = 3
int_alias = int


class Point(msgspec.Struct):
    x: int
    y: int


class Box:
    def __init__(self, size: int, label: str = "") -> None:
        self.size = size


class Plain:
    pass


def builtins_only(a: int, b: str, *args: float, c: bytes, **kw: bool) -> int:
    return a


def module_classes(p: Point, b: Box) -> Point:
    return p


def anys(a: Any, b: object) -> Any:
    return a


def generic(a: list[int], b: dict[str, Point]) -> tuple[int, ...]:
    return (1,)


def optional(a: Optional[int], b: int | None) -> None:
    pass


def dotted(a: typing.Any, b: msgspec.Struct) -> typing.List[int]:
    return []


def unresolvable(a: NoSuchName) -> int:  # type: ignore[name-defined]  # noqa: F821
    return 0


def not_a_type(a: NOT_A_TYPE) -> int:  # type: ignore[valid-type]
    return 0


def aliased(a: int_alias) -> int_alias:
    return a


def unannotated(a, b=1, *c, **d):  # type: ignore[no-untyped-def]
    return a


@functools.wraps(builtins_only)
def wrapper(*args: Any, **kwargs: Any) -> Any:
    return builtins_only(*args, **kwargs)


def local_shadow() -> Any:
    class int:  # a local name no annotation string can see
        pass

    def f(a: int) -> int:
        return a

    return f


ALL = [builtins_only, module_classes, anys, generic, optional, dotted, unresolvable, not_a_type, aliased,
       unannotated, wrapper, Box, Plain, Point, local_shadow(), len, print]
