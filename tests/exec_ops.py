"""Plain functions the executor, asyncio and joblib tests run in workers.

Imported by the test (driver) process and, by name, by the worker processes
of both ``ProcessPoolExecutor`` (by pickle) and ``phalanx.Executor`` (by
``module:qualname``, with no ``@phalanx.operation``: they are named
implicitly). Everything is module-level and importing has no side effects.

Tasks that must stay busy wait for a file the test creates (``release``), so
tests never sleep for a guessed duration; ``started`` files tell a test that
a task is running.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

WAIT_LIMIT = 30.0


def square(x: int) -> int:
    return x * x


def add(a: Any, b: Any) -> Any:
    return a + b


def power(base: int, exp: int = 2) -> int:
    return int(base**exp)


def identity(x: Any) -> Any:
    return x


def pair(x: int) -> tuple[int, int]:
    return (x, x * x)


def pid(_: Any = None) -> int:
    return os.getpid()


def fail(message: str = "boom") -> None:
    raise ValueError(message)


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def unencodable_result() -> Any:
    return threading.Lock()


def die(code: int = 7) -> None:
    os._exit(code)


class Scaler:
    """Its bound method is picklable (ProcessPoolExecutor runs it) but has no module-level name."""

    def __init__(self, k: int) -> None:
        self.k = k

    def scale(self, x: int) -> int:
        return self.k * x


def make_nested() -> Any:
    def nested(x: int) -> int:
        return x + 1

    return nested


def die_first_time(log: str, code: int = 9) -> list[int]:
    """Append this process's pid to ``log``; die on the first run, else return every pid logged."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    pids = [int(line) for line in Path(log).read_text().split()]
    if len(pids) == 1:
        os._exit(code)
    return pids


def parent_value() -> Any:
    """``STATE["value"]`` as this process sees it: set in the parent, it survives fork, not spawn."""
    return STATE.get("value")


def wait_for(release: str, started: str | None = None, value: Any = None) -> Any:
    """Block until the file ``release`` exists (touch ``started`` first)."""
    if started is not None:
        Path(started).touch()
    deadline = time.monotonic() + WAIT_LIMIT
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.005)
    return value


def sleep_and_return(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


# ---- initializer ------------------------------------------------------------------

STATE: dict[str, Any] = {}


def init_state(value: Any, marker_dir: str | None = None) -> None:
    STATE["value"] = value
    STATE["inits"] = STATE.get("inits", 0) + 1
    if marker_dir is not None:
        Path(marker_dir, f"init-{os.getpid()}").touch()


def read_state() -> Any:
    return STATE.get("value")


def read_inits() -> int:
    return int(STATE.get("inits", 0))


def init_fail() -> None:
    raise RuntimeError("initializer failed on purpose")


# ---- joblib ------------------------------------------------------------------------


def poly_score(alpha: float, degree: int, xs: list[float], ys: list[float]) -> float:
    """Negative squared error of ``alpha * x ** degree`` on (xs, ys): a toy model score."""
    return -sum((y - alpha * x**degree) ** 2 for x, y in zip(xs, ys))


def fit_and_score(params: dict[str, Any], train: list[list[float]], test: list[list[float]]) -> float:
    """Fit ``y = a * x ** degree`` on ``train`` (ridge penalty ``lam``), score on ``test``.

    A scikit-learn-free stand-in for one (parameters, fold) cell of a grid
    search: returns the negative mean squared error on the held-out fold.
    """
    degree, lam = int(params["degree"]), float(params["lam"])
    num = sum(y * x**degree for x, y in train)
    den = sum((x**degree) ** 2 for x, _ in train) + lam
    a = num / den
    return -sum((y - a * x**degree) ** 2 for x, y in test) / len(test)


def append_line_after(path: str, delay: float, line: str) -> None:
    """Sleep ``delay`` seconds, then append ``line`` to ``path`` (work still running at exit)."""
    time.sleep(delay)
    with open(path, "a") as f:
        f.write(line + "\n")


def say(text: str) -> None:
    """Print ``text`` in the worker (what reaches the driver's stdout)."""
    print(text, flush=True)


def joblib_in_daemonic_process(n: int) -> tuple[list[Any], list[str]]:
    """Run a phalanx-backed joblib loop here (a daemonic Pool worker); its results and warnings."""
    import warnings

    import joblib

    import phalanx.joblib_backend  # noqa: F401  (registers the backend)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = joblib.Parallel(n_jobs=2, backend="phalanx")(joblib.delayed(square)(i) for i in range(n))
    return list(out), [str(w.message) for w in caught]
