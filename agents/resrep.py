"""ResRep — decoupling remembering and forgetting (Ding et al., ICCV 2021) on the engine's channel groups.

This module owns the whole ResRep procedure (docs/ALGORITHMS.md §6):

* :func:`find_sites` — where compactors go: after the BatchNorm of the producer of every single-producer
  prunable group (after the producer itself when it has no norm). Multi-producer (residual) groups are
  excluded (§6.3.6), as are groups whose producer or norm cannot be folded. A group that feeds a grouped
  convolution gets a compactor whose masks drop rows equally from each conv block.
* :class:`CompactorNet` — the model with a 1×1 compactor ``Q = I`` applied (by a forward hook) after each
  site, plus its channel masks.
* :func:`reset_gradients` — ``G(Q_i) = m_i·∂L/∂Q_i + λ·Q_i / max(‖Q_i‖₂, ε)`` (masked rows get only the lasso
  term; zero rows give no NaN).
* :func:`select_masks` — the periodic global mask update: rank every compactor row by its norm, walk the
  ranking from full widths until the closed-form MACs meet the target or the step cap is reached (rows of a
  grouped convolution's group in units of one row per conv block).
* :func:`convert` — exact conversion: zero the masked rows, fold BN and compactor into the producer, then drop
  the masked channels with the engine (``pruning.apply``), which also slices every follower (consumers'
  input channels, depthwise convs and their norms). The result is the engine's standard GraphModule.
* :func:`search` and :class:`ResRepSearcher` — the training loop and the ``resrep`` registry entry.

Adopted behaviour (deviations from the reference code): ε in the lasso denominator; conversion by mask with
masked rows zeroed explicitly (not by a norm threshold); the engine's cost model; per-group minimum widths from
the search space; compactors on single-producer groups only. For a group whose channels pass through
depthwise convs or further norms (MobileNetV2's expansion groups), a masked channel is also *cut* (zeroed)
after those followers, during training and in the reference output: otherwise the followers' BN bias would
leak a constant through a channel that the pruned network no longer has.

Options beyond the reference (both off in the ``paper`` preset): ``lasso_kept`` gives the kept rows their own
lasso strength, and ``weights="dense"`` (the ``cpu`` preset) returns the final widths cut from the dense model
instead of the trained network. At CPU budgets ResRep's *allocation* is good but its trained weights are not:
with the same 1-epoch fine-tune, ResNet-20 at 50 % MACs reaches 84.1–84.7 % with the trained weights and
88.0–88.1 % with the same widths cut from the dense weights; ResNet-56, 79.6 % vs 91.6 % (uniform widths 86.4 %
and 91.5 %).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoprune.errors import ConfigError
from autoprune.evaluate import cycle_batches
from autoprune.types import Candidate, CostReport
from autoprune.utils import progress

from .base import SEARCHERS
from .dmcp import DifferentiableSearcher, channel_dim, legal_widths_of, prunable_groups

if TYPE_CHECKING:
    from autoprune.graph import GroupSet

Batch = tuple[Tensor, Tensor]
CostFn = Callable[[Mapping[str, int]], float]


# ----------------------------------------------------------------------------------------------------------
# Compactor sites
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompactorSite:
    """Where one compactor sits and what it controls.

    Attributes:
        group_id: Engine group id.
        size: Channels of the group (compactor rows).
        producer: The group's single producer (Conv with ``groups=1`` or Linear).
        norm: The BatchNorm directly after the producer (the compactor follows it), or ``None``.
        cuts: ``(module, channel offset)`` of the group's other depthwise/norm members, whose output channels
            are zeroed for masked rows.
        blocks: The group's ``divisor`` (it feeds a grouped convolution): masks drop rows in equal numbers
            from each of that many consecutive blocks (see :func:`select_masks`).
    """

    group_id: str
    size: int
    producer: str
    norm: str | None
    cuts: tuple[tuple[str, int], ...] = ()
    blocks: int = 1


def _direct_user(gm: torch.fx.GraphModule, producer: str) -> str | None:
    """The module that alone consumes ``producer``'s output, if any."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == producer:
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module":
                return str(users[0].target)
            return None
    return None


def _foldable_norm(m: nn.Module) -> bool:
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats
            and m.running_mean is not None)


