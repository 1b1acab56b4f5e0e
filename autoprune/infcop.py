"""Information-flow and gradient-flow measures of InfCoP (ALGORITHMS.md §4.1–4.3).

This module owns the *measures* and the *consistency test*; the evaluator that fine-tunes a candidate until it
is consistent lives in :mod:`autoprune.evaluate` and the iterative-magnitude-pruning driver in
:mod:`autoprune.imp`.

Layer sets (documented choice):

* **Information flow (IF)** uses every ``nn.Conv1d/2d/3d`` (depthwise included) and ``nn.Linear`` module that
  runs during the forward pass, in *forward-execution order*, except modules whose qualified name contains
  ``"downsample"`` or ``"shortcut"`` (projection shortcuts of ResNets). Consecutive pairs follow the main
  branch; skip connections are ignored. Each module must run exactly once per forward.
* **Gradient flow (GF)** uses every parameter with ``dim > 1`` that requires a gradient (conv and linear
  weights, shortcut/downsample convs and the classifier included), in ``named_parameters()`` order.

A channel-pruned network keeps the module and parameter names of the dense one, so both measures (a scalar
per layer pair, or per layer) stay comparable between a dense network and its pruned candidates.

Deviations from the reference code: GF is the intended quantity (fresh forward + backward, no optimizer
step, no ``.grad`` left behind) instead of a stale-gradient forward pass; the IF variance is the two-pass
centred one clamped at 0 before the square root; forward hooks exist only while measuring.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoprune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

IF_EXCLUDE: tuple[str, ...] = ("downsample", "shortcut")
"""Substrings of module names left out of the information-flow layer set."""

DEFAULT_EPS: Mapping[str, float] = {"IF": 1.0, "GF": 0.5}
"""Default consistency tolerance ε per flow kind (the reference's ``--prune_epsilon`` default and GF fallback)."""

FLOW_KINDS = ("IF", "GF")
REDUCTIONS = ("mean", "abs")
GRAD_STATS = ("mean", "fro")
DISTANCE_FORMS = ("l2", "rms", "relative")

_FLOW_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_SIGMA_FLOOR = 1e-6

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True, eq=False)
class FlowMeasure:
    """One measurement of a network's flow.

    Attributes:
        kind: ``"IF"`` (information flow) or ``"GF"`` (gradient flow).
        values: float64 vector. IF: φ_ℓ per consecutive layer pair (length L − 1). GF: G_ℓ per weight tensor.
        names: IF: the L layer (module) names in execution order. GF: the parameter names, one per value.
        nan: True if any correlation (IF) or gradient statistic (GF) was NaN; such a measure is never
            consistent.
        samples: Training samples forwarded to obtain the measure (both passes counted for IF).
    """

    kind: str
    values: Tensor
    names: tuple[str, ...]
    nan: bool = False
    samples: int = 0

    def to_list(self) -> list[float]:
        """The values as plain floats (JSON-friendly)."""
        return [float(v) for v in self.values]

    @property
    def labels(self) -> tuple[str, ...]:
        """One label per value: ``"a->b"`` layer pairs for IF, parameter names for GF."""
        if self.kind == "IF":
            return tuple(f"{a}->{b}" for a, b in itertools.pairwise(self.names))
        return self.names


# ----------------------------------------------------------------------------------------------------------
# Layer selection
# ----------------------------------------------------------------------------------------------------------


def candidate_layers(model: nn.Module, exclude: Sequence[str] = IF_EXCLUDE) -> list[str]:
    """Names of the conv/linear modules eligible for IF, in registration order (execution order needs a pass)."""
    return [
        name
        for name, m in model.named_modules()
        if name and isinstance(m, _FLOW_TYPES) and not any(s in name for s in exclude)
    ]


