"""Local workers' pipes on the driver's side: writing tasks, holding them back, flushing, reading.

Each local worker speaks over one socketpair, "the pipe"
(:mod:`phalanx.transport.pipe`), in place of both ZeroMQ ROUTERs. This
module owns what the driver does with those pipes; what a frame means is the
:class:`~phalanx.driver.Driver`'s (``Driver._handle``).

Threads:

* any thread that dispatches (user threads, the supervisor thread, the
  pump) writes task frames (:meth:`LocalPipes.send_locked`), always under
  the driver's lock;
* the pump thread registers new pipes, flushes backlogs, writes frames held
  too long, reads the pipes and ends them (:meth:`LocalPipes.before_poll`,
  :meth:`LocalPipes.after_poll`);
* a caller waiting in ``Future.result()`` may read them instead of the pump
  (:mod:`phalanx.direct`), and so may a thread submitting calls behind every
  free credit (:meth:`LocalPipes.help`, with the same read): then the pump
  does not poll them for input.

Locks: the driver's lock guards ``held``/``held_at`` of each worker, the
``holding`` and ``backlogged`` sets and every write to a pipe; a worker's
``reader`` lock is held while its pipe is read and what was read is handled,
so frames are read once and handled in order, by the pump or by one caller.
``piped`` is replaced, never changed in place, so callers read it unlocked;
``by_fd`` and ``new`` are the pump's.

Invariants kept:

* **Order.** Frames for one worker go out in the order they were sent;
  frames held back go out before anything written after them.
* **No hang.** A task held back for a busy worker goes out when that
  worker's next outcome is read, or after :data:`HOLD_MAX` at the latest; a
  backlog the kernel did not take is flushed once the pipe is writable.
* **Bad input never kills the driver.** A frame above ``max_frame`` ends the
  pipe and kills its worker (it is replaced); the frame is counted.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import zmq

from .transport.pipe import FramePipe, PipeError

if TYPE_CHECKING:
    import socket

    from .core.tasks import Job
    from .driver import Driver
    from .membership import _Worker
    from .transport.messages import Err, Ok

__all__ = ["LocalPipes", "HOLD_MAX", "HELP_PERIOD", "HELP_LINGER"]

log = logging.getLogger("phalanx.driver")

#: longest a task frame for a busy local worker waits to go out with the next ones (seconds);
#: normally the worker's next outcome releases it much sooner (see LocalPipes.send_locked)
HOLD_MAX = 0.002
#: shortest time between two reads of the pipes by a thread submitting behind every free credit
#: (seconds; see LocalPipes.help)
HELP_PERIOD = 0.001
#: seconds the pump leaves the pipes to such a thread after its last read: it is back within
#: HELP_PERIOD while it submits; what the credits keep a worker busy for covers a pause
HELP_LINGER = 0.01


class LocalPipes:
    """The driver's ends of its local workers' pipes (see the module docstring).

    What it uses of the driver: its lock, ``frame_filter``, ``limits``, ``wake``,
    ``_handle`` (what a frame means), ``internal_error``, ``frames_dropped``, and
    ``direct.nudge`` / ``lifecycle.kill_soon``.
    """

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        #: local workers' pipes the pump does not poll yet (it registers them)
        self.new: deque[_Worker] = deque()
        #: pipes holding a backlog the pump must flush when they become writable
        self.backlogged: set[_Worker] = set()
        #: local workers with task frames held back (see send_locked)
        self.holding: set[_Worker] = set()
        #: local workers whose pipes the pump polls (replaced, never changed: callers read it unlocked)
        self.piped: tuple[_Worker, ...] = ()
        #: the same by file descriptor (pump thread)
        self.by_fd: dict[int, _Worker] = {}
        #: the pump reads pipes itself (False while callers read them: see phalanx.direct)
        self.pump_reads = True
        #: pipes a caller needs the pump to read even so (frames left to it, the end, a bad frame)
        self.attention: deque[_Worker] = deque()
        #: when a submitting thread last read the pipes (see help; a hint, written without a lock)
        self.helped = 0.0
        #: help's poll, and the pipes it polls by file descriptor, for the ``piped`` they came from
        self._help_poll: select.poll | None = None
        self._help_piped: tuple[_Worker, ...] | None = None
        self._help_fds: dict[int, _Worker] = {}
        #: held by the one submitting thread that reads (a poll object is one thread's at a time)
        self._help_lock = threading.Lock()

    def add(self, w: _Worker, end: socket.socket) -> None:
        """A local worker started: the pump polls its pipe from its next round."""
        w.pipe = FramePipe(end, self.driver.limits.max_frame)
        self.new.append(w)

    # ---- writing (under the driver's lock) ------------------------------------------------

    def send_locked(self, w: _Worker, pipe: FramePipe, frames: tuple[bytes, ...] | list[bytes],
                    hold: bool = False, filtered: bool = False) -> None:
        """Write frames to a local worker's pipe; the pump flushes what the kernel did not take.

        ``hold``: these are tasks for a worker that still owes an outcome, so they wait in
        ``w.held`` and go out in one write with the next ones when that outcome is read
        (``Driver._on_results``), or after :data:`HOLD_MAX` at the latest. A busy worker could
        not start them sooner; writing each at once costs a system call and a wake-up of
        the worker per task. A task for an idle worker is never held. Each frame
        passes ``frame_filter`` (fault injection) here, unless ``filtered``.
        """
        frame_filter = self.driver.frame_filter
        if frame_filter is not None and not filtered:
            frames = [out for frame in frames for out in frame_filter("out", w.ident, frame)]
        if hold:
            if not w.held:
                w.held_at = time.monotonic()
                self.holding.add(w)
            w.held.extend(frames)
            return
        if w.held:  # anything else goes out behind what is held, in order
            frames = [*w.held, *frames]
            w.held = []
            self.holding.discard(w)
        if pipe.send_many(frames) and w not in self.backlogged:
            self.backlogged.add(w)
            self.driver.wake()

    def release_locked(self, w: _Worker) -> None:
        """Write the task frames held for ``w`` (lock held); a closed pipe's are redelivered with its tasks."""
        assert w.pipe is not None  # only local workers' frames are held; their pipe stays set
        try:
            self.send_locked(w, w.pipe, ())
        except PipeError:
            # The worker is going away: no new work for it; its reader sees the pipe's end
            # and redelivers its in-flight tasks, these among them.
            self.driver._remove_live_locked(w)

    def end_locked(self, w: _Worker) -> None:
        """Close a local worker's pipe (its reader saw the end, or the runtime is shutting down)."""
        if w.pipe is not None:
            w.pipe.close()
        self.backlogged.discard(w)
        self.holding.discard(w)
        w.held = []
        w.pipe_done.set()

    # ---- a submitting thread's read -------------------------------------------------------

    def help(self) -> None:
        """A thread that just queued tasks behind every free credit reads the outcomes that are ready.

        While one thread submits faster than the workers run tasks, the pump
        would take the interpreter from it for each pipe it reads and each task
        it writes, and wait for it back after each system call (the switch
        interval, 5 ms): the workers ran dry, though their next tasks were
        queued here. So the submitting thread reads the pipes itself, as a
        caller waiting in ``Future.result()`` does (:mod:`phalanx.direct`: the
        same read), at most every :data:`HELP_PERIOD`, and resolves what it read;
        the pump delivers it (no done-callback runs inside ``submit``). The pump
        leaves the pipes to it :data:`HELP_LINGER` after its last read
        (:meth:`helping`). Never waits for the workers; never on the pump's thread.
        """
        now = time.monotonic()
        if now - self.helped < HELP_PERIOD:
            return
        driver = self.driver
        piped = self.piped
        if not piped or driver._closed or threading.current_thread() is driver._pump_thread:
            return
        if not self._help_lock.acquire(blocking=False):
            return  # another submitting thread reads them now
        try:
            self.helped = now
            self._help_read(piped)
        finally:
            self._help_lock.release()

    def _help_read(self, piped: tuple[_Worker, ...]) -> None:
        """:meth:`help`'s read, by one thread at a time."""
        driver = self.driver
        if piped is not self._help_piped:
            poll = select.poll()
            by_fd: dict[int, _Worker] = {}
            for w in piped:
                if w.pipe is not None and not w.pipe.closed:
                    by_fd[w.pipe.fileno()] = w
                    poll.register(w.pipe.fileno(), select.POLLIN)
            self._help_poll, self._help_piped, self._help_fds = poll, piped, by_fd
        assert self._help_poll is not None
        if self.pump_reads:
            driver.wake()  # it stops polling the pipes (see helping)
        direct = driver.direct
        by_fd = self._help_fds
        ready: list[tuple[Job, int, Ok | Err]] = []
        read: list[_Worker] = []
        try:
            for fd, _ in self._help_poll.poll(0):
                ready_w = by_fd.get(fd)  # a pipe ended since is seen closed by the read
                if ready_w is not None:
                    direct.read(ready_w, ready, read)
        finally:
            if read:  # even if interrupted (KeyboardInterrupt): what was resolved is delivered
                self._help_hand_over(read, ready)

    def _help_hand_over(self, read: list[_Worker], ready: list[tuple[Job, int, Ok | Err]]) -> None:
        """:meth:`help`'s end: what it resolved goes to the pump, which delivers it."""
        driver = self.driver
        # Resolved here (credits back, the next tasks written); delivered by the pump: a
        # delivery runs done-callbacks, and the caller of submit may hold a lock one of them
        # takes (concurrent.futures' executors do). The pump delivers before it handles any
        # frame read after these (see Driver._handle).
        if ready:
            with driver._lock:
                woken = bool(driver._deliveries)  # whoever queued those woke it (or its round runs)
                driver._deliveries.extend(ready)
            if not woken:
                driver.wake()
        driver.direct.deliver(read, [], None)

    def helping(self, now: float) -> float:
        """Seconds the pipes stay a submitting thread's (0: none read them lately; pump thread)."""
        return max(0.0, self.helped + HELP_LINGER - now)

    # ---- the pump's round -------------------------------------------------------------------

    def before_poll(self, poller: zmq.Poller, wait: float, reads: bool) -> float:
        """Register new pipes, switch reading to ``reads``, write what is due; the poll's wait (ms)."""
        new = self.new
        while new:
            w = new.popleft()
            if w.pipe is not None:
                self.by_fd[w.pipe.fileno()] = w
                poller.register(w.pipe.fileno(), self.events(w))
                self.piped = tuple(self.by_fd.values())
                self.driver.direct.nudge()
        if reads != self.pump_reads:
            self.pump_reads = reads
            for w in self.by_fd.values():
                poller.register(w.pipe.fileno(), self.events(w))  # type: ignore[union-attr]
        if self.holding:
            wait = min(wait, self.release_stale() * 1000)
        if self.backlogged:
            self.flush(poller)
        return wait

    def after_poll(self, poller: zmq.Poller, events: dict[int, int], reads: bool) -> None:
        """Read the pipes that are readable (when the pump reads them) and those a caller left to it."""
        by_fd = self.by_fd
        if reads:
            helped = self.helped
            for fd, w in list(by_fd.items()):
                if fd in events:
                    if self.helped != helped:
                        # A submitting thread reads them again (see help): the rest are its. Each
                        # read here hands it the interpreter, and waits for it back.
                        break
                    self.read(poller, fd, w)
        attention = self.attention
        while attention:
            w = attention.popleft()
            if w.pipe is not None and by_fd.get(w.pipe.fileno()) is w:
                self.read(poller, w.pipe.fileno(), w)

    def need_pump(self, w: _Worker) -> None:
        """Have the pump read ``w``'s pipe even while callers read the pipes."""
        self.attention.append(w)
        self.driver.wake()

    def read(self, poller: zmq.Poller, fd: int, w: _Worker) -> None:
        """Handle what a local worker wrote; at its end, stop polling it (pump thread)."""
        driver = self.driver
        with w.reader:
            assert w.pipe is not None
            if w.delivering:
                # A caller is delivering outcomes it read from this pipe: what follows them
                # waits (it asks for this pipe again when done); meanwhile do not poll it.
                poller.register(fd, zmq.POLLOUT if w in self.backlogged else 0)
                w.deferred = True
                return
            poller.register(fd, self.events(w))
            frames: list[bytes] | None
            frames, w.leftover = w.leftover, []
            self.handle_frames(w, frames, filtered=True)  # a caller's read passed them through
            try:
                if w.broken:
                    raise PipeError("a caller read a frame above max_frame")
                frames = w.pipe.recv()
            except PipeError:
                # A worker never sends one (it turns a result too large into an error): a bug or
                # an attack. Its stream cannot be trusted past it: kill it; its tasks are settled
                # by the crash rules, and it is replaced.
                log.warning("worker %s sent a frame above max_frame: killing it", w.id)
                driver.frames_dropped += 1
                driver.lifecycle.kill_soon(w)
                frames = None
            except OSError:
                frames = None
            if frames is None:
                poller.register(fd, 0)  # unregisters
                del self.by_fd[fd]
                self.piped = tuple(self.by_fd.values())
                driver.direct.nudge()  # before the close: a caller polling this fd looks again
                with driver._lock:
                    self.end_locked(w)
                return
            self.handle_frames(w, frames)

    def handle_frames(self, w: _Worker, frames: list[bytes], filtered: bool = False) -> None:
        driver = self.driver
        ident = w.ident
        for frame in frames:
            try:
                driver._handle([ident, frame], filtered, local=True)
            except Exception as exc:  # bad input is counted where it is checked: this is a bug
                driver.internal_error(exc, "handling a frame")

    def release_stale(self) -> float:
        """Write frames held :data:`HOLD_MAX` or longer; seconds until the next are due (pump thread)."""
        now = time.monotonic()
        due = HOLD_MAX
        with self.driver._lock:
            for w in list(self.holding):
                if now - w.held_at >= HOLD_MAX:
                    self.release_locked(w)
                else:
                    due = min(due, HOLD_MAX - (now - w.held_at))
        return due

    def flush(self, poller: zmq.Poller) -> None:
        """Write pipes' backlogs; poll those still holding some for writability (pump thread)."""
        with self.driver._lock:
            for w in list(self.backlogged):
                pipe = w.pipe
                try:
                    done = pipe is None or pipe.flush()
                except PipeError:
                    done = True  # the worker is gone: its reader sees the end
                if done:
                    self.backlogged.discard(w)
                if pipe is not None and not pipe.closed:
                    poller.register(pipe.fileno(), self.events(w))

    def events(self, w: _Worker) -> int:
        """What the pump polls a pipe for: readable unless callers read it, writable while backlogged."""
        return (zmq.POLLIN if self.pump_reads else 0) | (zmq.POLLOUT if w in self.backlogged else 0)

    def end_all(self) -> None:
        """Close every pipe (the pump's end)."""
        for w in [*self.by_fd.values(), *self.new]:
            with w.reader, self.driver._lock:  # not while a caller reads it (phalanx.direct)
                self.end_locked(w)