def find_sites(model: nn.Module, groups: GroupSet, legal: Mapping[str, Sequence[int]] | None = None, *,
               include_depthwise: bool = True) -> tuple[list[CompactorSite], dict[str, str]]:
    """Compactor sites of ``model`` and the reason each other prunable group has none.

    Args:
        model: The model (module names as in ``groups``).
        groups: Its engine ``GroupSet``.
        legal: Legal widths per group; groups with a single legal width get no compactor.
        include_depthwise: Also place compactors on groups whose channels pass through depthwise convs or
            further norms (their masked channels are cut after those members).
    """
    modules = dict(model.named_modules())
    gm = groups.graph_module  # the analysis' trace (module names as in ``model``)
    sites: list[CompactorSite] = []
    skipped: dict[str, str] = {}
    for g in prunable_groups(groups):
        if legal is not None and len(legal.get(g.id, ())) < 2:
            skipped[g.id] = "a single legal width"
            continue
        members = list(g.members)
        producers = [m for m in members if m.role == "out"]
        if len(producers) != 1:
            skipped[g.id] = f"{len(producers)} producers (residual/multi-producer groups get no compactor)"
            continue
        prod = producers[0]
        pm = modules.get(prod.module)
        if not (isinstance(pm, nn.Linear) or (isinstance(pm, nn.Conv1d | nn.Conv2d | nn.Conv3d) and pm.groups == 1)):
            skipped[g.id] = f"producer {prod.module} ({type(pm).__name__}) cannot absorb a compactor"
            continue
        norms = {m.module for m in members if m.role == "norm"}
        user = _direct_user(gm, prod.module)
        norm = user if user in norms else None
        if norm is not None and not _foldable_norm(modules[norm]):
            skipped[g.id] = f"norm {norm} ({type(modules[norm]).__name__}) cannot be folded"
            continue
        cuts = tuple((m.module, m.offset) for m in members if m.role in ("dw", "norm") and m.module != norm)
        if cuts and not include_depthwise:
            skipped[g.id] = "channels pass through depthwise convs or further norms (include_depthwise=False)"
            continue
        sites.append(CompactorSite(g.id, int(g.size), prod.module, norm, cuts, g.divisor))
    return sites, skipped


# ----------------------------------------------------------------------------------------------------------
# The compactor network
# ----------------------------------------------------------------------------------------------------------


def _apply_rows(q: Tensor, out: Tensor, dim: int) -> Tensor:
    if out.dim() == 4 and dim == 1:
        return F.conv2d(out, q[:, :, None, None])
    return torch.movedim(torch.movedim(out, dim, -1) @ q.t(), -1, dim)


