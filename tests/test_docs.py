"""The documentation works: every Python example runs, links resolve, the API page is current.

Runs in the test process; each example runs as a script in its own
subprocess (which starts its own workers), so an example cannot disturb the
test process or another example.

The convention, which every page under ``docs/`` and ``README.md`` follows
(it is restated in ``docs/index.md``, "About these docs"):

* Every fenced block tagged ``python`` is a complete program. It is written
  to ``example.py`` in a fresh temporary directory, which is also the
  working directory, and run as ``python -W error example.py`` with the
  repository root (and ``docs/examples`` when it exists) on ``PYTHONPATH``
  and no ``PHALANX_*`` variable set. It must exit with status 0 within
  :data:`LIMIT` seconds, and check its own results with ``assert``. Blocks
  do not share state: each one imports what it uses and defines its
  operations at module level (workers find them in ``__main__``, under
  ``if __name__ == "__main__":`` as with multiprocessing).
* ``<!-- file: NAME.py -->`` on the line before a ``python`` block makes it a
  module rather than a program: it is not run, but written as ``NAME.py``
  next to every example of the same page (for examples whose workers
  import a module by name, as ``phalanx worker --import`` does).
* ``<!-- hosts: ssh N -->`` or ``<!-- hosts: slurm -->`` on the line before
  a ``python`` block runs it (as root, where network namespaces can be made;
  skipped, saying why, elsewhere) in the driver namespace of N namespace
  hosts each running a real ``sshd`` (``PHALANX_SSH_CONFIG`` names hosts
  ``host1``..``hostN`` there, standing for the reader's ``~/.ssh/config``),
  or under ``salloc`` in a single-node Slurm started in a namespace; no
  process may be left on those hosts either.
* ``<!-- skip: REASON -->`` on the line before a ``python`` block leaves it
  out. Only for blocks that cannot run here (a fragment, a second machine);
  the reason is required, next to the block.
* Shell sessions are ``console`` blocks (commands after ``$ ``, the other
  lines are their output) or ``sh`` blocks (every line a command); output
  is ``text``. They run too: the commands of a block, in order, with
  ``bash -e`` in a fresh temporary directory, where ``phalanx`` (and the
  ``.venv/bin/phalanx`` of the install the quick start describes) runs this
  checkout's ``python -m phalanx``. Each must exit with status 0 within
  :data:`LIMIT` seconds. ``<!-- not run: REASON -->`` on the line before a
  shell block leaves it out, for what cannot run here (installing packages,
  a second host, a runtime in another terminal, the benchmark suite); every
  shell block is either run or so marked.
* On hand-written pages a Python block must be tagged
  ``python``: other spellings (``py``, ``python3``...) are refused, so no
  example escapes the test by its tag. Only the generated ``api.md`` uses
  ``py`` fences, for the fragments quoted from docstrings.
* No example may leave a process behind: every process it started (found by
  an environment marker, however deep in its process tree) must be gone
  shortly after it exits.

``docs/api.md`` and ``docs/configuration.md`` must equal what
``docs/gen_api.py`` generates, no other page may repeat the configuration
table, and every relative link (and ``#anchor``) in the pages must resolve.
"""

from __future__ import annotations

import difflib
import importlib.util
import itertools
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from marked import processes_marked

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: seconds one example may take (each takes about a second or less)
LIMIT = 60.0
#: seconds an example's processes get to disappear after it exits
GRACE = 3.0
MARKER_ENV = "PHALANX_DOCS_EXAMPLE"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\s`]*)[^`]*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*(?P<kind>skip|file|not run|hosts)\s*:\s*(?P<arg>.*?)\s*-->\s*$")
_PY_ALIASES = {"py", "py3", "python3", "pycon", "ipython", "python2"}
#: tags of shell blocks: console (``$ `` prompts and output) and plain scripts
_SHELL = {"console", "sh", "shell", "bash"}


