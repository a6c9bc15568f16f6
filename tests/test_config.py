"""Configuration: every declared option is settable by argument and by its ``PHALANX_*`` variable.

Runs in the test process. Most tests only load a :class:`phalanx.Config` or
parse ``phalanx worker`` flags (no process starts); the last ones start a
runtime and check that the options reach the code that uses them: the
driver's sockets and actor system, and each worker (``eco_ops.worker_options``
reports what a worker sees), and that a lower actor restart limit takes
effect.

:data:`CASES` holds, for every option of ``phalanx.config.OPTIONS``, a valid
argument, a valid variable text and what it reads as, and invalid ones; a
new option without a case fails :func:`test_every_option_has_a_case`.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
from typing import Any, NamedTuple

import pytest
import zmq

import phalanx
from actor_ops import Counter, wait_settled
from eco_ops import worker_options
from phalanx import cli
from phalanx.config import OPTIONS, Config, parse_bool
from phalanx.remote import RemoteOptions, RemoteSupervisor

T = 30.0


class Case(NamedTuple):
    arg: Any  # a valid argument
    env: str  # a valid variable text...
    env_value: Any  # ...and the value it reads as
    bad_arg: Any  # an argument that is not valid
    bad_env: str | None  # a variable text that is not valid (None: any text is a valid path)


CASES: dict[str, Case] = {
    "workers": Case(3, "2", 2, -1, "two"),
    "start_method": Case("spawn", "forkserver", "forkserver", "thread", "thread"),
    "listen": Case("tcp://127.0.0.1:0", "tcp://127.0.0.1:7000", "tcp://127.0.0.1:7000", "127.0.0.1:0", "udp://h:1"),
    "credits": Case(3, "5", 5, 0, "many"),
    "start_timeout": Case(1.5, "2.5", 2.5, 0, "soon"),
    "shutdown_timeout": Case(1.0, "2", 2.0, -1.0, "x"),
    "max_attempts": Case(2, "4", 4, 0, "x"),
    "restart_limit": Case(5, "6", 6, -1, "x"),
    "restart_window": Case(3.0, "4", 4.0, 0.0, "x"),
    "abort_grace": Case(0.5, "1.5", 1.5, -1.0, "x"),
    "max_tasks_per_worker": Case(10, "20", 20, -1, "x"),
    "max_memory_per_worker": Case(1 << 30, "1_000_000", 1_000_000, -5, "1GB"),
    "heartbeat_interval": Case(0.25, "0.75", 0.75, 0.0, "x"),
    "heartbeat_timeout": Case(3.0, "4", 4.0, "3s", "nan"),
    "reconnect": Case(True, "yes", True, "yes", "maybe"),
    "server_key": Case("a.key_secret", "b.key_secret", "b.key_secret", 5, None),
    "authorized_keys": Case("dir1", "dir2", "dir2", 5, None),
    "key": Case("host.key_secret", "env.key_secret", "env.key_secret", None, None),
    "insecure": Case(True, "on", True, 1, "sure"),
    "prefix_output": Case(False, "off", False, "no", "nope"),
    "route_timeout": Case(5.0, "7.5", 7.5, -1.0, "x"),
    "actor_restart_limit": Case(1, "5", 5, -1, "x"),
    "actor_restart_window": Case(5.0, "6", 6.0, 0.0, "x"),
    "actor_timeout": Case(5.0, "6", 6.0, 0.0, "x"),
    "hwm": Case(5000, "6000", 6000, 0, "x"),
    "max_frame": Case(1 << 20, "2000000", 2_000_000, 100, "big"),
    "spin": Case(0.001, "0.002", 0.002, -1.0, "x"),
    "log_level": Case("DEBUG", "warning", "warning", "LOUD", "LOUD"),
    "implicit_operations": Case(True, "1", True, "1", "2"),
    "local_pickle": Case(True, "on", True, "on", "sometimes"),
    "host_name": Case("box-1", "box-2", "box-2", "has space", "has space"),
    "hosts": Case(["h1", "u@h2:22"], "h1, h3", ["h1", "h3"], ["h1", "h1"], "-oProxyCommand=x"),
    "workers_per_host": Case(4, "2", 2, -1, "x"),
    "min_hosts": Case(1, "0", 0, -1, "x"),
    "remote_python": Case("/usr/bin/python3", "/opt/py/bin/python", "/opt/py/bin/python", 5, None),
    "ssh_config": Case("ssh_config", "other_config", "other_config", 5, None),
    "slurm": Case(True, "yes", True, "yes", "maybe"),
    "shm_threshold": Case(0, "4096", 4096, -1, "x"),
}

RUNTIME = [name for name, o in OPTIONS.items() if o.runtime]
FLAGS = [name for name, o in OPTIONS.items() if o.worker_flag]


def extra(name: str) -> dict[str, Any]:
    """Arguments an option needs beside it to be valid (tcp without keys must say insecure)."""
    return {"insecure": True} if name == "listen" else {}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PHALANX_* variable of an option is set, whatever the calling shell exported."""
    for option in OPTIONS.values():
        monkeypatch.delenv(option.env, raising=False)


