"""DMCP — Differentiable Markov Channel Pruning (Guo et al., CVPR 2020) on the engine's channel groups.

This module owns the whole DMCP search (docs/ALGORITHMS.md §5):

* :class:`MarkovChain` — one chain per prunable channel group over ordered channel blocks
  (``states[0] = c_min < states[1] < … < states[K] = size``); ``p_k = σ(α_k)`` is the probability of keeping
  block k given block k−1, the marginal ``P_k = Π_{j≤k} p_j``; width moments, soft masks, direct sampling.
* :func:`expected_macs` — the engine's bilinear closed-form MACs ``Σ κ_ij w_i w_j + Σ λ_i w_i + c₀`` in
  expectation over independent chains (``E[w²] = Var + E[w]²`` where a term has one group on both sides);
  differentiable in the architecture parameters.
* :func:`budget_loss` — the log-L1 budget loss with its dead zone ``[0.95T, T)`` (§5.2).
* :class:`MaskedSupernet` — the full-width model with per-group channel masks applied by forward hooks
  after the producers' norms (prefix ordering): 0/1 masks for sampled widths, the marginals ``P_k`` when
  the architecture parameters are on.
* :func:`search` — sandwich-rule weight training (max with CE, min + random with KL to max), alternating
  architecture steps in the second half, final architecture from expected widths snapped to legal widths and
  fixed up against the MACs target (§5.5.5), slicing with the engine's ``prefix`` criterion and BN
  recalibration with a cumulative average.
* :class:`DMCPSearcher` — the ``dmcp`` entry of the searcher registry.

Deviations from the reference code (adopted behaviour, §5.5): sigmoid transitions only; each group samples its
own chain; BN recalibration uses ``momentum=None``; one chain per engine channel group; the expected
architecture is snapped to legal widths and checked against the target.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import random
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoprune.errors import ConfigError
from autoprune.evaluate import cycle_batches
from autoprune.problem import Problem
from autoprune.types import Candidate, CostReport, EvalResult
from autoprune.utils import progress

from .base import SEARCHERS, BudgetGuard, Searcher, load_hyperparams

log = logging.getLogger("autoprune.agents.dmcp")

if TYPE_CHECKING:
    from autoprune.evaluate import CandidateEvaluator
    from autoprune.graph import ChannelGroup, GroupSet, Member
    from autoprune.problem import SearchSpace

Batch = tuple[Tensor, Tensor]
CostFn = Callable[[Mapping[str, int]], float]

#: Roles of group members whose *output* carries the group's channels (masked by the supernet).
_OUTPUT_ROLES = ("out", "dw", "norm")


# ----------------------------------------------------------------------------------------------------------
# Engine helpers (channel axes, groups, legal widths)
# ----------------------------------------------------------------------------------------------------------


def channel_dim(module: nn.Module, output: Tensor) -> int:
    """The channel axis of ``module``'s output: last for Linear/LayerNorm, 1 for convolutions and BN."""
    if isinstance(module, nn.Linear | nn.LayerNorm) or output.dim() < 2:
        return output.dim() - 1
    return 1


def prunable_groups(groups: GroupSet) -> list[ChannelGroup]:
    """The prunable groups of an engine ``GroupSet`` in its order."""
    return list(groups.prunable())


def legal_widths_of(problem_space: SearchSpace | None, groups: GroupSet, min_ratio: float | None = None,
                    round_to: int = 1) -> dict[str, tuple[int, ...]]:
    """Legal widths per prunable group id.

    Args:
        problem_space: The search space: when it has groups, its widths (built with the space's ``round_to``
            and ``min_ratio`` by :func:`autoprune.search_spaces.build_space`) are the legal widths.
        groups: The engine's groups; without a space every prunable group gets
            :meth:`~autoprune.graph.ChannelGroup.legal_widths` ``(round_to)``.
        min_ratio: Widths below ``min_ratio · size`` are dropped (the smallest width at or above the bound is
            kept); default: the space's ``min_ratio``, or none.
        round_to: Width multiple used without a space.
    """
    if problem_space is not None and problem_space.groups:
        legal = {gc.group_id: tuple(sorted(gc.widths)) for gc in problem_space.groups}
        if min_ratio is None:
            min_ratio = float(problem_space.min_ratio)
    else:
        legal = {g.id: tuple(g.legal_widths(round_to)) for g in groups.prunable()}
    if min_ratio:
        sizes = {gid: ws[-1] for gid, ws in legal.items()}
        legal = {gid: tuple(w for w in ws if w >= min_ratio * sizes[gid] - 1e-9) or (ws[-1],)
                 for gid, ws in legal.items()}
    return legal


# ----------------------------------------------------------------------------------------------------------
# Markov chains
# ----------------------------------------------------------------------------------------------------------


def _nearest(values: Sequence[int], x: float) -> int:
    return min(values, key=lambda v: (abs(v - x), -v))


