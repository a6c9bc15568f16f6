"""Directives: a whole job described as a value, composed, then run as one job.

Runs in the driver. paladin's directives in Python: a source (:class:`Literal`,
or :class:`IndexedStream` for results delivered as they finish), any number
of ``.map(op)`` stages, optionally ending in ``.fold(monoid)``::

    chain = Literal(lines).map(parse).fold(merge_counts)   # a value: nothing runs yet
    counts = rt.run(chain).result()                        # one job on the workers
    assert counts == chain.evaluate()                      # the same, serially, in Python

Directives are immutable: ``.map`` and ``.fold`` return new values and never
change the one they are called on. A source over an iterator is read as the
job runs (once: run it, or evaluate it, one time).

How a chain runs (``rt.run`` returns a :class:`JobHandle` at once)::

    user thread ── rt.run ──▶ JobHandle ◀── bounded queue ◀── job thread (one per job)
                                                               │
        map chain:  chunks {items, stages [f, g], op h} ───────┼──▶ worker: h(g(f(x))) per item
                    results stream back (MapIterator) ◀────────┘
        fold chain: chunks {items, stages [f, g], op m, fold} ──▶ worker: m-reduce of g(f(x)), one partial
                    adjacent partials ── combine(lower, upper) ──▶ worker (the fold tree of ``jobs.fold_on``)

Invariants kept:

* **No round trip between stages.** Every map stage of an item runs on the
  worker holding its chunk, in that one task; a fold chain's mapped values
  never come back to the driver, only one partial result per chunk.
* **Exactly n-1 combines.** A chunk of k items is reduced with k-1 combines
  on its worker, partials with one combine each, in input order
  (``combine(lower, upper)``, lower first): n-1 for n items. An empty input
  gives the monoid's ``empty()`` without calling it at all.
* **Bounded memory.** The source is read lazily, a bounded number of chunks
  in flight; the job thread hands results over through a bounded queue.
* **Cancellation reaches running operations.** :meth:`JobHandle.cancel`
  drops the job's queued tasks and sets ``phalanx.current_task().aborted``
  in the running ones (the same Terminate broadcast as ``close_job``).
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, NoReturn, TypeVar, overload

import msgspec

from . import collected
from .driver import Driver
from .errors import TaskCancelledError, TaskTimeoutError
from .jobs import MISSING, MapIterator, _Lease, chain_options, fold_on
from .policy import FatalStrategy, TaskOptions
from .registry.operations import driver_operation, monoid_empty, name_of, resolve

__all__ = [
    "Directive",
    "Chain",
    "IndexedChain",
    "Fold",
    "Literal",
    "IndexedStream",
    "JobHandle",
    "JobProgress",
    "start_job",
]

T = TypeVar("T")
U = TypeVar("U")
R = TypeVar("R")
Y = TypeVar("Y")

Op = Callable[..., Any] | str

#: batches of results buffered between a job's thread and its consumer
BUFFERED_BATCHES = 8
#: items a stage-less source hands over at once
SOURCE_BATCH = 1024


# --------------------------------------------------------------------------- #
# Type checks when a chain is built
# --------------------------------------------------------------------------- #

#: plain classes whose mismatches are certain (msgspec never converts one into another)
_PLAIN = frozenset({int, float, complex, str, bytes, bytearray, bool, type(None), list, tuple, dict, set, frozenset})
_SEQUENCES = frozenset({list, tuple, set, frozenset})
_CONVERTS = frozenset({(int, float), (bytes, bytearray), (bytearray, bytes)})


def _label(op: Op) -> str:
    return name_of(op)


def _type_name(typ: Any) -> str:
    return typ.__name__ if isinstance(typ, type) else repr(typ)


def _compatible(produced: Any, wanted: Any) -> bool:
    """False only when ``produced`` certainly cannot become ``wanted`` (plain classes only)."""
    if produced not in _PLAIN or wanted not in _PLAIN:
        return True  # Any, object, generics, unions, Structs, dataclasses...: not judged here
    if produced is bool and wanted is not bool:
        return False  # msgspec refuses a bool where an int or float is declared
    if issubclass(produced, wanted) or (produced, wanted) in _CONVERTS:
        return True
    return produced in _SEQUENCES and wanted in _SEQUENCES


def _check_link(before: Op, after: Op, params: Sequence[int], verb: str) -> None:
    """Raise TypeError if ``before``'s declared result cannot be ``after``'s argument."""
    first = driver_operation(before)
    second = driver_operation(after)
    if first is None or second is None:
        return  # given by name: nothing to read
    for index in params:
        pname, wanted = second.parameter(index)
        if not _compatible(first.returns, wanted):
            raise TypeError(
                f"cannot {verb} {_label(after)} after {_label(before)}: {_label(before)} returns "
                f"{_type_name(first.returns)}, but {_label(after)} takes {_type_name(wanted)} "
                f"(parameter {pname!r})"
            )


def _local(op: Op) -> Callable[..., Any]:
    """The function behind an operation, to call it here (``evaluate``)."""
    if isinstance(op, str):
        return resolve(op).fn
    return op


def _apply(stages: Sequence[Op]) -> Callable[[Any], Any]:
    fns = [_local(op) for op in stages]

    def apply(item: Any) -> Any:
        for fn in fns:
            item = fn(item)
        return item

    return apply


# --------------------------------------------------------------------------- #
# The directives
# --------------------------------------------------------------------------- #


class Directive(Generic[R]):
    """A job described as an immutable value: ``rt.run(d)`` runs it, ``d.evaluate()`` computes it here.

    ``R`` is what the job's :meth:`JobHandle.result` (and :meth:`evaluate`)
    returns. Build one from a source, :class:`Literal` or
    :class:`IndexedStream`, with ``.map(op)`` and ``.fold(monoid)``.
    """

    __slots__ = ("_items", "_stages")

    _items: Iterable[Any]
    _stages: tuple[Op, ...]

    def __init__(self, items: Iterable[Any], stages: tuple[Op, ...] = ()) -> None:
        object.__setattr__(self, "_items", items)
        object.__setattr__(self, "_stages", stages)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @property
    def stages(self) -> tuple[Callable[..., Any] | str, ...]:
        """The map operations, in the order each item goes through them."""
        return self._stages

    def evaluate(self) -> R:
        """The job's result computed serially in this process, with no runtime.

        Calls the operations' functions directly, in input order: what
        ``rt.run(self).result()`` returns for deterministic operations.
        """
        raise NotImplementedError

    def _source_repr(self) -> str:
        return f"{type(self).__name__}({self._items!r})"

    def _stages_repr(self) -> str:
        return "".join(f".map({_label(op)})" for op in self._stages)

    def __repr__(self) -> str:
        return self._source_repr() + self._stages_repr()


class Chain(Directive[list[T]], Generic[T]):
    """Items mapped through stages, results in input order: :class:`Literal` and its ``.map``.

    ``rt.run(chain)`` returns a :class:`JobHandle` whose iteration yields
    each result in input order as soon as it and those before it are in, and
    whose ``result()`` is the list of them.
    """

    __slots__ = ()

    @overload
    def map(self, op: Callable[[T], U], /) -> Chain[U]: ...
    @overload
    def map(self, op: str, /) -> Chain[Any]: ...

    def map(self, op: Callable[[T], U] | str, /) -> Chain[Any]:
        """Apply ``op`` to each result: a new chain (``op`` runs on the worker after the stages before it).

        Raises ``TypeError`` when the previous stage's declared return type
        certainly cannot be ``op``'s first parameter (plain classes only).
        """
        return Chain(self._items, _appended(self._stages, op))

    def fold(self, monoid: Callable[[T, T], T] | str, /) -> Fold[T]:
        """Combine the results with the associative ``monoid(lower, upper)``: see :class:`Fold`."""
        return Fold(self._items, self._stages, monoid, indexed=False)

    def evaluate(self) -> list[T]:
        apply = _apply(self._stages)
        return [apply(item) for item in self._items]

    def _source_repr(self) -> str:
        return f"Literal({self._items!r})"


class IndexedChain(Directive[list[T]], Generic[T]):
    """Items mapped through stages, results delivered as they finish: :class:`IndexedStream` and its ``.map``.

    ``rt.run(chain)`` returns a :class:`JobHandle` whose iteration yields
    ``(input index, result)`` pairs in the order they finish, and whose
    ``result()`` collects them into a list in input order.
    """

    __slots__ = ()

    @overload
    def map(self, op: Callable[[T], U], /) -> IndexedChain[U]: ...
    @overload
    def map(self, op: str, /) -> IndexedChain[Any]: ...

    def map(self, op: Callable[[T], U] | str, /) -> IndexedChain[Any]:
        """Apply ``op`` to each result: a new chain (see :meth:`Chain.map`)."""
        return IndexedChain(self._items, _appended(self._stages, op))

    def fold(self, monoid: Callable[[T, T], T] | str, /) -> Fold[T]:
        """Combine the results in input order with ``monoid``: see :class:`Fold`."""
        return Fold(self._items, self._stages, monoid, indexed=True)

    def evaluate(self) -> list[T]:
        apply = _apply(self._stages)
        return [apply(item) for item in self._items]

    def _source_repr(self) -> str:
        return f"IndexedStream({self._items!r})"


def _appended(stages: tuple[Op, ...], op: Op) -> tuple[Op, ...]:
    name_of(op)  # an operation, or TypeError now rather than when the job runs
    if stages:
        _check_link(stages[-1], op, (0,), "map")
    return (*stages, op)


class Literal(Chain[T]):
    """A source: the items of ``items``, in order. ``Literal(xs).map(f)`` maps them on the workers.

    ``items`` is read lazily as the job runs (an iterator is read once, with
    bounded memory), so ``Literal(open(path))`` or ``Literal(range(10**9))``
    work. ``rt.run(Literal(xs))`` with no stage returns the items themselves.
    """

    __slots__ = ()

    def __init__(self, items: Iterable[T], /) -> None:
        super().__init__(items)


class IndexedStream(IndexedChain[T]):
    """A source whose mapped results are delivered as ``(index, value)`` as they finish.

    Out of order while iterating the job's handle; ``.result()`` still
    returns them in input order.
    """

    __slots__ = ()

    def __init__(self, items: Iterable[T], /) -> None:
        super().__init__(items)


class Fold(Directive[T]):
    """A chain ended by ``.fold(monoid)``: one value, ``monoid`` applied in input order.

    ``monoid(lower, upper)`` must be associative (it need not be
    commutative). On the workers each chunk's items go through the map
    stages and are reduced at once; partial results are combined in order,
    exactly ``n - 1`` calls of ``monoid`` for ``n`` items. An empty input
    gives ``empty()`` of a monoid declared with
    ``@phalanx.operation(empty=...)``; of any other operation it raises
    ``TypeError``, like ``functools.reduce``.
    """

    __slots__ = ("_monoid", "_indexed")

    _monoid: Op
    _indexed: bool

    def __init__(self, items: Iterable[Any], stages: tuple[Op, ...], monoid: Op, *, indexed: bool = False) -> None:
        name_of(monoid)
        if stages:
            _check_link(stages[-1], monoid, (0, 1), "fold with")
        super().__init__(items, stages)
        object.__setattr__(self, "_monoid", monoid)
        object.__setattr__(self, "_indexed", indexed)

    @property
    def monoid(self) -> Callable[..., Any] | str:
        """The combining operation."""
        return self._monoid

    def evaluate(self) -> T:
        combine = _local(self._monoid)
        apply = _apply(self._stages)
        mapped = (apply(item) for item in self._items)
        first = next(mapped, MISSING)
        if first is MISSING:
            make_empty = monoid_empty(self._monoid)
            if make_empty is None:
                raise TypeError(f"fold of an empty input with {_label(self._monoid)}, which has no empty=")
            return make_empty()  # type: ignore[no-any-return]
        return functools.reduce(combine, mapped, first)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        source = "IndexedStream" if self._indexed else "Literal"
        return f"{source}({self._items!r}){self._stages_repr()}.fold({_label(self._monoid)})"


# --------------------------------------------------------------------------- #
# The job handle
# --------------------------------------------------------------------------- #


class JobProgress(msgspec.Struct, frozen=True):
    """How far a job got: see :attr:`JobHandle.progress`."""

    #: items whose results (or, for a fold, whose share of a partial result) reached the driver
    items_done: int
    #: items in the input: known from the start for a sized input, else once it is all read
    items_total: int | None
    #: the job has ended: finished, failed or cancelled
    done: bool


_ITEMS, _END, _ERROR, _WAKE = range(4)


def _drop_handle(state: _JobState) -> None:
    """A handle was dropped: a job still running is cancelled; a finished one's thread stops waiting."""
    if not state.finished.is_set() and not state.cancel():
        state.cancelled.set()  # completed but unread: let the job thread stop waiting


