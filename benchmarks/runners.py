"""One adapter per executor, behind a common interface the workloads drive.

Runs in the child measuring process (``benchmarks.run_one``), never in the
orchestrator. Each runner owns a pool of :data:`WORKERS` worker processes:

=========  ==================================================================
phalanx    ``phalanx.Runtime(workers=2)`` (its default start method)
executor   ``phalanx.Executor(2)``: the ``concurrent.futures`` adapter on the same
           runtime (W1 and W2 only, to show the adapter's overhead)
pool       ``multiprocessing.get_context("fork").Pool(2)``
ppe        ``concurrent.futures.ProcessPoolExecutor(2)`` (default context: fork)
loky       ``loky.get_reusable_executor(max_workers=2)``
ray        ``ray.init(num_cpus=2)`` + remote functions (only if ``ray`` imports)
=========  ==================================================================

Operations that a runner does not offer raise :class:`NotApplicable`; the
workload then leaves that metric out (shown as ``n/a`` in the table).
"""

from __future__ import annotations

import abc
import importlib.util
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

__all__ = [
    "WORKERS",
    "RESULT_TIMEOUT",
    "NotApplicable",
    "Runner",
    "RUNNERS",
    "TASK_RUNNERS",
    "ADAPTER_RUNNERS",
    "available_runners",
    "make_runner",
    "pool_chunksize",
    "ray_available",
]

#: worker processes in every pool
WORKERS = 2
#: seconds any single result may take before the benchmark fails
RESULT_TIMEOUT = 300.0


class NotApplicable(Exception):
    """The runner has no equivalent of the requested operation."""


def pool_chunksize(n: int, workers: int = WORKERS) -> int:
    """The chunksize ``multiprocessing.Pool.map`` picks for ``n`` items."""
    chunksize, extra = divmod(n, workers * 4)
    if extra:
        chunksize += 1
    return max(1, chunksize)


def ray_available() -> bool:
    """True if ``import ray`` would succeed (checked without importing it)."""
    return importlib.util.find_spec("ray") is not None


