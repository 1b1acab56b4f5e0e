"""Benchmark figures (``python -m benchmarks.figures``): drawn from tiny synthetic JSON files shaped like the real
ones, skipping what is missing or unusable, exit code 2 when nothing can be drawn, and a run on the real
``results/benchmarks`` folder (into a temporary folder; skipped when it holds no JSON).

Nothing here runs a benchmark or trains; figures are saved at a low DPI to keep the tests fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import figures
from benchmarks._cells import from_file

ALL_PNGS = {
    "searchers_best_so_far.png", "searchers_finalists.png", "search_quality_resnet20_50.png",
    "search_quality_resnet20_30.png", "search_quality_resnet56_50.png", "fidelity_scatter.png",
    "deployment_latency.png", "search_cost_depth.png",
}
WIDTHS = {"layer1.0.conv1:out": 8, "layer2.0.conv1:out": 15}


@pytest.fixture(autouse=True)
def _low_dpi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(figures, "DPI", 30)


def _trial(number: int, accuracy: float | None, feasible: bool = True) -> dict[str, Any]:
    return {"number": number, "state": "complete", "accuracy": accuracy, "macs": 0.49, "feasible": feasible,
            "widths": WIDTHS}


def searchers_json() -> dict[str, Any]:
    runs = []
    for seed in range(2):
        runs.append({"searcher": "uniform", "seed": seed, "trials": [_trial(0, 0.53)], "stop_reason": "exhausted",
                     "seconds": 1.0})
        runs.append({"searcher": "tpe", "seed": seed, "stop_reason": "n_trials", "seconds": 3.0,
                     "trials": [_trial(0, 0.40 + 0.01 * seed), _trial(1, 0.30), _trial(2, 0.62)]})
        runs.append({"searcher": "sensitivity", "seed": seed, "stop_reason": "exhausted", "seconds": 2.0,
                     "trials": [_trial(0, 0.7, feasible=False), _trial(1, 0.5)]})
    finalists = {name: {"val": val, "macs": 0.49, "test": test, "widths": WIDTHS}
                 for name, val, test in (("uniform", 0.53, 0.857), ("tpe", 0.62, 0.878), ("sensitivity", 0.5, 0.85))}
    return {"sizes": {"candidates": 3, "seeds": 2, "ft_steps": 300}, "budget": {"macs": 0.5},
            "dense": {"val": 0.919, "test": 0.9154}, "groups": 9, "runs": runs, "finalists": finalists,
            "options": {}, "seconds": 10.0}


def _cell(model: str, target: float, searcher: str, seed: int, after: float | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"model": model, "target": target, "searcher": searcher, "seed": seed,
                           "stop_reason": "n_trials", "trials": 3, "candidates": 3, "search_seconds": 4.0}
    if after is None:
        rec["error"] = "no feasible evaluated candidate"
    else:
        rec.update({"val_best": 0.5, "macs_ratio": target - 0.01, "test_before_ft": after - 0.3,
                    "test_after_ft": after, "widths": WIDTHS})
    return rec


def search_quality_json() -> dict[str, Any]:
    recs = [_cell("resnet20", 0.5, "uniform", 0, 0.86), _cell("resnet20", 0.5, "tpe", 0, 0.87),
            _cell("resnet20", 0.5, "tpe", 1, 0.875), _cell("resnet20", 0.5, "dmcp", 0, None),
            _cell("resnet20", 0.3, "uniform", 0, 0.80), _cell("resnet56", 0.5, "uniform", 0, 0.90),
            _cell("resnet56", 0.3, "tpe", 0, None)]  # every resnet56 @ 30 % cell failed: no figure
    return {"sizes": {"models": ["resnet20", "resnet56"], "targets": [0.5, 0.3], "candidates": 3, "seeds": 2,
                      "ft_steps": 5},
            "dense": {m: {"select": 0.92, "report": acc, "macs": 1, "params": 1, "bytes": 1}
                      for m, acc in (("resnet20", 0.9154), ("resnet56", 0.934))},
            "cells": {f"{r['model']}|{r['target']}|{r['searcher']}|{r['seed']}": r for r in recs},
            "created": 0.0, "runs": [], "quick": False, "searchers": ["uniform", "tpe", "dmcp"]}


def fidelity_json() -> dict[str, Any]:
    labels = ["plain", "adaptive_bn (10×64)", "infcop (IF paper: mean, l2, ε=1; ≤15 steps)"]
    records = []
    for i in range(5):
        truth = 0.78 + 0.01 * i
        scores = {label: {"accuracy": 0.2 + 0.05 * ((i * (k + 1)) % 5), "seconds": 5.0 + k, "samples": 64 * k,
                          "stop_reason": None, "steps": None} for k, label in enumerate(labels)}
        records.append({"widths": WIDTHS, "macs_fraction": 0.49, "scores": scores,
                        "truth": {"accuracy": truth, "seconds": 100.0, "samples": 9600}})
    return {"sizes": {"candidates": 5, "truth_steps": 150}, "seed": 0,
            "dense": {"score_acc": 0.92, "truth_acc": 0.91, "macs": 1}, "records": records, "evaluators": labels,
            "seconds": 1.0}


def deployment_json() -> dict[str, Any]:
    def lat(ms: float, batch: int) -> dict[str, Any]:
        return {"median_ms": ms, "iqr_ms": 0.1, "runs": 10, "threads": 1, "batch": batch, "rounds_ms": [ms] * 3}

    models = []
    for name, scale in (("resnet20", 1.0), ("resnet56", 3.0)):
        variants = {"dense fp32": {"bytes": int(1.16e6 * scale), "max_abs_diff": 0.0, "top1": 0.92},
                    "dense int8": {"bytes": int(3.3e5 * scale), "top1": 0.92},
                    "pruned fp32": {"bytes": int(6.2e5 * scale), "top1": 0.49},
                    "pruned int8": {"bytes": int(1.9e5 * scale), "top1": 0.5}}
        latency = {str(b): {v: lat(scale * b * (2.0 if "fp32" in v else 1.0), b) for v in variants} for b in (1, 64)}
        models.append({"model": name, "keep_ratio": 0.72, "macs": {"dense": 4e7 * scale, "pruned": 2e7 * scale},
                       "params": {"dense": 1, "pruned": 1}, "variants": variants, "latency": latency, "seconds": 1.0})
    return {"sizes": {"models": ["resnet20", "resnet56"], "batches": [1, 64]}, "models": models, "threads": 1,
            "seconds": 1.0}


def search_cost_json() -> dict[str, Any]:
    depth = [{"model": f"resnet{d}", "groups": g, "prunable": g - 3, "analyze_s": 0.001 * d, "apply_ms": 0.9 * d,
              "closed_form_us": 10.0 + d / 10, "abn_eval_s": 0.14 * d, "keep_ratio": 0.72, "macs_fraction": 0.5}
             for d, g in ((20, 17), (56, 35), (110, 62))]
    return {"sizes": {"candidates": 4}, "setup": {"analysis": 0.05}, "evaluators": [], "depth": depth,
            "threads": 1, "seconds": 1.0}


SOURCES = {
    "searchers.json": searchers_json, "search_quality.json": search_quality_json,
    "evaluator_fidelity_training.json": fidelity_json, "deployment.json": deployment_json,
    "search_cost.json": search_cost_json,
}


def write_results(folder: Path, names: list[str] | None = None, *, suffix: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, build in SOURCES.items():
        if names is None or name in names:
            (folder / name.replace(".json", f"{suffix}.json")).write_text(json.dumps(build(), indent=1))
    return folder


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:4] == b"\x89PNG", path


def test_every_figure_from_synthetic_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results, out = write_results(tmp_path / "results"), tmp_path / "figs"
    assert figures.main(["--results", str(results), "--out", str(out)]) == 0
    written = {p.name for p in out.glob("*.png")}
    assert written == ALL_PNGS
    for name in written:
        assert_png(out / name)
    printed = capsys.readouterr().out.split()
    assert {Path(p).name for p in printed} == ALL_PNGS | {"README.md"}
    readme = (out / "README.md").read_text()
    for name in ALL_PNGS:
        assert f"[`{name}`]({name})" in readme
    assert "Source: `search_cost.json`" in readme and "Source: `searchers.json`" in readme
    assert "resnet20, 50 % of the dense MACs" in readme


def test_missing_json_is_skipped_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results, out = write_results(tmp_path / "results", ["search_cost.json"]), tmp_path / "figs"
    (results / "deployment.json").write_text('{"models": [{"model": "resne')  # half-written by a running bench
    (results / "evaluator_fidelity_training.json").write_text(json.dumps({"records": []}))  # nothing usable yet
    assert figures.main(["--results", str(results), "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.png")} == {"search_cost_depth.png"}
    err = capsys.readouterr().err
    assert "searchers.json not found" in err
    assert "deployment.json is unreadable" in err
    assert "skipped fidelity_scatter" in err
    assert all(line.startswith("figures: skipped ") for line in err.strip().splitlines())
    assert "search_cost_depth.png" in (out / "README.md").read_text()
    assert "searchers" not in (out / "README.md").read_text()


def test_empty_folder_exits_2_naming_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    assert figures.main(["--results", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err
    assert "make bench" in err
    assert not (empty / "figures").exists()


def test_quick_files_only_with_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = write_results(tmp_path / "results", ["search_quality.json"], suffix="_quick")
    out = tmp_path / "figs"
    assert figures.main(["--results", str(results), "--out", str(out)]) == 2  # the quick file is ignored
    assert "make bench`" in capsys.readouterr().err
    assert figures.main(["--results", str(results), "--out", str(out), "--quick"]) == 0
    assert {p.name for p in out.glob("*.png")} == {"search_quality_resnet20_50_quick.png",
                                                    "search_quality_resnet20_30_quick.png",
                                                    "search_quality_resnet56_50_quick.png"}
    assert (out / "README_quick.md").is_file() and not (out / "README.md").exists()


def test_default_out_is_inside_the_results_folder(tmp_path: Path) -> None:
    results = write_results(tmp_path / "results", ["search_cost.json"])
    assert figures.main(["--results", str(results)]) == 0
    assert_png(results / "figures" / "search_cost_depth.png")


def test_best_so_far_treats_no_feasible_yet_as_missing() -> None:
    curves = figures.best_so_far_curves(searchers_json()["runs"])
    sens = curves["sensitivity"]
    assert sens.shape == (2, 2)
    assert math.isnan(sens[0, 0]) and sens[0, 1] == pytest.approx(0.5)  # the infeasible 0.7 never counts
    assert curves["tpe"][1].tolist() == pytest.approx([0.41, 0.41, 0.62])
    assert curves["uniform"].shape == (2, 1)


def test_spearman_matches_the_definition() -> None:
    assert figures.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert figures.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(figures.spearman([1, 1, 1], [1, 2, 3]))
    a, b = [0.3, 0.1, 0.1, 0.7, 0.5], [0.8, 0.2, 0.4, 0.9, 0.9]
    stats = pytest.importorskip("scipy.stats")
    assert figures.spearman(a, b) == pytest.approx(float(stats.spearmanr(a, b).statistic))


def _expected_real(results: Path) -> set[str]:
    """The images a run on ``results`` must write: one per readable JSON (search quality: per finished cell)."""
    expected = set()
    for spec in figures.FIGURES:
        try:
            raw = json.loads((results / spec.source).read_text())
        except (OSError, ValueError):
            continue  # missing, or being rewritten by a running benchmark right now
        if spec.name != "search_quality":
            expected.add(f"{spec.name}.png")
            continue
        for rec in from_file(raw)["cells"].values():
            if rec.get("test_after_ft") is not None and not rec.get("error"):
                expected.add(f"search_quality_{rec['model']}_{100 * float(rec['target']):.0f}.png")
    return expected


def test_real_results_folder(tmp_path: Path) -> None:
    results = figures.RESULTS
    if not any((results / spec.source).is_file() for spec in figures.FIGURES):
        pytest.skip(f"no benchmark JSON in {results} (run `make bench`)")
    out = tmp_path / "figs"
    rc = figures.main(["--results", str(results), "--out", str(out)])
    expected = _expected_real(results)
    written = {p.name for p in out.glob("*.png")} if out.exists() else set()
    assert rc == (0 if written else 2)
    assert expected <= written
    for name in written:
        assert_png(out / name)