class _JobState:
    """What a job's thread and its handle share (the thread never holds the handle)."""

    def __init__(self, total: int | None) -> None:
        self.queue: queue.Queue[tuple[int, Any]] = queue.Queue(BUFFERED_BATCHES)
        self.lock = threading.Lock()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        #: every result is computed and queued (maybe not yet read): cancel() has nothing to end
        self.completed = threading.Event()
        self.items_done = 0
        self.items_total = total
        self._abort: Callable[[BaseException], None] | None = None

    def on_abort(self, abort: Callable[[BaseException], None]) -> None:
        """What ``cancel`` does to the running job (called from the thread that leases it)."""
        with self.lock:
            if not self.cancelled.is_set():
                self._abort = abort
                return
        abort(TaskCancelledError("the job was cancelled"))

    def add_done(self, count: int) -> None:
        self.items_done += count

    def cancel(self) -> bool:
        with self.lock:
            if self.finished.is_set() or self.completed.is_set() or self.cancelled.is_set():
                return False
            self.cancelled.set()
            abort, self._abort = self._abort, None
        if abort is not None:
            abort(TaskCancelledError("the job was cancelled"))
        try:
            self.queue.put_nowait((_WAKE, None))  # a consumer blocked on an empty queue
        except queue.Full:
            pass  # it is not blocked: it checks the flag before each wait
        return True

    def put(self, kind: int, value: Any) -> bool:
        """Hand a batch to the consumer (the job thread; bounded); False once cancelled."""
        if kind == _END:
            self.completed.set()
        while not self.cancelled.is_set():
            try:
                self.queue.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False