def pages() -> list[Path]:
    return [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    lang: str
    code: str
    directive: str | None  # "skip", "file" or None
    arg: str

    @property
    def id(self) -> str:
        return f"{rel(self.page)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, with the directive on the line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, start = m.group("fence"), m.group("indent"), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and set(lines[i].strip()) <= {fence[0]}
        ):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        d = _DIRECTIVE.match(lines[prev]) if prev >= 0 else None
        found.append(Block(page, start + 1, i, m.group("lang").lower(), "\n".join(body) + "\n",
                           d.group("kind") if d else None, d.group("arg") if d else ""))
    return found


def python_blocks() -> list[Block]:
    return [b for page in pages() for b in blocks(page) if b.lang == "python"]


def examples() -> list[Block]:
    return [b for b in python_blocks() if b.directive is None]


def module_files(page: Path) -> dict[str, str]:
    """The ``<!-- file: NAME -->`` blocks of a page, by file name."""
    return {b.arg: b.code for b in blocks(page) if b.lang == "python" and b.directive == "file"}


# --------------------------------------------------------------------------- #
# Running the examples
# --------------------------------------------------------------------------- #


def _marked(marker: str) -> list[psutil.Process]:
    return processes_marked(MARKER_ENV, marker)


def _environment(marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHALANX_")}
    path = [str(ROOT)]
    if (DOCS / "examples").is_dir():
        path.append(str(DOCS / "examples"))
    env["PYTHONPATH"] = os.pathsep.join(path)
    env[MARKER_ENV] = marker
    return env


def _run(block: Block, cmd: list[str], cwd: Path, env: dict[str, str], marker: str) -> tuple[str, str]:
    """Run ``cmd`` for ``block``: status 0 within LIMIT, and no process left behind."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the example's own session
        out, err = proc.communicate()
        pytest.fail(f"{block.id}: the example took more than {LIMIT:g} s\nstdout:\n{out}\nstderr:\n{err}")
    finally:
        deadline = time.monotonic() + GRACE
        left = _marked(marker)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = _marked(marker)
        for p in left:  # processes this example started, found by its marker
            try:
                p.kill()
            except psutil.Error:
                pass
    assert proc.returncode == 0, (
        f"{block.id}: the example exited with status {proc.returncode}\n"
        f"--- code ---\n{block.code}--- stdout ---\n{out}--- stderr ---\n{err}"
    )
    assert not left, f"{block.id}: the example left processes behind: " + ", ".join(
        f"pid {p.pid}" for p in left
    )
    return out, err


@pytest.mark.parametrize("block", examples(), ids=lambda b: b.id)
def test_example_runs(block: Block, tmp_path: Path) -> None:
    for name, code in module_files(block.page).items():
        (tmp_path / name).write_text(code, encoding="utf-8")
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    marker = uuid.uuid4().hex
    _run(block, [sys.executable, "-W", "error", str(script)], tmp_path, _environment(marker), marker)


def _left(find: Any, timeout: float = 15.0) -> list[int]:
    """What ``find()`` still returns after up to ``timeout`` s (sessions end a moment after the driver)."""
    deadline = time.monotonic() + timeout
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return list(left)


@pytest.mark.netns
@pytest.mark.timeout(240, method="signal")
@pytest.mark.parametrize("block", [b for b in python_blocks() if b.directive == "hosts"], ids=lambda b: b.id)
def test_example_runs_on_hosts(block: Block, tmp_path: Path) -> None:
    import netns
    import slurm_cluster
    import ssh_hosts

    kind, _, count = block.arg.partition(" ")
    why = ssh_hosts.unavailable() if kind == "ssh" else slurm_cluster.unavailable()
    if why is not None:
        pytest.skip(f"cannot make {kind} hosts here: {why}")
    for name, code in module_files(block.page).items():
        (tmp_path / name).write_text(code, encoding="utf-8")
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    marker = uuid.uuid4().hex
    env = _environment(marker)
    python = [sys.executable, "-W", "error", str(script)]
    if kind == "ssh":
        with netns.Hosts(int(count)) as hosts, ssh_hosts.SshHosts(hosts, pythonpath=(str(tmp_path),)) as sshd:
            env["PHALANX_SSH_CONFIG"] = sshd.ssh_config
            _run(block, [*hosts.exec_prefix(hosts.driver), *python], tmp_path, env, marker)
            keep = {p.pid for p in sshd.sshd}
            left = _left(lambda: [pid for ns in hosts.workers for pid in netns.pids_in(ns) if pid not in keep])
    else:
        assert kind == "slurm", f"{block.id}: <!-- hosts: ssh N --> or <!-- hosts: slurm -->, got {block.arg!r}"
        with netns.Hosts(1) as hosts, slurm_cluster.SlurmCluster(hosts) as slurm:
            env["SLURM_CONF"] = slurm.env["SLURM_CONF"]
            _run(block, [*slurm.prefix, "salloc", "--nodes=1", "--cpus-per-task=2", "--quiet", *python],
                 tmp_path, env, marker)
            left = _left(lambda: [pid for pid in netns.pids_in(hosts.driver) if pid not in slurm.daemon_pids])
    assert not left, f"{block.id}: processes left on the hosts: {left}"


# --------------------------------------------------------------------------- #
# Running the shell sessions
# --------------------------------------------------------------------------- #


def shell_blocks() -> list[Block]:
    return [b for page in pages() for b in blocks(page) if b.lang in _SHELL]


def commands(block: Block) -> list[str]:
    """The commands of a shell block: ``$ `` lines of a console block, every line of a script.

    A line ending in a backslash continues on the next one.
    """
    out: list[str] = []
    lines = iter(block.code.splitlines())
    for line in lines:
        if block.lang == "console":
            if not line.startswith("$ "):
                continue  # output shown after a command
            line = line[2:]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines, "").strip()
        out.append(line)
    return out


def _phalanx_wrappers(tmp_path: Path) -> Path:
    """``bin/phalanx`` and ``.venv/bin/phalanx`` under ``tmp_path``, running this checkout; the bin dir."""
    wrapper = f'#!/bin/sh\nexec "{sys.executable}" -m phalanx "$@"\n'
    for where in (tmp_path / "bin", tmp_path / "work" / ".venv" / "bin"):
        where.mkdir(parents=True)
        (where / "phalanx").write_text(wrapper, encoding="utf-8")
        (where / "phalanx").chmod(0o755)
    return tmp_path / "bin"


@pytest.mark.parametrize("block", [b for b in shell_blocks() if b.directive != "not run"], ids=lambda b: b.id)
def test_shell_session_runs(block: Block, tmp_path: Path) -> None:
    script = commands(block)
    assert script, f"{block.id}: a shell block with no command: run it or mark it <!-- not run: why -->"
    bin_dir = _phalanx_wrappers(tmp_path)
    work = tmp_path / "work"
    marker = uuid.uuid4().hex
    env = _environment(marker)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    (tmp_path / "session.sh").write_text("set -eu\n" + "\n".join(script) + "\n", encoding="utf-8")
    _run(block, ["bash", str(tmp_path / "session.sh")], work, env, marker)


def test_every_shell_block_is_run_or_marked() -> None:
    for block in shell_blocks():
        assert block.directive in (None, "not run"), f"{block.id}: <!-- {block.directive}: --> is for python blocks"
        if block.directive == "not run":
            assert len(block.arg) >= 10, f"{block.id}: <!-- not run: ... --> needs a reason the reader can understand"
    assert [b for b in shell_blocks() if b.directive is None], "no shell session is run"


# --------------------------------------------------------------------------- #
# The convention itself
# --------------------------------------------------------------------------- #


def test_there_are_examples() -> None:
    ran = {b.page.name for b in examples()}
    for page in ("quickstart.md", "tasks.md", "actors.md", "faults.md", "multihost.md", "ecosystem.md",
                 "coming-from.md", "README.md"):
        assert page in ran, f"{page} has no runnable python example"


@pytest.mark.parametrize("block", [b for b in python_blocks() if b.directive], ids=lambda b: b.id)
def test_directives_are_well_formed(block: Block) -> None:
    assert block.directive != "not run", f"{block.id}: <!-- not run: --> is for shell blocks; use skip"
    if block.directive == "skip":
        assert len(block.arg) >= 10, f"{block.id}: <!-- skip: ... --> needs a reason the reader can understand"
    elif block.directive == "hosts":
        assert re.fullmatch(r"ssh [1-9]|slurm", block.arg), f"{block.id}: <!-- hosts: ssh N | slurm -->"
    else:
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\.py", block.arg), (
            f"{block.id}: <!-- file: NAME.py --> needs a module file name, got {block.arg!r}"
        )


def test_python_blocks_are_tagged_python() -> None:
    wrong = [
        f"{b.id} ({b.lang})"
        for page in pages()
        if page.name != "api.md"
        for b in blocks(page)
        if b.lang in _PY_ALIASES
    ]
    assert not wrong, "tag Python examples ```python (they run) or mark them <!-- skip: why -->: " + ", ".join(wrong)


def test_skips_are_rare() -> None:
    skipped = [b for b in python_blocks() if b.directive == "skip"]
    assert len(skipped) * 5 <= len(examples()), f"too many skipped examples: {[b.id for b in skipped]}"


# --------------------------------------------------------------------------- #
# Links and the generated API page
# --------------------------------------------------------------------------- #

_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _prose(page: Path) -> list[str]:
    """The page's lines outside fenced blocks."""
    lines = page.read_text(encoding="utf-8").splitlines()
    inside: set[int] = set()
    for b in blocks(page):
        inside.update(range(b.line - 1, b.end))
    return [line for i, line in enumerate(lines) if i not in inside]


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _prose(page):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = _slug(m.group(1).replace("`", ""))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_links_resolve(page: Path) -> None:
    broken = []
    for line in _prose(page):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{rel(page)}: broken links: " + ", ".join(broken)


def _gen_api() -> Any:
    spec = importlib.util.spec_from_file_location("phalanx_docs_gen_api", DOCS / "gen_api.py")
    assert spec is not None and spec.loader is not None
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    return gen_api


@pytest.mark.parametrize(("page", "render"), [("api.md", "render"), ("configuration.md", "render_configuration")])
def test_generated_page_is_up_to_date(page: str, render: str) -> None:
    """docs/api.md (from the docstrings) and docs/configuration.md (from phalanx.config.OPTIONS)."""
    current = (DOCS / page).read_text(encoding="utf-8") if (DOCS / page).exists() else ""
    expected = getattr(_gen_api(), render)()
    if current != expected:
        diff = difflib.unified_diff(current.splitlines(), expected.splitlines(), f"docs/{page}", "generated",
                                    lineterm="", n=1)
        shown = "\n".join(itertools.islice(diff, 40))
        pytest.fail(f"docs/{page} is out of date: run `python docs/gen_api.py`\n{shown}", pytrace=False)


def test_one_configuration_table() -> None:
    """Every option is listed in configuration.md, and no other page has a table of PHALANX_* variables."""
    from phalanx.config import OPTIONS

    table = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for option in OPTIONS.values():
        assert f"| `{option.env}` |" in table, option.env
    for page in pages():
        if page.name in ("configuration.md", "api.md"):
            continue
        rows = [line for line in _prose(page) if line.startswith("|") and re.search(r"`PHALANX_[A-Z_]+`", line)]
        assert not rows, f"{rel(page)} repeats configuration rows; link to configuration.md instead: {rows[:3]}"
