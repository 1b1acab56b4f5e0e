"""Iterative magnitude pruning (IMP) whose retraining stops by the InfCoP criterion (ALGORITHMS.md §4.4).

The paper's own setting, runnable end to end (``autoprune imp``):

1. warm up the dense network for ``warmup_rounds`` rounds (one round = ``round_epochs`` epochs), tracking the
   best validation accuracy; store θ_w (**cloned**: the reference aliases the stored biases, §4.7);
2. measure the dense flow reference (IF or GF) on a fixed subset of training data;
3. for each IMP iteration k: if k > 0, prune by magnitude and rewind (W ← M ⊙ W_w for the masked weights,
   conv/linear biases ← stored copies; BN parameters and statistics are not rewound); then retrain round by
   round with gradient masking until the flow is consistent with the reference, or validation accuracy ≥ the
   warm-up best, or the round budget is used (``flow="none"`` always uses the full budget: the ``lth``
   baseline).

Pruning options: ``granularity`` ``"unstructured"`` (a 0/1 mask per weight of every parameter with dim > 1)
or ``"structured"`` (whole output filters of every conv/linear except the classifier, scored by the L1 norm
of the filter; the filter's bias and the BatchNorm right after it are masked too, so a pruned channel outputs
exact zeros); ``scope`` ``"layer"`` (the same ratio in every layer) or ``"global"`` (one threshold; filter
scores divided by the filter size so that layers compete fairly); a fixed ratio of the *alive* units or the
adaptive PQ-index ratio (computed directly, no float grid matching); a per-layer minimum keep so that no layer
collapses. Masks are enforced by gradient hooks and by re-zeroing after every optimizer step. All variants
use the same optimizer (the reference trains ``lth`` without weight decay, §4.7). The test split is evaluated
once, at the end.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from autoprune.distill import Distillation, Teacher
from autoprune.errors import ConfigError
from autoprune.evaluate import SGDSettings, StepTrainer, validate
from autoprune.infcop import DEFAULT_EPS, DISTANCE_FORMS, FlowReference
from autoprune.utils import prepare_out_dir, seed_everything

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

Batch = tuple[Tensor, Tensor]
Loader = Iterable[Batch]
Masks = dict[str, Tensor]

FLOWS = ("IF", "GF", "none")
GRANULARITIES = ("unstructured", "structured")
SCOPES = ("global", "layer")
_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class IMPConfig:
    """Settings of one IMP run.

    Attributes:
        flow: Stopping criterion of each retraining phase: ``"IF"``, ``"GF"`` or ``"none"`` (fixed budget).
        monitor: With ``flow="none"``: a flow (``"IF"`` or ``"GF"``) measured after pruning and after every round
            without stopping on it, so that a fixed-budget run shows where each tolerance ε would have stopped
            (rows' ``distance_before`` and the trajectories' ``distance``).
        iterations: IMP iterations (iteration 0 retrains the dense network; pruning starts at 1).
        granularity: ``"unstructured"`` or ``"structured"`` (see the module docstring).
        scope: ``"layer"`` or ``"global"`` magnitude ranking.
        prune_ratio: Fraction of the alive units removed per iteration (``lth``: 0.2 per layer).
        pq: Use the PQ-index adaptive ratio instead of ``prune_ratio`` (per layer when ``scope="layer"``).
        p, q, eta, gamma, beta: PQ-index parameters (0 < p < q; defaults of the reference: 0.5, 1, 0, 1, 0.9).
        min_keep: Fraction of each layer's units that is never pruned (at least one unit).
        rewind: Rewind the surviving weights to the warm-up weights θ_w after each pruning step.
        warmup_rounds: Rounds of dense warm-up before θ_w and the flow reference are taken.
        max_rounds: Round budget of each retraining phase.
        round_epochs: Epochs per round (the reference: 2); fractional values allowed.
        eps: Consistency tolerance (default 1.0 for IF, 0.5 for GF).
        calibrate: Measure ε instead of giving it: iteration 0 (nothing pruned yet) retrains for the full round
            budget with the flow measured after every round, and ε = the largest distance from the reference it
            reaches — how far retraining alone moves the dense network's flow. From iteration 1 a pruned network
            counts as consistent once its flow is that close again. Needs a flow, no ``eps`` and at least two
            iterations; the result records the ε used (:attr:`IMPResult.eps`).
        form: Flow distance form: ``"l2"`` (reference), ``"rms"``, ``"relative"``.
        reduce: IF reduction per layer pair (``"mean"`` signed, ``"abs"``).
        stat: GF statistic (``"mean"``, ``"fro"``).
        flow_samples: Size of the fixed flow subset (training data, test-time transforms).
        stop_on_accuracy: With IF/GF, also stop when validation accuracy reaches the warm-up best.
        sgd: Optimizer (identical for every variant).
        distill: Knowledge distillation in the retraining phases, from the model IMP started from
            (:mod:`autoprune.distill`; weight 0 = off).
        seed: Seed of the run.
    """

    flow: str = "IF"
    monitor: str = "none"
    iterations: int = 5
    granularity: str = "unstructured"
    scope: str = "layer"
    prune_ratio: float = 0.2
    pq: bool = False
    p: float = 0.5
    q: float = 1.0
    eta: float = 0.0
    gamma: float = 1.0
    beta: float = 0.9
    min_keep: float = 0.01
    rewind: bool = True
    warmup_rounds: int = 2
    max_rounds: int = 10
    round_epochs: float = 2.0
    eps: float | None = None
    calibrate: bool = False
    form: str = "l2"
    reduce: str = "mean"
    stat: str = "mean"
    flow_samples: int = 2000
    stop_on_accuracy: bool = True
    sgd: SGDSettings = field(default_factory=SGDSettings)
    distill: Distillation = field(default_factory=Distillation)
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"flow": FLOWS, "monitor": FLOWS, "granularity": GRANULARITIES, "scope": SCOPES,
                   "form": DISTANCE_FORMS, "reduce": ("mean", "abs"), "stat": ("mean", "fro")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown IMP {name} {getattr(self, name)!r}", hint=f"use one of {allowed}")
        checks = [
            (self.iterations >= 1, "iterations must be >= 1"),
            (0.0 < self.prune_ratio < 1.0, "prune_ratio must be in (0, 1)"),
            (0.0 < self.p < self.q, "PQ index needs 0 < p < q"),
            (0.0 <= self.beta < 1.0 and self.gamma > 0 and self.eta >= 0, "PQ needs 0 <= beta < 1, gamma > 0, "
                                                                           "eta >= 0"),
            (0.0 <= self.min_keep < 1.0, "min_keep must be a fraction in [0, 1)"),
            (self.warmup_rounds >= 0 and self.max_rounds >= 1, "warmup_rounds >= 0 and max_rounds >= 1 needed"),
            (self.round_epochs > 0, "round_epochs must be > 0"),
            (self.eps is None or self.eps > 0, "eps must be > 0"),
            (self.flow_samples >= 1, "flow_samples must be >= 1"),
            (self.monitor == "none" or self.flow == "none", "monitor is for fixed-budget runs (flow none); a flow "
                                                            "that stops the run is measured anyway"),
            (not self.calibrate or (self.flow != "none" and self.eps is None and self.iterations >= 2),
             "calibrate measures eps in iteration 0: it needs a flow (IF or GF), no eps, and iterations >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid IMP setting: {message}", hint=f"got {self.summary()}")

    @classmethod
    def lth(cls, **overrides: Any) -> IMPConfig:
        """The ``lth`` baseline: 20 % of the alive weights per layer per iteration, full round budget."""
        base: dict[str, Any] = {"flow": "none", "scope": "layer", "prune_ratio": 0.2, "pq": False}
        return cls(**{**base, **overrides})

    def summary(self) -> dict[str, Any]:
        """JSON-friendly form."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sgd"}
        out["sgd"] = asdict(self.sgd)
        return out


