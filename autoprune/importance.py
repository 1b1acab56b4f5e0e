"""Channel importance criteria: which channels of a group to keep (ENGINE.md §3.2).

A criterion maps a :class:`~autoprune.graph.ChannelGroup` to one score per channel (higher = more important).
Member scores (producer rows, consumer column slices, norm scales, depthwise filters) are reduced over the
group's members (mean by default). Criteria are registered by name in :data:`IMPORTANCE`:

``l1`` (:data:`DEFAULT_CRITERION`: the default of :func:`group_scores`, :func:`autoprune.pruning.plan` /
:func:`~autoprune.pruning.apply` and of campaigns), ``l2``, ``bn_scale``, ``taylor`` (first-order, needs a
loader), ``fpgm``, ``consumer_l1`` (AMC), ``prefix`` (keep the first channels, for ordered-channel supernets) and
``random`` (seeded).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.errors import ConfigError
from autoprune.graph import ChannelGroup, GroupSet, TensorSlice
from autoprune.registry import Registry

__all__ = [
    "DEFAULT_CRITERION",
    "IMPORTANCE",
    "ScoreContext",
    "channel_rows",
    "group_scores",
    "normalized",
    "select",
]

REDUCTIONS = ("mean", "sum", "max")

#: The channel-selection criterion used when none is named: by the library (:func:`group_scores`,
#: :func:`autoprune.pruning.plan` / :func:`~autoprune.pruning.apply`) and by campaigns (the ``Problem`` and the
#: ``search_space.importance`` setting), so both keep the same channels for the same widths.
DEFAULT_CRITERION = "l1"


@dataclass
class ScoreContext:
    """What a criterion may look at.

    Attributes:
        groups: The analysed model.
        tensors: Current parameters and buffers of the model, by canonical name.
        model: The model being scored.
        loader: Iterable of ``(x, y)`` batches (``taylor`` only).
        loss_fn: ``loss_fn(output, y)``; cross-entropy by default.
        batches: How many loader batches ``taylor`` uses.
        seed: Seed of ``random``.
        reduce: How member scores are combined (``mean``, ``sum`` or ``max``).
    """

    groups: GroupSet
    tensors: Mapping[str, torch.Tensor]
    model: nn.Module
    loader: Iterable[Any] | None = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    batches: int = 4
    seed: int = 0
    reduce: str = "mean"
    cache: dict[str, Any] = field(default_factory=dict)


Criterion = Callable[[ChannelGroup, ScoreContext], torch.Tensor]

IMPORTANCE: Registry[Criterion] = Registry("importance criterion")


def channel_rows(t: torch.Tensor, sl: TensorSlice, size: int) -> torch.Tensor:
    """The part of tensor ``t`` that belongs to each channel of a group, as ``[size, -1]`` rows.

    For the input dim of a grouped conv weight (``sl.groups > 1``, ``t`` of shape ``[C_out, C_in/g, …]``) the
    rows follow the virtual ``C_in`` axis: input channel ``i·C_in/g + j`` owns column ``j`` of the output rows of
    block ``i``.
    """
    if sl.groups > 1:
        g, x = sl.groups, t.detach()
        x = x.reshape(g, x.shape[0] // g, x.shape[1], -1).permute(0, 2, 1, 3).reshape(g * x.shape[1], -1)
        return x[sl.offset: sl.offset + size * sl.stride].reshape(size, -1).float()
    x = t.detach().movedim(sl.dim, 0)
    x = x[sl.offset: sl.offset + size * sl.stride]
    return x.reshape(size, -1).float()


def _reduce(scores: Sequence[torch.Tensor], how: str, size: int) -> torch.Tensor:
    if not scores:
        return torch.zeros(size)
    stacked = torch.stack([s.float() for s in scores])
    if how == "mean":
        return stacked.mean(0)
    if how == "sum":
        return stacked.sum(0)
    return stacked.amax(0)


def is_weight(param_name: str, name: str = "weight") -> bool:
    """``weight`` and the projection weights of attention (``in_proj_weight``, ``q_proj_weight``, …)."""
    return param_name == name or param_name.endswith("_" + name)


def _weights(group: ChannelGroup, roles: Iterable[str], name: str = "weight") -> list[TensorSlice]:
    roles = set(roles)
    return [s for s in group.slices if s.role in roles and is_weight(s.param_name, name)]


def _magnitude(group: ChannelGroup, ctx: ScoreContext, p: int) -> torch.Tensor:
    slices = _weights(group, ("out", "in", "dw", "norm")) + [s for s in group.slices if s.role == "param"]
    scores = [channel_rows(ctx.tensors[s.tensor], s, group.size).norm(p=p, dim=1) for s in slices]
    return _reduce(scores, ctx.reduce, group.size)


@IMPORTANCE.register("l2")
def l2(group: ChannelGroup, ctx: ScoreContext) -> torch.Tensor:
    """L2 norm of the group's weight slices (producer rows, consumer columns, norm scales), averaged."""
    return _magnitude(group, ctx, 2)


