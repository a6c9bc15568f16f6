"""The class the ``cf`` suite swaps in for ``ProcessPoolExecutor``, in its test processes and the ones they start.

Runs at start-up of every Python process of the harness's own interpreter
(see :func:`tests.conformance.runner.interpreter`: a ``.pth`` file imports this
module), and in :mod:`tests.conformance.cf_child`. When
``PHALANX_CONFORMANCE_SWAP`` is set, ``concurrent.futures.ProcessPoolExecutor``
becomes :class:`ProcessPoolExecutor`, which is :class:`phalanx.Executor` under
the standard library's class name: CPython's ``test_interpreter_shutdown`` and
``test_submit_after_interpreter_shutdown`` start ``python -I -c CODE`` (which
ignores ``PYTHONPATH``) where CODE imports the executor by its test class's
``executor_type.__name__``. Without the variable nothing is imported.
"""

from __future__ import annotations

import os

#: set by the harness in the environment of the cf suite's processes (not for --baseline)
ENV = "PHALANX_CONFORMANCE_SWAP"


def install() -> None:
    """Make ``ProcessPoolExecutor`` mean phalanx's executor for every later import (once per process)."""
    import concurrent.futures
    import concurrent.futures.process

    import phalanx

    if issubclass(concurrent.futures.ProcessPoolExecutor, phalanx.Executor):
        return

    class ProcessPoolExecutor(phalanx.Executor):
        """:class:`phalanx.Executor` under the name CPython's tests import it by."""

    concurrent.futures.ProcessPoolExecutor = ProcessPoolExecutor  # type: ignore[misc]
    concurrent.futures.process.ProcessPoolExecutor = ProcessPoolExecutor  # type: ignore[misc]


if os.environ.get(ENV):
    install()