class CompactorNet(nn.Module):
    """A deep copy of a model with identity-initialised compactors after its sites and per-row masks.

    ``zero_masked`` (default False, the training forward) selects whether masked compactor rows are zeroed
    in the forward pass; the cut members are always zeroed for masked channels. The copy keeps the module
    names and state-dict keys of the original; compactors and masks live beside it.

    Args:
        model: The model (copied).
        sites: Compactor sites from :func:`find_sites`.
    """

    def __init__(self, model: nn.Module, sites: Sequence[CompactorSite]) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        self.sites = list(sites)
        self.compactors = nn.ParameterList([nn.Parameter(torch.eye(s.size)) for s in self.sites])
        for i, s in enumerate(self.sites):
            self.register_buffer(f"mask_{i}", torch.ones(s.size))
        self.zero_masked = False
        self._handles: list[Any] = []
        self._attach()

    @property
    def masks(self) -> list[Tensor]:
        """One 0/1 vector per site (1 = kept)."""
        return [getattr(self, f"mask_{i}") for i in range(len(self.sites))]

    def set_masks(self, masks: Sequence[Tensor]) -> None:
        """Replace every site's mask."""
        for i, m in enumerate(masks):
            getattr(self, f"mask_{i}").copy_(m.to(getattr(self, f"mask_{i}")))

    def _attach(self) -> None:
        modules = dict(self.model.named_modules())
        cut_points: dict[str, list[tuple[int, int]]] = {}
        for i, s in enumerate(self.sites):
            where = s.norm or s.producer
            self._handles.append(modules[where].register_forward_hook(self._compactor_hook(i)))
            for name, offset in s.cuts:
                cut_points.setdefault(name, []).append((i, offset))
        for name, pts in cut_points.items():
            self._handles.append(modules[name].register_forward_hook(self._cut_hook(pts)))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _compactor_hook(self, i: int) -> Callable[..., Tensor]:
        def hook(module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
            q = self.compactors[i]
            if self.zero_masked:
                q = q * self.masks[i][:, None]
            return _apply_rows(q, output, channel_dim(module, output))

        return hook

    def _cut_hook(self, pts: list[tuple[int, int]]) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, _inputs: Any, output: Tensor) -> Tensor | None:
            dim = channel_dim(module, output)
            full = output.new_ones(output.shape[dim])
            for i, offset in pts:
                m = self.masks[i]
                full[offset:offset + m.numel()] = m
            if bool((full == 1).all()):
                return None
            shape = [1] * output.dim()
            shape[dim] = -1
            return output * full.view(shape)

        return hook

    def forward(self, x: Tensor) -> Tensor:
        """Run the model with its compactors."""
        return self.model(x)

    def row_norms(self) -> list[Tensor]:
        """‖Q_i‖₂ of every row of every compactor."""
        return [q.detach().norm(dim=1) for q in self.compactors]

    def widths(self) -> dict[str, int]:
        """Kept channels per site group under the current masks."""
        return {s.group_id: int(m.sum()) for s, m in zip(self.sites, self.masks)}

    def export_model(self) -> nn.Module:
        """A hook-free deep copy of the wrapped model (compactors not applied)."""
        self._detach()
        try:
            return copy.deepcopy(self.model)
        finally:
            self._attach()


# ----------------------------------------------------------------------------------------------------------
# Gradient resetting and mask selection
# ----------------------------------------------------------------------------------------------------------


def reset_gradients(compactors: Sequence[Tensor], masks: Sequence[Tensor], lam: float, eps: float = 1e-8,
                    lam_kept: float | None = None) -> None:
    """ResRep's gradient resetting, in place on ``Q.grad`` (call after ``backward()``).

    ``G(Q_i) = m_i·∂L/∂Q_i + λ_i·Q_i / max(‖Q_i‖₂, ε)``: masked rows keep only the group-lasso term (their task
    gradient is dropped even if it is not finite); a zero row gets a zero lasso term instead of NaN. The
    reference uses one λ for every row; ``lam_kept`` gives the kept rows (m_i = 1) their own strength.

    Args:
        compactors: Compactor matrices (D×D parameters).
        masks: 0/1 row masks (1 = kept).
        lam: Lasso strength λ (of every row, or of the masked rows when ``lam_kept`` is set).
        eps: Floor of the row norm.
        lam_kept: Lasso strength of the kept rows (default: ``lam``, the reference).
    """
    for q, m in zip(compactors, masks):
        task = q.grad if q.grad is not None else torch.zeros_like(q)
        keep = (m > 0).to(q.device)[:, None]
        task = torch.where(keep, task, torch.zeros_like(task))
        w = q.detach()
        lasso = w / w.norm(dim=1, keepdim=True).clamp_min(eps)
        kept_lam = lam if lam_kept is None else lam_kept
        q.grad = task + torch.where(keep, kept_lam * lasso, lam * lasso)


def _snap_up(legal: Sequence[int], w: int) -> int:
    for v in legal:
        if v >= w:
            return v
    return legal[-1]


def _units(norms: Tensor, blocks: int) -> list[tuple[float, list[int]]]:
    """The rows a mask update can drop together: single rows, or for a site over ``blocks`` conv blocks the
    k-th smallest row of every block (scored by their mean norm), so every block keeps as many rows."""
    if blocks <= 1:
        return [(float(v), [r]) for r, v in enumerate(norms.tolist())]
    per = norms.reshape(blocks, -1)
    order = torch.argsort(per, dim=1, stable=True) + torch.arange(blocks)[:, None] * per.shape[1]
    return [(float(norms[order[:, k]].mean()), order[:, k].tolist()) for k in range(per.shape[1])]


