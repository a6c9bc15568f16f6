"""Large numpy arrays through shared memory between a driver and its local workers.

Runs in the driver and in local workers (never in a remote worker: a segment
name must never leave the host). An array of at least :func:`threshold` bytes
inside a task (``Call``, ``Chunk``, ``ActorCall``) or a worker's ``Results`` is
written once into a file in ``/dev/shm`` and only its name, dtype and shape
travel (msgpack extension :data:`SHM_NDARRAY`, see
:mod:`phalanx.transport.codec`).

A driver's task arrays go into **pooled segments** it keeps mapped and reuses
(a fresh file per array pays allocation, zero-filling and page faults: more
than the copy). A pooled segment starts with :data:`HEAD` bytes: the generation
sent (written by the sender with the array), claimed and released (written by
the receiver)::

    sender (driver)                                 receiver (worker)
    take a segment whose released == sent,
    sent += 1, copy the array in        --name, gen-->  sent == gen and claimed != gen, else refused;
                                                        claimed = gen; the array is a view of a
                                                        buffer over its (cached) mapping
                                                        ... that buffer collected: released = gen

So a record is read once, and a segment is written again only once nothing
reads the previous array: every view of it keeps the buffer alive. A segment
whose receiver died or never read it stays out of use until the pool goes.

A worker's result arrays each get a file of their own, unlinked by the driver
as soon as it has mapped it::

    open(O_CREAT|O_EXCL), write, close  --name-->  open, mmap, unlink, close

Invariants kept:

* **no leak**: segment names are ``phalanx-<driver pid>-<32 hex>``. The pool
  is unlinked when the driver's last runtime stops. What was written but never
  received or handed back (the driver or the receiving worker was killed, a
  queued task was cancelled) is removed by :func:`sweep`: every runtime start
  (once its first workers are ready: see :func:`runtime_started`) and
  shutdown removes the segments of drivers that are gone (and the last
  shutdown in a driver its own), and a local worker that ends because its
  driver died removes its driver's (:func:`release_orphaned`).
* **nothing but our own segments is opened**: a name must match the pattern,
  carry the driver pid this process serves, be a regular file owned by this
  user and hold exactly the bytes the dtype and shape need (a pooled one: at
  least :data:`HEAD` more, and the generation the record names), or the record is
  malformed (``ValueError``: the frame is dropped and counted). The 128 random
  bits of a name are never sent over tcp, so a remote peer cannot name one.
* **tcp keeps the frame path**: a driver uses segments only while none of its
  runtimes accepts remote workers (``listen``); a remote worker never does.

A sender that cannot create a segment (``/dev/shm`` missing or full) sends the
array inline, as without this module.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import struct
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec

__all__ = [
    "SHM_DIR",
    "SHM_NDARRAY",
    "PREFIX",
    "threshold",
    "owner",
    "set_worker",
    "runtime_started",
    "runtime_stopped",
    "sweep_dead",
    "write_array",
    "read_array",
    "sweep",
    "release_orphaned",
    "ours",
    "peeking",
    "discard_written",
    "keep_written",
    "SegmentRef",
    "HEAD",
    "POOL_BYTES",
    "pooled",
]

#: where POSIX shared memory lives on Linux
SHM_DIR = "/dev/shm"
#: the msgpack extension code of an array in a segment (one of codec's codes: see EXT_CODES there)
SHM_NDARRAY = 23
#: every segment name starts with it
PREFIX = "phalanx-"
_NAME = re.compile(r"phalanx-([0-9]+)-[0-9a-f]{32}\Z")
_LEN = struct.Struct("<I")
#: a pooled segment's first bytes: generation sent, generation claimed, generation released
_STATE = struct.Struct("<QQQ")
_U64 = struct.Struct("<Q")
_CLAIMED = 8
_RELEASED = 16
#: bytes before a pooled segment's data (a cache line: the data stays aligned)
HEAD = 64
#: most bytes one process keeps in pooled segments it writes (beyond: one segment per array)
POOL_BYTES = 256 * 1024 * 1024
#: most mappings of pooled segments a receiver keeps open for reuse (and at most POOL_BYTES)
_MAPPED_MAX = 16


class _Record(msgspec.Struct, array_like=True, frozen=True):
    """An array's place: a pooled segment (``gen`` > 0, data after :data:`HEAD`) or a
    segment of its own (``gen`` 0: exactly its bytes, unlinked by the receiver)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    gen: int = 0


