"""Plain-text command-line help from strings written for Sphinx.

Command modules often reuse their docstring as the ``--help`` description; docstrings carry reST markup that a
terminal shows raw (````autoprune quickstart````, ``:data:`MIN_TEST_ACCURACY```). :func:`plain_help` turns a
string into plain text and :func:`plain_parser_help` applies it to every description, epilog and argument help
of a parser and its subcommands (the CLI calls it once on the whole parser). Light: no imports beyond the
standard library, so ``autoprune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import re

_ROLE = re.compile(r":(?:py:)?(?:func|data|class|mod|meth|attr|exc|obj|const|ref|doc|term|envvar|option):"
                   r"`(?P<body>[^`]+)`")
_LITERAL = re.compile(r"``(?P<body>[^`]+?)``")
_TITLED = re.compile(r"^(?P<title>.+?)\s*<[^<>]+>$", re.S)


def _role_text(body: str) -> str:
    """``"~a.b.c"`` → ``"c"``, ``"title <target>"`` → ``"title"``, ``"a.b"`` → ``"a.b"``."""
    titled = _TITLED.match(body)
    if titled:
        return titled.group("title")
    if body.startswith("~"):
        return body[1:].rsplit(".", 1)[-1]
    return body.lstrip("!")


def plain_help(text: str | None) -> str | None:
    """``text`` without reST markup: roles (``:func:`x```) and inline literals (````x````) become ```x```.

    ``None`` and text without markup are returned unchanged.
    """
    if not text:
        return text
    text = _ROLE.sub(lambda m: f"`{_role_text(m.group('body'))}`", text)
    return _LITERAL.sub(lambda m: f"`{m.group('body')}`", text)


def plain_parser_help(parser: argparse.ArgumentParser) -> None:
    """Apply :func:`plain_help` to ``parser``'s description, epilog, argument groups and arguments, and to
    those of its subcommands (recursively), in place."""
    seen: set[int] = set()

    def visit(p: argparse.ArgumentParser) -> None:
        if id(p) in seen:
            return
        seen.add(id(p))
        p.description = plain_help(p.description)
        p.epilog = plain_help(p.epilog)
        for group in p._action_groups:
            group.description = plain_help(group.description)
        for action in p._actions:
            if isinstance(action.help, str):
                action.help = plain_help(action.help)
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if isinstance(choice.help, str):
                        choice.help = plain_help(choice.help)
                for sub in action.choices.values():
                    visit(sub)

    visit(parser)