def flow_layers(model: nn.Module, example_input: Tensor, exclude: Sequence[str] = IF_EXCLUDE) -> list[str]:
    """IF layer set of ``model``: eligible conv/linear modules in forward-execution order.

    Args:
        model: The network (not modified; hooks are removed before returning).
        example_input: One input batch used to observe the execution order.
        exclude: Name substrings to leave out (default ``("downsample", "shortcut")``).

    Raises:
        ConfigError: If a module runs more than once per forward (its pair would be ambiguous).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _GapRecorder(model, candidate_layers(model, exclude)) as rec:
            model(example_input)
            return rec.order()
    finally:
        model.train(was_training)


def gradient_layers(model: nn.Module) -> list[str]:
    """GF layer set: names of parameters with ``dim > 1`` that require a gradient."""
    return [n for n, p in model.named_parameters() if p.dim() > 1 and p.requires_grad]


class _GapRecorder:
    """Forward hooks recording the global-average-pooled output of chosen modules; removed on exit."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(
                f"flow layers not found in the model: {missing[:5]}",
                hint="pass module names as printed by `model.named_modules()`, or leave `layers` unset",
            )
        self._targets = [(n, modules[n]) for n in names]
        self._handles: list[RemovableHandle] = []
        self.acts: dict[str, Tensor] = {}
        self._order: list[str] = []

    @property
    def targets(self) -> list[str]:
        return [n for n, _ in self._targets]

    def __enter__(self) -> _GapRecorder:
        for name, module in self._targets:
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            if name in self.acts:
                raise ConfigError(
                    f"module {name!r} runs more than once per forward; its information flow is ambiguous",
                    hint="pass an explicit `layers=` list without modules that are called repeatedly",
                )
            if not isinstance(out, Tensor) or out.dim() < 2:
                raise ConfigError(
                    f"module {name!r} does not return a (batch, channels, ...) tensor",
                    hint="pass an explicit `layers=` list of conv/linear modules",
                )
            pooled = out.detach().flatten(2).mean(dim=2) if out.dim() > 2 else out.detach()
            self.acts[name] = pooled.to(torch.float64)
            self._order.append(name)

        return hook

    def clear(self) -> None:
        self.acts = {}
        self._order = []

    def order(self) -> list[str]:
        return list(self._order)


# ----------------------------------------------------------------------------------------------------------
# Information flow
# ----------------------------------------------------------------------------------------------------------


def _inputs(loader: Iterable[Tensor | Sequence[Tensor]], max_batches: int | None) -> Iterable[Tensor]:
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def information_flow(
    model: nn.Module,
    loader: Iterable[Tensor | Sequence[Tensor]],
    layers: Sequence[str] | None = None,
    reduce: str = "mean",
    *,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    exclude: Sequence[str] = IF_EXCLUDE,
    max_cache_floats: int = 2**25,
) -> FlowMeasure:
    """Information flow Φ = (φ_1, …, φ_{L−1}) of ``model`` on the data of ``loader`` (§4.1).

    For each layer ℓ the module output (before BN/ReLU) is global-average-pooled to a_ℓ ∈ R^{C_ℓ}. Pass 1
    computes the means μ_ℓ; pass 2 the centred variances (clamped at 0, σ_ℓ = max(√var, 1e-6)) and the
    cross-correlation C_ℓ = E[(a_ℓ − μ_ℓ)(a_{ℓ+1} − μ_{ℓ+1})ᵀ] / (σ_ℓ σ_{ℓ+1}ᵀ); φ_ℓ = mean_{ij} C_ℓ[i, j]
    (``reduce="mean"``, signed) or mean |C_ℓ[i, j]| (``reduce="abs"``). Population statistics throughout, so
    C_ℓ equals the Pearson correlation matrix.

    The model runs in evaluation mode under ``no_grad`` (its mode is restored); hooks exist only during the
    call. Pooled activations of pass 1 are kept in memory when they fit in ``max_cache_floats`` floats, so
    pass 2 needs no second forward; otherwise the loader is iterated again and must yield the same data.

    Args:
        model: Network to measure (not modified).
        loader: Re-iterable of ``(x, y)`` batches or of input tensors (labels are not used).
        layers: Module names in pair order; default: :func:`flow_layers` order observed on the first batch.
        reduce: ``"mean"`` (signed mean, the reference) or ``"abs"`` (mean absolute correlation).
        device: Device for the forward passes (default: the model's).
        max_batches: Use at most this many batches of ``loader``.
        exclude: Name substrings excluded from the automatic layer set.
        max_cache_floats: Memory bound (in floats) for caching pooled activations between the passes.

    Returns:
        A :class:`FlowMeasure` of kind ``"IF"``; ``nan`` is set when any correlation is NaN.

    Raises:
        ConfigError: Unknown ``reduce``, fewer than two layers, or unknown layer names.
        DataError: The loader yields no batches.
    """
    if reduce not in REDUCTIONS:
        raise ConfigError(f"unknown information-flow reduction {reduce!r}", hint=f"use one of {REDUCTIONS}")
    device = _device_of(model, device)
    names = list(layers) if layers is not None else candidate_layers(model, exclude)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _GapRecorder(model, names) as rec:
            order, sums, count, cache = _if_first_pass(
                model, loader, rec, device, max_batches, max_cache_floats, strict=layers is not None
            )
            if layers is not None:
                order = list(layers)
            if len(order) < 2:
                raise ConfigError(
                    f"information flow needs at least two conv/linear layers, found {order}",
                    hint="use a model with two or more conv/linear layers, or pass `layers=`",
                )
            means = {n: sums[n] / count for n in order}
            batches = cache if cache is not None else _rerun(model, loader, rec, device, max_batches)
            sq, cross = _if_second_pass(batches, order, means)
    finally:
        model.train(was_training)
    phis: list[Tensor] = []
    any_nan = False
    sigmas = {n: (sq[n] / count).clamp_min(0.0).sqrt().clamp_min(_SIGMA_FLOOR) for n in order}
    for i in range(len(order) - 1):
        a, b = order[i], order[i + 1]
        corr = (cross[i] / count) / (sigmas[a][:, None] * sigmas[b][None, :])
        any_nan = any_nan or bool(torch.isnan(corr).any())
        phis.append(corr.abs().mean() if reduce == "abs" else corr.mean())
    passes = 1 if cache is not None else 2
    return FlowMeasure("IF", torch.stack(phis).cpu(), tuple(order), any_nan, passes * count)


