"""Candidate evaluators: adaptive BN, fine-tuning, full schedule, the shared contract and the class attributes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.errors import ConfigError, DataError
from autoprune.evaluate import (
    EVALUATORS,
    AdaptiveBNEvaluator,
    FineTuneEvaluator,
    FullFineTuneEvaluator,
    InfCoPEvaluator,
    PlainEvaluator,
    SGDSettings,
    StepTrainer,
    TrainingEvaluator,
    make_evaluator,
    recalibrate_bn,
    validate,
    was_pruned,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny models: one intra-op thread (two threads on a shared, loaded 2-core machine are ~40x slower)."""
    torch.set_num_threads(1)



class Normalize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((3, 1, 1), 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Net(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, momentum=0.3)
        self.fc1 = nn.Linear(8, 8)
        self.bn3 = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        x = F.relu(self.bn2(self.conv2(x))).mean(dim=(2, 3))
        return self.fc2(self.drop(F.relu(self.bn3(self.fc1(x)))))


def _data(n: int = 96, bs: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 6, 6, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > x[:, 1].mean(dim=(1, 2))).long()
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def _stale(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(0.01)
    return model


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- adaptive BN


def test_recalibrate_bn_changes_only_bn_buffers_and_uses_the_cumulative_mean() -> None:
    model = _stale(Net())
    model.train()
    data = _data()
    # reference: BN inputs recorded in a copy with BN in train mode (batch statistics), dropout off
    ref = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = {"bn1": [], "bn2": [], "bn3": []}
    for name in seen:
        bn = getattr(ref, name)
        bn.train()
        bn.register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0].detach().clone()))
    calib = data  # 6 batches requested from a 6-batch loader: exactly one pass
    with torch.no_grad():
        for x, _ in calib:
            ref(x)
    before = _snapshot(model)
    n = recalibrate_bn(model, data, batches=6)
    assert n == 96
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith(("bn1.running", "bn2.running", "bn3.running", "bn1.num", "bn2.num", "bn3.num")):
            continue
        assert torch.equal(after[k], v), f"{k} changed"  # parameters and other buffers bit-identical
    for name, inputs in seen.items():
        bn = getattr(model, name)
        dims = [0, 2, 3] if inputs[0].dim() == 4 else [0]
        mean = torch.stack([t.mean(dim=dims) for t in inputs]).mean(0)
        var = torch.stack([t.var(dim=dims, unbiased=True) for t in inputs]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 6
    assert model.bn1.momentum == 0.1 and model.bn2.momentum == 0.3  # momentum restored
    assert model.training and model.drop.training  # modes restored


def test_recalibrate_bn_cycles_a_short_loader_and_validates_input() -> None:
    model = Net()
    assert recalibrate_bn(model, _data(32), batches=5) == 80  # 2-batch loader re-iterated
    assert int(model.bn1.num_batches_tracked) == 5
    with pytest.raises(ConfigError):
        recalibrate_bn(model, _data(32), batches=0)
    with pytest.raises(DataError):
        recalibrate_bn(model, [], batches=2)
    assert recalibrate_bn(nn.Linear(3, 2), [(torch.rand(2, 3), torch.zeros(2))], 3) == 0  # no BN: no-op


def test_adaptive_bn_recovers_stale_statistics_and_never_mutates_the_caller() -> None:
    data = _data()
    model = Net()
    FineTuneEvaluator(data, data, steps=60, lr=0.05, device="cpu")  # constructing is side-effect free
    trainer = StepTrainer(model, data, SGDSettings(lr=0.05))
    trainer.run(80)
    good_acc, _ = validate(model, data)
    _stale(model)
    before = _snapshot(model)
    plain = PlainEvaluator(val_loader=data, device="cpu").evaluate(model)
    abn = AdaptiveBNEvaluator(data, data, batches=6, device="cpu").evaluate(model, key="k1")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # caller's model untouched
    assert abn.evaluator == "adaptive_bn" and abn.samples == 96 and abn.extra["key"] == "k1"
    assert abn.extra["bn_layers"] == 3 and not was_pruned(abn)
    assert abn.accuracy > plain.accuracy
    assert abn.accuracy >= good_acc - 0.1
    assert plain.samples == 0 and abn.seconds > 0


# ---------------------------------------------------------------------------------------------- fine-tuning


def test_finetune_reports_every_r_steps_and_improves() -> None:
    data = _data()
    model = Net()
    before = _snapshot(model)
    reports: list[tuple[int, float]] = []
    ev = FineTuneEvaluator(data, data, steps=50, report_every=20, lr=0.05, device="cpu")
    r = ev.evaluate(model, report=lambda s, v: reports.append((s, v)) or False)
    assert [s for s, _ in reports] == [20, 40, 50]
    assert r.samples == 50 * 16 and r.extra["steps"] == 50 and not was_pruned(r)
    assert r.accuracy == pytest.approx(reports[-1][1])
    base = PlainEvaluator(val_loader=data, device="cpu").evaluate(model)
    assert r.accuracy > base.accuracy or r.loss < base.loss
    # the caller's model never trained
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_finetune_pruned_by_callback() -> None:
    data = _data()
    ev = FineTuneEvaluator(data, data, steps=40, report_every=10, device="cpu")
    r = ev.evaluate(Net(), key="a", report=lambda s, v: s >= 20)
    assert was_pruned(r) and r.extra["stop_reason"] == "pruned" and r.extra["steps"] == 20
    assert r.samples == 20 * 16 and r.extra["key"] == "a"
    r2 = ev.evaluate(Net(), key="a")
    assert not was_pruned(r2) and r2.extra["steps"] == 40


def test_fine_tune_trains_the_callers_model_and_matches_evaluate() -> None:
    data = _data()
    torch.manual_seed(0)
    model = Net()
    ev = FineTuneEvaluator(data, data, steps=5, lr=0.05, device="cpu")
    torch.manual_seed(1)
    scored = ev.evaluate(model)
    before = _snapshot(model)
    torch.manual_seed(1)
    out = ev.fine_tune(model)
    assert out.extra["steps"] == 5 and out.samples == 5 * 16
    assert (out.accuracy, out.loss) == (scored.accuracy, scored.loss)  # evaluate = fine_tune on a copy
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the weights were kept


def test_full_schedule_reports_epochs_and_uses_cosine() -> None:
    data = _data(64)
    ev = FullFineTuneEvaluator(data, data, epochs=3, lr=0.05, device="cpu")
    epochs: list[int] = []
    r = ev.evaluate(Net(), report=lambda e, v: epochs.append(e) or False)
    assert epochs == [1, 2, 3] and r.extra["steps"] == 12 and r.samples == 12 * 16
    t = StepTrainer(Net(), data, SGDSettings(lr=0.1, schedule="cosine"), total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(t._lr())
        t.run(1)
    assert lrs[0] == pytest.approx(0.1) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.1
    with pytest.raises(ConfigError, match="len"):
        FullFineTuneEvaluator(iter(data), data, epochs=1)


# ------------------------------------------------------------------------------------ registry and the cache


def test_registry_and_make_evaluator() -> None:
    assert {"plain", "adaptive_bn", "finetune", "infcop", "full"} <= set(EVALUATORS.names())
    data = _data(32)
    ev = make_evaluator("adaptive_bn", data, data, batches=3, device="cpu")
    assert isinstance(ev, AdaptiveBNEvaluator) and ev.batches == 3
    with pytest.raises(ConfigError, match="adaptive_bn"):
        make_evaluator("adaptive-bn", data, data)
    with pytest.raises(ConfigError, match="does not accept"):
        make_evaluator("finetune", data, data, epochs=3)
    # values of the wrong type (YAML null, strings, booleans for counts) are user errors, not TypeErrors
    for name, key, bad in (("adaptive_bn", "batches", None), ("adaptive_bn", "batches", "ten"),
                           ("adaptive_bn", "batches", True), ("finetune", "steps", 2.5), ("finetune", "lr", "fast")):
        with pytest.raises(ConfigError, match=f"{key} must be"):
            make_evaluator(name, data, data, **{key: bad})
    assert make_evaluator("finetune", data, data, lr=1, steps=2).sgd.lr == 1  # an int where a float is expected is fine
    with pytest.raises(ConfigError, match="validation loader"):
        make_evaluator("plain")
    with pytest.raises(ConfigError, match="training loader"):
        make_evaluator("finetune", None, data)
    with pytest.raises(ConfigError, match="learning rate"):
        make_evaluator("finetune", data, data, lr=0.0)
    with pytest.raises(ConfigError, match="schedule"):
        make_evaluator("finetune", data, data, schedule="linear")


def test_evaluators_declare_what_they_need_on_their_class() -> None:
    """What a campaign wires in and whether Optuna may prune come from class attributes, not name lists."""
    declared = {name: (cls.needs_train, cls.trains, cls.reports_intermediate, cls.needs_dense,
                       cls.needs_flow_loader) for name, cls in ((n, EVALUATORS.get(n)) for n in EVALUATORS.names())}
    assert declared["plain"] == (False, False, False, False, False)
    assert declared["adaptive_bn"] == (True, False, False, False, False)
    assert declared["finetune"] == declared["full"] == (True, True, True, False, False)
    assert declared["infcop"] == (True, True, True, True, True)
    assert all(issubclass(EVALUATORS.get(n), TrainingEvaluator) == declared[n][1] for n in declared)
    assert InfCoPEvaluator.needs_dense and not PlainEvaluator.needs_dense


def test_bn_calibration_before_finetuning_uses_its_own_loader() -> None:
    train, calib = _data(64, bs=16), _data(64, bs=8, seed=3)
    ev = FineTuneEvaluator(train, train, steps=3, bn_calibration=2, bn_loader=calib, device="cpu")
    r = ev.evaluate(_stale(Net()))
    assert r.samples == 2 * 8 + 3 * 16
    with pytest.raises(ConfigError, match="bn_calibration"):
        FineTuneEvaluator(train, train, bn_calibration=-1)


# ----------------------------------------------------------------------------------------------- ranking scores


def test_score_signals_against_hand_computed_values() -> None:
    from autoprune.evaluate import reference_logits, score_signals

    torch.manual_seed(0)
    net, val = Net().eval(), _data()
    sig = score_signals(net, val, reference=reference_logits(net, val))
    top1, loss = validate(net, val)
    assert sig["top1"] == pytest.approx(top1) and sig["loss"] == pytest.approx(loss, rel=1e-5)
    x = torch.cat([b[0] for b in val])
    y = torch.cat([b[1] for b in val])
    with torch.no_grad():
        p = net(x).softmax(1)
    assert sig["soft_accuracy"] == pytest.approx(float(p.gather(1, y[:, None]).mean()), rel=1e-5)
    assert sig["agreement"] == 1.0 and sig["kl"] == pytest.approx(1.0)
    assert sig["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    other = Net(width=4).eval()
    far = score_signals(other, val, reference=reference_logits(net, val))
    assert 0.0 <= far["agreement"] <= 1.0 and 0.0 < far["kl"] < 1.0 and 0.0 <= far["soft_accuracy"] <= 1.0
    with pytest.raises(ConfigError, match="other batches"):
        score_signals(net, [*val[:-1], (val[0][0][:3], val[0][1][:3])], reference=reference_logits(net, val))


@pytest.mark.parametrize("score", ["soft_accuracy", "agreement", "kl"])
def test_an_evaluator_scores_by_its_signal_and_rewards_read_it(score: str) -> None:
    from autoprune.objectives import AccuracyReward
    from autoprune.types import CostReport

    torch.manual_seed(0)
    dense, val = Net().eval(), _data()
    cand = Net(width=3).eval()
    ev = make_evaluator("adaptive_bn", _data(seed=1), val, batches=2, score=score, reference_model=dense)
    res = ev.evaluate(cand)
    assert res.score is not None and 0.0 <= res.score <= 1.0 and res.ranking_score == res.score
    assert res.accuracy == pytest.approx(make_evaluator("adaptive_bn", _data(seed=1), val, batches=2)
                                         .evaluate(cand).accuracy)  # the accuracy stays top-1
    c = CostReport(macs=1, params=1, bytes=1, bitops=1)
    assert AccuracyReward()(res, c, c, None) == pytest.approx(res.score)
    assert make_evaluator("plain", None, val).evaluate(cand).score is None  # top1: no separate score


def test_a_score_needing_the_dense_model_without_it_is_refused() -> None:
    with pytest.raises(ConfigError, match="compares with the dense model"):
        make_evaluator("plain", None, _data(), score="kl")
    with pytest.raises(ConfigError, match="unknown score"):
        make_evaluator("plain", None, _data(), score="f1")
