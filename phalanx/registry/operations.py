"""Operations: functions workers run, registered by a stable name.

Runs in the driver (``@operation`` at import time, ``name_of`` when a job is
submitted) and in workers (``resolve`` when a task names an operation).

Invariant kept: a worker only runs what was registered with
``@phalanx.operation`` in a module it imported itself. A name that is unknown,
whose module fails to import, or that names something that is not an
operation resolves to :class:`~phalanx.errors.UnknownOperationError`, which
the worker reports to the caller and then keeps serving.

Names are ``module:qualname``. A function defined in the user's ``__main__``
script is named ``__main__:func`` in the driver; the worker process imports
the same script (as multiprocessing's spawn does) and resolves it there.

**Implicit operations** (for :class:`phalanx.Executor` and the joblib
backend): a worker started with the ``implicit_operations`` option (its
spec says so; :func:`set_implicit` applies it) also resolves a name to a
plain module-level function that was never registered: a Python function
defined in that module under that qualname, or a builtin or C function found
there by its own name (``time:sleep``, ``builtins:pow``, ``math:sqrt``,
``numpy:dot``); classes, methods, lambdas and nested functions never
resolve by name (with ``local_pickle``, a local worker receives them
pickled instead). The Executor turns the
option on for the local workers of its own runtime only; a worker started
by ``phalanx worker --connect`` on another host allows implicit names only
if its operator asked for it (``--implicit-operations`` or
``PHALANX_IMPLICIT_OPERATIONS=1``).
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import re
import sys
import types
import typing
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import msgspec

from ..errors import UnknownOperationError, ValidationError
from ..policy import FatalStrategy, RetryStrategy, TaskOptions
from ..transport.codec import convert

__all__ = [
    "operation",
    "Operation",
    "OperationRef",
    "name_of",
    "resolve",
    "registered",
    "implicit",
    "implicit_allowed",
    "set_implicit",
    "NO_EMPTY",
    "monoid_empty",
    "HOW_TO_FIX",
    "CALL_PICKLED",
    "pickled_call",
]

F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY: dict[str, Callable[..., Any]] = {}
_OPTIONS: dict[str, tuple[TaskOptions, tuple[type[BaseException], ...]]] = {}
_EMPTY: dict[str, Callable[[], Any]] = {}


class _NoEmpty:
    def __repr__(self) -> str:
        return "NO_EMPTY"


#: ``@operation(empty=...)`` left out: the operation is not a monoid
NO_EMPTY: Any = _NoEmpty()

_RESOLVED: dict[str, Operation | UnknownOperationError] = {}


def _module_name(module: str) -> str:
    return "__main__" if module == "__mp_main__" else module


def _default_name(fn: Callable[..., Any]) -> str:
    return f"{_module_name(fn.__module__)}:{fn.__qualname__}"


@overload
def operation(fn: F, /) -> F: ...
@overload
def operation(
    *,
    name: str | None = None,
    retry: RetryStrategy | None = None,
    transient: tuple[type[BaseException], ...] = (),
    on_fatal: FatalStrategy | None = None,
    timeout: float | None = None,
    empty: Any = NO_EMPTY,
) -> Callable[[F], F]: ...


def operation(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    retry: RetryStrategy | None = None,
    transient: tuple[type[BaseException], ...] = (),
    on_fatal: FatalStrategy | None = None,
    timeout: float | None = None,
    empty: Any = NO_EMPTY,
) -> F | Callable[[F], F]:
    """Register a module-level function as a phalanx operation.

    The function is returned unchanged, so it stays callable locally. Its
    name on the wire is ``module:qualname`` unless ``name=`` is given. ::

        @phalanx.operation
        def square(x: int) -> int:
            return x * x

    Arguments and results travel as msgpack and are converted to the
    function's annotations on arrival (a mismatch is a
    :class:`~phalanx.errors.ValidationError`).

    Options (each can be overridden per job with ``rt.options(...)``):
    ``retry`` is the :class:`~phalanx.RetryStrategy` for transient failures,
    ``transient`` the exception types treated like ``phalanx.Transient``,
    ``on_fatal`` the :class:`~phalanx.FatalStrategy`, ``timeout`` the seconds
    one call may run before it is aborted.

    ``empty`` makes a two-argument associative ``combine(lower, upper)`` a
    **monoid**: its identity, given as a zero-argument callable (``list``,
    ``dict``, ``lambda: ""``) or as a value of an immutable type (``0``,
    ``""``, ``()``). A fold of an empty input then returns ``empty()``
    (evaluated in the driver) instead of raising ``TypeError``; the workers
    never call it (a fold of n items still makes exactly n-1 combines). ::

        @phalanx.operation(empty=str)
        def concat(lower: str, upper: str) -> str:
            return lower + upper
    """
    if not isinstance(transient, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in transient
    ):
        raise TypeError("transient= must be a tuple of exception types")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    options = TaskOptions(retry=retry, on_fatal=on_fatal, timeout=timeout)
    make_empty = _empty_factory(empty)

    def register(f: F) -> F:
        if not callable(f):
            raise TypeError(f"@phalanx.operation needs a function, got {f!r}")
        if make_empty is not None:
            _check_combine(f)
        if "<locals>" in f.__qualname__ and name is None:
            raise TypeError(
                f"@phalanx.operation: {f.__qualname__} is defined inside a function; "
                "workers can only find module-level functions (or pass name=...)"
            )
        op_name = name or _default_name(f)
        if inspect.iscoroutinefunction(f):
            # Its workers run it on an event loop: asyncio is imported here, before they are
            # forked, not by each of them on its first call (phalanx itself imports it lazily).
            import asyncio  # noqa: F401
        _REGISTRY[op_name] = f
        _OPTIONS[op_name] = (options, transient)
        if make_empty is None:
            _EMPTY.pop(op_name, None)
        else:
            _EMPTY[op_name] = make_empty
        _RESOLVED.pop(op_name, None)
        try:
            setattr(f, "__phalanx_operation__", op_name)
        except (AttributeError, TypeError):
            pass
        return f

    if fn is not None:
        return register(fn)
    return register


#: types whose values may be given as ``empty=`` directly (shared by every fold)
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset, range)


def _empty_factory(empty: Any) -> Callable[[], Any] | None:
    """``empty=`` as a zero-argument callable (None: not a monoid)."""
    if empty is NO_EMPTY:
        return None
    if callable(empty):
        return empty  # type: ignore[no-any-return]
    frozen_struct = isinstance(empty, msgspec.Struct) and getattr(type(empty), "__struct_config__").frozen
    if isinstance(empty, _IMMUTABLE) or frozen_struct:
        return lambda: empty
    raise TypeError(
        f"empty= must be a zero-argument callable or a value of an immutable type, got "
        f"{type(empty).__name__} {empty!r}: a mutable value would be shared by every fold "
        f"(pass its type or a factory instead, e.g. empty={type(empty).__name__})"
    )


def _check_combine(f: Callable[..., Any]) -> None:
    """A monoid's ``combine`` must take (lower, upper)."""
    try:
        inspect.signature(f).bind(None, None)
    except TypeError:
        raise TypeError(
            f"@phalanx.operation(empty=...): {getattr(f, '__qualname__', f)!r} must take two "
            "positional arguments, combine(lower, upper)"
        ) from None
    except ValueError:
        pass  # no signature (a builtin): trust it


