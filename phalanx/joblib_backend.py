"""A joblib parallel backend named ``"phalanx"``.

Runs in the driver. Registering it is one import (joblib must be installed:
``pip install 'phalanx[joblib]'``); ``import phalanx`` alone does not import
joblib. :func:`register` registers it again under another name::

    import joblib
    import phalanx.joblib_backend  # registers the "phalanx" backend

    with joblib.parallel_backend("phalanx", n_jobs=2):  # or joblib.parallel_config(backend="phalanx")
        results = joblib.Parallel()(joblib.delayed(f)(i) for i in range(100))

Keyword arguments of ``parallel_backend("phalanx", ...)`` are
:class:`phalanx.Executor` options (``max_tasks_per_child=``, ``credits=``...);
joblib's own ``Parallel`` settings that concern its memmapping pools
(``max_nbytes``, ``temp_folder``, ``mmap_mode``) do not apply and are ignored.

The backend runs every batch joblib forms as one task on a :class:`phalanx.Executor`
(started when a ``Parallel`` call begins, shut down when it ends)::

    Parallel ── BatchedCalls [(f, args, kwargs), ...] ──▶ PhalanxBackend.submit
             ──▶ Executor.submit(_run_calls, [[name, args, kwargs], ...]) ──▶ worker
    pump thread ── done callback ──▶ joblib's BatchCompletionCallBack (next batch)

Invariant kept: nothing is pickled unless ``local_pickle`` is on (local
workers only; then each batch goes pickled as a whole, as loky sends it). Each delayed function is sent by name, so it must be an
``@phalanx.operation`` or a function defined at module level (Python,
builtin or C, named implicitly, as :class:`phalanx.Executor` does); a
lambda, a nested function or a ``functools.partial`` raises ``TypeError``
when the batch is dispatched, unless ``local_pickle`` carries it pickled.
Arguments and results are msgpack: results come back as the function's
return annotation says, else as Python made them (tuples, sets and big ints
included; other objects as plain data, or pickled under ``local_pickle``).
No worker outlives the ``Parallel`` call that started it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import multiprocessing
import warnings
from collections.abc import Callable
from typing import Any

from .config import usable_cpus
from .executor import Executor, _run_calls
from .registry.operations import Operation, driver_operation, implicit
from .runtime import Runtime

__all__ = ["PhalanxBackend", "register"]

logger = logging.getLogger(__name__)

try:
    _joblib: Any = importlib.import_module("joblib")
    _parallel: Any = importlib.import_module("joblib.parallel")
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("phalanx.joblib_backend needs joblib: pip install 'phalanx[joblib]'") from exc

#: keyword arguments of ``Parallel(...)`` forwarded to the executor (the rest are joblib's own)
_EXECUTOR_OPTIONS = frozenset(
    name for name, p in inspect.signature(Runtime.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY
) | {"max_tasks_per_child", "initializer", "initargs"}


class PhalanxBackend(_parallel.AutoBatchingMixin, _parallel.ParallelBackendBase):  # type: ignore[misc]
    """joblib backend running batches on phalanx worker processes.

    Keyword arguments given to ``joblib.parallel_backend("phalanx", ...)``
    (other than ``n_jobs``) are :class:`phalanx.Executor` /
    :class:`phalanx.Runtime` options, e.g. ``max_tasks_per_child=100``.
    ``n_jobs=1`` runs sequentially in the calling process, as with loky, and
    so does any ``n_jobs`` inside a daemonic process (a ``multiprocessing.Pool``
    worker), with a warning.
    """

    supports_retrieve_callback = True
    supports_timeout = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(self, nesting_level: int | None = None, inner_max_num_threads: int | None = None,
                 **backend_kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads,
                         **backend_kwargs)
        self._executor: Executor | None = None
        self._n_jobs = 0
        self.parallel: Any = None

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """Workers a ``Parallel`` call with ``n_jobs`` gets (-1: all usable CPUs)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if multiprocessing.current_process().daemon:
            # A daemonic process (a multiprocessing.Pool worker) may not start children: run
            # sequentially, as joblib's loky and multiprocessing backends do there.
            if n_jobs != 1:
                warnings.warn("phalanx-backed parallel loops cannot run in a daemonic process "
                              "(e.g. a multiprocessing.Pool worker), setting n_jobs=1", stacklevel=3)
            return 1
        if n_jobs < 0:
            return max(usable_cpus() + 1 + n_jobs, 1)
        return int(n_jobs)

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, prefer: str | None = None,
                  require: str | None = None, **backend_kwargs: Any) -> int:
        """Start (or reuse) the executor for one ``Parallel`` call."""
        n = self.effective_n_jobs(n_jobs)
        if n == 1:
            raise _parallel.FallbackToBackend(_parallel.SequentialBackend(nesting_level=self.nesting_level))
        if self._executor is not None and self._n_jobs != n:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._executor is None:
            # ``Parallel`` passes its own settings (max_nbytes, temp_folder,
            # mmap_mode, verbose, its multiprocessing context...) to every
            # backend: keep only what an Executor takes.
            given = {k: v for k, v in backend_kwargs.items() if k in _EXECUTOR_OPTIONS}
            options = {**self.backend_kwargs, **given}
            self._executor = Executor(max_workers=n, **options)
            self._n_jobs = n
            logger.debug("joblib backend started %d workers", n)
        self.parallel = parallel
        return n

    @property
    def _workers(self) -> Executor | None:
        """The executor of the current ``Parallel`` call (None outside one).

        Not public API: the attribute joblib's own tests read of a process
        backend (``_workers``, loky's executor) to see its pool restarted
        after a failure.
        """
        return self._executor

    def submit(self, func: Any, callback: Callable[[Any], None] | None = None) -> Any:
        """Send one joblib batch as one task; ``callback(future)`` when it is done."""
        executor = self._executor
        if executor is None:
            raise RuntimeError("the phalanx joblib backend is not configured")
        items = getattr(func, "items", None)
        if not isinstance(items, list):
            raise TypeError(f"the phalanx joblib backend runs joblib batches, got {func!r}")
        if executor._pickled:
            # The batch itself, pickled (as loky sends it): it runs under joblib's own
            # context in the worker (nested backends, nesting level, n_jobs).
            future = executor.submit(func)
            if callback is not None:
                future.add_done_callback(callback)
            return future
        calls: list[list[Any]] = []
        ops: list[Operation | None] = []
        for fn, args, kwargs in items:
            callee = executor._wire_fn(fn)  # a name, or (local_pickle) fn itself
            calls.append([callee, list(args), dict(kwargs) or None])
            ops.append(driver_operation(implicit(fn)) if isinstance(callee, str) else None)
        future = executor.submit(_run_calls, calls)
        future._phalanx_joblib_ops = ops  # type: ignore[attr-defined]
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future: Any) -> list[Any]:
        """The batch's results, converted to each function's return annotation."""
        values: list[Any] = future.result()
        ops: list[Operation | None] | None = getattr(future, "_phalanx_joblib_ops", None)
        if ops is None:  # a pickled batch: its values are the function's own
            return values
        out = []
        for value, op in zip(values, ops):
            if op is not None and op.returns not in (Any, object):
                value = op.convert_result(value)
            out.append(value)
        return out

    def terminate(self) -> None:
        """End of a ``Parallel`` call: stop the workers."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed (or timed out): cancel what has not started, stop the workers without
        waiting for the tasks still running (as loky does: they would hold the interpreter's exit)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor._abort()
        if ensure_ready and self.parallel is not None:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel)


def register(name: str = "phalanx") -> None:
    """Register the backend with joblib as ``name`` (``"phalanx"`` is done on import; idempotent)."""
    _joblib.register_parallel_backend(name, PhalanxBackend)


register()