# ----------------------------------------------------------------------------------------------------------
# Targets and masks
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneTarget:
    """One prunable weight tensor.

    Attributes:
        weight: Parameter name of the weight (dim > 1).
        coupled: Structured only: 1-D parameters zeroed together with the filter (its bias, and the weight and
            bias of the BatchNorm applied directly to its output).
    """

    weight: str
    coupled: tuple[str, ...] = ()


def prune_targets(model: nn.Module, example_input: Tensor, granularity: str = "unstructured") -> list[PruneTarget]:
    """The tensors IMP prunes.

    Unstructured: every parameter with dim > 1 that requires a gradient (first conv, shortcut/downsample convs
    and classifier included, as in the reference). Structured: the output filters of every conv/linear module
    except the last one executed (the classifier, whose outputs are the classes).
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"unknown granularity {granularity!r}", hint=f"use one of {GRANULARITIES}")
    if granularity == "unstructured":
        return [PruneTarget(n) for n, p in model.named_parameters() if p.dim() > 1 and p.requires_grad]
    order, follows = _trace_layers(model, example_input)
    params = dict(model.named_parameters())
    targets = []
    for name in order[:-1]:
        coupled = [f"{name}.bias"] if f"{name}.bias" in params else []
        if name in follows:
            coupled += [f"{follows[name]}.{p}" for p in ("weight", "bias") if f"{follows[name]}.{p}" in params]
        targets.append(PruneTarget(f"{name}.weight", tuple(coupled)))
    if not targets:
        raise ConfigError("structured IMP found no conv/linear layer besides the classifier",
                          hint="use granularity='unstructured' for this model")
    return targets


def _trace_layers(model: nn.Module, x: Tensor) -> tuple[list[str], dict[str, str]]:
    """Conv/linear modules in execution order, and conv → BatchNorm consuming exactly its output tensor."""
    order: list[str] = []
    produced: dict[int, str] = {}
    follows: dict[str, str] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, _PRUNABLE):
            def out_hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
                if name not in order:
                    order.append(name)
                produced[id(out)] = name
            handles.append(m.register_forward_hook(out_hook))
        elif isinstance(m, _NORMS):
            def in_hook(_m: nn.Module, inputs: Any, name: str = name) -> None:
                src = produced.get(id(inputs[0]))
                if src is not None:
                    follows.setdefault(src, name)
            handles.append(m.register_forward_pre_hook(in_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order, follows


def init_masks(model: nn.Module, targets: Sequence[PruneTarget]) -> Masks:
    """All-ones masks for the targets' weights and coupled parameters."""
    params = dict(model.named_parameters())
    names = [t.weight for t in targets] + [c for t in targets for c in t.coupled]
    return {n: torch.ones_like(params[n], dtype=torch.float32) for n in names}


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero the masked entries of the model's parameters, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            params[name].mul_(m.to(params[name].device, params[name].dtype))