def monoid_empty(fn: Callable[..., Any] | str) -> Callable[[], Any] | None:
    """The ``empty`` factory of the operation ``fn`` registered in this process (None: not a monoid)."""
    op = driver_operation(fn)
    if op is not None:
        return op.empty
    return _EMPTY.get(name_of(fn))


def registered() -> dict[str, Callable[..., Any]]:
    """A copy of the operations registered in this process, by name."""
    return dict(_REGISTRY)


def name_of(fn: Callable[..., Any] | str) -> str:
    """The wire name of an operation given as a function or a name."""
    if isinstance(fn, str):
        if ":" not in fn:
            raise UnknownOperationError(fn, "operation names look like 'module:qualname'")
        return fn
    op_name = getattr(fn, "__phalanx_operation__", None)
    if isinstance(op_name, str):
        return op_name
    what = getattr(fn, "__qualname__", None) or repr(fn)
    if isinstance(fn, types.FunctionType) and "<" in fn.__qualname__:
        raise TypeError(
            f"{what!r} is a lambda or is defined inside a function: workers find operations by module "
            f"and name; {HOW_TO_FIX} (a Runtime also needs @phalanx.operation on the def)"
        )
    raise TypeError(
        f"{what!r} is not a phalanx operation: decorate it with @phalanx.operation "
        "(or pass local_pickle=True to send any callable pickled to local workers)"
    )


_MISSING = object()


