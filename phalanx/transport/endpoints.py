"""Where the driver binds and workers connect.

Runs in the driver (``bind``) and in workers (``connect`` strings they are
given). By default the three driver sockets live as ``ipc://`` files in a
private temporary directory that only this user can enter and that is removed
on shutdown (a SIGKILLed driver cannot: the next runtime of the same user to
shut down removes the directories whose name, or ``runtime.json``, names a
process that is gone); ``tcp://HOST:PORT`` binds three consecutive ports
starting at ``PORT`` (``PORT`` 0 picks free ones).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import msgspec

__all__ = ["Endpoints", "local_endpoints", "tcp_endpoints", "connect_endpoints", "parse_listen",
           "DIRS", "ADVERTS", "adverts", "own_start", "start_ticks", "writer_alive", "remove_stale_dirs"]

#: the runtimes' private ipc directories
DIRS = "/tmp/phalanx-*"
#: where runtimes advertise themselves (``runtime.json`` in each private ipc dir)
ADVERTS = f"{DIRS}/runtime.json"


class Endpoints(msgspec.Struct, frozen=True):
    """The three addresses of one runtime, plus the private dir for ipc."""

    tasks: str
    results: str
    control: str
    ipc_dir: str | None = None

    def remove(self) -> None:
        """Delete the ipc directory, if any."""
        if self.ipc_dir is not None:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


def local_endpoints() -> Endpoints:
    """Fresh ipc endpoints in a private (mode 0700) temporary directory."""
    if not os.path.isdir("/tmp"):
        d = tempfile.mkdtemp(prefix="phalanx-")
    else:  # short paths: unix sockets cap at ~107 bytes
        # mkdtemp's way, without its random-name generator (~0.2 ms to make, in a first runtime);
        # named after this process, so it is removed once the process is gone, even if it died
        # before it wrote runtime.json in it
        pid, ticks = own_start()
        owner = f"{pid}-{ticks}-" if ticks is not None else ""
        for _ in range(100):
            d = f"/tmp/phalanx-{owner}{os.urandom(6).hex()}"
            try:
                os.mkdir(d, 0o700)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError("no unused name for the runtime's ipc directory in /tmp")
    return Endpoints(
        tasks=f"ipc://{d}/tasks",
        results=f"ipc://{d}/results",
        control=f"ipc://{d}/control",
        ipc_dir=d,
    )


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot; None if there is no such process.

    ``/proc/PID/stat``'s 22nd field, which never changes: unlike a creation time
    in wall-clock seconds (``psutil``'s), which is these ticks plus the boot
    time, and the boot time moves whenever the clock steps (NTP, a resumed VM).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # fields 3 onward follow the command name's closing parenthesis
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


#: this process's pid and start_ticks(pid), read by its first runtime (a forked child reads its own)
_own: tuple[int, int | None] | None = None


def own_start() -> tuple[int, int | None]:
    """This process's pid and :func:`start_ticks` (which never change while it runs)."""
    global _own
    pid = os.getpid()
    if _own is None or _own[0] != pid:
        _own = (pid, start_ticks(pid))
    return _own


#: an ipc directory named after its driver (see local_endpoints): pid, start ticks, random
_OWNED = re.compile(r"phalanx-(\d+)-(\d+)-[0-9a-f]{12}")


def writer_alive(info: dict[str, Any]) -> bool:
    """Whether the process that wrote the ``runtime.json`` ``info`` still runs.

    Not just some process with its pid: a SIGKILLed driver leaves the file
    behind and a later process may get its pid, so the recorded start (see
    :func:`start_ticks`) must match too.
    """
    pid = int(info["pid"])
    ticks = info.get("start_ticks")
    if ticks is not None:
        return start_ticks(pid) == int(ticks)
    # written without a start: the pid is all there is to go on
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def adverts() -> Iterator[tuple[str, dict[str, Any], bool]]:
    """``(ipc dir, runtime.json, whether its writer still runs)`` for each readable advert on this machine."""
    for path in glob.glob(ADVERTS):
        try:
            with open(path, "rb") as f:
                info = msgspec.json.decode(f.read())
            alive = writer_alive(info)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, msgspec.DecodeError):
            continue
        yield os.path.dirname(path), info, alive


def remove_stale_dirs() -> int:
    """Remove the ipc directories of this user's runtimes whose driver is gone; how many.

    A directory is its driver's while the process its name gives (see
    local_endpoints) runs; one named otherwise, while the writer of its
    ``runtime.json`` runs; one with neither may belong to a runtime still
    starting, and is left alone.
    """
    removed = 0
    uid = os.getuid()
    advertised = {d: alive for d, _, alive in adverts()}
    for d in glob.glob(DIRS):
        owner = _OWNED.fullmatch(os.path.basename(d))
        alive = start_ticks(int(owner[1])) == int(owner[2]) if owner else advertised.get(d, True)
        try:
            if alive or os.stat(d).st_uid != uid:
                continue
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    return removed


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def connect_endpoints(address: str) -> Endpoints:
    """What a remote worker connects to, given the driver's ``tcp://HOST:PORT``."""
    host, port = parse_listen(address)
    return Endpoints(
        tasks=f"tcp://{host}:{port}", results=f"tcp://{host}:{port + 1}", control=f"tcp://{host}:{port + 2}"
    )


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``tcp://HOST:PORT`` into ``(HOST, PORT)``; raise ValueError otherwise."""
    if not listen.startswith("tcp://"):
        raise ValueError(f"listen address must look like tcp://HOST:PORT, got {listen!r}")
    host, sep, port = listen[len("tcp://"):].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"listen address must look like tcp://HOST:PORT, got {listen!r}")
    return host, int(port)


def _free_ports(host: str, tries: int = 50) -> int:
    """A port P such that P, P+1 and P+2 are free on ``host`` now."""
    for _ in range(tries):
        base = _free_port(host)
        if base + 2 > 65535:
            continue
        socks = []
        try:
            for port in (base + 1, base + 2):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise OSError(f"found no three consecutive free ports on {host}")


def tcp_endpoints(listen: str) -> Endpoints:
    """TCP endpoints on ``PORT``, ``PORT+1``, ``PORT+2``.

    ``PORT`` 0 picks three consecutive free ports, so that a remote worker
    needs only the first: ``phalanx worker --connect tcp://HOST:PORT``.
    """
    host, port = parse_listen(listen)
    if port == 0:
        port = _free_ports(host)
    ports = [port, port + 1, port + 2]
    return Endpoints(
        tasks=f"tcp://{host}:{ports[0]}",
        results=f"tcp://{host}:{ports[1]}",
        control=f"tcp://{host}:{ports[2]}",
    )
