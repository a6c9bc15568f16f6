"""The public surface of the package: ``__all__``, the error hierarchy, typing
marker and module docstrings (after trio's ``test_exports.py``).

Runs in the test process only; nothing here starts a worker.
"""

from __future__ import annotations

import ast
import builtins
import concurrent.futures
import concurrent.futures.process
import importlib
import inspect
import pkgutil
import types
from pathlib import Path

import pytest

import phalanx
import phalanx.errors

PACKAGE_DIR = Path(phalanx.__file__).resolve().parent
MODULE_FILES = sorted(PACKAGE_DIR.rglob("*.py"))


def _all_module_names() -> list[str]:
    names = ["phalanx"]
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="phalanx."):
        if info.name != "phalanx.__main__":  # importing it is running the CLI
            names.append(info.name)
    return sorted(names)


def test_all_is_sorted_and_unique() -> None:
    assert list(phalanx.__all__) == sorted(phalanx.__all__)
    assert len(set(phalanx.__all__)) == len(phalanx.__all__)


@pytest.mark.parametrize("name", phalanx.__all__)
def test_every_name_in_all_exists(name: str) -> None:
    assert hasattr(phalanx, name), f"phalanx.__all__ names {name!r}, which does not exist"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from phalanx import *", namespace)
    namespace.pop("__builtins__", None)
    assert set(namespace) == set(phalanx.__all__)


def test_public_attributes_are_exported() -> None:
    """Every public class or function of phalanx found on the package is in __all__."""
    missing = []
    for name, obj in vars(phalanx).items():
        if name.startswith("_") or name in phalanx.__all__:
            continue
        if isinstance(obj, types.ModuleType):
            assert obj.__name__.startswith("phalanx."), f"phalanx.{name} is a foreign module"
            continue
        if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", "").startswith(
            "phalanx"
        ):
            missing.append(name)
    assert not missing, f"public names missing from phalanx.__all__: {sorted(missing)}"


@pytest.mark.parametrize("module_name", _all_module_names())
def test_module_all_names_exist(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        return
    for name in exported:
        assert hasattr(module, name), f"{module_name}.__all__ names missing {name!r}"


def _error_classes() -> list[type[BaseException]]:
    return [
        obj
        for _, obj in inspect.getmembers(phalanx.errors, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == phalanx.errors.__name__
    ]


def test_errors_module_defines_errors() -> None:
    assert len(_error_classes()) >= 10


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_error_is_a_phalanx_error(cls: type[BaseException]) -> None:
    if cls is phalanx.errors.RemoteTraceback:
        # Not an error phalanx raises: it only carries the remote traceback
        # text as the ``__cause__`` of one (like concurrent.futures'
        # _RemoteTraceback), so it must not be caught as a PhalanxError.
        assert issubclass(cls, Exception)
        return
    assert issubclass(cls, phalanx.PhalanxError)


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_error_is_exported(cls: type[BaseException]) -> None:
    assert cls.__name__ in phalanx.errors.__all__
    assert cls.__name__ in phalanx.__all__, f"phalanx.{cls.__name__} is not exported"
    assert getattr(phalanx, cls.__name__) is cls


@pytest.mark.parametrize(
    ("cls", "base"),
    [
        (phalanx.EncodeError, TypeError),
        (phalanx.ValidationError, TypeError),
        (phalanx.TaskTimeoutError, TimeoutError),
        (phalanx.TaskTimeoutError, builtins.TimeoutError),
        (phalanx.RuntimeBrokenError, concurrent.futures.BrokenExecutor),
        (phalanx.UnknownOperationError, LookupError),
        (phalanx.UnsupportedActorError, LookupError),
        (phalanx.RuntimeClosedError, RuntimeError),
        (phalanx.WorkerStartError, RuntimeError),
        (phalanx.TaskCancelledError, concurrent.futures.CancelledError),
        (phalanx.DecodeError, ValueError),
        (phalanx.FrameTooLargeError, ValueError),
        (phalanx.ProtocolError, ValueError),
        (phalanx.WorkerCrashedError, concurrent.futures.process.BrokenProcessPool),
        (phalanx.WorkerCrashedError, concurrent.futures.BrokenExecutor),
        (phalanx.WorkerCrashedError, ChildProcessError),
    ],
    ids=lambda v: v.__name__,
)
def test_errors_subclass_the_stdlib_error(cls: type[BaseException], base: type[BaseException]) -> None:
    assert issubclass(cls, base)
    assert issubclass(cls, phalanx.PhalanxError)


def test_errors_survive_their_own_args() -> None:
    """What the codec does to a remote error: ``type(e)(*e.args)`` keeps the text."""
    for cls in _error_classes():
        if cls in (phalanx.RemoteError, phalanx.UnknownOperationError, phalanx.RemoteTraceback):
            continue
        try:
            err = cls("some message")
        except TypeError:
            continue
        assert str(type(err)(*err.args)) == str(err)


def test_package_ships_py_typed() -> None:
    assert (PACKAGE_DIR / "py.typed").is_file()


def test_version() -> None:
    assert isinstance(phalanx.__version__, str)
    assert phalanx.__version__.count(".") >= 2


@pytest.mark.parametrize("path", MODULE_FILES, ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_module_starts_with_docstring(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert tree.body, f"{path} is empty"
    first = tree.body[0]
    assert (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ), f"{path} does not start with a docstring"
    doc = ast.get_docstring(tree)
    assert doc and doc.strip(), f"{path} has an empty docstring"