@dataclass(frozen=True)
class MarkovChain:
    """A Markov chain over the ordered channel blocks of one group.

    Attributes:
        group_id: Engine group id.
        size: Channels of the group at full width.
        states: Reachable widths in ascending order; ``states[0]`` is ``c_min`` (always kept) and
            ``states[-1] == size``. Block k (1-based) holds channels ``states[k-1] … states[k]-1``.
        conv_blocks: The group's ``divisor`` (grouped convs): its channels form that many equal consecutive
            conv blocks, every state is a multiple of it, and a width ``w`` keeps the first ``w / conv_blocks``
            channels of *each* conv block (the engine's ``prefix`` criterion); 1 = one prefix of the group.
    """

    group_id: str
    size: int
    states: tuple[int, ...]
    conv_blocks: int = 1

    @classmethod
    def build(cls, group_id: str, size: int, legal: Sequence[int] | None = None,
              grid: tuple[float, float, float] = (0.1, 1.0, 0.1), conv_blocks: int = 1) -> MarkovChain:
        """The chain of §5.1, generalised to legal widths.

        ``g = ⌊offset·C/max⌋`` (at least 1), ``K = ⌊(max − min)/offset + 10⁻⁴⌋`` and states ``C − (K−k)·g``
        for ``k = 0..K``; each state is snapped to the nearest legal width (ties upwards), states below the
        smallest legal width are raised to it, and duplicates merge. With all widths legal this is exactly the
        reference grid (C = 64 → g = 6, c_min = 10).

        Args:
            group_id: Group id.
            size: Group size C.
            legal: Legal widths (default: 1..C); with ``conv_blocks > 1`` only their multiples of it count.
            grid: ``(min, max, offset)`` of the width grid as fractions of the full width.
            conv_blocks: Equal conv blocks of the group (its ``divisor``; must divide ``size``).
        """
        lo, hi, step = (float(v) for v in grid)
        if not (0 < lo <= hi and step > 0):
            raise ConfigError(f"invalid DMCP width grid {grid}", hint="use (min, max, offset) with 0 < min <= max")
        d = int(conv_blocks)
        if d < 1 or size % d:
            raise ConfigError(f"group {group_id}: {size} channels do not form {conv_blocks} equal conv blocks",
                              hint="pass the group's divisor as conv_blocks")
        widths = sorted({int(w) for w in (legal or range(1, size + 1)) if 1 <= int(w) <= size and int(w) % d == 0}
                        | {size})
        g = max(1, int(step * size / hi))
        k = int((hi - lo) / step + 1e-4)
        raw = [size - (k - i) * g for i in range(k + 1)]
        states = sorted({max(widths[0], _nearest(widths, r)) if r >= widths[0] else widths[0] for r in raw})
        return cls(group_id, int(size), tuple(states), d)

    @property
    def num_blocks(self) -> int:
        """K, the number of optional blocks."""
        return len(self.states) - 1

    def marginals(self, alpha: Tensor) -> Tensor:
        """``P_k = Π_{j≤k} σ(α_j)`` for k = 1..K (shape ``(K,)``)."""
        return torch.cumprod(torch.sigmoid(alpha), dim=0)

    def distribution(self, alpha: Tensor) -> Tensor:
        """``P(c = states[k])`` for k = 0..K."""
        p = self.marginals(alpha)
        upper = torch.cat([p.new_ones(1), p])
        lower = torch.cat([p, p.new_zeros(1)])
        return upper - lower

    def moments(self, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """``(E[c], E[c²])`` of the width under the chain (exact, differentiable in ``alpha``)."""
        if self.num_blocks == 0:
            c = alpha.new_tensor(float(self.states[0]))
            return c, c * c
        probs = self.distribution(alpha)
        s = torch.tensor(self.states, dtype=probs.dtype, device=probs.device)
        return (probs * s).sum(), (probs * s * s).sum()

    def _block_soft_mask(self, alpha: Tensor) -> Tensor:
        """Keep probability of the positions of one conv block (the whole group when ``conv_blocks == 1``)."""
        d = self.conv_blocks
        counts = torch.tensor([self.states[0] // d, *((b - a) // d for a, b in zip(self.states, self.states[1:]))],
                              device=alpha.device)
        values = torch.cat([alpha.new_ones(1), self.marginals(alpha)]) if self.num_blocks else alpha.new_ones(1)
        return torch.repeat_interleave(values, counts)

    def soft_mask(self, alpha: Tensor) -> Tensor:
        """Per-channel keep probability: 1 for the first ``c_min`` channels, ``P_k`` for block k (per conv
        block: the first ``c_min / conv_blocks`` channels of each, and so on)."""
        return self._block_soft_mask(alpha).repeat(self.conv_blocks)

    def hard_mask(self, width: int, device: torch.device | None = None) -> Tensor:
        """0/1 mask keeping the first ``width`` channels (prefix ordering; per conv block ``width / conv_blocks``)."""
        block = self.size // self.conv_blocks
        return (torch.arange(self.size, device=device) % block < int(width) // self.conv_blocks).float()

    def sample(self, alpha: Tensor, rng: random.Random) -> int:
        """Direct sampling (§5.3): start at ``c_min``; keep adding blocks with probability ``p_k`` until a miss."""
        p = torch.sigmoid(alpha.detach()).tolist()
        width = self.states[0]
        for k, pk in enumerate(p, start=1):
            if rng.random() >= pk:
                break
            width = self.states[k]
        return width

    def uniform(self, rng: random.Random) -> int:
        """A grid width drawn uniformly (the sandwich rule's random sub-networks)."""
        return rng.choice(self.states)

    def keep_probability(self, alpha: Tensor, channel: int) -> float:
        """Marginal probability that the width exceeds ``channel`` (0-based), i.e. that the ``channel + 1``-th
        channel of the prefix order is kept (with conv blocks: position ``channel // conv_blocks`` of each)."""
        if channel < 0:
            return 1.0
        if channel >= self.size:
            return 0.0
        return float(self._block_soft_mask(alpha.detach())[channel // self.conv_blocks])


# ----------------------------------------------------------------------------------------------------------
# Cost model
# ----------------------------------------------------------------------------------------------------------


def expected_macs(groups: GroupSet, chains: Sequence[MarkovChain], alphas: Sequence[Tensor]) -> Tensor:
    """``E[MACs]`` of independent chains via the engine's bilinear cost form (differentiable in ``alphas``).

    Every conv/linear term is ``κ_ij·w_i·w_j``; for ``i ≠ j`` its expectation is ``κ_ij·E[w_i]·E[w_j]`` and
    for a term with the same group on both sides ``κ_ii·E[w_i²]`` (``= Var + E[w]²``), which the engine's
    :func:`autoprune.cost.expected_cost` receives as second moments. Groups without a chain are at full width.
    """
    from autoprune import cost as cost_model

    means: dict[str, Tensor] = {}
    seconds: dict[str, Tensor] = {}
    for chain, alpha in zip(chains, alphas):
        m, s = chain.moments(alpha.to(torch.float64))
        means[chain.group_id] = m
        seconds[chain.group_id] = s
    return cost_model.expected_cost(groups, means, seconds)


def macs_of(groups: GroupSet) -> CostFn:
    """Closed-form MACs of integer widths (groups not given at full width)."""
    from autoprune import cost as cost_model

    def fn(widths: Mapping[str, int]) -> float:
        return float(cost_model.closed_form(groups, dict(widths)).macs)

    return fn


def budget_loss(expected: Tensor, target: float, *, far: float = 200.0) -> Tensor:
    """DMCP's log-L1 budget loss with a dead zone (§5.2).

    ``r = 0.1`` if ``|E − T| > far`` else 1; ``log(r·|E − T|)`` below ``0.95T``, 0 in ``[0.95T, T)``,
    ``log(r·|E − 0.95T|)`` at or above ``T``. Units are the caller's (the reference uses millions of MACs).

    Args:
        expected: Expected cost (0-d tensor, differentiable).
        target: Target cost T.
        far: Distance beyond which the log argument is scaled by 0.1.
    """
    e = float(expected.detach())
    if 0.95 * target <= e < target:
        return expected * 0.0
    anchor = target if e < 0.95 * target else 0.95 * target
    r = 0.1 if abs(e - target) > far else 1.0
    return torch.log(r * (expected - anchor).abs())


# ----------------------------------------------------------------------------------------------------------
# Masked supernet
# ----------------------------------------------------------------------------------------------------------


def _mask_points(groups: GroupSet, group_ids: Sequence[str]) -> dict[str, list[tuple[str, int, int]]]:
    """Module name → [(group id, channel offset, stride)] where the group's channels are masked.

    Every ``out``, ``dw`` and ``norm`` member's output is masked, except a producer (or depthwise conv) whose
    only user is a norm of the same group — the mask then sits after that norm (before the activation), as in
    the reference. Zeroing at these points is exactly pruning (the engine's equivalence criterion).
    """
    wanted = set(group_ids)
    members = {g.id: list(g.members) for g in groups.prunable() if g.id in wanted}
    skip = _producers_followed_by_norm(groups, members)
    points: dict[str, list[tuple[str, int, int]]] = {}
    for gid in group_ids:
        for m in members[gid]:
            if m.role in _OUTPUT_ROLES and (m.module, gid) not in skip:
                points.setdefault(m.module, []).append((gid, m.offset, m.stride))
    return points


def _producers_followed_by_norm(groups: GroupSet, members: Mapping[str, list[Member]]) -> set[tuple[str, str]]:
    gm = groups.graph_module
    skip: set[tuple[str, str]] = set()
    for gid, mems in members.items():
        norms = {m.module for m in mems if m.role == "norm"}
        producers = {m.module for m in mems if m.role in ("out", "dw")}
        for node in gm.graph.nodes:
            if node.op != "call_module" or node.target not in producers:
                continue
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module" and users[0].target in norms:
                skip.add((str(node.target), gid))
    return skip


class MaskedSupernet(nn.Module):
    """A full-width model whose channel groups can be narrowed by masks (weight sharing, prefix ordering).

    Modes: ``max`` (no masks), ``widths`` (0/1 masks keeping the first w channels of each group) and
    ``alpha`` (each channel scaled by its marginal keep probability). The wrapped model is a deep copy; its
    module names and state-dict keys are those of the original.

    Args:
        model: The dense model (copied).
        groups: The engine ``GroupSet`` of ``model``.
        chains: One :class:`MarkovChain` per searched group.
        alpha_init: Initial value of every architecture parameter (σ(0) = 0.5, the reference).
    """

    def __init__(self, model: nn.Module, groups: GroupSet, chains: Sequence[MarkovChain],
                 alpha_init: float = 0.0) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        self.chains = list(chains)
        self.index = {c.group_id: i for i, c in enumerate(self.chains)}
        self.alphas = nn.ParameterList(
            [nn.Parameter(torch.full((c.num_blocks,), float(alpha_init))) for c in self.chains])
        self._points = _mask_points(groups, [c.group_id for c in self.chains])
        self._mode = "max"
        self._widths: dict[str, int] = {}
        self._masks: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attach()

    # -- hooks ---------------------------------------------------------------------------------------
    def _attach(self) -> None:
        modules = dict(self.model.named_modules())
        for name, pts in self._points.items():
            if name not in modules:
                raise ConfigError(f"group member {name!r} is not a module of the model",
                                  hint="analyse the same model that is searched")
            self._handles.append(modules[name].register_forward_hook(self._make_hook(pts)))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, pts: list[tuple[str, int, int]]) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, _inputs: Any, output: Any) -> Tensor | None:
            if self._mode == "max" or not isinstance(output, Tensor):
                return None
            dim = channel_dim(module, output)
            channels = output.shape[dim]
            pieces: list[Tensor] = []
            pos = 0
            for gid, offset, stride in sorted(pts, key=lambda p: p[1]):
                mask = self._masks.get(gid)
                if mask is None:
                    continue
                if stride > 1:  # a strided member (channel shuffle, depth multiplier): s positions per channel
                    mask = mask.repeat_interleave(stride)
                if offset > pos:
                    pieces.append(output.new_ones(offset - pos))
                pieces.append(mask.to(output.dtype))
                pos = offset + mask.numel()
            if not pieces:
                return None
            if pos < channels:
                pieces.append(output.new_ones(channels - pos))
            full = torch.cat(pieces)
            shape = [1] * output.dim()
            shape[dim] = channels
            return output * full.view(shape)

        return hook

    # -- modes ---------------------------------------------------------------------------------------
    def use_max(self) -> None:
        """Full width, no masks."""
        self._mode = "max"

    def use_widths(self, widths: Mapping[str, int]) -> None:
        """Keep the first ``widths[g]`` channels of each group (missing groups stay full)."""
        self._mode = "widths"
        self._widths = {g: int(w) for g, w in widths.items()}

    def use_alpha(self) -> None:
        """Scale every channel by its marginal keep probability (architecture forward)."""
        self._mode = "alpha"

    def forward(self, x: Tensor) -> Tensor:
        """Run the wrapped model under the current mode."""
        if self._mode == "widths":
            self._masks = {c.group_id: c.hard_mask(self._widths[c.group_id], x.device)
                           for c in self.chains if c.group_id in self._widths}
        elif self._mode == "alpha":
            self._masks = {c.group_id: c.soft_mask(a) for c, a in zip(self.chains, self.alphas)}
        else:
            self._masks = {}
        try:
            return self.model(x)
        finally:
            self._masks = {}

    # -- architecture ----------------------------------------------------------------------------------
    def alpha(self, group_id: str) -> Tensor:
        """The architecture parameters of one group."""
        return self.alphas[self.index[group_id]]

    def moments(self) -> tuple[Tensor, Tensor]:
        """``(E[w], E[w²])`` per chain, in chain order (differentiable)."""
        pairs = [c.moments(a) for c, a in zip(self.chains, self.alphas)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def expected_widths(self) -> dict[str, float]:
        """Expected width per group."""
        with torch.no_grad():
            mean, _ = self.moments()
        return {c.group_id: float(v) for c, v in zip(self.chains, mean)}

    def min_widths(self) -> dict[str, int]:
        """``c_min`` per group."""
        return {c.group_id: c.states[0] for c in self.chains}

    def uniform_widths(self, rng: random.Random) -> dict[str, int]:
        """Uniform per-group grid widths."""
        return {c.group_id: c.uniform(rng) for c in self.chains}

    def markov_widths(self, rng: random.Random) -> dict[str, int]:
        """Direct samples from every group's own chain."""
        return {c.group_id: c.sample(a, rng) for c, a in zip(self.chains, self.alphas)}

    def weight_parameters(self) -> list[nn.Parameter]:
        """The wrapped model's parameters (not the architecture parameters)."""
        return list(self.model.parameters())

    def export_model(self) -> nn.Module:
        """A hook-free deep copy of the wrapped (trained) model."""
        self._detach()
        try:
            return copy.deepcopy(self.model)
        finally:
            self._attach()


# ----------------------------------------------------------------------------------------------------------
# Final architecture
# ----------------------------------------------------------------------------------------------------------


def legalize(
    expected: Mapping[str, float],
    legal: Mapping[str, Sequence[int]],
    cost_fn: CostFn,
    target: float,
    *,
    keep_prob: Callable[[str, int], float] | None = None,
    tolerance: float = 0.02,
) -> dict[str, int]:
    """Snap expected widths to legal widths and fix them up greedily against the cost target (§5.5.5).

    ``w = round(E[c] − 10⁻⁴)`` is snapped to the nearest legal width. While the cost exceeds ``target``, the
    group whose last kept channel is least likely to be kept (``keep_prob``; ties: the larger group) steps
    down one legal width; then, while the cost is below ``(1 − tolerance)·target``, the group whose next
    channel is most likely to be kept steps up one legal width if that stays within the target.

    Args:
        expected: Expected width per group.
        legal: Legal widths per group (ascending).
        cost_fn: Widths → cost.
        target: Cost target (absolute).
        keep_prob: ``(group, channel index) → probability`` used to order the fix-up steps (default: the
            relative position ``1 − index/size``).
        tolerance: Accepted shortfall below the target, as a fraction of it.

    Raises:
        ConfigError: If even the smallest legal widths exceed the target.
    """
    order = {g: sorted(int(w) for w in legal[g]) for g in expected}
    widths = {g: _nearest(order[g], round(expected[g] - 1e-4)) for g in expected}
    prob = keep_prob or (lambda g, c: 1.0 - c / max(order[g][-1], 1))

    def step(g: str, direction: int) -> int | None:
        i = order[g].index(widths[g]) + direction
        return order[g][i] if 0 <= i < len(order[g]) else None

    cost = cost_fn(widths)
    while cost > target:
        options = [g for g in widths if step(g, -1) is not None]
        if not options:
            floor = cost_fn({g: order[g][0] for g in widths})
            raise ConfigError(f"the MACs target {target:.0f} is below the smallest legal network ({floor:.0f})",
                              hint="raise the MACs target or lower search_space.min_ratio")
        g = min(options, key=lambda g: (prob(g, widths[g] - 1), -order[g][-1]))
        widths[g] = step(g, -1)  # type: ignore[assignment]
        cost = cost_fn(widths)
    while cost < (1.0 - tolerance) * target:
        best: tuple[float, str, int, float] | None = None
        for g in widths:
            up = step(g, +1)
            if up is None:
                continue
            c = cost_fn({**widths, g: up})
            if c <= target and (best is None or prob(g, widths[g]) > best[0]):
                best = (prob(g, widths[g]), g, up, c)
        if best is None:
            break
        _, g, up, cost = best
        widths[g] = up
    return widths


def sort_channels(model: nn.Module, groups: GroupSet, group_ids: Sequence[str], importance: str = "l1") -> nn.Module:
    """A copy of ``model`` whose channels in each of ``group_ids`` are reordered by descending importance.

    The engine's :func:`autoprune.pruning.permute` applies the order consistently to every tensor of the group,
    so the function is unchanged; afterwards prefix sub-networks start from the most important channels. A
    group of a grouped convolution (``divisor > 1``) is sorted within each of its conv blocks. DMCP's reference
    trains its supernet from scratch, where channel order is arbitrary; from pretrained weights the first
    channels would otherwise be a random choice.

    Returns:
        The engine's ``GraphModule`` with the same module names and state-dict keys as ``model``.
    """
    from autoprune import pruning
    from autoprune.importance import group_scores

    scores = group_scores(model, groups, list(group_ids), importance)
    perms = {}
    for gid, s in scores.items():
        d = groups[gid].divisor
        order = torch.argsort(-s.reshape(d, -1), dim=1, stable=True)
        perms[gid] = (order + torch.arange(d)[:, None] * order.shape[1]).flatten()
    return pruning.permute(model, groups, perms)


# ----------------------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DMCPConfig:
    """Hyper-parameters of a DMCP search (defaults: a CPU-sized schedule; see ``hyperparams/dmcp.yaml``).

    Attributes:
        macs_target: Target MACs, a fraction of the dense model's (≤ 1) or an absolute count (> 1).
        iters: Total iterations (weight steps); the reference is 40 epochs.
        warmup_fraction: Fraction of ``iters`` that trains weights only (reference 0.5: 20 of 40 epochs).
        lr: Initial weight learning rate (cosine to ``lr_min``); reference 0.5 → 0.08 on ImageNet.
        lr_min: Final weight learning rate.
        lr_warmup_iters: Linear warm-up of the weight learning rate from ``lr_min`` (MobileNetV2 recipe).
        momentum: Weight SGD momentum (Nesterov).
        weight_decay: Weight decay (not on BN parameters and biases).
        arch_lr: Architecture learning rate (flat, then cosine to ``arch_lr_min`` over the search phase).
        arch_lr_min: Final architecture learning rate.
        arch_momentum: Architecture SGD momentum (Nesterov, no weight decay).
        alpha_init: Initial α of every transition (0 → σ = 0.5, reference; large → start at full width).
        budget_weight: λ of the budget loss.
        budget_unit: Units of the budget loss (1e6: millions of MACs, as the reference).
        budget_far: |E − T| (in ``budget_unit``) beyond which the log argument is scaled by 0.1.
        grid: ``(min, max, offset)`` of the width grid.
        num_random: Random sub-networks per sandwich step.
        p_uniform_decay: Decay of the probability of uniform (rather than Markov) random sub-networks
            (reference 0.9999, which stays ≈ 1 in a short run).
        p_uniform_every: Apply the decay every this many search iterations.
        kd_temperature: Temperature of the in-place distillation.
        label_smoothing: Label smoothing of the max-width cross-entropy.
        tolerance: Accepted shortfall of the final MACs below the target (fraction of the target).
        bn_batches: Training batches for the final BN recalibration (cumulative average).
        channel_order: Importance criterion used to sort each group's channels before the search
            (:func:`sort_channels`; ``"none"`` keeps the model's order, as the reference's from-scratch supernet).
        log_every: Record the search state every this many iterations.
        seed: Random seed (sampling and initialisation).
    """

    macs_target: float = 0.5
    iters: int = 300
    warmup_fraction: float = 0.5
    lr: float = 0.02
    lr_min: float = 0.002
    lr_warmup_iters: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    arch_lr: float = 0.5
    arch_lr_min: float = 0.1
    arch_momentum: float = 0.9
    alpha_init: float = 0.0
    budget_weight: float = 0.1
    budget_unit: float = 1e6
    budget_far: float = 200.0
    grid: tuple[float, float, float] = (0.1, 1.0, 0.1)
    num_random: int = 2
    p_uniform_decay: float = 0.98
    p_uniform_every: int = 10
    kd_temperature: float = 1.0
    label_smoothing: float = 0.0
    tolerance: float = 0.02
    bn_batches: int = 20
    channel_order: str = "l1"
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.macs_target <= 0:
            raise ConfigError(f"dmcp: macs_target must be > 0, got {self.macs_target}",
                              hint="a fraction of the dense MACs such as 0.5, or an absolute count")
        if self.iters < 2:
            raise ConfigError(f"dmcp: iters must be at least 2, got {self.iters}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"dmcp: warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if len(self.grid) != 3:
            raise ConfigError(f"dmcp: grid must be [min, max, offset], got {self.grid}")
        if self.num_random < 0 or self.bn_batches < 1 or self.p_uniform_every < 1 or self.log_every < 1:
            raise ConfigError("dmcp: num_random must be ≥ 0 and bn_batches, p_uniform_every, log_every ≥ 1")
        if self.kd_temperature <= 0 or self.budget_unit <= 0:
            raise ConfigError("dmcp: kd_temperature and budget_unit must be > 0")
        from autoprune.importance import IMPORTANCE

        if self.channel_order != "none" and self.channel_order not in IMPORTANCE:
            raise ConfigError(f"dmcp: unknown channel_order {self.channel_order!r}",
                              hint=f"'none' or an importance criterion: {', '.join(IMPORTANCE.names())}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DMCPConfig:
        """Build from a plain mapping (YAML), rejecting unknown keys with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"dmcp: unknown setting(s) {', '.join(unknown)}",
                              hint=f"known: {', '.join(sorted(known))}")
        data = dict(values)
        if "grid" in data:
            data["grid"] = tuple(float(v) for v in data["grid"])
        return cls(**data)


@dataclass
class DMCPResult:
    """What a DMCP search produces.

    Attributes:
        candidate: The final architecture (legal widths per searched group).
        expected_widths: E[c] per group at the end of the search.
        module: The supernet's weights sliced to ``candidate`` (engine ``prefix`` criterion), BN recalibrated.
        cost: Closed-form cost of ``candidate``.
        dense_cost: Closed-form cost of the dense model.
        target_macs: The absolute MACs target.
        accuracy: Validation top-1 after BN recalibration (None without a validation loader).
        loss: Validation cross-entropy (None without a validation loader).
        seconds: Wall-clock time of the search.
        samples: Training samples seen (all forward passes on training data).
        history: Periodic records (iteration, losses, expected MACs, phase).
    """

    candidate: Candidate
    expected_widths: dict[str, float]
    module: nn.Module
    cost: CostReport
    dense_cost: CostReport
    target_macs: float
    accuracy: float | None = None
    loss: float | None = None
    seconds: float = 0.0
    samples: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _cosine(step: int, total: int, start: float, end: float) -> float:
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def _split_decay(params: Iterable[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return decay, no_decay


def _kd(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1),
                    reduction="batchmean") * (t * t)


def make_chains(groups: GroupSet, legal: Mapping[str, Sequence[int]],
                grid: tuple[float, float, float] = (0.1, 1.0, 0.1)) -> list[MarkovChain]:
    """One chain per prunable group that has more than one legal width, in the engine's order.

    A group that feeds or leaves a grouped convolution (``divisor > 1``) gets a chain over its conv blocks: each
    width keeps the same prefix of every block, as the engine's ``prefix`` criterion cuts it.
    """
    chains = []
    for g in groups.prunable():
        if g.id in legal and len(legal[g.id]) > 1:
            chain = MarkovChain.build(g.id, int(g.size), legal[g.id], grid, g.divisor)
            if chain.num_blocks:
                chains.append(chain)
    return chains


def _resolve_target(macs_target: float, dense_macs: float) -> float:
    return macs_target * dense_macs if macs_target <= 1.0 else macs_target


def _weight_step(net: MaskedSupernet, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, cfg: DMCPConfig,
                 rng: random.Random, *, p_uniform: float | None) -> dict[str, float]:
    """Sandwich rule with the architecture off: max width with CE, min width and random sub-networks with KL
    to the max output (in-place distillation); gradients accumulated, one optimizer step. Each random
    sub-network has uniform grid widths with probability ``p_uniform`` (always when None, the weight-only
    phase), else it is a direct Markov sample."""
    opt.zero_grad(set_to_none=True)
    net.use_max()
    out = net(x)
    loss_max = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
    loss_max.backward()
    teacher = out.detach()
    kd_total = 0.0
    for k in range(1 + cfg.num_random):
        if k == 0:
            widths = net.min_widths()
        elif p_uniform is not None and rng.random() >= p_uniform:
            widths = net.markov_widths(rng)
        else:
            widths = net.uniform_widths(rng)
        net.use_widths(widths)
        kd = _kd(net(x), teacher, cfg.kd_temperature)
        kd.backward()
        kd_total += float(kd.detach())
    opt.step()
    net.use_max()
    return {"loss_max": float(loss_max.detach()), "kd": kd_total}


def _arch_step(net: MaskedSupernet, opt: torch.optim.Optimizer, groups: GroupSet, x: Tensor, y: Tensor,
               cfg: DMCPConfig, target: float) -> dict[str, float]:
    """Max width with the marginals on, the same mini-batch, task + budget loss; steps only α."""
    net.zero_grad(set_to_none=True)
    net.use_alpha()
    ce = F.cross_entropy(net(x), y)
    expected = expected_macs(groups, net.chains, list(net.alphas))
    lb = budget_loss(expected / cfg.budget_unit, target / cfg.budget_unit, far=cfg.budget_far)
    (ce + cfg.budget_weight * lb).backward()
    opt.step()
    net.zero_grad(set_to_none=True)
    net.use_max()
    return {"arch_ce": float(ce.detach()), "budget_loss": float(lb.detach()),
            "expected_macs": float(expected.detach())}


def search(
    model: nn.Module,
    groups: GroupSet,
    train_loader: Iterable[Batch],
    config: DMCPConfig | None = None,
    *,
    legal: Mapping[str, Sequence[int]] | None = None,
    val_loader: Iterable[Batch] | None = None,
    device: torch.device | str | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> DMCPResult:
    """Run DMCP on ``model`` and return the final architecture with its sliced, recalibrated weights.

    Args:
        model: The dense (preferably pretrained) model; never modified.
        groups: Its engine ``GroupSet``.
        train_loader: Training batches ``(x, y)`` (re-iterated as needed).
        config: Hyper-parameters.
        legal: Legal widths per group (default: :func:`legal_widths_of` without a space, i.e. every width the
            group allows).
        val_loader: Validation batches for the final accuracy (optional).
        device: Device to train on (default: CPU).
        on_log: Called with each history record.
    """
    from autoprune import cost as cost_model
    from autoprune import pruning
    from autoprune.evaluate import recalibrate_bn, validate

    cfg = config or DMCPConfig()
    start = time.perf_counter()
    device = torch.device(device or "cpu")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    legal = dict(legal) if legal is not None else legal_widths_of(None, groups)
    chains = make_chains(groups, legal, cfg.grid)
    if not chains:
        raise ConfigError("dmcp: the model has no prunable channel group with more than one legal width",
                          hint="check the search space (round_to, min_ratio) and groups.describe()")
    ids = [c.group_id for c in chains]
    cost = macs_of(groups)
    dense = cost_model.closed_form(groups, {})
    target = _resolve_target(cfg.macs_target, float(dense.macs))

    if cfg.channel_order != "none":
        model = sort_channels(model, groups, ids, cfg.channel_order)
    net = MaskedSupernet(model, groups, chains, cfg.alpha_init).to(device)
    net.train()
    decay, no_decay = _split_decay(net.weight_parameters())
    w_opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    a_opt = torch.optim.SGD(net.alphas.parameters(), lr=cfg.arch_lr, momentum=cfg.arch_momentum,
                            nesterov=cfg.arch_momentum > 0, weight_decay=0.0)
    search_start = int(cfg.iters * cfg.warmup_fraction)
    p_uniform = 1.0
    samples = 0
    history: list[dict[str, float]] = []
    batches = cycle_batches(train_loader)
    for it in progress(range(cfg.iters), desc="dmcp", total=cfg.iters):
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        searching = it >= search_start
        lr = _cosine(it, cfg.iters, cfg.lr, cfg.lr_min)
        if it < cfg.lr_warmup_iters:
            lr = cfg.lr_min + (cfg.lr - cfg.lr_min) * (it + 1) / cfg.lr_warmup_iters
        for group in w_opt.param_groups:
            group["lr"] = lr

        record = {"iter": float(it), "lr": lr,
                  **_weight_step(net, w_opt, x, y, cfg, rng, p_uniform=p_uniform if searching else None)}
        samples += int(x.shape[0]) * (2 + cfg.num_random)
        if searching:
            s = it - search_start
            if (s + 1) % cfg.p_uniform_every == 0:
                p_uniform *= cfg.p_uniform_decay
            a_lr = _cosine(s, cfg.iters - search_start, cfg.arch_lr, cfg.arch_lr_min)
            for group in a_opt.param_groups:
                group["lr"] = a_lr
            record.update(_arch_step(net, a_opt, groups, x, y, cfg, target), arch_lr=a_lr, p_uniform=p_uniform)
            samples += int(x.shape[0])
        if it % cfg.log_every == 0 or it == cfg.iters - 1:
            history.append(record)
            if on_log is not None:
                on_log(record)

    expected_widths = net.expected_widths()
    by_chain = {c.group_id: (c, net.alpha(c.group_id)) for c in chains}

    def keep_prob(gid: str, channel: int) -> float:
        chain, alpha = by_chain[gid]
        return chain.keep_probability(alpha, channel)

    widths = legalize(expected_widths, {g: legal[g] for g in ids}, cost, target,
                      keep_prob=keep_prob, tolerance=cfg.tolerance)
    candidate = Candidate(widths=widths)
    trained = net.export_model()
    small = pruning.apply(trained, groups, dict(widths), importance="prefix")
    samples += recalibrate_bn(small, train_loader, cfg.bn_batches)
    accuracy = loss = None
    if val_loader is not None:
        accuracy, loss = validate(small, val_loader)
    return DMCPResult(candidate=candidate, expected_widths=expected_widths, module=small,
                      cost=cost_model.closed_form(groups, dict(widths)), dense_cost=dense, target_macs=target,
                      accuracy=accuracy, loss=loss, seconds=time.perf_counter() - start, samples=samples,
                      history=history)


# ----------------------------------------------------------------------------------------------------------
# Searcher (shared plumbing for the differentiable searchers; ResRep subclasses it)
# ----------------------------------------------------------------------------------------------------------


def _from_evaluator(evaluator: CandidateEvaluator | None, attr: str) -> Any:
    """``evaluator.<attr>``, looking through wrappers that hold the evaluator as ``inner``.

    The campaign's :class:`~autoprune.campaign.ReproducibleEvaluator` is such a wrapper. The attribute is
    optional (:class:`~autoprune.evaluate.CandidateEvaluator` promises only ``evaluate``), so its value is
    whatever the evaluator holds (a loader, a device), ``None`` when no evaluator in the chain has it.
    """
    seen = 0
    while evaluator is not None and seen < 8:
        value = getattr(evaluator, attr, None)
        if value is not None:
            return value
        evaluator = getattr(evaluator, "inner", None)
        seen += 1
    return None


def _loader_length(loader: Iterable[Batch]) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("an epoch-based schedule needs a loader with len()",
                          hint="give `iters` instead of `epochs`, or pass a sized loader") from None


class DifferentiableSearcher(Searcher):
    """A searcher that trains once and emits one architecture with its own weights (one trial).

    Subclasses set :attr:`name`, :attr:`config_cls`, :attr:`presets` and implement :meth:`train`. The trial
    records the final widths, their closed-form cost and the searcher's own validation accuracy (its trained
    weights, BN recalibrated); the trained, physically smaller network is saved with
    :func:`autoprune.serialize.save_module` under the store's artifact directory (``extra["artifact"]``), so
    that ``export`` can start from it. The MACs target is the budget's ``macs`` limit when set; with a latency
    budget (and no MACs limit), the MACs of the uniform candidate that meets it by the latency prediction; else
    the ``macs_target`` hyper-parameter.

    Args:
        problem: The compression problem (model, groups, search space, evaluator).
        train_loader: Training batches (default: the problem evaluator's training loader).
        val_loader: Validation batches (default: the problem evaluator's validation loader).
        device: Training device (default: the evaluator's device, else CPU).
        preset: ``"cpu"`` (the yaml defaults) or ``"paper"`` (the authors' schedule; epoch-based).
        **kwargs: :class:`~autoprune.agents.base.Searcher` arguments and hyper-parameters (defaults from
            ``agents/hyperparams/<name>.yaml``).
    """

    config_cls: ClassVar[type]
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __init__(self, problem: Problem, *, train_loader: Iterable[Batch] | None = None,
                 val_loader: Iterable[Batch] | None = None, device: torch.device | str | None = None,
                 preset: str | None = None, **kwargs: Any) -> None:
        base_names = set(inspect.signature(Searcher.__init__).parameters) - {"self", "problem"}
        base = {k: v for k, v in kwargs.items() if k in base_names}
        user = {k: v for k, v in kwargs.items() if k not in base_names}
        super().__init__(problem, **base)
        defaults = load_hyperparams(self.name)
        preset = preset or defaults.pop("preset", None) or "cpu"
        defaults.pop("preset", None)
        if preset not in self.presets:
            raise ConfigError(f"{self.name}: unknown preset {preset!r}", hint=f"choices: {', '.join(self.presets)}")
        options = {**defaults, **self.presets[preset], **user}
        if self.budget.macs is not None:
            options["macs_target"] = float(self.budget.macs)
        elif self.budget.latency_ms is not None:
            options["macs_target"] = self._macs_for_latency()
        self.train_loader = train_loader if train_loader is not None else _from_evaluator(problem.evaluator,
                                                                                          "train_loader")
        self.val_loader = val_loader if val_loader is not None else _from_evaluator(problem.evaluator, "val_loader")
        if self.train_loader is None or self.val_loader is None:
            raise ConfigError(f"searcher {self.name!r} trains and needs training and validation loaders",
                              hint="pass train_loader=/val_loader=, or use an evaluator that has them")
        options = self._epochs_to_iters(options)
        self.config = self.config_cls.from_mapping(options)
        self.device = torch.device(device) if device is not None else (
            _from_evaluator(problem.evaluator, "device") or torch.device("cpu"))
        self.outcome: Any = None

    def _macs_for_latency(self) -> float:
        """The MACs target for a latency budget (these searchers train against MACs): the MACs of the uniform
        candidate that meets the whole budget by the problem's latency prediction (the ``uniform`` baseline)."""
        guard = BudgetGuard(self.problem, self.budget)
        cand, _ = guard.shrink([1.0] * len(self.problem.space.groups))
        macs = float(self.problem.cost(cand).macs)
        log.info("%s: latency budget %.3g ms -> MACs target %s (the uniform candidate within the budget)",
                 self.name, guard.limits["latency_ms"], f"{macs:,.0f}")
        return macs

    def _epochs_to_iters(self, options: dict[str, Any]) -> dict[str, Any]:
        """Turn ``epochs``-style keys (``epochs``, ``warmup_epochs``) into iteration counts."""
        out = dict(options)
        for key, target in (("epochs", "iters"), ("warmup_epochs", "warmup_iters")):
            value = out.pop(key, None)
            if value is not None:
                out[target] = max(1, round(float(value) * _loader_length(self.train_loader)))  # type: ignore[arg-type]
        return out

    @abstractmethod
    def train(self) -> Any:
        """Run the algorithm; return its result (``candidate``, ``module``, ``accuracy``, ``loss``, ...)."""

    def _run(self) -> None:
        if self.n_done >= 1 or self.should_stop():
            return
        from autoprune import serialize

        started = time.perf_counter()
        trial = self.new_trial()
        outcome = self.train()
        self.outcome = outcome
        artifact = self.store.artifact_dir(self.name, self.seed) / "model"
        example = self.problem.example_input
        serialize.save_module(outcome.module, artifact, example,
                              metadata={"searcher": self.name, "widths": dict(outcome.candidate.widths)})
        weights = getattr(outcome, "weights", "trained")
        source = f"{self.name}:{'own' if weights == 'trained' else weights}_weights"
        result = EvalResult(float(outcome.accuracy), float(outcome.loss), outcome.seconds, outcome.samples,
                            source, {"key": outcome.candidate.key()})
        self.evaluate_and_record(trial, outcome.candidate, started=started, result=result,
                                 reason=f"final architecture with {weights} weights",
                                 extra={"artifact": str(artifact), **self._extra(outcome)})

    def _extra(self, outcome: Any) -> dict[str, Any]:
        return {"target_macs": float(outcome.target_macs)}


@SEARCHERS.register("dmcp")
class DMCPSearcher(DifferentiableSearcher):
    """DMCP: Markov-chain widths trained with a sandwich-rule supernet; one architecture plus its weights."""

    name = "dmcp"
    config_cls = DMCPConfig
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "cpu": {},
        # Guo et al. (ResNet recipe, §5.4): 40 epochs (20 weights only + 20 alternating), weights SGD Nesterov
        # lr 0.5 → 0.08 cosine, wd 1e-4; α SGD lr 0.5 → 0.1; λ = 0.1; p decays 0.9999 every 10 steps.
        "paper": {"epochs": 40, "warmup_fraction": 0.5, "lr": 0.5, "lr_min": 0.08, "weight_decay": 1e-4,
                  "arch_lr": 0.5, "arch_lr_min": 0.1, "budget_weight": 0.1, "p_uniform_decay": 0.9999,
                  "p_uniform_every": 10, "bn_batches": 5},
    }

    def train(self) -> DMCPResult:
        """Run :func:`search` on the problem."""
        legal = legal_widths_of(self.problem.space, self.problem.groups, round_to=self.problem.round_to)
        return search(self.problem.model, self.problem.groups, self.train_loader, self.config,  # type: ignore[arg-type]
                      legal=legal, val_loader=self.val_loader, device=self.device)

    def _extra(self, outcome: Any) -> dict[str, Any]:
        return {"target_macs": float(outcome.target_macs),
                "expected_widths": {g: round(v, 3) for g, v in outcome.expected_widths.items()}}
