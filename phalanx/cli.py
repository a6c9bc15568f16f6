"""The ``phalanx`` command line.

Which process runs it
---------------------
:func:`main` runs in the process the user starts (``phalanx ...`` or
``python -m phalanx ...``).  For ``phalanx demo`` that process becomes the
*driver*: it creates a :class:`phalanx.Runtime`, which spawns the worker
processes.  ``phalanx worker`` runs on another host and supervises the worker
processes that join a driver over tcp (:mod:`phalanx.remote`); ``phalanx
run`` and ``phalanx slurm`` run a script whose runtime starts such hosts
itself over ssh or srun (:mod:`phalanx.launch`); ``phalanx keygen`` writes
CURVE key pairs; ``phalanx top`` watches a running runtime.

Structure
---------
Every subcommand is one entry of :data:`COMMANDS`: a function that adds its
sub-parser (arguments, help text) and a handler ``(Namespace) -> int`` that
returns the exit status.  Handlers import their implementation lazily, so
``phalanx --help`` stays fast and works even if an optional dependency of
one subcommand is missing.

Exit status
-----------
0 success; 1 a check or the command failed; 2 usage error (including no
subcommand); 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from .config import parse_bool

if TYPE_CHECKING:
    from .remote import RemoteOptions

__all__ = ["COMMANDS", "Command", "build_parser", "main", "remote_options", "usable_cpus"]

PROG = "phalanx"

#: Exit status used when the user interrupts a command with Ctrl-C.
EXIT_INTERRUPTED = 130
#: Exit status for usage errors (argparse's convention).
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


class Command(NamedTuple):
    """One subcommand: one-line summary, long description, parser setup, handler."""

    summary: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    handler: Handler


def usable_cpus() -> int:
    """Number of CPUs this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not available on macOS / Windows
        return max(1, os.cpu_count() or 1)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (underscores allowed, e.g. 2_000_000)."""
    try:
        value = int(text.replace("_", ""), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# --------------------------------------------------------------------------- demo

DEMO_SAMPLES = 2_000_000
DEMO_WORDS = 200_000

_DEMO_DESCRIPTION = """\
Run a short self-checking demonstration of the runtime on this machine.

It starts a Runtime with N worker processes and runs four parts:

  1. Monte Carlo estimate of pi: the samples are split into batches, one task
     per batch (Runtime.map, streamed in order), and the hit counts summed.
  2. Word count: deterministic pseudo-random documents are counted on the
     workers (Runtime.map), then the per-document counts are merged with an
     associative combine (Runtime.fold, exactly n-1 combines).
  3. A worker SIGKILLed in the middle of a map: it is replaced, what it held
     is sent again, and every result still arrives exactly once, in order.
  4. Hot restart: a stateful actor moves to another worker process, its
     state handed over by save() and restore() (needs 2 workers).

It prints the results, checks them against values computed in this process,
and ends with a summary: wall time and tasks/s per part, and chunks (task
messages), items (the inputs they carried), busy seconds and utilisation
per worker. Exit status is 0 when every check passes,
1 otherwise. With the defaults it takes a few seconds on 2 cores.
"""


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    cpus = usable_cpus()
    parser.add_argument(
        "--workers",
        "-w",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"number of worker processes (default: usable CPUs, here {cpus})",
    )
    parser.add_argument(
        "--samples",
        type=_positive_int,
        default=DEMO_SAMPLES,
        metavar="N",
        help=f"Monte Carlo samples for the pi estimate (default: {DEMO_SAMPLES:_})",
    )
    parser.add_argument(
        "--words",
        type=_positive_int,
        default=DEMO_WORDS,
        metavar="N",
        help=f"words of generated text for the word count (default: {DEMO_WORDS:_})",
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="do not show progress bars or progress lines (default: show a tqdm bar "
        "when stdout is a terminal and tqdm is installed, else a plain line per part)",
    )


def _run_demo(args: argparse.Namespace) -> int:
    from phalanx import demo  # lazy: imports the runtime only when needed

    return demo.run(
        workers=args.workers,
        samples=args.samples,
        words=args.words,
        progress=args.progress,
    )


#: The dispatch table: subcommand name -> Command.  Add new subcommands here.
# --------------------------------------------------------------------------- top

_TOP_DESCRIPTION = """\
Show the workers and actors of a running phalanx runtime, refreshed live:
per worker its pid, host, cpu, rss, queued and in-flight tasks; per actor its
state, mailbox length and calls served. A worker that does not answer within
the refresh interval shows as unresolved.

