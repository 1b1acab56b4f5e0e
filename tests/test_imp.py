"""IMP with InfCoP stopping: PQ index, magnitude pruning, masks, rewinding, the driver and the CLI."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.errors import ConfigError
from autoprune.evaluate import SGDSettings, StepTrainer
from autoprune.imp import (
    IMPConfig,
    apply_masks,
    init_masks,
    mask_gradients,
    pq_index,
    pq_prune_ratio,
    prune_step,
    prune_targets,
    rewind,
    run_imp,
    sparsity,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny models: one intra-op thread (two threads on a shared, loaded 2-core machine are ~40x slower)."""
    torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _data(n: int = 96, bs: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].mean(dim=(1, 2)) * 3).long().clamp(0, 2)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()) and all(
        not p._backward_hooks for p in model.parameters()
    )


# ------------------------------------------------------------------------------------------------ PQ index


def test_pq_index_matches_the_formula_and_special_cases() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=500)
    for p, q in [(0.5, 1.0), (1.0, 2.0), (0.3, 0.7)]:
        d = w.size
        expected = 1 - d ** (1 / q - 1 / p) * (np.sum(np.abs(w) ** p) ** (1 / p)) / (np.sum(np.abs(w) ** q) ** (1 / q))
        assert pq_index(torch.tensor(w), p, q) == pytest.approx(expected, rel=1e-10)
    assert pq_index(torch.ones(100)) == pytest.approx(0.0, abs=1e-12)  # dense, uniform: not sparse
    assert pq_prune_ratio(torch.ones(100)) == 0.0
    one_hot = torch.zeros(1000)
    one_hot[3] = 5.0
    assert pq_index(one_hot, 1.0, 2.0) == pytest.approx(1 - 1000 ** -0.5)
    assert pq_prune_ratio(one_hot, 1.0, 2.0) == pytest.approx(0.9)  # capped at beta
    # (p, q) = (1, 2): m = ||w||_1^2 / ||w||_2^2, the effective number of weights
    v = torch.tensor(w)
    m = float(v.abs().sum() ** 2 / (v * v).sum())
    assert pq_prune_ratio(v, 1.0, 2.0) == pytest.approx(1 - math.ceil(m) / v.numel())
    assert pq_index(torch.zeros(5)) == 0.0


# ----------------------------------------------------------------------------------------- pruning steps


def test_layerwise_unstructured_removes_the_smallest_fraction_of_alive_weights() -> None:
    model = Net()
    targets = prune_targets(model, torch.rand(2, 1, 6, 6))
    assert [t.weight for t in targets] == ["conv1.weight", "conv2.weight", "fc.weight"]
    masks = init_masks(model, targets)
    cfg = IMPConfig(flow="none", scope="layer", prune_ratio=0.2, min_keep=0.0)
    for k in range(1, 4):
        masks, asked = prune_step(model, masks, targets, cfg)
        apply_masks(model, masks)
        assert asked == pytest.approx(0.2)
        for t in targets:
            w = dict(model.named_parameters())[t.weight].detach().abs().flatten()
            m = masks[t.weight].flatten() > 0
            alive = int(m.sum())
            expected = w.numel()
            for _ in range(k):
                expected -= math.floor(0.2 * expected)
            assert alive == expected
            if alive < w.numel():
                assert float(w[m].min()) >= float(w[~m].max()) or float(w[~m].max()) == 0.0
    sp, alive, total = sparsity(masks, targets)
    assert total == 6 * 9 + 8 * 6 * 9 + 24 and 0.45 < sp < 0.52