def select_masks(
    row_norms: Sequence[Tensor],
    group_ids: Sequence[str],
    legal: Mapping[str, Sequence[int]],
    cost_fn: CostFn,
    target: float,
    *,
    current: Sequence[Tensor] | None = None,
    step_cap: int | None = 4,
    blocks: Sequence[int] | None = None,
) -> list[Tensor]:
    """The global mask update of §6.1.

    All rows of all compactors are ranked by norm (ascending; ties by site then row). Starting from full
    widths, each visited row lowers its group's width by one (groups at their minimum legal width are
    skipped) until ``cost_fn(widths) ≤ target`` or the cap is reached: if the current masks miss the target
    the walk may visit at most ``(number masked now) + step_cap`` rows, otherwise it is unlimited. Widths are
    priced rounded *up* to legal widths, and each group finally masks exactly ``size − width`` of its visited
    rows (the smallest), so the widths of the result are legal. A site over ``d > 1`` conv blocks (a grouped
    convolution's group) is walked in units of ``d`` rows, the k-th smallest of every block, ranked by their
    mean norm; a unit may overshoot the cap by up to ``d − 1`` rows.

    Args:
        row_norms: ``‖Q_i‖`` per site.
        group_ids: Group of each site.
        legal: Legal widths per group (ascending).
        cost_fn: Widths of ``group_ids`` → cost (other groups at full width).
        target: Cost target (absolute).
        current: The masks in force (default: none masked).
        step_cap: Rows added per update while the target is missed (``None``: unlimited).
        blocks: Conv blocks per site (the group's ``divisor``; default 1 each).

    Returns:
        The new 0/1 masks, one per site.
    """
    sizes = [int(n.numel()) for n in row_norms]
    per_site = list(blocks) if blocks is not None else [1] * len(sizes)
    order = {g: sorted(int(w) for w in legal[g]) for g in group_ids}
    now = current if current is not None else [torch.ones(s) for s in sizes]
    now_widths = {g: _snap_up(order[g], int(m.sum())) for g, m in zip(group_ids, now)}
    masked_now = sum(s - int(m.sum()) for s, m in zip(sizes, now))
    cap = math.inf if (cost_fn(now_widths) <= target or step_cap is None) else masked_now + step_cap
    ranking = sorted((v, i, unit) for i, n in enumerate(row_norms) for v, unit in _units(n, per_site[i]))
    widths = {g: sizes[i] for i, g in enumerate(group_ids)}
    visited: list[list[int]] = [[] for _ in sizes]
    steps = 0
    cost = cost_fn(widths)
    for _, i, unit in ranking:
        if cost <= target or steps >= cap:
            break
        g = group_ids[i]
        if sizes[i] - len(visited[i]) - len(unit) < order[g][0]:
            continue
        visited[i].extend(unit)
        steps += len(unit)
        widths[g] = _snap_up(order[g], sizes[i] - len(visited[i]))
        cost = cost_fn(widths)
    masks = []
    for i, g in enumerate(group_ids):
        m = torch.ones(sizes[i])
        drop = visited[i][: sizes[i] - widths[g]]
        if drop:
            m[torch.tensor(drop, dtype=torch.long)] = 0.0
        masks.append(m)
    return masks


# ----------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def fold_compactor(producer: nn.Module, norm: nn.Module | None, q: Tensor) -> None:
    """Fold ``norm`` (BatchNorm, eval statistics) and the compactor ``q`` into ``producer``, in place.

    Without a norm: ``W ← QW``, ``b ← Qb``. With a norm: ``K′ = diag(s)·W`` with ``s = γ/√(σ² + ε)`` and
    ``W ← QK′`` (producer bias, if any, set to 0); the norm is rewritten so that in eval mode it adds exactly
    the constant ``b″ = Q(s⊙(b − μ) + β)``, while its running statistics become the mean and (independent-
    channel) variance of the new producer output — so a later fine-tune in train mode starts close to the
    folded function.
    """
    w = producer.weight.detach().to(torch.float64)
    shape = w.shape
    flat = w if isinstance(producer, nn.Linear) else w.reshape(shape[0], -1)
    q64 = q.detach().to(torch.float64)
    b = (producer.bias.detach().to(torch.float64) if producer.bias is not None
         else torch.zeros(shape[0], dtype=torch.float64))
    if norm is None:
        producer.weight.copy_((q64 @ flat).reshape(shape))
        if producer.bias is not None:
            producer.bias.copy_(q64 @ b)
        return
    eps = float(norm.eps)
    gamma = norm.weight.detach().to(torch.float64)
    beta = norm.bias.detach().to(torch.float64)
    mu = norm.running_mean.detach().to(torch.float64)
    var = norm.running_var.detach().to(torch.float64)
    s = gamma / torch.sqrt(var + eps)
    producer.weight.copy_((q64 @ (s[:, None] * flat)).reshape(shape))
    if producer.bias is not None:
        producer.bias.zero_()
    const = q64 @ (s * (b - mu) + beta)
    new_mean = q64 @ (s * (mu - b))
    new_var = (q64 * q64) @ (s * s * var)
    norm.running_mean.copy_(new_mean)
    norm.running_var.copy_(new_var)
    norm.weight.copy_(torch.sqrt(new_var + eps))
    norm.bias.copy_(const + new_mean)