Without --connect, finds the runtimes of this user on this machine (each
writes runtime.json into its private ipc directory)."""


def _configure_top(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pid", type=_positive_int, default=None,
                        help="the driver pid, when several runtimes are running")
    parser.add_argument("--connect", metavar="ENDPOINT", default=None,
                        help="the runtime's results endpoint (e.g. tcp://host:5556)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default: 1.0)")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")


def _run_top(args: argparse.Namespace) -> int:
    from .top import run_top

    return run_top(args.connect, args.pid, args.interval, args.once)


# --------------------------------------------------------------------------- worker

_WORKER_DESCRIPTION = """\
Start worker processes on this host that join a runtime listening on tcp
(phalanx.Runtime(listen="tcp://0.0.0.0:5555", ...)). Operations and actors are
found by module name: pass --import for each module that defines them (it must
be importable here, e.g. from the current directory).

The connection is encrypted and authenticated with CURVE: --key is this host's
.key_secret file and --server-key the driver's .key file (both written by
`phalanx keygen`); the driver must list this host's public key in its
authorized_keys directory. --insecure talks plaintext to an insecure runtime.

--tag TAG (repeatable) makes these workers serve only work routed to TAG
(rt.options(on=TAG).submit(...), rt.map(..., on=TAG), rt.spawn(..., on=TAG));
without it they serve "default", the work routed nowhere in particular.

--host-name NAME is how the driver groups these workers in rt.inspect() and
phalanx top (default: the hostname). Hosts that share a hostname, such as
network namespaces or containers of one machine, need distinct names.

