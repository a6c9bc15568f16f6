"""The caller-side direct read: a thread waiting in ``Future.result()`` reads its own reply.

A lone call then costs one wake-up fewer: the worker's reply wakes the
waiting caller, which reads it from the local worker's pipe
(:mod:`phalanx.pipes`), resolves it and returns, instead of waking the pump,
which wakes the caller. A lone caller whose replies come quickly spins for up
to :data:`SPIN_WAIT` before it blocks (no wake-up at all on a quiet machine),
but not while the kernel keeps preempting it (a loaded machine, where the
spin would take the CPU the worker needs to answer): see ``_Wake.may_spin``.

Threads: :meth:`DirectReader.wait` runs on any user thread waiting on a
future (never the pump's); the pump thread calls :meth:`DirectReader.nudge`
when it adds or ends a pipe and reads :meth:`DirectReader.active` each round.

Locks: ``mutex`` (this module's own) guards the count of waiting callers,
their waiters and when the last one left; a worker's ``reader`` lock is held
while its pipe is read and what was read is resolved (outcomes are resolved
under the driver's lock, in ``Driver._on_results``, and delivered with no
lock held). ``typical`` is a hint, written without a lock.

Invariants kept:

* **Exactly once, in order.** A pipe is read by one thread at a time (its
  ``reader`` lock); only outcomes of ``direct`` jobs are delivered by the
  caller; every other frame is left to the pump, which handles it only once
  the outcomes read before it are delivered.
* **No hang.** If the future settles elsewhere (a remote worker answered,
  the runtime broke) the thread's eventfd wakes it; a change to the set of
  pipes makes every waiting caller take a new snapshot of them.
"""

from __future__ import annotations

import os
import resource
import select
import threading
import time
from _thread import get_ident
from resource import RUSAGE_THREAD
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from typing import TYPE_CHECKING, Any

from .transport.codec import DECODE_ERRORS, UnpickleFailed, driver_decoder, salvage_results
from .transport.messages import Err, Ok, Results
from .transport.pipe import PipeError

if TYPE_CHECKING:
    from .core.tasks import Job
    from .driver import Driver
    from .membership import _Worker
    from .pipes import LocalPipes

__all__ = ["DirectReader", "SETTLED", "DIRECT_LINGER", "SPIN_WAIT"]

#: seconds the pump leaves local pipes to callers after the last one stopped waiting
DIRECT_LINGER = 0.002
#: longest a lone caller in wait polls without blocking (seconds): a blocked thread's
#: wake-up (an idle CPU's, on virtual machines above all) costs more than the whole reply
SPIN_WAIT = 200e-6
#: spinning waits of a thread between two looks at how often the kernel preempted it
SPIN_CHECK_EVERY = 32
#: preemptions per spinning wait above which the CPUs are taken: spinning then only
#: steals the time the worker needs for the reply, so the thread blocks instead ...
SPIN_PREEMPTED = 0.25
#: ... for this long (seconds), then spins again and looks again
SPIN_BACKOFF = 1.0

#: states of a future after which nothing is left to wait for (phalanx.Future's too)
SETTLED = frozenset({FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED})
#: per thread: its wake-up for DirectReader.wait
_THREAD = threading.local()


class _Wake:
    """A thread's eventfd: written when a future it waits on in DirectReader.wait settles elsewhere."""

    __slots__ = ("fd", "poller", "polled", "waiter", "spins", "preempted", "calm_after")

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: the poller of this thread's last wait and the pipes it polls (fd -> worker): the
        #: next wait on the same pipes reuses it instead of building one per call
        self.poller: Any = None
        self.polled: dict[int, _Worker] = {}
        #: this thread's waiter, reused by each wait that is not nested in another (a done
        #: callback run while delivering may wait too: that wait makes its own)
        self.waiter = _DirectWaiter(self.fd)
        #: spinning waits since the last look at this thread's involuntary context switches,
        #: their count then, and when this thread may spin again (time.perf_counter())
        self.spins = 0
        self.preempted = resource.getrusage(RUSAGE_THREAD).ru_nivcsw  # made on its own thread
        self.calm_after = 0.0

    def may_spin(self, now: float) -> bool:
        """Whether a wait of this thread may spin now: not while the kernel keeps preempting it.

        Every :data:`SPIN_CHECK_EVERY` spinning waits, the thread's involuntary
        context switches are read (one ``getrusage``): more than
        :data:`SPIN_PREEMPTED` per wait means other runnable threads want this
        CPU (a loaded machine), and the thread blocks for :data:`SPIN_BACKOFF`.
        """
        if now < self.calm_after:
            return False
        self.spins += 1
        if self.spins >= SPIN_CHECK_EVERY:
            count = resource.getrusage(RUSAGE_THREAD).ru_nivcsw
            if count - self.preempted > SPIN_PREEMPTED * self.spins:
                self.calm_after = now + SPIN_BACKOFF
            self.spins, self.preempted = 0, count
        return True

    def __del__(self) -> None:  # the thread ended
        os.close(self.fd)


