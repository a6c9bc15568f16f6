"""The workloads W1..W8: what each one measures, and how, on one runner.

The metadata (:data:`WORKLOADS`: titles, metrics, units, which direction is
better, which runners take part, sizes) is read by the orchestrator
(``benchmarks/__main__.py``). The ``_run_*`` functions run in the child
measuring process (``benchmarks/run_one.py``): each starts one runner's pool,
warms it up, times the workload with start-up excluded (except W6), checks
every result, and returns its numbers.

Every run checks its results: a wrong result raises :class:`BenchmarkError`,
the child exits non-zero and the whole suite fails loudly.

=====  ================================================================================
W1     tiny tasks: 20,000 x inc(x)=x+1; (a) submit all, then gather; (b) map [tasks/s]
       (also on phalanx.Executor, to show the adapter's overhead)
W2     round trip: 2,000 sequential submit(noop).result() [median, p99 us] (also on phalanx.Executor)
W3     actor calls: 10,000 counter.incr(), sequential and pipelined [calls/s]
W4     CPU-bound: 32 x ~50 ms pure-Python loops [task-CPU-s per wall-s; ideal 2.0]
W5     payload: 8 MB and 64 MB float64 numpy array, one way and both ways [MB/s]
W6     start-up: pool constructor to first result [ms]; idle PSS per worker [MB]
W7     scale: 10^3..10^6 tiny tasks through a streaming map [tasks/s, driver RSS growth]
W8     many workers: 1 ms sleep tasks on 2, 8 and 32 workers, and on 16 remote workers (8 hosts
       x 2 in network namespaces, tcp+CURVE) [tasks/s, share of the ideal workers x 1000/s,
       driver CPU per task]
=====  ================================================================================
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from . import ops
from .runners import (
    ADAPTER_RUNNERS,
    OPTIONAL_PEERS,
    PEER_RUNNERS,
    TASK_RUNNERS,
    WORKERS,
    NotApplicable,
    Runner,
    make_runner,
    pool_chunksize,
)

__all__ = [
    "BenchmarkError",
    "NotAvailable",
    "Metric",
    "Workload",
    "Outcome",
    "WORKLOADS",
    "get",
]

MB = 1024 * 1024


class BenchmarkError(AssertionError):
    """A runner returned a wrong result: the benchmark is invalid."""


class NotAvailable(Exception):
    """The runner cannot run this workload at all (yet); the reason is shown as n/a."""


class Outcome(TypedDict):
    """What one child measurement returns."""

    metrics: dict[str, float]
    info: dict[str, Any]


@dataclass(frozen=True)
class Metric:
    """One number a workload reports, and how to read it."""

    key: str
    label: str
    unit: str
    higher_is_better: bool

    @property
    def better(self) -> str:
        return "higher" if self.higher_is_better else "lower"


@dataclass(frozen=True)
class Workload:
    """A workload: metadata for the orchestrator, ``run`` for the child."""

    id: str
    title: str
    runners: tuple[str, ...]
    metrics: Callable[[bool], list[Metric]]
    run: Callable[[str, int | None, bool], Outcome]
    #: sizes run as separate children (``None``: one child with the default size)
    sizes: Callable[[bool], list[int | None]] = lambda quick: [None]
    note: str = ""
    #: the title under ``--quick`` (smaller sizes), if it differs
    quick_title: str = ""
    #: phalanx on remote hosts (network namespaces), run as one more phalanx child per repeat
    #: (``run_one --remote``); raises :class:`NotAvailable` where namespaces cannot be made
    remote: Callable[[bool], Outcome] | None = None

    def heading(self, quick: bool) -> str:
        return (self.quick_title or self.title) if quick else self.title


# ---- helpers ------------------------------------------------------------------------


def check_equal(got: Sequence[Any], expected: Sequence[Any], what: str) -> None:
    """Raise :class:`BenchmarkError` unless ``got == expected`` (names the first mismatch)."""
    got = list(got)
    if got == list(expected):
        return
    if len(got) != len(expected):
        raise BenchmarkError(f"{what}: {len(got)} results, expected {len(expected)}")
    index = next(i for i, (g, e) in enumerate(zip(got, expected)) if g != e)
    raise BenchmarkError(f"{what}: result {index} is {got[index]!r}, expected {expected[index]!r}")


def _started(runner_name: str) -> Runner:
    runner = make_runner(runner_name)
    runner.start()
    return runner


def _warm_up(runner: Runner) -> None:
    """Every worker up, the op module imported, the pool's threads running."""
    check_equal(runner.submit_gather(ops.inc, [(i,) for i in range(200)]), range(1, 201), "warm-up")


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.inf


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    index = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[index]