def _type_hints(fn: Any) -> dict[str, Any]:
    """``typing.get_type_hints(fn)``, read directly when every annotation is a class or a name of one.

    A module with ``from __future__ import annotations`` has only strings: typing evaluates each
    with the compiler, whose first use in a freshly forked worker costs ~0.8 ms of page faults
    on its first task. A plain name is looked up where that evaluation would look (the
    function's globals, then the builtins); anything else (a generic, a dotted name, a wrapped
    function, a name that is not of a class) goes to ``get_type_hints`` as before.
    """
    ann = getattr(fn, "__annotations__", None)
    glb = getattr(fn, "__globals__", None)
    if ann.__class__ is not dict or glb.__class__ is not dict or hasattr(fn, "__wrapped__"):
        return typing.get_type_hints(fn)
    hints: dict[str, Any] = {}
    for name, value in ann.items():
        if value.__class__ is str:
            found = glb.get(value, _MISSING)
            value = vars(builtins).get(value, _MISSING) if found is _MISSING else found
        if value is None:
            value = type(None)
        elif not issubclass(value.__class__, type):  # not a class (a generic alias is not either)
            return typing.get_type_hints(fn)
        hints[name] = value
    return hints


class Operation:
    """A resolved operation: the function plus converters for its annotations."""

    __slots__ = (
        "name", "fn", "_pos", "_pos_types", "_pos_classes", "_var", "_kw", "_varkw", "_typed", "returns",
        "options", "transient", "empty", "coroutine", "_items_type", "_results_type",
    )

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self.fn = fn
        self.options, self.transient = _OPTIONS.get(name, (TaskOptions(), ()))
        #: the monoid's identity factory (``@operation(empty=...)``), None otherwise
        self.empty: Callable[[], Any] | None = _EMPTY.get(name)
        self._pos: list[tuple[str, Any]] = []
        self._var: Any = Any
        self._kw: dict[str, Any] = {}
        self._varkw: Any = Any
        self.returns: Any = Any
        try:
            # For a class, the parameters are those of __init__ (signature() drops self).
            hints = _type_hints(getattr(fn, "__init__") if isinstance(fn, type) else fn)
            sig = inspect.signature(fn)
        except Exception:
            hints, sig = {}, None
        if sig is not None:
            for p in sig.parameters.values():
                typ = hints.get(p.name, Any)
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                    self._pos.append((p.name, typ))
                    self._kw[p.name] = typ
                elif p.kind is p.VAR_POSITIONAL:
                    self._var = typ
                elif p.kind is p.KEYWORD_ONLY:
                    self._kw[p.name] = typ
                elif p.kind is p.VAR_KEYWORD:
                    self._varkw = typ
        self.returns = hints.get("return", Any)
        if self.returns is None:
            self.returns = type(None)
        self._pos_types = [typ for _, typ in self._pos]
        #: the class behind each annotation (``dict`` for ``dict[str, int]``)
        self._pos_classes = [typing.get_origin(typ) or typ for typ in self._pos_types]
        loose = (Any, object)
        self._typed = (
            any(t not in loose for _, t in self._pos)
            or self._var not in loose
            or any(t not in loose for t in self._kw.values())
            or self._varkw not in loose
        )
        #: ``fn`` is an ``async def`` (checked once: ``inspect`` takes a quarter of a microsecond)
        self.coroutine = inspect.iscoroutinefunction(fn)
        #: what ``convert_items`` converts a map chunk's items to (None: they pass as they are),
        #: made once: msgspec reads a new ``list[...]`` alias afresh on every call
        self._items_type: Any = None
        first = self._pos[0][1] if self._pos else self._var  # a map call passes one positional
        if self._typed and first not in loose:
            self._items_type = list[first]  # type: ignore[valid-type]
        #: and what ``convert_results`` converts a chunk's values to (None: as they are)
        returns = self.returns
        loose_returns = returns is Any or returns is object
        self._results_type: Any = None if loose_returns else list[returns]  # type: ignore[valid-type]

    def parameter(self, index: int) -> tuple[str, Any]:
        """Name and annotation of positional parameter ``index`` (``Any`` when not annotated)."""
        if index < len(self._pos):
            return self._pos[index]
        return f"*args[{index - len(self._pos)}]", self._var

    def convert_args(
        self, args: Sequence[Any], kwargs: dict[str, Any] | None, trusted: int = 0
    ) -> tuple[Sequence[Any], dict[str, Any]]:
        """Convert decoded arguments to the annotated types.

        The first ``trusted`` arguments are values this process made (a
        fold's accumulator, this operation's own result): one already of the
        annotation's class (``dict`` for ``dict[str, int]``) is passed as is,
        not validated again item by item.
        """
        kw = kwargs or {}
        if not self._typed:
            return args, kw
        out = list(args)
        types = self._pos_types
        ntypes = len(types)
        try:
            for i, value in enumerate(args):
                typ = types[i] if i < ntypes else self._var
                # A value already of exactly the annotated class (an int for ``int``, a
                # Struct for its class) converts to itself: skip msgspec for it.
                if typ is Any or type(value) is typ:
                    continue
                if i < trusted and i < ntypes and type(value) is self._pos_classes[i]:
                    continue
                out[i] = convert(value, typ)
            outkw = {k: convert(v, self._kw.get(k, self._varkw)) for k, v in kw.items()} if kw else kw
        except msgspec.ValidationError:
            self._explain(args, kw)  # raises a ValidationError naming the argument
            raise
        except TypeError:
            return args, kw  # an annotation msgspec cannot check: pass values through
        return out, outkw

    def convert_items(self, items: list[Any]) -> list[Any] | None:
        """Map items (one argument each) converted in one pass; None if some item does not fit.

        One ``msgspec.convert`` of the whole list costs about what one item
        costs alone; on a mismatch the caller converts item by item, so the
        error names the failing item and the items before it still run.
        """
        items_type = self._items_type
        if items_type is None:
            return items
        try:
            return msgspec.convert(items, items_type)  # type: ignore[no-any-return]
        except Exception:  # e.g. a Struct's __post_init__: converting one by one reports it in place
            return None

    def convert_results(self, values: list[Any]) -> list[Any] | None:
        """Decoded map results converted to the return annotation in one pass; None if one does not fit."""
        results_type = self._results_type
        if results_type is None:
            return values
        try:
            return msgspec.convert(values, results_type)  # type: ignore[no-any-return]
        except Exception:  # e.g. a Struct's __post_init__: converting one by one reports it in place
            return None  # the caller converts one by one, to name the value that does not fit

    def _explain(self, args: Sequence[Any], kw: dict[str, Any]) -> None:
        npos = len(self._pos)
        for i, value in enumerate(args):
            pname, typ = self._pos[i] if i < npos else (f"*args[{i - npos}]", self._var)
            self._convert(value, typ, f"argument {pname!r}")
        for k, v in kw.items():
            self._convert(v, self._kw.get(k, self._varkw), f"argument {k!r}")

    def convert_result(self, value: Any) -> Any:
        """Convert a decoded result to the annotated return type."""
        returns = self.returns
        if returns is Any or returns is object or type(value) is returns:
            return value  # nothing to check, or already of exactly that class
        return self._convert(value, returns, "result")

    def converter(self, index: int) -> Callable[[Any, bool], Any] | None:
        """What :meth:`convert_args` does to positional argument ``index``, as one function.

        ``conv(value, trusted)`` returns the converted value or raises
        :class:`~phalanx.errors.ValidationError` naming the argument; None
        when that parameter is not annotated (nothing to convert). The
        worker runs it once per item of a directive chain.
        """
        pname, typ = self.parameter(index)
        if typ is Any or typ is object:
            return None
        cls = typing.get_origin(typ) or typ
        what = f"argument {pname!r}"
        check = self._convert

        def conv(value: Any, trusted: bool) -> Any:
            if type(value) is typ or (trusted and type(value) is cls):
                return value
            return check(value, typ, what)

        return conv

    def _convert(self, value: Any, typ: Any, what: str) -> Any:
        try:
            return convert(value, typ)
        except msgspec.ValidationError as exc:
            short = self.name.rpartition(":")[2]
            raise ValidationError(f"{what} of {short}: {_in_our_words(exc, typ, value)}") from None
        except TypeError:
            return value  # an annotation msgspec cannot check: pass the value through