_HEADER = msgspec.msgpack.Decoder(_Record)


class _Segment:
    """A pooled segment this process writes: mapped once, reused while its receiver has released it."""

    __slots__ = ("name", "mapping", "capacity", "gen")

    def __init__(self, name: str, mapping: Any, capacity: int) -> None:
        self.name = name
        self.mapping = mapping
        self.capacity = capacity
        self.gen = 0

    def free(self) -> bool:
        """True once the receiver of the last array written here released it (or none was)."""
        return bool(_U64.unpack_from(self.mapping, _RELEASED)[0] == self.gen)

# Re-entrant: a runtime collected while this lock is held (a garbage collection can run at
# any allocation) calls _forget, which takes it again, from the same thread.
_lock = threading.RLock()
#: bytes from which arrays in tasks/results go through a segment (0: never)
_threshold = 0
#: the pid of the driver whose segments this process writes and accepts (None: none)
_owner: int | None = None
#: live runtimes of this process: (shm_threshold, accepts remote workers)
_runtimes: weakref.WeakKeyDictionary[Any, tuple[int, bool]] = weakref.WeakKeyDictionary()
#: the process _runtimes belongs to: a forked child's copy lists its parent's runtimes, not its own
_runtimes_pid = os.getpid()
#: per thread: peeking (decode without mapping), segments written by the message being encoded
_peek = threading.local()
#: this process writes arrays into pooled segments (a driver), else one segment per array
_pooling = False
#: pooled segments this process writes, by capacity
_pool: dict[int, list[_Segment]] = {}
# Re-entrant, as _lock: a collection inside may run a runtime's finalizer, which resets the pool.
_pool_lock = threading.RLock()
#: mappings of pooled segments this process received arrays in, least recently used first
_mapped: OrderedDict[str, Any] = OrderedDict()
_mapped_lock = threading.RLock()


def pooled() -> list[str]:
    """Names of the pooled segments this process writes (the rest are in flight or not ours)."""
    with _pool_lock:
        return sorted(seg.name for segments in _pool.values() for seg in segments)


def _pooled_bytes() -> int:
    """The total capacity of the pooled segments (under _pool_lock)."""
    return sum(capacity * len(segments) for capacity, segments in _pool.items())


def _reset_pool() -> None:
    """Forget the pooled segments (their files are unlinked by :func:`sweep`, or are not ours)."""
    _pool.clear()
    _mapped.clear()


# A forked child never writes into, nor releases, its parent's segments: its locks start
# unlocked, its pool and mappings empty. Each hook is a method in C (the objects are never
# rebound): a fork runs no Python code of this module, where a function of ours cost each
# worker ~0.05 ms as it started (the pages of its code and of what it touched, copied).
for _hook in (_pool_lock._at_fork_reinit, _mapped_lock._at_fork_reinit,  # type: ignore[attr-defined]
              _pool.clear, _mapped.clear):
    os.register_at_fork(after_in_child=_hook)
del _hook

#: /dev/shm is there (None: not looked yet; a worker inherits its driver's answer)
_available: bool | None = None


def available() -> bool:
    global _available
    if _available is None:
        _available = sys.platform.startswith("linux") and os.path.isdir(SHM_DIR)
    return _available


def threshold() -> int:
    """Bytes from which an array in a task or a result goes through a segment (0: never)."""
    return _threshold


def owner() -> int | None:
    """The driver pid whose segments this process writes and accepts."""
    return _owner