def test_global_scope_uses_one_threshold_and_min_keep_prevents_collapse() -> None:
    model = Net()
    with torch.no_grad():
        model.conv1.weight.mul_(1e-3)  # a layer of tiny weights: a global threshold would empty it
    targets = prune_targets(model, torch.rand(2, 1, 6, 6))
    masks = init_masks(model, targets)
    cfg = IMPConfig(flow="none", scope="global", prune_ratio=0.5, min_keep=0.2)
    masks, _ = prune_step(model, masks, targets, cfg)
    params = dict(model.named_parameters())
    kept_conv1 = int(masks["conv1.weight"].sum())
    assert kept_conv1 == math.ceil(0.2 * 54)  # floor of the layer, not zero
    # every other layer follows one global threshold
    kept = torch.cat([params[n].detach().abs().flatten()[masks[n].flatten() > 0] for n in ("conv2.weight",
                                                                                          "fc.weight")])
    gone = torch.cat([params[n].detach().abs().flatten()[masks[n].flatten() == 0] for n in ("conv2.weight",
                                                                                          "fc.weight")])
    assert float(kept.min()) >= float(gone.max())
    removed = sum(int((m == 0).sum()) for m in masks.values())
    # all 54 tiny conv1 weights are among the 255 globally smallest; the floor gives back kept_conv1 of them
    assert removed == math.floor(0.5 * (54 + 432 + 24)) - kept_conv1
    with pytest.raises(ConfigError, match="prune_ratio"):
        IMPConfig(prune_ratio=1.0)
    with pytest.raises(ConfigError, match="scope"):
        IMPConfig(scope="model")


def test_structured_masks_filters_with_their_batchnorm_and_spares_the_classifier() -> None:
    model = Net().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.bias.uniform_(0.5, 1.0)
    targets = prune_targets(model, torch.rand(2, 1, 6, 6), "structured")
    assert [(t.weight, t.coupled) for t in targets] == [
        ("conv1.weight", ("conv1.bias", "bn1.weight", "bn1.bias")),
        ("conv2.weight", ("bn2.weight", "bn2.bias")),
    ]
    masks = init_masks(model, targets)
    cfg = IMPConfig(flow="none", granularity="structured", scope="layer", prune_ratio=0.5, min_keep=0.0)
    masks, _ = prune_step(model, masks, targets, cfg)
    apply_masks(model, masks)
    rows = masks["conv1.weight"].flatten(1)
    assert ((rows == 0).all(1) | (rows == 1).all(1)).all()  # whole filters
    dead = (rows == 0).all(1)
    assert int(dead.sum()) == 3
    assert torch.equal(masks["bn1.weight"] > 0, ~dead)
    out = {}
    model.bn1.register_forward_hook(lambda m, i, o: out.__setitem__("bn1", o))
    model(torch.rand(4, 1, 6, 6))
    assert torch.equal(out["bn1"][:, dead], torch.zeros_like(out["bn1"][:, dead]))  # channel truly removed
    model.bn1._forward_hooks.clear()


def test_gradient_masking_keeps_pruned_weights_at_exact_zero() -> None:
    model = Net()
    data = _data()
    targets = prune_targets(model, data[0][0])
    masks, _ = prune_step(model, init_masks(model, targets), targets, IMPConfig(flow="none", prune_ratio=0.5))
    apply_masks(model, masks)
    handles = mask_gradients(model, masks)
    trainer = StepTrainer(model, data, SGDSettings(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True))
    trainer.run(10)
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert torch.equal(params[name].detach() * (1 - m), torch.zeros_like(m)), name
        assert (params[name].detach()[m > 0] != 0).all()
    for h in handles:
        h.remove()
    assert _no_hooks(model)


def test_rewind_clones_the_snapshot() -> None:
    model = Net()
    data = _data()
    StepTrainer(model, data, SGDSettings(lr=0.05)).run(3)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    frozen = {k: v.clone() for k, v in snapshot.items()}
    targets = prune_targets(model, data[0][0])
    masks, _ = prune_step(model, init_masks(model, targets), targets, IMPConfig(flow="none"))
    StepTrainer(model, data, SGDSettings(lr=0.05)).run(5)
    bn_trained = model.bn1.weight.detach().clone()
    rewind(model, snapshot, masks, targets)
    params = dict(model.named_parameters())
    for t in targets:
        assert torch.equal(params[t.weight].detach(), snapshot[t.weight] * masks[t.weight])
    assert torch.equal(params["conv1.bias"].detach(), snapshot["conv1.bias"])
    assert torch.equal(model.bn1.weight.detach(), bn_trained)  # BN is not rewound
    StepTrainer(model, data, SGDSettings(lr=0.05)).run(5)  # training after the rewind ...
    for k, v in snapshot.items():
        assert torch.equal(v, frozen[k]), k  # ... never mutates the stored weights (bias aliasing bug)