_MSGSPEC_MISMATCH = re.compile(r"Expected `([^`]+)`, got `([^`]+)`(?: - at `\$(.*)`)?$")


def _in_our_words(exc: msgspec.ValidationError, typ: Any, value: Any) -> str:
    """msgspec's "Expected `object`, got `str`" as "expected Order, got str" (a path inside it kept: "at `$.x`")."""
    text = str(exc)
    match = _MSGSPEC_MISMATCH.match(text)
    if match is None:
        return text
    expected, got, path = match.groups()
    if not path:  # the value itself: name the annotation and the value's own type
        return f"expected {_type_name(typ)}, got {type(value).__name__}"
    return f"expected {expected} at `${path}`, got {got}"


def _type_name(typ: Any) -> str:
    if isinstance(typ, type):
        return typ.__qualname__
    return repr(typ).replace("typing.", "")


def _import_target(name: str) -> Any:
    module_name, _, qualname = name.partition(":")
    if not module_name or not qualname:
        raise UnknownOperationError(name, "operation names look like 'module:qualname'")
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except BaseException as exc:  # a failing import must never kill the worker
            if isinstance(exc, (KeyboardInterrupt,)):
                raise
            raise UnknownOperationError(
                name, f"module {module_name!r} failed to import: {type(exc).__name__}: {exc}"
            ) from None
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