def convert(net: CompactorNet, groups: GroupSet) -> tuple[nn.Module, dict[str, int]]:
    """Exact conversion of a compactor network to a physically smaller one.

    Masked compactor rows are zeroed, BN and compactor are folded into each site's producer (so the masked
    channels are exactly zero after the norm), and the engine drops the masked channels of every group member
    (producer rows, norm entries, depthwise filters, consumers' input columns). In eval mode the result equals
    ``net`` with ``zero_masked=True``.

    Returns:
        The pruned module (the engine's GraphModule, original state-dict keys) and the width per site group.
    """
    from autoprune import pruning

    folded = net.export_model()
    modules = dict(folded.named_modules())
    keep: dict[str, list[int]] = {}
    for site, q, m in zip(net.sites, net.compactors, net.masks):
        qz = q.detach().cpu() * m.detach().cpu()[:, None]
        fold_compactor(modules[site.producer], modules[site.norm] if site.norm else None, qz)
        keep[site.group_id] = [int(i) for i in torch.nonzero(m > 0).flatten().tolist()]
    widths = {g: len(idx) for g, idx in keep.items()}
    full = groups.full_widths()
    plan = pruning.PruningPlan(widths={**full, **widths},
                               keep={g: tuple(keep.get(g, range(size))) for g, size in full.items()},
                               importance="resrep_mask", groups=groups)
    return pruning.apply(folded, plan), widths


# ----------------------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------------------


#: Where the output network's weights come from (:attr:`ResRepConfig.weights`).
RESREP_WEIGHTS = ("trained", "dense")


