"""Candidate evaluators: score an (already pruned) network on the validation split.

One small interface, :class:`Evaluator` (one abstract method), and implementations picked by name from
:data:`EVALUATORS`:

=========== ============================================================================================
name        what it does before scoring on the validation split
=========== ============================================================================================
plain       nothing (dense BN statistics; the "vanilla evaluation" baseline of EagleEye)
adaptive_bn re-estimates BN statistics on N training batches, cumulative average (ALGORITHMS.md §3)
finetune    K steps of SGD fine-tuning
infcop      fine-tunes until the information/gradient flow is consistent with the dense network's (§4)
full        a fixed fine-tuning schedule (epochs, cosine LR) for final models
=========== ============================================================================================

What an evaluator needs from its caller is declared on its class (:attr:`Evaluator.needs_train`,
:attr:`~Evaluator.trains`, :attr:`~Evaluator.needs_dense`, :attr:`~Evaluator.needs_flow_loader`), and so is
whether it reports intermediate values (:attr:`~Evaluator.reports_intermediate`): registering a class in
:data:`EVALUATORS` is all a new evaluator needs. The training evaluators share :class:`TrainingEvaluator`,
whose public :meth:`~TrainingEvaluator.fine_tune` trains a model in place (the final fine-tune of an export
uses it to keep the weights). Results are cached per candidate by :class:`autoprune.problem.Problem`.

Every evaluator scores by top-1 unless its ``score`` setting names another signal of :data:`SCORES` (soft
accuracy, agreement with the dense model, ``exp(−KL)`` to it): then :attr:`EvalResult.score` carries it beside
the accuracy, and rewards and multi-objective searchers rank by it (:attr:`EvalResult.ranking_score`).

Contract shared by all evaluators:

* ``evaluate(model, key=None, report=None)`` **never mutates the caller's model**: it deep-copies it first and
  works on the copy (moved to the evaluator's device).
* Scores use the validation loader given at construction; evaluators never see the test split.
* ``EvalResult.samples`` counts forward passes on *training* data (BN calibration, fine-tuning, flow
  measurements); ``seconds`` is the wall-clock time of the whole call, validation included.
* ``report(step, value) -> bool`` is an optional callback for intermediate values (the validation accuracy
  after ``step`` training steps or epochs). If it returns True, the evaluator stops at once and returns a
  *pruned* result: ``extra["pruned"] is True``, ``extra["stop_reason"] == "pruned"`` and ``accuracy`` is the
  last reported value. The candidate cache (:class:`autoprune.problem.Problem`) never keeps pruned results.
  With Optuna::

      result = evaluator.evaluate(m, report=lambda s, v: (trial.report(v, s), trial.should_prune())[1])
      if was_pruned(result):
          raise optuna.TrialPruned()
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoprune import interrupts
from autoprune.distill import Distillation, Teacher, distillation_loss
from autoprune.errors import ConfigError, DataError
from autoprune.infcop import DEFAULT_EPS, DISTANCE_FORMS, FLOW_KINDS, FlowReference
from autoprune.registry import Registry
from autoprune.train import SCHEDULES, lr_at, make_optimizer
from autoprune.train import evaluate as evaluate_metrics
from autoprune.types import EvalResult
from autoprune.utils import atomic_write, resolve_device

Batch = tuple[Tensor, Tensor]
Loader = Iterable[Batch]
ReportFn = Callable[[int, float], bool]

PRUNED = "pruned"
"""``extra["stop_reason"]`` of a result whose evaluation was stopped by the ``report`` callback."""

EVALUATORS: Registry[type[Evaluator]] = Registry("evaluator")


class CandidateEvaluator(Protocol):
    """What a :class:`~autoprune.problem.Problem` needs from its evaluator: one ``evaluate`` method.

    Every :class:`Evaluator` satisfies it, and so do wrappers (the campaign's reproducible evaluator) and test
    fakes. Searchers that care which kind of evaluator it is read its ``name`` (a key of :data:`EVALUATORS`)
    when it has one.
    """

    def evaluate(self, model: nn.Module, *, key: str | None = None, report: ReportFn | None = None) -> EvalResult:
        """Score ``model`` (never mutating it); see :meth:`Evaluator.evaluate`."""
        ...


class TrialTimeout(TimeoutError):
    """An evaluation ran past its evaluator's ``timeout`` (checked before every forward pass)."""


class DivergedError(FloatingPointError):
    """Training or validation produced a non-finite loss (the candidate cannot be scored)."""


def _guard_hook(deadline: float | None, timeout: float | None) -> Callable[..., None]:
    """A forward pre-hook: a requested Ctrl-C (:func:`autoprune.interrupts.check`) and the time limit."""
    def check(module: nn.Module, args: Any) -> None:
        interrupts.check()
        if deadline is not None and time.perf_counter() > deadline:
            raise TrialTimeout(f"evaluation exceeded the per-trial time limit of {timeout:g} s")
    return check


def was_pruned(result: EvalResult) -> bool:
    """True if ``result`` was cut short by its ``report`` callback (see the module docstring)."""
    return bool(result.extra.get("pruned", False))


# ----------------------------------------------------------------------------------------------------------
# Building blocks: BN recalibration, validation, SGD steps
# ----------------------------------------------------------------------------------------------------------


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """All BatchNorm modules of ``model`` (1d/2d/3d and SyncBatchNorm)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrate_bn(
    model: nn.Module, loader: Loader, batches: int, *, device: torch.device | str | None = None
) -> int:
    """Adaptive batch normalisation (EagleEye, ALGORITHMS.md §3) on ``model`` **in place**.

    Resets every BN layer's running statistics, sets ``momentum=None`` (cumulative average: every
    calibration batch counts equally), forwards ``batches`` batches of ``loader`` under ``no_grad`` with the BN
    layers in train mode and every other module in eval mode (dropout off, so the statistics are those seen at
    test time), then restores each BN's momentum and every module's mode. Parameters are never touched.

    Args:
        model: Network to recalibrate (modified in place; evaluators pass their private copy).
        loader: Training batches ``(x, y)`` (labels unused); re-iterated if it has fewer than ``batches``.
        batches: Number of calibration batches (≥ 1).
        device: Device of the forward passes (default: the model's).

    Returns:
        Number of samples forwarded.
    """
    if batches < 1:
        raise ConfigError(f"BN calibration needs at least one batch, got {batches}", hint="use batches >= 1")
    bns = batchnorm_layers(model)
    if not bns:
        return 0
    device = _model_device(model, device)
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    samples = 0
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for x, _ in _take(cycle_batches(loader), batches):
                model(x.to(device))
                samples += int(x.shape[0])
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        for m, mode in modes.items():
            m.training = mode
    return samples


def validate(
    model: nn.Module, loader: Loader, *, device: torch.device | str | None = None, max_batches: int | None = None
) -> tuple[float, float]:
    """Top-1 accuracy in [0, 1] and mean cross-entropy of ``model`` on ``loader`` (:func:`autoprune.train.evaluate`).

    Eval mode, no grad; the model's train/eval mode is restored afterwards.

    Args:
        model: The network.
        loader: Validation batches.
        device: Device (default: the model's).
        max_batches: Use at most this many batches.

    Raises:
        ConfigError: The loader yields no samples.
    """
    batches = loader if max_batches is None else _Limited(loader, max_batches)
    m = evaluate_metrics(model, batches, device=_model_device(model, device), desc="val")
    return float(m.top1), float(m.loss)


#: Ranking signals an evaluator can score with (its ``score`` setting), each in [0, 1], higher is better:
#: ``top1`` (accuracy, the default), ``soft_accuracy`` (mean softmax probability of the true class),
#: ``agreement`` (share of images whose top-1 class equals the dense model's) and ``kl`` (``exp(−KL(p_dense ‖
#: p_candidate))``, the distillation loss as a score). The last two compare with the dense model's outputs on
#: the same validation images, computed once.
SCORES = ("top1", "soft_accuracy", "agreement", "kl")
REFERENCE_SCORES = ("agreement", "kl")


def score_signals(model: nn.Module, loader: Loader, *, device: torch.device | str | None = None,
                  max_batches: int | None = None, reference: list[Tensor] | None = None) -> dict[str, float]:
    """Top-1, mean cross-entropy and the ranking signals of :data:`SCORES` of ``model`` on ``loader``.

    Args:
        model: The network (eval mode, no grad; its mode is restored).
        loader: Validation batches (the same batches in the same order on every call when ``reference`` is used).
        device: Device (default: the model's).
        max_batches: Use at most this many batches.
        reference: The dense model's logits per batch (:func:`reference_logits`); without it ``agreement`` and
            ``kl`` are absent.

    Raises:
        ConfigError: The loader yields no samples, or other batches than the reference was computed on.
    """
    dev = _model_device(model, device)
    was = model.training
    model.eval()
    n, top1, ce, soft, agree, kl = 0, 0.0, 0.0, 0.0, 0.0, 0.0
    try:
        with torch.inference_mode():
            batches = loader if max_batches is None else _Limited(loader, max_batches)
            for i, (x, y) in enumerate(batches):
                x, y = x.to(dev), y.to(dev)
                logits = model(x).float()
                logp = F.log_softmax(logits, dim=1)
                n += int(y.shape[0])
                top1 += float((logits.argmax(1) == y).sum())
                ce += float(F.nll_loss(logp, y, reduction="sum"))
                soft += float(logp.gather(1, y[:, None]).exp().sum())
                if reference is not None:
                    if i >= len(reference) or reference[i].shape[0] != y.shape[0]:
                        raise ConfigError("the validation loader yielded other batches than the dense model's "
                                          "reference outputs were computed on",
                                          hint="use a validation loader without shuffling")
                    ref = reference[i].to(dev).float()
                    agree += float((logits.argmax(1) == ref.argmax(1)).sum())
                    ref_logp = F.log_softmax(ref, dim=1)
                    kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
    finally:
        model.train(was)
    if n == 0:
        raise ConfigError("the validation loader yielded no samples", hint="check the dataset split")
    out = {"top1": top1 / n, "loss": ce / n, "soft_accuracy": soft / n}
    if reference is not None:
        out |= {"agreement": agree / n, "kl": math.exp(-kl / n), "kl_divergence": kl / n}
    return out


def reference_logits(model: nn.Module, loader: Loader, *, device: torch.device | str | None = None,
                     max_batches: int | None = None) -> list[Tensor]:
    """The logits of ``model`` (the dense network) per validation batch, on the CPU (eval mode, no grad)."""
    dev = _model_device(model, device)
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = loader if max_batches is None else _Limited(loader, max_batches)
            return [model(x.to(dev)).float().cpu() for x, _ in batches]
    finally:
        model.train(was)


class _Limited:
    """Re-iterable view of the first ``n`` batches of a loader."""

    def __init__(self, loader: Loader, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self) -> Iterator[Batch]:
        return itertools.islice(iter(self.loader), self.n)


@dataclass(frozen=True)
class SGDSettings:
    """Optimizer settings shared by the fine-tuning evaluators and the IMP driver.

    Attributes:
        lr: Initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay of the conv/linear weights (none on BN parameters and biases, the
            convention of :func:`autoprune.train.make_optimizer`).
        nesterov: Nesterov momentum.
        label_smoothing: Cross-entropy label smoothing.
        schedule: ``"constant"``, ``"cosine"`` or ``"step"`` (:func:`autoprune.train.lr_at`, per step over the
            planned steps).
    """

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    label_smoothing: float = 0.0
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be > 0, got {self.lr}", hint="e.g. lr=0.01")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ConfigError("momentum and weight_decay must be >= 0",
                              hint=f"got momentum={self.momentum}, weight_decay={self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown LR schedule {self.schedule!r}", hint=f"use one of {SCHEDULES}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("Nesterov momentum needs momentum > 0", hint="set momentum=0.9 or nesterov=False")


class StepTrainer:
    """Runs SGD steps on a model, cycling through a training loader; can be resumed chunk by chunk.

    Unlike :func:`autoprune.train.train_steps` (one call = one schedule, the loader restarted), a trainer keeps
    its optimizer state, LR-schedule position and loader position between :meth:`run` calls, which the
    evaluators and IMP need to check a criterion every R steps. Optimizer and schedule come from
    :mod:`autoprune.train` (``make_optimizer``, ``lr_at``).

    Args:
        model: The network to train (in place).
        loader: Re-iterable of training batches; restarted when exhausted.
        settings: Optimizer settings.
        total_steps: Length of the cosine schedule (ignored for ``"constant"``).
        device: Device of the steps (default: the model's).
        after_step: Optional callback run after every optimizer step (e.g. re-applying pruning masks).
        distill: Distillation settings (:mod:`autoprune.distill`); with ``weight > 0`` every step's loss mixes
            the cross-entropy with the KL divergence to ``teacher``'s outputs on the same batch.
        teacher: The teacher (a :class:`~autoprune.distill.Teacher`, or a model that is wrapped in one); needed
            when ``distill.weight > 0``.
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Loader,
        settings: SGDSettings,
        *,
        total_steps: int | None = None,
        device: torch.device | str | None = None,
        after_step: Callable[[], None] | None = None,
        distill: Distillation | None = None,
        teacher: Teacher | nn.Module | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.distill = distill if distill is not None and distill.enabled else None
        if self.distill is not None and teacher is None:
            raise ConfigError("distillation needs a teacher (the dense model)",
                              hint="pass teacher=the dense model, or distill weight 0")
        self.teacher = (teacher if isinstance(teacher, Teacher) or teacher is None
                        else Teacher(teacher, _model_device(model, device)))
        self.device = _model_device(model, device)
        self.after_step = after_step
        self.optimizer = make_optimizer(model, lr=settings.lr, momentum=settings.momentum,
                                        weight_decay=settings.weight_decay, nesterov=settings.nesterov)
        self.total_steps = total_steps
        self.steps = 0
        self.samples = 0
        self.loader = loader
        self._batches = cycle_batches(loader)
        self._start_epoch: int | None = None  # an epoch-seeded loader's epoch at the first step

    def state_dict(self) -> dict[str, Any]:
        """What continues this run exactly: model, optimizer, steps, the torch RNG and the loader's epoch."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "steps": self.steps,
                "samples": self.samples, "start_epoch": self._start_epoch or 0, "rng": torch.get_rng_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run saved by :meth:`state_dict`: with an epoch-seeded loader (``set_epoch``, ``len``) the
        next batch is the one the saved run would have taken next."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps, self.samples = int(state["steps"]), int(state["samples"])
        self._start_epoch = int(state["start_epoch"])
        torch.set_rng_state(state["rng"])
        per_epoch = _num_batches_of(self.loader)
        if per_epoch and hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self._start_epoch + self.steps // per_epoch)
            self._batches = cycle_batches(self.loader)
            for _ in range(self.steps % per_epoch):
                next(self._batches)

    def _lr(self) -> float:
        s = self.settings
        if s.schedule == "constant" or not self.total_steps:
            return s.lr
        return lr_at(s.lr, min(self.steps, self.total_steps) / self.total_steps, s.schedule)  # type: ignore[arg-type]

    def run(self, steps: int) -> float:
        """Run ``steps`` optimizer steps in train mode; return the mean training loss of the chunk."""
        self.model.train()
        total = 0.0
        if self._start_epoch is None:  # read when the first batch is taken (BN calibration may iterate first)
            self._start_epoch = int(getattr(self.loader, "epoch", 0))
        for _ in range(steps):
            interrupts.check()  # a Ctrl-C swallowed elsewhere still stops a fine-tune (export's too)
            x, y = next(self._batches)
            x, y = x.to(self.device), y.to(self.device)
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr()
            logits = self.model(x)
            if self.distill is not None:
                assert self.teacher is not None
                loss = distillation_loss(logits, self.teacher(x), y, self.distill,
                                         label_smoothing=self.settings.label_smoothing)
            else:
                loss = F.cross_entropy(logits, y, label_smoothing=self.settings.label_smoothing)
            if not torch.isfinite(loss):
                raise DivergedError(f"fine-tuning diverged: loss {float(loss.detach())} at step {self.steps + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.after_step is not None:
                self.after_step()
            self.steps += 1
            self.samples += int(x.shape[0])
            total += float(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        return total / max(steps, 1)


def _num_batches_of(loader: Loader) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def cycle_batches(loader: Loader) -> Iterator[Batch]:
    """Iterate ``loader`` forever (re-iterating it each pass); raise :class:`DataError` if it is empty."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the training loader yielded no batches", hint="pass a non-empty training loader")


def _take(it: Iterator[Batch], n: int) -> Iterator[Batch]:
    for _ in range(n):
        yield next(it)


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return resolve_device(device)
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What :meth:`Evaluator._run` returns; :meth:`Evaluator.evaluate` adds timing and the evaluator name."""

    accuracy: float
    loss: float
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Evaluator(ABC):
    """Scores a candidate network on the validation split.

    Subclasses implement :meth:`_run` (the only abstract method) on a private copy of the model.

    Args:
        train_loader: Training batches (BN calibration, fine-tuning, flow subsets); with test-time transforms
            for calibration, with augmentation for fine-tuning as the caller sees fit.
        val_loader: Validation batches (carved from the training set; never the test split).
        device: Device on which candidates are evaluated (default: CUDA if present, else CPU).
        val_batches: Score on at most this many validation batches (default: all).
        timeout: Per-evaluation time limit in seconds (default: none). It is checked before every forward
            pass of the candidate; an evaluation past it raises :class:`TrialTimeout` (a searcher records the
            candidate as a failed trial and goes on).
        score: The signal searches rank candidates by (:data:`SCORES`; default ``top1``, the accuracy). Any
            other is stored beside the accuracy as :attr:`EvalResult.score` and read by the rewards.
        reference_model: The dense network, for the scores that compare with it (``agreement``, ``kl``); its
            outputs on the validation images are computed once.

    A non-finite training or validation loss raises :class:`DivergedError` (also a failed trial).

    Class attributes (what a campaign reads to build the evaluator and to choose a pruner):

    Attributes:
        name: Registry name.
        needs_train: A training loader is required.
        trains: The evaluator trains the candidate, so it gets the augmented training loader (calibration-only
            evaluators get the training split with test-time transforms).
        reports_intermediate: Calls the ``report`` callback with intermediate values (Optuna pruning).
        needs_dense: Takes the dense network as ``dense=`` (unless given ``references=``).
        needs_flow_loader: Takes ``flow_loader=``, a training loader with test-time transforms.
    """

    name: ClassVar[str] = ""
    needs_train: ClassVar[bool] = True
    trains: ClassVar[bool] = False
    reports_intermediate: ClassVar[bool] = False
    needs_dense: ClassVar[bool] = False
    needs_flow_loader: ClassVar[bool] = False

    def __init__(
        self,
        train_loader: Loader | None = None,
        val_loader: Loader | None = None,
        *,
        device: torch.device | str | None = None,
        val_batches: int | None = None,
        timeout: float | None = None,
        score: str = "top1",
        reference_model: nn.Module | None = None,
    ) -> None:
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout}", hint="or leave it unset (no limit)")
        if score not in SCORES:
            raise ConfigError(f"unknown score {score!r}", hint=f"use one of {', '.join(SCORES)}")
        if score in REFERENCE_SCORES and reference_model is None:
            raise ConfigError(f"score {score!r} compares with the dense model, but no reference_model was given",
                              hint="pass reference_model= (a campaign passes its dense model itself)")
        self.timeout = timeout
        self.score = score
        self.reference_model = reference_model if score in REFERENCE_SCORES else None
        self._reference: list[Tensor] | None = None
        self._score_value: float | None = None
        if val_loader is None:
            raise ConfigError(f"evaluator {self.name!r} needs a validation loader",
                              hint="pass val_loader= (a loader over the validation split)")
        if self.needs_train and train_loader is None:
            raise ConfigError(f"evaluator {self.name!r} needs a training loader",
                              hint="pass train_loader= (a loader over the training split)")
        if val_batches is not None and val_batches < 1:
            raise ConfigError(f"val_batches must be >= 1, got {val_batches}", hint="or leave it unset (all)")
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = resolve_device(device)
        self.val_batches = val_batches

    def evaluate(self, model: nn.Module, *, key: str | None = None, report: ReportFn | None = None) -> EvalResult:
        """Score ``model`` on the validation split.

        The caller's model is never mutated: the evaluator deep-copies it (to its device) and works on the
        copy.

        Args:
            model: The candidate network (already pruned / quantized).
            key: Candidate key (``Candidate.key()``), recorded in ``extra["key"]`` and used by caches.
            report: Optional ``report(step, value) -> bool`` callback; see the module docstring.

        Returns:
            An :class:`~autoprune.types.EvalResult` (accuracy in [0, 1]).
        """
        start = time.perf_counter()
        work = copy.deepcopy(model).to(self.device)
        deadline = None if self.timeout is None else start + self.timeout
        work.register_forward_pre_hook(_guard_hook(deadline, self.timeout))
        self._score_value = None
        out = self._run(work, report)
        if not math.isfinite(out.loss):
            raise DivergedError(f"the candidate's validation loss is {out.loss} (diverged or non-finite outputs)")
        extra = dict(out.extra)
        extra.setdefault("pruned", False)
        if key is not None:
            extra["key"] = key
        score = None if self.score == "top1" or self._score_value is None else float(self._score_value)
        return EvalResult(float(out.accuracy), float(out.loss), time.perf_counter() - start, int(out.samples),
                          self.name, extra, score)

    @abstractmethod
    def _run(self, model: nn.Module, report: ReportFn | None) -> Outcome:
        """Score ``model`` (a private copy, free to modify) and return an :class:`Outcome`."""

    def _validate(self, model: nn.Module) -> tuple[float, float]:
        """Top-1 and mean cross-entropy on the validation batches; with a ``score`` other than ``top1`` the same
        forward pass also yields that signal (kept for :meth:`evaluate`)."""
        if self.score == "top1":
            return validate(model, self.val_loader or [], device=self.device, max_batches=self.val_batches)
        if self.reference_model is not None and self._reference is None:
            self._reference = reference_logits(self.reference_model, self.val_loader or [], device=self.device,
                                               max_batches=self.val_batches)
        sig = score_signals(model, self.val_loader or [], device=self.device, max_batches=self.val_batches,
                            reference=self._reference)
        self._score_value = sig[self.score]
        return sig["top1"], sig["loss"]

    def _pruned(self, accuracy: float, loss: float, samples: int, step: int, **extra: Any) -> Outcome:
        return Outcome(accuracy, loss, samples, {"pruned": True, "stop_reason": PRUNED, "steps": step, **extra})


@EVALUATORS.register("plain")
class PlainEvaluator(Evaluator):
    """No recalibration: validation accuracy with the statistics the network carries."""

    name = "plain"
    needs_train = False

    def _run(self, model: nn.Module, report: ReportFn | None) -> Outcome:
        acc, loss = self._validate(model)
        return Outcome(acc, loss, 0)


@EVALUATORS.register("adaptive_bn")
class AdaptiveBNEvaluator(Evaluator):
    """EagleEye adaptive BN: re-estimate BN statistics on N training batches, then score (§3).

    Args:
        batches: Calibration batches (default 100, with the train loader's batch size, e.g. 128).
        **kwargs: :class:`Evaluator` arguments.
    """

    name = "adaptive_bn"

    def __init__(self, train_loader: Loader | None = None, val_loader: Loader | None = None, *,
                 batches: int = 100, **kwargs: Any) -> None:
        super().__init__(train_loader, val_loader, **kwargs)
        if batches < 1:
            raise ConfigError(f"adaptive_bn needs batches >= 1, got {batches}", hint="e.g. batches=100")
        self.batches = batches

    def _run(self, model: nn.Module, report: ReportFn | None) -> Outcome:
        samples = recalibrate_bn(model, self.train_loader or [], self.batches, device=self.device)
        acc, loss = self._validate(model)
        return Outcome(acc, loss, samples, {"bn_layers": len(batchnorm_layers(model))})


class TrainingEvaluator(Evaluator):
    """Base of the evaluators that train; its public :meth:`fine_tune` trains the caller's model in place.

    It holds the optimizer settings and the optional BN calibration before training: ``bn_calibration`` > 0
    runs adaptive BN on that many batches of ``bn_loader`` (default: the training loader; pass one with
    test-time transforms) before the first step. Subclasses implement :meth:`_train`.
    """

    trains = True
    reports_intermediate = True

    def __init__(
        self,
        train_loader: Loader | None = None,
        val_loader: Loader | None = None,
        *,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        label_smoothing: float = 0.0,
        schedule: str = "constant",
        bn_calibration: int = 0,
        bn_loader: Loader | None = None,
        distill: float = 0.0,
        distill_temperature: float = 4.0,
        teacher: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_loader, val_loader, **kwargs)
        self.sgd = SGDSettings(lr, momentum, weight_decay, nesterov, label_smoothing, schedule)
        if bn_calibration < 0:
            raise ConfigError(f"bn_calibration must be >= 0 batches, got {bn_calibration}", hint="0 disables it")
        self.bn_calibration = bn_calibration
        self.bn_loader = bn_loader if bn_loader is not None else train_loader
        self.distill = Distillation(float(distill), float(distill_temperature))
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise ConfigError(f"teacher must be a model, got {type(teacher).__name__}",
                              hint="leave `teacher` out: campaigns pass the dense model when distill > 0")
        if self.distill.enabled and teacher is None:
            raise ConfigError(f"distill={distill}: distillation needs the dense model as the teacher",
                              hint="campaigns pass it; in Python pass teacher=the dense model, or distill=0")
        self.teacher = Teacher(teacher, self.device) if self.distill.enabled and teacher is not None else None

    def fine_tune(self, model: nn.Module, *, report: ReportFn | None = None) -> Outcome:
        """Fine-tune ``model`` **in place** with this evaluator's schedule, then score it on the validation split.

        Unlike :meth:`evaluate` (which works on a copy and only returns the score), the caller keeps the trained
        weights; ``model`` is moved to the evaluator's device. No per-evaluation time limit applies.

        Args:
            model: The network to train (modified in place).
            report: Optional ``report(step, value) -> bool`` callback (see the module docstring).

        Returns:
            The :class:`Outcome` (accuracy, loss, training samples, evaluator-specific ``extra``).
        """
        if self.teacher is None:
            return self._train(model.to(self.device), report)
        self.teacher.seconds, self.teacher.batches = 0.0, 0
        outcome = self._train(model.to(self.device), report)
        outcome.extra["distill"] = {"weight": self.distill.weight, "temperature": self.distill.temperature,
                                    "teacher_seconds": self.teacher.seconds, "teacher_batches": self.teacher.batches}
        return outcome

    def _run(self, model: nn.Module, report: ReportFn | None) -> Outcome:
        return self.fine_tune(model, report=report)

    @abstractmethod
    def _train(self, model: nn.Module, report: ReportFn | None) -> Outcome:
        """Train ``model`` (already on the evaluator's device) and score it."""

    def _start(self, model: nn.Module, total_steps: int) -> StepTrainer:
        trainer = StepTrainer(model, self.train_loader or [], self.sgd, total_steps=total_steps, device=self.device,
                              distill=self.distill, teacher=self.teacher)
        if self.bn_calibration:
            trainer.samples += recalibrate_bn(model, self.bn_loader or [], self.bn_calibration, device=self.device)
        return trainer


@EVALUATORS.register("finetune")
class FineTuneEvaluator(TrainingEvaluator):
    """K steps of SGD fine-tuning, then validation accuracy; reports every R steps.

    Args:
        steps: Fine-tuning steps K (≥ 1).
        report_every: Report the validation accuracy every R steps (only when a ``report`` callback is given).
        **kwargs: Optimizer settings (``lr``, ``momentum``, ``weight_decay``, ``nesterov``, ``label_smoothing``,
            ``schedule``), ``bn_calibration`` batches (of ``bn_loader``) before training, and :class:`Evaluator`
            arguments.
    """

    name = "finetune"

    def __init__(self, train_loader: Loader | None = None, val_loader: Loader | None = None, *,
                 steps: int = 200, report_every: int = 50, **kwargs: Any) -> None:
        super().__init__(train_loader, val_loader, **kwargs)
        if steps < 1 or report_every < 1:
            raise ConfigError(f"finetune needs steps >= 1 and report_every >= 1, got {steps} and {report_every}",
                              hint="e.g. steps=200, report_every=50")
        self.steps = steps
        self.report_every = report_every

    def _train(self, model: nn.Module, report: ReportFn | None) -> Outcome:
        trainer = self._start(model, self.steps)
        while trainer.steps < self.steps:
            trainer.run(min(self.report_every, self.steps - trainer.steps))
            if report is not None:
                acc, loss = self._validate(model)
                if report(trainer.steps, acc):
                    return self._pruned(acc, loss, trainer.samples, trainer.steps)
        acc, loss = self._validate(model)
        return Outcome(acc, loss, trainer.samples, {"steps": trainer.steps})


@EVALUATORS.register("full")
class FullFineTuneEvaluator(TrainingEvaluator):
    """Fixed-schedule fine-tuning for final models: ``epochs`` epochs, cosine LR; reports every epoch.

    With ``checkpoint`` (a file path) the run is saved after every epoch (model, optimizer, step, RNG and data
    position) and a new run with the same ``checkpoint_key`` and settings continues after the last saved epoch,
    with the same result as an uninterrupted run (an epoch-seeded loader such as :class:`autoprune.data.
    BatchLoader` replays the same batches).

    Args:
        epochs: Number of epochs (each ``len(train_loader)`` steps, or ``steps_per_epoch``).
        steps_per_epoch: Steps per epoch when the loader has no ``len()``.
        checkpoint: File to save the run to after every epoch and to resume it from.
        checkpoint_key: What the run is (e.g. the candidate); a checkpoint of another key is not resumed.
        **kwargs: Optimizer settings (schedule defaults to ``"cosine"``, lr to 0.01), :class:`Evaluator`
            arguments.
    """

    name = "full"

    def __init__(self, train_loader: Loader | None = None, val_loader: Loader | None = None, *,
                 epochs: int = 30, steps_per_epoch: int | None = None, schedule: str = "cosine",
                 checkpoint: str | None = None, checkpoint_key: str = "", **kwargs: Any) -> None:
        super().__init__(train_loader, val_loader, schedule=schedule, **kwargs)
        self.checkpoint = Path(str(checkpoint)) if checkpoint else None
        self.checkpoint_key = str(checkpoint_key)
        if epochs < 1:
            raise ConfigError(f"full fine-tuning needs epochs >= 1, got {epochs}", hint="e.g. epochs=30")
        if steps_per_epoch is None:
            try:
                steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
            except TypeError:
                raise ConfigError("the training loader has no len()",
                                  hint="pass steps_per_epoch= to the 'full' evaluator") from None
        if steps_per_epoch < 1:
            raise ConfigError("the training loader is empty", hint="pass a non-empty training loader")
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch

    def _resume(self, model: nn.Module) -> tuple[StepTrainer, int] | None:
        """The trainer and the last completed epoch saved in :attr:`checkpoint`, if it is this run's."""
        if self.checkpoint is None or not self.checkpoint.is_file():
            return None
        try:
            saved = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        except Exception:  # a checkpoint cut short by a kill: start again
            return None
        if not isinstance(saved, dict) or saved.get("key") != self._key():
            return None
        trainer = StepTrainer(model, self.train_loader or [], self.sgd, total_steps=self.epochs * self.steps_per_epoch,
                              device=self.device, distill=self.distill, teacher=self.teacher)
        trainer.load_state_dict(saved["trainer"])
        return trainer, int(saved["epoch"])

    def _key(self) -> str:
        return f"{self.checkpoint_key}|{self.epochs}|{self.steps_per_epoch}|{self.sgd}|{self.distill}"

    def _save(self, trainer: StepTrainer, epoch: int) -> None:
        if self.checkpoint is None:
            return
        buf = io.BytesIO()
        torch.save({"key": self._key(), "epoch": epoch, "trainer": trainer.state_dict()}, buf)
        atomic_write(self.checkpoint, buf.getvalue())

    def _train(self, model: nn.Module, report: ReportFn | None) -> Outcome:
        resumed = self._resume(model)
        trainer, done = resumed if resumed is not None else (self._start(model, self.epochs * self.steps_per_epoch), 0)
        if done and callable(getattr(self.train_loader, "resumed_at_step", None)):
            self.train_loader.resumed_at_step(trainer.steps)  # type: ignore[union-attr]  # progress lines go on
        history: list[float] = []
        for epoch in range(done + 1, self.epochs + 1):
            trainer.run(self.steps_per_epoch)
            self._save(trainer, epoch)
            if report is not None:
                acc, loss = self._validate(model)
                history.append(acc)
                if report(epoch, acc):
                    return self._pruned(acc, loss, trainer.samples, trainer.steps, epochs=epoch, history=history)
        acc, loss = self._validate(model)
        return Outcome(acc, loss, trainer.samples, {"steps": trainer.steps, "epochs": self.epochs,
                                                    "resumed_after_epoch": done})


@EVALUATORS.register("infcop")
class InfCoPEvaluator(TrainingEvaluator):
    """Fine-tune until the candidate's flow is consistent with the dense network's, then score (§4).

    Every ``check_every`` steps the candidate's information flow and/or gradient flow is measured on the
    fixed flow subset and compared with the dense reference (hooks attached only while measuring). Training
    stops at the earliest of: all flows consistent (``"consistent"``), validation accuracy ≥
    ``target_accuracy`` (``"accuracy"``), ``max_steps`` used (``"budget"``). A NaN correlation counts as not
    consistent. ``extra`` holds ``stop_reason``, ``steps`` and ``trajectory`` (one entry per check: step,
    distance per flow kind — ``None`` for NaN —, consistency, and the validation accuracy when measured).

    The dense references are computed once (lazily, from ``dense``) and reused for every candidate, or
    passed in ready-made (``references``) to share them across evaluators.

    Args:
        dense: The dense network (needed unless ``references`` is given, or ``target_accuracy="dense"``).
        flow: ``"IF"``, ``"GF"`` or ``"both"`` (both must be consistent).
        references: Pre-computed :class:`~autoprune.infcop.FlowReference` objects (override ``flow``).
        flow_loader: Source of the fixed flow subset (default: ``train_loader``; use test-time transforms).
        flow_samples: Size of the flow subset.
        eps: Tolerance; a float for one kind, or a mapping kind → ε (default 1.0 IF, 0.5 GF).
        form: Distance form ``"l2"`` (reference), ``"rms"`` or ``"relative"``.
        reduce: IF reduction per pair (``"mean"`` signed, or ``"abs"``).
        stat: GF statistic (``"mean"`` or ``"fro"``).
        check_every: Steps R between checks.
        max_steps: Step budget.
        target_accuracy: Stop when val accuracy ≥ this; ``"dense"`` = the dense network's val accuracy
            (measured once); ``None`` disables the rule.
        **kwargs: Optimizer settings, ``bn_calibration`` and :class:`Evaluator` arguments.
    """

    name = "infcop"
    needs_dense = True
    needs_flow_loader = True

    def __init__(
        self,
        train_loader: Loader | None = None,
        val_loader: Loader | None = None,
        *,
        dense: nn.Module | None = None,
        flow: str = "IF",
        references: Sequence[FlowReference] | None = None,
        flow_loader: Loader | None = None,
        flow_samples: int = 2000,
        eps: float | Mapping[str, float] | None = None,
        form: str = "l2",
        reduce: str = "mean",
        stat: str = "mean",
        check_every: int = 50,
        max_steps: int = 1000,
        target_accuracy: float | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_loader, val_loader, **kwargs)
        kinds = ("IF", "GF") if flow == "both" else (flow,)
        if any(k not in FLOW_KINDS for k in kinds):
            raise ConfigError(f"unknown flow {flow!r}", hint="use 'IF', 'GF' or 'both'")
        if form not in DISTANCE_FORMS:
            raise ConfigError(f"unknown flow distance form {form!r}", hint=f"use one of {DISTANCE_FORMS}")
        if check_every < 1 or max_steps < 1:
            raise ConfigError(f"infcop needs check_every >= 1 and max_steps >= 1, got {check_every}, {max_steps}",
                              hint="e.g. check_every=50, max_steps=1000")
        if references is None and dense is None:
            raise ConfigError("the infcop evaluator needs the dense network or pre-computed references",
                              hint="pass dense=<the unpruned model> or references=[FlowReference, ...]")
        if isinstance(target_accuracy, str) and target_accuracy != "dense":
            raise ConfigError(f"unknown target_accuracy {target_accuracy!r}", hint="use a float, 'dense' or None")
        if target_accuracy == "dense" and dense is None:
            raise ConfigError("target_accuracy='dense' needs the dense network", hint="pass dense=")
        self.kinds = tuple(r.kind for r in references) if references is not None else kinds
        self._eps = {k: (eps.get(k, DEFAULT_EPS[k]) if isinstance(eps, Mapping)
                         else DEFAULT_EPS[k] if eps is None else float(eps)) for k in self.kinds}
        self._references: list[FlowReference] | None = list(references) if references is not None else None
        self._dense = copy.deepcopy(dense) if dense is not None and (references is None or
                                                                     target_accuracy == "dense") else None
        self.flow_loader = flow_loader if flow_loader is not None else train_loader
        self.flow_samples = flow_samples
        self.form, self.reduce, self.stat = form, reduce, stat
        self.check_every, self.max_steps = check_every, max_steps
        self._target = target_accuracy

    def references(self) -> list[FlowReference]:
        """The dense flow references, computed on first use and cached for every later candidate."""
        if self._references is None:
            assert self._dense is not None
            dense = self._dense.to(self.device)
            self._references = [
                FlowReference.compute(dense, self.flow_loader or [], kind, max_samples=self.flow_samples,
                                      eps=self._eps[kind], form=self.form, reduce=self.reduce, stat=self.stat,
                                      device=self.device)
                for kind in self.kinds
            ]
        return self._references

    def target_accuracy(self) -> float | None:
        """The accuracy stop threshold (measured once on the dense network for ``"dense"``)."""
        if self._target == "dense":
            assert self._dense is not None
            self._target = self._validate(self._dense.to(self.device))[0]
        return None if self._target is None else float(self._target)

    def _train(self, model: nn.Module, report: ReportFn | None) -> Outcome:
        refs = self.references()
        target = self.target_accuracy()
        trainer = self._start(model, self.max_steps)
        flow_samples = 0
        trajectory: list[dict[str, Any]] = []
        reason = "budget"
        while trainer.steps < self.max_steps:
            trainer.run(min(self.check_every, self.max_steps - trainer.steps))
            checks = [ref.check(model, device=self.device) for ref in refs]
            flow_samples += sum(c.samples for c in checks)
            consistent = all(c.consistent for c in checks)
            entry: dict[str, Any] = {
                "step": trainer.steps,
                "distance": {c.kind: (None if math.isnan(c.distance) else c.distance) for c in checks},
                "consistent": consistent,
            }
            trajectory.append(entry)
            if report is not None or target is not None:
                acc, loss = self._validate(model)
                entry["accuracy"] = acc
                if report is not None and report(trainer.steps, acc):
                    return self._pruned(acc, loss, trainer.samples + flow_samples, trainer.steps,
                                        trajectory=trajectory)
                if not consistent and target is not None and acc >= target:
                    reason = "accuracy"
                    break
            if consistent:
                reason = "consistent"
                break
        acc, loss = self._validate(model)
        extra = {"stop_reason": reason, "steps": trainer.steps, "trajectory": trajectory,
                 "train_samples": trainer.samples, "flow_samples": flow_samples,
                 "eps": dict(self._eps), "form": self.form}
        return Outcome(acc, loss, trainer.samples + flow_samples, extra)


def make_evaluator(name: str, train_loader: Loader | None = None, val_loader: Loader | None = None,
                   **settings: Any) -> Evaluator:
    """Build the evaluator registered as ``name``.

    Raises:
        ConfigError: Unknown name (lists the choices), a setting the evaluator does not accept, or a value whose
            type does not match the setting's default (e.g. ``batches: null`` or ``steps: "ten"``).
    """
    cls = EVALUATORS.get(name)
    defaults = _setting_defaults(cls)
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ConfigError(f"evaluator {name!r} does not accept {unknown}",
                          hint=f"accepted settings: {', '.join(sorted(defaults))}")
    for key, value in settings.items():
        expected = _expected_type(defaults[key], value)
        if expected is not None:
            raise ConfigError(f"evaluator {name!r}: {key} must be {expected}, got {value!r}",
                              hint=f"the default is {key}={defaults[key]!r}")
    return cls(train_loader, val_loader, **settings)


def _setting_defaults(cls: type[Evaluator]) -> dict[str, Any]:
    """Keyword-only constructor settings of ``cls`` and its bases, with their defaults (subclass wins)."""
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                defaults[p.name] = p.default
    return defaults


def _expected_type(default: Any, value: Any) -> str | None:
    """What a setting with ``default`` must be when ``value`` does not fit it (``None``: it fits or is unchecked).

    Only scalar defaults are checked: a bool needs a bool, an int an int (not a bool), a float any number, a
    string a string. Settings whose default is ``None`` or a collection are left to the evaluator.
    """
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    return None
