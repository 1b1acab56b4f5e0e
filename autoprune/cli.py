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
from autoprune.helptext import plain_parser_help

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
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help="import MODULE first, so that the searchers, evaluators, rewards, models, ... it registers can be "
        "used (repeatable; a campaign's `plugins:` key does the same; see docs/EXTENDING.md)",
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
        sub.set_defaults(_run=module.run, _parser=sub)
        if hasattr(module, "prepare"):
            sub.set_defaults(_prepare=module.prepare)
    plain_parser_help(parser)  # descriptions taken from docstrings: no reST markup in --help
    return parser


def _as_override(option: str, following: str | None) -> str:
    """The ``KEY=VALUE`` override a user probably meant by ``--key value`` (or ``--key=value``)."""
    key, eq, value = option.lstrip("-").partition("=")
    if not eq:
        value = following if following is not None and not following.startswith("-") else "VALUE"
    return f"{key.replace('-', '_')}={value}"


def _unknown_option_error(command: str, unknown: Sequence[str]) -> AutoPruneError:
    """The error for options a campaign command does not have, pointing at the ``KEY=VALUE`` overrides."""
    first = next(i for i, a in enumerate(unknown) if a.startswith("-"))
    option = unknown[first]
    following = unknown[first + 1] if first + 1 < len(unknown) else None
    return AutoPruneError(
        f"unrecognized option {option.partition('=')[0]!r} for `autoprune {command}`"
        + (f" (all unrecognized: {' '.join(unknown)})" if len(unknown) > 2 else ""),
        hint=f"campaign settings are overrides: {_as_override(option, following)} (KEY=VALUE, dotted keys like "
        f"searcher.name=tpe); `autoprune {command} --help` lists the options",
    )


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, also accepting the global ``--quiet`` after the subcommand, and ``key=value`` config overrides
    of the campaign commands after their options (argparse stops collecting positionals at the first option)."""
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a not in _GLOBAL_FLAGS]
    if unknown and hasattr(args, "overrides"):
        if any(a.startswith("-") for a in unknown):
            raise _unknown_option_error(args.command, unknown)
        if all("=" in a for a in unknown):
            args.overrides = [*args.overrides, *unknown]
            unknown = []
    if unknown:
        sub = getattr(args, "_parser", None) or parser  # the usage of the command, not the top level
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    if any(a in _GLOBAL_FLAGS for a in extra):
        args.quiet = True
    return args


def _configure_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )


def _load_plugins(args: argparse.Namespace) -> None:
    """Import the installed ``autoprune.plugins`` entry points and the ``--plugin`` modules, before any name is
    looked up (a campaign's ``plugins:`` are imported when its config is read)."""
    from autoprune.plugins import import_plugin, load_entry_points

    load_entry_points()
    for name in getattr(args, "plugin", None) or []:
        import_plugin(name, "--plugin")


def _configure(args: argparse.Namespace) -> None:
    from autoprune.utils import configure_threads, set_quiet  # imports torch

    set_quiet(args.quiet)
    configure_threads(args.threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code.

    A command module may define ``prepare(args)``: light checks (config files, option values) that run before
    torch is imported, so that such mistakes are reported at once.
    """
    from autoprune import interrupts

    interrupts.install()  # Ctrl-C is recorded before it is raised, so a swallowed one still stops the run
    parser = build_parser()
    try:
        args = _parse(parser, argv)
        if not args.command:
            parser.print_help()
            return EXIT_USER_ERROR
        if getattr(args, "_unavailable", None):
            raise AutoPruneError(args._unavailable, hint="install the missing dependency named above")
        _configure_logging(args)
        _load_plugins(args)
        prepare = getattr(args, "_prepare", None)
        if prepare is not None:
            prepare(args)
        _configure(args)
        return int(args._run(args) or 0)
    except AutoPruneError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
        command = words[0] if words and words[0].isidentifier() else "COMMAND"
        # every user error says how to fix it: the raise site's hint, else its kind's
        print(f"  hint: {exc.hint or exc.default_hint.replace('COMMAND', command)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        interrupts.clear()
        print(
            "\ninterrupted (what was written so far is kept: `--resume` continues a training run, the same "
            "search/compare/worker command resumes a campaign)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
