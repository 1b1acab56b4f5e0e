"""Knowledge distillation for the fine-tunes the product runs (issue #20): the dense model teaches the pruned one.

Hinton et al.'s loss on one batch, with the dense model as the teacher::

    L = (1 − α) · CE(student, y) + α · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

``α`` (:attr:`Distillation.weight`) mixes the two terms and ``T`` (:attr:`Distillation.temperature`) softens both
distributions; the ``T²`` factor keeps the KL term's gradients on the scale of the cross-entropy's as ``T``
changes. With ``α = 0`` the loss is exactly the (label-smoothed) cross-entropy, and the teacher is never run.

The teacher (:class:`Teacher`) is a frozen copy of the dense model in eval mode: its outputs are computed once per
batch under ``torch.no_grad()`` (no graph, no gradients into it), and the seconds spent in it are counted so the
cost of distillation is reported beside the fine-tune's.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoprune.errors import ConfigError

__all__ = ["Distillation", "Teacher", "distillation_loss"]


@dataclass(frozen=True)
class Distillation:
    """Distillation settings.

    Attributes:
        weight: ``α`` in [0, 1]: the share of the KL term (0 = plain cross-entropy, no teacher).
        temperature: ``T`` > 0 of both softmaxes.
    """

    weight: float = 0.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.weight <= 1.0) or not math.isfinite(self.weight):
            raise ConfigError(f"distillation weight must be in [0, 1], got {self.weight}",
                              hint="0 turns distillation off; 0.9 is Hinton et al.'s usual mix")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"distillation temperature must be > 0, got {self.temperature}", hint="e.g. 4")

    @property
    def enabled(self) -> bool:
        """True when the KL term counts (``weight > 0``)."""
        return self.weight > 0


def distillation_loss(student: Tensor, teacher: Tensor | None, labels: Tensor, settings: Distillation, *,
                      label_smoothing: float = 0.0) -> Tensor:
    """``(1 − α)·CE + α·T²·KL(teacher ‖ student)`` averaged over the batch (see the module docstring).

    Args:
        student: Student logits ``[N, C]`` (gradients flow into them).
        teacher: Teacher logits ``[N, C]`` (detached here; may be None when ``settings.weight == 0``).
        labels: Class indices ``[N]``.
        settings: ``α`` and ``T``.
        label_smoothing: Of the cross-entropy term.
    """
    ce = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    if not settings.enabled:
        return ce
    if teacher is None:
        raise ValueError("distillation with weight > 0 needs the teacher's logits")
    t = settings.temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher.detach() / t, dim=1),
                  reduction="batchmean", log_target=True)
    return (1.0 - settings.weight) * ce + settings.weight * (t * t) * kl


class Teacher:
    """A frozen copy of a model that gives logits without gradients, timing itself.

    Args:
        model: The teacher (the dense model); copied, so later changes to it do not matter.
        device: Where it runs (the student's device).
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None) -> None:
        self.model = copy.deepcopy(model).eval()
        if device is not None:
            self.model.to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.seconds = 0.0
        self.batches = 0

    def __call__(self, x: Tensor) -> Tensor:
        """The teacher's logits for ``x`` (eval mode, no graph)."""
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model(x)
        self.seconds += time.perf_counter() - start
        self.batches += 1
        return out
