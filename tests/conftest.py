"""Shared pytest fixtures for the phalanx test suite.

Runs in the test (driver) process only.

* Hypothesis profiles: ``ci`` (derandomized, no example database) and ``dev``.
  ``PHALANX_HYPOTHESIS_PROFILE`` picks one; otherwise ``ci`` when ``CI`` is set,
  else ``dev``. A failing Hypothesis test is reported normally under ``-W error``
  (see ``pytest_runtest_makereport``).
* ``no_leaked_processes`` (autouse): every test must leave no child process
  behind. New children get a short grace period to exit; any still alive after
  it are killed and the test fails with their pids and command lines.
* ``zmq_ctx``, ``ipc_dir``, ``runtime``: resources that are always closed,
  removed or shut down on teardown.
* ``module_runtime``: one ``Runtime(workers=2)`` per test module, for tests
  that leave it usable; its teardown checks that no child process is left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import zmq
from hypothesis import HealthCheck, settings

from phalanx.testing.invariants import ProcessLeakCheck

if TYPE_CHECKING:
    import phalanx

# --------------------------------------------------------------------------- #
# Hypothesis profiles
# --------------------------------------------------------------------------- #

_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    max_examples=30,
    suppress_health_check=_SUPPRESSED,
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=30,
    suppress_health_check=_SUPPRESSED,
)


def _hypothesis_profile() -> str:
    explicit = os.environ.get("PHALANX_HYPOTHESIS_PROFILE")
    if explicit:
        return explicit
    return "ci" if os.environ.get("CI") else "dev"


settings.load_profile(_hypothesis_profile())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Let a failing Hypothesis test be reported under ``-W error``.

    On failure Hypothesis' pytest plugin imports ``hypothesis.extra._patching``
    (libcst), whose import emits a DeprecationWarning from mypy_extensions;
    with warnings as errors that turns a test failure into an INTERNALERROR
    that stops the whole run. Import it first, with warnings silenced.
    """
    if call.excinfo is not None and "hypothesis.extra._patching" not in sys.modules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                import hypothesis.extra._patching  # noqa: F401
            except ImportError:
                pass
    return (yield)

# --------------------------------------------------------------------------- #
# Process-leak check
# --------------------------------------------------------------------------- #

#: How long new children get to exit after a test before they count as leaked.
_LEAK_GRACE_S = 3.0


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail the test if it leaves a live child process behind."""
    with _no_new_children("test"):
        yield


@contextlib.contextmanager
def _no_new_children(what: str) -> Iterator[None]:
    """Fail (after a grace period, killing them) if children started inside still live.

    The check is phalanx.testing's :class:`ProcessLeakCheck`, which users get too.
    """
    check = ProcessLeakCheck(grace=_LEAK_GRACE_S).__enter__()
    yield
    report = check.check()
    if report:
        pytest.fail(
            f"{what} leaked {len(report)} child process(es) (killed):\n  " + "\n  ".join(report),
            pytrace=False,
        )


# --------------------------------------------------------------------------- #
# Resources
# --------------------------------------------------------------------------- #


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context[Any]]:
    """A private ZeroMQ context, destroyed with linger 0 (closes every socket)."""
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """A private temp dir under /tmp, short enough for unix socket paths."""
    path = tempfile.mkdtemp(prefix="phx-", dir="/tmp")
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def runtime() -> Iterator[phalanx.Runtime]:
    """A running ``phalanx.Runtime(workers=2)``, shut down on teardown."""
    import phalanx

    with phalanx.Runtime(workers=2) as rt:
        yield rt


@pytest.fixture(scope="module")
def module_runtime() -> Iterator[phalanx.Runtime]:
    """One ``phalanx.Runtime(workers=2)`` shared by the tests of a module.

    For tests that leave the runtime usable. The function-scoped leak check
    sees its workers as pre-existing; this fixture's own teardown checks that
    after ``shutdown()`` no child process it started is left.
    """
    import phalanx

    with _no_new_children("module runtime"):
        rt = phalanx.Runtime(workers=2)
        try:
            yield rt
        finally:
            rt.shutdown()


@pytest.fixture
def phalanx_logger() -> Iterator[logging.Logger]:
    """The ``phalanx`` logger, with its level and handlers restored afterwards (log_level adds one)."""
    logger = logging.getLogger("phalanx")
    level, handlers = logger.level, list(logger.handlers)
    try:
        yield logger
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers
