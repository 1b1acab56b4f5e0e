"""Knowledge distillation in the product's fine-tunes (issue #20): the loss, the frozen teacher, and the
evaluators / export that use it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.distill import Distillation, Teacher, distillation_loss
from autoprune.errors import ConfigError
from autoprune.evaluate import SGDSettings, StepTrainer, make_evaluator


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5))


def batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(n)]


def test_weight_zero_is_exactly_cross_entropy_and_needs_no_teacher() -> None:
    s, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    for smoothing in (0.0, 0.1):
        off = distillation_loss(s, None, y, Distillation(0.0), label_smoothing=smoothing)
        assert torch.equal(off, F.cross_entropy(s, y, label_smoothing=smoothing))


def test_the_kl_term_follows_hintons_formula_with_its_temperature_scaling() -> None:
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    for temp in (1.0, 4.0):
        p_t = F.softmax(t / temp, 1)
        kl = (p_t * (p_t.log() - F.log_softmax(s / temp, 1))).sum(1).mean()
        expected = 0.3 * F.cross_entropy(s, y) + 0.7 * temp**2 * kl
        assert torch.allclose(distillation_loss(s, t, y, Distillation(0.7, temp)), expected, atol=1e-6)
    # a student that equals its teacher has no KL term left: only the cross-entropy share remains
    assert torch.allclose(distillation_loss(s, s, y, Distillation(0.7, 4.0)), 0.3 * F.cross_entropy(s, y))


def test_bad_settings_are_config_errors() -> None:
    for bad in ({"weight": 1.5}, {"weight": -0.1}, {"temperature": 0.0}, {"weight": float("nan")}):
        with pytest.raises(ConfigError):
            Distillation(**bad)


def test_the_teacher_stays_frozen_and_gets_no_gradients() -> None:
    dense = net()
    teacher = Teacher(dense)
    before = copy.deepcopy(teacher.model.state_dict())
    student = net(1)
    trainer = StepTrainer(student, batches(), SGDSettings(lr=0.1), distill=Distillation(0.9, 4.0), teacher=teacher)
    trainer.run(6)
    assert teacher.batches == 6 and teacher.seconds > 0
    assert not teacher.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    after = teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running statistics untouched too
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), before.values(), strict=True))
    with pytest.raises(ConfigError, match="teacher"):
        StepTrainer(net(), batches(), SGDSettings(), distill=Distillation(0.5))


def test_distillation_changes_the_training_and_weight_zero_does_not() -> None:
    def train(distill: Distillation | None) -> torch.Tensor:
        student = net(1)
        torch.manual_seed(0)
        StepTrainer(student, batches(), SGDSettings(lr=0.1), distill=distill, teacher=net()).run(4)
        return student[-1].weight.detach().clone()

    plain = train(None)
    assert torch.equal(train(Distillation(0.0)), plain)
    assert not torch.allclose(train(Distillation(0.9, 4.0)), plain)


def test_training_evaluators_distil_from_the_teacher_they_are_given() -> None:
    with pytest.raises(ConfigError, match="needs the dense model as the teacher"):
        make_evaluator("finetune", batches(), batches(2), steps=2, distill=0.5)
    with pytest.raises(ConfigError, match="teacher must be a model"):
        make_evaluator("finetune", batches(), batches(2), steps=2, teacher="resnet20")
    ev = make_evaluator("finetune", batches(), batches(2), steps=3, distill=0.8, distill_temperature=2.0,
                        teacher=net(), device="cpu")
    out = ev.fine_tune(net(1))
    assert out.extra["distill"]["weight"] == 0.8 and out.extra["distill"]["temperature"] == 2.0
    assert out.extra["distill"]["teacher_batches"] == 3
    plain = make_evaluator("finetune", batches(), batches(2), steps=3, device="cpu").fine_tune(net(1))
    assert "distill" not in plain.extra