def _if_first_pass(
    model: nn.Module,
    loader: Iterable[Tensor | Sequence[Tensor]],
    rec: _GapRecorder,
    device: torch.device,
    max_batches: int | None,
    max_cache_floats: int,
    *,
    strict: bool,
) -> tuple[list[str], dict[str, Tensor], int, list[dict[str, Tensor]] | None]:
    order: list[str] = []
    sums: dict[str, Tensor] = {}
    count = 0
    cache: list[dict[str, Tensor]] | None = []
    cached_floats = 0
    for x in _inputs(loader, max_batches):
        rec.clear()
        model(x.to(device))
        acts = rec.acts
        if not order:
            order = rec.order()
            missing = [n for n in rec.targets if n not in acts]
            if strict and missing:
                raise ConfigError(f"flow layers {missing[:5]} did not run during the forward pass",
                                  hint="pass only modules that the model calls, or leave `layers` unset")
        for n in order:
            sums[n] = sums[n] + acts[n].sum(0) if n in sums else acts[n].sum(0)
        count += int(x.shape[0])
        if cache is not None:
            cached_floats += sum(acts[n].numel() for n in order)
            if cached_floats <= max_cache_floats:
                cache.append(acts)
            else:
                cache = None
    if count == 0:
        raise DataError("the flow loader yielded no batches", hint="pass a non-empty loader of (x, y) batches")
    return order, sums, count, cache


def _rerun(
    model: nn.Module,
    loader: Iterable[Tensor | Sequence[Tensor]],
    rec: _GapRecorder,
    device: torch.device,
    max_batches: int | None,
) -> Iterable[dict[str, Tensor]]:
    for x in _inputs(loader, max_batches):
        rec.clear()
        model(x.to(device))
        yield rec.acts


def _if_second_pass(
    batches: Iterable[dict[str, Tensor]], order: list[str], means: dict[str, Tensor]
) -> tuple[dict[str, Tensor], list[Tensor]]:
    sq: dict[str, Tensor] = {n: torch.zeros_like(means[n]) for n in order}
    cross = [torch.zeros(means[a].numel(), means[b].numel(), dtype=torch.float64, device=means[a].device)
             for a, b in itertools.pairwise(order)]
    for acts in batches:
        centred = {n: acts[n] - means[n] for n in order}
        for n in order:
            sq[n] += (centred[n] * centred[n]).sum(0)
        for i in range(len(order) - 1):
            cross[i] += centred[order[i]].T @ centred[order[i + 1]]
    return sq, cross


