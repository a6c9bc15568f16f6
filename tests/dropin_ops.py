"""Module-level functions the drop-in tests run in workers (named implicitly, or registered)."""

from __future__ import annotations

import dataclasses
from typing import Any

import phalanx


def identity(x: Any) -> Any:
    return x


@phalanx.operation
def echo(x: Any) -> Any:
    return x


@dataclasses.dataclass
class Order:
    qty: int


@phalanx.operation
def double(order: Order) -> int:
    return order.qty * 2


class Touch:
    """Unpickling it creates the file ``path``: proof that a pickle was read."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


_SHARED: Any = None


def remember(shared: Any) -> None:
    """An initializer keeping what it was given (a manager's proxy, under local_pickle)."""
    global _SHARED
    _SHARED = shared


def append_to_shared(x: int) -> int:
    _SHARED.append(x)
    return x


def _refuse() -> None:
    raise RuntimeError("this object cannot be loaded")


class ErrorAtUnpickle:
    """Pickles fine; loading it raises."""

    def __reduce__(self) -> Any:
        return (_refuse, ())


def make_error_at_unpickle() -> ErrorAtUnpickle:
    return ErrorAtUnpickle()
