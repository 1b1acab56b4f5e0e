"""Export: fine-tune, standalone model, deployment artifact, model card, and the reload check.

The campaign compresses a *user* model (``<module>:Net`` from a temporary file), so that loading the export in
a fresh process where that module cannot be imported proves the model needs no original code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from autoprune import campaign, cli, serialize
from autoprune.config import config_from_dict
from autoprune.errors import ConfigError
from autoprune.export import ExportCheckError, export_trial, latency_caveat, select_trial
from autoprune.search_spaces import build_space
from autoprune.types import Candidate, QuantSpec

NET = """
    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, 12, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(12)
            self.conv2 = nn.Conv2d(12, 16, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(16)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            x = self.bn1(self.conv1(x)).relu()
            x = self.bn2(self.conv2(x)).relu()
            return self.fc(self.pool(x).flatten(1))
"""


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def user_campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[campaign.Campaign, object, str]]:
    """A trained user model on digits, searched with 3 random candidates at half the MACs."""
    from autoprune.data import load_dataset, make_loader
    from autoprune.models import build_model
    from autoprune.models.checkpoint import save_checkpoint
    from autoprune.train import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    module = f"apnet_{uuid.uuid4().hex[:8]}"
    (root / "code").mkdir()
    (root / "code" / f"{module}.py").write_text(textwrap.dedent(NET))
    sys.path.insert(0, str(root / "code"))
    try:
        splits = load_dataset("digits")
        info = splits.info
        torch.manual_seed(0)
        model = build_model(f"{module}:Net", num_classes=10, in_channels=1, mean=info.mean, std=info.std)
        train(model, make_loader(splits.train, 64, shuffle=True, drop_last=True), epochs=3, lr=0.1, desc="t")
        save_checkpoint(root / "net.pt", model, model_name=f"{module}:Net")
        cfg = config_from_dict({
            "name": "exp", "output_dir": str(root / "camp"),
            "model": {"name": f"{module}:Net", "checkpoint": str(root / "net.pt")},
            "dataset": {"name": "digits", "batch_size": 64}, "n_trials": 3,
            "evaluator": {"name": "adaptive_bn", "kwargs": {"batches": 4}},
            "objective": {"budget": {"macs": 0.6}}, "searcher": {"name": "random"},
            "export": {"epochs": 0.5, "lr": 0.02, "formats": ["pt2"]}})
        camp, store = campaign.open_campaign(cfg, argv=["search", "exp.yaml"])
        campaign.run_search(camp, store, quiet=True)
        yield camp, store, module
    finally:
        sys.path.remove(str(root / "code"))


def test_export_reloads_without_the_model_code_and_reproduces_accuracy(user_campaign: tuple, tmp_path: Path) -> None:
    camp, store, module = user_campaign
    trial = select_trial(store.to_dataframe())
    res = export_trial(camp, trial, command="autoprune export results/exp", search_command="autoprune search x.yaml")
    m = res.metrics
    assert m["check"]["passed"] and m["check"]["max_logit_difference"] <= 1e-4
    assert m["exported"]["test_accuracy"] == m["check"]["reloaded_test_accuracy"]
    assert m["exported"]["macs"] < 0.6 * m["original"]["macs"] and m["exported"]["macs"] == trial.macs
    assert m["finetune"]["method"] == "fixed" and m["finetune"]["steps"] >= 1
    assert (res.model_dir / "arch.json").is_file() and (res.model_dir / "weights.pt").is_file()
    assert set(res.deployment) == {"pt2"} and res.deployment["pt2"].is_file()
    assert set(m["latency"]) == {"original", "exported"}
    assert all({"low_ms", "median_ms", "iqr_ms"} <= set(v) for v in m["latency"].values())
    card = res.card.read_text()
    assert "10th percentile" in card
    assert ("Caution: the latency difference" in card) == bool(latency_caveat(m["latency"]))
    for fragment in ("# Model card", "test accuracy", "MACs", "parameters", "CPU latency", "Per-layer widths",
                     "| net.conv1:out | net.conv1 | 12 |", "autoprune export results/exp", "autoprune search x.yaml",
                     "Reload check", "passed"):
        assert fragment in card, fragment
    assert json.loads((res.out_dir / "export.json").read_text())["check"]["passed"]

    # A fresh process where the model's module cannot be imported rebuilds the model and gets the same accuracy.
    code = textwrap.dedent(f"""
        import importlib.util, sys, torch
        assert importlib.util.find_spec({module!r}) is None
        from autoprune.data import load_dataset, make_loader
        from autoprune.serialize import load_module
        from autoprune.train import evaluate
        model = load_module(sys.argv[1])
        print(evaluate(model, make_loader(load_dataset("digits").test, 512)).top1)
    """)
    env = {**os.environ, "AUTOPRUNE_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", code, str(res.model_dir.resolve())], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) == m["exported"]["test_accuracy"]


def test_an_onnx_artifact_is_checked_with_onnx_runtime_or_says_why_not(user_campaign: tuple, tmp_path: Path) -> None:
    from autoprune._imports import is_available

    camp, store, _ = user_campaign
    trial = select_trial(store.to_dataframe())
    res = export_trial(camp, trial, out_dir=tmp_path / "onnx", finetune_method="none", formats=["pt2", "onnx"],
                       measure_latency=False)
    check, card = res.metrics["onnx_check"], res.card.read_text()
    if not is_available("onnx"):
        assert "onnx" not in res.deployment and res.metrics["deployment_error"]
    elif not is_available("onnxruntime"):
        assert "onnxruntime is not installed" in check["skipped"] and "not checked" in card
    else:
        assert check["passed"] and check["batches"] == [1, 7] and set(check["latency_ms"]) == {"torch", "onnxruntime"}
        assert "checked with ONNX Runtime" in card


def test_export_distils_from_the_dense_model_when_asked(user_campaign: tuple, tmp_path: Path) -> None:
    import dataclasses

    camp, store, _ = user_campaign
    trial = select_trial(store.to_dataframe())
    original = camp.config
    try:
        camp.config = dataclasses.replace(original, export=dataclasses.replace(original.export, distill=0.5,
                                                                              distill_temperature=3.0))
        res = export_trial(camp, trial, out_dir=tmp_path / "kd", epochs=0.25, formats=[], measure_latency=False)
    finally:
        camp.config = original
    d = res.metrics["finetune"]["distill"]
    assert (d["weight"], d["temperature"]) == (0.5, 3.0) and d["teacher_batches"] == res.metrics["finetune"]["steps"]
    assert "distilled from the dense model (weight 0.5, temperature 3" in res.card.read_text()
    assert "batch-norm statistics as training left them" in res.card.read_text()  # export.bn_after_finetune: keep
    assert res.metrics["check"]["passed"]


def test_a_killed_export_continues_after_its_last_epoch_with_the_uninterrupted_result(
        user_campaign: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from autoprune import serialize
    from autoprune.evaluate import StepTrainer
    from autoprune.export import FINETUNE_CHECKPOINT

    camp, store, _ = user_campaign
    trial = select_trial(store.to_dataframe())
    kw = {"epochs": 3, "formats": [], "measure_latency": False}
    whole = export_trial(camp, trial, out_dir=tmp_path / "whole", **kw)
    assert not (tmp_path / "whole" / FINETUNE_CHECKPOINT).exists()  # removed once the export is complete

    real_run, calls = StepTrainer.run, {"n": 0}

    def killed_in_epoch_2(self: StepTrainer, steps: int) -> float:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as Ctrl-C (or a kill) during the second epoch
        return real_run(self, steps)

    monkeypatch.setattr(StepTrainer, "run", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        export_trial(camp, trial, out_dir=tmp_path / "cut", **kw)
    assert (tmp_path / "cut" / FINETUNE_CHECKPOINT).is_file()
    monkeypatch.setattr(StepTrainer, "run", real_run)
    capsys.readouterr()
    resumed = export_trial(camp, trial, out_dir=tmp_path / "cut", **kw)
    assert resumed.metrics["finetune"]["resumed_after_epoch"] == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fine-tune epoch")]
    # the progress lines go on from the saved epoch (2/3, 3/3), not from 1/3
    assert [ln.split(" (")[0] for ln in lines] == ["fine-tune epoch 2/3", "fine-tune epoch 3/3"], lines
    assert resumed.metrics["finetune"]["steps"] == whole.metrics["finetune"]["steps"]
    assert resumed.metrics["exported"]["test_accuracy"] == whole.metrics["exported"]["test_accuracy"]
    a = serialize.load_module(whole.model_dir).state_dict()
    b = serialize.load_module(resumed.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights as the uninterrupted export


def test_export_of_a_quantized_candidate(user_campaign: tuple, tmp_path: Path) -> None:
    camp, store, _ = user_campaign
    qspace = build_space(camp.groups, model=camp.model, model_name=camp.config.model.name, quantize=True,
                         a_bits=[None, 8])
    qcamp = dataclasses.replace(camp, space=qspace, _problem=None)
    best = select_trial(store.to_dataframe())
    bits = {lc.layer: QuantSpec(w_bits=max(4, lc.w_bits[0]), a_bits=max((b for b in lc.a_bits if b), default=None))
            for lc in qspace.layers}
    trial = dataclasses.replace(best, candidate=Candidate(widths=best.candidate.widths, bits=bits))
    res = export_trial(qcamp, trial, out_dir=tmp_path / "q", finetune_method="none", formats=[],
                       measure_latency=False)
    assert res.metrics["check"]["passed"]
    assert "quant" in json.loads((res.model_dir / "arch.json").read_text())
    assert res.metrics["exported"]["bytes"] < res.metrics["original"]["bytes"] * 0.6 * 4 / 8
    card = res.card.read_text()
    assert "Per-layer bits" in card and "| net.conv2 | 4 | 8 |" in card


def test_a_model_that_does_not_reload_faithfully_fails_loudly(user_campaign: tuple, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    camp, store, _ = user_campaign
    real = serialize.load_module

    def corrupted(path: object) -> torch.nn.Module:
        model = real(path)
        with torch.no_grad():
            fc = model.get_submodule("net.fc")
            fc.bias.add_(torch.linspace(-3, 3, fc.bias.numel()))
        return model

    monkeypatch.setattr(serialize, "load_module", corrupted)
    with pytest.raises(ExportCheckError, match="does not reproduce the measured accuracy"):
        export_trial(camp, select_trial(store.to_dataframe()), out_dir=tmp_path / "bad", finetune_method="none",
                     formats=[], measure_latency=False)
    assert not (tmp_path / "bad" / "MODEL_CARD.md").exists()
    code = cli.main(["export", str(camp.out_dir), "--finetune", "none", "--formats", "none", "--no-latency",
                     "--out", str(tmp_path / "bad2")])
    assert code == 1 and "export check FAILED" in capsys.readouterr().err


def test_export_command_picks_a_given_trial(user_campaign: tuple, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    camp, _, _ = user_campaign
    code = cli.main(["export", str(camp.out_dir), "--trial", "random/seed0/1", "--finetune", "none",
                     "--formats", "none", "--no-latency", "--out", str(tmp_path / "t1"), "export.lr=0.5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "exported random-seed0-trial1" in out and "reload check passed" in out
    assert json.loads((tmp_path / "t1" / "export.json").read_text())["number"] == 1
    assert cli.main(["export", str(camp.out_dir), "--trial", "random/seed0/99"]) == 2
    assert "no trial 99" in capsys.readouterr().err


def test_select_trial_specs(user_campaign: tuple) -> None:
    _, store, _ = user_campaign
    df = store.to_dataframe()
    best = select_trial(df)
    ok = df[df["state"] == "complete"]
    assert best.reward == ok["reward"].max()
    assert select_trial(df, "2", searcher="random", seed=0).number == 2
    assert select_trial(df, "random/seed0/0").number == 0
    assert select_trial(df, "random/1", seed=0).number == 1
    with pytest.raises(ConfigError, match="not 'best'"):
        select_trial(df, "first")
    infeasible = pd.concat([df, df.iloc[[0]].assign(number=7, state="infeasible", feasible=False)])
    with pytest.raises(ConfigError, match="is infeasible"):
        select_trial(infeasible, "random/seed0/7")
    with pytest.raises(ConfigError, match="no completed candidate"):
        select_trial(df.iloc[0:0])


def test_the_exported_float_model_has_its_batch_norm_folded_unless_asked_not_to(user_campaign: tuple,
                                                                                tmp_path: Path) -> None:
    import dataclasses

    from autoprune import serialize

    camp, store, _ = user_campaign
    trial = select_trial(store.to_dataframe())
    kw = {"finetune_method": "none", "formats": [], "measure_latency": False}
    folded = export_trial(camp, trial, out_dir=tmp_path / "folded", **kw)
    original = camp.config
    try:
        camp.config = dataclasses.replace(original, export=dataclasses.replace(original.export, fold_bn=False))
        kept = export_trial(camp, trial, out_dir=tmp_path / "kept", **kw)
    finally:
        camp.config = original

    def norms(model: torch.nn.Module) -> int:
        return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    assert norms(serialize.load_module(folded.model_dir)) == 0 < norms(serialize.load_module(kept.model_dir))
    assert folded.metrics["bn_folded"] and not kept.metrics["bn_folded"]
    assert "folded into the convolutions" in folded.card.read_text()
    layout = folded.metrics["deploy"]["memory_format"]  # export.memory_format: auto, timed on this machine
    assert layout in ("contiguous", "channels_last") and folded.metrics["deploy"]["memory_format_timing"]["timed"]
    assert serialize.memory_format_of(serialize.load_module(folded.model_dir)) == layout
    assert f"Memory layout: {layout}" in folded.card.read_text()
    assert abs(folded.metrics["exported"]["test_accuracy"] - kept.metrics["exported"]["test_accuracy"]) <= 0.01


def test_latency_caveat_only_when_the_spread_hides_the_difference() -> None:
    hidden = {"original": {"low_ms": 1.00, "median_ms": 1.2, "iqr_ms": 0.5},
              "exported": {"low_ms": 1.21, "median_ms": 1.5, "iqr_ms": 0.6}}  # 21 % "slower", spread 0.6 ms
    assert "cannot tell which model is faster" in latency_caveat(hidden)
    clear = {"original": {"low_ms": 2.0, "median_ms": 2.1, "iqr_ms": 0.05},
             "exported": {"low_ms": 1.0, "median_ms": 1.1, "iqr_ms": 0.04}}
    assert latency_caveat(clear) == ""
    old = {"original": {"median_ms": 1.0, "iqr_ms": 0.3}, "exported": {"median_ms": 1.1, "iqr_ms": 0.1}}  # no low_ms
    assert "0.100 ms" in latency_caveat(old) and latency_caveat({}) == ""


@pytest.mark.parametrize("bn_after", ["keep", "recalibrate"])
def test_the_bn_statistics_after_the_fine_tune_are_kept_or_re_estimated(user_campaign: tuple, bn_after: str) -> None:
    from autoprune import pruning
    from autoprune.evaluate import batchnorm_layers, recalibrate_bn
    from autoprune.export import finetune

    camp, store, _ = user_campaign
    trial = select_trial(store.to_dataframe())
    pruned = pruning.apply(camp.model, camp.groups, dict(trial.candidate.widths))
    seen: list[torch.nn.Module] = []
    tuned, info = finetune(camp, pruned, method="fixed", epochs=0.25, lr=0.02, bn_batches=3, bn_after=bn_after,
                           on_epoch=lambda epoch, model, acc: seen.append(model))
    assert info["bn_after"] == bn_after and len(seen) == 1
    left = seen[0]  # a copy of the network as training left it, running statistics included
    if bn_after == "recalibrate":
        camp.calib_loader.set_epoch(0)
        recalibrate_bn(left, camp.calib_loader, 3)
    got, want = batchnorm_layers(tuned), batchnorm_layers(left)
    assert got and len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    for name, p in tuned.named_parameters():
        assert torch.equal(p, dict(left.named_parameters())[name])  # only the statistics may differ


def test_an_unknown_bn_setting_after_the_fine_tune_is_a_config_error(user_campaign: tuple) -> None:
    from autoprune.export import finetune

    camp = user_campaign[0]
    with pytest.raises(ConfigError, match="keep or recalibrate"):
        finetune(camp, camp.model, method="fixed", epochs=0.25, lr=0.02, bn_after="sometimes")
    with pytest.raises(ConfigError, match="bn_after_finetune"):
        config_from_dict({"name": "x", "model": {"name": "small_cnn"}, "dataset": {"name": "digits"},
                          "export": {"bn_after_finetune": "sometimes"}})
