"""Retry and fatal-failure strategies (paladin's Transient / Fatal model).

Runs in the driver, which decides what happens to a failed task; workers only
report whether the failure was transient (``phalanx.Transient`` or one of the
operation's ``transient=`` exception types).

* A **transient** failure is retried under a :class:`RetryStrategy`:
  :class:`Immediate`, :class:`After` or :class:`Exponential`, each with a
  maximum number of retries. When they run out the failure becomes fatal.
* A **fatal** failure is handled by the job's :class:`FatalStrategy`:
  ``Terminate`` (default) fails the job with the remote error and cancels its
  other tasks on every worker; ``Ignore`` drops the failed item, and the job
  still completes, reporting what it skipped.

:class:`TaskOptions` also carries ``on``, the worker tag a job is routed to
(see :meth:`phalanx.Runtime.options`): the driver dispatches its tasks only
to live workers holding that tag.
"""

from __future__ import annotations

import enum

import msgspec

__all__ = [
    "RetryStrategy",
    "Immediate",
    "After",
    "Exponential",
    "FatalStrategy",
    "Terminate",
    "Ignore",
    "TaskOptions",
    "DEFAULT_TAG",
    "check_tag",
]


class RetryStrategy(msgspec.Struct, frozen=True):
    """When to retry a transiently failed task: ``delay(retry)`` or None to stop."""

    def delay(self, retry: int) -> float | None:
        """Seconds to wait before retry number ``retry`` (1-based), or None."""
        raise NotImplementedError


class Immediate(RetryStrategy, frozen=True):
    """``Immediate(n)``: retry at once, up to ``n`` times."""

    retries: int = 3

    def delay(self, retry: int) -> float | None:
        return 0.0 if retry <= self.retries else None


class After(RetryStrategy, frozen=True):
    """``After(delay, n)``: retry after ``delay`` seconds, up to ``n`` times."""

    seconds: float = 0.1
    retries: int = 3

    def delay(self, retry: int) -> float | None:
        return self.seconds if retry <= self.retries else None


class Exponential(RetryStrategy, frozen=True):
    """``Exponential(initial, factor, max_delay, n)``: back off exponentially.

    Retry ``k`` waits ``min(max_delay, initial * factor**(k-1))`` seconds.
    """

    initial: float = 0.05
    factor: float = 2.0
    max_delay: float = 5.0
    retries: int = 5

    def delay(self, retry: int) -> float | None:
        if retry > self.retries:
            return None
        return float(min(self.max_delay, self.initial * self.factor ** (retry - 1)))


class FatalStrategy(enum.Enum):
    """What a fatal task failure does to its job."""

    #: fail the job and cancel its other tasks on every worker
    TERMINATE = "terminate"
    #: drop the failed item; the job completes and reports what it skipped
    IGNORE = "ignore"


Terminate = FatalStrategy.TERMINATE
Ignore = FatalStrategy.IGNORE


#: the tag of workers started without one, and of work routed nowhere in particular
DEFAULT_TAG = "default"


class TaskOptions(msgspec.Struct, frozen=True):
    """Per-operation or per-job execution options (None: inherit).

    ``on`` is the worker tag the job's tasks are routed to (None: ``"default"``).
    """

    retry: RetryStrategy | None = None
    on_fatal: FatalStrategy | None = None
    timeout: float | None = None
    on: str | None = None

    @property
    def tag(self) -> str:
        """The worker tag these options route to."""
        return self.on or DEFAULT_TAG

    def merged(self, over: TaskOptions | None) -> TaskOptions:
        """These options with every non-None field of ``over`` applied."""
        if over is None:
            return self
        return TaskOptions(
            retry=over.retry if over.retry is not None else self.retry,
            on_fatal=over.on_fatal if over.on_fatal is not None else self.on_fatal,
            timeout=over.timeout if over.timeout is not None else self.timeout,
            on=over.on if over.on is not None else self.on,
        )


def check_tag(tag: object) -> str:
    """``tag`` if it is a valid worker tag, else ValueError.

    A tag is a non-empty string without whitespace, ``,`` or ``=`` (so that
    ``PHALANX_WORKERS=default=2,io=4`` can list them).
    """
    if not isinstance(tag, str) or not tag or any(c.isspace() or c in ",=" for c in tag):
        raise ValueError(f"a worker tag is a non-empty string without spaces, ',' or '=': got {tag!r}")
    return tag