@IMPORTANCE.register("l1")
def l1(group: ChannelGroup, ctx: ScoreContext) -> torch.Tensor:
    """L1 norm of the group's weight slices, averaged over members (EagleEye)."""
    return _magnitude(group, ctx, 1)


@IMPORTANCE.register("bn_scale")
def bn_scale(group: ChannelGroup, ctx: ScoreContext) -> torch.Tensor:
    """|γ| of the group's normalisation layers (network slimming); groups without a norm fall back to l2."""
    norms = _weights(group, ("norm",))
    if not norms:
        return l2(group, ctx)
    return _reduce([channel_rows(ctx.tensors[s.tensor], s, group.size).abs().sum(1) for s in norms],
                   ctx.reduce, group.size)


@IMPORTANCE.register("consumer_l1")
def consumer_l1(group: ChannelGroup, ctx: ScoreContext) -> torch.Tensor:
    """Σ|W| over the consumers' input slices only (AMC's channel selection); no consumer: l1."""
    ins = _weights(group, ("in",))
    if not ins:
        return l1(group, ctx)
    return _reduce([channel_rows(ctx.tensors[s.tensor], s, group.size).abs().sum(1) for s in ins],
                   ctx.reduce, group.size)


@IMPORTANCE.register("fpgm")
def fpgm(group: ChannelGroup, ctx: ScoreContext) -> torch.Tensor:
    """Distance of each producer filter to the others (filters near the geometric median are redundant)."""
    prods = _weights(group, ("out", "dw"))
    if not prods:
        return l2(group, ctx)
    scores = []
    for s in prods:
        rows = channel_rows(ctx.tensors[s.tensor], s, group.size)
        scores.append(torch.cdist(rows[None], rows[None])[0].sum(1))
    return _reduce(scores, ctx.reduce, group.size)


@IMPORTANCE.register("prefix")
def prefix(group: ChannelGroup, ctx: ScoreContext) -> torch.Tensor:
    """Keep the first channels (ordered-channel supernets such as DMCP)."""
    return -torch.arange(group.size, dtype=torch.float32)


@IMPORTANCE.register("random")
def random_scores(group: ChannelGroup, ctx: ScoreContext) -> torch.Tensor:
    """A seeded random permutation (sanity baseline); stable per (seed, group id)."""
    g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + zlib.crc32(group.id.encode()))
    return torch.randperm(group.size, generator=g).float()


@IMPORTANCE.register("taylor")
def taylor(group: ChannelGroup, ctx: ScoreContext) -> torch.Tensor:
    """First-order Taylor |Σ w·∂L/∂w| per channel over the group's tensors (needs ``loader``)."""
    grads = _taylor_grads(ctx)
    scores = []
    for s in group.slices:
        if s.tensor not in grads or (s.role == "in" and not is_weight(s.param_name)):
            continue
        w = channel_rows(ctx.tensors[s.tensor], s, group.size)
        g = channel_rows(grads[s.tensor], s, group.size)
        scores.append((w * g).sum(1).abs())
    return _reduce(scores, ctx.reduce, group.size)


