"""Registers the ``phalanx`` joblib backend in every interpreter the joblib suite starts.

Runs at start-up of each Python process whose ``PYTHONPATH`` holds this
directory (the conformance harness puts it there for the ``joblib`` suite
only): test_parallel.py runs ``Parallel(backend="phalanx")`` inside loky and
phalanx workers and in scripts it starts, where the backend must be known as
it is in the test process. Nothing happens until ``joblib`` is imported; then
``phalanx.joblib_backend`` is imported right after it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any


class _AfterJoblib(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "joblib":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("joblib")
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            sys.modules["joblib"] = module
            try:
                import phalanx.joblib_backend  # noqa: F401 - registers the backend
            except Exception as exc:  # never break the interpreter over it
                print(f"phalanx conformance: cannot register the joblib backend: {exc!r}", file=sys.stderr)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


# Not in loky's own workers: they never choose a backend by name for the test, and
# importing phalanx there makes a nested Parallel under a phalanx worker hang.
if "joblib" not in sys.modules and not any("loky" in arg for arg in getattr(sys, "orig_argv", sys.argv)):
    sys.meta_path.insert(0, _AfterJoblib())
