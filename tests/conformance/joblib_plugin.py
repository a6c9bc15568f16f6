"""pytest plugin of the ``joblib`` suite: joblib's own test_parallel.py with a ``phalanx`` backend.

Runs in the pytest child process started by :mod:`tests.conformance.runner`.
Importing it registers the ``phalanx`` backend (so every list the test module
builds from ``joblib.parallel.BACKENDS`` holds it) and installs an import hook
that loads the installed ``joblib/test/test_parallel.py`` with one line
changed: ``PROCESS_BACKENDS = ["multiprocessing", "loky"]`` gains
``"phalanx"``. Collection keeps only the tests that run the phalanx backend
(by name or as a ``PhalanxBackend`` instance). Each test's start and outcome
go to the JSON-lines file named by ``PHALANX_CONFORMANCE_EVENTS`` as they
happen; with ``PHALANX_CONFORMANCE_LIST`` set, the selected ids are written
there and nothing runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from typing import Any

import pytest

import phalanx.joblib_backend
from phalanx.joblib_backend import PhalanxBackend

MODULE = "joblib.test.test_parallel"
ORIGINAL = 'PROCESS_BACKENDS = ["multiprocessing", "loky"]'
PATCHED = 'PROCESS_BACKENDS = ["multiprocessing", "loky", "phalanx"]'


class _PatchingLoader(importlib.machinery.SourceFileLoader):
    def get_data(self, path: str) -> bytes:
        data = super().get_data(path)
        if not path.endswith(".py"):
            return data
        source = data.decode()
        if ORIGINAL not in source:
            raise RuntimeError(f"{path}: {ORIGINAL!r} not found; this joblib's test module changed")
        return source.replace(ORIGINAL, PATCHED, 1).encode()

    def path_stats(self, path: str) -> Any:
        raise OSError("never use the cached bytecode of the unpatched module")


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.origin:
                loader = _PatchingLoader(fullname, spec.origin)
                return importlib.util.spec_from_file_location(fullname, spec.origin, loader=loader)
        return None


sys.meta_path.insert(0, _Finder())


def _runs_phalanx(item: Any) -> bool:
    if "phalanx" in item.nodeid:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(v, PhalanxBackend) for v in params.values())


class _Events:
    def __init__(self, path: str) -> None:
        self._out = open(path, "a", buffering=1)
        self._outcome: dict[str, tuple[str, str]] = {}

    def emit(self, **event: Any) -> None:
        self._out.write(json.dumps(event) + "\n")
        self._out.flush()


_events = _Events(os.environ["PHALANX_CONFORMANCE_EVENTS"]) if os.environ.get("PHALANX_CONFORMANCE_EVENTS") else None
_results: dict[str, tuple[str, str]] = {}


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    keep = [i for i in items if _runs_phalanx(i)]
    config.hook.pytest_deselected(items=[i for i in items if not _runs_phalanx(i)])
    items[:] = keep
    listing = os.environ.get("PHALANX_CONFORMANCE_LIST")
    if listing:
        with open(listing, "w") as out:
            json.dump([i.nodeid for i in keep], out)
        items[:] = []


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    if _events is not None:
        _events.emit(event="start", id=nodeid)


def pytest_runtest_logreport(report: Any) -> None:
    rank = ["passed", "skipped", "expected failure", "unexpected success", "failed", "error", "hung"]
    if report.when == "call" or report.outcome != "passed":
        if report.outcome == "passed":
            outcome = "unexpected success" if hasattr(report, "wasxfail") else "passed"
        elif report.outcome == "skipped":
            outcome = "expected failure" if hasattr(report, "wasxfail") else "skipped"
        else:
            text = str(report.longrepr)
            outcome = "hung" if "Timeout (>" in text else ("failed" if report.when == "call" else "error")
        detail = str(report.longrepr)[-4000:] if report.outcome != "passed" else ""
        old = _results.get(report.nodeid)
        if old is None or rank.index(outcome) > rank.index(old[0]):
            _results[report.nodeid] = (outcome, detail)


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    outcome, detail = _results.pop(nodeid, ("passed", ""))
    if _events is not None:
        _events.emit(event="end", id=nodeid, outcome=outcome, detail=detail)
