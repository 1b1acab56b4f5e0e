"""Smoke tests of the benchmark suite: modules import, the runner rejects bad names, the published table renders,
and the search-cost, deployment and search-quality cores produce well-formed output on tiny inputs.

Nothing here touches the real CIFAR-10 data or asserts timings (the machine is shared): the end-to-end calls
use ``small_cnn`` on the bundled ``digits`` data.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoprune.data import load_dataset, make_loader, subset
from autoprune.errors import ConfigError
from autoprune.models import build_model
from benchmarks import published
from benchmarks import run as bench_run


@pytest.mark.parametrize("name", bench_run.discover())
def test_every_benchmark_module_imports_and_has_main(name: str) -> None:
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    assert callable(mod.main)
    assert mod.__doc__  # the module docstring says what the benchmark measures


def test_run_registers_the_new_benchmarks() -> None:
    names = bench_run.discover()
    for new in ("search_cost", "deployment", "search_quality"):
        assert new in names
    # search quality (hours in its full form) runs last
    assert names.index("search_quality") > names.index("search_cost")


def test_runner_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--only", "no_such_benchmark"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_benchmark" in err and "search_cost" in err


def _needs_cifar(name: str) -> bool:
    """The benchmark checks for CIFAR-10 and the checkpoints itself or through the search-quality grid's checks."""
    source = (bench_run.HERE / f"bench_{name}.py").read_text()
    return "data_error" in source or "checked_searchers(" in source


CIFAR_BENCHMARKS = [n for n in bench_run.discover() if _needs_cifar(n)]


def test_the_cifar_benchmarks_are_found() -> None:
    assert {"recovery", "search_quality", "search_budget", "ranking"} <= set(CIFAR_BENCHMARKS)