def _run_thread(state: _JobState, body: Callable[[], None], name: str) -> None:
    def target() -> None:
        try:
            body()
        except BaseException as exc:  # every failure reaches the consumer
            if not state.cancelled.is_set():
                state.put(_ERROR, exc)
        finally:
            state.finished.set()

    threading.Thread(target=target, name=name, daemon=True).start()


def _drive_map(state: _JobState, it: MapIterator[Any]) -> None:
    try:
        for first in it:
            batch = [first, *it.take_ready()]
            state.add_done(len(batch))
            if not state.put(_ITEMS, batch):
                return
        state.items_done = state.items_total = it.items_read
        state.put(_END, None)
    finally:
        it.close()


def _drive_source(state: _JobState, items: Iterable[Any], indexed: bool) -> None:
    source: Iterator[Any] = iter(enumerate(items)) if indexed else iter(items)
    while True:
        batch = list(_take(source, SOURCE_BATCH))
        if not batch:
            break
        state.add_done(len(batch))
        if not state.put(_ITEMS, batch):
            return
    state.items_total = state.items_done
    state.put(_END, None)


def _take(it: Iterator[Any], n: int) -> Iterator[Any]:
    for _, item in zip(range(n), it):
        yield item


def _sized(items: Iterable[Any]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


_MAP, _INDEXED, _FOLD = range(3)


class JobHandle(Generic[Y, R]):
    """A running job started by :meth:`phalanx.Runtime.run`.

    * iterate it (``for``, ``async for``) for the results as they come: a
      :class:`Chain`'s results in input order, an :class:`IndexedChain`'s
      ``(index, result)`` pairs as they finish, a :class:`Fold`'s one value;
    * ``result(timeout=None)`` waits for all of them: the list in input order
      (map chains) or the folded value; ``await handle`` does so without
      blocking the event loop;
    * ``cancel()`` ends the job: queued tasks are dropped, running
      operations see ``phalanx.current_task().aborted``, and ``result()``
      and iteration raise :class:`~phalanx.TaskCancelledError`;
    * ``progress`` and ``done()`` report on it.

    Iterate or call ``result()``, not both (``result()`` after some results
    were iterated over raises ``RuntimeError``). The first failure of the
    job is raised from ``result()`` or iteration, with the remote traceback
    as its ``__cause__``. Used as a context manager (``with``, ``async
    with``) the handle cancels the job on exit if it has not ended;
    dropping the handle does too.
    """

    __slots__ = (
        "_state", "_kind", "_local", "_collected", "_iterated", "_has_result", "_result", "_error", "_ended",
        "_fold_yielded", "__weakref__",
    )

    def __init__(self, state: _JobState, kind: int) -> None:
        self._state = state
        self._kind = kind
        self._local: deque[Any] = deque()
        self._collected: list[Any] = []
        self._iterated = False
        self._has_result = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._ended = False
        self._fold_yielded = False

    # ---- state ------------------------------------------------------------------

    @property
    def progress(self) -> JobProgress:
        """Items done, items in total (None while unknown), and whether the job has ended."""
        state = self._state
        finished = state.finished.is_set() or state.completed.is_set()
        return JobProgress(state.items_done, state.items_total, finished)

    def done(self) -> bool:
        """True once the job has ended: every result received (maybe not yet consumed), or failed, or cancelled."""
        return self._state.finished.is_set() or self._state.completed.is_set()

    def cancelled(self) -> bool:
        """True if :meth:`cancel` ended the job."""
        return self._state.cancelled.is_set()

    def cancel(self) -> bool:
        """End the job: queued tasks are dropped, running ones see their abort flag.

        Returns False if the job had already ended (its results stay
        available), True if it was cancelled now; ``result()`` and iteration
        then raise :class:`~phalanx.TaskCancelledError`.
        """
        if self._ended or self._has_result or self._error is not None:
            return False
        return self._state.cancel()

    # ---- consuming --------------------------------------------------------------

    def _fail(self, exc: BaseException) -> NoReturn:
        self._error = exc
        raise exc

    def _next_batch(self, deadline: float | None) -> list[Any] | None:
        """The next batch of results; None at the end."""
        state = self._state
        while True:
            if self._error is not None:
                raise self._error
            if state.cancelled.is_set():
                self._fail(TaskCancelledError("the job was cancelled"))
            if self._ended:
                return None
            try:
                if deadline is None:
                    kind, value = state.queue.get()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise queue.Empty
                    kind, value = state.queue.get(timeout=remaining)
            except queue.Empty:
                raise TaskTimeoutError("timed out waiting for the job's results") from None
            if kind == _ITEMS:
                if self._kind == _FOLD:
                    self._has_result, self._result = True, value[0]
                return value  # type: ignore[no-any-return]
            if kind == _END:
                self._ended = True
            elif kind == _ERROR:
                self._fail(value)

    def result(self, timeout: float | None = None) -> R:
        """Wait for the job and return its result (see the class docstring).

        ``timeout`` bounds this wait only: past it
        :class:`~phalanx.TaskTimeoutError` is raised and the job runs on
        (call ``result()`` again, or ``cancel()``).
        """
        if self._has_result:
            return self._result  # type: ignore[no-any-return]
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._kind == _FOLD:
            if self._next_batch(deadline) is None:  # the fold's one batch holds its value
                raise RuntimeError("the job ended without a result")
            return self._result  # type: ignore[no-any-return]
        if self._iterated:
            raise RuntimeError("some results were already consumed by iterating over the job: "
                               "iterate over it to the end, or call result() without iterating")
        while True:
            batch = self._next_batch(deadline)
            if batch is None:
                break
            self._collected.extend(batch)
        gathered, self._collected = self._collected, []
        if self._kind == _INDEXED:
            gathered.sort(key=lambda pair: pair[0])
            gathered = [value for _, value in gathered]
        self._has_result, self._result = True, gathered
        return gathered  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Y]:
        if self._has_result and self._kind != _FOLD:
            # result() collected everything already: iterate over that
            done: Iterable[Any] = enumerate(self._result) if self._kind == _INDEXED else self._result
            return iter(done)
        return self

    def __next__(self) -> Y:
        if self._kind == _FOLD:
            if self._fold_yielded:
                raise StopIteration
            value = self.result()
            self._fold_yielded = True
            return value  # type: ignore[return-value]
        if self._has_result:
            raise StopIteration
        if self._state.cancelled.is_set():
            self._local.clear()
            self._fail(TaskCancelledError("the job was cancelled"))
        while not self._local:
            if self._collected:
                raise RuntimeError("result() is collecting this job's results: iterate or call result(), not both")
            batch = self._next_batch(None)
            if batch is None:
                raise StopIteration
            self._local.extend(batch)
        self._iterated = True
        return self._local.popleft()  # type: ignore[no-any-return]

    # ---- asyncio ----------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, R]:
        return self._result_async().__await__()

    async def _result_async(self) -> R:
        if self._has_result:
            return self._result  # type: ignore[no-any-return]
        import asyncio  # only ever awaited under a running event loop: imported by then

        pending = asyncio.get_running_loop().run_in_executor(None, self.result)
        try:
            return await pending
        except asyncio.CancelledError:
            self.cancel()  # ends the job and wakes the executor thread
            raise

    def __aiter__(self) -> JobHandle[Y, R]:
        return self

    async def __anext__(self) -> Y:
        """The next result, waiting off the event loop; a cancelled wait cancels the job."""
        if self._local and self._kind != _FOLD and not self._state.cancelled.is_set():
            self._iterated = True
            return self._local.popleft()  # type: ignore[no-any-return]
        import asyncio

        pending = asyncio.get_running_loop().run_in_executor(None, self._next_or_end)
        try:
            more, value = await pending
        except asyncio.CancelledError:
            self.cancel()
            raise
        if not more:
            raise StopAsyncIteration
        return value  # type: ignore[no-any-return]

    def _next_or_end(self) -> tuple[bool, Any]:
        try:
            return True, next(self)
        except StopIteration:
            return False, None

    # ---- scope ------------------------------------------------------------------

    def __enter__(self) -> JobHandle[Y, R]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.done():
            self.cancel()

    async def __aenter__(self) -> JobHandle[Y, R]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.done():
            self.cancel()

    def __del__(self) -> None:
        try:
            collected.run(_drop_handle, self._state)  # the collector may run this under a lock
        except Exception:
            pass  # half-built, or the interpreter is shutting down

    def __repr__(self) -> str:
        p = self.progress
        total = "?" if p.items_total is None else p.items_total
        status = "cancelled" if self.cancelled() else "done" if p.done else "running"
        return f"<JobHandle {status} {p.items_done}/{total} items>"


