"""Training and evaluation loops: SGD with per-iteration LR schedules, resumable checkpoints, metrics.

* :func:`train` — epochs of SGD (momentum, optional Nesterov, weight decay that by default skips BN and bias
  parameters, label smoothing), the LR set every iteration from a ``"cosine"``, ``"step"`` or ``"constant"``
  schedule with optional linear warm-up, validation and a progress line after every epoch, an atomic checkpoint
  after every epoch (model, optimizer, epoch, RNG states, history) and exact resumption from it, callbacks for
  early stopping or Optuna pruning.
* :func:`train_steps` — a fixed number of SGD steps cycling over a loader: the short fine-tune that
  evaluators use (it does not checkpoint).
* :func:`evaluate` — top-1 / top-5 / loss / per-class accuracy under ``torch.inference_mode``.
* :func:`watch_training` — progress lines (epoch, loss, accuracy, learning rate, seconds) for a training loop
  run elsewhere (the evaluators' fine-tunes).

Progress follows :func:`autoprune.utils.progress_mode`: per-batch bars on a terminal, and one line per epoch
(``train``) on stdout in every mode but ``--quiet``.

A "loader" is any re-iterable of ``(x, y)`` batches (float images in [0, 1], int64 labels), e.g.
:func:`autoprune.data.make_loader` or a list of tensors. If it has ``set_epoch(epoch)`` it is called before
each epoch, which makes shuffling reproducible across resumption.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from autoprune import interrupts
from autoprune.errors import ConfigError
from autoprune.models.checkpoint import load_checkpoint, save_checkpoint
from autoprune.utils import default_device, progress, progress_line, resolve_device, seed_everything

log = logging.getLogger(__name__)

Schedule = Literal["cosine", "step", "constant"]
SCHEDULES: tuple[str, ...] = ("cosine", "step", "constant")
STEP_MILESTONES: tuple[float, ...] = (0.5, 0.75)
"""Fractions of training after which the ``"step"`` schedule multiplies the LR by :data:`STEP_GAMMA`."""
STEP_GAMMA = 0.1

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Metrics:
    """Classification metrics over one pass of a loader.

    Attributes:
        top1: Fraction of samples whose top prediction is right (0–1).
        top5: Fraction whose label is among the 5 highest logits (top-``num_classes`` if fewer than 5).
        loss: Mean cross-entropy (no label smoothing).
        per_class: Accuracy of each class, in label order (``nan`` for a class with no samples).
        samples: Number of samples seen.
    """

    top1: float
    top5: float
    loss: float
    per_class: tuple[float, ...]
    samples: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {**asdict(self), "per_class": list(self.per_class)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Metrics:
        """Inverse of :meth:`to_dict`."""
        return cls(float(d["top1"]), float(d["top5"]), float(d["loss"]), tuple(d["per_class"]), int(d["samples"]))


@dataclass(frozen=True)
class EpochStats:
    """What happened in one training epoch.

    Attributes:
        epoch: 1-based epoch number.
        lr: Learning rate of the epoch's last step.
        train_loss: Mean training loss (with label smoothing, as optimised).
        train_top1: Training accuracy of the batches as they were seen (augmented, model in train mode).
        seconds: Wall time of the epoch including validation.
        val: Validation metrics, if a validation loader was given.
    """

    epoch: int
    lr: float
    train_loss: float
    train_top1: float
    seconds: float
    val: Metrics | None = None

    def flat(self) -> dict[str, float]:
        """Flat numbers for callbacks and logs (``val_top1``, ``val_loss``, ... when validated)."""
        out = {"epoch": float(self.epoch), "lr": self.lr, "train_loss": self.train_loss, "train_top1": self.train_top1}
        if self.val is not None:
            out.update(val_top1=self.val.top1, val_top5=self.val.top5, val_loss=self.val.loss)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        d = asdict(self)
        d["val"] = self.val.to_dict() if self.val is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpochStats:
        """Inverse of :meth:`to_dict`."""
        val = Metrics.from_dict(d["val"]) if d.get("val") else None
        return cls(
            int(d["epoch"]), float(d["lr"]), float(d["train_loss"]), float(d["train_top1"]), float(d["seconds"]), val
        )


@dataclass
class TrainHistory:
    """The record of a :func:`train` run (including epochs done before a resumption).

    Attributes:
        epochs: One :class:`EpochStats` per completed epoch.
        stopped_early: A callback asked to stop.
        resumed_from: Completed epochs found in the checkpoint when resuming, else ``None``.
    """

    epochs: list[EpochStats] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from: int | None = None

    @property
    def last(self) -> EpochStats | None:
        """The last completed epoch."""
        return self.epochs[-1] if self.epochs else None

    @property
    def best_val(self) -> Metrics | None:
        """The validation metrics with the highest top-1, if any epoch was validated."""
        vals = [e.val for e in self.epochs if e.val is not None]
        return max(vals, key=lambda m: m.top1) if vals else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "epochs": [e.to_dict() for e in self.epochs],
            "stopped_early": self.stopped_early,
            "resumed_from": self.resumed_from,
        }


@runtime_checkable
class Callback(Protocol):
    """Called after every epoch (after the checkpoint is written).

    ``on_epoch_end(epoch, metrics)`` gets the 1-based epoch and :meth:`EpochStats.flat`; returning ``True``
    stops training. Raising (e.g. ``optuna.TrialPruned``) aborts it; the checkpoint of that epoch is kept.
    """

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> bool | None: ...


class EarlyStopping:
    """Stop when a monitored metric has not improved for ``patience`` epochs.

    Args:
        monitor: Key of :meth:`EpochStats.flat`, e.g. ``"val_top1"`` or ``"train_loss"``.
        patience: Epochs without improvement before stopping.
        mode: ``"max"`` if larger is better, ``"min"`` otherwise.
        min_delta: Smallest change that counts as an improvement.
    """

    def __init__(
        self, monitor: str = "val_top1", patience: int = 5, mode: Literal["max", "min"] = "max", min_delta: float = 0.0
    ) -> None:
        if mode not in ("max", "min"):
            raise ConfigError(f"EarlyStopping mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.best: float | None = None
        self.bad_epochs = 0

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        if self.monitor not in metrics:
            raise ConfigError(
                f"EarlyStopping monitors {self.monitor!r}, which this run does not report",
                hint=f"available: {', '.join(sorted(metrics))} (val_* needs a validation loader)",
            )
        value = metrics[self.monitor]
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.bad_epochs = value, 0
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience


# --------------------------------------------------------------------------------------------- schedules


def lr_at(base_lr: float, fraction: float, schedule: Schedule = "cosine", warmup: float = 0.0) -> float:
    """Learning rate after ``fraction`` (0–1) of training.

    Args:
        base_lr: Peak learning rate.
        fraction: Progress through training, ``steps_done / total_steps``.
        schedule: ``"cosine"`` (to 0), ``"step"`` (×0.1 at 50 % and 75 %) or ``"constant"``.
        warmup: Fraction of training spent ramping linearly up to ``base_lr``.
    """
    if warmup > 0 and fraction < warmup:
        return base_lr * (fraction + 1e-12) / warmup
    if schedule == "cosine":
        span = max(1e-12, 1.0 - warmup)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (fraction - warmup) / span)))
    if schedule == "step":
        return base_lr * STEP_GAMMA ** sum(fraction >= m for m in STEP_MILESTONES)
    if schedule == "constant":
        return base_lr
    raise ConfigError(f"unknown LR schedule {schedule!r}", hint=f"choose one of {', '.join(SCHEDULES)}")


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    decay_norm_and_bias: bool = False,
) -> torch.optim.SGD:
    """SGD over the trainable parameters; by default no weight decay on 1-D tensors (BN weights, biases).

    Args:
        model: The model.
        lr: Learning rate.
        momentum: Momentum.
        weight_decay: L2 penalty of the conv/linear weights.
        nesterov: Use Nesterov momentum (needs ``momentum > 0``).
        decay_norm_and_bias: Apply ``weight_decay`` to BN parameters and biases as well.
    """
    if lr <= 0 or not math.isfinite(lr):
        raise ConfigError(f"learning rate must be positive, got {lr}")
    if momentum < 0 or weight_decay < 0:
        raise ConfigError(f"momentum and weight decay must be ≥ 0, got {momentum} and {weight_decay}")
    if nesterov and momentum == 0:
        raise ConfigError("Nesterov momentum needs momentum > 0")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim > 1 or decay_norm_and_bias]
    no_decay = [p for p in params if not (p.ndim > 1 or decay_norm_and_bias)]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as plain types and tensors (checkpoint-safe)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [
            np_kind,
            torch.from_numpy(np.asarray(np_keys).astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- loops


def _num_batches(loader: Iterable[Batch]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _to(batch: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch[0], batch[1]
    nb = device.type == "cuda"
    return x.to(device, non_blocking=nb), y.to(device, non_blocking=nb)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return default_device()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    return resolve_device(device)


@dataclass(frozen=True)
class StepStats:
    """Result of :func:`train_steps`.

    Attributes:
        steps: Optimizer steps taken.
        loss: Mean training loss over those steps.
        top1: Training accuracy over the batches seen.
        samples: Samples seen.
        seconds: Wall time.
    """

    steps: int
    loss: float
    top1: float
    samples: int
    seconds: float


class _Running:
    """Sums of loss, correct predictions and samples, kept on the device to avoid a sync per step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.samples = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = y.shape[0]
        self.loss += loss.detach().double() * n
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.samples += n

    def means(self) -> tuple[float, float]:
        if self.samples == 0:
            return float("nan"), float("nan")
        return self.loss.item() / self.samples, self.correct.item() / self.samples


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    running: _Running,
) -> None:
    interrupts.check()  # a Ctrl-C swallowed elsewhere still stops training (see autoprune.interrupts)
    logits = model(x)
    loss = criterion(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    running.add(loss, logits, y)


def _check_finite(loss: float, where: str, lr: float) -> None:
    if not math.isfinite(loss):
        raise ConfigError(
            f"training diverged: the loss became {loss} ({where})",
            hint=f"lower the learning rate (it was {lr:g}) or check the data",
        )


def train_steps(
    model: nn.Module,
    loader: Iterable[Batch],
    steps: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.0,
    schedule: Schedule = "constant",
    device: str | torch.device | None = None,
    desc: str = "fine-tune",
) -> StepStats:
    """Take exactly ``steps`` SGD steps, cycling over ``loader`` as often as needed (short fine-tunes).

    Args:
        model: Trained in place (left in train mode on ``device``).
        loader: Re-iterable of ``(x, y)`` batches.
        steps: Number of optimizer steps (0 does nothing).
        optimizer: Optimizer to use; default: :func:`make_optimizer` with ``lr``/``momentum``/``weight_decay``.
        lr: Base learning rate; default: the given optimizer's own per-group LRs, else 0.01. The schedule
            scales it every step.
        momentum: Momentum of the default optimizer.
        weight_decay: Weight decay of the default optimizer.
        label_smoothing: Label smoothing of the cross-entropy.
        schedule: LR schedule over the ``steps`` (``"constant"`` by default).
        device: Where to train; default: the model's current device.
        desc: Progress-bar label.

    Raises:
        ConfigError: Negative ``steps``, an empty loader, or a diverging loss.
    """
    if steps < 0:
        raise ConfigError(f"steps must be ≥ 0, got {steps}")
    dev = resolve_device(device) if device is not None else _model_device(model)
    model.to(dev)
    opt = optimizer or make_optimizer(model, lr=lr or 0.01, momentum=momentum, weight_decay=weight_decay)
    base_lrs = [float(lr if lr is not None else g["lr"]) for g in opt.param_groups]
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    running = _Running(dev)
    start = time.perf_counter()
    model.train()

    def cycle() -> Iterable[Batch]:
        while True:
            yielded = False
            for batch in loader:
                yielded = True
                yield batch
            if not yielded:
                raise ConfigError("the fine-tuning loader yielded no batches", hint="check the dataset split")

    for step, batch in zip(progress(range(steps), desc=desc, total=steps), cycle()):
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = lr_at(base, step / max(1, steps), schedule)
        x, y = _to(batch, dev)
        _step(model, opt, criterion, x, y, running)
    loss, top1 = running.means()
    if steps:
        _check_finite(loss, f"{steps} fine-tuning steps", max(base_lrs))
    return StepStats(steps, loss, top1, running.samples, time.perf_counter() - start)


class _LabelTap:
    """A view of a loader that remembers the labels of the batch it handed out last (everything else delegated)."""

    def __init__(self, loader: Iterable[Batch], on_resume: Callable[[int], None] | None = None) -> None:
        self.loader = loader
        self.labels: torch.Tensor | None = None
        self._on_resume = on_resume

    def resumed_at_step(self, steps: int) -> None:
        """Told by a loop that continues a saved run: ``steps`` optimizer steps were taken before it."""
        if self._on_resume is not None:
            self._on_resume(int(steps))

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            self.labels = batch[1]
            yield batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (e.g. while copying)
            raise AttributeError(name)
        return getattr(self.loader, name)


def _short(x: float) -> str:
    """``3.0`` → ``"3"``, ``0.25`` → ``"0.25"``, ``1.333`` → ``"1.33"``."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextmanager
def watch_training(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    total_steps: int | None,
    steps_per_epoch: int | None = None,
    desc: str = "fine-tune",
) -> Iterator[Iterable[Batch]]:
    """Progress lines (:func:`~autoprune.utils.progress_line`) for a training loop that runs elsewhere.

    For loops this module does not run, such as an evaluator's fine-tune
    (:meth:`autoprune.evaluate.TrainingEvaluator.fine_tune`): inside the block, every optimizer step on
    ``model``'s parameters is counted (``torch.optim`` step hooks), and the training loss and accuracy are read
    from ``model``'s outputs in train mode with gradients on and the labels of the yielded loader. A line is
    printed per epoch, or four times in all when fewer steps than one epoch are run (fractional epochs), and
    once more at the end if steps were taken since the last line::

        fine-tune epoch 3/30 (step 1173/11730): loss 0.4123, train acc 86.12 %, lr 0.00875, 95.2 s, about 17 min left

    A loop that continues a saved run calls ``resumed_at_step(steps)`` on the yielded loader once it has loaded
    the run: the lines then count from there (epoch 11/30 after 10 saved epochs, not 1/30) and the time left is
    estimated from the steps of this run only.

    Nothing about the training changes: the same batches, in the same order, and no extra computation on the
    model (the loss of the lines is computed from the logits the loop produced anyway).

    Args:
        model: The network being trained.
        loader: Its training loader; pass the yielded wrapper to the loop instead (it has the loader's
            ``len``, ``set_epoch`` and other attributes).
        total_steps: Steps the loop will take (``None``: unknown, e.g. a fine-tune that stops by a criterion).
        steps_per_epoch: Steps of one epoch (default: ``len(loader)``).
        desc: Label of the lines.
    """
    spe = steps_per_epoch or _num_batches(loader) or None
    if spe is not None and (total_steps is None or total_steps >= spe):
        every = spe
    else:
        every = max(1, math.ceil((total_steps or 400) / 4))
    state: dict[str, Any] = {"steps": 0, "shown": 0, "first": 0, "lr": float("nan"), "running": None,
                             "start": time.perf_counter(), "last": time.perf_counter()}

    def on_resume(steps: int) -> None:
        state.update(steps=steps, shown=steps, first=steps, start=time.perf_counter(), last=time.perf_counter())

    tap = _LabelTap(loader, on_resume)

    def show() -> None:
        steps, now = state["steps"], time.perf_counter()
        running: _Running | None = state["running"]
        loss, top1 = running.means() if running is not None else (float("nan"), float("nan"))
        where = f"step {steps}" + (f"/{total_steps}" if total_steps else "")
        if spe:
            where = f"epoch {_short(steps / spe)}" + (f"/{_short(total_steps / spe)}" if total_steps else "") \
                + f" ({where})"
        text = (f"{desc} {where}: loss {loss:.4f}, train acc {100 * top1:.2f} %, lr {state['lr']:.4g}, "
                f"{now - state['last']:.1f} s")
        if total_steps and steps < total_steps:
            per_step = (now - state["start"]) / max(1, steps - state["first"])
            text += f", about {_duration(per_step * (total_steps - steps))} left"
        progress_line(text, with_bars=True)
        state.update(shown=steps, last=now, running=None)

    def on_forward(module: nn.Module, inputs: Any, output: Any) -> None:
        y = tap.labels
        if not (module.training and torch.is_grad_enabled()) or y is None or not isinstance(output, torch.Tensor):
            return
        if output.ndim != 2 or output.shape[0] != y.shape[0]:
            return
        with torch.no_grad():
            logits = output.detach()
            labels = y.to(logits.device)
            if state["running"] is None:
                state["running"] = _Running(logits.device)
            state["running"].add(F.cross_entropy(logits, labels), logits, labels)

    def on_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        mine = {id(p) for p in model.parameters()}
        if not any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
            return
        state["steps"] += 1
        state["lr"] = float(optimizer.param_groups[0]["lr"])
        if state["steps"] % every == 0 or state["steps"] == total_steps:
            show()

    forward_handle = model.register_forward_hook(on_forward)
    step_handle = register_optimizer_step_post_hook(on_step)
    try:
        yield tap
    finally:
        forward_handle.remove()
        step_handle.remove()
    if state["steps"] > state["shown"]:
        show()


def _resume(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, history: TrainHistory) -> int:
    """Restore model, optimizer, RNG and history from ``path``; return the number of completed epochs."""
    meta = load_checkpoint(model, path)
    state = (meta.get("extra") or {}).get("train_state")
    if meta.get("format") != "autoprune" or state is None or meta.get("optimizer") is None:
        raise ConfigError(
            f"{path} is not a resumable training checkpoint (no optimizer/training state)",
            hint="resume from the checkpoint.pt that `train` writes, or start without --resume",
        )
    optimizer.load_state_dict(meta["optimizer"])
    set_rng_state(state["rng"])
    history.epochs = [EpochStats.from_dict(d) for d in state["history"]]
    done = int(meta["epoch"] or 0)
    history.resumed_from = done
    log.info("resumed from %s after epoch %d", path, done)
    return done


def train(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    epochs: int,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    label_smoothing: float = 0.0,
    schedule: Schedule = "cosine",
    warmup_epochs: float = 0.0,
    decay_norm_and_bias: bool = False,
    val_loader: Iterable[Batch] | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_meta: Mapping[str, Any] | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    desc: str = "train",
) -> TrainHistory:
    """Train ``model`` in place with SGD and return the per-epoch history.

    Args:
        model: The model (moved to ``device``; left in train mode).
        loader: Re-iterable training batches; ``set_epoch(e)`` is called before epoch ``e`` if it exists.
        epochs: Total epochs (when resuming: including those already done).
        lr: Peak learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty (on conv/linear weights only unless ``decay_norm_and_bias``).
        nesterov: Nesterov momentum.
        label_smoothing: Cross-entropy label smoothing.
        schedule: ``"cosine"``, ``"step"`` or ``"constant"``, updated every iteration.
        warmup_epochs: Epochs of linear LR warm-up at the start.
        decay_norm_and_bias: Also apply weight decay to BN parameters and biases.
        val_loader: Evaluated with :func:`evaluate` after every epoch.
        checkpoint_path: Written atomically after every epoch (model, optimizer, epoch, RNG, history).
        checkpoint_meta: ``model_name`` / ``model_kwargs`` / ``extra`` stored in the checkpoint so that it can
            be rebuilt by name.
        resume: If ``checkpoint_path`` exists, continue from it exactly (same result as an uninterrupted run
            with a deterministic loader); if it does not exist, start from scratch.
        device: Default: CUDA when available, else CPU.
        seed: Seeds Python/NumPy/torch at the start of a fresh run (a resumed run restores the saved RNG).
        callbacks: Objects with ``on_epoch_end(epoch, metrics) -> bool`` (``True`` stops training).
        desc: Progress-bar label.

    Returns:
        The :class:`TrainHistory`, including epochs completed before a resumption.

    Raises:
        ConfigError: Bad hyper-parameters, an empty loader, a diverging loss, or a non-resumable checkpoint.
        CheckpointError: The checkpoint to resume from is unreadable or does not fit the model.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be a non-negative integer, got {epochs!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown LR schedule {schedule!r}", hint=f"choose one of {', '.join(SCHEDULES)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    dev = _resolve_device(device)
    model.to(dev)
    optimizer = make_optimizer(
        model,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        decay_norm_and_bias=decay_norm_and_bias,
    )
    history = TrainHistory()
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    start_epoch = 0
    if resume and ckpt is not None and ckpt.exists():
        start_epoch = _resume(model, optimizer, ckpt, history)
        model.to(dev)
    else:
        seed_everything(seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    per_epoch = _num_batches(loader)
    warmup = warmup_epochs / epochs if epochs else 0.0
    meta = dict(checkpoint_meta or {})
    hparams = {
        "epochs": epochs,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "nesterov": nesterov,
        "label_smoothing": label_smoothing,
        "schedule": schedule,
        "warmup_epochs": warmup_epochs,
        "seed": seed,
    }

    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        model.train()
        running = _Running(dev)
        current_lr = lr
        bar = progress(loader, desc=f"{desc} {epoch + 1}/{epochs}", total=per_epoch)
        for i, batch in enumerate(bar):
            within = i / per_epoch if per_epoch else 0.0
            current_lr = lr_at(lr, (epoch + within) / epochs, schedule, warmup)
            _set_lr(optimizer, current_lr)
            x, y = _to(batch, dev)
            _step(model, optimizer, criterion, x, y, running)
        if running.samples == 0:
            raise ConfigError("the training loader yielded no batches", hint="check the dataset and batch size")
        train_loss, train_top1 = running.means()
        _check_finite(train_loss, f"epoch {epoch + 1}", lr)
        val = evaluate(model, val_loader, device=dev) if val_loader is not None else None
        stats = EpochStats(epoch + 1, current_lr, train_loss, train_top1, time.perf_counter() - t0, val)
        history.epochs.append(stats)
        progress_line(f"{desc} epoch {epoch + 1}/{epochs}: {_fmt(stats)}", with_bars=True)
        if ckpt is not None:
            state = {"rng": rng_state(), "history": [e.to_dict() for e in history.epochs], "hparams": hparams}
            save_checkpoint(
                ckpt,
                model,
                model_name=meta.get("model_name"),
                model_kwargs=meta.get("model_kwargs"),
                epoch=epoch + 1,
                optimizer=optimizer,
                extra={**dict(meta.get("extra") or {}), "train_state": state},
            )
        stops = [bool(cb.on_epoch_end(epoch + 1, stats.flat())) for cb in callbacks]
        if any(stops):
            history.stopped_early = True
            log.info("%s: stopped early by a callback after epoch %d", desc, epoch + 1)
            break
    return history


def _fmt(stats: EpochStats) -> str:
    text = f"loss {stats.train_loss:.4f}, train acc {100 * stats.train_top1:.2f} %, lr {stats.lr:.4g}"
    if stats.val is not None:
        text += f", val acc {100 * stats.val.top1:.2f} %, val loss {stats.val.loss:.4f}"
    return text + f", {stats.seconds:.1f} s"


def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    device: str | torch.device | None = None,
    num_classes: int | None = None,
    desc: str = "eval",
) -> Metrics:
    """Top-1, top-5, mean cross-entropy and per-class accuracy of ``model`` over ``loader``.

    Runs under ``torch.inference_mode`` in eval mode and restores the model's previous train/eval mode.

    Args:
        model: The model.
        loader: Re-iterable of ``(x, y)`` batches.
        device: Where to run; default: the model's current device (the model is moved there if needed).
        num_classes: Length of ``per_class``; default: the number of logits.
        desc: Progress-bar label.

    Raises:
        ConfigError: The loader yielded no samples.
    """
    dev = resolve_device(device) if device is not None else _model_device(model)
    model.to(dev)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    top1 = torch.zeros((), dtype=torch.int64, device=dev)
    top5 = torch.zeros((), dtype=torch.int64, device=dev)
    hits: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    samples = 0
    try:
        with torch.inference_mode():
            for batch in progress(loader, desc=desc, total=_num_batches(loader)):
                x, y = _to(batch, dev)
                logits = model(x)
                classes = num_classes or logits.shape[1]
                if hits is None or counts is None:
                    hits = torch.zeros(classes, dtype=torch.int64, device=dev)
                    counts = torch.zeros(classes, dtype=torch.int64, device=dev)
                loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
                k = min(5, logits.shape[1])
                topk = logits.topk(k, dim=1).indices
                correct1 = topk[:, 0] == y
                top1 += correct1.sum()
                top5 += (topk == y.unsqueeze(1)).any(1).sum()
                counts += torch.bincount(y, minlength=classes)[:classes]
                hits += torch.bincount(y[correct1], minlength=classes)[:classes]
                samples += y.shape[0]
    finally:
        model.train(was_training)
    if samples == 0 or hits is None or counts is None:
        raise ConfigError("the evaluation loader yielded no samples", hint="check the dataset split")
    per_class = tuple((h / c) if c else float("nan") for h, c in zip(hits.tolist(), counts.tolist()))
    return Metrics(top1.item() / samples, top5.item() / samples, loss_sum.item() / samples, per_class, samples)
