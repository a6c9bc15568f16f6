"""Holds a runtime's pump thread in a done-callback, so it reads no local pipe until released.

Used by tests of the readers that stand in for the pump (a caller waiting in
``result()``, a thread submitting behind every credit): with the pump held,
only they can read the workers' outcomes.
"""

from __future__ import annotations

import threading

import phalanx

import ops


class PumpHeld:
    """Submits one call whose done-callback, run by the pump, waits until :meth:`release`."""

    def __init__(self, rt: phalanx.Runtime) -> None:
        self.gate = threading.Event()
        stuck = threading.Event()

        def hold(_: object) -> None:
            if threading.current_thread().name == "phalanx-pump":
                stuck.set()
                self.gate.wait(60)

        #: the call the pump is held in the delivery of (its result is 1)
        self.first = rt.submit(ops.inc, 0)
        self.first.add_done_callback(hold)
        # Nobody waits on it: the pump delivers it, and is held there.
        assert stuck.wait(30)

    def release(self) -> None:
        self.gate.set()
