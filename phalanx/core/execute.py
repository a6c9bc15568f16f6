"""What a worker does with a task: a call, a map chunk, a fold, a staged chain.

No I/O and no clock of its own: a :class:`TaskRunner` is given ``clock``
(when each call of a chunk starts, for per-call timeouts) and ``settle``
(how an awaitable an operation returned is run to its result). Two hosts
run it: a real worker's main loop (:mod:`phalanx.worker`, real clock, an
asyncio loop of its own), and a simulated worker
(:mod:`phalanx.testing.sim`, the virtual clock), so what a chunk yields when
its fourth item raises, what counts as transient, and how a staged fold
combines are the same on both.

Invariants kept: a chunk's outcome carries the values of the items before a
failure (``Err.partial``, ``Err.index``), so the driver resumes it there; a
fold of ``n`` items calls its operation exactly ``n - 1`` times; no call of
a task starts once it is aborted (:func:`abort`): the flag
(``ctx.aborted``) is read between calls, and a plain map's tight loop, which
runs its calls in C, draws its items from an iterator that :func:`abort`
ends.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import Transient
from ..transport.codec import error_info
from ..transport.messages import Call, Chunk, Err, Ok, Outcome

if TYPE_CHECKING:
    from ..registry.operations import Operation

__all__ = ["TaskRunner", "TaskState", "abort"]

#: classes of values that are never awaitable (results of the tight map loop, checked in C)
_PLAIN = frozenset({int, float, str, bytes, bool, type(None), list, dict, tuple})
#: beyond any list's length: where :func:`abort` moves the tight loop's iterator
_END = 1 << 62

#: one step of a directive chain: the operation, its function, its argument's converter
_Step = tuple["Operation", Callable[..., Any], "Callable[[Any, bool], Any] | None"]


class TaskState(Protocol):
    """What the runner reads and writes of the running task (``phalanx.TaskContext``)."""

    aborted: bool
    started: float
    values: list[Any]
    #: the items of the tight map loop not yet called (a list iterator), while it runs
    rest: Iterator[Any] | None

    def check(self) -> None: ...


def abort(ctx: TaskState) -> None:
    """Flag ``ctx`` aborted: no call of its task starts after this one returns.

    Called by the thread that aborts the task (a worker's control thread) while
    the task runs: besides the flag, it ends the tight map loop's iterator
    (``list_iterator.__setstate__`` moves it past the end), so that loop,
    which reads no flag, calls nothing more. Ends nothing when the loop has
    not started: the loop reads the flag once its iterator is in ``rest``.
    """
    ctx.aborted = True
    rest = ctx.rest
    if rest is not None:
        rest.__setstate__(_END)  # type: ignore[attr-defined]  # a list_iterator's


class TaskRunner:
    """Runs tasks for one worker; see the module docstring."""

    def __init__(self, clock: Callable[[], float], settle: Callable[[Any], Any],
                 resolve: Callable[[str], Operation]) -> None:
        self.clock = clock
        self.settle = settle
        self.resolve = resolve
        #: the operation of a directive chain running now (decides what is transient)
        self.staged_op: Operation | None = None

    def call(self, op: Operation, args: Sequence[Any], kwargs: dict[str, Any] | None, trusted: int = 0) -> Any:
        """``op(*args, **kwargs)``, arguments converted to its annotations, awaited if need be."""
        a, kw = op.convert_args(args, kwargs, trusted)
        value = op.fn(*a, **kw)
        if hasattr(value, "__await__") and inspect.isawaitable(value):
            value = self.settle(value)
        return value

    def execute(self, task: Call | Chunk, ctx: TaskState) -> Outcome:
        """Run ``task``; whatever the operation raises becomes an ``Err`` (the worker survives)."""
        op: Operation | None = None
        try:
            op = self.resolve(task.op)
            if task.__class__ is Call:
                # call(), inline: this runs once per task.
                a, kw = op.convert_args(task.args, task.kwargs, 0)
                value = op.fn(*a, **kw)
                if hasattr(value, "__await__") and inspect.isawaitable(value):
                    value = self.settle(value)
            elif isinstance(task, Call):
                value = self.call(op, task.args, task.kwargs)
            elif task.stages:
                self.staged_op = None
                stages = [self.resolve(name) for name in task.stages]
                value = self.fold_staged(op, stages, task, ctx) if task.fold else self.map_staged(op, stages, task, ctx)
            elif task.fold:
                value = self.fold(op, task.items, ctx)
            else:
                value = self.map(op, task, ctx)
            return Ok(task.job, task.seq, task.attempt, value)
        except BaseException as exc:  # user code may raise anything; the loop survives
            if isinstance(task, Chunk) and task.stages:
                op = self.staged_op  # the stage that raised decides what is transient
            transient = isinstance(exc, Transient) or (op is not None and isinstance(exc, op.transient))
            if isinstance(task, Chunk) and not task.fold:
                return Err(task.job, task.seq, task.attempt, error_info(exc), len(ctx.values), ctx.values, transient)
            return Err(task.job, task.seq, task.attempt, error_info(exc), transient=transient)

    def fold(self, op: Operation, items: list[Any], ctx: TaskState) -> Any:
        if not items:
            raise ValueError("empty fold chunk")
        acc = items[0]
        clock = self.clock
        for index in range(1, len(items)):
            ctx.check()
            ctx.started = clock()
            # From the second combine on, acc is op's own result: not validated again.
            acc = self.call(op, [acc, items[index]], None, 0 if index == 1 else 1)
        return acc

    def map(self, op: Operation, task: Chunk, ctx: TaskState) -> list[Any]:
        values = ctx.values
        star = task.star
        if not star and task.timeout <= 0:
            items = op.convert_items(task.items)
            if items is not None:
                if op.coroutine:
                    # Each call's coroutine runs to its end before the next call.
                    fn, append, settle = op.fn, values.append, self.settle
                    for item in items:
                        if ctx.aborted:
                            ctx.check()
                        append(settle(fn(item)))
                    return values
                return self._map_all(op.fn, items, ctx)
        clock = self.clock
        for item in task.items:
            ctx.check()
            ctx.started = clock()
            values.append(self.call(op, item if star else [item], None))
        return values

    def _map_all(self, fn: Callable[[Any], Any], items: list[Any], ctx: TaskState) -> list[Any]:
        """The tight loop: every call of the chunk in one ``list.extend(map(fn, ...))``, in C.

        No per-call timeout to time and no flag to read per call: the items
        come from an iterator that :func:`abort` ends, so no call starts once
        the task is aborted. A call that raises leaves the values before it in
        ``ctx.values`` (``list.extend`` keeps what it appended). The results
        are then checked for awaitables in C: by what they refer to, then by
        their classes.
        """
        values = ctx.values
        rest = iter(items)
        ctx.rest = rest
        try:
            if ctx.aborted:  # aborted before ``rest`` was there to end
                ctx.check()
            values.extend(map(fn, rest))
        finally:
            ctx.rest = None
            # Values that refer to nothing (numbers, strings, None) are never awaitable:
            # about 2 ns an item in C; anything else goes through the scan by class.
            if values and gc.get_referents(*values) and not _PLAIN.issuperset(map(type, values)):
                self._settle_from(values, 0, ctx)
        if ctx.aborted:
            ctx.check()  # the calls stopped at the abort: the values before it go with the error
        return values

    def _settle_from(self, values: list[Any], first: int, ctx: TaskState) -> None:
        """Await, in order, the awaitables among ``values[first:]``; a failure drops it and what follows.

        So does an abort: the calls ran before any is awaited, so what an
        awaitable does is a call's work, and none starts once the task is aborted.
        """
        for index in range(first, len(values)):
            value = values[index]
            if type(value) not in _PLAIN and hasattr(value, "__await__") and inspect.isawaitable(value):
                try:
                    if ctx.aborted:
                        ctx.check()
                    values[index] = self.settle(value)
                except BaseException:
                    for later in values[index:]:
                        if inspect.iscoroutine(later):
                            later.close()  # never to run: no "never awaited" warning
                    del values[index:]
                    raise

    # Directive chains: ``stages`` run per item before ``op``, in this task, with no
    # round trip through the driver. Only chunks that carry stages come here, so
    # plain map and fold keep their loops above. Each operation is called with its
    # one argument converted as ``call`` would (``Operation.converter``), without
    # building argument lists per item.

    def _through(self, plan: list[_Step], item: Any, star: bool) -> Any:
        """One item through every step of ``plan`` (the first gets ``*item`` when ``star``).

        The item, decoded from the wire, is validated in full; what a step
        returns is passed on as is when already of the next parameter's class.
        """
        trusted = False
        if star:
            first = plan[0][0]
            self.staged_op = first
            item = self.call(first, item, None)
            plan, trusted = plan[1:], True
        for op, fn, conv in plan:
            self.staged_op = op
            item = fn(item if conv is None else conv(item, trusted))
            if hasattr(item, "__await__") and inspect.isawaitable(item):
                item = self.settle(item)
            trusted = True
        return item

    def map_staged(self, op: Operation, stages: list[Operation], task: Chunk, ctx: TaskState) -> list[Any]:
        plan = [(stage, stage.fn, stage.converter(0)) for stage in (*stages, op)]
        values = ctx.values
        star = task.star
        through, now = self._through, self.clock
        for item in task.items:
            if ctx.aborted:
                ctx.check()
            ctx.started = now()
            values.append(through(plan, item, star))
        return values

    def fold_staged(self, op: Operation, stages: list[Operation], task: Chunk, ctx: TaskState) -> Any:
        """Map every item through the stages, then reduce: ``len(items) - 1`` combines."""
        items = task.items
        if not items:
            raise ValueError("empty fold chunk")
        plan = [(stage, stage.fn, stage.converter(0)) for stage in stages]
        combine, lower, upper = op.fn, op.converter(0), op.converter(1)
        star = task.star
        if not star and len(stages) == 1 and task.timeout <= 0 and not (
            inspect.iscoroutinefunction(stages[0].fn) or inspect.iscoroutinefunction(combine)
        ):
            converted = stages[0].convert_items(items)
            if converted is not None:
                return self._fold_one_stage(stages[0], op, converted, ctx)
        through, now = self._through, self.clock
        ctx.check()
        ctx.started = now()
        acc = through(plan, items[0], star)
        for index in range(1, len(items)):
            if ctx.aborted:
                ctx.check()
            ctx.started = now()
            value = through(plan, items[index], star)
            self.staged_op = op
            # Neither was decoded (a stage's result, or op's own): passed as is when of the right class.
            acc = combine(acc if lower is None else lower(acc, True),
                          value if upper is None else upper(value, True))
            if hasattr(acc, "__await__") and inspect.isawaitable(acc):
                acc = self.settle(acc)
        return acc

    def _fold_one_stage(self, stage: Operation, op: Operation, items: list[Any], ctx: TaskState) -> Any:
        """``fold_staged``'s tight loop: one synchronous stage, arguments converted in one pass, no timeout."""
        fn, combine, lower, upper = stage.fn, op.fn, op.converter(0), op.converter(1)
        ctx.check()
        self.staged_op = stage
        acc = fn(items[0])
        for index in range(1, len(items)):
            if ctx.aborted:
                ctx.check()
            self.staged_op = stage
            value = fn(items[index])
            self.staged_op = op
            acc = combine(acc if lower is None else lower(acc, True),
                          value if upper is None else upper(value, True))
        return acc