def set_worker(driver_pid: int | None, limit: int) -> None:
    """A local worker of driver ``driver_pid`` sends arrays of ``limit`` bytes or more through segments.

    ``driver_pid`` None: a remote worker, which neither writes nor accepts segments.
    """
    global _threshold, _owner, _pooling
    with _lock:
        _reset_pool()
        _pooling = False
        _owner = driver_pid
        _threshold = limit if driver_pid is not None and available() else 0


def _own_runtimes() -> weakref.WeakKeyDictionary[Any, tuple[int, bool]]:
    """This process's live runtimes (under _lock). A forked child (a worker) starts a table of its
    own when it first needs one, not as it starts: making one cost a worker ~0.1 ms of its start."""
    global _runtimes, _runtimes_pid
    if _runtimes_pid != os.getpid():
        _runtimes = weakref.WeakKeyDictionary()
        _runtimes_pid = os.getpid()
    return _runtimes


def _recompute() -> None:
    global _threshold, _owner, _pooling
    entries = list(_own_runtimes().values())
    if not entries:
        _threshold = 0
        return
    _owner = os.getpid()
    _pooling = True
    limits = [limit for limit, _ in entries if limit > 0]
    remote = any(r for _, r in entries)
    _threshold = min(limits) if limits and not remote and available() else 0


def runtime_started(runtime: Any, limit: int, remote: bool, sweep_now: bool = True) -> None:
    """A runtime of this driver process starts: sweep what dead drivers left, then use segments.

    ``sweep_now=False``: the caller runs :func:`sweep_dead` itself later (a runtime does, once
    its first workers are ready: listing ``/dev/shm`` is no work for the start to wait on).
    """
    if sweep_now:
        sweep_dead()
    with _lock:
        _own_runtimes()[runtime] = (limit, remote)
        _recompute()
    # A runtime dropped without shutdown() counts as stopped once collected (in this
    # process: a forked worker that collects its copy must not stop its own segments).
    weakref.finalize(runtime, _forget, os.getpid())


def sweep_dead() -> None:
    """Remove this user's segments of dead drivers, if this system has shared memory."""
    if available():
        sweep()


def runtime_stopped(runtime: Any) -> None:
    """A runtime stopped: the last one removes this driver's own segments too."""
    with _lock:
        _own_runtimes().pop(runtime, None)
    _forget()


def _forget(pid: int | None = None) -> None:
    if pid is not None and pid != os.getpid():
        return
    with _lock:
        _recompute()
        last = not _own_runtimes()
    if last:  # never under _lock: a collection while _pool_lock is held may call this
        with _pool_lock:
            _reset_pool()
    if available():
        sweep(own=last)


@contextmanager
def peeking() -> Iterator[None]:
    """Decode without mapping: arrays in segments come out as :class:`SegmentRef` (fault filters)."""
    _peek.on = True
    try:
        yield
    finally:
        _peek.on = False


class SegmentRef(msgspec.Struct, frozen=True):
    """An array in a segment, seen without mapping it (see :func:`peeking`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def _alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (a killed driver its parent has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2][1:2] != b"Z"
    except OSError:
        return True


def ours() -> list[str]:
    """Names of every phalanx segment in ``/dev/shm`` (of any driver, this user's or not)."""
    try:
        # The prefix first: /dev/shm is shared with every program (semaphores, joblib's folders...),
        # and each runtime's start and end look through it.
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX) and _NAME.match(n))
    except OSError:
        return []


def sweep(own: bool = False) -> int:
    """Remove this user's segments of dead drivers (and with ``own``, this process's); how many."""
    removed = 0
    uid = os.getuid()
    me = os.getpid()
    for name in ours():
        m = _NAME.match(name)
        assert m is not None
        pid = int(m.group(1))
        if pid == me:
            if not own:
                continue
        elif _alive(pid):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            if os.stat(path, follow_symlinks=False).st_uid != uid:
                continue
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def release_orphaned() -> None:
    """In a local worker ending: if its driver is gone, remove the driver's segments."""
    pid = _owner
    if pid is None or pid == os.getpid() or _alive(pid) or not available():
        return
    prefix = f"{PREFIX}{pid}-"
    for name in ours():
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass


