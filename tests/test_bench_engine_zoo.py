"""The torchvision zoo benchmark (``benchmarks/bench_engine_zoo.py``) without torchvision: model selection, reason
merging, the summary and the Markdown from fake records, the checkpoint, the attention-aware MAC counter, the
perturbation and one measurement of a small inline model. The torchvision models themselves run in
``tests/vision`` (``make test-vision``)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from engine_cases import TinyResNet
from torch import nn

from benchmarks import bench_engine_zoo as bz

NAMES = ["alexnet", "resnet18", "resnet50", "swin_t", "vit_b_16", "squeezenet1_1", "mobilenet_v3_small"]


def test_select_models_filters_in_the_given_order() -> None:
    assert bz.select_models(NAMES) == NAMES
    assert bz.select_models(NAMES, only="resnet*,vit_b_16") == ["resnet18", "resnet50", "vit_b_16"]
    assert bz.select_models(NAMES, skip="resnet50, vit*") == ["alexnet", "resnet18", "swin_t", "squeezenet1_1",
                                                              "mobilenet_v3_small"]
    assert bz.select_models(NAMES, quick=True) == ["resnet18", "swin_t", "squeezenet1_1", "mobilenet_v3_small"]
    assert bz.select_models(NAMES, quick=True, only="s*") == ["swin_t", "squeezenet1_1"]
    with pytest.raises(ValueError, match="resnt"):
        bz.select_models(NAMES, only="resnt*")


def test_reasons_lose_their_place_and_merge() -> None:
    assert bz.normalize_reason("unknown op torch.cumsum at layer2.0 (node cumsum)") == "unknown op torch.cumsum"
    assert bz.normalize_reason("channel count read by size() at node size_1") == "channel count read by size()"
    assert bz.normalize_reason("opaque module blocks.3.attn (Attention)") == "opaque module (Attention)"
    assert bz.normalize_reason("unknown module MultiheadAttention at encoder.layers.0.self_attention") == \
        "unknown module MultiheadAttention"
    merged = bz.aggregate_reasons([("reduction over the channel dim at a (node x)", 8), ("model output", 3),
                                   ("reduction over the channel dim at b (node y)", 8)])
    assert merged == [("reduction over the channel dim", 16), ("model output", 3)]


def test_relative_error_is_scaled_and_refuses_mismatches() -> None:
    a, b = torch.tensor([10.0, 0.0]), torch.tensor([10.0, 1e-4])
    assert bz.relative_error([a], [b]) == pytest.approx(1e-5)
    assert bz.relative_error([a / 100], [b / 100]) == pytest.approx(1e-6)  # scale is at least 1
    assert bz.relative_error([a], [b[:1]]) == float("inf")
    assert bz.relative_error([a], [a, b]) == float("inf")
    assert bz.relative_error([torch.tensor([float("nan")])], [torch.tensor([0.0])]) == float("inf")
    assert bz.relative_error([], []) == 0.0


def test_head_layers_is_the_last_classifier() -> None:
    lin = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 1000), nn.ReLU(), nn.Linear(1000, 1000))
    assert bz.head_layers(lin) == [lin[4]]
    squeeze = nn.Sequential(nn.Conv2d(3, 1000, 1), nn.AdaptiveAvgPool2d(1))
    assert bz.head_layers(squeeze) == [squeeze[0]]
    assert bz.head_layers(nn.Linear(4, 10)) == []
    assert bz.head_layers(nn.Linear(4, 10), num_classes=10) != []


def _record(model: str, *, ok: bool = True, ratio: float | None = 0.3, tp: float | None = 0.3,
            tp_status: str | None = "ok", reasons: list[list[Any]] | None = None,
            errors: dict[str, str] | None = None, exact: bool = True) -> dict[str, Any]:
    return {"model": model, "ok": ok, "equivalent": ok, "macs_exact": exact if ok else None, "unchanged": True,
            "macs_ratio": ratio if ok else None, "counter_macs_ratio": ratio, "tp_macs_ratio": tp,
            "tp_status": tp_status, "groups": 10, "prunable": 7, "frozen_share": 0.2,
            "frozen_reasons": reasons or [], "macs_dense": 100, "macs_dense_counter": 100 if exact else 150,
            "macs_pruned": 30, "macs_pruned_counter": 30 if exact else 60, "analyse_s": 0.5, "apply_s": 0.2,
            "errors": errors or {}}


def _records() -> list[dict[str, Any]]:
    return [
        _record("resnet18", ratio=0.26, tp=0.27, reasons=[["model output", 512]]),
        _record("swin_t", ratio=0.6, tp=None, tp_status="error at prune: boom", exact=False,
                reasons=[["unknown op torch.matmul", 96], ["model output", 768]]),
        _record("vit_b_16", ratio=0.5, tp=0.3),
        _record("maxvit_t", ok=False, tp=None, tp_status="error at prune: x",
                errors={"apply": "AutoPruneError: no attribute _tensor_constant0\nmore", "tp": "x"}),
        _record("vgg11", ok=False, errors={"apply": "AutoPruneError: no attribute _tensor_constant0"}),
    ]


def test_summary_counts_and_compares_with_torch_pruning() -> None:
    s = bz.summarize(_records())
    assert s["models"] == 5 and s["ok"] == 3 and s["equivalent"] == 3 and s["macs_exact"] == 2
    assert s["tp_ok"] == 3 and s["tp_measured"] == 5
    assert s["both_handle"] == 2  # resnet18 and vit_b_16 (swin_t has no TP ratio)
    assert s["better_or_equal_than_tp"] == 1
    assert s["worse_than_tp"] == [{"model": "vit_b_16", "macs_ratio": 0.5, "tp_macs_ratio": 0.3}]
    assert s["frozen_reasons"][0] == {"reason": "model output", "models": 2, "channels": 1280}
    assert s["failures"] == [{"cause": "apply: AutoPruneError: no attribute _tensor_constant0",
                              "models": ["maxvit_t", "vgg11"]}]


def test_markdown_has_a_row_per_model_and_the_sections() -> None:
    raw = {"models": _records(), "settings": {"side": 224, "selected": 7}}
    md = bz.render_markdown(raw)
    assert "Partial run: 5 of 7 models" in md
    for name in ("resnet18", "swin_t", "vit_b_16", "maxvit_t", "vgg11"):
        assert f"| {name} |" in md
    assert "**apply failed**" in md and "## Failures by cause" in md
    assert "## Closed form versus counter" in md and "| swin_t | 100 | 150 |" in md
    assert "## Freezing reasons that remain" in md and "| model output | 2 | 1,280 |" in md
    assert "vit_b_16 (0.500 vs 0.300)" in md
    assert "error at prune: boom" in md
    full = bz.render_markdown({"models": _records(), "settings": {"side": 224, "selected": 5}})
    assert "Partial run" not in full


def test_checkpoint_round_trip_and_merge(tmp_path: Path) -> None:
    path = tmp_path / "engine_zoo.json"
    assert bz.read_raw(path) == {}
    path.write_text("{not json")
    assert bz.read_raw(path) == {}
    bz.write_raw(path, {"models": [_record("resnet18")]})
    assert json.loads(path.read_text())["models"][0]["model"] == "resnet18"
    assert not list(tmp_path.glob("*.tmp"))
    order = ["alexnet", "resnet18", "swin_t"]
    merged = bz.merge_records([_record("swin_t"), _record("resnet18", ratio=0.9)], _record("resnet18"), order)
    assert [r["model"] for r in merged] == ["resnet18", "swin_t"] and merged[0]["macs_ratio"] == 0.3
    merged = bz.merge_records(merged, _record("zzz"), order)
    assert [r["model"] for r in merged] == ["resnet18", "swin_t", "zzz"]


class _SDPA(nn.Module):
    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.qkv, self.proj, self.explicit = nn.Linear(16, 48), nn.Linear(16, 16), explicit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        if self.explicit:
            y = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, 16))


def test_reference_macs_counts_attention_like_explicit_matmuls() -> None:
    x = torch.randn(1, 10, 16)
    explicit = bz.reference_macs(_SDPA(True), x)
    linear = 10 * 16 * 48 + 10 * 16 * 16
    assert explicit == linear + 2 * 2 * 10 * 10 * 8  # two matmuls per head
    assert bz.reference_macs(_SDPA(False), x) == explicit


def test_reference_macs_counts_multihead_attention_in_eval() -> None:
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    x = torch.randn(1, 10, 16)
    expected = 10 * 16 * 48 + 10 * 16 * 16 + 2 * 2 * 10 * 10 * 8
    assert bz.reference_macs(Wrap(), x) == expected
    if hasattr(torch.backends, "mha"):
        assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_perturb_randomizes_constants_and_keeps_scales_positive() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 5))
    scale = nn.Parameter(torch.full((4,), 1e-6))
    model.register_parameter("layer_scale", scale)
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    bz.perturb(model)
    assert not model.training
    for t in (model[2].weight, model[2].bias, model[1].running_mean, model[1].bias):
        assert t.abs().sum() > 0 and t.unique().numel() > 1
    assert bool((scale > 0.4).all()) and scale.unique().numel() == 4
    assert model[1].num_batches_tracked.dtype == torch.long


def test_measure_a_small_resnet_end_to_end() -> None:
    torch.manual_seed(0)
    model = bz.perturb(TinyResNet())
    rec = bz.measure("tiny_resnet", model, torch.rand(1, 3, 8, 8))
    assert rec["ok"] and rec["equivalent"] and rec["macs_exact"] and rec["unchanged"], rec["errors"]
    assert rec["errors"] == {}
    assert 0.0 < rec["macs_ratio"] < 0.6 and rec["macs_ratio"] == rec["counter_macs_ratio"]
    assert rec["prunable"] >= 1 and rec["groups"] >= rec["prunable"]
    assert rec["macs_dense"] == rec["macs_dense_counter"] and rec["max_rel_err"] <= bz.TOLERANCE
    assert rec["analyse_s"] > 0 and rec["apply_s"] > 0 and "tp_status" not in rec


def test_unchanged_reports_what_a_call_left_behind() -> None:
    model = nn.Sequential(nn.Linear(3, 3)).eval()
    x = torch.rand(1, 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = bz._attributes(model)
    out = bz._run(model, x)
    assert bz._unchanged(model, x, state, attrs, out) is None
    model._tensor_constant0 = torch.zeros(1)
    assert "_tensor_constant0" in (bz._unchanged(model, x, state, attrs, out) or "")
    del model._tensor_constant0
    with torch.no_grad():
        model[0].bias.add_(1.0)
    assert "0.bias" in (bz._unchanged(model, x, state, attrs, out) or "")


def test_main_without_torchvision_says_which_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(SystemExit) as exc:
        bz.main(["--quick"])
    assert "make setup-vision" in str(exc.value.code)


def test_torch_pruning_runs_in_a_capped_child_and_its_failures_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = nn.Linear(3, 3), torch.rand(1, 3)
    monkeypatch.setattr(bz, "tp_prune", lambda *a, **k: {"tp_status": "ok", "tp_macs_ratio": 0.5, "tp_seconds": 0.1})
    res = bz.tp_prune_isolated(model, x, 9)
    assert res["tp_status"] == "ok" and res["tp_macs_ratio"] == 0.5 and res["tp_seconds"] >= 0
    monkeypatch.setattr(bz, "tp_prune", lambda *a, **k: os._exit(3))
    assert bz.tp_prune_isolated(model, x, 9)["tp_status"].startswith("crashed (exit code 3")
    monkeypatch.setattr(bz, "tp_prune", lambda *a, **k: time.sleep(30))
    assert bz.tp_prune_isolated(model, x, 9, timeout_s=1.0)["tp_status"] == "timed out after 1 s"

    def hog(*args: Any, **kwargs: Any) -> None:
        torch.empty(2**33)  # 32 GiB: refused under the cap

    monkeypatch.setattr(bz, "tp_prune", hog)
    status = bz.tp_prune_isolated(model, x, 9, mem_gb=0.5)["tp_status"]
    assert status.startswith("error: ") and status.endswith("(over its memory cap of 0.5 GB)")


def test_torch_pruning_missing_is_a_status() -> None:
    if importlib.util.find_spec("torch_pruning") is not None:
        pytest.skip("torch_pruning is installed here; its absence is what this test covers")
    res = bz.tp_prune(nn.Linear(3, 3), torch.rand(1, 3), 9)
    assert res == {"tp_status": "not installed", "tp_macs_ratio": None, "tp_seconds": None}


class LN2d(nn.LayerNorm):
    """ConvNeXt's ``LayerNorm2d``: a LayerNorm subclass over the channel dim of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class LNStream(nn.Module):
    """A prunable stream through an ``nn.LayerNorm`` and a ``LayerNorm2d``-style subclass."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.ln2d = LN2d(8)
        self.conv = nn.Conv2d(8, 8, 1)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.ln2d(self.stem(x))) + self.stem(x)
        return self.head(self.ln(y.mean((2, 3))))


def test_the_masked_original_normalises_over_the_kept_channels_only() -> None:
    import engine_cases as ec

    from autoprune import graph, pruning

    torch.manual_seed(0)
    model, x = ec.randomize(LNStream().eval()), torch.randn(2, 3, 6, 6)
    gs = graph.analyze(model, x)
    plan = pruning.plan(model, gs, {g: gs[g].size // 2 for g in gs.prunable_ids})
    assert bz.inexact_norms(model, gs, plan)  # the stream passes through both norms
    got = bz._run(pruning.apply(model, gs, plan), x)
    zeroed = bz.relative_error(got, bz._run(ec.masked_reference(model, gs, plan), x))
    kept = bz.relative_error(got, bz._run(bz.masked_layer_norms(ec.masked_reference(model, gs, plan), gs, plan), x))
    assert zeroed > 1e-3 and kept <= bz.TOLERANCE  # zeroing is not removing; the kept-channel reference is exact
    rec: dict[str, Any] = {}
    bz._equivalence(rec, model, gs, plan, got, x)
    assert rec["equivalent"] and rec["equivalence_scope"].startswith(f"all {len(plan.pruned())} pruned groups")
