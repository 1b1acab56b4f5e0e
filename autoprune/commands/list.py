"""``autoprune list [WHAT]``: what can be named in a campaign, with one line of help each.

``WHAT`` is one of ``searchers``, ``evaluators``, ``rewards``, ``spaces`` (search-space families),
``importance`` (channel criteria), ``models``, ``datasets`` or ``all`` (the default). Entries registered by
plugins (the global ``--plugin MODULE`` option, installed ``autoprune.plugins`` entry points) are listed too,
marked with the module that registered them.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from collections.abc import Callable
from typing import Any

KINDS = ("searchers", "evaluators", "rewards", "spaces", "importance", "models", "datasets")
_EXTRA_MODELS = {
    "module:callable": "your own network, e.g. mymodels:build_net for build_net in ./mymodels.py",
    "torchvision:NAME": "a torchvision model, e.g. torchvision:resnet18 (needs torchvision)",
}
_EXTRA_DATASETS = {
    "module:callable": "your own data, e.g. mydata:load for load in ./mydata.py (returns images and labels)",
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoprune list``."""
    p = subparsers.add_parser(
        "list", help="list the available searchers, evaluators, rewards, search spaces, criteria, models, datasets",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=(*KINDS, "all"), default="all", help="what to list (default: all)")
    return p


#: ``WHAT`` → (module, attribute) of its :class:`~autoprune.registry.Registry`, imported on demand.
_HOMES: dict[str, tuple[str, str]] = {
    "searchers": ("autoprune.agents.base", "SEARCHERS"),
    "evaluators": ("autoprune.evaluate", "EVALUATORS"),
    "rewards": ("autoprune.objectives", "REWARDS"),
    "spaces": ("autoprune.search_spaces", "SEARCH_SPACES"),
    "importance": ("autoprune.importance", "IMPORTANCE"),
    "models": ("autoprune.models", "MODELS"),
    "datasets": ("autoprune.data", "DATASETS"),
}


def registry(kind: str) -> Any:
    """The registry listed as ``kind`` (imported now; the built-in searcher modules are loaded first)."""
    if kind == "searchers":
        from autoprune.agents.base import load_builtin_searchers

        load_builtin_searchers()
    module, attr = _HOMES[kind]
    return getattr(importlib.import_module(module), attr)


REGISTRIES: dict[str, Callable[[], Any]] = {kind: functools.partial(registry, kind) for kind in _HOMES}
"""``WHAT`` → a function returning its :class:`~autoprune.registry.Registry` (imported on demand)."""


def origin(obj: Any) -> str:
    """The module that defined a registered object (a class, a function, a ``functools.partial`` of one, or a
    :class:`~autoprune.data.DatasetSource`, whose ``read`` function is looked at)."""
    for attr in ("func", "read"):  # functools.partial, DatasetSource
        inner = getattr(obj, attr, None)
        if callable(inner):
            obj = inner
            break
    return str(getattr(obj, "__module__", "") or "")


def rows(kind: str) -> list[tuple[str, str]]:
    """``(name, one-line help)`` of every entry of registry ``kind`` (plugin entries say where they come from)."""
    reg = REGISTRIES[kind]()
    out = []
    for name in reg.names():
        text = reg.help(name)
        module = origin(reg.get(name))
        if module and module.split(".")[0] != "autoprune":
            text = f"{text}  [plugin: {module}]" if text else f"[plugin: {module}]"
        out.append((name, text))
    out.extend({"models": _EXTRA_MODELS, "datasets": _EXTRA_DATASETS}.get(kind, {}).items())
    return out


def run(args: argparse.Namespace) -> int:
    """Print ``name  help`` rows per registry (a ``KIND:`` heading above each when listing all)."""
    kinds = KINDS if args.what == "all" else (args.what,)
    for i, kind in enumerate(kinds):
        table = rows(kind)
        if len(kinds) > 1:
            print(("\n" if i else "") + f"{kind}:")
        width = max((len(n) for n, _ in table), default=0)
        for name, text in table:
            print(f"  {name:<{width}}  {text}".rstrip())
    return 0
