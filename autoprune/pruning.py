"""Apply group widths to a model: legal widths, kept channels, physical slicing, save/load (ENGINE.md §3–4).

This module owns the step from "a width per channel group" to a new, physically smaller
``torch.fx.GraphModule``: :func:`legal_widths` and the width helpers turn ratios or per-layer requests into
legal group widths, :func:`plan` picks the kept channels with an importance criterion
(:mod:`autoprune.importance`), and :func:`apply` slices every parameter and buffer, updates the module
hyper-parameters, rewrites width-dependent literals and checks the result on the example input. The caller's
model is never modified. Groups with a ``divisor`` (grouped convs) take widths that are multiples of it and keep
equally many channels per block; a grouped conv's weight keeps, for each kept output row, the kept input columns
of its own block (different blocks may keep different input channels; ``groups`` is unchanged). Optional
least-squares reconstruction of the consumers (AMC, ALGORITHMS.md §1.4) is available with ``reconstruct=True``.
:func:`permute` reorders channels within groups without changing the function (ordered-channel supernets).
:func:`save_pruned` / :func:`load_pruned` store the result as architecture-as-data through
:mod:`autoprune.serialize`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from autoprune.errors import AutoPruneError, ConfigError
from autoprune.graph import ChannelGroup, GroupSet, nearest_width
from autoprune.graph.attention import retarget_window_attention
from autoprune.importance import DEFAULT_CRITERION, group_scores, select
from autoprune.types import Candidate

__all__ = [
    "PruningPlan",
    "apply",
    "legal_widths",
    "load_pruned",
    "mask",
    "nearest_legal",
    "permute",
    "plan",
    "save_pruned",
    "widths_from_layers",
    "widths_from_ratios",
]

META_KEY = "autoprune.pruning"
ROUNDINGS = ("nearest", "up", "down")


# ----------------------------------------------------------------------------------------------------------------
# Widths
# ----------------------------------------------------------------------------------------------------------------


def legal_widths(group: ChannelGroup, round_to: int = 1) -> list[int]:
    """Legal widths of a group, ascending; an alias of :meth:`autoprune.graph.ChannelGroup.legal_widths`.

    Args:
        group: The channel group.
        round_to: Width multiple; the step is ``lcm(round_to, divisor)`` (ENGINE.md §3.3).

    Raises:
        ConfigError: If ``round_to < 1``.
    """
    return group.legal_widths(round_to)


def nearest_legal(group: ChannelGroup, target: float, round_to: int = 1, rounding: str = "nearest") -> int:
    """The legal width closest to ``target`` channels.

    ``rounding``: ``nearest`` (ties go up), ``up`` (AMC: ``max(1, round(target))`` rounded up to a legal
    width) or ``down`` (largest legal width not above the target, else the smallest legal width).
    """
    if rounding not in ROUNDINGS:
        raise ConfigError(f"unknown rounding {rounding!r}", hint=f"choose one of {', '.join(ROUNDINGS)}")
    ws = group.legal_widths(round_to)
    if rounding == "up":
        t = max(1, round(target))
        return next((w for w in ws if w >= t), ws[-1])
    if rounding == "down":
        below = [w for w in ws if w <= target + 1e-9]
        return below[-1] if below else ws[0]
    return nearest_width(ws, target)


def widths_from_ratios(groups: GroupSet, ratios: float | Mapping[str, float], round_to: int = 1,
                       rounding: str = "nearest") -> dict[str, int]:
    """Keep ratios → legal widths.

    Args:
        groups: The analysed model.
        ratios: One keep ratio in (0, 1] for every prunable group, or ``{group id: ratio}``.
        round_to: Width multiple (see :func:`legal_widths`).
        rounding: ``nearest``, ``up`` (AMC) or ``down``.
    """
    items = ({g.id: float(ratios) for g in groups.prunable()} if isinstance(ratios, (int, float))
             else dict(ratios))
    out = {}
    for gid, r in items.items():
        g = groups[gid]
        if not g.prunable:
            raise ConfigError(f"group {gid!r} is frozen ({g.reason})", hint="leave frozen groups out of ratios")
        if not 0.0 < r <= 1.0:
            raise ConfigError(f"keep ratio {r} for group {gid!r} is outside (0, 1]")
        out[gid] = nearest_legal(g, r * g.size, round_to, rounding)
    return out


def widths_from_layers(groups: GroupSet, layer_widths: Mapping[str, int], on_conflict: str = "error") -> dict[str, int]:
    """Per-layer output widths → group widths.

    Several layers of one group (e.g. the convs of a residual stage) must agree; otherwise ``on_conflict``
    decides: ``error`` (default) raises, ``min`` / ``max`` take the smallest / largest request.

    Raises:
        ConfigError: On a conflict (with ``on_conflict="error"``), an unknown layer, or a frozen group.
    """
    if on_conflict not in ("error", "min", "max"):
        raise ConfigError(f"on_conflict must be 'error', 'min' or 'max', got {on_conflict!r}")
    out: dict[str, int] = {}
    source: dict[str, str] = {}
    for layer, w in layer_widths.items():
        g = groups.group_of(layer)
        if not g.prunable:
            raise ConfigError(f"layer {layer!r} belongs to frozen group {g.id!r} ({g.reason})",
                              hint="leave it out or pass keep_widths_of differently")
        if g.id in out and out[g.id] != w:
            if on_conflict == "error":
                raise ConfigError(
                    f"layers {source[g.id]!r} and {layer!r} share channel group {g.id!r} but ask for widths "
                    f"{out[g.id]} and {w}",
                    hint="request one width per group, or pass on_conflict='min' or 'max'")
            w = min(out[g.id], w) if on_conflict == "min" else max(out[g.id], w)
        out[g.id] = int(w)
        source.setdefault(g.id, layer)
    return out


def _resolve_widths(groups: GroupSet, widths: Mapping[str, int] | Candidate | None, round_to: int) -> dict[str, int]:
    """Validate widths and snap them to legal values; every prunable group gets an entry."""
    if isinstance(widths, Candidate):
        widths = widths.widths
    if widths is not None and not isinstance(widths, Mapping):
        raise ConfigError(f"widths must be a mapping of group id to width, got {type(widths).__name__}")
    out = groups.full_widths()
    for gid, w in (widths or {}).items():
        g = groups[gid]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or int(w) != w:
            raise ConfigError(f"width for group {gid!r} must be an integer, got {w!r}")
        w = int(w)
        if w <= 0:
            raise ConfigError(f"width {w} for group {gid!r} would remove the whole group",
                              hint=f"use a width between 1 and {g.size}")
        if w > g.size:
            raise ConfigError(f"width {w} for group {gid!r} exceeds its size {g.size}")
        if not g.prunable:
            if w != g.size:
                raise ConfigError(f"group {gid!r} is frozen ({g.reason}); it cannot be pruned to {w}",
                                  hint="leave frozen groups out of the widths")
            continue
        g.check_width(w)
        legal = g.legal_widths(round_to)
        out[gid] = w if w in legal else nearest_legal(g, w, round_to)
    return out


def _check_blocks(groups: GroupSet, keep: Mapping[str, Iterable[int]]) -> None:
    """Every group with ``divisor > 1`` must keep the same number of channels in each of its blocks."""
    for gid, kept in keep.items():
        g = groups[gid]
        if g.divisor == 1:
            continue
        q = g.size // g.divisor
        counts = np.bincount(np.asarray(list(kept), dtype=np.int64) // q, minlength=g.divisor)
        if len(set(counts.tolist())) > 1:
            raise ConfigError(
                f"the kept channels of group {gid!r} are spread unevenly over its {g.divisor} blocks of {q} "
                f"channels (kept per block: {counts.tolist()}); a grouped conv needs equal counts",
                hint="choose the kept channels per block (importance.select(scores, width, blocks=group.divisor))")


# ----------------------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruningPlan:
    """Widths and kept channel indices for every prunable group.

    Attributes:
        widths: Group id → width (every prunable group).
        keep: Group id → kept channel indices (ascending), for every prunable group.
        importance: Name of the criterion that chose them.
        round_to: Width multiple used to legalise the widths.
        groups: The analysis the plan belongs to.
    """

    widths: Mapping[str, int]
    keep: Mapping[str, tuple[int, ...]]
    importance: str = DEFAULT_CRITERION
    round_to: int = 1
    groups: GroupSet | None = field(default=None, compare=False, repr=False)

    def pruned(self) -> dict[str, tuple[int, ...]]:
        """Kept indices of the groups that lose channels."""
        assert self.groups is not None
        return {g: k for g, k in self.keep.items() if len(k) < self.groups[g].size}

    def provenance(self) -> dict[str, Any]:
        """JSON-friendly record: per group the original size, the width and the kept indices."""
        assert self.groups is not None
        return {
            "importance": self.importance,
            "round_to": self.round_to,
            "groups": {gid: {"size": self.groups[gid].size, "width": int(self.widths[gid]),
                             "kept": list(self.keep[gid])} for gid in self.keep},
        }


def plan(model: nn.Module | GroupSet, groups: GroupSet | Mapping[str, int] | Candidate | None = None,
         widths: Mapping[str, int] | Candidate | None = None, *,
         importance: str | Callable[..., Any] = DEFAULT_CRITERION, round_to: int = 1,
         loader: Iterable[Any] | None = None, loss_fn: Callable[..., Any] | None = None, batches: int = 4,
         reduce: str = "mean", seed: int = 0) -> PruningPlan:
    """Choose the kept channels of every prunable group.

    ``plan(model, groups, widths)`` scores ``model``'s current weights; ``plan(groups, widths)`` scores the
    analysed model's weights. A group with ``divisor > 1`` (grouped convs) keeps the ``width / divisor``
    best channels of each of its ``divisor`` blocks.

    Args:
        model: The model (or the :class:`GroupSet`, see above).
        groups: Its analysis.
        widths: Group id → width, or a :class:`~autoprune.types.Candidate`; missing groups keep full width.
            Widths are snapped to legal widths (see :func:`legal_widths`); a width that is not a multiple of
            the group's ``divisor`` is an error.
        importance: Criterion name (see :mod:`autoprune.importance`; default
            :data:`~autoprune.importance.DEFAULT_CRITERION`, as in campaigns) or callable.
        round_to: Width multiple.
        loader, loss_fn, batches: For ``taylor``.
        reduce: Reduction of member scores.
        seed: Seed for ``random``.
    """
    if isinstance(model, GroupSet):
        model, groups, widths = model.graph_module, model, groups  # type: ignore[assignment]
    if not isinstance(groups, GroupSet):
        raise ConfigError("plan() needs the GroupSet from graph.analyze()", hint="plan(model, groups, widths)")
    resolved = _resolve_widths(groups, widths, round_to)  # type: ignore[arg-type]
    pruned_ids = [gid for gid, w in resolved.items() if w < groups[gid].size]
    scores = group_scores(model, groups, pruned_ids, importance, loader=loader, loss_fn=loss_fn, batches=batches,
                          reduce=reduce, seed=seed) if pruned_ids else {}
    keep = {gid: (select(scores[gid], w, blocks=groups[gid].divisor) if gid in scores else tuple(range(w)))
            for gid, w in resolved.items()}
    name = importance if isinstance(importance, str) else getattr(importance, "__name__", "custom")
    return PruningPlan(widths=resolved, keep=keep, importance=name, round_to=round_to, groups=groups)


# ----------------------------------------------------------------------------------------------------------------
# Apply
# ----------------------------------------------------------------------------------------------------------------


class _Positions:
    """Kept positions of tensor dims under one plan (cached: many tensors share a layout)."""

    def __init__(self, groups: GroupSet, keep: Mapping[str, tuple[int, ...]]) -> None:
        self.groups = groups
        self.removed: dict[str, np.ndarray] = {}
        for gid, kept in keep.items():
            size = groups[gid].size
            if len(kept) < size:
                mask = np.ones(size, dtype=bool)
                mask[list(kept)] = False
                self.removed[gid] = np.flatnonzero(mask)
        self.cache: dict[tuple[int, tuple[tuple[str, int, int], ...]], torch.Tensor | None] = {}

    def index(self, full: int, entries: list[tuple[str, int, int]]) -> torch.Tensor | None:
        """Positions of a dim of length ``full`` that survive, or None when nothing is removed."""
        key = (full, tuple(entries))
        if key in self.cache:
            return self.cache[key]
        drop = np.zeros(full, dtype=bool)
        changed = False
        for gid, off, stride in entries:
            chans = self.removed.get(gid)
            if chans is None:
                continue
            drop[off + (chans[:, None] * stride + np.arange(stride)[None, :]).ravel()] = True
            changed = True
        out = torch.from_numpy(np.flatnonzero(~drop)) if changed else None
        self.cache[key] = out
        return out


class _Order:
    """Positions of tensor dims under a channel permutation per group (new position i holds old ``index[i]``)."""

    def __init__(self, perms: Mapping[str, torch.Tensor]) -> None:
        self.perms = perms

    def index(self, full: int, entries: list[tuple[str, int, int]]) -> torch.Tensor | None:
        """The gather index of a dim of length ``full``, or None when no group on it is permuted."""
        idx = torch.arange(full)
        changed = False
        for gid, off, stride in entries:
            p = self.perms.get(gid)
            if p is None:
                continue
            idx[off:off + p.numel() * stride] = off + (p[:, None] * stride + torch.arange(stride)[None, :]).flatten()
            changed = True
        return idx if changed else None


def _reindexer(gs: GroupSet, positions: _Positions | _Order,
               used: dict[tuple[str, int], torch.Tensor | None]) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """``(name, tensor) → tensor`` gathering every group dim of a tensor at ``positions`` (kept or reordered).

    The input dim of a grouped conv weight is indexed along its virtual ``C_in`` axis per output row (see
    :func:`_grouped_columns`). Each gather index is recorded in ``used`` under ``(tensor, dim)``.
    """

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        grouped = gs.grouped_dims.get(name, {})
        dims = gs.tensor_dims.get(name, {})
        for dim, entries in dims.items():
            if dim in grouped:
                continue
            idx = positions.index(gs.tensor_shapes[name][dim], entries)
            used[(name, dim)] = idx
            if idx is not None:
                t = t.index_select(dim, idx.to(t.device))
        for dim, g in grouped.items():
            kin = positions.index(gs.tensor_shapes[name][dim] * g, dims.get(dim, []))
            used[(name, dim)] = kin
            if kin is not None:
                t = _grouped_columns(t, g, kin, used.get((name, 0)), gs.tensor_shapes[name])
        return t

    return transform


def _role_size(groups: GroupSet, full: int, entries: list[tuple[str, int, int]], widths: Mapping[str, int]) -> int:
    size = full
    for gid, _off, stride in dict.fromkeys(entries):
        if gid in widths:
            size += (widths[gid] - groups[gid].size) * stride
    return size


def _resize(mod: nn.Module, role: str, n: int) -> None:
    """Set the hyper-parameter of ``mod`` that ``role`` controls to ``n``."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if role == "dw":
            mod.in_channels = mod.out_channels = mod.groups = n
        elif role == "out":
            mod.out_channels = n
        elif role == "in":  # grouped convs keep ``groups``: every block shrinks by the same count
            if mod.groups == mod.in_channels > 1:  # depth multiplier: one input channel per conv group
                mod.groups = n
            mod.in_channels = n
    elif isinstance(mod, nn.Linear):
        if role == "out":
            mod.out_features = n
        elif role == "in":
            mod.in_features = n
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        mod.num_features = n
    elif isinstance(mod, nn.LayerNorm):
        mod.normalized_shape = (n,)
    elif isinstance(mod, nn.GroupNorm):
        if mod.num_groups == mod.num_channels:
            mod.num_groups = n
        mod.num_channels = n
    elif isinstance(mod, nn.PReLU):
        mod.num_parameters = n
    elif isinstance(mod, nn.Embedding) and role == "out":
        mod.embedding_dim = n


