"""An operation reads its annotations exactly as typing.get_type_hints would.

Operation() reads simple annotations (a builtin's or a module-level class's name) without
typing's evaluator (whose compiler costs a freshly forked worker ~0.8 ms on its first task);
whatever else falls back to get_type_hints. Each function of tests/hint_ops.py must give the
same parameter and return types both ways, or fail both ways.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import pytest

from phalanx.registry import operations

import hint_ops


def _expected(fn: Any) -> tuple[list[tuple[str, Any]], Any] | type[BaseException]:
    target = fn.__init__ if isinstance(fn, type) else fn
    try:
        hints = typing.get_type_hints(target)
        sig = inspect.signature(fn)
    except Exception:
        return [], Any
    pos = [(p.name, hints.get(p.name, Any)) for p in sig.parameters.values()
           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    returns = hints.get("return", Any)
    return pos, (type(None) if returns is None else returns)


@pytest.mark.parametrize("fn", hint_ops.ALL, ids=lambda f: getattr(f, "__qualname__", repr(f)))
def test_an_operation_reads_annotations_as_get_type_hints_does(fn: Any) -> None:
    op = operations.Operation("hint_ops:x", fn)
    assert (op._pos, op.returns) == _expected(fn)


def test_simple_annotations_are_read_without_typings_evaluator(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("get_type_hints called")

    monkeypatch.setattr(typing, "get_type_hints", refuse)
    for fn in (hint_ops.builtins_only, hint_ops.module_classes, hint_ops.anys, hint_ops.aliased, hint_ops.Box):
        op = operations.Operation("hint_ops:x", fn)
        assert op._pos and all(t is not Any or name in ("a",) for name, t in op._pos)
    assert operations.Operation("hint_ops:x", hint_ops.module_classes)._pos == [
        ("p", hint_ops.Point), ("b", hint_ops.Box)]
