"""State embedding of the layer-wise compression environment (AMC §1.1 and HAQ §2.1 of ALGORITHMS.md).

The environment takes one step per channel group (pruning) and/or per conv/linear layer (quantization).
Each observation is a fixed-length ``float32`` vector in ``[0, 1]``: *static* features describing the
current group or layer, min–max normalised per column over all steps of the model
(``x̃ = (x − min)/(max − min)``, 0 when ``max = min``), followed by *dynamic* budget features that are already
fractions in ``[0, 1]`` (clipped).

Pruning block (one row per prunable group, described by its first producer layer plus group totals):

=============  ======================================================================================
``index``       step index t within the pruning phase
``is_linear``   first producer is a Linear layer (1) or a convolution (0)
``c_in``        input channels of the first producer
``c_out``       original width of the group (channels)
``stride``      stride of the first producer (0 for Linear, as in AMC)
``kernel``      kernel size of the first producer (1 for Linear)
``weights``     parameters that depend on the group's width (the engine's group total; else the sum over
                the conv/linear layers touching the group)
``fmap``        output feature-map size h·w of the first producer (tokens for Linear)
``macs``        dense MACs that depend on the group's width (engine group total, or as for ``weights``)
``depthwise``   the group contains a depthwise convolution (1) or not (0)
``reduced``     dynamic: share of the dense budget metric removed so far (later groups at full width)
``rest``        dynamic: share of the dense budget metric the groups after t can still remove
``prev_ratio``  dynamic: realised keep ratio of the previous group (1 at t = 0)
``target``      dynamic: the budget limit as a fraction of the dense model (1 without a budget)
=============  ======================================================================================

The *budget metric* is the first limit set among MACs, params and size, MACs otherwise.

Quantization block (one row per quantizable layer, HAQ's features, one step per layer):

=================  ==================================================================================
``q_index``         step index l within the quantization phase
``q_is_linear``     Linear (1) or convolution (0)
``q_depthwise``     depthwise convolution (1) or not (0)
``q_c_in``          input channels (dense)
``q_c_out``         output channels (dense)
``q_stride``        stride (0 for Linear)
``q_kernel``        kernel size (1 for Linear)
``q_weights``       number of weights
``q_in_hw``         input feature-map size h·w (tokens for Linear)
``q_macs``          dense MACs of the layer
``q_reduced``       dynamic: share of the storage size (at the chosen widths) removed by the bits so far
``q_rest``          dynamic: share of that size held by the layers after l
``q_prev_bits``     dynamic: previous layer's weight bits / 8 (1 at l = 0)
``q_target``        dynamic: the size limit as a fraction of the dense size (1 without one)
=================  ==================================================================================

Joint mode concatenates both blocks and a ``phase`` flag (0 while pruning, 1 while quantizing); the block of
the inactive phase is zero. Static statistics come from one forward pass of the dense model on the problem's
example input (forward hooks on conv/linear modules), computed lazily by the environment at its first
``reset``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from autoprune.graph import ChannelGroup, GroupSet
    from autoprune.problem import ProblemLike

PRUNE_STATIC: tuple[str, ...] = ("index", "is_linear", "c_in", "c_out", "stride", "kernel", "weights", "fmap",
                                 "macs", "depthwise")
PRUNE_DYNAMIC: tuple[str, ...] = ("reduced", "rest", "prev_ratio", "target")
QUANT_STATIC: tuple[str, ...] = ("q_index", "q_is_linear", "q_depthwise", "q_c_in", "q_c_out", "q_stride",
                                 "q_kernel", "q_weights", "q_in_hw", "q_macs")
QUANT_DYNAMIC: tuple[str, ...] = ("q_reduced", "q_rest", "q_prev_bits", "q_target")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerStats:
    """Shape and cost of one conv/linear layer of the dense model (measured on the example input).

    Attributes:
        name: Module name.
        kind: ``"conv"`` or ``"linear"``.
        c_in: Input channels / features.
        c_out: Output channels / features.
        kernel: Largest kernel extent (1 for Linear).
        stride: Largest stride (0 for Linear, AMC's convention).
        groups: Convolution groups (1 for Linear).
        in_hw: Input spatial size (product of spatial dims; tokens for Linear).
        out_hw: Output spatial size (tokens for Linear).
        macs: Multiply-accumulates for one sample.
        params: Parameters of the module (weight and bias).
    """

    name: str
    kind: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    groups: int
    in_hw: int
    out_hw: int
    macs: int
    params: int

    @property
    def depthwise(self) -> bool:
        """A convolution with ``groups == c_in == c_out > 1``."""
        return self.kind == "conv" and self.groups > 1 and self.groups == self.c_in == self.c_out


def _stats_of(name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerStats:
    params = sum(p.numel() for p in module.parameters(recurse=False))
    batch = max(int(x.shape[0]), 1) if x.dim() > 1 else 1
    if isinstance(module, _CONV):
        in_hw = math.prod(x.shape[2:]) if x.dim() > 2 else 1
        out_hw = math.prod(y.shape[2:]) if y.dim() > 2 else 1
        k = math.prod(module.kernel_size)
        macs = out_hw * k * (module.in_channels // module.groups) * module.out_channels
        return LayerStats(name, "conv", module.in_channels, module.out_channels, max(module.kernel_size),
                          max(module.stride), module.groups, int(in_hw), int(out_hw), int(macs), params)
    assert isinstance(module, nn.Linear)
    tokens = max(x.numel() // (batch * module.in_features), 1)
    return LayerStats(name, "linear", module.in_features, module.out_features, 1, 0, 1, tokens, tokens,
                      tokens * module.in_features * module.out_features, params)


def collect_layer_stats(model: nn.Module, example_input: torch.Tensor) -> dict[str, LayerStats]:
    """Run ``model`` once on ``example_input`` and describe every conv/linear layer, in execution order.

    The model's training flag is restored; no gradients are recorded. A module called twice is described by
    its first call.
    """
    stats: dict[str, LayerStats] = {}
    handles = []

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def _record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if name in stats or not args or not isinstance(args[0], torch.Tensor):
                return
            if isinstance(output, torch.Tensor):
                stats[name] = _stats_of(name, module, args[0], output)
        return _record

    for name, module in model.named_modules():
        if isinstance(module, (*_CONV, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return stats


def _group(groups: GroupSet, group_id: str) -> ChannelGroup | None:
    """The engine group ``group_id``, or ``None`` when the group set has no such group."""
    if group_id not in groups:
        return None
    return groups[group_id]


_STATS_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], dict[str, LayerStats]]] = (
    weakref.WeakKeyDictionary())


def cached_layer_stats(model: nn.Module, example_input: torch.Tensor) -> dict[str, LayerStats]:
    """:func:`collect_layer_stats`, remembered per model object and input shape (environments sharing a model
    run the forward pass once)."""
    shape = tuple(example_input.shape)
    hit = _STATS_CACHE.get(model)
    if hit is not None and hit[0] == shape:
        return hit[1]
    stats = collect_layer_stats(model, example_input)
    _STATS_CACHE[model] = (shape, stats)
    return stats


def group_members(groups: GroupSet, group_id: str) -> list[tuple[str, str]]:
    """``(module name, role)`` pairs of the engine group ``group_id``.

    Args:
        groups: The engine's group analysis.
        group_id: A group id; one the group set does not hold gives an empty list.
    """
    group = _group(groups, group_id)
    return [] if group is None else [(m.module, m.role) for m in group.members]


def group_static_rows(group_ids: Sequence[str], sizes: Sequence[int], groups: GroupSet,
                      stats: Mapping[str, LayerStats]) -> np.ndarray:
    """Raw (un-normalised) :data:`PRUNE_STATIC` rows, one per group.

    Args:
        group_ids: The search space's group ids, in step order.
        sizes: Their full widths.
        groups: The engine's group analysis (members, and the width-dependent params/MACs totals).
        stats: Per-layer statistics of the dense model (:func:`collect_layer_stats`).
    """
    rows = np.zeros((len(group_ids), len(PRUNE_STATIC)), dtype=np.float64)
    for t, (gid, size) in enumerate(zip(group_ids, sizes, strict=True)):
        members = group_members(groups, gid)
        producers = [n for n, role in members if role == "out" and n in stats]
        fallback = gid.split(":")[0]
        if not producers and fallback in stats:
            producers = [fallback]
        touching = list(dict.fromkeys([n for n, _ in members if n in stats] + producers))
        first = stats[producers[0]] if producers else None
        depthwise = any(role == "dw" for _, role in members) or any(stats[n].depthwise for n in touching)
        row = rows[t]
        row[0] = t
        row[3] = size
        engine = _group(groups, gid)
        engine_params, engine_macs = (engine.params, engine.macs) if engine is not None else (0, 0)
        row[6] = engine_params if engine_params else sum(stats[n].params for n in touching)
        row[8] = engine_macs if engine_macs else sum(stats[n].macs for n in touching)
        row[9] = float(depthwise)
        if first is not None:
            row[1] = float(first.kind == "linear")
            row[2] = first.c_in
            row[4] = first.stride
            row[5] = first.kernel
            row[7] = first.out_hw
    return rows


def layer_static_rows(layers: Sequence[str], stats: Mapping[str, LayerStats]) -> np.ndarray:
    """Raw (un-normalised) :data:`QUANT_STATIC` rows, one per layer (zeros for layers never executed)."""
    rows = np.zeros((len(layers), len(QUANT_STATIC)), dtype=np.float64)
    for i, name in enumerate(layers):
        rows[i, 0] = i
        s = stats.get(name)
        if s is None:
            continue
        rows[i, 1:] = (float(s.kind == "linear"), float(s.depthwise), s.c_in, s.c_out, s.stride, s.kernel,
                       s.params, s.in_hw, s.macs)
    return rows


def minmax_columns(rows: np.ndarray) -> np.ndarray:
    """Min–max normalise each column to [0, 1]; constant columns become 0."""
    if rows.size == 0:
        return rows.astype(np.float32)
    lo = rows.min(axis=0)
    span = rows.max(axis=0) - lo
    out = np.where(span > 0, (rows - lo) / np.where(span > 0, span, 1.0), 0.0)
    return out.astype(np.float32)


class StateEmbedding:
    """Builds observations for one problem and mode.

    Args:
        mode: ``"prune"``, ``"quantize"`` or ``"joint"``.
        group_rows: Raw :data:`PRUNE_STATIC` rows (one per group step).
        layer_rows: Raw :data:`QUANT_STATIC` rows (one per layer step).
    """

    def __init__(self, mode: str, group_rows: np.ndarray, layer_rows: np.ndarray) -> None:
        self.mode = mode
        self.group_static = minmax_columns(group_rows)
        self.layer_static = minmax_columns(layer_rows)

    @staticmethod
    def names(mode: str) -> tuple[str, ...]:
        """Feature names of ``mode``, in observation order."""
        prune = PRUNE_STATIC + PRUNE_DYNAMIC
        quant = QUANT_STATIC + QUANT_DYNAMIC
        if mode == "prune":
            return prune
        if mode == "quantize":
            return quant
        return (*prune, *quant, "phase")

    @classmethod
    def from_problem(cls, mode: str, problem: ProblemLike, group_ids: Sequence[str], sizes: Sequence[int],
                     layers: Sequence[str]) -> StateEmbedding:
        """Describe ``problem``'s groups and layers (one forward pass of its dense model)."""
        stats = cached_layer_stats(problem.model, problem.example_input)
        return cls(mode, group_static_rows(group_ids, sizes, problem.groups, stats),
                   layer_static_rows(layers, stats))

    def observation(self, phase: str, index: int | None, dynamic: Sequence[float]) -> np.ndarray:
        """The observation for step ``index`` of ``phase`` (``"prune"``/``"quantize"``).

        ``index=None`` gives the terminal observation (static block zero, dynamic block filled).
        """
        dyn = np.clip(np.asarray(dynamic, dtype=np.float32), 0.0, 1.0)
        static_table = self.group_static if phase == "prune" else self.layer_static
        n_static = len(PRUNE_STATIC) if phase == "prune" else len(QUANT_STATIC)
        static = np.zeros(n_static, np.float32) if index is None else static_table[index]
        block = np.concatenate([static, dyn]).astype(np.float32)
        if self.mode != "joint":
            return block
        zeros_p = np.zeros(len(PRUNE_STATIC) + len(PRUNE_DYNAMIC), np.float32)
        zeros_q = np.zeros(len(QUANT_STATIC) + len(QUANT_DYNAMIC), np.float32)
        if phase == "prune":
            return np.concatenate([block, zeros_q, np.zeros(1, np.float32)])
        return np.concatenate([zeros_p, block, np.ones(1, np.float32)])
