"""What a hostile or careless remote can make the driver do through values and errors.

Runs real worker processes (the test process is the driver). What is checked:

* Arguments that cannot be encoded (a list containing itself, a list nested
  100,000 deep) raise :class:`phalanx.EncodeError` (a ``TypeError``) naming
  what could not be encoded, at ``submit``, ``map``, actor calls and channel
  sends, before anything is sent; the runtime keeps serving. Such a value
  as a *result* is an EncodeError too, and its worker does not die.
* A remote exception is rebuilt as its own type only from a module the
  driver already has in ``sys.modules``: a worker raising an exception whose
  type claims to live in ``this`` or ``venv.__main__`` (importing them prints
  the Zen of Python, or runs venv's argument parser and its ``SystemExit``)
  gets the caller a :class:`phalanx.RemoteError` naming the type, with the
  remote traceback; the module is not imported and no module ``__getattr__``
  runs; the runtime keeps serving.
* A task's ``StopIteration`` never ends a ``map`` early as if it were
  complete: it is a RemoteError.
* Rebuilding never raises anything but a plain exception value: a known
  type whose constructor raises ``SystemExit`` or ``KeyboardInterrupt`` on
  the remote arguments, or returns a non-exception, becomes a RemoteError.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

import phalanx

import rebuild_ops

T = 60.0  # seconds: generous waits, never asserted on


@pytest.fixture(scope="module")
def rt() -> Iterator[phalanx.Runtime]:
    runtime = phalanx.Runtime(workers=2)
    try:
        yield runtime
    finally:
        runtime.shutdown()


def still_serves(rt: phalanx.Runtime) -> None:
    assert rt.submit(rebuild_ops.echo, [1, 2]).result(timeout=T) == [1, 2]
    assert list(rt.map(rebuild_ops.echo, range(20), timeout=T)) == list(range(20))


def _self_referencing() -> list[Any]:
    value: list[Any] = [1]
    value.append(value)
    return value


def _deep(depth: int = 100_000) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


# --------------------------------------------------------------------------- #
# Arguments that cannot be encoded
# --------------------------------------------------------------------------- #


@pytest.mark.timeout(120)
@pytest.mark.parametrize("make", [_self_referencing, _deep], ids=["self-referencing", "nested-100000"])
def test_unencodable_arguments_raise_encode_error_everywhere(rt: phalanx.Runtime, make: Any) -> None:
    value = make()
    with pytest.raises(phalanx.EncodeError, match="the arguments of .*echo") as info:
        rt.submit(rebuild_ops.echo, value)
    assert isinstance(info.value, TypeError)
    assert "nest" in str(info.value)  # says why: the value nests too deep (or contains itself)
    with pytest.raises(phalanx.EncodeError, match="echo"):
        list(rt.map(rebuild_ops.echo, [1, value, 3], timeout=T))
    actor = rt.spawn(rebuild_ops.Echo)
    try:
        with pytest.raises(phalanx.EncodeError, match="Echo.echo"):
            actor.echo(value)
        assert actor.echo(5).result(timeout=T) == 5
    finally:
        actor.stop()
    with rt.lease() as (tx, rx):
        with pytest.raises(phalanx.EncodeError, match="a channel message"):
            tx.send(value)
        tx.send("fine")
        assert rx.recv(timeout=T) == "fine"
    still_serves(rt)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["self", "deep"])
def test_unencodable_results_are_encode_errors_not_worker_deaths(rt: phalanx.Runtime, kind: str) -> None:
    pids = rt.worker_pids()
    with pytest.raises(phalanx.EncodeError, match="return_unencodable"):
        rt.submit(rebuild_ops.return_unencodable, kind).result(timeout=T)
    assert rt.worker_pids() == pids and rt.stats().worker_deaths == 0
    still_serves(rt)


# --------------------------------------------------------------------------- #
# Rebuilding remote exceptions
# --------------------------------------------------------------------------- #


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", ["this", "venv.__main__"])
def test_remote_exception_never_imports_its_module_in_the_driver(rt: phalanx.Runtime, module: str) -> None:
    assert module not in sys.modules  # the driver never imported it
    fut = rt.submit(rebuild_ops.raise_forged, module, "Forged", "from a hostile worker")
    with pytest.raises(phalanx.RemoteError) as info:
        fut.result(timeout=T)
    err = info.value
    assert err.type_name == f"{module}:Forged"
    assert err.message == "from a hostile worker"
    assert "raise_forged" in err.remote_traceback
    assert isinstance(err.__cause__, phalanx.RemoteTraceback)
    assert module not in sys.modules
    still_serves(rt)


@pytest.mark.timeout(120)
def test_rebuilding_runs_no_module_getattr(rt: phalanx.Runtime) -> None:
    """``rebuild_ops`` is imported in the driver; its module ``__getattr__`` must not run."""
    before = list(rebuild_ops.LOOKUPS)  # pytest's collection probes modules too
    for qualname in ("Lazy", "Lazy.Inner", "echo.__class__"):
        with pytest.raises(phalanx.RemoteError) as info:
            rt.submit(rebuild_ops.raise_forged, "rebuild_ops", qualname, "x").result(timeout=T)
        assert info.value.type_name == f"rebuild_ops:{qualname}"
    assert rebuild_ops.LOOKUPS == before
    still_serves(rt)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("name", "arg"),
    [("ExitOnRebuild", "exit"), ("InterruptOnRebuild", "interrupt"), ("NotAnException", "new")],
)
def test_hostile_constructors_become_remote_error(rt: phalanx.Runtime, name: str, arg: str) -> None:
    fut = rt.submit(rebuild_ops.raise_built_with, name, arg)
    with pytest.raises(phalanx.RemoteError) as info:
        fut.result(timeout=T)
    assert info.value.type_name == f"rebuild_ops:{name}"
    assert "raise_built_with" in info.value.remote_traceback
    # the same types with harmless arguments are rebuilt as themselves
    cls = getattr(rebuild_ops, name)
    with pytest.raises(cls):
        rt.submit(rebuild_ops.raise_built_with, name, "harmless").result(timeout=T)
    still_serves(rt)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunksize", [1, 4])
def test_remote_stop_iteration_never_ends_a_map_early(rt: phalanx.Runtime, chunksize: int) -> None:
    """A task's StopIteration, raised as such by the map's iterator, would end it as if complete."""
    got: list[int] = []
    with pytest.raises(phalanx.RemoteError) as info:
        for value in rt.map(rebuild_ops.stop_at, range(10), [5] * 10, chunksize=chunksize, timeout=T):
            got.append(value)
    assert got == list(range(5))
    assert info.value.type_name == "builtins:StopIteration"
    with pytest.raises(phalanx.RemoteError):
        rt.submit(rebuild_ops.stop_at, 1, 1).result(timeout=T)
    still_serves(rt)
