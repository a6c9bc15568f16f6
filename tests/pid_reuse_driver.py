"""A driver that signals a worker whose pid another process took meanwhile (tests/test_pidfd.py).

Runs as pid 1 of a new pid namespace (``unshare --pid --fork --mount-proc``),
where nobody else forks: writing N-1 to ``/proc/sys/kernel/ns_last_pid`` gives
its next process pid N. Usage: ``pid_reuse_driver.py START_METHOD PATH``, PATH
one of ``kill`` (``Supervisor.kill``), ``stop`` (``Supervisor.stop``: SIGTERM,
SIGCONT, then the kill) or ``leave`` (``stop`` with the leave signal of
``phalanx worker``), or ``harness`` (``phalanx.testing.kill_child``, by pid).

1. A supervisor starts one worker; nobody reads its exit yet (the supervisor is
   not started: its exit reader is "late", as a busy driver's may be).
2. The worker is SIGKILLed and reaped (by phalanx's fork server, by
   multiprocessing's fork server, or, for fork/spawn, by
   ``multiprocessing.active_children()``, as another runtime's start does).
3. A stranger (``sleep``) is started with exactly the worker's old pid.
4. The driver's real path signals "the worker".
5. The stranger is sent SIGVTALRM and reaped: it reports that signal if nothing
   reached it before; SIGKILL, SIGTERM or SIGUSR1 if the driver signalled it.

Prints one JSON line: {"pid": the worker's pid, "stranger": the stranger's
pid, "status": its exit status (negative: the signal)}.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time


def main() -> None:
    method, path = sys.argv[1], sys.argv[2]
    from phalanx.supervisor import Supervisor
    from phalanx.transport.endpoints import local_endpoints
    from phalanx.worker import LEAVE_SIGNAL, WorkerSpec

    assert os.getpid() == 1, "run me as pid 1 of a new pid namespace"
    sup = Supervisor(method, lambda wid, code: None)
    endpoints = local_endpoints()
    spec = WorkerSpec(worker_id="w1", endpoints=endpoints, credits=1, parent_pid=os.getpid(),
                      prefix_output=False)
    pid, pipe, control = sup.spawn_piped(spec)
    os.kill(pid, signal.SIGKILL)  # unreaped so far: it is still the worker
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}"):  # a zombie keeps its entry: gone means reaped
        assert time.monotonic() < deadline, "the worker was never reaped"
        if method != "phalanx" and method != "forkserver":
            multiprocessing.active_children()  # reaps every finished child of this process
        time.sleep(0.01)
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        if path == "kill":
            sup.kill("w1")
        elif path == "stop":
            sup.stop(0.0)
        elif path == "leave":
            sup.stop(0.0, leave_signal=LEAVE_SIGNAL)
        elif path == "harness":
            from phalanx.testing.inject import kill_child

            kill_child(pid)
        else:
            raise SystemExit(f"unknown path {path}")
    finally:
        stranger.send_signal(signal.SIGVTALRM)
        status = stranger.wait()
        if path not in ("stop", "leave"):
            sup.stop(0.0)
        pipe.close()
        control.close()
        endpoints.remove()
    print(json.dumps({"pid": pid, "stranger": stranger.pid, "status": status}), flush=True)


if __name__ == "__main__":
    main()