def _resize_modules(new: fx.GraphModule, groups: GroupSet, widths: Mapping[str, int]) -> None:
    """Update hyper-parameters (in/out channels, groups, num_features, …) to the sliced tensors."""
    mods = dict(new.named_modules())
    for (name, role), (full, entries) in groups.module_roles.items():
        mod = mods.get(name)
        if mod is not None and role != "param":
            _resize(mod, role, _role_size(groups, full, entries, widths))


def _resize_attention(new: fx.GraphModule) -> None:
    """Give every ``nn.MultiheadAttention`` of ``new`` the widths of its sliced tensors (ENGINE.md §2.4, attention).

    ``head_dim`` never changes (whole heads are pruned), so ``num_heads`` is the in-projection's rows per q/k/v
    part over ``head_dim``; ``embed_dim``, ``kdim`` and ``vdim`` are the in-projection's columns (``out_proj``'s
    features were set by :func:`_resize_modules`). When the widths still fit PyTorch's forward (query width =
    ``num_heads·head_dim`` = output width, and packed weights exactly when ``kdim == vdim == embed_dim``), the
    module keeps its class with those attributes rewritten; otherwise it becomes a
    :class:`~autoprune.graph.attention.PrunedMultiheadAttention` holding the same parameters.
    """
    from autoprune.graph.attention import PrunedMultiheadAttention

    for name, mod in list(new.named_modules()):
        if not isinstance(mod, nn.MultiheadAttention):
            continue
        if mod._qkv_same_embed_dim:
            attn, embed = mod.in_proj_weight.shape[0] // 3, mod.in_proj_weight.shape[1]
            kdim = vdim = embed
        else:
            attn, embed = mod.q_proj_weight.shape[0], mod.q_proj_weight.shape[1]
            kdim, vdim = mod.k_proj_weight.shape[1], mod.v_proj_weight.shape[1]
        heads = attn // mod.head_dim
        out = mod.out_proj.weight.shape[0]
        if (embed, kdim, vdim, heads) == (mod.embed_dim, mod.kdim, mod.vdim, mod.num_heads) \
                and (isinstance(mod, PrunedMultiheadAttention) or attn == embed == out):
            continue
        fits = attn == embed == out and mod._qkv_same_embed_dim == (kdim == embed and vdim == embed)
        if fits and type(mod) is nn.MultiheadAttention:
            mod.embed_dim, mod.kdim, mod.vdim, mod.num_heads = embed, kdim, vdim, heads
            continue
        parent, _, child = name.rpartition(".")
        holder = new.get_submodule(parent) if parent else new
        setattr(holder, child, PrunedMultiheadAttention.from_module(mod, embed_dim=embed, kdim=kdim, vdim=vdim,
                                                                    num_heads=heads))


