"""Operations that raise hostile exceptions, for tests/test_rebuild.py.

Imported by the test (driver) process and, by name, by every worker process
(``tests/`` is on ``sys.path`` in both). Importing it has no side effects.
The classes here stand for a remote exception whose type the driver *has*
(this module is in its ``sys.modules``) but whose constructor misbehaves
when the driver rebuilds it from the remote arguments.
"""

from __future__ import annotations

from typing import Any, NoReturn

import phalanx

#: names looked up on this module through ``__getattr__`` (none may be: that would run code here)
LOOKUPS: list[str] = []


def __getattr__(name: str) -> Any:
    LOOKUPS.append(name)
    raise AttributeError(name)


class ExitOnRebuild(Exception):
    """Built with the argument ``"exit"``, its constructor raises SystemExit."""

    def __init__(self, *args: Any) -> None:
        if args == ("exit",):
            raise SystemExit(7)
        super().__init__(*args)


class InterruptOnRebuild(Exception):
    """Built with the argument ``"interrupt"``, its constructor raises KeyboardInterrupt."""

    def __init__(self, *args: Any) -> None:
        if args == ("interrupt",):
            raise KeyboardInterrupt
        super().__init__(*args)


class NotAnException(Exception):
    """Built with the argument ``"new"``, it is not an exception at all."""

    def __new__(cls, *args: Any) -> Any:
        if args == ("new",):
            return 42
        return super().__new__(cls, *args)


def _forged_class(module: str, qualname: str, base: type[BaseException] = Exception) -> type[BaseException]:
    cls = type(qualname.rpartition(".")[2], (base,), {})
    cls.__module__ = module
    cls.__qualname__ = qualname
    return cls


@phalanx.operation
def raise_forged(module: str, qualname: str, message: str) -> NoReturn:
    """Raise an exception whose type claims to be ``module:qualname``."""
    raise _forged_class(module, qualname)(message)


@phalanx.operation
def raise_built_with(name: str, arg: str) -> NoReturn:
    """Raise this module's exception ``name`` whose args say ``arg`` (built harmlessly here)."""
    cls = globals()[name]
    exc = Exception.__new__(cls)
    exc.args = (arg,)
    raise exc


@phalanx.operation
def stop_at(x: int, k: int) -> int:
    """``x``, but StopIteration at ``k`` (as a careless ``next()`` in a task would)."""
    if x == k:
        raise StopIteration(f"stop at {k}")
    return x


@phalanx.operation
def return_unencodable(kind: str) -> Any:
    """A list that contains itself, or one nested 100,000 deep."""
    value: list[Any] = []
    if kind == "self":
        value.append(value)
        return value
    for _ in range(100_000):
        value = [value]
    return value


@phalanx.operation
def echo(x: Any) -> Any:
    return x


@phalanx.actor
class Echo:
    def echo(self, x: Any) -> Any:
        return x
