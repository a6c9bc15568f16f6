"""Generate ``docs/api.md``, the API reference, from the docstrings of ``phalanx.__all__``,
and ``docs/configuration.md``, the table of every option, from ``phalanx.config.OPTIONS``.

Usage (from the repository root)::

    python docs/gen_api.py            # rewrite docs/api.md and docs/configuration.md
    python docs/gen_api.py --check    # exit 1 if either is out of date

``tests/test_docs.py`` runs the equivalent of ``--check``.

What it documents: every name in ``phalanx.__all__``, grouped by :data:`GROUPS`
(a name missing from the groups lands in "Other", so nothing is ever left
out), with its signature and docstring; for classes, their public methods
and properties (own, not inherited from the standard library), the fields of
``msgspec.Struct`` classes and the members of enums. Field and member
descriptions come from the ``#:`` comments above them in the source, as
Sphinx's autodoc reads them.

The output depends only on the source: annotations and field defaults are
printed as written (``from __future__ import annotations`` keeps them as
text), never as values computed on this machine, and members come in source
order. Docstrings are reST-flavoured; the few constructs they use are turned
into Markdown: ``code``, :role:`target` cross references (linked when the
target is documented here), and ``::`` literal blocks (emitted as ```py
fences, which the docs test does not execute: they are fragments).
"""

from __future__ import annotations

import argparse
import ast
import enum
import inspect
import re
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
OUTPUT = DOCS / "api.md"
CONFIG_OUTPUT = DOCS / "configuration.md"

sys.path.insert(0, str(ROOT))

import phalanx  # noqa: E402  (the checkout's phalanx, not another installed one)
import phalanx.errors  # noqa: E402

#: (title, intro, names) in page order
GROUPS: list[tuple[str, str, list[str]]] = [
    (
        "Runtime",
        "The driver's entry point and its options.",
        ["Runtime", "JobOptions", "Config"],
    ),
    (
        "Futures and streams",
        "What `submit` and `map` return.",
        ["Future", "MapIterator"],
    ),
    (
        "Operations and tasks",
        "Registering functions workers may run, and what a running task can see.",
        ["operation", "current_task", "TaskContext"],
    ),
    (
        "Actors",
        "Stateful objects living in a worker, their handles and lifecycle events.",
        ["actor", "ActorRef", "Started", "Stopped", "Failed", "RestartFailed"],
    ),
    (
        "Retries and fatal failures",
        "What happens when a task fails: see [faults.md](faults.md).",
        ["RetryStrategy", "Immediate", "After", "Exponential", "FatalStrategy", "Terminate", "Ignore"],
    ),
    (
        "asyncio",
        "A runtime whose calls never block the event loop.",
        ["AsyncRuntime", "AsyncJobOptions", "AsyncActorRef"],
    ),
    (
        "concurrent.futures",
        "A `ProcessPoolExecutor` that survives its workers dying.",
        ["Executor"],
    ),
    (
        "Introspection",
        "What `rt.stats()` and `rt.inspect()` return.",
        ["RuntimeStats", "WorkerStats", "RuntimeTree", "WorkerNode", "ActorNode"],
    ),
    (
        "Errors",
        "Every error phalanx raises is a `PhalanxError` and, where one exists, the standard "
        "library error a caller would already catch.",
        # the base and the marker first, then every error in phalanx.errors' own order
        ["PhalanxError", "Transient",
         *(n for n in phalanx.errors.__all__ if n not in ("PhalanxError", "Transient"))],
    ),
    (
        "Package",
        "",
        ["__version__"],
    ),
]

#: classes users receive rather than construct: no constructor signature is shown
NOT_CONSTRUCTED = {
    "ActorRef", "AsyncActorRef", "AsyncJobOptions", "Future", "JobOptions", "MapIterator", "TaskContext",
    "RuntimeStats", "WorkerStats", "RuntimeTree", "WorkerNode", "ActorNode",
}

#: dunder methods worth listing (when defined by the class itself)
DUNDERS = ("__await__", "__aiter__", "__anext__")


