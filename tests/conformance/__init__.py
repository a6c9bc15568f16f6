"""Conformance harness: other projects' own test suites, run against phalanx.

Runs in a plain interpreter (not under pytest): ``python -m tests.conformance
cf`` runs CPython's ``test.test_concurrent_futures`` process-pool classes with
:class:`phalanx.Executor` swapped in for ``ProcessPoolExecutor``;
``python -m tests.conformance joblib`` runs joblib's ``test_parallel.py`` with
the ``phalanx`` backend added to its backend lists. The test modules are read
from the interpreter's / the installed package's own files and patched at
import time; none of their source lives in this repository. Each suite runs in
child processes with a per-test time limit, so a hanging test is counted as
hung (its process group is killed) and the rest still run.

Not part of the default test run (it takes minutes); see docs/testing.md.
"""
