"""One child of the ``cf`` suite: CPython's test_concurrent_futures with phalanx.Executor.

Runs in a child process started by :mod:`tests.conformance.runner`. Before any
test module is imported, ``concurrent.futures.ProcessPoolExecutor`` (and
``concurrent.futures.process.ProcessPoolExecutor``) is replaced by
:class:`phalanx.Executor` under the name ``ProcessPoolExecutor`` (see
:mod:`tests.conformance.swap`, which does the same in every process the
tests start), so the classes the test modules build
(``ProcessPoolForkMixin.executor_type = futures.ProcessPoolExecutor``...) use
it; the test bodies are the interpreter's own, unchanged.

``--list`` prints the ids of the process-pool tests as JSON; ``--run EVENTS
ID...`` runs those tests in order and appends one JSON line per event
(``start``, then ``end`` with the outcome) to EVENTS, flushed at once, so the
parent sees which test was running if this process hangs or dies.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import json
import sys
import traceback
import unittest
from typing import Any

import phalanx
from tests.conformance.swap import install

PACKAGE = "test.test_concurrent_futures"
#: the modules of the package that hold process-pool test classes
MODULES = ("test_as_completed", "test_deadlock", "test_future", "test_init",
           "test_process_pool", "test_shutdown", "test_wait")
SELECT = "ProcessPool"


def swap() -> None:
    """Make ``ProcessPoolExecutor`` mean ``phalanx.Executor`` for every later import.

    The interpreter's start-up already did when the harness set
    ``PHALANX_CONFORMANCE_SWAP`` (see :mod:`tests.conformance.swap`); this
    covers a child run by hand.
    """
    install()
    assert issubclass(concurrent.futures.process.ProcessPoolExecutor, phalanx.Executor)


def _flatten(suite: Any) -> list[unittest.TestCase]:
    out: list[unittest.TestCase] = []
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


def list_ids() -> list[str]:
    loader = unittest.TestLoader()
    ids: list[str] = []
    for name in MODULES:
        try:
            module = __import__(f"{PACKAGE}.{name}", fromlist=["_"])
        except ImportError:
            continue
        ids.extend(t.id() for t in _flatten(loader.loadTestsFromModule(module)) if SELECT in t.id())
    return ids


class _Events(unittest.TestResult):
    """Writes each test's start and outcome to the events file as it happens."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._out = open(path, "a", buffering=1)
        self._outcome: dict[str, tuple[str, str]] = {}

    def _emit(self, **event: Any) -> None:
        self._out.write(json.dumps(event) + "\n")
        self._out.flush()

    def _set(self, test: Any, outcome: str, detail: str = "") -> None:
        tid = test.id()
        rank = ["passed", "skipped", "expected failure", "unexpected success", "failed", "error"]
        old = self._outcome.get(tid)
        if old is None or rank.index(outcome) > rank.index(old[0]):
            self._outcome[tid] = (outcome, detail)

    def startTest(self, test: Any) -> None:
        super().startTest(test)
        self._emit(event="start", id=test.id())

    def stopTest(self, test: Any) -> None:
        super().stopTest(test)
        outcome, detail = self._outcome.pop(test.id(), ("passed", ""))
        self._emit(event="end", id=test.id(), outcome=outcome, detail=detail)

    def _err(self, err: Any) -> str:
        return "".join(traceback.format_exception(*err))[-4000:]

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        if isinstance(test, unittest.TestCase):
            self._set(test, "error", self._err(err))
        else:  # a module or class fixture
            self._emit(event="fixture", id=str(test), outcome="error", detail=self._err(err))

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._set(test, "failed", self._err(err))

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._set(test, "failed" if failed else "error", f"{subtest.id()}\n{self._err(err)}")

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._set(test, "skipped", reason)

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._set(test, "expected failure")

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self._set(test, "unexpected success")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--baseline":  # the stock ProcessPoolExecutor, for comparison
        argv = argv[1:]
    else:
        swap()
    if argv[:1] == ["--list"]:
        print(json.dumps(list_ids()))
        return 0
    if argv[:1] != ["--run"] or len(argv) < 2:
        print("usage: cf_child [--baseline] --list | --run EVENTS ID...", file=sys.stderr)
        return 2
    events, ids = argv[1], argv[2:]
    suite = unittest.TestSuite(unittest.TestLoader().loadTestsFromName(i) for i in ids)
    suite.run(_Events(events))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