class _DirectWaiter:
    """Installed in a future's waiters during DirectReader.wait (the protocol of concurrent.futures.wait)."""

    __slots__ = ("fd", "armed", "fired", "nudged", "busy")
    #: phalanx.Future.cancel tells it (the standard library tells only its own waiters)
    wakes_on_cancel = True

    def __init__(self, fd: int) -> None:
        self.fd = fd
        #: off while the waiting thread delivers outcomes itself (it looks at the future next anyway)
        self.armed = True
        self.fired = False
        #: the pump changed the set of pipes since this thread took its snapshot (see DirectReader.nudge)
        self.nudged = False
        #: a wait of this thread uses it now
        self.busy = False

    def nudge(self) -> None:
        self.nudged = True
        os.eventfd_write(self.fd, 1)

    def _fire(self, future: Any = None) -> None:
        if self.armed and not self.fired:
            self.fired = True
            os.eventfd_write(self.fd, 1)

    add_result = add_exception = add_cancelled = _fire


class DirectReader:
    """Callers reading local workers' pipes while they wait (see the module docstring).

    What it uses of the driver: ``_on_results`` (resolution, under the driver's
    lock), ``_deliver``, ``frame_filter``, ``wake``, ``internal_error``; of the
    pipes: ``piped``, ``pump_reads``, ``need_pump``.
    """

    def __init__(self, driver: Driver, pipes: LocalPipes) -> None:
        self.driver = driver
        self.pipes = pipes
        #: threads in wait now, and when the last one left (under mutex)
        self.waiting = 0
        #: their waiters, told when the pipes change (under mutex)
        self.waiters: set[_DirectWaiter] = set()
        self.left = 0.0
        self.mutex = threading.Lock()
        #: a moving average of how long a wait took (seconds): spin only while short
        self.typical = 0.0
        #: the pump thread's id, once it runs (it never reads pipes for a future of its own)
        self.pump_ident: int | None = None

    def active(self, now: float) -> bool:
        """Whether callers read the pipes now, or did within :data:`DIRECT_LINGER` (pump thread)."""
        return bool(self.waiting) or self.left > now - DIRECT_LINGER

    def wait(self, fut: Any, timeout: float | None) -> bool:
        """Wait for ``fut`` on this thread, reading local workers' pipes itself; False: not here.

        While a caller polls the pipes (and ``DIRECT_LINGER`` after), the pump
        does not, so it does not wake for them. A lone caller whose waits have
        been short polls without blocking for up to ``SPIN_WAIT`` first: a
        reply then costs no wake-up on this side at all. Returns True once
        ``fut`` settled or ``timeout`` passed.
        """
        driver = self.driver
        pump = self.pump_ident
        if pump is None:
            pump = self.pump_ident = driver._pump_thread.ident  # None until the pump started
        if driver._closed or get_ident() == pump:
            return False
        wake: _Wake | None = getattr(_THREAD, "wake", None)
        if wake is None:
            wake = _THREAD.wake = _Wake()
        waiter = wake.waiter
        if waiter.busy:  # a wait nested in this thread's delivery (a done callback)
            waiter = _DirectWaiter(wake.fd)
        else:
            waiter.armed, waiter.fired, waiter.nudged = True, False, False
        with fut._phalanx_lock:
            if fut._state in SETTLED:
                return True
            fut._waiters.append(waiter)
        waiter.busy = True
        deadline = None if timeout is None else time.monotonic() + timeout
        began = time.perf_counter()
        pipes = self.pipes
        mutex = self.mutex
        try:
            while True:
                # Counted (and told of pipe changes) before the snapshot, so no change is missed.
                with mutex:
                    self.waiting += 1
                    self.waiters.add(waiter)
                by_fd: dict[int, _Worker] = {}
                held = False
                for w in pipes.piped:
                    pipe = w.pipe
                    if pipe is None:
                        continue
                    fd = pipe.sock.fileno()  # -1 once closed (FramePipe.closed, without the call)
                    if fd < 0:
                        continue
                    if w.leftover:
                        # Frames left to the pump: until it took them this pipe reads as empty, so
                        # it is not polled (it may be readable), but looked at again within 1 ms.
                        held = True
                        continue
                    by_fd[fd] = w
                direct: list[tuple[Job, int, Ok | Err]] = []
                read: list[_Worker] = []
                try:
                    if not by_fd and not held and not waiter.fired:
                        return False  # no local worker: the plain wait does
                    if pipes.pump_reads:
                        driver.wake()  # it stops polling the pipes
                    poller = wake.poller
                    if poller is None or by_fd != wake.polled:  # the same workers at the same fds: reused
                        poller = wake.poller = select.poll()
                        poller.register(wake.fd, select.POLLIN)
                        for fd in by_fd:
                            poller.register(fd, select.POLLIN)
                        wake.polled = by_fd
                    # A lone caller whose replies have been quick spins briefly before blocking.
                    spin = self.waiting == 1 and self.typical < SPIN_WAIT and wake.may_spin(began)
                    events = self._spin(poller, time.perf_counter() + SPIN_WAIT) if spin else []
                    if not events:
                        ms = -1.0 if deadline is None else max(0.0, (deadline - time.monotonic()) * 1000) + 0.5
                        if held and (ms < 0 or ms > 1.0):
                            ms = 1.0  # look again soon at the pipe left out above
                        events = poller.poll(ms)
                    for fd, _ in events:
                        ready = by_fd.get(fd)
                        if ready is not None:
                            self.read(ready, direct, read)
                        elif fd == wake.fd and waiter.nudged:
                            waiter.nudged = False  # then a new snapshot
                            try:
                                os.eventfd_read(wake.fd)
                            except BlockingIOError:
                                pass
                finally:
                    with mutex:
                        self.waiting -= 1
                        self.waiters.discard(waiter)
                        self.left = time.monotonic()
                    if read:  # even if interrupted (KeyboardInterrupt): what was resolved is delivered
                        self.deliver(read, direct, waiter)
                if fut._state in SETTLED:
                    # How long replies take decides whether the next wait spins first.
                    self.typical += (time.perf_counter() - began - self.typical) * 0.25
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return True
        finally:
            with fut._phalanx_lock:
                fut._waiters.remove(waiter)
            waiter.busy = False
            if waiter.fired or waiter.nudged:
                try:
                    os.eventfd_read(wake.fd)
                except BlockingIOError:
                    pass

    @staticmethod
    def _spin(poller: Any, until: float) -> list[tuple[int, int]]:
        """Poll without blocking until something is readable or ``until`` (perf_counter) passed."""
        while True:
            events: list[tuple[int, int]] = poller.poll(0)
            if events or time.perf_counter() >= until:
                return events

    def read(self, w: _Worker, direct: list[tuple[Job, int, Ok | Err]], read: list[_Worker]) -> None:
        """Read a local worker's pipe on a waiting caller's thread; ``w`` goes in ``read`` (its
        ``delivering`` raised) once frames were taken from it: the caller then must :meth:`deliver`,
        even if an exception (KeyboardInterrupt) leaves this read."""
        with w.reader:  # if the pump holds it, wait for it, then take what is left
            pipe = w.pipe
            if pipe is None or pipe.sock.fileno() < 0 or w.leftover or w.broken:  # (< 0: closed)
                return
            try:
                frames = pipe.recv()
            except PipeError:
                w.broken = True
                frames = None
            except OSError:
                frames = None
            if frames is None:  # the end (or a bad frame): the pump ends the pipe
                self.pipes.need_pump(w)
                return
            ident = w.ident
            driver = self.driver
            frame_filter = driver.frame_filter
            if frame_filter is not None:  # fault injection sits on the link, below this read
                frames = [out for frame in frames for out in frame_filter("in", ident, frame)]
            if not frames:
                return
            w.delivering += 1
            read.append(w)
            decode = driver_decoder(driver.config.local_pickle)
            handled = 0
            try:
                for frame in frames:
                    try:
                        msg = decode(frame)
                    except DECODE_ERRORS as exc:
                        # A result that failed to unpickle (local_pickle) is that task's error.
                        msg = salvage_results(frame) if isinstance(exc, UnpickleFailed) else None  # type: ignore[assignment]
                    if not isinstance(msg, Results):
                        break
                    try:
                        driver._on_results(ident, msg, direct)
                    except Exception as exc:  # bad input is counted where it is checked: this is a bug
                        driver.internal_error(exc, "handling a frame")
                    handled += 1
            finally:
                # The rest is left to the pump, in order, before its next read of this pipe, and
                # once the outcomes read before it are delivered (see deliver); also what a
                # KeyboardInterrupt (a signal handler on this thread) left unhandled.
                if handled < len(frames):
                    w.leftover = frames[handled:]

    def deliver(self, read: list[_Worker], direct: list[tuple[Job, int, Ok | Err]],
                waiter: _DirectWaiter | None) -> None:
        """Deliver what a caller read, then let the pump handle what came after it (``waiter``:
        the caller's in :meth:`wait`; None for a submitting thread's read, see LocalPipes.help)."""
        if waiter is not None:
            waiter.armed = False  # the caller looks at its future next anyway
        try:
            self.driver._deliver(direct)
        finally:
            if waiter is not None:
                waiter.armed = True
            for w in read:
                with w.reader:
                    w.delivering -= 1
                    if not w.delivering and (w.leftover or w.deferred):
                        w.deferred = False
                        self.pipes.need_pump(w)

    def nudge(self) -> None:
        """The pipes changed (pump thread): every caller polling a snapshot of them takes a new one.

        Without it a caller would poll a closed pipe's number (perhaps reused by
        another file) or miss a new worker's Hello, which the pump does not read
        while callers read the pipes: a wait as long as the caller's timeout.
        """
        with self.mutex:
            for waiter in self.waiters:
                waiter.nudge()