# --------------------------------------------------------------------------- #
# The declarations
# --------------------------------------------------------------------------- #


def test_every_option_has_a_case() -> None:
    assert set(CASES) == set(OPTIONS)


def test_config_fields_are_the_runtime_options() -> None:
    assert set(Config.__struct_fields__) - {"tags"} == set(RUNTIME)


def test_runtime_takes_every_option_as_an_argument() -> None:
    params = inspect.signature(phalanx.Runtime).parameters
    assert set(RUNTIME) <= set(params)
    assert all(params[name].default is None for name in RUNTIME)  # None: not given, env or default


def test_every_option_is_documented() -> None:
    for option in OPTIONS.values():
        assert option.doc and "\n" not in option.doc
        assert option.env == "PHALANX_" + option.name.upper()


# --------------------------------------------------------------------------- #
# Argument, environment, precedence, bad values
# --------------------------------------------------------------------------- #


def value_of(config: Config, name: str) -> Any:
    return getattr(config, name)


@pytest.mark.parametrize("name", RUNTIME)
def test_settable_by_argument(name: str) -> None:
    case = CASES[name]
    assert value_of(Config.load(**extra(name), **{name: case.arg}), name) == case.arg


@pytest.mark.parametrize("name", RUNTIME)
def test_settable_by_environment(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    monkeypatch.setenv(OPTIONS[name].env, case.env)
    assert value_of(Config.load(**extra(name)), name) == case.env_value


def other_env(name: str) -> str:
    """A valid variable text whose value differs from the case's argument."""
    case = CASES[name]
    if OPTIONS[name].parse is parse_bool:
        return "0" if case.arg else "1"
    assert case.env_value != case.arg
    return case.env


@pytest.mark.parametrize("name", RUNTIME)
def test_argument_wins_over_environment(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    monkeypatch.setenv(OPTIONS[name].env, other_env(name))
    assert value_of(Config.load(**extra(name), **{name: case.arg}), name) == case.arg


@pytest.mark.parametrize("name", RUNTIME)
def test_bad_argument_names_the_option(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        Config.load(**extra(name), **{name: CASES[name].bad_arg})


@pytest.mark.parametrize("name", [n for n in RUNTIME if CASES[n].bad_env is not None])
def test_bad_variable_names_the_variable(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = OPTIONS[name].env
    monkeypatch.setenv(env, str(CASES[name].bad_env))
    with pytest.raises(ValueError, match=rf"^{env}="):
        Config.load(**extra(name))


def test_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_CREDITS", "")
    monkeypatch.setenv("PHALANX_RECONNECT", "  ")
    config = Config.load()
    assert config.credits == 16 and config.reconnect is False


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Config.load(kredits=3)
    with pytest.raises(TypeError):
        Config.load(key="host.key_secret")  # a phalanx worker option only


# --------------------------------------------------------------------------- #
# Booleans
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(("raw", "value"), [
    *((t, True) for t in ("1", "true", "TRUE", "Yes", "on", " ON ")),
    *((f, False) for f in ("0", "false", "False", "NO", "off", "Off ")),
])
def test_boolean_words(raw: str, value: bool) -> None:
    assert parse_bool(raw) is value


@pytest.mark.parametrize(("name", "raw"), [("reconnect", "maybe"), ("prefix_output", "nope"),
                                           ("insecure", "2"), ("implicit_operations", "enabled")])
def test_bad_boolean_variable_is_refused(name: str, raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = OPTIONS[name].env
    monkeypatch.setenv(env, raw)
    with pytest.raises(ValueError, match=rf"^{env}={raw!r}: expected 1/0, true/false, yes/no or on/off"):
        Config.load()


# --------------------------------------------------------------------------- #
# phalanx worker flags
# --------------------------------------------------------------------------- #


def worker_args(*flags: str) -> Any:
    return cli.build_parser().parse_args(["worker", "--connect", "tcp://127.0.0.1:9", *flags])


def flag_for(name: str, value: Any) -> list[str]:
    flag = OPTIONS[name].worker_flag
    assert flag is not None
    if OPTIONS[name].parse is parse_bool:
        return [flag if value else "--no-" + flag[2:]]
    return [flag, str(value)]


@pytest.mark.parametrize("name", FLAGS)
def test_worker_flag_and_variable(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    assert getattr(cli.remote_options(worker_args(*flag_for(name, case.arg))), name) == case.arg
    monkeypatch.setenv(OPTIONS[name].env, case.env)
    assert getattr(cli.remote_options(worker_args()), name) == case.env_value
    monkeypatch.setenv(OPTIONS[name].env, other_env(name))
    assert getattr(cli.remote_options(worker_args(*flag_for(name, case.arg))), name) == case.arg


def test_worker_bad_values_exit_with_usage(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["worker", "--connect", "tcp://127.0.0.1:9", "--credits", "0"]) == cli.EXIT_USAGE
    assert "credits must be >= 1" in capsys.readouterr().err
    monkeypatch.setenv("PHALANX_SPIN", "-1")
    assert cli.main(["worker", "--connect", "tcp://127.0.0.1:9", "--insecure"]) == cli.EXIT_USAGE
    assert "PHALANX_SPIN='-1'" in capsys.readouterr().err


def test_remote_workers_get_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    options = RemoteOptions(connect="tcp://127.0.0.1:9", workers=1, insecure=True, abort_grace=0.5,
                            max_memory_per_worker=1 << 30, hwm=5000, max_frame=1 << 20, spin=0.001,
                            log_level="INFO", prefix_output=False, implicit_operations=True, credits=3)
    spec = RemoteSupervisor(options)._spec()
    assert (spec.abort_grace, spec.max_memory, spec.limits.hwm, spec.limits.max_frame, spec.spin) == (
        0.5, 1 << 30, 5000, 1 << 20, 0.001)
    assert (spec.log_level, spec.prefix_output, spec.implicit_operations, spec.credits) == ("INFO", False, True, 3)
    assert "WITHOUT CURVE" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# The options reach the code that uses them
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("start_method", ["phalanx", "fork", "spawn"])  # spawn: nothing inherited, all from the spec
def test_options_reach_the_driver_and_the_workers(start_method: str, monkeypatch: pytest.MonkeyPatch,
                                                  phalanx_logger: logging.Logger) -> None:
    # Half by argument, half by variable: both paths end in the same places.
    monkeypatch.setenv("PHALANX_START_METHOD", start_method)
    monkeypatch.setenv("PHALANX_SPIN", "0.001")
    monkeypatch.setenv("PHALANX_HWM", "5000")
    monkeypatch.setenv("PHALANX_ACTOR_TIMEOUT", "7")
    with phalanx.Runtime(workers=1, max_frame=1 << 20, implicit_operations=True, log_level="WARNING",
                         abort_grace=0.5, credits=3, prefix_output=False, actor_restart_limit=2,
                         actor_restart_window=5.0) as rt:
        assert rt.submit(worker_options).result(timeout=T) == {
            "spin": 0.001, "hwm": 5000, "max_frame": 1 << 20, "implicit_operations": True,
            "log_level": "WARNING", "prefix_output": False, "abort_grace": 0.5, "credits": 3,
        }
        assert rt.endpoints  # bound by then: a runtime that does not listen makes its sockets after its start
        results = rt._driver._results
        assert results is not None
        assert (results.getsockopt(zmq.SNDHWM), results.getsockopt(zmq.MAXMSGSIZE)) == (5000, 1 << 20)
        actors = rt._actors
        assert (actors.max_restarts, actors.restart_window, actors.timeout) == (2, 5.0, 7.0)
        assert phalanx_logger.level == logging.WARNING
        assert any(not isinstance(h, logging.NullHandler) for h in phalanx_logger.handlers)


def test_a_lower_actor_restart_limit_takes_effect() -> None:
    with phalanx.Runtime(workers=2, actor_restart_limit=1) as rt:
        ref = rt.spawn(Counter, 0, restart_policy="on-failure", checkpoint_every=1)
        assert ref.incr(1).result(timeout=T) == 1
        os.kill(ref.pid().result(timeout=T), signal.SIGKILL)  # the one restart allowed
        wait_settled(rt, workers=2, deaths=1)
        assert ref.get().result(timeout=T) == 1
        os.kill(ref.pid().result(timeout=T), signal.SIGKILL)  # with the default limit (3): restarted
        # the events until the actor ended: no second restart
        events = [(type(e).__name__, getattr(e, "final", None)) for e in ref.events(timeout=T)]
        assert events == [("Started", None), ("Failed", False), ("Started", None), ("Failed", True)]
        ref.join(T)
        assert ref.state == "failed"
        wait_settled(rt, workers=2, deaths=2)
