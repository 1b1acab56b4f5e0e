"""The records the analysis produces: group members, tensor slices, channel groups, literal sites, cost rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoprune.errors import ConfigError

__all__ = ["ChannelGroup", "CostTerms", "LiteralSite", "Member", "QuadraticForm", "TensorSlice"]

#: ``(K, λ, c0)`` of ``w·K·w + λ·w + c0`` over the prunable group widths ``w`` (``K`` symmetric).
QuadraticForm = tuple[np.ndarray, np.ndarray, float]


@dataclass(frozen=True)
class Member:
    """One place where a channel group appears.

    Attributes:
        module: Qualified name of the module (or of the attribute, for ``param``) in the traced graph.
        role: ``out`` (producer output channels), ``in`` (consumer input channels), ``dw`` (depthwise conv),
            ``norm`` (normalisation / per-channel layer) or ``param`` (a bare tensor attribute, e.g. a layer
            scale, broadcast against the channels).
        offset: First position of the group along the member's channel dimension (after concatenation).
        stride: Positions per channel (``H·W`` after flattening a ``C×H×W`` map into a linear layer).
    """

    module: str
    role: str
    offset: int = 0
    stride: int = 1


@dataclass(frozen=True)
class TensorSlice:
    """How one parameter or buffer is sliced when its group is pruned.

    Channel ``c`` of the group occupies positions ``offset + c·stride … offset + (c+1)·stride − 1`` of
    dimension ``dim`` of the tensor ``tensor`` (a qualified name in the traced graph module).

    ``groups > 1`` marks the input dim of a grouped conv weight ``[C_out, C_in/g, …]``: positions then count
    along the *virtual* input axis of ``C_in`` channels (block ``i`` of ``C_in/g`` input channels feeds only the
    output rows of block ``i``), not along the stored dim.
    """

    tensor: str
    dim: int
    offset: int
    stride: int
    role: str
    module: str
    groups: int = 1

    @property
    def param_name(self) -> str:
        """Last component of the tensor name (``weight``, ``bias``, ``running_mean`` …)."""
        return self.tensor.rsplit(".", 1)[-1]


def nearest_width(widths: Sequence[int], target: float) -> int:
    """The width in ``widths`` closest to ``target`` channels; a tie goes to the wider one.

    The one rounding rule from a channel count (or keep ratio × size) to a legal width, used by
    :func:`autoprune.pruning.nearest_legal` and by the search space's keep-ratio choices.
    """
    return min(widths, key=lambda w: (abs(w - target), -w))


@dataclass(frozen=True)
class ChannelGroup:
    """A set of channels that must keep the same width (one union-find class of channel atoms).

    Attributes:
        id: Stable name from the first producer in execution order, e.g. ``"layer1.0.conv1:out"``.
        size: Number of channels at full width.
        members: Every module (and role) the group appears in, in execution order.
        frozen: True when the group may not be pruned; ``reason`` says why.
        reason: Why the group is frozen (empty for prunable groups).
        divisor: Legal widths are multiples of this (1 unless a grouped conv requires otherwise): the channels
            form ``divisor`` equal consecutive blocks and every block keeps ``width / divisor`` channels.
        min_width: Smallest legal width.
        macs: MACs (per sample) whose value depends on this group's width, at full width.
        params: Parameters whose count depends on this group's width, at full width.
        macs_linear: λ_i, the coefficient of ``w_i`` in the closed-form MACs (others at their constant part).
        macs_quadratic: ``(other group id, κ_ij)`` pairs of the closed-form MACs (``κ_ii`` for itself).
        params_linear: As ``macs_linear`` for the parameter count.
        params_quadratic: As ``macs_quadratic`` for the parameter count.
        slices: Every tensor slice that changes when the group is pruned.
        index: Position of the group in execution order.
    """

    id: str
    size: int
    members: tuple[Member, ...]
    frozen: bool
    reason: str = ""
    divisor: int = 1
    min_width: int = 1
    macs: int = 0
    params: int = 0
    macs_linear: float = 0.0
    macs_quadratic: tuple[tuple[str, float], ...] = ()
    params_linear: float = 0.0
    params_quadratic: tuple[tuple[str, float], ...] = ()
    slices: tuple[TensorSlice, ...] = ()
    index: int = 0

    @property
    def prunable(self) -> bool:
        """True when the group has a producer and no frozen atom."""
        return not self.frozen and any(m.role == "out" for m in self.members)

    def legal_widths(self, round_to: int = 1) -> list[int]:
        """Legal widths of the group, ascending (ENGINE.md §3.3).

        The step is ``r = lcm(round_to, divisor)``; legal widths are ``r, 2r, …`` below the size plus the size
        itself, at least :attr:`min_width`. When the group is not larger than ``r``, ``round_to`` is ignored for
        it (only the divisor applies).

        Args:
            round_to: Width multiple (e.g. 8 or 16 for fast kernels).

        Raises:
            ConfigError: If ``round_to < 1``.
        """
        if round_to < 1:
            raise ConfigError(f"round_to must be >= 1, got {round_to}")
        r = math.lcm(int(round_to), self.divisor)
        if self.size <= r:
            r = self.divisor
        return [w for w in range(r, self.size, r) if w >= self.min_width] + [self.size]

    def check_width(self, width: int) -> None:
        """Raise unless ``width`` is a multiple of :attr:`divisor` (range checks are the caller's business).

        Raises:
            ConfigError: Naming the divisor and the legal multiples.
        """
        d = self.divisor
        if width % d == 0:
            return
        legal = list(range(d, self.size + 1, d))
        shown = ", ".join(map(str, legal[:8])) + (" …" if len(legal) > 8 else "")
        raise ConfigError(
            f"width {width} for group {self.id!r} is not a multiple of {d}: a grouped conv needs the same number "
            f"of kept channels in each of the group's {d} channel blocks",
            hint=f"use a multiple of {d} (legal widths: {shown}; group.legal_widths() lists them)")

    def layers(self, role: str | None = None) -> list[str]:
        """Module names of the members (optionally of one role), without duplicates, in order."""
        seen: dict[str, None] = {}
        for m in self.members:
            if role is None or m.role == role:
                seen.setdefault(m.module, None)
        return list(seen)


@dataclass(frozen=True)
class LiteralSite:
    """A Python integer in the graph (a ``view``/``reshape`` size) that depends on group widths.

    ``path`` locates the literal in the node's arguments, e.g. ``("args", 2)`` or ``("args", 1, 1)``.
    Its new value is ``base + Σ coef·(w_g − size_g)`` over ``terms`` ``(group id, coef)``.
    """

    node: str
    path: tuple[Any, ...]
    base: int
    terms: tuple[tuple[str, int], ...]


def _empty_form() -> QuadraticForm:
    return np.zeros((0, 0)), np.zeros(0), 0.0


@dataclass
class CostTerms:
    """Per-tensor size factors used by the closed-form cost model (ENGINE.md §6.1).

    Every *row* r is a product ``k_r · (A_r·w + a0_r) · (B_r·w + b0_r)`` of at most two affine functions of the
    prunable group widths ``w`` (ordered as :attr:`GroupSet.prunable_ids`). Rows are parameter numels,
    weight numels used by MAC terms and weight output-channel counts (for quantization scales).

    Attributes:
        k: Constant factor of every row, ``[R]``.
        A: Width coefficients of the first affine factor, ``[R, P]``.
        a0: Constant part of the first affine factor, ``[R]``.
        B: Width coefficients of the second affine factor, ``[R, P]``.
        b0: Constant part of the second affine factor, ``[R]``.
        macs_coef: Per-sample MAC multiplier of each (weight) row, ``[R]``.
        params_coef: 1 for parameter rows, ``[R]``.
        macs_const: MACs of ops whose operands are all frozen (matmul, attention, functional conv).
        layers: Layer → ``{"weight": row, "bias": row or None, "cout": row, "macs": per-sample multiplier}``.
        row_names: Tensor name of every row (``<weight>#cout`` for output-channel counts).
        macs_form: The closed-form MACs as a quadratic form of the widths.
        params_form: The closed-form parameter count as a quadratic form of the widths.
    """

    k: np.ndarray
    A: np.ndarray
    a0: np.ndarray
    B: np.ndarray
    b0: np.ndarray
    macs_coef: np.ndarray
    params_coef: np.ndarray
    macs_const: float
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    row_names: list[str] = field(default_factory=list)
    macs_form: QuadraticForm = field(default_factory=_empty_form)
    params_form: QuadraticForm = field(default_factory=_empty_form)
