"""``autoprune list``: the registered models and datasets with one line of help each."""

from __future__ import annotations

import argparse
from typing import Any

KINDS = ("models", "datasets")
_EXTRA_MODELS = {
    "module:callable": "your own network, e.g. mymodels:build_net for build_net in ./mymodels.py",
    "torchvision:NAME": "a torchvision model, e.g. torchvision:resnet18 (needs torchvision)",
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoprune list``."""
    p = subparsers.add_parser("list", help="list the available models or datasets", description=__doc__)
    p.add_argument("what", nargs="?", choices=(*KINDS, "all"), default="all", help="what to list (default: all)")
    return p


def _registry(kind: str) -> Any:
    if kind == "models":
        from autoprune.models import MODELS

        return MODELS
    from autoprune.data import DATASETS

    return DATASETS


def run(args: argparse.Namespace) -> int:
    """Print ``name  help`` rows per registry."""
    kinds = KINDS if args.what == "all" else (args.what,)
    for i, kind in enumerate(kinds):
        reg = _registry(kind)
        if len(kinds) > 1:
            print(("\n" if i else "") + f"{kind}:")
        width = max((len(n) for n in (*reg.names(), *(_EXTRA_MODELS if kind == "models" else ()))), default=0)
        for name in reg.names():
            print(f"  {name:<{width}}  {reg.help(name)}".rstrip())
        if kind == "models":
            for name, text in _EXTRA_MODELS.items():
                print(f"  {name:<{width}}  {text}")
    return 0
