"""One adapter per executor, behind a common interface the workloads drive.

Runs in the child measuring process (``benchmarks.run_one``), never in the
orchestrator. Each runner owns a pool of :data:`WORKERS` worker processes:

=========  ==================================================================
phalanx    ``phalanx.Runtime(workers=2)`` (its default start method)
inline     the same with ``shm_threshold=0``: arrays inline in frames, not in shared memory (W5 only)
executor   ``phalanx.Executor(2)``: the ``concurrent.futures`` adapter on the same
           runtime (W1 and W2 only, to show the adapter's overhead)
pool       ``multiprocessing.get_context("fork").Pool(2)``
ppe        ``concurrent.futures.ProcessPoolExecutor(2)`` (default context: fork)
loky       ``loky.get_reusable_executor(max_workers=2)``
ray        ``ray.init(num_cpus=2)`` + remote functions (only if ``ray`` imports)
dask       ``distributed.LocalCluster(n_workers=2, threads_per_worker=1)`` + a Client
ipyparallel ``ipyparallel.Cluster(n=2)`` engines + a load-balanced view
mpire      ``mpire.WorkerPool(n_jobs=2, start_method="fork", keep_alive=True)``
static     ``Pool(2)`` handing each worker its whole share at once (W8's ceiling: no per-task dispatch)
=========  ==================================================================

The last three (and Ray) run only when installed: ``pip install -e '.[bench]'``
pulls in Dask distributed, ipyparallel and mpire; Ray (large) is left to the
user. W8 builds every pool with 2, 8 and 32 workers instead of 2.

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
    "OPTIONAL_PEERS",
    "PEER_RUNNERS",
    "peer_available",
    "peers_present",
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


def kill_all(procs: list[Any]) -> list[str]:
    """SIGKILL each ``psutil.Process`` (psutil checks it is still the one listed); what was killed."""
    import psutil

    killed = []
    for proc in procs:
        try:
            killed.append(f"pid {proc.pid}: {' '.join(proc.cmdline()) or proc.name()}")
            proc.kill()
        except psutil.Error:
            pass
    return killed


def end_processes(procs: list[Any], wait: float, then: float) -> list[str]:
    """Wait up to ``wait`` s for ``procs`` to exit, SIGKILL those that stay and wait ``then`` s
    for them; what was killed."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=wait)
    killed = kill_all(alive)
    psutil.wait_procs(alive, timeout=then)
    return killed


class Runner(abc.ABC):
    """A pool of :data:`WORKERS` processes running module-level functions."""

    name: str = "?"
    #: what ``map(..., chunksize=None)`` means for this runner (table legend)
    default_map: str = "?"

    def __init__(self, workers: int = WORKERS) -> None:
        #: worker processes in the pool
        self.workers = workers

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

    def __init__(self, workers: int = WORKERS) -> None:
        super().__init__(workers)
        import phalanx

        # `import phalanx` defers the runtime's modules to first use: load them here, so
        # that W6 times the constructor and the first call, not imports (as for the peers).
        phalanx.Runtime  # noqa: B018
        self._phalanx = phalanx
        self.rt: phalanx.Runtime | None = None

    def start(self) -> None:
        self.rt = self._phalanx.Runtime(workers=self.workers)

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


class PhalanxInlineRunner(PhalanxRunner):
    """``phalanx.Runtime(workers=2, shm_threshold=0)``: arrays inline in the frames (W5's "before")."""

    name = "inline"

    def start(self) -> None:
        self.rt = self._phalanx.Runtime(workers=self.workers, shm_threshold=0)


class PoolRunner(Runner):
    name = "pool"
    default_map = "Pool.map default chunksize (n/8)"

    def __init__(self, workers: int = WORKERS) -> None:
        super().__init__(workers)
        import multiprocessing
        import multiprocessing.pool

        self._ctx = multiprocessing.get_context("fork")
        self.pool: Any = None

    def start(self) -> None:
        self.pool = self._ctx.Pool(self.workers)

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


class StaticRunner(PoolRunner):
    """W8's ceiling: ``Pool.starmap`` with one chunk per worker, so no task is dispatched on its own.

    What the machine gives the same sleeps when nothing is sent per task: each
    worker gets its share in one message and returns it in one.
    """

    name = "static"
    default_map = "Pool.map one chunk per worker"

    def submit_gather(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
        chunksize = max(1, -(-len(args) // self.workers))
        return list(self.pool.starmap_async(fn, args, chunksize).get(RESULT_TIMEOUT))


class _ExecutorRunner(Runner):
    """Shared code of the ``concurrent.futures``-style executors."""

    def __init__(self, workers: int = WORKERS) -> None:
        super().__init__(workers)
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

    def __init__(self, workers: int = WORKERS) -> None:
        super().__init__(workers)
        import phalanx

        self._cls = phalanx.Executor

    def start(self) -> None:
        self.ex = self._cls(self.workers)

    def worker_pids(self) -> list[int]:
        return sorted(self.ex.runtime.worker_pids().values())

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True)
            self.ex = None


class PPERunner(_ExecutorRunner):
    name = "ppe"
    default_map = "PPE.map chunksize=1"

    def __init__(self, workers: int = WORKERS) -> None:
        super().__init__(workers)
        import concurrent.futures.process

        self._cls = concurrent.futures.process.ProcessPoolExecutor

    def start(self) -> None:
        self.ex = self._cls(self.workers)

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True)
            self.ex = None


class LokyRunner(_ExecutorRunner):
    name = "loky"
    default_map = "loky map chunksize=1"

    def __init__(self, workers: int = WORKERS) -> None:
        super().__init__(workers)
        import loky  # type: ignore[import-untyped,unused-ignore]

        self._get = loky.get_reusable_executor

    def start(self) -> None:
        self.ex = self._get(max_workers=self.workers)

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True, kill_workers=True)
            self.ex = None