@pytest.mark.parametrize("name", CIFAR_BENCHMARKS)
def test_a_cifar_benchmark_without_its_data_says_error_and_hint_and_exits_2(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "AUTOPRUNE_SHARED": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.bench_{name}"], capture_output=True, text=True,
                          env=env, cwd=bench_run.HERE.parent, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: missing ") and str(tmp_path / "data" / "cifar-10-batches-bin") in lines[0]
    assert lines[1].startswith("hint: ") and "AUTOPRUNE_SHARED" in lines[1]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


# ------------------------------------------------------------------------------------------------ published


def test_published_renders_every_row_with_source_and_caveat() -> None:
    text = published.render_markdown()
    for r in published.PUBLISHED:
        assert r.source and r.caveat and r.training
        assert published._esc(r.source) in text
        assert published._esc(r.caveat) in text
    for title in published.SETTINGS.values():
        assert f"## {title}" in text
    n_rows = sum(1 for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method"))
    assert n_rows == len(published.PUBLISHED)


def test_published_records_are_consistent() -> None:
    for key in published.SETTINGS:
        assert published.rows_for(key)
    resrep = next(r for r in published.rows_for("resnet56-cifar10") if r.method.startswith("ResRep"))
    assert "480 epochs" in resrep.training
    hrank = next(r for r in published.rows_for("resnet56-cifar10") if r.method.startswith("HRank ("))
    assert hrank.delta == pytest.approx(93.17 - 93.26)
    depgraph = next(r for r in published.PUBLISHED if r.printed_delta == 0.38)
    assert "(printed +0.38)" in published.render_table([depgraph])
    assert published.setting_of("resnet20") == "resnet20-cifar10"
    assert published.setting_of("vgg16_bn") is None
    with pytest.raises(ValueError, match="unknown setting"):
        published.rows_for("mnist")


def test_published_record_requires_source_and_caveat() -> None:
    with pytest.raises(ValueError, match="source and a caveat"):
        published.PublishedResult("imagenet", "ResNet-50", "X", 76.0, 75.0, None, "2G", "?", "", "none")
    with pytest.raises(ValueError, match="fraction"):
        published.PublishedResult("imagenet", "ResNet-50", "X", 76.0, 75.0, 50.0, "2G", "?", "src", "none")


# ------------------------------------------------------------------------------------------------ search cost


@pytest.fixture(scope="module")
def digits_ctx():
    from benchmarks.bench_search_cost import Context

    torch.manual_seed(0)
    splits = load_dataset("digits")
    model = build_model("small_cnn", num_classes=10, in_channels=1, mean=splits.info.mean, std=splits.info.std)
    model.eval()
    return Context(
        name="small_cnn", model=model, example=torch.rand(1, 1, 8, 8),
        calib=make_loader(subset(splits.train, 64, seed=1), 32),
        train=make_loader(splits.train, 32, shuffle=True, seed=2),
        val=make_loader(splits.val, 72),
    )


TINY_COST = dict(candidates=2, batch=32, calib_batches=2, val_images=72, ft_steps=2, infcop_check=1, flow_images=32,
                 depth_models=(), repeats=1, closed_form_calls=10)


def test_search_cost_core_on_digits(digits_ctx) -> None:
    from benchmarks import bench_search_cost as bsc

    sizes = bsc.Sizes(**TINY_COST)
    setup, rows = bsc.throughput_rows(digits_ctx, sizes)
    assert setup["analysis"] > 0 and setup["infcop_reference"] > 0
    assert [r["evaluator"] for r in rows] == list(bsc.EVALUATORS)
    for r in rows:
        assert r["candidates"] == 2
        for key in ("repair_ms", "price_ms", "build_ms", "evaluate_s", "total_s", "per_minute", "overhead_share"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["total_s"] >= r["evaluate_s"]
        assert r["macs_fraction"] <= 0.5 + 1e-9  # repaired to the budget
    by = {r["evaluator"]: r for r in rows}
    assert by["plain"]["samples"] == 0
    assert by["adaptive_bn"]["samples"] == sizes.calib_batches * sizes.batch
    assert by["finetune"]["samples"] > by["adaptive_bn"]["samples"]

    depth = bsc.depth_row("small_cnn", digits_ctx.model, digits_ctx.example, digits_ctx.calib, digits_ctx.val, sizes)
    assert depth["prunable"] > 0 and depth["macs_fraction"] <= 0.5 + 1e-9
    assert all(depth[k] > 0 for k in ("analyze_s", "apply_ms", "closed_form_us", "abn_eval_s"))

    text = bsc.summarise({"sizes": TINY_COST, "setup": setup, "evaluators": rows, "depth": [depth, depth],
                          "threads": 1, "seconds": 1.0})
    table = [line for line in text.splitlines() if line.startswith("| ") and "candidates / min" not in line]
    assert len(table) == len(rows) + 1 + 2  # evaluator rows, the depth header, two depth rows
    for r in rows:
        assert r["label"] in text


def test_search_cost_rejects_unknown_evaluator(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_search_cost as bsc

    with pytest.raises(SystemExit):
        bsc.main(["--evaluators", "plain,bogus"])
    assert "bogus" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ deployment


def test_deployment_export_sizes_on_small_cnn(digits_ctx, tmp_path: Path) -> None:
    from autoprune import graph, pruning
    from benchmarks import bench_deployment as bd
    from benchmarks._cifar import uniform_widths

    dense = digits_ctx.model
    groups = graph.analyze(dense, digits_ctx.example)
    widths, _ = uniform_widths(groups, 0.5)
    pruned = pruning.apply(dense, groups, widths)
    records, timed, checked = bd.export_variants("cnn", dense, pruned, digits_ctx.example, list(digits_ctx.calib),
                                                 tmp_path, calib_batches=2)
    assert records["pruned fp32"]["bytes"] < records["dense fp32"]["bytes"]
    assert records["dense w8 packed"]["bytes"] < records["dense fp32"]["bytes"]
    assert records["pruned w8 packed"]["bytes"] < records["pruned fp32"]["bytes"]
    assert records["pruned fp32"]["max_abs_diff"] < 1e-5
    assert {"dense fp32", "pruned fp32"} <= set(timed) <= set(checked)
    if "error" not in records["pruned int8"]:
        assert "pruned int8" in timed and records["pruned int8"]["bytes"] > 0
    fake = {"model": "cnn", "keep_ratio": 0.7, "macs": {"dense": 100, "pruned": 50},
            "params": {"dense": 1, "pruned": 1}, "variants": records,
            "latency": {"1": {k: {"median_ms": 1.0, "iqr_ms": 0.1} for k in timed}}}
    lines = bd.model_table(fake, [1])
    assert len(lines) == 2 + len(records)
    assert "not timed" in "\n".join(lines)  # the packed 8-bit artifacts are storage formats


# ------------------------------------------------------------------------------------------------ search quality


def _cell(model: str, searcher: str, after: float) -> dict:
    return {"model": model, "target": 0.5, "searcher": searcher, "seed": 0, "trials": 3, "candidates": 3,
            "options": {}, "search_seconds": 10.0, "search_train_samples": 384, "val_best": 0.5,
            "macs_ratio": 0.49, "params": 1000, "bytes": 4000, "test_before_ft": 0.4, "test_after_ft": after,
            "ft_seconds": 5.0}


def test_search_quality_report_and_estimate() -> None:
    from benchmarks import bench_search_quality as bsq

    sizes = bsq.QUICK
    raw = {"sizes": bsq.asdict(sizes), "quick": True, "searchers": ["uniform", "tpe"], "total_cells": 2,
           "complete": True, "runs": [{"started": 0.0, "cells": 2, "seconds": 60.0}],
           "dense": {"resnet20": {"select": 0.92, "report": 0.91, "macs": 40_000_000, "params": 270_000,
                                  "bytes": 1_080_000}},
           "cells": {bsq.cell_key("resnet20", 0.5, "uniform", 0): _cell("resnet20", "uniform", 0.6),
                     bsq.cell_key("resnet20", 0.5, "tpe", 0): _cell("resnet20", "tpe", 0.7)},
           "rates": {"model": "resnet20", "forward_per_sample": 1e-3, "train_step": 0.5, "calib_batch": 128,
                     "ft_batch": 128}}
    text = bsq.summarise(raw, "python -m benchmarks.bench_search_quality --quick")
    assert "half A (selection)" in text and "half B (report)" in text
    assert "**The full form**" in text and "--resume" in text
    assert "**70.00**" in text and "-21.00" in text  # after-FT accuracy and Δ vs the dense half-B accuracy
    assert "AMC" in text  # the published comparison block
    est = bsq.estimate_full(raw, searchers=["uniform", "tpe"])
    assert est is not None and est["hours"] > 0
    assert est["cell_minutes"]["resnet56"] > est["cell_minutes"]["resnet20"]


def test_search_quality_across_the_grid_table() -> None:
    from benchmarks import bench_search_quality as bsq

    cells = {}
    for target, accs in ((0.5, {"uniform": 0.80, "tpe": 0.82, "gp": 0.79, "dmcp": 0.81}),
                         (0.3, {"uniform": 0.70, "tpe": 0.69, "dmcp": 0.74})):  # gp missing at 30 %
        for name, acc in accs.items():
            cells[bsq.cell_key("resnet20", target, name, 0)] = {**_cell("resnet20", name, acc), "target": target}
    raw = {"searchers": ["uniform", "tpe", "gp", "dmcp"], "cells": cells}
    lines = bsq.across_cells(raw)
    rows = [r for r in lines if r.startswith("| ") and not r.startswith("| searcher")]
    assert [r.split(" | ")[0] for r in rows] == ["| dmcp", "| tpe", "| uniform"]  # by mean Δ; gp not in every block
    assert rows[0] == "| dmcp | **+2.50** | +1.00 | 1.5 | +1.00 | +4.00 |"  # rank 2 at 50 %, 1 at 30 %
    assert rows[1] == "| tpe | **+0.50** | -1.00 | 2.0 | +2.00 | -1.00 |"
    assert "| searcher | mean Δ vs uniform | worst Δ | mean rank | resnet20 50 % | resnet20 30 % |" in lines
    # one block, or no uniform row: nothing to compare across
    assert bsq.across_cells({"searchers": raw["searchers"],
                             "cells": {k: v for k, v in cells.items() if v["target"] == 0.5}}) == []
    assert bsq.across_cells({"searchers": raw["searchers"],
                             "cells": {k: v for k, v in cells.items() if v["searcher"] != "uniform"}}) == []


def test_search_quality_refuses_to_clobber_full_results(tmp_path: Path) -> None:
    import json

    from benchmarks import bench_search_quality as bsq

    path = tmp_path / "search_quality.json"
    path.write_text(json.dumps({"sizes": bsq.asdict(bsq.FULL), "cells": {"k": {}}, "dense": {}, "runs": []}))
    with pytest.raises(ConfigError, match="finished cells"):
        bsq.load_results(path, bsq.FULL, resume=False)
    assert bsq.load_results(path, bsq.FULL, resume=True)["cells"] == {"k": {}}
    with pytest.raises(ConfigError, match="differ"):
        bsq.load_results(path, bsq.QUICK, resume=True)
    grid = bsq.grid(bsq.FULL, ["uniform", "tpe"])
    assert len(grid) == len(bsq.FULL.models) * len(bsq.FULL.targets) * 2 * bsq.FULL.seeds
    assert len({bsq.cell_key(*c) for c in grid}) == len(grid)


def test_search_quality_concurrent_writers_merge(tmp_path: Path) -> None:
    """Two processes (e.g. ``--models resnet20`` and ``--models resnet56``) share one results file."""
    import json

    from benchmarks import bench_search_quality as bsq
    from benchmarks._cells import from_file

    path = tmp_path / "search_quality.json"
    a = bsq.load_results(path, bsq.replace(bsq.FULL, models=("resnet20",), targets=(0.5,)), resume=True)
    b = bsq.load_results(path, bsq.replace(bsq.FULL, models=("resnet56",)), resume=True)
    a["cells"][bsq.cell_key("resnet20", 0.5, "uniform", 0)] = _cell("resnet20", "uniform", 0.6)
    a["runs"].append({"started": 1.0, "cells": 1, "seconds": 1.0})
    bsq.write_merged(path, a)
    b["cells"][bsq.cell_key("resnet56", 0.5, "tpe", 0)] = _cell("resnet56", "tpe", 0.7)
    b["runs"].append({"started": 2.0, "cells": 1, "seconds": 1.0})
    merged = bsq.write_merged(path, b)
    assert set(merged["cells"]) == {"resnet20|0.5|uniform|0", "resnet56|0.5|tpe|0"}
    assert set(merged["sizes"]["models"]) == {"resnet20", "resnet56"}
    assert [r["started"] for r in merged["runs"]] == [1, 2]
    # b's copy of a's run goes stale as a goes on; b writing it back must not undo a's progress
    a["runs"][-1].update(cells=2, seconds=5.0)
    bsq.write_merged(path, a)
    b["runs"] = [{"started": 1.0, "cells": 1, "seconds": 1.0}, *b["runs"]]
    assert bsq.write_merged(path, b)["runs"][0] == {"started": 1.0, "cells": 2, "seconds": 5.0}
    on_disk = json.loads(path.read_text())["cells"]  # the published list; read back it is the same cells
    assert isinstance(on_disk, list) and from_file({"cells": on_disk})["cells"] == merged["cells"]
    # the first process writes again (another cell): the second one's cell survives
    a["cells"][bsq.cell_key("resnet20", 0.5, "tpe", 0)] = _cell("resnet20", "tpe", 0.65)
    assert len(bsq.write_merged(path, a)["cells"]) == 3
    # resuming with other axes is allowed, with other per-cell settings it is refused
    resumed = bsq.load_results(path, bsq.replace(bsq.FULL, targets=(0.3,)), resume=True)
    assert len(resumed["cells"]) == 3 and 0.3 in resumed["sizes"]["targets"]
    with pytest.raises(ConfigError, match="per-cell settings"):
        bsq.load_results(path, bsq.replace(bsq.FULL, candidates=5), resume=True)
    text = bsq.summarise(resumed, "python -m benchmarks.bench_search_quality --resume")
    assert "3 of " in text and "resnet56 at 30 % MACs: 0 of" in text and "not started" in text
    assert "missing `" in text  # resnet20 at 50 %: some searchers missing


def test_search_quality_rerun_supersedes_cells_even_against_an_older_writer(tmp_path: Path) -> None:
    """``--rerun``: the old record moves to ``superseded`` and stays out of ``cells`` when a process that loaded
    the file before the rerun writes again; the rerun's new record then wins."""
    from benchmarks import bench_search_quality as bsq

    path = tmp_path / "search_quality.json"
    sizes = bsq.replace(bsq.FULL, models=("resnet20",), targets=(0.5,))
    first = bsq.load_results(path, sizes, resume=True)
    key = bsq.cell_key("resnet20", 0.5, "resrep", 0)
    old = _cell("resnet20", "resrep", 0.84)
    first["cells"][key] = old
    first["cells"][bsq.cell_key("resnet20", 0.5, "tpe", 0)] = _cell("resnet20", "tpe", 0.87)
    bsq.write_merged(path, first)
    older_writer = bsq.load_results(path, sizes, resume=True)  # e.g. a concurrent process started earlier
    rerun = bsq.load_results(path, sizes, resume=True)
    assert bsq.supersede(rerun, [key, bsq.cell_key("resnet20", 0.5, "dmcp", 0)], "cmd") == [key]
    merged = bsq.write_merged(path, rerun)
    assert key not in merged["cells"] and merged["superseded"][key][0]["record"] == old
    older_writer["cells"][bsq.cell_key("resnet20", 0.5, "gp", 0)] = _cell("resnet20", "gp", 0.88)
    merged = bsq.write_merged(path, older_writer)  # still holds the old record: it must not come back
    assert key not in merged["cells"] and len(merged["cells"]) == 2
    new = _cell("resnet20", "resrep", 0.88)
    rerun["cells"][key] = new
    merged = bsq.write_merged(path, rerun)
    assert merged["cells"][key] == new and len(merged["cells"]) == 3
    merged = bsq.write_merged(path, older_writer)
    assert merged["cells"][key] == new  # the older writer's stale copy neither returns nor replaces it
    text = bsq.summarise(merged, "cmd")
    assert "Superseded cells" in text and "84.00 % → now 88.00 %" in text
    # a file of an earlier version kept one bare record per superseded key
    legacy = bsq.merge_entries({key: old}, merged["superseded"])
    assert [e["record"] for e in legacy[key]] == [old, old] and legacy[key][0]["at"] is None


def test_search_quality_rebuilt_rows_merge_and_render(tmp_path: Path) -> None:
    from benchmarks import bench_search_quality as bsq

    path = tmp_path / "search_quality.json"
    sizes = bsq.replace(bsq.FULL, models=("resnet20",), targets=(0.5,))
    a = bsq.load_results(path, sizes, resume=True)
    b = bsq.load_results(path, sizes, resume=True)
    key = bsq.cell_key("resnet20", 0.5, "resrep", 0)
    a.setdefault("rebuilt", {})[key] = [{"record": {"widths": {"g": 3}, "own_test_after_ft": 0.841,
                                                    "superseded": True}, "at": 1.0, "test_before_ft": 0.7,
                                         "test_after_ft": 0.8808, "ft_seconds": 1.0}]
    bsq.write_merged(path, a)
    b["cells"][bsq.cell_key("resnet20", 0.5, "tpe", 0)] = _cell("resnet20", "tpe", 0.87)
    merged = bsq.write_merged(path, b)  # a writer that never rebuilt keeps the other's rows
    assert len(merged["rebuilt"][key]) == 1
    text = bsq.summarise(merged, "cmd")
    assert "## Widths vs weights" in text and "(superseded record) | 84.10 | 70.00 | **88.08** |" in text


def test_search_quality_rebuild_of_an_unknown_cell_is_refused(tmp_path: Path) -> None:
    from benchmarks import bench_search_quality as bsq

    raw = bsq.load_results(tmp_path / "x.json", bsq.FULL, resume=True)
    with pytest.raises(ConfigError, match="no finished cell"):
        bsq.rebuild(raw, ["resnet20|0.5|nope|0"], bsq.FULL, lambda r: r)


def test_search_quality_rerun_needs_resume(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_search_quality as bsq

    with pytest.raises(SystemExit) as exc:
        bsq.main(["--rerun", "resrep", "--searchers", "resrep"])
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err


def test_fidelity_interval_and_regret() -> None:
    from benchmarks import bench_fidelity as bf

    truth = [0.80, 0.82, 0.78, 0.85, 0.81, 0.79, 0.83, 0.84]
    perfect = [t * 0.5 for t in truth]
    lo, hi = bf.spearman_interval(perfect, truth, n_boot=200)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    assert bf.pick_regret(perfect, truth) == 0.0
    reversed_scores = [-t for t in truth]
    assert bf.pick_regret(reversed_scores, truth) == pytest.approx(0.85 - 0.78)
    lo, hi = bf.spearman_interval([0.1, 0.3, 0.2, 0.5, 0.4, 0.6, 0.8, 0.7], truth, n_boot=300)
    rho = bf.spearman([0.1, 0.3, 0.2, 0.5, 0.4, 0.6, 0.8, 0.7], truth)
    assert -1.0 <= lo <= rho <= hi <= 1.0 and hi - lo > 0.05  # a real interval around the point estimate


def test_quick_runs_get_their_own_result_files(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import _common

    monkeypatch.setattr("sys.argv", ["bench_x"])
    assert _common.result_path("engine", ".json").name == "engine.json"
    monkeypatch.setattr("sys.argv", ["bench_x", "--quick"])
    assert _common.result_path("engine", ".json").name == "engine_quick.json"
    assert _common.result_path("quantization_parts", ".json").name == "quantization_parts_quick.json"
    assert _common.result_path("index_quick").name == "index_quick.md"  # never doubled


def test_a_benchmark_whose_environment_is_missing_is_skipped_not_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_run, "ENVIRONMENTS", {"engine": (tmp_path / "no-venv" / "bin" / "python", "make x")})
    monkeypatch.setattr(bench_run, "write_result", lambda name, title, body: tmp_path / "index.md")
    assert bench_run.main(["--only", "engine", "--skip", "figures"]) == 0


def test_distill_cost_quick_times_both_losses_on_the_uniform_half_macs_candidate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import _common
    from benchmarks import bench_distill_cost as bdc

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    assert bdc.main(["--quick", "--reps", "1", "--steps", "1"]) == 0
    data = json.loads((tmp_path / "distill_cost_quick.json").read_text())
    (row,) = data["rows"]
    assert row["model"] == "resnet20" and 0.4 < row["macs_ratio"] <= 0.5
    assert row["ce_seconds_per_step"] > 0 and row["kd_seconds_per_step"] > 0 and row["teacher_seconds_per_batch"] > 0
    assert "| resnet20 |" in (tmp_path / "distill_cost_quick.md").read_text()
