"""Progress bars for ``Runtime.map(..., progress=True)``.

Runs in the driver, in the thread that iterates the map: the bar is updated
as results arrive (one update per chunk, not per item) and closed when the
map ends or is closed.

Invariant kept: progress never changes what a map yields or raises, and
costs nothing when it is off. The bar is drawn with tqdm (the optional
``progress`` extra) on standard error, with a rate and an ETA, only when
standard error is a terminal; without tqdm, or when output is redirected,
``progress=True`` does nothing.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import IO, Any, Protocol

__all__ = ["ProgressBar", "progress_bar"]

logger = logging.getLogger(__name__)


class ProgressBar(Protocol):
    """What a map needs from a bar: count finished items, then close."""

    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...


def progress_bar(
    total: int | None,
    description: str = "",
    *,
    file: IO[str] | None = None,
    force: bool = False,
) -> ProgressBar | None:
    """A tqdm bar for ``total`` items, or None when there should be no bar.

    ``file`` defaults to standard error; the bar is shown only if it is a
    terminal (or ``force``). ``total=None`` (an iterator of unknown length)
    shows a count and a rate without an ETA.
    """
    stream = sys.stderr if file is None else file
    if not force:
        try:
            if not stream.isatty():
                return None
        except (AttributeError, ValueError):
            return None
    try:
        tqdm: Any = importlib.import_module("tqdm").tqdm
    except ImportError:
        logger.debug("progress=True needs tqdm (pip install 'phalanx[progress]'); no bar shown")
        return None
    bar: ProgressBar = tqdm(
        total=total,
        desc=description or None,
        unit="item",
        file=stream,
        dynamic_ncols=True,
        smoothing=0.1,
        mininterval=0.1,
        leave=True,
    )
    return bar