def mask_gradients(model: nn.Module, masks: Mapping[str, Tensor]) -> list[RemovableHandle]:
    """Register gradient hooks multiplying each masked parameter's gradient by its mask; return the handles."""
    params = dict(model.named_parameters())
    handles: list[RemovableHandle] = []
    for name, m in masks.items():
        p = params[name]
        mask = m.to(p.device, p.dtype)
        handles.append(p.register_hook(lambda g, mask=mask: g * mask))
    return handles


def sparsity(masks: Mapping[str, Tensor], targets: Sequence[PruneTarget]) -> tuple[float, int, int]:
    """(fraction of pruned weights, alive weights, total weights) over the targets' weight tensors."""
    total = sum(masks[t.weight].numel() for t in targets)
    alive = sum(int(masks[t.weight].count_nonzero()) for t in targets)
    return 1.0 - alive / max(total, 1), alive, total


# ----------------------------------------------------------------------------------------------------------
# Magnitude pruning and the PQ index
# ----------------------------------------------------------------------------------------------------------


def pq_index(w: Tensor, p: float = 0.5, q: float = 1.0) -> float:
    """PQ sparsity index I_{p,q}(w) = 1 − d^{1/q − 1/p}·‖w‖_p/‖w‖_q (Diao et al., ICLR 2023), in [0, 1).

    Computed directly in float64 (no grid of (p, q) values). Returns 0 for an all-zero vector.
    """
    a = w.detach().abs().to(torch.float64).flatten()
    d = a.numel()
    if d == 0 or float(a.max()) == 0.0:
        return 0.0
    a = a / a.max()  # scale-invariant; avoids under/overflow
    norm_p = float(a.pow(p).sum()) ** (1.0 / p)
    norm_q = float(a.pow(q).sum()) ** (1.0 / q)
    return 1.0 - d ** (1.0 / q - 1.0 / p) * norm_p / norm_q