class RayRunner(Runner):
    """Ray tasks; only constructed when ``ray`` is importable."""

    name = "ray"
    default_map = "ray: no map (n/a)"

    def __init__(self, workers: int = WORKERS) -> None:
        super().__init__(workers)
        import ray  # type: ignore[import-not-found,unused-ignore]

        self._ray: Any = ray
        self._remote: dict[Callable[..., Any], Any] = {}

    def start(self) -> None:
        self._ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)

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


class DaskRunner(Runner):
    """Dask distributed: a ``LocalCluster`` of worker processes, one thread each (if installed)."""

    name = "dask"
    default_map = "client.map (one task per item)"

    def __init__(self, workers: int = WORKERS) -> None:
        super().__init__(workers)
        import distributed  # type: ignore[import-not-found,import-untyped,unused-ignore]

        self._distributed: Any = distributed
        self.cluster: Any = None
        self.client: Any = None

    def start(self) -> None:
        import logging

        import dask

        d = self._distributed
        # 32 worker processes on 2 busy cores can leave a local connection silent past dask's 30 s
        # default, which then cancels every task ("scheduler-connection-lost"): nothing here is remote
        dask.config.set({"distributed.comm.timeouts.tcp": "300s", "distributed.comm.timeouts.connect": "300s"})
        self.cluster = d.LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None, silence_logs=logging.ERROR)
        self.client = d.Client(self.cluster)

    def submit_gather(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
        futures = [self.client.submit(fn, *a, pure=False) for a in args]
        return list(self.client.gather(futures))

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None) -> list[Any]:
        if chunksize is not None:
            raise NotApplicable("dask's client.map has no chunksize")
        return list(self.client.gather(self.client.map(fn, items, pure=False)))

    def stream(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        raise NotApplicable("dask has no streaming map over an unbounded iterable")

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False).result(timeout=RESULT_TIMEOUT)

    def worker_pids(self) -> list[int]:
        import os

        return sorted(self.client.run(os.getpid).values())

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.cluster.close()
            self.client = self.cluster = None


