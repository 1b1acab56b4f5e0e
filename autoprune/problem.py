"""The compression problem: one model, its channel groups, a search space, a cost model and an evaluator.

:class:`Problem` is the seam between the engine (which builds and prices candidates) and the things that
search (the Gymnasium environment, RL agents, Optuna samplers, baselines). Searchers never touch the engine
directly: they ask the problem for the cost of a candidate (closed form, microseconds) and for its
evaluation (build a physically smaller network, quantize it, score it with the injected evaluator; cached by
candidate key).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from autoprune.errors import ConfigError
from autoprune.graph.records import nearest_width
from autoprune.importance import DEFAULT_CRITERION
from autoprune.types import Candidate, CostReport, EvalResult, QuantSpec

if TYPE_CHECKING:
    from autoprune.evaluate import CandidateEvaluator
    from autoprune.graph import GroupSet
    from autoprune.latency_model import LatencyPredictor


@dataclass(frozen=True)
class GroupChoice:
    """The decision for one prunable channel group.

    Attributes:
        group_id: Engine group id, e.g. ``"layer1.0.conv1:out"``.
        size: Original number of channels.
        widths: Legal widths in ascending order (the last one is ``size``).
    """

    group_id: str
    size: int
    widths: tuple[int, ...]

    def width_for_ratio(self, ratio: float) -> int:
        """Legal width nearest ``ratio * size`` (a tie goes to the wider one, as in the engine)."""
        return nearest_width(self.widths, ratio * self.size)


@dataclass(frozen=True)
class LayerChoice:
    """The bit-width decision for one quantizable layer.

    Attributes:
        layer: Module name of the conv/linear layer.
        w_bits: Allowed weight bit-widths, ascending.
        a_bits: Allowed input-activation bit-widths, ascending (``None`` = keep float).
    """

    layer: str
    w_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    a_bits: tuple[int | None, ...] = (None,)


@dataclass(frozen=True)
class SearchSpace:
    """What a searcher may choose: a width per group and/or bits per layer.

    Attributes:
        groups: Prunable groups in execution order (empty in quantize-only mode).
        layers: Quantizable layers in execution order (empty in prune-only mode).
        min_ratio: Smallest keep ratio a searcher may propose (AMC's lower bound, default 0.2).
    """

    groups: tuple[GroupChoice, ...] = ()
    layers: tuple[LayerChoice, ...] = ()
    min_ratio: float = 0.2

    def full(self) -> Candidate:
        """The dense candidate (every group at full width, no quantization)."""
        return Candidate(widths={g.group_id: g.size for g in self.groups})

    def minimal(self) -> Candidate:
        """Every group at its smallest legal width and every layer at its lowest bits."""
        bits = {lc.layer: QuantSpec(w_bits=lc.w_bits[0], a_bits=lc.a_bits[0]) for lc in self.layers}
        return Candidate(widths={g.group_id: g.widths[0] for g in self.groups}, bits=bits)

    def widths_for_ratios(self, ratios: Sequence[float] | Mapping[str, float]) -> dict[str, int]:
        """Keep ratios (one per group in order, or by group id) → the nearest legal widths of this space.

        Raises:
            ConfigError: If a sequence does not have one ratio per group.
        """
        if isinstance(ratios, Mapping):
            return {g.group_id: g.width_for_ratio(float(ratios[g.group_id])) for g in self.groups}
        if len(ratios) != len(self.groups):
            raise ConfigError(f"expected {len(self.groups)} ratios, got {len(ratios)}")
        return {g.group_id: g.width_for_ratio(float(r)) for g, r in zip(self.groups, ratios, strict=True)}

    def validate(self, candidate: Candidate) -> None:
        """Raise :class:`ConfigError` if ``candidate`` uses an unknown group/layer or an illegal value."""
        legal = {g.group_id: g for g in self.groups}
        for gid, w in candidate.widths.items():
            if gid not in legal:
                raise ConfigError(f"candidate names unknown group {gid!r}", hint=f"groups: {', '.join(legal)}")
            if w not in legal[gid].widths:
                raise ConfigError(f"width {w} is not legal for group {gid!r}", hint=f"legal: {legal[gid].widths}")
        layers = {lc.layer: lc for lc in self.layers}
        for name, spec in candidate.bits.items():
            if name not in layers:
                raise ConfigError(f"candidate quantizes unknown layer {name!r}", hint=f"layers: {', '.join(layers)}")
            lc = layers[name]
            if spec.w_bits not in lc.w_bits or spec.a_bits not in lc.a_bits:
                raise ConfigError(f"bits {spec} are not allowed for layer {name!r}",
                                  hint=f"weight bits {lc.w_bits}, activation bits {lc.a_bits}")


class ProblemLike(Protocol):
    """What the layer-wise environment reads from a problem: :class:`Problem` itself, or a view of one.

    Views wrap a :class:`Problem` and change one behaviour (the RL searchers' failure-tolerant view in
    :mod:`autoprune.agents.rl`, the benchmark's build-only view); the environment accepts any of them.
    """

    @property
    def model(self) -> nn.Module:
        """The dense model."""
        ...

    @property
    def groups(self) -> GroupSet:
        """The engine's group analysis of :attr:`model`."""
        ...

    @property
    def space(self) -> SearchSpace:
        """The search space."""
        ...

    @property
    def example_input(self) -> torch.Tensor:
        """A representative input of :attr:`model`."""
        ...

    @property
    def dense_cost(self) -> CostReport:
        """Cost of the unpruned, unquantized model."""
        ...

    def cost(self, candidate: Candidate) -> CostReport:
        """Closed-form cost of ``candidate``."""
        ...

    def evaluate(self, candidate: Candidate) -> tuple[EvalResult, CostReport]:
        """Build and score ``candidate``."""
        ...


@dataclass
class Problem:
    """A model to compress, with everything needed to price, build and score candidates.

    Collaborators are passed in (never built from parsed CLI arguments here).

    Args:
        model: The dense model (never modified).
        groups: The engine's :class:`autoprune.graph.GroupSet` for ``model``.
        space: The search space.
        evaluator: An :class:`autoprune.evaluate.Evaluator`, or anything else that satisfies
            :class:`autoprune.evaluate.CandidateEvaluator` (``evaluate(model, key=..., report=...)``).
        example_input: A representative input (batch 1) used for tracing and shape checks.
        importance: Channel-importance criterion used when building candidates (default
            :data:`autoprune.importance.DEFAULT_CRITERION`, the library's default).
        round_to: Channel rounding step used by the engine.
        calib_loader: Training batches used to calibrate activation ranges of candidates with activation
            bits (required only then).
        calib_batches: Number of calibration batches.
        calib_method: ``"minmax"``, ``"percentile"`` or ``"mse"`` (see :func:`autoprune.quantization.calibrate`).
        latency: A :class:`~autoprune.latency_model.LatencyPredictor` of ``groups``: when set, every cost report
            carries the candidate's predicted ``latency_ms`` (what latency budgets and objectives read).
    """

    model: nn.Module
    groups: GroupSet
    space: SearchSpace
    evaluator: CandidateEvaluator
    example_input: torch.Tensor
    importance: str = DEFAULT_CRITERION
    round_to: int = 1
    calib_loader: Iterable[Any] | None = None
    calib_batches: int = 8
    calib_method: str = "minmax"
    latency: LatencyPredictor | None = None
    _dense_cost: CostReport | None = field(default=None, init=False, repr=False)
    _cache: dict[str, tuple[EvalResult, CostReport]] = field(default_factory=dict, init=False, repr=False)

    # -- pricing -------------------------------------------------------------------------------------
    def cost(self, candidate: Candidate) -> CostReport:
        """Closed-form cost of ``candidate`` (no model is built)."""
        from autoprune import cost as cost_model

        bits = dict(candidate.bits) or None
        cost = cost_model.closed_form(self.groups, dict(candidate.widths), bits=bits)
        if self.latency is not None:
            cost = dataclasses.replace(cost, latency_ms=self.latency.predict(candidate.widths))
        return cost

    @property
    def dense_cost(self) -> CostReport:
        """Cost of the unpruned, unquantized model."""
        if self._dense_cost is None:
            self._dense_cost = self.cost(self.space.full())
        return self._dense_cost

    # -- building and scoring ------------------------------------------------------------------------
    def build(self, candidate: Candidate) -> nn.Module:
        """A new, physically smaller (and, with bits, fake-quantized) module for ``candidate``."""
        from autoprune import pruning

        module: nn.Module = pruning.apply(self.model, self.groups, dict(candidate.widths),
                                          importance=self.importance, round_to=self.round_to)
        if candidate.bits:
            from autoprune import quantization

            module = quantization.apply(module, dict(candidate.bits))
            if any(spec.a_bits is not None for spec in candidate.bits.values()):
                if self.calib_loader is None:
                    raise ConfigError("candidates with activation bits need calibration data",
                                      hint="pass calib_loader (training batches) to the Problem")
                quantization.calibrate(module, self.calib_loader, batches=self.calib_batches,
                                       method=self.calib_method)
        return module

    def evaluate(self, candidate: Candidate, *, report: Callable[[int, float], bool] | None = None
                 ) -> tuple[EvalResult, CostReport]:
        """Build and score ``candidate`` once; identical candidates are answered from the cache.

        Args:
            candidate: The candidate.
            report: Optional ``report(step, value) -> bool`` callback for intermediate values (Optuna
                pruning); a result the evaluator stopped early because ``report`` returned True is not cached.
        """
        key = candidate.key()
        if key in self._cache:
            return self._cache[key]
        start = time.perf_counter()
        module = self.build(candidate)
        build_s = time.perf_counter() - start
        result = self.evaluator.evaluate(module, key=key, report=report)
        extra = dict(result.extra)
        extra["build_seconds"] = build_s
        result = dataclasses.replace(result, extra=extra)
        out = (result, self.cost(candidate))
        if not extra.get("pruned"):
            self._cache[key] = out
        return out