def pq_prune_ratio(w: Tensor, p: float = 0.5, q: float = 1.0, eta: float = 0.0, gamma: float = 1.0,
                   beta: float = 0.9) -> float:
    """Adaptive prune ratio from the PQ index (§4.4).

    m = d·(1 + η)^{−q/(q−p)}·(1 − I)^{qp/(q−p)};  r = clamp(γ·(1 − ⌈m⌉/d), 0, β).
    For (p, q) = (1, 2), m = ‖w‖₁²/‖w‖₂², the "effective number of weights".
    """
    d = w.numel()
    if d == 0:
        return 0.0
    i = pq_index(w, p, q)
    m = d * (1.0 + eta) ** (-q / (q - p)) * (1.0 - i) ** (q * p / (q - p))
    return min(max(gamma * (1.0 - math.ceil(m - 1e-9) / d), 0.0), beta)


def _unit_scores(weight: Tensor, mask: Tensor, granularity: str, normalise: bool) -> tuple[Tensor, Tensor]:
    w = weight.detach().abs().to(torch.float64)
    if granularity == "unstructured":
        return w.flatten(), mask.flatten() > 0
    per = w.flatten(1)
    scores = per.sum(1) / (per.shape[1] if normalise else 1)
    return scores, mask.flatten(1).amax(1) > 0


def prune_step(model: nn.Module, masks: Masks, targets: Sequence[PruneTarget], config: IMPConfig
               ) -> tuple[Masks, float]:
    """One magnitude-pruning step on the alive units; returns new masks and the ratio asked for.

    The number of units removed per layer is ``floor(r · alive)`` (layer scope) or the layer's share of the
    ``floor(r · alive_total)`` globally smallest units (global scope), capped so that every layer keeps at
    least ``max(1, ceil(min_keep · units))`` units. ``r`` is ``prune_ratio`` or the PQ-index ratio of the alive
    scores. Within a layer the smallest alive units go.
    """
    params = dict(model.named_parameters())
    scored = [_unit_scores(params[t.weight], masks[t.weight], config.granularity, config.scope == "global")
              for t in targets]
    if config.scope == "layer":
        ratios = [config.prune_ratio if not config.pq else _pq(s[a], config) for s, a in scored]
        removals = [math.floor(r * int(a.sum())) for r, (_, a) in zip(ratios, scored)]
        asked = sum(r * int(a.sum()) for r, (_, a) in zip(ratios, scored)) / max(sum(int(a.sum()) for _, a in
                                                                                    scored), 1)
    else:
        alive_scores = torch.cat([s[a] for s, a in scored])
        asked = _pq(alive_scores, config) if config.pq else config.prune_ratio
        removals = _global_removals(scored, math.floor(asked * alive_scores.numel()))
    new = dict(masks)
    for t, (scores, alive), k in zip(targets, scored, removals):
        floor_keep = max(1, math.ceil(config.min_keep * alive.numel()))
        k = max(0, min(k, int(alive.sum()) - floor_keep))
        if k == 0:
            continue
        keyed = torch.where(alive, scores, torch.full_like(scores, math.inf))
        drop = torch.argsort(keyed, stable=True)[:k]
        unit_alive = alive.clone()
        unit_alive[drop] = False
        new.update(_unit_masks(t, unit_alive, masks, config.granularity))
    return new, float(asked)


