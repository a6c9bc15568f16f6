"""The driver's public API: :class:`Runtime`.

Runs in the user's (driver) process. A ``Runtime`` owns a
:class:`~phalanx.driver.Driver` (sockets, pump thread, dispatch) and its
:class:`~phalanx.supervisor.Supervisor` (worker processes). It is safe to use
from many threads at once; each call leases its own result channel.

Invariant kept: **no orphans, no hang at exit.** ``shutdown()`` (also run by
``with``, by garbage collection of the runtime, and at interpreter exit)
stops every worker in layers and removes the private ipc directory.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

import msgspec

from . import collected
from .actors.ref import ActorRef
from .actors.system import ActorNode, ActorSystem, RuntimeTree, WorkerNode
from .channels import ChannelKind, ExactlyOnce, Lease
from .config import Config
from .driver import Driver, RuntimeStats
from .directives import Chain, Directive, Fold, IndexedChain, JobHandle, start_job
from .jobs import MISSING, Future, MapIterator, fold, submit
from .transport import shm
from .transport.endpoints import own_start
from .policy import DEFAULT_TAG, FatalStrategy, RetryStrategy, TaskOptions, check_tag

if TYPE_CHECKING:
    from .launch import Launch

__all__ = ["Runtime", "JobOptions"]

A = TypeVar("A")
P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _advertise(rt: Runtime) -> None:
    """Write ``runtime.json`` into the private ipc directory so ``phalanx top`` finds us."""
    ipc_dir = rt._driver.endpoints.ipc_dir
    if ipc_dir is None:
        return
    info: dict[str, Any] = {"pid": os.getpid(), "results": rt._driver.endpoints.results,
                            "workers": rt.config.workers, "started": time.time(), "argv": sys.argv}
    # Names this process, not just its pid: a SIGKILLed driver leaves this file behind, and its pid may be reused.
    _, ticks = own_start()
    if ticks is not None:
        info["start_ticks"] = ticks
    # os.open, not open(): no file object (and its buffer) is built for one write.
    try:
        fd = os.open(os.path.join(ipc_dir, "runtime.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     0o666)
    except OSError:
        return
    try:
        os.write(fd, msgspec.json.encode(info))
    except OSError:
        pass
    finally:
        os.close(fd)


def _inspector(ref: weakref.ReferenceType[Runtime]) -> Callable[[float], RuntimeTree] | None:
    """The inspect method of the runtime ``ref`` names (None once it was collected)."""
    rt = ref()
    return None if rt is None else rt.inspect


def _shutdown_at_exit(ref: weakref.ReferenceType[Runtime]) -> None:
    rt = ref()
    if rt is not None:
        rt.shutdown(wait=False)


def _shutdown_collected(driver: Driver, launch: Launch | None) -> None:
    try:
        driver.shutdown(wait=False)
        if launch is not None:
            launch.close()
    except Exception:
        pass


def _start_shutdown(driver: Driver, launch: Launch | None) -> None:
    try:
        threading.Thread(target=_shutdown_collected, args=(driver, launch), name="phalanx-collected").start()
    except (RuntimeError, KeyError):  # interpreter shutdown: no new threads
        _shutdown_collected(driver, launch)


class _RunsDirectives:
    """``run`` for :class:`Runtime`, :class:`JobOptions` and their asyncio twins: one set of typed overloads."""

    __slots__ = ()

    def _runtime_and_options(self) -> tuple[Runtime, TaskOptions | None]:
        raise NotImplementedError

    @overload
    def run(self, directive: Fold[T], /, *, chunksize: int | None = None,
            timeout: float | None = None) -> JobHandle[T, T]: ...
    @overload
    def run(self, directive: IndexedChain[T], /, *, chunksize: int | None = None,
            timeout: float | None = None) -> JobHandle[tuple[int, T], list[T]]: ...
    @overload
    def run(self, directive: Chain[T], /, *, chunksize: int | None = None,
            timeout: float | None = None) -> JobHandle[T, list[T]]: ...

    def run(self, directive: Directive[Any], /, *, chunksize: int | None = None,
            timeout: float | None = None) -> JobHandle[Any, Any]:
        """Start a directive chain as one job; return its :class:`~phalanx.JobHandle` at once.

        ``rt.run(Literal(lines).map(parse).fold(merge_counts)).result()``.
        Every map stage of an item runs on one worker in one task, and a
        fold's chunks are reduced where they were mapped: only results (or
        partial results) come back. ``chunksize`` and ``timeout`` (the whole
        job, in seconds) are those of :meth:`Runtime.map`; the operations'
        options apply (a later stage's overriding an earlier one's), and
        ``rt.options(...).run(...)`` overrides them. On an
        :class:`~phalanx.AsyncRuntime`, ``await`` the handle or read it with
        ``async for``: waiting runs off the event loop, and a cancelled wait
        cancels the job. See ``docs/directives.md``.
        """
        rt, options = self._runtime_and_options()
        return rt._run(directive, chunksize, timeout, options)


class Runtime(_RunsDirectives):
    """A pool of worker processes running phalanx operations.

    ::

        with phalanx.Runtime(workers=2) as rt:
            rt.submit(square, 7).result(timeout=10)      # 49
            list(rt.map(square, range(10)))              # ordered, streaming
            rt.fold(add, range(1, 101))                  # 5050

    ``workers`` is a number of workers, or a dict of worker tag -> number
    (``{"default": 2, "io": 4}``): work routed ``on="io"`` (see
    :meth:`options`) runs only on the "io" workers, other work only on the
    "default" ones. Work for a tag with no live worker waits up to
    ``route_timeout`` seconds for one, then fails with
    :class:`~phalanx.NoWorkerError`.

    Every option can also be set with a ``PHALANX_<OPTION>`` environment
    variable; an argument given here wins. What each one does, and its
    default, is in the configuration table, ``docs/configuration.md``.
    The constructor returns once every worker is connected and ready, or
    raises :class:`~phalanx.WorkerStartError`.

    ``hosts=["host1", "user@host2:22"]`` also starts ``phalanx worker`` on
    each host over ssh, and ``slurm=True`` on each node of the Slurm
    allocation with ``srun``, with keys made for this run; the workers of
    at least ``min_hosts`` hosts are then ready too (see
    ``docs/multihost.md``, "Running on several hosts").
    ``faults=`` (tests only) applies a :mod:`phalanx.testing` fault plan to
    the runtime's frames and worker processes.
    """

    def __init__(
        self,
        workers: int | dict[str, int] | None = None,
        *,
        listen: str | None = None,
        start_method: str | None = None,
        credits: int | None = None,
        start_timeout: float | None = None,
        shutdown_timeout: float | None = None,
        max_attempts: int | None = None,
        restart_limit: int | None = None,
        restart_window: float | None = None,
        abort_grace: float | None = None,
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        heartbeat_interval: float | None = None,
        heartbeat_timeout: float | None = None,
        reconnect: bool | None = None,
        server_key: str | None = None,
        authorized_keys: str | None = None,
        insecure: bool | None = None,
        prefix_output: bool | None = None,
        route_timeout: float | None = None,
        actor_restart_limit: int | None = None,
        actor_restart_window: float | None = None,
        actor_timeout: float | None = None,
        hwm: int | None = None,
        max_frame: int | None = None,
        spin: float | None = None,
        log_level: str | None = None,
        implicit_operations: bool | None = None,
        local_pickle: bool | None = None,
        host_name: str | None = None,
        shm_threshold: int | None = None,
        hosts: list[str] | None = None,
        workers_per_host: int | None = None,
        min_hosts: int | None = None,
        remote_python: str | None = None,
        ssh_config: str | None = None,
        slurm: bool | None = None,
        faults: Any = None,
    ) -> None:
        self.config = Config.load(
            workers=workers,
            listen=listen,
            start_method=start_method,
            credits=credits,
            start_timeout=start_timeout,
            shutdown_timeout=shutdown_timeout,
            max_attempts=max_attempts,
            restart_limit=restart_limit,
            restart_window=restart_window,
            abort_grace=abort_grace,
            max_tasks_per_worker=max_tasks_per_worker,
            max_memory_per_worker=max_memory_per_worker,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            reconnect=reconnect,
            server_key=server_key,
            authorized_keys=authorized_keys,
            insecure=insecure,
            prefix_output=prefix_output,
            route_timeout=route_timeout,
            actor_restart_limit=actor_restart_limit,
            actor_restart_window=actor_restart_window,
            actor_timeout=actor_timeout,
            hwm=hwm,
            max_frame=max_frame,
            spin=spin,
            log_level=log_level,
            implicit_operations=implicit_operations,
            local_pickle=local_pickle,
            host_name=host_name,
            shm_threshold=shm_threshold,
            hosts=hosts,
            workers_per_host=workers_per_host,
            min_hosts=min_hosts,
            remote_python=remote_python,
            ssh_config=ssh_config,
            slurm=slurm,
        )
        if self.config.log_level:
            from .logs import ensure_configured

            ensure_configured(self.config.log_level)
        #: the hosts this runtime started itself (hosts=, slurm=True), None otherwise
        self._launch: Launch | None = None
        if self.config.launches:
            from .launch import Launch

            self._launch = Launch(self.config)
            self.config = msgspec.structs.replace(self.config, listen=self._launch.listen)
        # The fork server is forked, with the first workers, as early as their specs can be
        # written (in Driver): every step moved after it runs while they start up.
        try:
            self._driver = Driver(self.config, self._launch.keys if self._launch is not None else None)
        except BaseException:
            if self._launch is not None:
                self._launch.close()
            raise
        self._atexit: Callable[[], None] | None = None
        #: the actors (see _actors), and the lock of their making
        self._actor_system: ActorSystem | None = None
        self._actors_lock = threading.Lock()
        try:
            # Before any task is sent: arrays in tasks and results may use shared memory (never
            # while remote workers may join: listen, hosts=, slurm=True). What dead drivers left
            # in /dev/shm is swept once the first workers are ready, off the way to the first result.
            shm.runtime_started(self, self.config.shm_threshold, self.config.listen is not None, sweep_now=False)
            self._driver.pump.later.append(shm.sweep_dead)
            # phalanx top finds the runtime from now on; a failed start removes the file with its directory.
            _advertise(self)
            # The thread that runs what collections hand over starts once the first workers are
            # ready, off the way to the first result (the pump holds it: see phalanx.collected).
            self._driver.pump.later.append(collected.start)
            # Weakly: the pump thread holds the driver, and a runtime nobody holds must be collected.
            # (partial and weakref.ref are C: no Python-level call on the start's path)
            ref = weakref.ref(self)
            self._driver.inspect_provider = functools.partial(_inspector, ref)
            self._atexit = functools.partial(_shutdown_at_exit, ref)
            atexit.register(self._atexit)
            self._driver.start_workers(self.config.worker_groups(), self.config.start_timeout)
            if self._launch is not None:
                assert self._driver.address is not None
                self._launch.start(self._driver.address.tasks, self._ready_on, self.config.start_timeout)
        except BaseException:
            if self._atexit is not None:
                atexit.unregister(self._atexit)
            self._driver.shutdown(wait=False)
            shm.runtime_stopped(self)
            if self._launch is not None:
                self._launch.close()
            raise
        #: ``faults=``: a fault plan applied to this runtime's frames (``phalanx.testing``)
        self.faults: Any = None
        if faults is not None:
            from .testing.inject import inject_faults

            self.faults = inject_faults(self, faults)

    @property
    def _actors(self) -> ActorSystem:
        """The runtime's actors, made by the first call that needs them (none before its first
        spawn: its listeners run on no worker's start, and the start does not build it)."""
        actors = self._actor_system
        if actors is None:
            with self._actors_lock:
                actors = self._actor_system
                if actors is None:
                    actors = self._actor_system = ActorSystem(
                        self._driver, call_timeout=self.config.actor_timeout,
                        max_restarts=self.config.actor_restart_limit,
                        restart_window=self.config.actor_restart_window,
                    )
        return actors

    def _ready_on(self, host: str) -> int:
        """Ready remote workers of ``host`` (the launch waits for them)."""
        return sum(1 for w in self._driver.stats().workers if w.remote and w.host == host and w.ready and w.alive)

    # ---- work ------------------------------------------------------------------

    def options(
        self,
        *,
        retry: RetryStrategy | None = None,
        on_fatal: FatalStrategy | None = None,
        timeout: float | None = None,
        on: str | None = None,
    ) -> JobOptions:
        """The same runtime with per-job options overriding the operation's.

        ``rt.options(timeout=5, retry=phalanx.Exponential()).submit(fn, x)``.
        ``timeout`` is per call, in seconds: past it the call's abort flag is
        set, it fails with :class:`~phalanx.TaskTimeoutError`, and if it does
        not return within ``abort_grace`` its worker is killed and replaced.
        ``on`` routes the job to the workers holding that tag
        (``rt.options(on="io").submit(fetch, url)``; default "default").
        """
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if on is not None:
            check_tag(on)
        return JobOptions(self, TaskOptions(retry=retry, on_fatal=on_fatal, timeout=timeout, on=on))

    def submit(self, fn: Callable[P, R] | str, /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Run ``fn(*args, **kwargs)`` on a worker; return a future of its result.

        ``fn`` is an ``@phalanx.operation`` function or its ``module:qualname``.
        Arguments that cannot be encoded raise :class:`~phalanx.EncodeError`
        here, before anything is sent. Keyword arguments all go to ``fn``, so
        routing a call to tagged workers goes through :meth:`options`:
        ``rt.options(on="io").submit(fn, x)``.
        """
        return submit(self._driver, fn, args, kwargs)

    def _submit(self, fn: Callable[..., R] | str, args: tuple[Any, ...], kwargs: dict[str, Any],
                options: TaskOptions | None) -> Future[R]:
        return submit(self._driver, fn, args, kwargs, options)

    def map(
        self,
        fn: Callable[..., R] | str,
        /,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        progress: bool = False,
        on: str | None = None,
    ) -> MapIterator[R]:
        """Apply ``fn`` to every item, streaming results as they come.

        Like the builtin ``map``: several iterables are zipped and their items
        passed as positional arguments. The input is read lazily, a bounded
        number of chunks at a time. ``chunksize=None`` picks chunks from the
        input length (or grows them while they are quick, for iterators).
        ``ordered=False`` yields results as they finish. ``timeout`` bounds
        the whole iteration in seconds. The first failure is raised at its
        position; the rest of the job is cancelled. ``progress=True`` draws a
        progress bar (tqdm, the ``progress`` extra) on a terminal's stderr.
        ``on`` runs it only on the workers holding that tag.
        """
        return self._map(fn, iterables, chunksize, ordered, timeout, _routed(None, on), progress)

    def _map(self, fn: Callable[..., R] | str, iterables: tuple[Iterable[Any], ...], chunksize: int | None,
             ordered: bool, timeout: float | None, options: TaskOptions | None,
             progress: bool = False) -> MapIterator[R]:
        return MapIterator(
            self._driver, fn, iterables, chunksize, ordered, timeout, self._workers_for(options), options,
            progress=progress,
        )

    def _workers_for(self, options: TaskOptions | None) -> int:
        """Live workers of the tag ``options`` route to (map/fold windows and chunk sizes)."""
        return self._driver.worker_count(options.tag if options is not None else DEFAULT_TAG)

    def fold(
        self,
        fn: Callable[[T, T], T] | str,
        iterable: Iterable[T],
        /,
        *,
        initial: T = MISSING,
        chunksize: int | None = None,
        timeout: float | None = None,
        on: str | None = None,
    ) -> T:
        """Combine all items with the associative ``fn(lower, upper)``.

        Equal to ``functools.reduce(fn, iterable[, initial])`` for an
        associative ``fn``, computed as a tree on the workers with exactly
        ``n - 1`` calls (``n`` with ``initial``). Order is kept: ``fn`` need
        not be commutative. An empty input returns ``initial``, else the
        monoid's ``empty()`` (``@phalanx.operation(empty=...)``), else raises
        ``TypeError``. ``on`` runs it only on the workers holding that tag.
        """
        return self._fold(fn, iterable, initial, chunksize, timeout, _routed(None, on))  # type: ignore[no-any-return]

    def _fold(self, fn: Callable[..., Any] | str, iterable: Iterable[Any], initial: Any, chunksize: int | None,
              timeout: float | None, options: TaskOptions | None) -> Any:
        return fold(self._driver, fn, iterable, initial, chunksize, timeout, self._workers_for(options), options)

    def _runtime_and_options(self) -> tuple[Runtime, TaskOptions | None]:
        return self, None

    def _run(self, directive: Directive[Any], chunksize: int | None, timeout: float | None,
             options: TaskOptions | None) -> JobHandle[Any, Any]:
        return start_job(self._driver, directive, chunksize, timeout, options, self._workers_for(options))

    # ---- actors ------------------------------------------------------------------

    def spawn(
        self,
        cls: type[A] | str,
        /,
        *args: Any,
        on: str | None = None,
        name: str | None = None,
        detached: bool = False,
        restart_policy: str = "never",
        checkpoint_every: int = 0,
        checkpoint_interval: float = 0.0,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> ActorRef[A]:
        """Start an actor and return a ref once it has started.

        ``cls`` is an ``@phalanx.actor`` class or its ``module:qualname``;
        ``args``/``kwargs`` go to its ``__init__``. ``on`` is a live worker's
        id (placed there) or a worker tag: the actor then runs, and restarts,
        only on workers holding it (default: "default"), on the one hosting
        the fewest actors; a tag with no live worker is waited for up to
        ``route_timeout`` (or ``timeout``) before :class:`~phalanx.NoWorkerError`. ``restart_policy=
        "on-failure"`` restarts the actor on a live worker when its process
        dies, from its last checkpoint (``save()`` every ``checkpoint_every``
        calls or ``checkpoint_interval`` seconds) or afresh. A ``detached``
        actor, which needs a ``name``, outlives its refs; ``get_actor(name)``
        finds it. An unknown type raises :class:`~phalanx.UnsupportedActorError`.
        """
        actor = self._actors.spawn(
            cls, args, kwargs, on=on, name=name, detached=detached, restart_policy=restart_policy,
            checkpoint_every=checkpoint_every, checkpoint_interval=checkpoint_interval, timeout=timeout,
        )
        return ActorRef(self._actors, actor, self.inspect)

    def get_actor(self, name: str) -> ActorRef[Any]:
        """A new ref on the running actor spawned with ``name=``."""
        return ActorRef(self._actors, self._actors.get(name), self.inspect)

    def inspect(self, timeout: float = 1.0) -> RuntimeTree:
        """A tree of workers and their actors, with pids, mailboxes, cpu and rss.

        A worker that does not answer within ``timeout`` shows as unresolved;
        it never blocks the rest of the tree.
        """
        replies, live = self._driver.inspect(timeout)
        system = self._actor_system
        hosted = system.nodes() if system is not None else {}
        workers: list[WorkerNode] = []
        for wid, pid, inflight, host, tags in live:
            reply = replies.get(wid)
            seen = {a.instance: a for a in reply.actors} if reply else {}
            actors = []
            for actor, instance in hosted.get(wid.encode(), []):
                info = seen.get(instance)
                actors.append(ActorNode(actor.id, actor.name, actor.cls_name, actor.state, instance,
                                        info.mailbox if info else 0, info.calls if info else actor.calls))
            if reply is None:
                workers.append(WorkerNode(wid, pid, host, False, 0.0, 0, 0, 0, inflight, actors, tags))
            else:
                workers.append(WorkerNode(wid, reply.pid, reply.host, True, reply.cpu_percent, reply.rss,
                                          reply.queued, reply.tasks_done, inflight, actors, tags))
        return RuntimeTree(workers)

    # ---- channels ----------------------------------------------------------------

    def lease(
        self, kind: ChannelKind = ExactlyOnce, *, capacity: int = 10_000, prefetch: int = 8
    ) -> Lease[Any]:
        """A new channel: a ``(Sender, Receiver)`` pair whose ends may be passed to
        operations and actors as arguments (see ``docs/channels.md``).

        ``kind=phalanx.ExactlyOnce`` delivers each message to one receiver
        (receivers share the messages and acknowledge them; a nacked message,
        or one held by a receiver that is closed or whose worker dies, is
        redelivered); ``phalanx.Broadcast`` delivers each to every
        subscription (``rx.subscribe()``), in send order. ``send`` waits while
        the lease holds more than ``capacity`` unconsumed messages; a receiver
        holds at most ``prefetch`` unacknowledged ones. ``tx.close()`` ends the
        receivers once everything is delivered; ``lease.release()`` (or
        leaving ``with rt.lease() as (tx, rx):``) drops the lease at once.
        """
        from .broker import lease

        return lease(self._driver, kind, capacity, prefetch)

    # ---- state -------------------------------------------------------------------

    @property
    def n_workers(self) -> int:
        """Number of live workers."""
        return len(self._driver.worker_pids())

    def worker_pids(self) -> dict[str, int]:
        """Live worker ids and their process ids."""
        return self._driver.worker_pids()

    def worker_tags(self) -> dict[str, tuple[str, ...]]:
        """Live worker ids and the tags each one serves."""
        return self._driver.worker_tags()

    def stats(self) -> RuntimeStats:
        """Counters: tasks, redeliveries, dropped frames and results, per-worker use."""
        return self._driver.stats()

    @property
    def endpoints(self) -> tuple[str, str, str]:
        """The (tasks, results, control) ipc addresses of the runtime's sockets (bound on return)."""
        self._driver.make_sockets()
        e = self._driver.endpoints
        return (e.tasks, e.results, e.control)

    @property
    def address(self) -> str | None:
        """``tcp://HOST:PORT`` for ``phalanx worker --connect`` (None unless ``listen`` was given).

        The runtime listens on ``PORT``, ``PORT+1`` and ``PORT+2``; with
        ``listen="tcp://HOST:0"`` it picked three free consecutive ports.
        """
        a = self._driver.address
        return None if a is None else a.tasks

    def wait_for_workers(self, n: int, timeout: float | None = None) -> int:
        """Block until at least ``n`` workers (local or remote) are ready; return how many are.

        Returns early, with fewer, when ``timeout`` passes or the runtime closes.
        """
        return self._driver.wait_workers(n, timeout)

    # ---- ending --------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, timeout: float | None = None) -> None:
        """Stop the runtime: optionally wait for queued work, then stop workers.

        Jobs still open afterwards fail with :class:`~phalanx.RuntimeClosedError`.
        Idempotent.
        """
        if self._atexit is not None:
            atexit.unregister(self._atexit)
        try:
            self._driver.shutdown(wait=wait, timeout=timeout)
        finally:
            shm.runtime_stopped(self)
        if wait:
            collected.join(1.0)  # the last runtime's: no thread of phalanx's outlives it
        if self._launch is not None:
            self._launch.close()  # after the Shutdown broadcast: the hosts are ending already
        if self.faults is not None:
            self.faults.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown(wait=exc_type is None)

    def __del__(self) -> None:
        driver = getattr(self, "_driver", None)
        if driver is not None and not driver.closed:
            # Collection may run on any thread, the pump's included, and while it holds the
            # driver's lock: stop the driver from a thread of its own, started outside the
            # collection (a thread started inside one can fail in threading's own bookkeeping).
            collected.run(_start_shutdown, driver, self._launch)


class JobOptions(_RunsDirectives):
    """A :class:`Runtime` seen through per-job options; see :meth:`Runtime.options`."""

    __slots__ = ("_rt", "_options")

    def __init__(self, rt: Runtime, options: TaskOptions) -> None:
        self._rt = rt
        self._options = options

    def _runtime_and_options(self) -> tuple[Runtime, TaskOptions | None]:
        return self._rt, self._options

    def submit(self, fn: Callable[P, R] | str, /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """:meth:`Runtime.submit` with these options."""
        return self._rt._submit(fn, args, kwargs, self._options)

    def map(
        self,
        fn: Callable[..., R] | str,
        /,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        progress: bool = False,
        on: str | None = None,
    ) -> MapIterator[R]:
        """:meth:`Runtime.map` with these options (``on`` overrides theirs)."""
        return self._rt._map(fn, iterables, chunksize, ordered, timeout, _routed(self._options, on), progress)

    def fold(
        self,
        fn: Callable[[T, T], T] | str,
        iterable: Iterable[T],
        /,
        *,
        initial: T = MISSING,
        chunksize: int | None = None,
        timeout: float | None = None,
        on: str | None = None,
    ) -> T:
        """:meth:`Runtime.fold` with these options (``on`` overrides theirs)."""
        return self._rt._fold(  # type: ignore[no-any-return]
            fn, iterable, initial, chunksize, timeout, _routed(self._options, on)
        )


def _routed(options: TaskOptions | None, on: str | None) -> TaskOptions | None:
    """``options`` routed ``on`` a tag (unchanged when ``on`` is None)."""
    if on is None:
        return options
    check_tag(on)
    return TaskOptions(on=on) if options is None else msgspec.structs.replace(options, on=on)