#: why a ``__main__`` function is missing in a worker: workers are copies of the driver
#: as it was when the runtime started (phalanx.forkserver)
_LATE_MAIN = ("no such function in the workers' __main__: it was defined after the runtime's workers "
              "started: define it before `Runtime()`, or in a module")


def resolve(name: str) -> Operation:
    """Find the operation ``name`` in this process (importing its module).

    Raises :class:`UnknownOperationError` for anything that is not a
    registered operation; the outcome is cached either way.
    """
    cached = _RESOLVED.get(name)
    if cached is not None:
        if isinstance(cached, UnknownOperationError):
            raise cached
        return cached
    try:
        fn = _REGISTRY.get(name)
        if fn is None:
            target = _import_target(name)
            fn = _REGISTRY.get(name)
            if fn is None:
                if target is None:
                    raise UnknownOperationError(name, _LATE_MAIN if name.startswith("__main__:") else "no such function")
                if not (implicit_allowed() and _is_plain_function(target, name)):
                    raise UnknownOperationError(name, "not registered with @phalanx.operation")
                fn = target
        op = Operation(name, fn)
    except UnknownOperationError as exc:
        _RESOLVED[name] = exc
        raise
    _RESOLVED[name] = op
    return op


def named_operation(fn: Callable[..., Any] | str) -> tuple[str, Operation | None]:
    """``(name_of(fn), driver_operation(fn))`` at once: the per-call lookup of ``submit``.

    An ``@operation`` function already seen takes two dictionary-speed reads.
    """
    name = getattr(fn, "__phalanx_operation__", None)
    if name.__class__ is str and fn.__class__ is not OperationRef:
        cached = _RESOLVED.get(name)
        if cached.__class__ is Operation:
            return name, cached
    return name_of(fn), driver_operation(fn)


def driver_operation(fn: Callable[..., Any] | str) -> Operation | None:
    """The driver's view of an operation, for converting its results (None for names)."""
    if isinstance(fn, str):
        return None
    if isinstance(fn, OperationRef):
        return fn.op
    name = name_of(fn)
    cached = _RESOLVED.get(name)
    if isinstance(cached, Operation):
        return cached
    op = Operation(name, fn)
    _RESOLVED[name] = op
    return op


# --------------------------------------------------------------------------- #
# Implicit operations (phalanx.Executor, the joblib backend)
# --------------------------------------------------------------------------- #

_implicit = False


def set_implicit(allowed: bool) -> None:
    """In a worker (``run_worker``): whether it resolves unregistered plain functions (the option)."""
    global _implicit
    _implicit = allowed


def implicit_allowed() -> bool:
    """Whether this process (a worker) resolves unregistered plain functions."""
    return _implicit


def _is_plain_function(obj: Any, name: str) -> bool:
    """A function defined at module level under exactly ``name`` (Python, builtin or C)."""
    if isinstance(obj, types.FunctionType):
        return "<" not in obj.__qualname__ and _default_name(obj) == name  # not <lambda>, <locals>
    return _c_function_name(obj) == name


def _c_function_name(obj: Any) -> str | None:
    """``module:name`` of a builtin or C function reachable by it (None for anything else).

    A builtin bound to an object (``[].append``) is not one; numpy's
    functions and ufuncs are C callables of their own types, found by name.
    """
    if isinstance(obj, types.BuiltinFunctionType):
        if not isinstance(obj.__self__, (types.ModuleType, type(None))):
            return None  # a method of some object
    elif type(obj).__module__ != "numpy" or isinstance(obj, type) or not callable(obj):
        return None
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "." in qualname:
        return None
    name = f"{_module_name(module)}:{qualname}"
    return name if _import_target_quiet(name) is obj else None


