"""Finds the processes a test started, wherever they were re-parented: by a variable in their environment.

A test sets ``NAME=value`` (a fresh value per test) in the environment of what
it starts; every descendant inherits it, so the live ones are found even
after their parents died and they went to init or a subreaper.
"""

from __future__ import annotations

import psutil


def processes_marked(name: str, value: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment has ``name`` set to ``value``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(name) == value and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found