class Runner(abc.ABC):
    """A pool of :data:`WORKERS` processes running module-level functions."""

    name: str = "?"
    #: what ``map(..., chunksize=None)`` means for this runner (table legend)
    default_map: str = "?"

    @abc.abstractmethod
    def start(self) -> None:
        """Create the pool (its workers may start lazily; see ``first_result``)."""

    @abc.abstractmethod
    def submit_gather(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Submit one task per argument tuple (one message each), then gather in order."""

    @abc.abstractmethod
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None) -> list[Any]:
        """The runner's map; ``chunksize=None`` is the runner's own default."""

    @abc.abstractmethod
    def stream(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        """Results of ``fn`` over ``items`` in order, consumed lazily by the caller."""

    @abc.abstractmethod
    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One synchronous round trip: submit, wait for the result."""

    @abc.abstractmethod
    def worker_pids(self) -> list[int]:
        """Process ids of the pool's workers."""

    @abc.abstractmethod
    def close(self) -> None:
        """Shut the pool down and wait for its workers to exit."""


class PhalanxRunner(Runner):
    name = "phalanx"
    default_map = "rt.map chunksize=None (auto)"

    def __init__(self) -> None:
        import phalanx

        self._phalanx = phalanx
        self.rt: phalanx.Runtime | None = None

    def start(self) -> None:
        self.rt = self._phalanx.Runtime(workers=WORKERS)

    def _rt(self) -> Any:
        assert self.rt is not None, "start() first"
        return self.rt

    def submit_gather(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
        rt = self._rt()
        futures = [rt.submit(fn, *a) for a in args]
        return [f.result(timeout=RESULT_TIMEOUT) for f in futures]

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None) -> list[Any]:
        return list(self._rt().map(fn, items, chunksize=chunksize, timeout=RESULT_TIMEOUT))

    def stream(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return iter(self._rt().map(fn, items, chunksize=chunksize, timeout=RESULT_TIMEOUT))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._rt().submit(fn, *args).result(timeout=RESULT_TIMEOUT)

    def worker_pids(self) -> list[int]:
        return sorted(self._rt().worker_pids().values())

    def close(self) -> None:
        if self.rt is not None:
            self.rt.shutdown(wait=True)
            self.rt = None


class PoolRunner(Runner):
    name = "pool"
    default_map = "Pool.map default chunksize (n/8)"

    def __init__(self) -> None:
        import multiprocessing
        import multiprocessing.pool

        self._ctx = multiprocessing.get_context("fork")
        self.pool: Any = None

    def start(self) -> None:
        self.pool = self._ctx.Pool(WORKERS)

    def submit_gather(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
        pending = [self.pool.apply_async(fn, a) for a in args]
        return [p.get(RESULT_TIMEOUT) for p in pending]

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None) -> list[Any]:
        return list(self.pool.map_async(fn, items, chunksize).get(RESULT_TIMEOUT))

    def stream(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return iter(self.pool.imap(fn, items, chunksize or 1))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply_async(fn, args).get(RESULT_TIMEOUT)

    def worker_pids(self) -> list[int]:
        return sorted(p.pid for p in self.pool._pool)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


class _ExecutorRunner(Runner):
    """Shared code of the ``concurrent.futures``-style executors."""

    def __init__(self) -> None:
        self.ex: Any = None

    def submit_gather(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
        futures = [self.ex.submit(fn, *a) for a in args]
        return [f.result(RESULT_TIMEOUT) for f in futures]

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None) -> list[Any]:
        return list(self.ex.map(fn, items, timeout=RESULT_TIMEOUT, chunksize=chunksize or 1))

    def stream(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return iter(self.ex.map(fn, items, timeout=RESULT_TIMEOUT, chunksize=chunksize or 1))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.ex.submit(fn, *args).result(RESULT_TIMEOUT)

    def worker_pids(self) -> list[int]:
        return sorted(self.ex._processes)


class PhalanxExecutorRunner(_ExecutorRunner):
    """``phalanx.Executor``: what the ``concurrent.futures`` adapter costs over ``phalanx.Runtime``."""

    name = "executor"
    default_map = "Executor.map chunksize=1"

    def __init__(self) -> None:
        super().__init__()
        import phalanx

        self._cls = phalanx.Executor

    def start(self) -> None:
        self.ex = self._cls(WORKERS)

    def worker_pids(self) -> list[int]:
        return sorted(self.ex.runtime.worker_pids().values())

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True)
            self.ex = None


class PPERunner(_ExecutorRunner):
    name = "ppe"
    default_map = "PPE.map chunksize=1"

    def __init__(self) -> None:
        super().__init__()
        import concurrent.futures.process

        self._cls = concurrent.futures.process.ProcessPoolExecutor

    def start(self) -> None:
        self.ex = self._cls(WORKERS)

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True)
            self.ex = None


class LokyRunner(_ExecutorRunner):
    name = "loky"
    default_map = "loky map chunksize=1"

    def __init__(self) -> None:
        super().__init__()
        import loky  # type: ignore[import-untyped,unused-ignore]

        self._get = loky.get_reusable_executor

    def start(self) -> None:
        self.ex = self._get(max_workers=WORKERS)

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True, kill_workers=True)
            self.ex = None


class RayRunner(Runner):
    """Ray tasks; only constructed when ``ray`` is importable."""

    name = "ray"
    default_map = "ray: no map (n/a)"

    def __init__(self) -> None:
        import ray  # type: ignore[import-not-found,unused-ignore]

        self._ray: Any = ray
        self._remote: dict[Callable[..., Any], Any] = {}

    def start(self) -> None:
        self._ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)

    def _r(self, fn: Callable[..., Any]) -> Any:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(fn)
        return remote

    def submit_gather(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
        remote = self._r(fn)
        return list(self._ray.get([remote.remote(*a) for a in args], timeout=RESULT_TIMEOUT))

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None) -> list[Any]:
        raise NotApplicable("ray has no map")

    def stream(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        raise NotApplicable("ray has no map")

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._ray.get(self._r(fn).remote(*args), timeout=RESULT_TIMEOUT)

    def worker_pids(self) -> list[int]:
        raise NotApplicable("ray worker pids are not exposed simply")

    def close(self) -> None:
        self._ray.shutdown()


_CLASSES: dict[str, Callable[[], Runner]] = {
    "phalanx": PhalanxRunner,
    "executor": PhalanxExecutorRunner,
    "pool": PoolRunner,
    "ppe": PPERunner,
    "loky": LokyRunner,
    "ray": RayRunner,
}

#: every runner name, in table order ("manager" only runs the actor workload W3,
#: "executor" only W1 and W2)
RUNNERS: tuple[str, ...] = ("phalanx", "executor", "pool", "ppe", "loky", "manager", "ray")
#: runners of the task workloads
TASK_RUNNERS: tuple[str, ...] = ("phalanx", "pool", "ppe", "loky", "ray")
#: runners of W1 and W2: the task runners and phalanx.Executor
ADAPTER_RUNNERS: tuple[str, ...] = ("phalanx", "executor", "pool", "ppe", "loky", "ray")


def available_runners(names: Iterable[str]) -> list[str]:
    """``names`` without Ray when it cannot be imported."""
    return [n for n in names if n != "ray" or ray_available()]


def make_runner(name: str) -> Runner:
    """A not yet started runner of the given name."""
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown task runner {name!r}; known: {', '.join(_CLASSES)}") from None
    return cls()