# ----------------------------------------------------------------------------------------------------------
# Gradient flow
# ----------------------------------------------------------------------------------------------------------


def gradient_flow(
    model: nn.Module,
    batches: Iterable[Batch],
    masks: Mapping[str, Tensor] | None = None,
    stat: str = "mean",
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    params: Sequence[str] | None = None,
) -> FlowMeasure:
    """Gradient flow G of ``model`` on fixed batches — the corrected version of §4.2.

    G_ℓ = (1/B) Σ_b stat((∇_{W_ℓ} L(x_b)) ⊙ M_ℓ) for every parameter with ``dim > 1``, where ``stat`` is the
    mean absolute value (``"mean"``) or the Frobenius norm (``"fro"``). Each batch gets a fresh forward and
    backward pass (``torch.autograd.grad``: no optimizer step, nothing accumulated in ``.grad``). The model
    runs in evaluation mode (``model.eval()``) so that BN running statistics are not touched; its mode is restored.

    Args:
        model: Network to measure (not modified).
        batches: Iterable of ``(x, y)`` batches (use the same fixed batches for reference and candidates).
        masks: Optional parameter name → 0/1 mask (broadcastable to the parameter); unlisted tensors use M = 1.
        stat: ``"mean"`` or ``"fro"``; compare measures taken with the same statistic only.
        loss_fn: Loss of ``(logits, targets)``; default cross-entropy.
        device: Device for the passes (default: the model's).
        max_batches: Use at most this many batches.
        params: Parameter names, in the order of the result (default: :func:`gradient_layers`). Pass the
            reference's names when measuring a candidate: a traced/pruned module may list its parameters in a
            different order.

    Raises:
        ConfigError: Unknown ``stat``, unknown parameter names, or no parameter with ``dim > 1`` requires a
            gradient.
        DataError: ``batches`` is empty.
    """
    if stat not in GRAD_STATS:
        raise ConfigError(f"unknown gradient-flow statistic {stat!r}", hint=f"use one of {GRAD_STATS}")
    device = _device_of(model, device)
    if params is None:
        named = [(n, p) for n, p in model.named_parameters() if p.dim() > 1 and p.requires_grad]
    else:
        available = dict(model.named_parameters())
        missing = [n for n in params if n not in available or not available[n].requires_grad]
        if missing:
            raise ConfigError(f"gradient-flow parameters not found or frozen: {missing[:5]}",
                              hint="measure a network with the reference's parameter names")
        named = [(n, available[n]) for n in params]
    if not named:
        raise ConfigError("gradient flow needs parameters with dim > 1 that require gradients",
                          hint="unfreeze the conv/linear weights of the model")
    tensors = [p for _, p in named]
    mask_list = [None if masks is None else masks.get(n) for n, _ in named]
    total = torch.zeros(len(named), dtype=torch.float64)
    n_batches = samples = 0
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for i, (x, y) in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                loss = loss_fn(model(x.to(device)), y.to(device))
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                total += _grad_stats(grads, mask_list, stat)
                n_batches += 1
                samples += int(x.shape[0])
    finally:
        model.train(was_training)
    if n_batches == 0:
        raise DataError("gradient flow got no batches", hint="pass a non-empty list of (x, y) batches")
    values = total / n_batches
    return FlowMeasure("GF", values, tuple(n for n, _ in named), bool(torch.isnan(values).any()), samples)


def _grad_stats(grads: Sequence[Tensor | None], masks: Sequence[Tensor | None], stat: str) -> Tensor:
    out = torch.zeros(len(grads), dtype=torch.float64)
    for i, (g, m) in enumerate(zip(grads, masks)):
        if g is None:
            continue
        g = g.detach().to(torch.float64)
        if m is not None:
            g = g * m.to(device=g.device, dtype=g.dtype)
        out[i] = g.abs().mean() if stat == "mean" else torch.linalg.vector_norm(g)
    return out


# ----------------------------------------------------------------------------------------------------------
# Distance and consistency
# ----------------------------------------------------------------------------------------------------------