# --------------------------------------------------------------------------------------------- the driver


def test_run_imp_fixed_budget_versus_infcop_stopping() -> None:
    data = _data()
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sgd = SGDSettings(lr=0.05)
    lth = run_imp(model, data, data[:2], IMPConfig.lth(iterations=3, warmup_rounds=1, max_rounds=2,
                                                       round_epochs=0.5, sgd=sgd), test_loader=data[2:4])
    assert [r.rounds for r in lth.rows] == [2, 2, 2] and {r.stop_reason for r in lth.rows} == {"budget"}
    assert [r.steps for r in lth.rows] == [6, 6, 6]
    sps = [r.sparsity for r in lth.rows]
    assert sps[0] == 0.0 and sps[0] < sps[1] < sps[2]
    assert lth.test_accuracy is not None and lth.reference is None
    quick = run_imp(model, data, data[:2], IMPConfig(flow="IF", eps=1e6, iterations=3, warmup_rounds=1,
                                                     max_rounds=2, round_epochs=0.5, sgd=sgd))
    assert [r.rounds for r in quick.rows] == [1, 1, 1] and {r.stop_reason for r in quick.rows} == {"consistent"}
    assert [r.sparsity for r in quick.rows] == sps  # same pruning schedule, only the stopping rule differs
    never = run_imp(model, data, data[:2], IMPConfig(flow="GF", eps=1e-12, iterations=2, warmup_rounds=0,
                                                     max_rounds=2, round_epochs=0.5, stop_on_accuracy=False,
                                                     sgd=sgd))
    assert [r.stop_reason for r in never.rows] == ["budget", "budget"]
    assert all(t[-1]["distance"] is not None for t in never.trajectories)
    acc = run_imp(model, data, data[:2], IMPConfig(flow="IF", eps=1e-12, iterations=2, warmup_rounds=0,
                                                   max_rounds=3, round_epochs=0.5, sgd=sgd), target_accuracy=0.0)
    assert [r.stop_reason for r in acc.rows] == ["accuracy", "accuracy"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the caller's model is untouched
    assert _no_hooks(model) and _no_hooks(quick.model)


@pytest.mark.parametrize("flow", ["IF", "GF"])
def test_a_monitored_flow_records_distances_without_changing_the_fixed_budget_run(flow: str) -> None:
    """``monitor`` measures the flow after pruning and after every round of a fixed-budget run (to calibrate ε
    offline) and changes nothing else: same rounds, same weights as the unmonitored run."""
    data = _data()
    sgd = SGDSettings(lr=0.05)
    torch.manual_seed(0)
    model = Net()
    plain = run_imp(model, data, data[:2], IMPConfig.lth(iterations=3, warmup_rounds=0, max_rounds=2,
                                                         round_epochs=0.5, sgd=sgd, seed=1))
    watched = run_imp(model, data, data[:2], IMPConfig.lth(iterations=3, warmup_rounds=0, max_rounds=2,
                                                           round_epochs=0.5, sgd=sgd, seed=1, monitor=flow))
    assert [r.rounds for r in watched.rows] == [2, 2, 2] and {r.stop_reason for r in watched.rows} == {"budget"}
    assert watched.reference is not None and plain.reference is None
    assert all(r.distance_before is not None and r.distance is not None for r in watched.rows)
    assert all(len(t) == 2 and all(e["distance"] is not None for e in t) for t in watched.trajectories)
    assert watched.rows[1].distance_before > 0  # pruning moved the flow
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, watched.model.state_dict()[k]), k
    with pytest.raises(ConfigError, match="monitor"):
        IMPConfig(flow="IF", monitor="GF")


