"""Actor types: classes workers instantiate, registered by a stable name.

Runs in the driver (``@actor`` at import, ``actor_name_of`` at spawn) and in
workers (``resolve_actor`` when asked to create an instance).

Invariant kept: a worker only instantiates classes registered with
``@phalanx.actor`` in modules it imported itself; anything else is
:class:`~phalanx.errors.UnsupportedActorError` ("unsupported worker"), and the
worker keeps serving. Only public methods (no leading underscore) of an actor
can be called remotely.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, TypeVar

from ..errors import UnsupportedActorError

__all__ = ["actor", "actor_name_of", "resolve_actor"]

C = TypeVar("C", bound=type)

_ACTORS: dict[str, type] = {}


def _name(cls: type) -> str:
    module = "__main__" if cls.__module__ == "__mp_main__" else cls.__module__
    return f"{module}:{cls.__qualname__}"


def actor(cls: C) -> C:
    """Register a module-level class as a phalanx actor type; return it unchanged.

    ::

        @phalanx.actor
        class Counter:
            def __init__(self, start: int = 0) -> None:
                self.n = start
            def incr(self, k: int = 1) -> int:
                self.n += k
                return self.n

    Optional hooks: ``save(self) -> State`` returns the state (anything
    msgspec encodes, typically a ``msgspec.Struct``), and the classmethod
    ``restore(cls, state: State) -> Self`` rebuilds an instance from it; both
    are needed for hot restart and for restarting from checkpoints.
    """
    if not isinstance(cls, type):
        raise TypeError(f"@phalanx.actor needs a class, got {cls!r}")
    if "<locals>" in cls.__qualname__:
        raise TypeError(
            f"@phalanx.actor: {cls.__qualname__} is defined inside a function; "
            "workers can only find module-level classes"
        )
    name = _name(cls)
    _ACTORS[name] = cls
    setattr(cls, "__phalanx_actor__", name)
    return cls


def actor_name_of(cls: type | str) -> str:
    """The wire name of an actor type given as a class or a name."""
    if isinstance(cls, str):
        if ":" not in cls:
            raise UnsupportedActorError(f"unsupported worker {cls!r}: names look like 'module:qualname'")
        return cls
    name = cls.__dict__.get("__phalanx_actor__")
    if isinstance(name, str):
        return name
    raise TypeError(f"{cls!r} is not a phalanx actor: decorate it with @phalanx.actor")


def resolve_actor(name: str) -> type:
    """The registered actor class ``name`` in this process (importing its module)."""
    cls = _ACTORS.get(name)
    if cls is not None:
        return cls
    module_name, _, _ = name.partition(":")
    if module_name and module_name not in sys.modules:
        try:
            importlib.import_module(module_name)
        except Exception as exc:
            raise UnsupportedActorError(
                f"unsupported worker {name!r}: module {module_name!r} failed to import: "
                f"{type(exc).__name__}: {exc}"
            ) from None
    cls = _ACTORS.get(name)
    if cls is None:
        raise UnsupportedActorError(f"unsupported worker {name!r}: no actor type of that name")
    return cls


def actor_type_hint(cls: type, method: str) -> Any:
    """The annotated parameter type of ``cls.restore`` (Any when absent)."""
    import typing

    fn = getattr(cls, method, None)
    if fn is None:
        return Any
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return Any
    hints.pop("return", None)
    return next(iter(hints.values()), Any)