class IpyparallelRunner(Runner):
    """ipyparallel (ZeroMQ-based): a local cluster of engines and a load-balanced view (if installed)."""

    name = "ipyparallel"
    default_map = "view.map chunksize=1"

    def __init__(self, workers: int = WORKERS) -> None:
        super().__init__(workers)
        import ipyparallel  # type: ignore[import-not-found,import-untyped,unused-ignore]

        self._ipp: Any = ipyparallel
        self.cluster: Any = None
        self.rc: Any = None
        self.view: Any = None

    def start(self) -> None:
        import logging

        self.cluster = self._ipp.Cluster(n=self.workers, log_level=logging.ERROR)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(self.workers, timeout=RESULT_TIMEOUT)
        self.view = self.rc.load_balanced_view()

    def submit_gather(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
        pending = [self.view.apply_async(fn, *a) for a in args]
        return [p.get(timeout=RESULT_TIMEOUT) for p in pending]

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None) -> list[Any]:
        result = self.view.map_async(fn, items, chunksize=chunksize or 1, ordered=True)
        return list(result.get(timeout=RESULT_TIMEOUT))

    def stream(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        raise NotApplicable("ipyparallel's map needs the whole sequence first")

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.view.apply_async(fn, *args).get(timeout=RESULT_TIMEOUT)

    def worker_pids(self) -> list[int]:
        import os

        return sorted(self.rc[:].apply_sync(os.getpid))

    def close(self) -> None:
        """Stop the engines, then the controller, and wait until every process of the cluster is gone.

        Each engine has a nanny (a process in a session of its own) that, once its engine
        exits, tells the controller and only then exits: stopping the controller first
        (what ``stop_cluster`` does, concurrently) leaves the nannies lingering 3 s on an
        unanswered message, past the orchestrator's grace, which then reports them.
        """
        if self.cluster is None:
            return
        import psutil

        ours = psutil.Process().children(recursive=True)  # controller, engines, their nannies
        try:
            self.rc.close()
            self.cluster.stop_engines_sync()
        finally:
            try:
                self.cluster.stop_controller_sync()
            finally:
                self.cluster = self.rc = self.view = None
                end_processes(ours, wait=10, then=5)


class MpireRunner(Runner):
    """mpire's ``WorkerPool`` (fork, workers kept alive between calls; if installed).

    An mpire worker picks how it unpacks a task's arguments once, when it starts or
    when a call brings map parameters different from the ones it has: ordered calls
    (``map``, ``imap``) send ``(index, args)`` pairs and need the helper that strips the
    index, chosen only while the pool is in ordered mode. A worker started by
    ``apply_async`` keeps the plain helper, and a later ``map`` of the same function
    (equal parameters: nothing is re-sent) then calls ``fn(index, args)``. So the
    first ordered call on workers that ``apply_async`` started stops them, and the
    ordered call starts new ones (outside every timed window: the workloads warm the
    map path first). ``apply_async`` itself never uses the cached helper.
    """

    name = "mpire"
    default_map = "WorkerPool.map default chunk_size"

    def __init__(self, workers: int = WORKERS) -> None:
        super().__init__(workers)
        import mpire  # type: ignore[import-not-found,import-untyped,unused-ignore]

        self._mpire: Any = mpire
        self.pool: Any = None
        #: how the running workers were started: None (none running), "apply" or "ordered"
        self._started_by: str | None = None

    def start(self) -> None:
        self.pool = self._mpire.WorkerPool(n_jobs=self.workers, start_method="fork", keep_alive=True)
        self._started_by = None

    def _apply(self) -> None:
        if self._started_by is None:
            self._started_by = "apply"

    def _ordered(self) -> None:
        if self._started_by == "apply":
            self.pool.stop_and_join()
        self._started_by = "ordered"

    def submit_gather(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
        self._apply()
        pending = [self.pool.apply_async(fn, args=a) for a in args]
        return [p.get(timeout=RESULT_TIMEOUT) for p in pending]

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None) -> list[Any]:
        self._ordered()
        return list(self.pool.map(fn, [(x,) for x in items], chunk_size=chunksize, progress_bar=False))

    def stream(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        self._ordered()
        return iter(self.pool.imap(fn, ((x,) for x in items), chunk_size=chunksize or 1, progress_bar=False))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._apply()
        return self.pool.apply_async(fn, args=args).get(timeout=RESULT_TIMEOUT)

    def worker_pids(self) -> list[int]:
        raise NotApplicable("mpire does not expose its worker pids")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop_and_join()
            self.pool = None
            self._started_by = None


_CLASSES: dict[str, Callable[[int], Runner]] = {
    "phalanx": PhalanxRunner,
    "inline": PhalanxInlineRunner,
    "executor": PhalanxExecutorRunner,
    "pool": PoolRunner,
    "ppe": PPERunner,
    "loky": LokyRunner,
    "ray": RayRunner,
    "static": StaticRunner,
    "dask": DaskRunner,
    "ipyparallel": IpyparallelRunner,
    "mpire": MpireRunner,
}

#: the peers that run only when installed (``pip install -e '.[bench]'`` brings all but Ray),
#: each with the module that tells whether it is
OPTIONAL_PEERS: dict[str, str] = {
    "ray": "ray",
    "dask": "distributed",
    "ipyparallel": "ipyparallel",
    "mpire": "mpire",
}
#: the optional peers that run the task workloads (W1, W2, W4, W5, W6, W8)
PEER_RUNNERS: tuple[str, ...] = ("dask", "ipyparallel", "mpire")

#: every runner name, in table order ("manager" only runs the actor workload W3,
#: "executor" only W1 and W2, "static" only W8)
RUNNERS: tuple[str, ...] = ("phalanx", "inline", "executor", "pool", "ppe", "loky", "manager", "ray", *PEER_RUNNERS,
                           "static")
#: runners of the task workloads
TASK_RUNNERS: tuple[str, ...] = ("phalanx", "pool", "ppe", "loky", "ray", *PEER_RUNNERS)
#: runners of W1 and W2: the task runners and phalanx.Executor
ADAPTER_RUNNERS: tuple[str, ...] = ("phalanx", "inline", "executor", "pool", "ppe", "loky", "ray", *PEER_RUNNERS)


def peer_available(name: str) -> bool:
    """True unless ``name`` is an optional peer whose package is not installed (checked without importing it)."""
    module = OPTIONAL_PEERS.get(name)
    return module is None or importlib.util.find_spec(module) is not None


def peers_present() -> dict[str, bool]:
    """Each optional peer: installed or not."""
    return {name: peer_available(name) for name in OPTIONAL_PEERS}


def available_runners(names: Iterable[str]) -> list[str]:
    """``names`` without the optional peers that are not installed."""
    return [n for n in names if peer_available(n)]


def make_runner(name: str, workers: int = WORKERS) -> Runner:
    """A not yet started runner of the given name, with ``workers`` worker processes."""
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown task runner {name!r}; known: {', '.join(_CLASSES)}") from None
    return cls(workers)