@dataclass(frozen=True)
class ResRepConfig:
    """Hyper-parameters of ResRep (defaults: a CPU-sized schedule; see ``hyperparams/resrep.yaml``).

    Attributes:
        macs_target: Target MACs, a fraction of the dense model's (≤ 1) or an absolute count (> 1).
        iters: Training iterations (reference: 480 epochs on CIFAR-10).
        warmup_iters: Iterations before the first mask update (reference: 5 epochs).
        mask_interval: Iterations between mask updates (reference: 200).
        step_cap: Rows added per mask update while the target is missed (reference: 4).
        step_cap_auto: Raise the cap (never lower it) so that the target is reachable by the middle of the
            mask-update phase: ``ceil(rows_needed / (updates / 2))``, with ``rows_needed`` the rows a uniform
            keep ratio would mask. Short schedules on deep models otherwise miss the target until the final
            forced update, which prunes the missing rows abruptly, untrained (ResNet-56 at 50 % MACs with the
            CPU schedule: 77.2 % after a 1-epoch fine-tune without it, 79.6 % with it — both far below uniform
            L1 pruning's 91.5 %, see ``results/benchmarks/search_quality.md``).
        lasso: λ of the group lasso (reference 1e-4 over ~375k iterations; larger for short schedules, see the
            yaml).
        lasso_kept: λ of the kept (unmasked) rows; None: ``lasso`` on every row (reference). A strong lasso on
            every row over a short schedule shrinks the kept rows too and leaves weights that fine-tune worse.
        weights: ``"trained"`` — the converted network with ResRep's trained weights (reference);
            ``"dense"`` — ResRep as an architecture search: the final widths are cut from the dense model by
            ``importance`` (magnitude) and BN-recalibrated. On CPU schedules the trained weights are the weak
            part: ResNet-20 at 50 % MACs, same 1-epoch fine-tune, 84.7 % trained vs 88.0 % dense with the
            same widths (uniform widths: 86.4 %; ``results/benchmarks/search_quality.md``).
        importance: Channel criterion of ``weights="dense"`` (the engine's: ``"l1"``, ``"l2"``, ...).
        eps: Floor of the row norm in the lasso term.
        lr: Initial learning rate, cosine to 0 per iteration (reference 0.01).
        momentum: Momentum of the non-compactor parameters.
        compactor_momentum: Momentum of the compactors (reference 0.99, no weight decay).
        weight_decay: Weight decay of conv/linear weights (0 on BN and biases).
        bias_lr_factor: Learning-rate factor of biases (reference 2).
        include_depthwise: Compactors also on groups with depthwise/norm followers (cut when masked).
        force_target: After training, run one uncapped mask update if the target is still missed, so the
            converted network always meets it.
        bn_batches: Training batches for a BN recalibration after conversion (0: keep the folded statistics;
            the conversion is exact either way, recalibration repairs the statistics downstream of masked rows
            that had not fully decayed).
        log_every: Record the training state every this many iterations.
        seed: Random seed.
    """

    macs_target: float = 0.5
    iters: int = 600
    warmup_iters: int = 100
    mask_interval: int = 10
    step_cap: int = 8
    step_cap_auto: bool = True
    lasso: float = 1e-2
    lasso_kept: float | None = None
    weights: str = "dense"
    importance: str = "l1"
    eps: float = 1e-8
    lr: float = 0.01
    momentum: float = 0.9
    compactor_momentum: float = 0.99
    weight_decay: float = 1e-4
    bias_lr_factor: float = 2.0
    include_depthwise: bool = True
    force_target: bool = True
    bn_batches: int = 20
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.macs_target <= 0:
            raise ConfigError(f"resrep: macs_target must be > 0, got {self.macs_target}",
                              hint="a fraction of the dense MACs such as 0.5, or an absolute count")
        if self.iters < 1 or self.mask_interval < 1 or self.warmup_iters < 0 or self.log_every < 1:
            raise ConfigError("resrep: iters and mask_interval must be ≥ 1 and warmup_iters ≥ 0")
        if self.step_cap < 1 or self.lasso < 0 or self.eps <= 0 or self.bn_batches < 0:
            raise ConfigError("resrep: step_cap must be ≥ 1, lasso ≥ 0, eps > 0 and bn_batches ≥ 0")
        if self.lasso_kept is not None and self.lasso_kept < 0:
            raise ConfigError(f"resrep: lasso_kept must be ≥ 0 or null, got {self.lasso_kept}",
                              hint="null applies `lasso` to every row (reference)")
        if self.weights not in RESREP_WEIGHTS:
            raise ConfigError(f"resrep: unknown weights {self.weights!r}", hint=f"choices: {', '.join(RESREP_WEIGHTS)}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ResRepConfig:
        """Build from a plain mapping (YAML), rejecting unknown keys with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"resrep: unknown setting(s) {', '.join(unknown)}",
                              hint=f"known: {', '.join(sorted(known))}")
        return cls(**dict(values))


@dataclass
class ResRepResult:
    """What a ResRep run produces.

    Attributes:
        candidate: Widths of the converted network (site groups; other groups at full width).
        module: The converted, physically smaller network with its trained weights (``weights="dense"``: cut
            from the dense model).
        cost: Closed-form cost of ``candidate``.
        dense_cost: Closed-form cost of the dense model.
        target_macs: The absolute MACs target.
        accuracy: Validation top-1 of ``module`` (None without a validation loader).
        loss: Validation cross-entropy.
        seconds: Wall-clock seconds.
        samples: Training samples seen.
        forced: True if the final uncapped mask update was needed to meet the target.
        step_cap: The cap on rows added per mask update that was used (after ``step_cap_auto``).
        sites: Group ids that carried compactors.
        skipped: Prunable groups without a compactor, with the reason.
        history: Periodic records.
        weights: Where ``module``'s weights come from (``trained`` or ``dense``).
    """

    candidate: Candidate
    module: nn.Module
    cost: CostReport
    dense_cost: CostReport
    target_macs: float
    accuracy: float | None = None
    loss: float | None = None
    seconds: float = 0.0
    samples: int = 0
    forced: bool = False
    step_cap: int = 0
    sites: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    weights: str = "trained"


def rows_to_target(sizes: Mapping[str, int], legal: Mapping[str, Sequence[int]], cost_fn: CostFn,
                   target: float) -> int:
    """Rows a uniform keep ratio over ``sizes``' groups masks to meet ``target`` (an estimate of the work).

    The keep ratio is the largest (bisection) whose legal widths (rounded up) cost at most ``target``; if even
    the smallest legal widths miss it, all the rows down to those widths are counted.
    """
    order = {g: sorted(int(w) for w in legal[g]) for g in sizes}

    def widths_at(ratio: float) -> dict[str, int]:
        return {g: _snap_up(order[g], max(1, math.ceil(ratio * n))) for g, n in sizes.items()}

    best = widths_at(0.0)
    if cost_fn(best) <= target:
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            w = widths_at(mid)
            if cost_fn(w) <= target:
                lo, best = mid, w
            else:
                hi = mid
    return sum(n - best[g] for g, n in sizes.items())


def effective_step_cap(cfg: ResRepConfig, rows_needed: int) -> int:
    """``cfg.step_cap``, raised (``step_cap_auto``) so ``rows_needed`` fit in half of the mask updates."""
    if not cfg.step_cap_auto:
        return cfg.step_cap
    updates = max(1, math.ceil(max(0, cfg.iters - cfg.warmup_iters) / cfg.mask_interval))
    return max(cfg.step_cap, math.ceil(rows_needed / max(1, updates // 2)))


def _optimizer(net: CompactorNet, cfg: ResRepConfig) -> torch.optim.SGD:
    decay, no_decay, biases = [], [], []
    for name, p in net.model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("bias"):
            biases.append(p)
        elif p.dim() > 1:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": list(net.compactors.parameters()), "momentum": cfg.compactor_momentum, "weight_decay": 0.0,
         "lr_factor": 1.0},
        {"params": decay, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "lr_factor": 1.0},
        {"params": no_decay, "momentum": cfg.momentum, "weight_decay": 0.0, "lr_factor": 1.0},
        {"params": biases, "momentum": cfg.momentum, "weight_decay": 0.0, "lr_factor": cfg.bias_lr_factor},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr)


def search(
    model: nn.Module,
    groups: GroupSet,
    train_loader: Iterable[Batch],
    config: ResRepConfig | None = None,
    *,
    legal: Mapping[str, Sequence[int]] | None = None,
    val_loader: Iterable[Batch] | None = None,
    device: torch.device | str | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> ResRepResult:
    """Train ``model`` with compactors, masks and gradient resetting, then convert it exactly.

    Args:
        model: The dense (pretrained) model; never modified.
        groups: Its engine ``GroupSet``.
        train_loader: Training batches (re-iterated as needed).
        config: Hyper-parameters.
        legal: Legal widths per group (default: every width from the group's minimum to its size).
        val_loader: Validation batches for the final accuracy (optional).
        device: Device (default CPU).
        on_log: Called with each history record.
    """
    from autoprune import cost as cost_model
    from autoprune.evaluate import recalibrate_bn, validate

    cfg = config or ResRepConfig()
    start = time.perf_counter()
    device = torch.device(device or "cpu")
    torch.manual_seed(cfg.seed)
    legal = dict(legal) if legal is not None else legal_widths_of(None, groups)
    sites, skipped = find_sites(model, groups, legal, include_depthwise=cfg.include_depthwise)
    if not sites:
        raise ConfigError("resrep: no prunable single-producer channel group can carry a compactor",
                          hint="; ".join(f"{g}: {r}" for g, r in list(skipped.items())[:5]) or "no prunable groups")
    ids = [s.group_id for s in sites]
    blocks = [s.blocks for s in sites]
    dense = cost_model.closed_form(groups, {})
    target = cfg.macs_target * float(dense.macs) if cfg.macs_target <= 1.0 else cfg.macs_target

    def cost_fn(widths: Mapping[str, int]) -> float:
        return float(cost_model.closed_form(groups, dict(widths)).macs)

    step_cap = effective_step_cap(cfg, rows_to_target({s.group_id: s.size for s in sites}, legal, cost_fn, target))
    net = CompactorNet(model, sites).to(device)
    net.train()
    opt = _optimizer(net, cfg)
    batches = cycle_batches(train_loader)
    history: list[dict[str, float]] = []
    samples = 0
    for it in progress(range(cfg.iters), desc="resrep", total=cfg.iters):
        if it >= cfg.warmup_iters and (it - cfg.warmup_iters) % cfg.mask_interval == 0:
            net.set_masks(select_masks(net.row_norms(), ids, legal, cost_fn, target, blocks=blocks,
                                       current=[m.cpu() for m in net.masks], step_cap=step_cap))
        lr = 0.5 * cfg.lr * (1.0 + math.cos(math.pi * it / cfg.iters))
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_factor"]
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        reset_gradients(list(net.compactors), net.masks, cfg.lasso, cfg.eps, cfg.lasso_kept)
        opt.step()
        samples += int(x.shape[0])
        if it % cfg.log_every == 0 or it == cfg.iters - 1:
            widths = net.widths()
            record = {"iter": float(it), "lr": lr, "loss": float(loss.detach()), "masked_macs": cost_fn(widths),
                      "masked_rows": float(sum(s.size for s in sites) - sum(widths.values()))}
            history.append(record)
            if on_log is not None:
                on_log(record)

    forced = False
    if cost_fn(net.widths()) > target and cfg.force_target:
        net.set_masks(select_masks(net.row_norms(), ids, legal, cost_fn, target, blocks=blocks,
                                   current=[m.cpu() for m in net.masks], step_cap=None))
        forced = True
    net.eval()
    small, widths = convert(net.cpu(), groups)
    if cfg.weights == "dense":
        from autoprune import pruning

        small = pruning.apply(model, groups, widths, importance=cfg.importance).cpu()
    if cfg.bn_batches:
        samples += recalibrate_bn(small, train_loader, cfg.bn_batches)
    accuracy = loss_val = None
    if val_loader is not None:
        accuracy, loss_val = validate(small, val_loader)
    candidate = Candidate(widths=widths)
    return ResRepResult(candidate=candidate, module=small, cost=cost_model.closed_form(groups, dict(widths)),
                        dense_cost=dense, target_macs=target, accuracy=accuracy, loss=loss_val,
                        seconds=time.perf_counter() - start, samples=samples, forced=forced, step_cap=step_cap,
                        sites=ids,
                        skipped=skipped, history=history, weights=cfg.weights)


@SEARCHERS.register("resrep")
class ResRepSearcher(DifferentiableSearcher):
    """ResRep: compactors + gradient resetting + global masks; one converted, trained pruned network."""

    name = "resrep"
    config_cls = ResRepConfig
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "cpu": {},
        # Ding et al., CIFAR-10 ResNet-56 script (§6.2): 480 epochs, lr 0.01 cosine to 0, λ = 1e-4, masks every
        # 200 iterations after 5 warm-up epochs, 4 rows per update, minimum width 1 (from the search space).
        "paper": {"epochs": 480, "warmup_epochs": 5, "mask_interval": 200, "step_cap": 4, "step_cap_auto": False,
                  "lasso": 1e-4, "lasso_kept": None, "weights": "trained",
                  "lr": 0.01, "momentum": 0.9, "compactor_momentum": 0.99, "weight_decay": 1e-4,
                  "bias_lr_factor": 2.0},
    }

    def train(self) -> ResRepResult:
        """Run :func:`search` on the problem."""
        legal = legal_widths_of(self.problem.space, self.problem.groups, round_to=self.problem.round_to)
        return search(self.problem.model, self.problem.groups, self.train_loader, self.config,  # type: ignore[arg-type]
                      legal=legal, val_loader=self.val_loader, device=self.device)

    def _extra(self, outcome: Any) -> dict[str, Any]:
        return {"target_macs": float(outcome.target_macs), "forced_final_mask": bool(outcome.forced),
                "step_cap_used": int(outcome.step_cap),
                "compactor_groups": list(outcome.sites), "skipped_groups": dict(outcome.skipped)}