# --------------------------------------------------------------------------- #
# Starting a job
# --------------------------------------------------------------------------- #


def start_job(
    driver: Driver,
    directive: Directive[Any],
    chunksize: int | None,
    timeout: float | None,
    options: TaskOptions | None,
    workers: int,
) -> JobHandle[Any, Any]:
    """Start ``directive`` as one job on ``driver``; its handle (see :meth:`phalanx.Runtime.run`)."""
    if not isinstance(directive, Directive):
        raise TypeError(f"run() needs a directive (Literal(...).map(...)...), got {type(directive).__name__}")
    if chunksize is not None and chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, got {chunksize}")
    driver.check_open()
    items = directive._items
    stages = directive._stages
    state = _JobState(_sized(items))
    if isinstance(directive, Fold):
        monoid = directive._monoid
        resolved = chain_options([*(driver_operation(s) for s in stages), driver_operation(monoid)], options)
        if resolved is not None and resolved.on_fatal is FatalStrategy.IGNORE:
            raise ValueError("fold needs every item: on_fatal=Ignore is for map")

        def open_lease(op_name: str, opts: TaskOptions | None) -> _Lease:
            lease = _Lease(driver, op_name, opts)

            def abort(exc: BaseException) -> None:
                lease._fail(exc)
                driver.close_job(lease.job, terminate=True)

            state.on_abort(abort)
            return lease

        def fold_body() -> None:
            value = fold_on(
                open_lease, driver.submit, driver.close_job, time.monotonic, monoid, items, MISSING,
                chunksize, timeout, workers, options, stages=stages, on_items=state.add_done,
                pickled=driver.config.local_pickle,
            )
            state.items_total = state.items_done
            if state.put(_ITEMS, [value]):
                state.put(_END, None)

        _run_thread(state, fold_body, f"phalanx-fold-{name_of(monoid)}")
        return JobHandle(state, _FOLD)
    indexed = isinstance(directive, IndexedChain)
    kind = _INDEXED if indexed else _MAP
    if not stages:
        _run_thread(state, lambda: _drive_source(state, items, indexed), "phalanx-source")
        return JobHandle(state, kind)
    it: MapIterator[Any] = MapIterator(
        driver, stages[-1], (items,), chunksize, not indexed, timeout, workers, options,
        stages=stages[:-1], indexed=indexed,
    )
    state.on_abort(it.abort)
    _run_thread(state, lambda: _drive_map(state, it), f"phalanx-map-{name_of(stages[-1])}")
    return JobHandle(state, kind)