def discard_written() -> None:
    """A message failed to encode (this thread): remove (or hand back) the segments it wrote."""
    written = getattr(_peek, "written", None)
    _peek.written = None
    for entry in written or ():
        if isinstance(entry, _Segment):
            _U64.pack_into(entry.mapping, _RELEASED, entry.gen)  # never sent: free again
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, entry))
        except OSError:
            pass


def keep_written() -> None:
    """A message was encoded (this thread): the segments it wrote are its receiver's now."""
    _peek.written = None


def _size_class(nbytes: int) -> int:
    """The capacity of a pooled segment for ``nbytes``: four classes per power of two."""
    if nbytes <= 4096:
        return 4096
    step = 1 << (nbytes.bit_length() - 3)
    return -(-nbytes // step) * step


def _create(pid: int) -> tuple[str, str, int] | None:
    """A new segment file of ours, private to this user: its name, path and an open fd (None: cannot)."""
    name = f"{PREFIX}{pid}-{secrets.token_hex(16)}"
    path = os.path.join(SHM_DIR, name)
    try:
        return name, path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return None


def _new_segment(pid: int, capacity: int) -> _Segment | None:
    import mmap

    created = _create(pid)
    if created is None:
        return None
    name, path, fd = created
    try:
        os.posix_fallocate(fd, 0, HEAD + capacity)  # the pages now, or ENOSPC now (not SIGBUS later)
        mapping = mmap.mmap(fd, HEAD + capacity, flags=mmap.MAP_SHARED)
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    finally:
        os.close(fd)
    return _Segment(name, mapping, capacity)


def _take_segment(pid: int, nbytes: int) -> _Segment | None:
    """A free pooled segment for ``nbytes`` (a new one if the pool has room), marked in use; or None."""
    capacity = _size_class(nbytes)
    with _pool_lock:
        segments = _pool.setdefault(capacity, [])
        for seg in segments:
            if seg.free():
                break
        else:
            pooled = _pooled_bytes()
            if pooled + capacity > POOL_BYTES:
                _evict(pooled + capacity - POOL_BYTES)
                if _pooled_bytes() + capacity > POOL_BYTES:
                    return None
            made = _new_segment(pid, capacity)
            if made is None:
                return None
            seg = made
            segments.append(seg)
        seg.gen += 1
        _U64.pack_into(seg.mapping, 0, seg.gen)
        return seg


def _evict(need: int) -> None:
    """Remove free pooled segments (largest first) until ``need`` bytes are gone (under _pool_lock)."""
    for capacity in sorted(_pool, reverse=True):
        segments = _pool[capacity]
        for seg in list(segments):
            if need <= 0:
                return
            if seg.free():
                segments.remove(seg)
                need -= capacity
                try:
                    os.unlink(os.path.join(SHM_DIR, seg.name))
                except OSError:
                    pass


def _noted(entry: str | _Segment) -> None:
    written = getattr(_peek, "written", None)
    if written is None:  # the first segment of the message being encoded
        written = _peek.written = []
    written.append(entry)


def write_array(array: Any) -> bytes | None:
    """Write ``array`` into a segment; the extension payload naming it, or None (send inline).

    A driver writes into a pooled segment (reused once its receiver released it);
    otherwise, or when the pool is full, the array gets a segment of its own.
    """
    import numpy as np

    pid = _owner
    if pid is None:
        return None
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    if _pooling and array.nbytes <= POOL_BYTES // 4:
        seg = _take_segment(pid, array.nbytes)
        if seg is not None:
            _noted(seg)
            np.frombuffer(seg.mapping, dtype=np.uint8, count=array.nbytes, offset=HEAD)[...] = \
                array.reshape(-1).view(np.uint8)
            return _payload(_Record(seg.name, array.dtype.str, array.shape, seg.gen))
    created = _create(pid)
    if created is None:
        return None
    name, path, fd = created
    try:
        view = memoryview(array.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
    except OSError:  # /dev/shm is full: the array travels inline
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    os.close(fd)
    _noted(name)
    return _payload(_Record(name, array.dtype.str, array.shape))


def _payload(record: _Record) -> bytes:
    header = msgspec.msgpack.encode(record)
    return _LEN.pack(len(header)) + header


def _release(mapping: Any, gen: int, pid: int) -> None:
    """The receiver's array of generation ``gen`` is gone: its sender may reuse the segment."""
    if os.getpid() != pid:  # collected in a forked child: the parent may still read it
        return
    try:
        _U64.pack_into(mapping, _RELEASED, gen)
    except (ValueError, TypeError):  # closed
        pass


def _open_checked(name: str, at_least: int, exact: bool) -> Any:
    """The mapping of segment ``name`` (whole file), after checking it is ours; ValueError if not."""
    import mmap

    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"shared-memory segment unavailable: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        size = st.st_size
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or at_least <= 0 \
                or size < at_least or size != at_least and (exact or size > HEAD + POOL_BYTES):
            raise ValueError(f"shared-memory segment holds {size} bytes, the record needs {at_least}")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        if exact:
            try:
                os.unlink(path)  # mapped (or refused): its memory goes with the last mapping
            except OSError:
                pass
        os.close(fd)


def read_array(data: memoryview) -> Any:
    """The array a :data:`SHM_NDARRAY` payload names, mapped; ValueError if bad.

    A segment of its own is unlinked once mapped. A pooled one is claimed (a record
    is read once) and handed back to its sender when the returned array, and every
    view of it, is collected.
    """
    import ctypes

    import numpy as np

    from .buffers import array_layout

    if len(data) < _LEN.size:
        raise ValueError("truncated shared-memory record")
    (size,) = _LEN.unpack_from(data, 0)
    if _LEN.size + size != len(data):
        raise ValueError("bad shared-memory record length")
    try:
        record = _HEADER.decode(data[_LEN.size:])
        name, dtype_str, shape, gen = record.name, record.dtype, record.shape, record.gen
        dtype = np.dtype(dtype_str)
    except (msgspec.DecodeError, TypeError) as exc:
        raise ValueError(f"bad shared-memory record: {exc}") from None
    m = _NAME.match(name)
    if m is None or _owner is None or int(m.group(1)) != _owner:
        raise ValueError("refused shared-memory segment name")
    count, nbytes = array_layout(dtype, dtype_str, shape)
    if getattr(_peek, "on", False):
        return SegmentRef(name, dtype_str, tuple(shape))
    if gen <= 0:
        mapping = _open_checked(name, nbytes, exact=True)
        return np.frombuffer(mapping, dtype=dtype, count=count).reshape(shape)
    with _mapped_lock:
        mapping = _mapped.get(name)
        if mapping is None:
            mapping = _open_checked(name, HEAD + nbytes, exact=False)
            _mapped[name] = mapping
            # Unmapped once no array of it is left (the sender may have removed it long ago).
            while len(_mapped) > _MAPPED_MAX or sum(map(len, _mapped.values())) > POOL_BYTES:
                _mapped.popitem(last=False)
        else:
            _mapped.move_to_end(name)
        if len(mapping) < HEAD + nbytes or nbytes == 0:
            raise ValueError(f"shared-memory segment holds {len(mapping)} bytes, the record needs {HEAD + nbytes}")
        sent, claimed, _ = _STATE.unpack_from(mapping, 0)
        if sent != gen or claimed == gen:
            raise ValueError("shared-memory record read twice or out of date")
        _U64.pack_into(mapping, _CLAIMED, gen)
    # A buffer of its own over the segment: every view of the array keeps it alive,
    # so its collection means nothing reads the segment any more.
    exporter: Any = (ctypes.c_char * (len(mapping) - HEAD)).from_buffer(mapping, HEAD)
    weakref.finalize(exporter, _release, mapping, gen, os.getpid()).atexit = False
    return np.frombuffer(exporter, dtype=dtype, count=count).reshape(shape)