def _import_target_quiet(name: str) -> Any:
    try:
        return _import_target(name)
    except UnknownOperationError:
        return None


class OperationRef:
    """A callable naming an operation on the wire without registering it.

    Driver side only. :func:`name_of` reads its ``__phalanx_operation__``;
    :func:`driver_operation` returns its ``op`` (used to convert results and
    find options; ``None`` leaves results as decoded). Calling it calls
    ``fn`` locally.
    """

    __slots__ = ("__phalanx_operation__", "op", "fn")

    def __init__(self, name: str, op: Operation | None, fn: Callable[..., Any] | None = None) -> None:
        self.__phalanx_operation__ = name
        self.op = op
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fn is None:
            raise TypeError(f"{self.__phalanx_operation__} has no local function")
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"OperationRef({self.__phalanx_operation__!r})"


#: the end of every message refusing a callable workers cannot find by name
HOW_TO_FIX = (
    "define it at module level (a def, not a lambda or a method), or, for local workers, "
    "pass local_pickle=True (PHALANX_LOCAL_PICKLE=1; needs 'phalanx[pickle]') to send it pickled"
)

_IMPLICIT_REFS: weakref.WeakKeyDictionary[Callable[..., Any], OperationRef] = weakref.WeakKeyDictionary()


def implicit(fn: Callable[..., Any] | str) -> Callable[..., Any] | str:
    """What to submit for ``fn`` when plain functions are allowed.

    A name or an ``@operation`` function is returned as is. A plain
    module-level Python function becomes an :class:`OperationRef` named
    ``module:qualname`` (cached per function). Anything else (a builtin, a
    lambda, a nested function, a method, a ``functools.partial``, a callable
    object) raises ``TypeError``: workers could not find it by name.
    """
    if isinstance(fn, (str, OperationRef)):
        return fn
    if isinstance(getattr(fn, "__phalanx_operation__", None), str):
        return fn
    try:
        ref = _IMPLICIT_REFS.get(fn)
    except TypeError:  # not weakly referable
        ref = None
    if ref is not None:
        return ref
    what = getattr(fn, "__qualname__", None) or repr(fn)
    if not isinstance(fn, types.FunctionType):
        c_name = _c_function_name(fn)
        if c_name is None:
            raise TypeError(
                f"{what!r} is not a function defined at module level ({type(fn).__name__}); "
                f"workers find functions by module and name: {HOW_TO_FIX}"
            )
        ref = OperationRef(c_name, Operation(c_name, fn), fn)
        try:
            _IMPLICIT_REFS[fn] = ref
        except TypeError:
            pass
        return ref
    if "<" in fn.__qualname__:
        raise TypeError(
            f"{what!r} is a lambda or is defined inside a function; workers find "
            f"functions by module and name: {HOW_TO_FIX}"
        )
    name = _default_name(fn)
    module = sys.modules.get(fn.__module__)
    target: Any = module
    for part in fn.__qualname__.split("."):
        target = getattr(target, part, None)
    if target is not fn:
        raise TypeError(
            f"{name} does not name {what!r} (was it replaced or deleted at module level?); "
            f"workers find functions by module and name: {HOW_TO_FIX}"
        )
    ref = OperationRef(name, Operation(name, fn), fn)
    _IMPLICIT_REFS[fn] = ref
    return ref


# --------------------------------------------------------------------------- #
# local_pickle: a callable carried as a value
# --------------------------------------------------------------------------- #


@operation
def _call_pickled(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``, which arrived as a value: unpickled from a local pipe (``local_pickle``)."""
    if not callable(fn):
        raise TypeError(f"{type(fn).__name__} is not callable")
    return fn(*args, **kwargs)


#: submits ``fn(*args)`` as ``_call_pickled(fn, *args)`` (the driver's view: results as decoded)
CALL_PICKLED = OperationRef(_default_name(_call_pickled), None, _call_pickled)


def pickled_call(fn: Callable[..., Any] | str, args: tuple[Any, ...]) -> tuple[Callable[..., Any] | str, tuple[Any, ...]]:
    """With ``local_pickle``: what to submit for ``fn(*args)``.

    An operation (or its name) is submitted as itself; any other callable
    goes as the first argument of ``_call_pickled`` and is pickled on its
    way to a local worker.
    """
    if isinstance(fn, (str, OperationRef)) or isinstance(getattr(fn, "__phalanx_operation__", None), str):
        return fn, args
    return CALL_PICKLED, (fn, *args)