def _taylor_grads(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    if "taylor" in ctx.cache:
        return ctx.cache["taylor"]
    if ctx.loader is None:
        raise ConfigError("importance 'taylor' needs a loader of (x, y) batches",
                          hint="pass loader=... (a few training batches) to plan()/apply()")
    dense = ctx.groups.instantiate(ctx.model)
    dense.eval()
    loss_fn = ctx.loss_fn or F.cross_entropy
    params = dict(dense.named_parameters())
    used = 0
    for batch in ctx.loader:
        if used >= ctx.batches:
            break
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        ref = next(iter(params.values()), None)
        if ref is not None and isinstance(x, torch.Tensor):
            x = x.to(ref.device, ref.dtype if x.is_floating_point() else x.dtype)
            y = y.to(ref.device) if isinstance(y, torch.Tensor) else y
        out = dense(x)
        loss = loss_fn(out, y) if y is not None else out.float().pow(2).mean()
        loss.backward()
        used += 1
    if used == 0:
        raise ConfigError("importance 'taylor' got an empty loader", hint="pass at least one (x, y) batch")
    grads = {ctx.groups.canonical(n): p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    ctx.cache["taylor"] = grads
    return grads


def group_scores(model: nn.Module, groups: GroupSet, ids: Iterable[str] | None = None,
                 importance: str | Criterion = DEFAULT_CRITERION, *, loader: Iterable[Any] | None = None,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, batches: int = 4,
                 reduce: str = "mean", seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-channel scores of the given groups (all prunable groups by default).

    Args:
        model: The model whose current weights are scored (the analysed one, or a same-architecture copy).
        groups: Its analysis.
        ids: Group ids to score.
        importance: A criterion name from :data:`IMPORTANCE` or a callable ``(group, ctx) -> scores``
            (default :data:`DEFAULT_CRITERION`).
        loader: Batches for ``taylor``.
        loss_fn: Loss for ``taylor`` (cross-entropy by default).
        batches: Loader batches used by ``taylor``.
        reduce: ``mean`` (default), ``sum`` or ``max`` over members.
        seed: Seed for ``random``.
    """
    if reduce not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduce!r}", hint=f"choose one of {', '.join(REDUCTIONS)}")
    fn = IMPORTANCE.get(importance) if isinstance(importance, str) else importance
    ctx = ScoreContext(groups=groups, tensors=groups.tensors_of(model), model=model, loader=loader,
                       loss_fn=loss_fn, batches=batches, seed=seed, reduce=reduce)
    wanted = [g.id for g in groups.prunable()] if ids is None else list(ids)
    out = {}
    for gid in wanted:
        g = groups[gid]
        s = fn(g, ctx).detach().float().reshape(-1)
        if s.numel() != g.size:
            raise ConfigError(f"importance criterion returned {s.numel()} scores for group {gid} of size {g.size}")
        out[gid] = s
    return out


def select(scores: torch.Tensor, width: int, blocks: int = 1) -> tuple[int, ...]:
    """Indices of the ``width`` highest scores, ascending (ties keep the lower index).

    With ``blocks > 1`` the scores form that many equal consecutive blocks and each block contributes its
    ``width / blocks`` highest scores (a group's ``divisor``: grouped convs need equal counts per block).

    Raises:
        ConfigError: If ``blocks`` does not divide both the number of scores and ``width``.
    """
    if blocks <= 1:
        order = torch.argsort(-scores, stable=True)[:width]
        return tuple(sorted(int(i) for i in order))
    n = scores.numel()
    if n % blocks or width % blocks:
        raise ConfigError(f"cannot keep {width} of {n} channels equally in {blocks} blocks",
                          hint=f"use a width that is a multiple of {blocks}")
    q, k = n // blocks, width // blocks
    order = torch.argsort(-scores.reshape(blocks, q), dim=1, stable=True)[:, :k]
    order = order + torch.arange(blocks)[:, None] * q
    return tuple(sorted(int(i) for i in order.flatten()))


def normalized(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores divided by their group mean, for ranking channels across groups (global pruning)."""
    return {k: v / v.mean().clamp_min(1e-12) for k, v in scores.items()}