Workers that die are replaced. When the driver shuts down this command exits 0;
when the driver vanishes (no heartbeat for --heartbeat-timeout seconds) the
workers stop and it exits 4, or with --reconnect waits for the driver to come
back. A refused key exits 3; a usage error, or a --import module that cannot
be imported, exits 2. SIGTERM or Ctrl-C makes the workers leave at once: the
driver is told, and redelivers the tasks they held without waiting for
their heartbeats to stop."""


def _configure_worker(parser: argparse.ArgumentParser) -> None:
    from .config import OPTIONS

    parser.add_argument("--connect", required=True, metavar="tcp://HOST:PORT",
                        help="the driver's listen address (its first port)")
    parser.add_argument("--workers", "-w", type=_positive_int, default=None, metavar="N",
                        help=f"worker processes to start (default: usable CPUs, here {usable_cpus()})")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="module defining operations or actors (repeatable)")
    parser.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG",
                        help="worker tag these workers serve: they get only work routed to it, "
                             "rt.options(on=TAG) (repeatable; default: \"default\")")
    parser.add_argument("--connect-timeout", type=float, default=30.0, metavar="S",
                        help="seconds to wait for the driver at start (default: 30)")
    parser.add_argument("--keys-from-stdin", action="store_true",
                        help="read this host's key pair and the driver's public key from the first line of "
                             "stdin, and stop when stdin closes (how Runtime(hosts=...) and slurm=True start "
                             "this command over ssh and srun)")
    # The options of phalanx.Config that apply to this host's workers (docs/configuration.md):
    # unset flags fall back to their PHALANX_* variable, then to the default.
    for option in OPTIONS.values():
        if option.worker_flag is None:
            continue
        text = option.doc.replace("`", "") + f" (env {option.env})"
        if option.parse is parse_bool:
            parser.add_argument(option.worker_flag, dest=option.name, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        else:
            parser.add_argument(option.worker_flag, dest=option.name, type=option.parse, default=None,
                                metavar=option.name.upper(), help=text)


def remote_options(args: argparse.Namespace) -> RemoteOptions:
    """What ``phalanx worker`` was asked to do: its flags, else their ``PHALANX_*`` variables, else defaults.

    Raises ``ValueError`` (naming the flag's option or variable) for a value that is not valid.
    """
    from .config import OPTIONS, Config
    from .remote import RemoteOptions

    given = {o.name: getattr(args, o.name) for o in OPTIONS.values() if o.worker_flag and o.runtime}
    config = Config.load(workers=1, **given)  # checks the values; workers: --workers, below
    key = args.key if args.key is not None else (os.environ.get(OPTIONS["key"].env, "").strip() or None)
    return RemoteOptions(
        connect=args.connect,
        workers=args.workers or usable_cpus(),
        imports=args.imports,
        credits=config.credits,
        key=key,
        server_key=config.server_key,
        insecure=config.insecure,
        heartbeat_timeout=config.heartbeat_timeout if config.heartbeat_timeout > 0 else 10.0,
        heartbeat_interval=config.heartbeat_interval,
        connect_timeout=args.connect_timeout,
        reconnect=config.reconnect,
        start_method=config.start_method,
        tags=args.tags,
        abort_grace=config.abort_grace,
        max_memory_per_worker=config.max_memory_per_worker,
        hwm=config.hwm,
        max_frame=config.max_frame,
        spin=config.spin,
        log_level=config.log_level,
        prefix_output=config.prefix_output,
        implicit_operations=config.implicit_operations,
        host_name=config.host_name,
        keys_from_stdin=args.keys_from_stdin,
    )


def _run_worker(args: argparse.Namespace) -> int:
    from .remote import main as remote_main

    try:
        options = remote_options(args)
    except ValueError as exc:
        print(f"{PROG} worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if options.log_level:
        from .logs import ensure_configured

        ensure_configured(options.log_level)
    return remote_main(options)


# --------------------------------------------------------------------------- keygen

_KEYGEN_DESCRIPTION = """\
Write a CURVE key pair: NAME.key (the public key, safe to copy to the other
side) and NAME.key_secret (public and secret key, readable by you only).

  phalanx keygen driver           on the driver's host
  phalanx keygen worker-host1     on each worker host; copy worker-host1.key into
                                  the driver's authorized_keys directory, and
                                  driver.key to the worker host"""


def _configure_keygen(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="file name prefix, e.g. driver or keys/host1")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def _run_keygen(args: argparse.Namespace) -> int:
    from .transport import keys

    directory, name = os.path.split(args.name)
    directory = directory or "."
    for suffix in (".key", ".key_secret"):
        path = os.path.join(directory, name + suffix)
        if os.path.exists(path) and not args.force:
            print(f"{PROG} keygen: {path} exists (use --force to overwrite)", file=sys.stderr)
            return 1
    public, secret = keys.generate(directory, name)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


# --------------------------------------------------------------------------- run, slurm

_RUN_DESCRIPTION = """\
Run a Python script whose phalanx.Runtime() starts its hosts itself: each flag
sets the PHALANX_* variable of its option (docs/configuration.md), which the
script's Runtime() reads unless it passes that argument, then the script runs
in place of this command (same process, its own argv).

  phalanx run --hosts host1,alice@host2:22 --workers-per-host 8 job.py ARGS
        starts phalanx worker on host1 and host2 over ssh, fresh keys per run
  phalanx slurm job.py ARGS      (inside sbatch or salloc)
        starts phalanx worker on every node of the allocation with srun"""

#: the options ``phalanx run`` and ``phalanx slurm`` set, as flags
_RUN_OPTIONS = ("hosts", "workers_per_host", "min_hosts", "remote_python", "ssh_config", "listen", "workers")


def _configure_run(parser: argparse.ArgumentParser, slurm: bool = False) -> None:
    from .config import OPTIONS

    for name in _RUN_OPTIONS:
        if slurm and name in ("hosts", "ssh_config"):
            continue
        option = OPTIONS[name]
        text = re.sub(r"\s*\(?\[([^]]*)\]\([^)]*\)\)?", "", option.doc.replace("`", ""))  # no doc links
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar=name.upper(),
                            help=f"{text} (sets {option.env})")
    if not slurm:
        parser.add_argument("--slurm", action="store_true", help="start the nodes of the Slurm allocation "
                            "with srun (sets PHALANX_SLURM)")
    parser.add_argument("script", help="the Python script to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")


def _run_script(args: argparse.Namespace, slurm: bool = False) -> int:
    from .config import OPTIONS

    env = dict(os.environ)
    for name in _RUN_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            env[OPTIONS[name].env] = value
    if slurm or getattr(args, "slurm", False):
        env[OPTIONS["slurm"].env] = "1"
    if not os.path.isfile(args.script):
        print(f"{PROG} run: no script {args.script!r}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, args.script, *args.args], env)


COMMANDS: dict[str, Command] = {
    "demo": Command(
        summary="run a short self-checking demo (pi, word-count fold, a worker killed mid-map, hot restart)",
        description=_DEMO_DESCRIPTION,
        configure=_configure_demo,
        handler=_run_demo,
    ),
    "top": Command(
        summary="watch the workers and actors of a running runtime",
        description=_TOP_DESCRIPTION,
        configure=_configure_top,
        handler=_run_top,
    ),
    "worker": Command(
        summary="start workers on this host that join a runtime over tcp",
        description=_WORKER_DESCRIPTION,
        configure=_configure_worker,
        handler=_run_worker,
    ),
    "run": Command(
        summary="run a script whose Runtime starts phalanx worker on other hosts (ssh, Slurm)",
        description=_RUN_DESCRIPTION,
        configure=_configure_run,
        handler=_run_script,
    ),
    "slurm": Command(
        summary="run a script whose Runtime starts phalanx worker on every node of this Slurm allocation",
        description=_RUN_DESCRIPTION,
        configure=lambda parser: _configure_run(parser, slurm=True),
        handler=lambda args: _run_script(args, slurm=True),
    ),
    "keygen": Command(
        summary="write a CURVE key pair (NAME.key, NAME.key_secret)",
        description=_KEYGEN_DESCRIPTION,
        configure=_configure_keygen,
        handler=_run_keygen,
    ),
}


# --------------------------------------------------------------------------- parser

_DESCRIPTION = """\
phalanx: an actor and task runtime for Python on multiprocessing and ZeroMQ.

A driver process runs your program and sends tasks (registered operations)
to worker processes on this machine or, over TCP, on other hosts.
"""

_EPILOG = """\
examples:
  phalanx demo                  run the demo with one worker per usable CPU
  phalanx demo --workers 2      run it with 2 worker processes
  phalanx keygen driver         write driver.key and driver.key_secret
  phalanx worker --connect tcp://driver-host:5555 --import mymodule \\
      --key host1.key_secret --server-key driver.key
                                join a runtime from another host
  phalanx run --hosts host1,host2 job.py
                                run job.py; its Runtime() starts workers on
                                host1 and host2 over ssh
  phalanx COMMAND --help        show the options of COMMAND
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(
        title="commands",
        dest="command",
        metavar="COMMAND",
    )
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(
            name,
            help=command.summary,
            description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.configure(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit status.

    Never raises :class:`SystemExit` itself: ``--help`` returns 0 and a usage
    error returns 2, so tests can call ``main([...])`` directly.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, or a usage error already reported by argparse
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)

    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    try:
        return COMMANDS[args.command].handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