def test_run_imp_pq_global_and_outputs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _data()
    cfg = IMPConfig(flow="IF", pq=True, scope="global", p=1.0, q=2.0, iterations=3, warmup_rounds=1,
                    max_rounds=1, round_epochs=0.5, sgd=SGDSettings(lr=0.05))
    res = run_imp(Net(), data, data[:2], cfg)
    assert res.rows[0].prune_ratio == 0.0 and 0.0 < res.rows[1].prune_ratio <= 0.9
    paths = res.write(tmp_path / "out")
    with paths[0].open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and float(rows[2]["sparsity"]) == pytest.approx(res.rows[2].sparsity)
    summary = json.loads(paths[1].read_text())
    assert summary["config"]["pq"] is True and len(summary["reference"]) == 2 and len(summary["rows"]) == 3
    saved = torch.load(paths[2], weights_only=True)
    assert set(saved["masks"]) == {"conv1.weight", "conv2.weight", "fc.weight"}
    with pytest.raises(ConfigError, match="len"):
        run_imp(Net(), iter(data), data, cfg)


def _cli_args(*argv: str) -> argparse.Namespace:
    from autoprune.commands import imp as imp_command

    parser = argparse.ArgumentParser()
    imp_command.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["imp", *argv])


def test_cli_imp_on_digits(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from autoprune.commands import imp as imp_command

    common = ["--model", "small_cnn", "--dataset", "digits", "--iterations", "2", "--rounds", "1",
              "--warmup-rounds", "1", "--round-epochs", "0.25", "--flow-samples", "64", "--batch-size", "64"]
    assert imp_command.run(_cli_args(*common, "--flow", "GF", "--out", str(tmp_path / "gf"))) == 0
    printed = capsys.readouterr().out
    assert "sparsity" in printed and "final test accuracy" in printed
    summary = json.loads((tmp_path / "gf" / "imp.json").read_text())
    assert summary["config"]["flow"] == "GF" and len(summary["rows"]) == 2
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert imp_command.run(_cli_args(*common, "--lth", "--out", str(tmp_path / "lth"))) == 0
    assert json.loads((tmp_path / "lth" / "imp.json").read_text())["config"]["flow"] == "none"
    with pytest.raises(ConfigError, match="prune_ratio"):
        imp_command.run(_cli_args(*common, "--prune-ratio", "1.5"))


def test_run_imp_structured_without_rewind_keeps_whole_filters_dead() -> None:
    data = _data()
    cfg = IMPConfig(flow="GF", granularity="structured", scope="global", prune_ratio=0.3, rewind=False,
                    iterations=3, warmup_rounds=0, max_rounds=1, round_epochs=0.5, sgd=SGDSettings(lr=0.05))
    res = run_imp(Net(), data, data[:2], cfg)
    assert res.rows[0].sparsity == 0.0 and res.rows[1].sparsity < res.rows[2].sparsity
    params = dict(res.model.named_parameters())
    dead = (res.masks["conv2.weight"].flatten(1) == 0).all(1)
    assert dead.any() and not dead.all()
    assert torch.equal(params["conv2.weight"].detach()[dead], torch.zeros_like(params["conv2.weight"][dead]))
    assert torch.equal(params["bn2.bias"].detach()[dead], torch.zeros(int(dead.sum())))
    assert "fc.weight" not in res.masks  # the classifier keeps its outputs


def test_imp_retraining_can_distil_from_the_starting_model() -> None:
    from autoprune.distill import Distillation

    data, sgd = _data(), SGDSettings(lr=0.05)
    kw = {"flow": "none", "iterations": 2, "warmup_rounds": 0, "max_rounds": 1, "round_epochs": 0.5, "sgd": sgd}
    model = Net()
    plain = run_imp(model, data, data[:2], IMPConfig(**kw))
    again = run_imp(model, data, data[:2], IMPConfig(**kw, distill=Distillation(0.0)))
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                   plain.model.state_dict().values(), strict=True))
    kd = run_imp(model, data, data[:2], IMPConfig(**kw, distill=Distillation(0.9, 4.0)))
    assert [r.sparsity for r in kd.rows] == [r.sparsity for r in plain.rows]  # same schedule, other loss
    assert any(not torch.equal(a, b) for a, b in zip(kd.model.state_dict().values(),
                                                       plain.model.state_dict().values(), strict=True))


