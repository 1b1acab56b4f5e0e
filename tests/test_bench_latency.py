"""Smoke tests of ``benchmarks/bench_latency.py`` (issue #21): the summaries, the headline and the Markdown from fake
records, and one predictor cell on a tiny model. Nothing here judges a timing (the machine is shared)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import bench_latency as bl

HEADLINE_KEYS = {"within_10pct", "spearman", "candidates", "speedup_over_macs_ratio", "latency_search_vs_macs_search"}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _rows(errors: list[float]) -> list[dict[str, Any]]:
    return [{"macs_fraction": 0.3 + 0.1 * i, "predicted_ms": (1.0 + i) * (1 + e), "measured_ms": 1.0 + i,
             "iqr_ms": 0.01, "rel_error": e, "widths": [4, 8]} for i, e in enumerate(errors)]


def _predictor(model: str, errors: list[float]) -> dict[str, Any]:
    rows = _rows(errors)
    return {"model": model, "groups": 2, "sites": 5, "table_entries": 40, "table_seconds": 1.0,
            "calibration_seconds": 0.5, "measure_seconds": 2.0, "coef": [1.1, 0.01, 0.2],
            "calibration_fit": {"median_rel_error": 0.04}, "dense": {"predicted_ms": 5.0, "measured_ms": 5.1},
            "summary": bl.predictor_summary(rows), "rows": rows, "seconds": 3.0, "finished": "now"}


def _timing(dense_ms: float, ms: float, macs_ratio: float) -> dict[str, Any]:
    return {"median_ms": ms, "iqr_ms": 0.1, "rounds_ms": [ms], "speedup": dense_ms / ms,
            "ratio": dense_ms / ms / macs_ratio, "ratio_like_for_like": dense_ms / ms / macs_ratio}


def _speedup() -> dict[str, Any]:
    variants = {n: {"macs_ratio": r, "like_for_like": "dense", "batch1": _timing(6.0, ms1, r),
                    "batch64": _timing(400.0, ms64, r)}
                for n, r, ms1, ms64 in (("dense", 1.0, 6.0, 400.0), ("pruned (export, fx)", 2.0, 4.5, 300.0),
                                        ("pruned, BN folded", 2.0, 3.6, 250.0))}
    prof = {"batch": 1, "op_ms": 5.0, "conv_ms": 3.5, "ops_per_forward": 900.0,
            "top": [{"op": "aten::_slow_conv2d_forward", "share": 0.7, "calls": 55.0, "us_per_forward": 3500.0},
                    {"op": "aten::add", "share": 0.1, "calls": 27.0, "us_per_forward": 500.0}]}
    rec = {"model": "resnet56", "target": 0.5, "uniform_scale": 0.4, "widths": [8, 16, 31], "widths_x8": [8, 16, 32],
           "macs_fraction": 0.497, "macs_fraction_x8": 0.502, "big_batch": 64, "variants": variants,
           "profile": {"dense @ batch 1": prof, "pruned (export, fx) @ batch 1": prof}, "seconds": 60.0,
           "finished": "now"}
    rec["findings"] = bl.speedup_findings(rec)
    return rec


def _search() -> dict[str, Any]:
    arm = {"budget": {"macs": 0.5}, "macs_fraction": 0.49, "val_accuracy": 0.9, "measured_ms": 1.5, "iqr_ms": 0.05,
           "latency_fraction": 0.6, "test_accuracy": 0.88}
    return {"trials": 4, "ft_epochs": 0.02, "val_size": 500, "eval_batches": 2, "dense_ms": 2.5,
            "macs_search": arm, "latency_search": {**arm, "test_accuracy": 0.885}, "delta_points": 0.5,
            "seconds": 100.0, "finished": "now"}


def test_predictor_summary_counts_the_share_within_ten_percent_and_ranks() -> None:
    s = bl.predictor_summary(_rows([0.05, -0.08, 0.2, 0.0]))
    assert s["candidates"] == 4 and s["within_10pct"] == 0.75
    assert s["median_abs_error"] == pytest.approx(0.065) and s["max_abs_error"] == pytest.approx(0.2)
    assert s["spearman"] == pytest.approx(1.0) and s["spearman_macs"] == pytest.approx(1.0)


def test_spearman_without_scipy_uses_numpy_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert bl.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert bl.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_headline_has_exactly_the_issue_keys_and_nulls_for_cells_not_run() -> None:
    empty = bl.headline({})
    assert set(empty) == HEADLINE_KEYS
    assert empty["within_10pct"] is None and empty["speedup_over_macs_ratio"] == {"batch1": None, "batch64": None}
    cells = {"predictor|resnet20": _predictor("resnet20", [0.05, 0.2]),
             "predictor|resnet56": _predictor("resnet56", [0.0, 0.01, -0.02])}
    h = bl.headline(cells)
    assert h["candidates"] == 5 and h["within_10pct"] == pytest.approx(0.8)
    assert h["latency_search_vs_macs_search"] is None
    cells |= {"speedup|resnet56": _speedup(), "search|resnet20": _search()}
    h = bl.headline(cells)
    assert set(h) == HEADLINE_KEYS
    assert h["speedup_over_macs_ratio"]["batch1"] == pytest.approx(6.0 / 4.5 / 2.0)
    assert h["latency_search_vs_macs_search"] == 0.5
    second = _search() | {"delta_points": -0.1}
    h = bl.headline(cells | {"search|resnet20|seed1": second})  # the mean over the seeds run
    assert h["latency_search_vs_macs_search"] == pytest.approx(0.2)
    assert bl.run_cell.__doc__ and bl._seed_of("search|resnet20|seed1") == 1 and bl._seed_of("search|resnet20") == 0


def test_the_markdown_renders_every_section() -> None:
    cells = {"predictor|resnet20": _predictor("resnet20", [0.05, 0.2]), "speedup|resnet56": _speedup(),
             "search|resnet20": _search()}
    cells["search|resnet20|seed1"] = _search() | {"delta_points": -0.1}
    raw = {"quick": True, "sizes": {"big_batch": 64}, "cells": cells, "headline": bl.headline(cells)}
    text = bl.summarise(raw)
    assert "### Seed 1 (`search|resnet20|seed1`)" in text and "Mean Δ over 2 seeds: +0.20 points" in text
    for part in ("| figure | value | goal | met |", "## Predictor vs measurement", "## Speed-up of ResNet-56",
                 "pruned, BN folded", "## Latency-aware search", "Δ (latency − MACs) = +0.50 points", "--resume"):
        assert part in text, part
    findings = cells["speedup|resnet56"]["findings"]
    assert any("best variant 'pruned, BN folded'" in f for f in findings)
    assert any(f.startswith("profile at batch 1: convolution kernels 3.50 → 3.50 ms") for f in findings)


def test_one_predictor_cell_on_a_tiny_model(tmp_path: Path) -> None:
    sizes = replace(bl.QUICK, candidates=3, rounds=1, run_time=0.002, table_run_time=0.002)
    rec = bl.run_predictor("small_cnn", sizes, tmp_path / "cell", model_kwargs={"width": 4})
    assert len(rec["rows"]) == 3 and rec["summary"]["candidates"] == 3
    assert rec["table_entries"] > 0 and len(rec["coef"]) == 3 and rec["calibration_fit"]["candidates"] == 8
    assert (tmp_path / "cell" / "latency_table.json").is_file() and (tmp_path / "cell" / "latency_model.json").is_file()
    for row in rec["rows"]:
        assert row["predicted_ms"] > 0 and row["measured_ms"] > 0 and 0 < row["macs_fraction"] <= 1
        assert row["rel_error"] == pytest.approx(row["predicted_ms"] / row["measured_ms"] - 1)
    assert set(bl.headline({"predictor|small_cnn": rec})) == HEADLINE_KEYS


def test_unknown_cells_are_refused() -> None:
    with pytest.raises(SystemExit):
        bl.main(["--only", "predictor|nope"])


def test_op_profile_and_the_model_variants_agree_with_the_model() -> None:
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.rand(2, 3, 8, 8)
    prof = bl.op_profile(model, x, iters=2)
    assert prof["batch"] == 2 and 0 < prof["conv_ms"] <= prof["op_ms"] and prof["top"]
    assert sum(t["share"] for t in prof["top"]) <= 1 + 1e-9
    with torch.no_grad():
        for variant in (bl._cl(model), bl._frozen(model, x), bl.plain_module(model, model)):
            assert torch.allclose(variant.eval()(x), model(x), atol=1e-5)