def _set_path(container: Any, path: tuple[Any, ...], value: int) -> Any:
    """A copy of ``container`` (tuple, list, dict or slice) with the item at ``path`` replaced.

    A slice's items are ``"start"``, ``"stop"`` and ``"step"`` (a literal channel slice ``x[:, a:b]``).
    """
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(container, slice):
        parts = {"start": container.start, "stop": container.stop, "step": container.step}
        parts[head] = _set_path(parts[head], rest, value)
        return slice(parts["start"], parts["stop"], parts["step"])
    if isinstance(container, dict):
        out = dict(container)
        out[head] = _set_path(container[head], rest, value)
        return out
    items = list(container)
    items[head] = _set_path(items[head], rest, value)
    return type(container)(items) if isinstance(container, (tuple, list)) else items


def _rewrite_literals(new: fx.GraphModule, groups: GroupSet, widths: Mapping[str, int]) -> bool:
    """Rewrite width-dependent literals (view sizes, split sizes, pad amounts, slice bounds) in the new graph."""
    nodes = {n.name: n for n in new.graph.nodes}
    changed = False
    for site in groups.literals:
        value = site.base + sum(c * (widths[g] - groups[g].size) for g, c in site.terms)
        if value == site.base:
            continue
        node = nodes[site.node]
        if site.path[0] == "args":
            node.args = _set_path(node.args, site.path[1:], value)
        else:
            node.kwargs = _set_path(node.kwargs, site.path[1:], value)
        changed = True
    return changed