def flow_distance(current: FlowMeasure | Tensor, reference: FlowMeasure | Tensor, form: str = "l2") -> float:
    """Distance between a measure and its reference.

    ``"l2"``: ‖Φ − Φ_ref‖₂ (the reference rule); ``"rms"``: ‖Φ − Φ_ref‖₂ / √n, a per-pair (per-layer)
    tolerance independent of depth; ``"relative"``: ‖Φ − Φ_ref‖₂ / ‖Φ_ref‖₂.

    Returns:
        The distance, or NaN when either side is flagged NaN or contains NaN.

    Raises:
        ConfigError: Unknown ``form``, or the two measures are of different kinds or layer sets.
    """
    if form not in DISTANCE_FORMS:
        raise ConfigError(f"unknown flow distance form {form!r}", hint=f"use one of {DISTANCE_FORMS}")
    if isinstance(current, FlowMeasure) and isinstance(reference, FlowMeasure):
        if current.kind != reference.kind:
            raise ConfigError(f"cannot compare a {current.kind} measure with a {reference.kind} reference",
                              hint="measure the candidate with the same flow kind as the reference")
        if current.names != reference.names:
            raise ConfigError(
                f"{current.kind} layer sets differ ({len(current.names)} vs {len(reference.names)} layers)",
                hint="measure the candidate on the reference's layers (FlowReference.measure does this)",
            )
        if current.nan or reference.nan:
            return math.nan
    a = (current.values if isinstance(current, FlowMeasure) else torch.as_tensor(current)).to(torch.float64)
    b = (reference.values if isinstance(reference, FlowMeasure) else torch.as_tensor(reference)).to(torch.float64)
    if a.shape != b.shape:
        raise ConfigError(f"flow vectors have different shapes {tuple(a.shape)} and {tuple(b.shape)}",
                          hint="compare measures of the same layer set")
    d = float(torch.linalg.vector_norm(a.cpu() - b.cpu()))
    if form == "rms":
        d /= math.sqrt(max(a.numel(), 1))
    elif form == "relative":
        d /= max(float(torch.linalg.vector_norm(b)), 1e-12)
    return d


def is_consistent(
    current: FlowMeasure, reference: FlowMeasure, eps: float | None = None, form: str = "l2"
) -> bool:
    """True iff no NaN occurred and ``flow_distance(current, reference, form) < eps``.

    ``eps`` defaults to :data:`DEFAULT_EPS` of the measure's kind (1.0 for IF, 0.5 for GF).
    """
    eps = DEFAULT_EPS[reference.kind] if eps is None else eps
    d = flow_distance(current, reference, form)
    return not math.isnan(d) and d < eps


@dataclass(frozen=True)
class FlowCheck:
    """The outcome of one consistency check.

    Attributes:
        kind: ``"IF"`` or ``"GF"``.
        distance: Distance to the reference (NaN when a correlation was NaN).
        consistent: Whether ``distance < eps`` and no NaN occurred.
        samples: Training samples forwarded by the measurement.
    """

    kind: str
    distance: float
    consistent: bool
    samples: int