# --------------------------------------------------------------------------- #
# Source helpers
# --------------------------------------------------------------------------- #


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def class_source(cls: type) -> tuple[ast.ClassDef, list[str]] | None:
    """The class's AST node and its module's source lines."""
    try:
        module_source = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return None
    tree = ast.parse(module_source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return node, module_source.splitlines()
    return None


def comment_above(lines: list[str], lineno: int) -> str:
    """The ``#:`` comment lines right above line ``lineno`` (1-based), joined."""
    found: list[str] = []
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith("#:"):
        found.append(lines[i].strip()[2:].strip())
        i -= 1
    return " ".join(reversed(found))


def fields_of(cls: type) -> list[tuple[str, str, str | None, str]]:
    """(name, annotation, default or None, description) of each annotated class field, in order."""
    out: list[tuple[str, str, str | None, str]] = []
    seen: set[str] = set()
    for klass in reversed(cls.__mro__):
        if klass in (object, msgspec.Struct) or not klass.__module__.startswith("phalanx"):
            continue
        found = class_source(klass)
        if found is None:
            continue
        node, lines = found
        source = "\n".join(lines)
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name = stmt.target.id
                annotation = ast.get_source_segment(source, stmt.annotation) or ""
                default = ast.get_source_segment(source, stmt.value) if stmt.value is not None else None
                entry = (name, annotation, default, comment_above(lines, stmt.lineno))
                if name in seen:
                    out = [entry if f[0] == name else f for f in out]
                else:
                    out.append(entry)
                    seen.add(name)
    return out


def enum_members(cls: type[enum.Enum]) -> list[tuple[str, str, str]]:
    """(name, value source, description) of each enum member, in order."""
    found = class_source(cls)
    out: list[tuple[str, str, str]] = []
    if found is None:
        return [(m.name, repr(m.value), "") for m in cls]
    node, lines = found
    source = "\n".join(lines)
    for stmt in node.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name = stmt.targets[0].id
            if name in cls.__members__:
                out.append((name, ast.get_source_segment(source, stmt.value) or "", comment_above(lines, stmt.lineno)))
    return out


# --------------------------------------------------------------------------- #
# Signatures
# --------------------------------------------------------------------------- #


def annotation_text(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return inspect.formatannotation(annotation)


def format_signature(obj: Callable[..., Any], *, drop_first: bool = False) -> str:
    """``(a: int, /, *args, b: str = 'x') -> R`` with annotations as written in the source."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = list(sig.parameters.values())
    if drop_first and params:
        params = params[1:]
    parts: list[str] = []
    saw_kw_marker = False
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not saw_kw_marker:
            parts.append("*")
            saw_kw_marker = True
        if p.kind is p.VAR_POSITIONAL:
            saw_kw_marker = True
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text = "*" + text
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + text
        if p.annotation is not p.empty:
            text += f": {annotation_text(p.annotation)}"
            if p.default is not p.empty:
                text += f" = {default_text(p.default)}"
        elif p.default is not p.empty:
            text += f"={default_text(p.default)}"
        parts.append(text)
        is_last_positional_only = p.kind is p.POSITIONAL_ONLY and (
            i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY
        )
        if is_last_positional_only:
            parts.append("/")
    out = f"({', '.join(parts)})"
    if sig.return_annotation is not sig.empty:
        ret = annotation_text(sig.return_annotation)
        if ret != "None":
            out += f" -> {ret}"
    return out


def default_text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    return repr(value)


# --------------------------------------------------------------------------- #
# Docstrings to Markdown
# --------------------------------------------------------------------------- #

_ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj):`(~?)([^`]+)`", re.S)
_LITERAL = re.compile(r"``([^`]+?)``", re.S)


class Renderer:
    """Turns docstrings into Markdown, linking cross references to documented names."""

    def __init__(self, anchors: dict[str, str]) -> None:
        self.anchors = anchors  # dotted name -> anchor

    def resolve(self, target: str, context: str | None) -> str | None:
        """The anchor of ``target`` if it names something documented here."""
        ours = target.startswith("phalanx.")
        bare = target[len("phalanx."):] if ours else target
        parts = bare.split(".")
        if ours:  # phalanx.errors.ValidationError, phalanx.Runtime.map
            candidates = [bare, ".".join(parts[-2:]), parts[-1]]
        elif len(parts) == 1:  # a name, or a member of the class being documented
            candidates = [bare] if context is None else [f"{context}.{bare}", bare]
        else:  # Runtime.options; never concurrent.futures.Future
            candidates = [bare]
        for c in candidates:
            if c in self.anchors:
                return self.anchors[c]
        return None

    def inline(self, text: str, context: str | None) -> str:
        def role(m: re.Match[str]) -> str:
            short, target = m.group(1), " ".join(m.group(2).split())
            shown = target.split(".")[-1] if short else target
            anchor = self.resolve(target, context)
            return f"[`{shown}`](#{anchor})" if anchor else f"`{shown}`"

        text = _ROLE.sub(role, text)
        return _LITERAL.sub(lambda m: "`" + m.group(1).replace("\n", " ").replace("  ", " ") + "`", text)

    def docstring(self, doc: str | None, context: str | None) -> str:
        """A docstring as Markdown (``::`` literal blocks become ```py fences)."""
        if not doc:
            return ""
        lines = inspect.cleandoc(doc).splitlines()
        out: list[str] = []
        text: list[str] = []  # prose waiting for inline conversion (which may span lines)

        def flush_text() -> None:
            if text:
                out.extend(self.inline("\n".join(text), context).splitlines())
                text.clear()

        i = 0
        while i < len(lines):
            line = lines[i]
            if line.rstrip().endswith("::"):
                head = line.rstrip()[:-2]
                if head.strip():  # "text::" reads "text:"; "text ::" reads "text"
                    text.append(head.rstrip() if head[-1].isspace() or head.endswith(":") else head + ":")
                flush_text()
                i += 1
                block: list[str] = []
                while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                    block.append(lines[i])
                    i += 1
                while block and not block[-1].strip():
                    block.pop()
                while block and not block[0].strip():
                    block.pop(0)
                if block:
                    if out and out[-1] != "":
                        out.append("")
                    out.extend(["```py", *textwrap.dedent("\n".join(block)).splitlines(), "```", ""])
                continue
            text.append(line)
            i += 1
        flush_text()
        return "\n".join(out).strip()


# --------------------------------------------------------------------------- #
# Members
# --------------------------------------------------------------------------- #


def _doc_of(value: Any) -> str | None:
    if isinstance(value, property):
        return value.fget.__doc__ if value.fget is not None else None
    if isinstance(value, (staticmethod, classmethod)):
        return value.__func__.__doc__
    return getattr(value, "__doc__", None)


def _private_bases(cls: type) -> list[type]:
    """phalanx's private base classes of ``cls`` (``_AsyncWork``): their members are documented as its own."""
    return [b for b in cls.__mro__[1:] if b.__module__.startswith("phalanx") and b.__name__.startswith("_")]


def own_members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods and properties the class defines itself (or gets from a private base), in source order.

    An undocumented override of a base class's member is left out: the base
    documents it.
    """
    seen: set[str] = set()
    for owner in (cls, *_private_bases(cls)):
        for name, value in vars(owner).items():
            if name in seen:
                continue
            seen.add(name)
            yield from _documented(cls, owner, name, value)


def _documented(cls: type, owner: type, name: str, value: Any) -> Iterator[tuple[str, Any]]:
    """``(name, value)`` if ``owner``'s member ``name`` belongs in ``cls``'s reference."""
    if name.startswith("_") and name not in DUNDERS:
        return
    if not _doc_of(value) and any(name in vars(base) for base in owner.__mro__[1:]):
        return
    if isinstance(value, (staticmethod, classmethod, property, types.FunctionType)):
        yield name, value


def is_struct(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, msgspec.Struct)


def bases_text(cls: type) -> str:
    names = []
    for base in cls.__bases__:
        if base is object or base in _private_bases(cls):
            continue
        if base.__module__.startswith("phalanx"):
            names.append(base.__name__)
        elif base.__module__ == "builtins":
            names.append(base.__qualname__)
        else:
            module = ".".join(p for p in base.__module__.split(".") if not p.startswith("_"))
            names.append(f"{module}.{base.__qualname__}")
    return ", ".join(f"`{n}`" for n in names)


# --------------------------------------------------------------------------- #
# Page
# --------------------------------------------------------------------------- #


def heading_for(name: str) -> str:
    return f"phalanx.{name}"


def collect_anchors(groups: list[tuple[str, str, list[str]]]) -> dict[str, str]:
    anchors: dict[str, str] = {}
    for _, _, names in groups:
        for name in names:
            anchors[name] = slug(heading_for(name))
            obj = getattr(phalanx, name)
            if isinstance(obj, type) and not issubclass(obj, BaseException):
                for member, _ in own_members(obj):
                    anchors[f"{name}.{member}"] = slug(f"{name}.{member}")
    return anchors


def grouped() -> list[tuple[str, str, list[str]]]:
    listed = {n for _, _, names in GROUPS for n in names}
    groups = [(t, i, [n for n in names if n in phalanx.__all__]) for t, i, names in GROUPS]
    rest = sorted(n for n in phalanx.__all__ if n not in listed)
    if rest:
        groups.append(("Other", "", rest))
    return [g for g in groups if g[2]]


def render() -> str:
    groups = grouped()
    r = Renderer(collect_anchors(groups))
    out: list[str] = [
        "<!-- Generated by docs/gen_api.py from the docstrings of phalanx.__all__: do not edit by hand. -->",
        "<!-- Regenerate with: python docs/gen_api.py -->",
        "",
        "# API reference",
        "",
        "Everything `import phalanx` exports (`phalanx.__all__`), with signatures and docstrings. "
        "Everything else in the package is private and may change. The guides explain how the "
        "pieces fit together: start at [index.md](index.md).",
        "",
    ]
    for title, intro, names in groups:
        out.append(f"- [{title}](#{slug(title)}): " + ", ".join(f"[`{n}`](#{slug(heading_for(n))})" for n in names))
    out.append("")
    for title, intro, names in groups:
        out += [f"## {title}", ""]
        if intro:
            out += [intro, ""]
        for name in names:
            out += document(r, name)
    return "\n".join(out).rstrip() + "\n"


def document(r: Renderer, name: str) -> list[str]:
    obj = getattr(phalanx, name)
    out = [f"### {heading_for(name)}", ""]
    if name == "__version__":
        return out + [f"`{obj!r}`: the version of the installed package.", ""]
    if isinstance(obj, enum.Enum):
        cls = type(obj)
        return out + [f"An alias of [`{cls.__name__}.{obj.name}`](#{slug(heading_for(cls.__name__))}).", ""]
    if isinstance(obj, type):
        return out + document_class(r, name, obj)
    if callable(obj):
        out += ["```text", f"phalanx.{name}{format_signature(obj)}", "```", ""]
        body = r.docstring(obj.__doc__, None)
        return out + ([body, ""] if body else [])
    return out + [f"`{obj!r}`", ""]


def document_class(r: Renderer, name: str, cls: type) -> list[str]:
    out: list[str] = []
    if issubclass(cls, enum.Enum):
        out += ["```text", f"class phalanx.{name}(enum.Enum)", "```", ""]
    elif name in NOT_CONSTRUCTED or (issubclass(cls, BaseException) and "__init__" not in vars(cls)):
        out += ["```text", f"class phalanx.{name}", "```", ""]
    else:
        init = cls.__init__ if "__init__" in vars(cls) or not is_struct(cls) else cls
        sig = format_signature(init, drop_first=init is not cls) if init is not object.__init__ else "()"
        if is_struct(cls):
            sig = "(" + ", ".join(_struct_params(cls)) + ")"
        out += ["```text", f"class phalanx.{name}{sig}", "```", ""]
    bases = bases_text(cls)
    if bases and not issubclass(cls, enum.Enum):
        out += [f"Bases: {bases}", ""]
    body = r.docstring(cls.__doc__, name)
    if body:
        out += [body, ""]
    if issubclass(cls, enum.Enum):
        out += ["| member | value | meaning |", "| --- | --- | --- |"]
        for member, value, text in enum_members(cls):
            out.append(f"| `{member}` | `{value}` | {r.inline(text, name)} |")
        out.append("")
        return out
    if name == "Config":
        # Its fields are the options: one table, in configuration.md, not a second one here.
        out += ["Its fields are the options of `Runtime(...)`: see the configuration table, "
                "[configuration.md](configuration.md).", ""]
    elif is_struct(cls):
        rows = fields_of(cls)
        described = any(text for *_, text in rows)
        if rows:
            if described:
                out += ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
            else:
                out += ["| field | type | default |", "| --- | --- | --- |"]
            for field, annotation, default, text in rows:
                shown = "required" if default is None else f"`{default}`"
                row = f"| `{field}` | `{annotation.replace('|', chr(92) + '|')}` | {shown} |"
                out.append(row + (f" {r.inline(text, name)} |" if described else ""))
            out.append("")
    if issubclass(cls, BaseException):
        return out
    for member, value in own_members(cls):
        out += document_member(r, name, member, value)
    return out


def _struct_params(cls: type) -> list[str]:
    params = list(inspect.signature(cls).parameters.values())
    kw_only = bool(params) and params[0].kind is inspect.Parameter.KEYWORD_ONLY
    parts = ["*"] if kw_only else []
    for field, annotation, default, _ in fields_of(cls):
        parts.append(f"{field}: {annotation}" + (f" = {default}" if default is not None else ""))
    return parts


def render_configuration() -> str:
    """``docs/configuration.md``: every option of ``phalanx.config.OPTIONS``, one table."""
    from phalanx import config

    defaults = {name: default for name, default in zip(config.Config.__struct_fields__,
                                                        config.Config.__struct_defaults__)}
    annotations = config.Config.__annotations__
    out = [
        "<!-- Generated by docs/gen_api.py from phalanx/config.py (OPTIONS): do not edit by hand. -->",
        "<!-- Regenerate with: python docs/gen_api.py -->",
        "",
        "# Configuration",
        "",
        "Every option is an argument of `phalanx.Runtime(...)` (and so of `phalanx.AsyncRuntime(...)` and, "
        "as a keyword, of `phalanx.Executor(...)`) and a `PHALANX_*` environment variable. An argument wins "
        "over the environment, which wins over the default. The options that matter to a host's workers are "
        "also flags of `phalanx worker` (see [multihost.md](multihost.md)), which fall back to the same "
        "variables; its own flags (`--connect`, `--workers`, `--import`, `--tag`, `--connect-timeout`) are "
        "in `phalanx worker --help`. The table is generated from the declarations in `phalanx/config.py`.",
        "",
        "* A variable set to the empty string counts as unset.",
        "* Booleans accept `1`/`0`, `true`/`false`, `yes`/`no` and `on`/`off`, in any case.",
        "* A value that is not valid raises `ValueError` naming the argument or the variable "
        "(`PHALANX_CREDITS='0': credits must be >= 1, got 0`); nothing falls back silently to a default.",
        "",
        "| argument | environment variable | `phalanx worker` | type | default | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for option in config.OPTIONS.values():
        argument = f"`{option.name}`" if option.runtime else "(none)"
        flag = f"`{option.worker_flag}`" if option.worker_flag else ""
        kind = annotations.get(option.name, "str | None")
        default = option.default if option.default is not None else repr(defaults[option.name])
        out.append(f"| {argument} | `{option.env}` | {flag} | `{kind.replace('|', chr(92) + '|')}` "
                   f"| {default} | {option.doc} |")
    return "\n".join(out) + "\n"


def document_member(r: Renderer, owner: str, member: str, value: Any) -> list[str]:
    out = [f"#### {owner}.{member}", ""]
    if isinstance(value, property):
        annotation = ""
        fget = value.fget
        if fget is not None:
            ret = inspect.signature(fget).return_annotation
            if ret is not inspect.Signature.empty:
                annotation = f": {annotation_text(ret)}"
        out += ["```text", f"property {member}{annotation}", "```", ""]
        doc = fget.__doc__ if fget is not None else None
    else:
        fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        prefix = "async def" if inspect.iscoroutinefunction(fn) else "def"
        if isinstance(value, classmethod):
            prefix = "classmethod " + prefix
        elif isinstance(value, staticmethod):
            prefix = "staticmethod " + prefix
        drop = not isinstance(value, staticmethod)
        out += ["```text", f"{prefix} {member}{format_signature(fn, drop_first=drop)}", "```", ""]
        doc = fn.__doc__
    body = r.docstring(doc, owner)
    return out + ([body, ""] if body else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate docs/api.md and docs/configuration.md.")
    parser.add_argument("--check", action="store_true", help="exit 1 if either page is out of date")
    parser.add_argument("--stdout", action="store_true", help="print the API page instead of writing it")
    args = parser.parse_args(argv)
    pages = {OUTPUT: render(), CONFIG_OUTPUT: render_configuration()}
    if args.stdout:
        sys.stdout.write(pages[OUTPUT])
        return 0
    if args.check:
        stale = [p.name for p, page in pages.items() if (p.read_text(encoding="utf-8") if p.exists() else "") != page]
        if stale:
            print(f"docs/{', docs/'.join(stale)} out of date: run `python docs/gen_api.py`", file=sys.stderr)
            return 1
        return 0
    for path, page in pages.items():
        path.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