def _as_plan(model: nn.Module, groups: GroupSet | PruningPlan,
             widths: Mapping[str, int] | Candidate | PruningPlan | None, **kw: Any) -> PruningPlan:
    if isinstance(groups, PruningPlan):
        if widths is not None:
            raise ConfigError("apply(model, plan) takes no widths: the plan already has them")
        return groups
    if isinstance(widths, PruningPlan):
        if widths.groups is not groups:
            raise ConfigError("the plan belongs to another analysis", hint="plan and apply with the same GroupSet")
        return widths
    if not isinstance(groups, GroupSet):
        raise ConfigError(f"apply() needs a GroupSet or a PruningPlan, got {type(groups).__name__}")
    return plan(model, groups, widths, **kw)


def apply(model: nn.Module, groups: GroupSet | PruningPlan, widths: Mapping[str, int] | Candidate | PruningPlan |
          None = None, *, importance: str | Callable[..., Any] = DEFAULT_CRITERION, round_to: int = 1,
          loader: Iterable[Any] | None = None, loss_fn: Callable[..., Any] | None = None, batches: int = 4,
          reconstruct: bool = False, calib_batches: int = 8, points_per_sample: int = 10, seed: int = 0,
          check: bool = True) -> fx.GraphModule:
    """Build a new, physically smaller model with the given group widths.

    Args:
        model: The analysed model (or a same-architecture copy with other weights). It is not modified.
        groups: Its :class:`GroupSet`, or a :class:`PruningPlan` (then ``widths`` must be None).
        widths: Group id → width, a :class:`~autoprune.types.Candidate`, or a :class:`PruningPlan`.
        importance: Criterion that picks the kept channels (when no plan is given; default
            :data:`~autoprune.importance.DEFAULT_CRITERION`, as in campaigns).
        round_to: Widths are snapped to multiples of this (see :func:`legal_widths`).
        loader: Batches for ``taylor`` importance and for ``reconstruct``.
        loss_fn: Loss for ``taylor``.
        batches: Loader batches used by ``taylor``.
        reconstruct: Refit each pruned consumer (conv/linear) by least squares on the dense model's inputs and
            outputs (AMC). Needs ``loader``.
        calib_batches: Loader batches used by ``reconstruct``.
        points_per_sample: Sampled output positions per image (conv) or rows per sample (linear).
        seed: Seed for ``random`` importance and for the reconstruction samples.
        check: Run the new model once on the example input and compare output shapes.

    Returns:
        A ``torch.fx.GraphModule`` with the original state-dict names; its ``meta["autoprune.pruning"]`` holds
        the provenance (per group: size, width, kept indices).
    """
    p = _as_plan(model, groups, widths, importance=importance, round_to=round_to, loader=loader, loss_fn=loss_fn,
                 batches=batches, seed=seed)
    gs = p.groups
    assert gs is not None
    _check_blocks(gs, p.keep)
    kept_cache: dict[tuple[str, int], torch.Tensor | None] = {}
    new = gs.instantiate(model, _reindexer(gs, _Positions(gs, p.keep), kept_cache))
    _resize_modules(new, gs, p.widths)
    _resize_attention(new)
    rewritten = _rewrite_literals(new, gs, p.widths)
    if retarget_window_attention(new) or rewritten:  # after the literals: reads the rewritten num_heads
        new.recompile()
    if reconstruct:
        if loader is None:
            raise ConfigError("reconstruct=True needs a calibration loader", hint="pass loader=... to apply()")
        _reconstruct(new, model, gs, kept_cache, loader, calib_batches, points_per_sample, seed)
    if check:
        _check_outputs(new, gs)
    new.meta[META_KEY] = p.provenance()
    return new


