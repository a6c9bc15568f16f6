"""Checks on the packaging scaffold: setup.cfg and the py.typed marker."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _requirement_names(value: str) -> set[str]:
    names = set()
    for line in value.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        assert match, f"unparsable requirement: {line!r}"
        names.add(match.group(0).lower())
    return names


def test_setup_cfg_declares_runtime_dependencies() -> None:
    cfg = configparser.ConfigParser(interpolation=None)
    assert cfg.read(ROOT / "setup.cfg"), "setup.cfg not found"
    assert cfg["metadata"]["name"] == "phalanx"
    required = _requirement_names(cfg["options"]["install_requires"])
    assert {"pyzmq", "msgspec", "psutil"} <= required


def test_package_ships_py_typed() -> None:
    assert (ROOT / "phalanx" / "py.typed").is_file()
