"""Checks on the shape of the source tree: no class in phalanx/ grows past a size one can hold in mind.

Runs in the test process only (it parses the sources; nothing is started).
The runtime's responsibilities live in collaborators with their own state
(phalanx/pipes.py, direct.py, membership.py, lifecycle.py, pump.py,
inspection.py, reclaim.py) rather than in one class; this keeps it so.
"""

from __future__ import annotations

import ast
from pathlib import Path

import phalanx

PACKAGE = Path(phalanx.__file__).parent
#: longest a class in phalanx/ may be, in lines (its whole body, docstring and comments included)
MAX_CLASS_LINES = 800


def class_lengths() -> dict[str, int]:
    """``path:ClassName`` -> lines, for every class (nested ones too) under phalanx/."""
    lengths = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                lengths[f"{path.relative_to(PACKAGE.parent)}:{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_no_class_is_longer_than_800_lines() -> None:
    lengths = class_lengths()
    assert "phalanx/driver.py:Driver" in lengths  # the walk sees the package
    too_long = {name: n for name, n in lengths.items() if n > MAX_CLASS_LINES}
    assert too_long == {}


def test_each_module_starts_with_a_docstring() -> None:
    missing = [str(path.relative_to(PACKAGE.parent)) for path in sorted(PACKAGE.rglob("*.py"))
               if path.stat().st_size and ast.get_docstring(ast.parse(path.read_text())) is None]
    assert missing == []