def _grouped_columns(t: torch.Tensor, groups: int, kin: torch.Tensor, kout: torch.Tensor | None,
                     full_shape: tuple[int, ...]) -> torch.Tensor:
    """Gather the input dim (1) of a grouped conv weight whose output rows (dim 0) were already gathered.

    ``kin`` are the kept (or reordered, within blocks) positions along the virtual ``C_in`` axis (block ``i`` =
    input channels of conv group ``i``) and ``kout`` the original rows of the gathered ``C_out`` (None: all).
    Each row takes the columns of its own block, so different blocks may keep different input channels.
    """
    c_out, per_in = full_shape[0], full_shape[1]
    per_out = c_out // groups
    blocks = kin // per_in
    local = [kin[blocks == i] - i * per_in for i in range(groups)]
    if len({len(x) for x in local}) != 1:
        raise RuntimeError(f"internal error: unequal kept input channels per conv group {[len(x) for x in local]}")
    rows = kout if kout is not None else torch.arange(c_out)
    idx = torch.stack(local)[rows // per_out].to(t.device)  # [rows, kept per block]
    idx = idx.reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(idx.shape[0], idx.shape[1], *t.shape[2:])
    return torch.gather(t, 1, idx)


def _cast_inputs(example: Any, module: nn.Module) -> tuple[Any, ...]:
    ref = next((t for t in module.parameters() if t.is_floating_point()), None)
    args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    if ref is None:
        return args
    return tuple(a.to(device=ref.device, dtype=ref.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shapes(v) for v in value)
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    return None


def _check_outputs(new: fx.GraphModule, gs: GroupSet) -> None:
    flags = {m: m.training for m in new.modules()}
    # a copy of the example input: a model that writes into its input must not change the caller's tensors
    example = pytree.tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, gs.example_input)
    try:
        new.eval()
        with torch.no_grad():
            out = new(*_cast_inputs(example, new))
    except Exception as exc:
        raise RuntimeError(f"internal error: the pruned model fails on the example input: {exc}") from exc
    finally:
        for m, t in flags.items():
            m.training = t
    got = _shapes(out)
    want = _shapes_like(gs.output_shapes)
    if got != want:
        raise RuntimeError(f"internal error: pruned output shapes {got} differ from the original {want}")


def _shapes_like(meta: Any) -> Any:
    if isinstance(meta, tuple) and all(isinstance(x, int) for x in meta):
        return meta
    if isinstance(meta, (tuple, list)):
        return tuple(_shapes_like(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _shapes_like(v) for k, v in meta.items()}
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Least-squares reconstruction (AMC)
# ----------------------------------------------------------------------------------------------------------------


def _reconstruct(new: fx.GraphModule, model: nn.Module, gs: GroupSet,
                 kept: Mapping[tuple[str, int], torch.Tensor | None], loader: Iterable[Any], calib_batches: int,
                 points: int, seed: int) -> None:
    """Refit pruned consumers: W' = argmin ‖Y − X[:, keep]·Wᵀ‖ on the dense model's activations."""
    targets: dict[str, nn.Module] = {}
    dense = gs.instantiate(model)
    dense.eval()
    dmods = dict(dense.named_modules())
    for (name, role), _ in gs.module_roles.items():
        mod = dmods.get(name)
        w_name = gs.canonical(f"{name}.weight")
        if role != "in" or kept.get((w_name, 1)) is None:
            continue
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1
                                          and mod.padding_mode == "zeros"):
            targets[name] = mod
    if not targets:
        return
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in targets}

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = inputs[0].detach()
            y = out.detach()
            if mod.bias is not None:
                y = y - mod.bias.detach().reshape(1, -1, *([1] * (y.dim() - 2))) if isinstance(mod, nn.Conv2d) \
                    else y - mod.bias.detach()
            if isinstance(mod, nn.Conv2d):
                cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # B, C·k·k, L
                b, _, n_pos = cols.shape
                pos = torch.randint(0, n_pos, (b, points), generator=gen)
                xs = torch.gather(cols, 2, pos[:, None, :].expand(-1, cols.shape[1], -1))
                ys = torch.gather(y.flatten(2), 2, pos[:, None, :].expand(-1, y.shape[1], -1))
                rows[name].append((xs.permute(0, 2, 1).reshape(-1, cols.shape[1]),
                                   ys.permute(0, 2, 1).reshape(-1, y.shape[1])))
            else:
                xs, ys = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
                if xs.shape[0] > points * x.shape[0]:
                    sel = torch.randperm(xs.shape[0], generator=gen)[: points * x.shape[0]]
                    xs, ys = xs[sel], ys[sel]
                rows[name].append((xs, ys))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in targets.items()]
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= calib_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                dense(*_cast_inputs(x, dense))
    finally:
        for h in handles:
            h.remove()
    nmods = dict(new.named_modules())
    for name, mod in targets.items():
        if not rows[name]:
            continue
        xs = torch.cat([r[0] for r in rows[name]]).double()
        ys = torch.cat([r[1] for r in rows[name]]).double()
        w_name = gs.canonical(f"{name}.weight")
        kin = kept[(w_name, 1)]
        kout = kept.get((w_name, 0))
        assert kin is not None
        per = int(math.prod(mod.weight.shape[2:])) if isinstance(mod, nn.Conv2d) else 1
        cols = (kin[:, None] * per + torch.arange(per)[None, :]).flatten()
        xk = xs[:, cols]
        yk = ys if kout is None else ys[:, kout]
        sol = torch.linalg.lstsq(xk, yk, driver="gelsd").solution.T  # [C_out', d'·k·k]
        target = nmods[name]
        with torch.no_grad():
            target.weight.copy_(sol.reshape(target.weight.shape).to(target.weight.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Pseudo-pruning (masks)
# ----------------------------------------------------------------------------------------------------------------


def mask(model: nn.Module, groups: GroupSet | PruningPlan, widths: Mapping[str, int] | Candidate | PruningPlan |
         None = None, *, roles: Iterable[str] = ("out", "dw", "norm", "param"), **plan_kw: Any) -> fx.GraphModule:
    """A full-width copy of ``model`` with the removed channels zeroed ("pseudo-pruning").

    Zeroing producers (weight rows and bias), depthwise filters, norm scales and shifts and per-channel
    parameters makes the removed channels exactly zero, so in eval mode the result equals :func:`apply`'s
    output (ENGINE.md §3.4 correctness criterion) for channel-wise layers.
    """
    p = _as_plan(model, groups, widths, **plan_kw)
    gs = p.groups
    assert gs is not None
    roles = set(roles)
    zero: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for gid, k in p.pruned().items():
        g = gs[gid]
        removed = sorted(set(range(g.size)) - set(k))
        chans = torch.tensor(removed, dtype=torch.long)
        for sl in g.slices:
            if sl.role in roles and "running" not in sl.param_name:
                pos = sl.offset + (chans[:, None] * sl.stride + torch.arange(sl.stride)[None, :]).flatten()
                zero.setdefault(sl.tensor, []).append((sl.dim, pos))

    def zeroer(name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in zero:
            return t
        t = t.clone()
        for dim, pos in zero[name]:
            t.index_fill_(dim, pos.to(t.device), 0.0)
        return t

    return gs.instantiate(model, zeroer)


def permute(model: nn.Module, groups: GroupSet, perms: Mapping[str, torch.Tensor | Iterable[int]]) -> fx.GraphModule:
    """A copy of ``model`` whose channels are reordered within the given groups; the function is unchanged.

    Every tensor of a group is gathered consistently (producer rows, norm parameters and statistics, depthwise
    filters, consumer columns with their offsets and strides, grouped conv columns per conv group), so the
    result computes the same outputs. Ordered-channel supernets (DMCP) use it to put important channels first.

    Args:
        model: The analysed model (or a same-architecture copy with other weights). It is not modified.
        groups: Its :class:`GroupSet`.
        perms: Group id → permutation of ``range(size)``: new channel ``i`` is old channel ``perms[i]``. A group
            with ``divisor > 1`` (grouped convs) may only reorder channels within each of its blocks.

    Returns:
        The engine's ``GraphModule`` with the same module names and state-dict keys as ``model``.

    Raises:
        ConfigError: For an unknown or frozen group, a value that is not a permutation, or one that moves a
            channel to another block of a grouped conv.
    """
    checked: dict[str, torch.Tensor] = {}
    prunable = {g.id: g for g in groups.prunable()}
    for gid, perm in perms.items():
        g = prunable.get(gid)
        if g is None:
            raise ConfigError(f"cannot permute group {gid!r}: it is not a prunable group of this model",
                              hint="use ids from groups.prunable() (groups.describe() lists them)")
        p = torch.as_tensor(perm if isinstance(perm, torch.Tensor) else list(perm), dtype=torch.long).reshape(-1)
        if p.numel() != g.size or not torch.equal(torch.sort(p).values, torch.arange(g.size)):
            raise ConfigError(f"the order given for group {gid} is not a permutation of its {g.size} channels",
                              hint="pass each channel index 0..size-1 exactly once")
        block = g.size // g.divisor
        if g.divisor > 1 and not torch.equal(p // block, torch.arange(g.size) // block):
            raise ConfigError(f"the order given for group {gid} moves channels between the {g.divisor} blocks of "
                              "its grouped convolution", hint=f"reorder within each block of {block} channels")
        checked[gid] = p
    return groups.instantiate(model, _reindexer(groups, _Order(checked), {}))


# ----------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------


def save_pruned(gm: fx.GraphModule, out_dir: str | Path, example_input: Any,
                groups: GroupSet | PruningPlan | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save a pruned model as architecture-as-data (``arch.json`` + ``weights.pt``) via :mod:`autoprune.serialize`.

    The metadata gains ``"pruning"``: per group the original size, the width and the kept indices (from the
    plan, or from ``gm.meta`` as set by :func:`apply`).
    """
    from autoprune import serialize

    if not isinstance(gm, fx.GraphModule):
        raise ConfigError(f"save_pruned() needs the GraphModule returned by apply(), got {type(gm).__name__}")
    meta = dict(metadata or {})
    prov = groups.provenance() if isinstance(groups, PruningPlan) else getattr(gm, "meta", {}).get(META_KEY)
    if prov is None and isinstance(groups, GroupSet):
        prov = {"groups": {g.id: {"size": g.size, "width": g.size, "kept": list(range(g.size))}
                           for g in groups.prunable()}}
    if prov is not None:
        meta["pruning"] = prov
    result = serialize.save_module(gm, out_dir, example_input, metadata=meta)
    return Path(result) if result is not None else Path(out_dir)


def load_pruned(out_dir: str | Path) -> fx.GraphModule:
    """Load a model saved by :func:`save_pruned` (no user code; tensors loaded with ``weights_only=True``)."""
    from autoprune import serialize

    path = Path(out_dir)
    if not path.exists():
        raise AutoPruneError(f"no saved model at {path}", hint="pass the directory given to save_pruned()")
    return serialize.load_module(path)
