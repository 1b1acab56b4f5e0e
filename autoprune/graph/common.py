"""Small helpers shared by the modules of the analysis package (shapes, dims, node arguments, hints)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx

__all__ = ["close_hint", "default_cdim", "node_args", "norm_dim", "prod", "shape_meta", "target_name"]


def close_hint(name: str, choices: Sequence[str]) -> str:
    """A "did you mean …?" hint for ``name`` among ``choices`` (or the first few choices)."""
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(repr(c) for c in close) + "?"
    shown = ", ".join(list(choices)[:12])
    return f"choices include: {shown}" + (" …" if len(choices) > 12 else "")


def shape_meta(value: Any) -> Any:
    """The shapes of the tensors in a (nested) value; anything else becomes None."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, torch.Size):
        return None
    if isinstance(value, list):
        return [shape_meta(v) for v in value]
    if isinstance(value, tuple):
        return tuple(shape_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: shape_meta(v) for k, v in value.items()}
    return None


def default_cdim(ndim: int) -> int | None:
    """The channel dim assumed for a fresh tensor of ``ndim`` dims (tokens are last for 3-D tensors)."""
    if ndim == 0:
        return None
    if ndim == 1:
        return 0
    if ndim == 3:
        return 2
    return 1


def norm_dim(d: int, ndim: int) -> int:
    """A dim index made non-negative."""
    return d + ndim if d < 0 else d


def prod(xs: Iterable[int]) -> int:
    """Product of integers (1 for none)."""
    return math.prod(int(x) for x in xs)


def node_args(n: fx.Node) -> list[fx.Node]:
    """The nodes among a node's (nested) arguments, in order."""
    found: list[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) or a)
    return found


def target_name(n: fx.Node) -> str:
    """A readable name of a node's target (``F.pad``, ``torch.cat``, ``operator.add``, a method name …)."""
    t = n.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", repr(t))
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    return f"torch.{name}" if mod.startswith("torch") or mod == "" else f"{mod}.{name}"