def _pq(scores: Tensor, config: IMPConfig) -> float:
    return pq_prune_ratio(scores, config.p, config.q, config.eta, config.gamma, config.beta)


def _global_removals(scored: Sequence[tuple[Tensor, Tensor]], k: int) -> list[int]:
    if k <= 0:
        return [0] * len(scored)
    values = torch.cat([s[a] for s, a in scored])
    owner = torch.cat([torch.full((int(a.sum()),), i, dtype=torch.long) for i, (_, a) in enumerate(scored)])
    smallest = torch.argsort(values, stable=True)[:k]
    return torch.bincount(owner[smallest], minlength=len(scored)).tolist()


def _unit_masks(target: PruneTarget, unit_alive: Tensor, masks: Masks, granularity: str) -> Masks:
    shape = masks[target.weight].shape
    keep = unit_alive.to(torch.float32)
    if granularity == "unstructured":
        return {target.weight: keep.reshape(shape)}
    out = {target.weight: keep.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).contiguous()}
    out.update({c: keep.clone() for c in target.coupled})
    return out


def rewind(model: nn.Module, snapshot: Mapping[str, Tensor], masks: Mapping[str, Tensor],
           targets: Sequence[PruneTarget]) -> None:
    """W ← M ⊙ W_w for the target weights, conv/linear biases ← (cloned) stored biases; masks re-applied.

    BatchNorm parameters and statistics are not rewound (the reference's choice). Every tensor is copied
    from ``snapshot``, never aliased, so later training cannot mutate the snapshot.
    """
    params = dict(model.named_parameters())
    prunable = {n for n, m in model.named_modules() if isinstance(m, _PRUNABLE)}
    with torch.no_grad():
        for t in targets:
            params[t.weight].copy_(snapshot[t.weight])
        for name, p in params.items():
            module, _, leaf = name.rpartition(".")
            if leaf == "bias" and module in prunable:
                p.copy_(snapshot[name])
    apply_masks(model, masks)


# ----------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IMPRow:
    """One IMP iteration. ``cum_*`` columns include the warm-up."""

    iteration: int
    sparsity: float
    alive: int
    prune_ratio: float
    rounds: int
    epochs: float
    steps: int
    seconds: float
    cum_epochs: float
    cum_seconds: float
    val_accuracy: float
    stop_reason: str
    distance: float | None
    distance_before: float | None = None


@dataclass
class IMPResult:
    """Outcome of :func:`run_imp`.

    Attributes:
        rows: One :class:`IMPRow` per iteration.
        model: The final (masked) network — a copy; the caller's model is untouched.
        masks: Final masks (parameter name → 0/1 tensor).
        warmup: Warm-up record: rounds, epochs, seconds, best validation accuracy (the accuracy target).
        reference: The dense flow values (``None`` for ``flow="none"``).
        trajectories: Per iteration, one dict per round (round, distance, consistent, val accuracy).
        test_accuracy: Final test accuracy (only when a test loader was given).
        config: The settings used.
        eps: The consistency tolerance the rule used (measured in iteration 0 with ``calibrate``); ``None``
            without a stopping flow.
    """

    rows: list[IMPRow]
    model: nn.Module
    masks: Masks
    warmup: dict[str, Any]
    reference: list[float] | None
    trajectories: list[list[dict[str, Any]]]
    test_accuracy: float | None
    config: IMPConfig
    eps: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no tensors)."""
        return {"config": self.config.summary(), "warmup": self.warmup, "reference": self.reference,
                "eps": self.eps, "rows": [asdict(r) for r in self.rows], "trajectories": self.trajectories,
                "test_accuracy": self.test_accuracy}

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write ``imp.csv`` (the per-iteration table), ``imp.json`` and ``final.pt`` (state dict + masks)."""
        out = prepare_out_dir(out_dir, hint="pass --out <a writable directory>")
        table = out / "imp.csv"
        with table.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(IMPRow)])
            writer.writeheader()
            for r in self.rows:
                writer.writerow(asdict(r))
        summary = out / "imp.json"
        summary.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default))
        weights = out / "final.pt"
        torch.save({"state_dict": self.model.state_dict(), "masks": self.masks}, weights)
        return [table, summary, weights]


