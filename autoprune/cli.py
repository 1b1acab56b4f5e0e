"""The ``autoprune`` command line: global options, subcommand dispatch, and user-error handling.

Each subcommand lives in its own module ``autoprune.commands.<name>`` exposing ``add_parser(subparsers)``
(creates and returns its :class:`argparse.ArgumentParser`) and ``run(args) -> int``. To add a command, write
the module and add its name to :data:`COMMANDS`. Command modules import only light things at module level
(heavy imports such as torch happen inside ``run``), so ``autoprune --help`` stays fast; a module that cannot
be imported (e.g. a missing optional dependency) shows up as an unavailable command instead of breaking the
CLI.

Errors: an :class:`~autoprune.errors.AutoPruneError` is printed as ``error: <message>`` plus a ``hint:`` line
on stderr and exits with :data:`~autoprune.errors.EXIT_USER_ERROR` (2, like argparse's own usage errors);
Ctrl-C exits with 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from autoprune import __version__
from autoprune.errors import EXIT_USER_ERROR, AutoPruneError

COMMANDS: list[str] = [
    "quickstart",
    "train",
    "evaluate",
    "search",
    "compare",
    "worker",
    "report",
    "export",
    "imp",
    "list",
]
"""Subcommand module names under ``autoprune.commands``, in ``--help`` order."""

EXIT_INTERRUPTED = 130
_GLOBAL_FLAGS = {"-q", "--quiet"}


def _add_unavailable(subparsers: Any, name: str, exc: BaseException) -> None:
    reason = f"{type(exc).__name__}: {exc}"
    p = subparsers.add_parser(name, help=f"(unavailable: {reason})", add_help=True)
    p.set_defaults(_unavailable=f"the `{name}` command cannot be loaded ({reason})")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="autoprune",
        description="Search compressed networks: channel pruning and mixed-precision quantization.",
        epilog="Run `autoprune COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"autoprune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch logs")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: $AUTOPRUNE_THREADS, else all cores)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"autoprune.commands.{name}")
            sub = module.add_parser(subparsers)
        except Exception as exc:  # an optional command whose dependencies are missing, or a broken module
            if name not in subparsers.choices:
                _add_unavailable(subparsers, name, exc)
            continue
        sub.set_defaults(_run=module.run)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, also accepting the global ``--quiet`` after the subcommand, and ``key=value`` config overrides
    of the campaign commands after their options (argparse stops collecting positionals at the first option)."""
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a not in _GLOBAL_FLAGS]
    if unknown and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in unknown):
        args.overrides = [*args.overrides, *unknown]
        unknown = []
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if any(a in _GLOBAL_FLAGS for a in extra):
        args.quiet = True
    return args


def _configure(args: argparse.Namespace) -> None:
    from autoprune.utils import configure_threads, set_quiet

    set_quiet(args.quiet)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    configure_threads(args.threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = _parse(parser, argv)
    if not args.command:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        if getattr(args, "_unavailable", None):
            raise AutoPruneError(args._unavailable, hint="install the missing dependency named above")
        _configure(args)
        return int(args._run(args) or 0)
    except AutoPruneError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(
            "\ninterrupted (what was written so far is kept: `--resume` continues a training run, the same "
            "search/compare/worker command resumes a campaign)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