#: seconds one measurement of an optional peer aims at (full run, quick run)
PEER_TARGET_S = 4.0
PEER_TARGET_S_QUICK = 0.5
#: seconds a calibration probe must last for its rate to be trusted
PROBE_S = 0.25
#: the first probe's size (it grows 4x until it lasts PROBE_S)
PROBE_START = 32
#: said in the notes of the workloads whose optional peers are sized by a probe
SIZED_NOTE = (f"optional peers (Ray, Dask, ipyparallel, mpire) run fewer tasks where the full size would take "
              f"more than ~{PEER_TARGET_S:.0f} s, sized by a short probe; a rate is a rate, the sizes used are listed")


def peer_size(runner_name: str, default: int, floor: int, quick: bool, run: Callable[[int], float]) -> int:
    """How many tasks one measurement of ``runner_name`` times.

    ``default`` for phalanx and the core peers (nothing is probed: their figures are
    the same as ever). For an optional peer, which can be a hundred times slower per
    task: probes of growing size (``run(k)`` does ``k`` tasks, checks them and returns
    the seconds they took) until one lasts :data:`PROBE_S`, then as many tasks as
    that rate gets through in :data:`PEER_TARGET_S` seconds, between ``floor`` and
    ``default``. A throughput over fewer tasks is the same measure, and every
    workload finishes in bounded time on a slow runner.
    """
    if runner_name not in OPTIONAL_PEERS:
        return default
    floor = min(floor, default)
    k = min(PROBE_START, default)
    while True:
        seconds = run(k)
        if seconds >= PROBE_S or k >= default:
            break
        k = min(default, k * 4)
    target = PEER_TARGET_S_QUICK if quick else PEER_TARGET_S
    if seconds <= 0 or seconds * default / k <= target:
        return default
    return max(floor, min(default, int(k / seconds * target)))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the seconds it took."""
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


class _RssSampler(threading.Thread):
    """Samples this process's RSS every ``period`` seconds; keeps the peak."""

    def __init__(self, period: float = 0.01) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        import psutil

        self._proc = psutil.Process()
        self._period = period
        self._stop_event = threading.Event()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self.samples = 0

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = self._proc.memory_info().rss
            self.samples += 1
            if rss > self.peak:
                self.peak = rss
            self._stop_event.wait(self._period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


# ---- W1 tiny tasks ------------------------------------------------------------------


def _w1_metrics(quick: bool) -> list[Metric]:
    return [
        Metric("submit_tps", "(a) submit all, then gather", "tasks/s", True),
        Metric("map_default_tps", "(b1) map, runner's default chunking", "tasks/s", True),
        Metric("map_poolchunk_tps", "(b2) map, chunksize=Pool's rule", "tasks/s", True),
    ]


def _run_w1(runner_name: str, size: int | None, quick: bool) -> Outcome:
    n = size or (2_000 if quick else 20_000)
    items = list(range(n))
    args = [(x,) for x in items]
    expected = [x + 1 for x in items]
    floor = 100 if quick else 200
    runner = _started(runner_name)
    metrics: dict[str, float] = {}
    sizes: dict[str, int] = {}
    info: dict[str, Any] = {"n": n, "default_map": runner.default_map, "pool_chunksize": pool_chunksize(n),
                            "sizes": sizes}

    def submit(k: int) -> float:
        some = args[:k]
        got, seconds = _timed(lambda: runner.submit_gather(ops.inc, some))
        check_equal(got, expected[:k], "W1 submit")
        return seconds

    try:
        _warm_up(runner)
        k = sizes["(a)"] = peer_size(runner_name, n, floor, quick, submit)
        metrics["submit_tps"] = _rate(k, submit(k))
        for key, label, rule in (("map_default_tps", "(b1)", False), ("map_poolchunk_tps", "(b2)", True)):

            def mapped(k: int) -> float:
                some, chunksize = items[:k], pool_chunksize(k) if rule else None
                got, seconds = _timed(lambda: runner.map(ops.inc, some, chunksize))
                check_equal(got, expected[:k], f"W1 {key}")
                return seconds

            try:
                runner.map(ops.inc, items[:100], pool_chunksize(n) if rule else None)  # warm the map path
                k = sizes[label] = peer_size(runner_name, n, floor, quick, mapped)
                metrics[key] = _rate(k, mapped(k))
            except NotApplicable as exc:
                info.setdefault("na", {})[key] = str(exc)
    finally:
        runner.close()
    info["pool_chunksize"] = pool_chunksize(sizes.get("(b2)", n))
    return {"metrics": metrics, "info": info}


# ---- W2 round trip ------------------------------------------------------------------


def _w2_metrics(quick: bool) -> list[Metric]:
    return [
        Metric("median_us", "submit(noop).result(), median", "us", False),
        Metric("p99_us", "submit(noop).result(), p99", "us", False),
    ]


def _run_w2(runner_name: str, size: int | None, quick: bool) -> Outcome:
    n = size or (200 if quick else 2_000)
    clock = time.perf_counter_ns
    runner = _started(runner_name)

    def round_trips(k: int) -> list[float]:
        latencies: list[float] = []
        for _ in range(k):
            t0 = clock()
            value = runner.call(ops.noop)
            latencies.append((clock() - t0) / 1000.0)
            if value is not None:
                raise BenchmarkError(f"W2: noop returned {value!r}")
        return latencies

    try:
        _warm_up(runner)
        for _ in range(50):
            runner.call(ops.noop)
        n = peer_size(runner_name, n, 50 if quick else 200, quick, lambda k: sum(round_trips(k)) / 1e6)
        latencies = round_trips(n)
    finally:
        runner.close()
    latencies.sort()
    return {
        "metrics": {"median_us": statistics.median(latencies), "p99_us": _percentile(latencies, 0.99)},
        "info": {"n": n, "mean_us": statistics.fmean(latencies), "max_us": latencies[-1], "sizes": {"calls": n}},
    }


# ---- W3 actor calls -----------------------------------------------------------------


def _w3_metrics(quick: bool) -> list[Metric]:
    return [
        Metric("seq_cps", "counter.incr(), sequential", "calls/s", True),
        Metric("pipe_cps", "counter.incr(), pipelined", "calls/s", True),
    ]


def _resolve(value: Any) -> Any:
    """A call's value, waiting for it if the call returned a future."""
    result = getattr(value, "result", None)
    return result(timeout=300) if callable(result) else value


def _actor_phalanx(n: int) -> tuple[float, float]:
    """Sequential and pipelined calls/s on a phalanx actor (``ref.incr()`` is a Future)."""
    import phalanx

    rt: Any = phalanx.Runtime(workers=WORKERS)
    try:
        ref = rt.spawn(ops.Counter)
        for _ in range(100):
            _resolve(ref.incr())
        t0 = time.perf_counter()
        for _ in range(n):
            last = _resolve(ref.incr())
        seq = _rate(n, time.perf_counter() - t0)
        if last != 100 + n:
            raise BenchmarkError(f"W3 phalanx sequential: counter is {last}, expected {100 + n}")
        t0 = time.perf_counter()
        pending = [ref.incr() for _ in range(n)]
        values = [_resolve(p) for p in pending]
        pipe = _rate(n, time.perf_counter() - t0)
        check_equal(values, range(101 + n, 101 + 2 * n), "W3 phalanx pipelined")
        return seq, pipe
    finally:
        rt.shutdown()


def _actor_manager(n: int) -> float:
    """Sequential calls/s through a ``multiprocessing.managers`` proxy."""
    import multiprocessing
    from multiprocessing.managers import BaseManager

    class CounterManager(BaseManager):
        pass

    CounterManager.register("Counter", ops.Counter)
    manager = CounterManager(ctx=multiprocessing.get_context("fork"))
    manager.start()
    try:
        counter: Any = manager.Counter()  # type: ignore[attr-defined]
        for _ in range(100):
            counter.incr()
        t0 = time.perf_counter()
        for _ in range(n):
            last = counter.incr()
        seq = _rate(n, time.perf_counter() - t0)
        if last != 100 + n or counter.get() != 100 + n:
            raise BenchmarkError(f"W3 manager: counter is {last}, expected {100 + n}")
        return seq
    finally:
        manager.shutdown()


def _actor_ray(n: int) -> tuple[float, float]:
    import ray  # type: ignore[import-not-found,unused-ignore]

    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    try:
        actor: Any = ray.remote(ops.Counter).remote()
        ray.get([actor.incr.remote() for _ in range(100)])
        t0 = time.perf_counter()
        for _ in range(n):
            last = ray.get(actor.incr.remote())
        seq = _rate(n, time.perf_counter() - t0)
        if last != 100 + n:
            raise BenchmarkError(f"W3 ray sequential: counter is {last}, expected {100 + n}")
        t0 = time.perf_counter()
        values = ray.get([actor.incr.remote() for _ in range(n)])
        pipe = _rate(n, time.perf_counter() - t0)
        check_equal(values, range(101 + n, 101 + 2 * n), "W3 ray pipelined")
        return seq, pipe
    finally:
        ray.shutdown()


def _run_w3(runner_name: str, size: int | None, quick: bool) -> Outcome:
    n = size or (500 if quick else 10_000)
    info: dict[str, Any] = {"n": n}
    if runner_name == "phalanx":
        import phalanx

        if not hasattr(phalanx.Runtime, "spawn"):
            raise NotAvailable("not implemented")
        seq, pipe = _actor_phalanx(n)
        return {"metrics": {"seq_cps": seq, "pipe_cps": pipe}, "info": info}
    if runner_name == "manager":
        info["na"] = {"pipe_cps": "manager proxies are synchronous"}
        return {"metrics": {"seq_cps": _actor_manager(n)}, "info": info}
    if runner_name == "ray":
        seq, pipe = _actor_ray(n)
        return {"metrics": {"seq_cps": seq, "pipe_cps": pipe}, "info": info}
    raise ValueError(f"W3 has no runner {runner_name!r}")


# ---- W4 CPU-bound -------------------------------------------------------------------


def _w4_metrics(quick: bool) -> list[Metric]:
    return [
        Metric("cpu_per_wall", "task-CPU-s per wall-s (ideal 2.0)", "ratio", True),
        Metric("wall_s", "wall time of the batch", "s", False),
    ]


def _calibrate(target_s: float) -> int:
    """Iterations of :func:`ops.spin_checksum` that take about ``target_s`` CPU seconds."""
    probe = 100_000
    best = math.inf
    for _ in range(3):
        t0 = time.process_time()
        ops.spin_checksum(probe)
        best = min(best, time.process_time() - t0)
    return max(1000, int(probe * target_s / max(best, 1e-6)))


def _run_w4(runner_name: str, size: int | None, quick: bool) -> Outcome:
    tasks = size or (8 if quick else 32)
    target = 0.02 if quick else 0.05
    iterations = _calibrate(target)
    t0 = time.process_time()
    expected = ops.spin_checksum(iterations)
    local = time.process_time() - t0
    runner = _started(runner_name)
    try:
        _warm_up(runner)
        runner.submit_gather(ops.spin, [(1000,)] * WORKERS)
        t0 = time.perf_counter()
        got = runner.submit_gather(ops.spin, [(iterations,)] * tasks)
        wall = time.perf_counter() - t0
    finally:
        runner.close()
    check_equal([int(g[0]) for g in got], [expected] * tasks, "W4 checksums")
    cpu = sum(float(g[1]) for g in got)
    return {
        "metrics": {"cpu_per_wall": cpu / wall, "wall_s": wall},
        "info": {
            "tasks": tasks,
            "iterations": iterations,
            "local_task_ms": local * 1000,
            "task_cpu_mean_ms": cpu / tasks * 1000,
            "ideal_wall_s": tasks * local / WORKERS,
        },
    }


# ---- W5 numpy payload ---------------------------------------------------------------


#: W5's large size (MB)
W5_LARGE = 64


def _w5_sizes(quick: bool) -> list[int | None]:
    return [None] if quick else [None, W5_LARGE]


def _w5_metrics(quick: bool) -> list[Metric]:
    mb = 1 if quick else 8
    out = [
        Metric("one_way_mbps", f"{mb} MB array in, sum out", "MB/s", True),
        Metric("both_ways_mbps", f"{mb} MB array in, array out", "MB/s", True),
    ]
    if not quick:
        out += [
            Metric(f"one_way_mbps_{W5_LARGE}", f"{W5_LARGE} MB array in, sum out", "MB/s", True),
            Metric(f"both_ways_mbps_{W5_LARGE}", f"{W5_LARGE} MB array in, array out", "MB/s", True),
        ]
    return out


def _run_w5(runner_name: str, size: int | None, quick: bool) -> Outcome:
    import numpy as np

    from . import ops_numpy

    mb = size or (1 if quick else 8)
    reps = 3 if quick else max(3, 160 // mb)
    array = np.random.default_rng(0).random(mb * MB // 8)
    expected_sum = float(array.sum())
    runner = _started(runner_name)
    try:
        if runner_name in ("phalanx", "inline"):
            try:
                runner.call(ops_numpy.np_sum, np.zeros(4))
            except TypeError as exc:  # phalanx.EncodeError is a TypeError
                raise NotAvailable(f"not implemented (numpy payload: {exc})") from None
        for _ in range(2):
            runner.call(ops_numpy.np_sum, array)
            runner.call(ops_numpy.np_echo, array)
        t0 = time.perf_counter()
        for _ in range(reps):
            total = runner.call(ops_numpy.np_sum, array)
            # numpy's sum depends on the buffer's alignment (its SIMD pairwise order): a peer that
            # hands the worker an unaligned copy (dask) gets the last digit differently
            if not math.isclose(total, expected_sum, rel_tol=1e-12):
                raise BenchmarkError(f"W5 one way: sum {total!r}, expected {expected_sum!r}")
        one_way = _rate(reps * mb, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(reps):
            back = runner.call(ops_numpy.np_echo, array)
            if not isinstance(back, np.ndarray) or not np.array_equal(back, array):
                raise BenchmarkError(f"W5 both ways: got {type(back).__name__}, not the same array")
        both = _rate(reps * mb, time.perf_counter() - t0)
    finally:
        runner.close()
    suffix = f"_{size}" if size else ""
    return {"metrics": {f"one_way_mbps{suffix}": one_way, f"both_ways_mbps{suffix}": both},
            "info": {"mb": mb, "reps": reps}}


# ---- W6 start-up --------------------------------------------------------------------


def _w6_metrics(quick: bool) -> list[Metric]:
    return [
        Metric("startup_ms", "constructor -> first result", "ms", False),
        Metric("pss_mb", "idle PSS per worker", "MB", False),
    ]


def _run_w6(runner_name: str, size: int | None, quick: bool) -> Outcome:
    import psutil

    runner = make_runner(runner_name)  # imports the runner's modules: not timed
    gc.collect()
    try:
        t0 = time.perf_counter()
        runner.start()
        value = runner.call(ops.inc, 1)
        startup = time.perf_counter() - t0
        if value != 2:
            raise BenchmarkError(f"W6: inc(1) returned {value!r}")
        time.sleep(0.5 if quick else 1.0)  # let the workers go idle
        metrics: dict[str, float] = {"startup_ms": startup * 1000}
        info: dict[str, Any] = {}
        try:
            pids = runner.worker_pids()
        except NotApplicable as exc:
            info["na"] = {"pss_mb": str(exc)}
        else:
            pss = [psutil.Process(pid).memory_full_info().pss for pid in pids]
            if not pss:
                raise BenchmarkError("W6: the runner reports no worker processes")
            metrics["pss_mb"] = statistics.fmean(pss) / MB
            info["workers"] = len(pss)
            info["pss_mb_each"] = [p / MB for p in pss]
    finally:
        runner.close()
    return {"metrics": metrics, "info": info}


# ---- W7 scale -----------------------------------------------------------------------


def _w7_sizes(quick: bool) -> list[int | None]:
    return [10**3, 10**4] if quick else [10**3, 10**4, 10**5, 10**6]


def _w7_metrics(quick: bool) -> list[Metric]:
    out: list[Metric] = []
    for n in _w7_sizes(quick):
        assert n is not None
        exp = round(math.log10(n))
        out.append(Metric(f"tps_{n}", f"10^{exp} items, throughput", "tasks/s", True))
        out.append(Metric(f"rss_{n}", f"10^{exp} items, driver peak RSS growth", "MB", False))
    return out


def _run_w7(runner_name: str, size: int | None, quick: bool) -> Outcome:
    n = size or 10**4
    # phalanx: rt.map's own automatic chunking; peers: the chunksize Pool.map would choose.
    chunksize = None if runner_name == "phalanx" else pool_chunksize(n)
    runner = _started(runner_name)
    try:
        _warm_up(runner)
        try:
            warm_chunksize = None if chunksize is None else pool_chunksize(1000)
            for i, y in enumerate(runner.stream(ops.inc, range(1000), warm_chunksize)):
                if y != i + 1:
                    raise BenchmarkError(f"W7 warm-up: result {i} is {y!r}")
        except NotApplicable as exc:
            raise NotAvailable(str(exc)) from None
        gc.collect()
        sampler = _RssSampler()
        sampler.start()
        count = 0
        t0 = time.perf_counter()
        try:
            for i, y in enumerate(runner.stream(ops.inc, range(n), chunksize)):
                if y != i + 1:
                    raise BenchmarkError(f"W7 {n}: result {i} is {y!r}, expected {i + 1}")
                count += 1
            elapsed = time.perf_counter() - t0
        finally:
            sampler.stop()
        if count != n:
            raise BenchmarkError(f"W7 {n}: {count} results, expected {n}")
    finally:
        runner.close()
    return {
        "metrics": {f"tps_{n}": _rate(n, elapsed), f"rss_{n}": (sampler.peak - sampler.baseline) / MB},
        "info": {
            "n": n,
            "chunksize": chunksize if chunksize is not None else "auto",
            "baseline_rss_mb": sampler.baseline / MB,
            "rss_samples": sampler.samples,
            "seconds": elapsed,
        },
    }


# ---- W8 many workers ----------------------------------------------------------------

#: milliseconds each W8 task sleeps
SLEEP_MS = 1.0
#: the remote hosts of W8: (namespace hosts, workers per host), full and quick
W8_REMOTE = (8, 2)
W8_REMOTE_QUICK = (2, 2)


def w8_remote_shape(quick: bool) -> tuple[int, int]:
    """(hosts, workers per host) of W8's remote measurement."""
    return W8_REMOTE_QUICK if quick else W8_REMOTE


def w8_tasks(workers: int, quick: bool) -> int:
    """How many 1 ms tasks W8 times on ``workers`` workers."""
    return workers * (20 if quick else 250)


def _w8_sizes(quick: bool) -> list[int | None]:
    return [2, 4] if quick else [2, 8, 32]


def _w8_metrics(quick: bool) -> list[Metric]:
    out: list[Metric] = []
    for w in _w8_sizes(quick):
        out.append(Metric(f"tps_{w}", f"{w} workers, throughput", "tasks/s", True))
        out.append(Metric(f"ideal_{w}", f"{w} workers, share of ideal ({w}k/s)", "ratio", True))
        out.append(Metric(f"cpu_{w}", f"{w} workers, driver CPU per task", "us", False))
    hosts, per_host = w8_remote_shape(quick)
    w = hosts * per_host
    where = f"{w} remote ({hosts}x{per_host}, tcp+CURVE)"
    out.append(Metric("tps_remote", f"{where}, throughput", "tasks/s", True))
    out.append(Metric("ideal_remote", f"{where}, share of ideal ({w}k/s)", "ratio", True))
    out.append(Metric("cpu_remote", f"{where}, driver CPU per task", "us", False))
    return out


def _run_ns(task_dir: str) -> int:
    """Nanoseconds one thread ran on a CPU (``/proc/.../task/TID/schedstat``: exact up to its last
    switch, where the tick-counted ``stat`` fields are 10 ms coarse)."""
    with open(f"{task_dir}/schedstat") as f:
        return int(f.read().split()[0])


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by thread name (Linux; empty elsewhere).

    Python threads through their CPU clocks (exact even while running); the
    others (ZeroMQ's I/O thread, say) through schedstat.
    """
    out: dict[str, float] = {}
    python: set[int] = set()
    for t in threading.enumerate():
        try:
            ran = time.clock_gettime(time.pthread_getcpuclockid(t.ident or 0))
        except (OSError, AttributeError):
            continue
        python.add(t.native_id or 0)
        out[t.name] = out.get(t.name, 0.0) + ran
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    other = "threads not started by Python"  # ZeroMQ's I/O thread, say
    for tid in tids:
        if int(tid) in python:
            continue
        try:
            out[other] = out.get(other, 0.0) + _run_ns(f"/proc/self/task/{tid}") / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return out


def _tree_cpu(pids: Sequence[int]) -> float | None:
    """CPU seconds of these processes (all their threads) so far (None if one cannot be read).

    Through each process's CPU clock (``clock_getcpuclockid``: exact), else schedstat.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        total = 0.0
        for pid in pids:
            clock = ctypes.c_int()
            if libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
                total += time.clock_gettime(clock.value)
            else:
                total += sum(_run_ns(f"/proc/{pid}/task/{tid}") for tid in os.listdir(f"/proc/{pid}/task")) / 1e9
        return total
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _busy() -> float:
    import psutil

    t = psutil.cpu_times()
    return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)


def measure_w8(submit_gather: Callable[[Callable[..., Any], Sequence[tuple[Any, ...]]], list[Any]],
               workers: int, n: int, suffix: str, worker_pids: Callable[[], list[int]] | None = None) -> Outcome:
    """Time ``n`` sleep(1 ms) tasks through ``submit_gather`` on a pool of ``workers`` warm workers.

    Runs in the driver's process (the local runner's child, or the driver in
    its network namespace for remote hosts); the metric keys end in ``suffix``.
    The info says where the CPU went, per task: each thread of the driver,
    the workers (``worker_pids``, when they can be read here), and how many
    of the machine's cores were busy (with anything, ours or not).
    """
    submit_gather(ops.sleep_ms, [(0.0,)] * (workers * 4))
    try:
        pids = worker_pids() if worker_pids is not None else []
    except NotApplicable:
        pids = []
    # The driver process's CPU (all its threads: the caller, a pump, a pool's handler threads,
    # dask's in-process scheduler); separate daemons (ipyparallel's controller, Ray's raylet) are not in it.
    workers0, busy0 = _tree_cpu(pids), _busy()
    threads0 = _thread_cpu()  # last before the clock starts: the threads' window is the timed one
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    got = submit_gather(ops.sleep_ms, [(SLEEP_MS,)] * n)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    threads1 = _thread_cpu()
    busy, workers1 = _busy() - busy0, _tree_cpu(pids)
    check_equal(got, [SLEEP_MS] * n, f"W8 {workers} workers")
    tps = _rate(n, wall)
    per_thread = {name: round((threads1.get(name, 0.0) - before) / n * 1e6, 1) for name, before in threads0.items()
                  if threads1.get(name, 0.0) > before}
    workers_cpu = None if not pids or workers0 is None or workers1 is None else (workers1 - workers0) / n * 1e6
    return {
        "metrics": {f"tps_{suffix}": tps, f"ideal_{suffix}": tps / (workers * 1000.0 / SLEEP_MS),
                    f"cpu_{suffix}": cpu / n * 1e6},
        "info": {"workers": workers, "tasks": n, "seconds": wall, "driver_cpu_s": cpu,
                 "driver_threads": len(threads1), "driver_thread_cpu_us_per_task": per_thread,
                 "workers_cpu_us_per_task": workers_cpu, "machine_busy_cores": busy / wall if wall > 0 else None},
    }


def _run_w8(runner_name: str, size: int | None, quick: bool) -> Outcome:
    workers = size or 2
    runner = make_runner(runner_name, workers=workers)
    runner.start()

    def sleeps(k: int) -> float:
        got, seconds = _timed(lambda: runner.submit_gather(ops.sleep_ms, [(SLEEP_MS,)] * k))
        check_equal(got, [SLEEP_MS] * k, f"W8 {workers} workers")
        return seconds

    try:
        _warm_up(runner)
        n = peer_size(runner_name, w8_tasks(workers, quick), workers * 4, quick, sleeps)
        outcome = measure_w8(runner.submit_gather, workers, n, str(workers), runner.worker_pids)
        outcome["info"]["sizes"] = {f"{workers} workers": n}
        return outcome
    finally:
        runner.close()


def _run_w8_remote(quick: bool) -> Outcome:
    """W8 on remote workers: hosts made of network namespaces, the driver in one of its own."""
    from . import multihost

    hosts, per_host = w8_remote_shape(quick)
    return multihost.w8_remote(hosts, per_host, w8_tasks(hosts * per_host, quick))


# ---- the table ----------------------------------------------------------------------

WORKLOADS: dict[str, Workload] = {
    w.id: w
    for w in (
        Workload("W1", "tiny tasks: 20,000 x inc(x)=x+1", ADAPTER_RUNNERS, _w1_metrics, _run_w1,
                 quick_title="tiny tasks: 2,000 x inc(x)=x+1 (quick)",
                 note="(a) one task per message (Pool: apply_async); (b1) default map: "
                 "phalanx auto chunks, Pool n/8, PPE, loky and phalanx.Executor chunksize=1; (b2) every "
                 "runner gets Pool's chunksize rule ceil(n/8); " + SIZED_NOTE),
        Workload("W2", "round trip: 2,000 sequential submit(noop).result()", ADAPTER_RUNNERS,
                 _w2_metrics, _run_w2, quick_title="round trip: 200 sequential submit(noop).result() (quick)",
                 note=SIZED_NOTE.replace("a rate is a rate", "a latency is a latency")),
        Workload("W3", "actor calls: 10,000 x counter.incr()", ("phalanx", "manager", "ray"),
                 _w3_metrics, _run_w3, quick_title="actor calls: 500 x counter.incr() (quick)",
                 note="peer: multiprocessing.managers.BaseManager proxy (fork); Ray actor if installed"),
        Workload("W4", "CPU-bound: 32 x ~50 ms pure-Python loop", TASK_RUNNERS, _w4_metrics, _run_w4,
                 quick_title="CPU-bound: 8 x ~20 ms pure-Python loop (quick)",
                 note="CPU time measured inside each task (time.process_time)"),
        Workload("W5", "payload: 8 MB (20 calls) and 64 MB (3 calls) float64 numpy array, each way",
                 ("phalanx", "inline", *TASK_RUNNERS[1:]), _w5_metrics, _run_w5, sizes=_w5_sizes, quick_title="payload: 1 MB float64 numpy array, 3 calls each way (quick)",
                 note="sequential submit(op, array).result(); MB/s counts the array once per call; "
                 "phalanx: arrays >= 2 MiB (its default) through shared memory, inline: phalanx with shm_threshold=0"),
        Workload("W6", "start-up and idle memory", TASK_RUNNERS, _w6_metrics, _run_w6,
                 note="start-up includes worker start; PSS of forked workers shares the parent's pages"),
        Workload("W7", "scale: streaming map of tiny tasks",
                 tuple(r for r in TASK_RUNNERS if r not in ("ray", "dask", "ipyparallel")),
                 _w7_metrics, _run_w7, sizes=_w7_sizes,
                 note="phalanx rt.map (auto chunks); Pool.imap, PPE.map, loky map, mpire imap with chunksize "
                 "ceil(n/8); results consumed as a stream; RSS sampled every 10 ms"),
        Workload("W8", "many workers: 250 x workers sleep(1 ms) tasks on 2, 8 and 32 local workers, "
                 "16 remote workers",
                 (*(r for r in TASK_RUNNERS if r not in ("ppe",)), "static"), _w8_metrics, _run_w8, sizes=_w8_sizes,
                 quick_title="many workers: 20 x workers sleep(1 ms) tasks on 2 and 4 local workers, "
                 "4 remote workers (quick)",
                 note="oversubscribed on purpose (2 cores); one task per message (Pool: apply_async); "
                 "static: Pool.starmap with one chunk per worker, the ceiling of this machine with no per-task "
                 "dispatch; "
                 "ideal = workers x 1000 tasks/s; driver CPU = process_time of the submitting process; "
                 "remote HxW: H hosts (network namespaces) of W workers each, the driver in a namespace of its own; "
                 + SIZED_NOTE,
                 remote=_run_w8_remote),
    )
}


def get(workload_id: str) -> Workload:
    """The workload ``W1``..``W8`` (case-insensitive)."""
    try:
        return WORKLOADS[workload_id.upper()]
    except KeyError:
        raise ValueError(f"unknown workload {workload_id!r}; known: {', '.join(WORKLOADS)}") from None