@pytest.mark.parametrize("flow", ["IF", "GF"])
def test_a_calibrated_tolerance_is_measured_on_the_unpruned_networks_own_retraining(flow: str) -> None:
    """``calibrate``: iteration 0 uses its whole round budget (the flow is measured, nothing stops it), ε = the
    largest distance it reached, and from iteration 1 the rule stops on exactly that ε."""
    from autoprune.imp import calibrated_eps

    data, sgd = _data(), SGDSettings(lr=0.05)
    kw = {"flow": flow, "iterations": 3, "warmup_rounds": 0, "max_rounds": 3, "round_epochs": 0.5, "sgd": sgd,
          "seed": 1, "stop_on_accuracy": False}
    torch.manual_seed(0)
    model = Net()
    res = run_imp(model, data, data[:2], IMPConfig(**kw, calibrate=True))
    first = res.trajectories[0]
    assert res.rows[0].rounds == 3 and res.rows[0].stop_reason == "budget" and not any(e["consistent"] for e in first)
    assert res.eps == max(e["distance"] for e in first) > 0 and res.to_dict()["eps"] == res.eps
    for traj in res.trajectories[1:]:
        for e in traj:
            assert e["consistent"] == (e["distance"] < res.eps)
    # the same run with that ε given: identical from iteration 1 on (iteration 0 stops at its first round there)
    fixed = run_imp(model, data, data[:2], IMPConfig(**kw, eps=res.eps))
    assert fixed.eps == res.eps and fixed.rows[0].rounds <= res.rows[0].rounds
    assert run_imp(model, data, data[:2], IMPConfig.lth(iterations=2, warmup_rounds=0, max_rounds=1,
                                                        round_epochs=0.5, sgd=sgd)).eps is None
    with pytest.raises(ConfigError, match="calibrate"):
        IMPConfig(flow="none", calibrate=True)
    with pytest.raises(ConfigError, match="calibrate"):
        IMPConfig(flow=flow, calibrate=True, eps=0.1)
    with pytest.raises(ConfigError, match="calibrate"):
        IMPConfig(flow=flow, calibrate=True, iterations=1)
    with pytest.raises(ConfigError, match="did not move"):
        calibrated_eps([{"round": 1, "distance": 0.0}, {"round": 2, "distance": None}])


def test_cli_imp_takes_eps_auto(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from autoprune.commands import imp as imp_command

    args = _cli_args("--model", "small_cnn", "--dataset", "digits", "--iterations", "2", "--rounds", "2",
                     "--warmup-rounds", "0", "--round-epochs", "0.25", "--flow-samples", "64", "--batch-size", "64",
                     "--flow", "GF", "--eps", "auto", "--out", str(tmp_path / "auto"))
    assert args.eps == "auto" and imp_command.run(args) == 0
    assert "(calibrated in iteration 0)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "auto" / "imp.json").read_text())
    assert summary["config"]["calibrate"] is True and summary["eps"] > 0 and summary["rows"][0]["rounds"] == 2
    need = ("--model", "small_cnn", "--dataset", "digits")
    assert _cli_args(*need, "--eps", "0.25").eps == 0.25
    for bad in ("0", "-1", "often"):
        with pytest.raises(SystemExit):
            _cli_args(*need, "--eps", bad)