def _json_default(o: object) -> object:
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def run_imp(
    model: nn.Module,
    train_loader: Loader,
    val_loader: Loader,
    config: IMPConfig,
    *,
    flow_loader: Loader | None = None,
    test_loader: Loader | None = None,
    target_accuracy: float | None = None,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> IMPResult:
    """Run IMP with InfCoP-stopped (or fixed) retraining on a copy of ``model``.

    Args:
        model: The network (not modified; IMP works on a deep copy).
        train_loader: Training batches (augmentation allowed); must have ``len()`` (steps per epoch).
        val_loader: Validation batches (accuracy target and stopping rule; never the test split).
        config: Settings.
        flow_loader: Source of the fixed flow subset (default ``train_loader``; prefer test-time transforms).
        test_loader: Evaluated once, after the last iteration.
        target_accuracy: Overrides the accuracy target (default: the best validation accuracy of warm-up,
            or the model's validation accuracy when ``warmup_rounds == 0``).
        device: Device (default: the model's).
        log: Called with one human-readable line per warm-up and per iteration.

    Returns:
        An :class:`IMPResult`.
    """
    try:
        steps_per_round = max(1, round(config.round_epochs * len(train_loader)))  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("IMP needs a training loader with len()", hint="use autoprune.data.make_loader") from None
    seed_everything(config.seed)
    work = copy.deepcopy(model)
    if device is not None:
        work = work.to(device)
    dev = next(work.parameters()).device
    say = log or (lambda _s: None)
    example = next(iter(train_loader))[0][:2].to(dev)
    teacher = Teacher(model, dev) if config.distill.enabled else None
    targets = prune_targets(work, example, config.granularity)
    masks = init_masks(work, targets)

    start = time.perf_counter()
    best = _warm_up(work, train_loader, val_loader, config, steps_per_round, dev)
    warm_seconds = time.perf_counter() - start
    target = target_accuracy if target_accuracy is not None else best
    warmup = {"rounds": config.warmup_rounds, "epochs": config.warmup_rounds * config.round_epochs,
              "seconds": warm_seconds, "best_val_accuracy": best, "target_accuracy": target}
    say(f"warm-up: {config.warmup_rounds} rounds, best val {best:.4f}, {warm_seconds:.1f}s")
    snapshot = {k: v.detach().clone() for k, v in work.state_dict().items()}  # clone: no aliasing
    reference = None
    kind = config.flow if config.flow != "none" else config.monitor
    if kind != "none":
        eps = config.eps if config.eps is not None else DEFAULT_EPS[kind]
        reference = FlowReference.compute(work, flow_loader or train_loader, kind,
                                          max_samples=config.flow_samples, eps=eps, form=config.form,
                                          reduce=config.reduce, stat=config.stat, device=dev)

    rows: list[IMPRow] = []
    trajectories: list[list[dict[str, Any]]] = []
    cum_epochs, cum_seconds = warmup["epochs"], warm_seconds
    for k in range(config.iterations):
        t0 = time.perf_counter()
        asked = 0.0
        if k > 0:
            masks, asked = prune_step(work, masks, targets, config)
            if config.rewind:
                rewind(work, snapshot, masks, targets)
            else:
                apply_masks(work, masks)
        before = None
        if reference is not None:  # how far pruning moved the flow, before any retraining
            d = reference.check(work, masks=masks, device=dev).distance
            before = None if math.isnan(d) else d
        calibrating = config.calibrate and k == 0
        rounds, reason, trajectory = _retrain(work, masks, train_loader, val_loader, reference, target, config,
                                              steps_per_round, dev, teacher, stop=not calibrating)
        if calibrating and reference is not None:
            reference.eps = calibrated_eps(trajectory)
            say(f"calibrated eps {reference.eps:.4g}: the largest {reference.kind} distance of iteration 0")
        acc = trajectory[-1]["val_accuracy"]
        seconds = time.perf_counter() - t0
        epochs = rounds * config.round_epochs
        cum_epochs += epochs
        cum_seconds += seconds
        sp, alive, _ = sparsity(masks, targets)
        row = IMPRow(k, sp, alive, asked, rounds, epochs, rounds * steps_per_round, seconds, cum_epochs,
                     cum_seconds, acc, reason, trajectory[-1].get("distance"), before)
        rows.append(row)
        trajectories.append(trajectory)
        say(f"iteration {k}: sparsity {sp:.3f}, {rounds} rounds ({epochs:g} epochs), {seconds:.1f}s, "
            f"val {acc:.4f}, stop: {reason}")
    test_acc = validate(work, test_loader, device=dev)[0] if test_loader is not None else None
    return IMPResult(rows, work, masks, warmup, reference.measure.to_list() if reference else None, trajectories,
                     test_acc, config, reference.eps if reference is not None and config.flow != "none" else None)


def calibrated_eps(trajectory: Sequence[Mapping[str, Any]]) -> float:
    """ε of ``IMPConfig.calibrate``: the largest finite flow distance of an unpruned retraining trajectory.

    Raises:
        ConfigError: no round moved the flow (no finite distance above 0), so no tolerance can be measured.
    """
    ds = [float(e["distance"]) for e in trajectory if e.get("distance") is not None
          and math.isfinite(float(e["distance"]))]
    if not ds or max(ds) <= 0:
        raise ConfigError("cannot calibrate the flow tolerance: retraining the unpruned network did not move its "
                          f"flow (distances {ds})", hint="give eps explicitly (--eps) or train longer rounds")
    return max(ds)


def _warm_up(model: nn.Module, train_loader: Loader, val_loader: Loader, config: IMPConfig,
             steps_per_round: int, device: torch.device) -> float:
    if config.warmup_rounds == 0:
        return validate(model, val_loader, device=device)[0]
    trainer = StepTrainer(model, train_loader, config.sgd, device=device)
    best = -1.0
    for _ in range(config.warmup_rounds):
        trainer.run(steps_per_round)
        best = max(best, validate(model, val_loader, device=device)[0])
    return best


def _retrain(model: nn.Module, masks: Masks, train_loader: Loader, val_loader: Loader,
             reference: FlowReference | None, target: float, config: IMPConfig, steps_per_round: int,
             device: torch.device, teacher: Teacher | None = None, stop: bool = True
             ) -> tuple[int, str, list[dict[str, Any]]]:
    """Retrain round by round until the stopping rule fires (never with ``stop=False``: the full budget, the
    flow still measured); return rounds used, reason and the trajectory."""
    handles = mask_gradients(model, masks)
    trainer = StepTrainer(model, train_loader, config.sgd, device=device,
                          after_step=lambda: apply_masks(model, masks), distill=config.distill, teacher=teacher)
    trajectory: list[dict[str, Any]] = []
    reason = "budget"
    try:
        for r in range(1, config.max_rounds + 1):
            trainer.run(steps_per_round)
            entry: dict[str, Any] = {"round": r}
            consistent = False
            if reference is not None:
                check = reference.check(model, masks=masks, device=device)
                # a monitored flow (or one being calibrated) never stops the run
                consistent = check.consistent and config.flow != "none" and stop
                entry["distance"] = None if math.isnan(check.distance) else check.distance
                entry["consistent"] = consistent
            last = r == config.max_rounds
            if reference is not None or last:
                entry["val_accuracy"] = validate(model, val_loader, device=device)[0]
            trajectory.append(entry)
            if consistent:
                reason = "consistent"
                break
            if stop and config.flow != "none" and config.stop_on_accuracy and entry["val_accuracy"] >= target:
                reason = "accuracy"
                break
    finally:
        for h in handles:
            h.remove()
    return len(trajectory), reason, trajectory