@dataclass(eq=False)
class FlowReference:
    """A dense network's flow, measured once on a fixed subset and reused for every candidate.

    Build it with :meth:`compute`; then :meth:`check` measures a candidate on the *same* batches and layers
    and applies the consistency test. The candidate must keep the dense network's module/parameter names (true
    for the engine's pruned modules and for masked networks).

    Attributes:
        kind: ``"IF"`` or ``"GF"``.
        measure: The dense measure Φ⁽⁰⁾ or G⁽⁰⁾.
        batches: The fixed flow subset, materialised as CPU ``(x, y)`` tensors.
        eps: Consistency tolerance (default :data:`DEFAULT_EPS` of the kind).
        form: Distance form (``"l2"``, ``"rms"`` or ``"relative"``).
        reduce: IF reduction per pair (``"mean"`` or ``"abs"``).
        stat: GF statistic (``"mean"`` or ``"fro"``).
    """

    kind: str
    measure: FlowMeasure
    batches: list[Batch] = field(repr=False)
    eps: float = 1.0
    form: str = "l2"
    reduce: str = "mean"
    stat: str = "mean"

    @classmethod
    def compute(
        cls,
        dense: nn.Module,
        loader: Iterable[Batch],
        kind: str = "IF",
        *,
        max_samples: int | None = 5000,
        eps: float | None = None,
        form: str = "l2",
        reduce: str = "mean",
        stat: str = "mean",
        masks: Mapping[str, Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> FlowReference:
        """Measure the dense reference on a fixed subset taken from ``loader``.

        Args:
            dense: The dense (warmed-up) network; not modified.
            loader: Source of the flow subset; use *training* data with test-time transforms.
            kind: ``"IF"`` or ``"GF"``.
            max_samples: Size of the fixed subset (first batches of ``loader``; ``None`` = all of it).
            eps: Consistency tolerance; default 1.0 for IF, 0.5 for GF.
            form: Distance form used by :meth:`check`.
            reduce: IF reduction (``"mean"`` signed, ``"abs"``).
            stat: GF statistic (``"mean"``, ``"fro"``).
            masks: GF masks of the reference (default all ones).
            device: Device for the measurement.
        """
        if kind not in FLOW_KINDS:
            raise ConfigError(f"unknown flow kind {kind!r}", hint=f"use one of {FLOW_KINDS}")
        if form not in DISTANCE_FORMS:
            raise ConfigError(f"unknown flow distance form {form!r}", hint=f"use one of {DISTANCE_FORMS}")
        eps = DEFAULT_EPS[kind] if eps is None else float(eps)
        if not eps > 0:
            raise ConfigError(f"flow tolerance eps must be > 0, got {eps}", hint="e.g. eps=1.0 for IF, 0.5 for GF")
        batches = take_batches(loader, max_samples)
        ref = cls(kind, FlowMeasure(kind, torch.zeros(0), ()), batches, eps, form, reduce, stat)
        ref.measure = ref._measure(dense, masks=masks, device=device, layers=None)
        return ref

    def _measure(
        self,
        model: nn.Module,
        *,
        masks: Mapping[str, Tensor] | None,
        device: torch.device | str | None,
        layers: Sequence[str] | None,
    ) -> FlowMeasure:
        if self.kind == "IF":
            return information_flow(model, self.batches, layers=layers, reduce=self.reduce, device=device)
        return gradient_flow(model, self.batches, masks=masks, stat=self.stat, device=device, params=layers)

    def measure_model(
        self, model: nn.Module, masks: Mapping[str, Tensor] | None = None, device: torch.device | str | None = None
    ) -> FlowMeasure:
        """Measure ``model`` on the reference's batches and the reference's layers (or parameters), in order."""
        return self._measure(model, masks=masks, device=device, layers=self.measure.names)

    def check(
        self, model: nn.Module, masks: Mapping[str, Tensor] | None = None, device: torch.device | str | None = None
    ) -> FlowCheck:
        """Measure ``model`` and test consistency with the reference (NaN counts as not consistent)."""
        m = self.measure_model(model, masks=masks, device=device)
        d = flow_distance(m, self.measure, self.form)
        return FlowCheck(self.kind, d, not math.isnan(d) and d < self.eps, m.samples)

    @property
    def samples(self) -> int:
        """Number of samples in the fixed flow subset."""
        return sum(int(x.shape[0]) for x, _ in self.batches)


def take_batches(loader: Iterable[Batch], max_samples: int | None) -> list[Batch]:
    """Materialise the first ``max_samples`` samples of ``loader`` as a list of CPU ``(x, y)`` batches.

    Raises:
        DataError: The loader yields nothing.
    """
    out: list[Batch] = []
    seen = 0
    for x, y in loader:
        if max_samples is not None and seen + int(x.shape[0]) > max_samples:
            keep = max_samples - seen
            if keep > 0:
                out.append((x[:keep].detach().cpu(), y[:keep].detach().cpu()))
                seen += keep
            break
        out.append((x.detach().cpu(), y.detach().cpu()))
        seen += int(x.shape[0])
        if max_samples is not None and seen >= max_samples:
            break
    if not out:
        raise DataError("the flow loader yielded no batches", hint="pass a non-empty loader of (x, y) batches")
    return out


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
