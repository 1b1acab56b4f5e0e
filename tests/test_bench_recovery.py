"""The recovery benchmark (issue #20): headline and recipe from planted cells, resumable cells and epochs, the
Markdown with missing parts, and the export's per-epoch callback it relies on (``on_epoch``).

Heavy parts (searches, fine-tunes of CIFAR ResNets, IMP) are fakes here; ``python -m benchmarks.bench_recovery
--quick`` runs the real ones at smoke size. The ``on_epoch`` tests run a real export of a tiny digits campaign.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import _common
from benchmarks import bench_recovery as br

HEADLINE = {"resnet56": {"macs_ratio", "test_top1", "epochs", "hours"},
            "resnet20": {"macs_ratio", "test_top1", "epochs", "hours"},
            "infcop": {"epochs_ratio", "accuracy_delta"}}


def _epochs(finals: list[tuple[float, float, float]], seconds: float = 60.0, lr: float = 0.03) -> list[dict]:
    """Epoch records from (test, half A, half B) triples."""
    return [{"epoch": i + 1, "test_top1": t, "half_a": a, "half_b": b, "seconds": seconds, "eval_seconds": 5.0,
             "test_images": 10_000, "lr": lr, "val_accuracy": 95.0} for i, (t, a, b) in enumerate(finals)]


def _ft(variant: str, finals: list[tuple[float, float, float]], *, status: str = "done", epochs: float = 3,
        macs_ratio: float = 0.49, lr: float = 0.03) -> dict[str, Any]:
    rec: dict[str, Any] = {"status": status, "params": {"variant": variant, "lr": lr, "epochs": epochs,
                                                        "distill": 0.9 if variant == "kd" else 0.0,
                                                        "temperature": 4.0, "trial": "tpe/seed0/7"},
                           "epochs_log": _epochs(finals, lr=lr)}
    if status == "done":
        rec["export"] = {"test_top1": finals[-1][0], "dense_test_top1": 91.73, "macs_ratio": macs_ratio,
                         "card": "x/MODEL_CARD.md"}
        rec["reload"] = {"test_top1": finals[-1][0], "matches_export": True}
    return rec


def _search(ratio: float = 0.48, status: str = "done") -> dict[str, Any]:
    return {"status": status, "params": {"trials": 10}, "trials_done": 10, "seconds": 3600.0,
            "best": {"trial": "tpe/seed0/7", "label": "tpe-seed0-trial7", "macs_ratio": ratio, "val_accuracy": 0.95}}


def _sweep(lr: float, final_a: float) -> dict[str, Any]:
    return {"status": "done", "params": {"variant": "kd", "lr": lr, "epochs": 3, "distill": 0.9},
            "epochs_log": _epochs([(80.0, final_a - 1, 80.0), (85.0, final_a, 85.0)], lr=lr)}


def _imp(cum_epochs: float, test: float) -> dict[str, Any]:
    return {"status": "done", "cum_epochs": cum_epochs, "test_top1": test, "half_b": test, "final_sparsity": 0.59,
            "seconds": 100.0, "rows": [{"stop_reason": "budget"}]}


def planted() -> dict[str, Any]:
    return {"cells": {
        "search|resnet20": _search(0.495), "search|resnet56": _search(0.47),
        "finetune|resnet20|kd": _ft("kd", [(90.0, 90.1, 89.9), (91.2, 91.0, 91.4)]),
        "finetune|resnet20|ce": _ft("ce", [(89.0, 89.2, 88.8), (91.5, 91.3, 91.7)], macs_ratio=0.495),
        "finetune|resnet56|kd": _ft("kd", [(90.0, 90.0, 90.0)], status="partial", epochs=30),
        "infcop|resnet20|lth": _imp(10.0, 90.0), "infcop|resnet20|IF": _imp(4.0, 89.8),
    }, "errors": {}, "runs": []}


# ------------------------------------------------------------------------------------------- headline, recipe


def test_headline_has_exactly_the_issues_keys_computed_from_planted_cells() -> None:
    head = br.headline(planted())
    assert {k: set(v) for k, v in head.items()} == HEADLINE
    # ResNet-20: ce has the higher final half-A top-1 (91.3 > 91.0), so it is the headline row.
    assert head["resnet20"] == {"macs_ratio": 0.495, "test_top1": 91.5, "epochs": 3, "hours": round(120 / 3600, 3)}
    assert br.headline_source(planted(), "resnet20") == "finetune|resnet20|ce"
    # ResNet-56: only a partial fine-tune; the search's candidate gives the MACs ratio, nothing else.
    assert head["resnet56"] == {"macs_ratio": 0.47, "test_top1": None, "epochs": None, "hours": None}
    assert head["infcop"] == {"epochs_ratio": 0.4, "accuracy_delta": -0.2}
    assert br.goal_status(head) == {"resnet20": "met", "resnet56": "not run", "infcop": "met"}


def _monitored_lth() -> dict[str, Any]:
    rec = _imp(10.0, 90.0)
    rec["params"] = {"variant": "lth", "flow": "none", "monitor": "IF", "eps": None}
    rec["rows"] = [{"iteration": k, "sparsity": 0.2 * k, "distance_before": 0.004 * k, "stop_reason": "budget"}
                   for k in range(2)]
    rec["trajectories"] = [[{"round": 1, "distance": 0.011, "val_accuracy": 0.91},
                            {"round": 2, "distance": 0.017, "val_accuracy": 0.915}],
                           [{"round": 1, "distance": 0.02, "val_accuracy": 0.90},
                            {"round": 2, "distance": 0.016, "val_accuracy": 0.905}]]
    return rec


def test_the_calibrated_tolerance_comes_from_the_unpruned_networks_drift_in_the_fixed_run() -> None:
    lth = _monitored_lth()
    assert br.calibrated_eps(lth) == 0.017  # the largest distance of iteration 0 (nothing pruned yet)
    assert br.calibrated_eps(None) is None and br.calibrated_eps(_imp(10.0, 90.0)) is None  # not monitored
    s = br.Settings()
    with pytest.raises(br.NotReady, match="lth"):
        br.imp_config(s, "IF-cal", {"cells": {}})
    cal = br.imp_config(s, "IF-cal", {"cells": {"infcop|resnet20|lth": lth}})
    assert cal.flow == "IF" and cal.eps == 0.017 and cal.monitor == "none"
    fixed = br.imp_config(s, "lth")
    assert fixed.flow == "none" and fixed.monitor == "IF"  # the baseline records where any ε would stop
    paper = br.imp_config(s, "IF")
    assert paper.flow == "IF" and paper.eps is None and fixed.iterations == paper.iterations == cal.iterations
    # the headline's InfCoP figures: the calibrated cell once it is done, the paper's ε before
    raw = {"cells": {"infcop|resnet20|lth": lth, "infcop|resnet20|IF": _imp(2.5, 89.9),
                     "infcop|resnet20|IF-cal": _imp(6.0, 90.1)}}
    assert br.headline(raw)["infcop"] == {"epochs_ratio": 0.6, "accuracy_delta": 0.1}
    del raw["cells"]["infcop|resnet20|IF-cal"]
    assert br.headline(raw)["infcop"] == {"epochs_ratio": 0.25, "accuracy_delta": -0.1}
    md = br.summarise(raw, br.Settings(models=("resnet20",)), br.cell_names(br.Settings(models=("resnet20",))))
    assert "ε of `IF-cal` = the largest distance of iteration 0, where nothing is pruned: 0.017." in md
    assert "| 1 | 0.200 | 0.0040 | 0.0200, 0.0160 | 90.00, 90.50 |" in md


def test_the_gradient_flow_pair_calibrates_on_its_own_monitoring_cell_and_leads_the_headline() -> None:
    s = br.Settings()
    with pytest.raises(br.NotReady, match="lth-GF"):  # the IF monitor does not calibrate the GF rule
        br.imp_config(s, "GF-cal", {"cells": {"infcop|resnet20|lth": _monitored_lth()}})
    auto = br.imp_config(s, "GF-auto")  # the product's self-calibrating rule: needs no other cell
    assert auto.flow == "GF" and auto.calibrate and auto.eps is None
    mon = br.imp_config(s, "lth-GF")
    assert mon.flow == "none" and mon.monitor == "GF" and mon.iterations == br.imp_config(s, "lth").iterations
    gf_lth = _monitored_lth()
    gf_lth["params"]["monitor"] = "GF"
    for traj, scale in zip(gf_lth["trajectories"], (1e-3, 1e-3), strict=True):
        for e in traj:
            e["distance"] *= scale
    cal = br.imp_config(s, "GF-cal", {"cells": {"infcop|resnet20|lth-GF": gf_lth}})
    assert cal.flow == "GF" and cal.eps == pytest.approx(1.7e-5) and cal.monitor == "none"
    raw = {"cells": {"infcop|resnet20|lth": _monitored_lth(), "infcop|resnet20|IF-cal": _imp(6.0, 90.1),
                     "infcop|resnet20|lth-GF": gf_lth, "infcop|resnet20|GF-cal": _imp(4.0, 89.8)}}
    assert br.headline(raw)["infcop"] == {"epochs_ratio": 0.4, "accuracy_delta": -0.2}
    md = br.summarise(raw, br.Settings(models=("resnet20",)), br.cell_names(br.Settings(models=("resnet20",))))
    assert "Gradient-flow distance from the dense reference in the fixed-budget (`lth-GF`) run" in md
    assert "ε of `GF-cal` = the largest distance of iteration 0, where nothing is pruned: 1.7e-05." in md
    rec = _imp(4.5, 90.6)
    rec.update(params={"variant": "GF-auto", "flow": "GF", "calibrate": True, "eps": None}, eps=4.2e-3)
    raw["cells"]["infcop|resnet20|GF-auto"] = rec
    md = br.summarise(raw, br.Settings(models=("resnet20",)), br.cell_names(br.Settings(models=("resnet20",))))
    assert "| GF-auto | 0.0042 (auto: own iteration 0) | 4.5 |" in md
    assert br.headline(raw)["infcop"] == {"epochs_ratio": 0.4, "accuracy_delta": -0.2}  # still GF-cal's


def test_headline_of_an_empty_run_is_all_none_and_the_goals_not_run() -> None:
    head = br.headline({"cells": {}})
    assert {k: set(v) for k, v in head.items()} == HEADLINE
    assert all(v is None for row in head.values() for v in row.values())
    assert set(br.goal_status(head).values()) == {"not run"}


def test_goals_not_met_when_the_accuracy_or_the_epochs_ratio_falls_short() -> None:
    raw = planted()
    raw["cells"]["finetune|resnet20|ce"] = _ft("ce", [(89.0, 89.2, 88.8), (90.5, 91.3, 90.4)])
    raw["cells"]["infcop|resnet20|IF"] = _imp(6.0, 89.8)
    status = br.goal_status(br.headline(raw))
    assert status["resnet20"] == "not met" and status["infcop"] == "not met"


def test_the_learning_rate_is_chosen_from_the_measured_sweep_on_half_a() -> None:
    raw = {"cells": {"lr|resnet20|0.01": _sweep(0.01, 88.0), "lr|resnet20|0.03": _sweep(0.03, 89.5),
                     "lr|resnet20|0.1": _sweep(0.1, 89.0)}}
    chosen = br.choose_lr(raw, "resnet20", (0.01, 0.03, 0.1))
    assert chosen is not None and chosen["lr"] == 0.03 and chosen["scores"]["0.03"] == 89.5
    assert chosen["edge"] is None  # bracketed by a worse rate on each side
    raw["cells"]["lr|resnet20|0.1"] = _sweep(0.1, 89.5)  # a tie goes to the smaller rate
    assert br.choose_lr(raw, "resnet20")["lr"] == 0.03  # type: ignore[index]
    # Not every swept rate is done: no choice yet.
    assert br.choose_lr(raw, "resnet20", (0.01, 0.03, 0.1, 0.3)) is None
    assert br.recipe(raw)["lr"] == {"resnet20": 0.03, "resnet56": None}
    # Each model is chosen from its own sweep; a best rate at the grid's edge is flagged.
    raw["cells"].update({"lr|resnet56|0.001": _sweep(0.001, 90.0), "lr|resnet56|0.01": _sweep(0.01, 89.0)})
    c56 = br.choose_lr(raw, "resnet56")
    assert c56 is not None and c56["lr"] == 0.001 and c56["edge"] == "lowest"
    assert br.choose_lr(raw, "resnet20")["lr"] == 0.03  # type: ignore[index]
    md = "\n".join(br._recipe_section(raw, br.Settings()))
    assert "learning rate of resnet56 **0.001**" in md and "the lowest rate swept" in md
    assert "learning rate of resnet20 **0.03**" in md


def test_a_fine_tune_uses_the_swept_rate_or_waits_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(br, "RESULTS", tmp_path)
    s = br.Settings()
    raw: dict[str, Any] = {"cells": {"search|resnet20": _search()}}
    with pytest.raises(br.NotReady, match="sweep"):
        br.make_job(s, raw, "finetune|resnet20|kd")
    with pytest.raises(br.NotReady, match="search"):
        br.make_job(s, raw, "finetune|resnet56|kd")
    raw["cells"].update({f"lr|resnet20|{lr:g}": _sweep(lr, a) for lr, a in ((0.001, 87.5), (0.003, 87.8),
                                                                             (0.01, 88.0), (0.03, 87.0),
                                                                             (0.1, 86.0))})
    job = br.make_job(s, raw, "finetune|resnet20|kd")
    assert (job.lr, job.distill, job.temperature, job.epochs, job.trial) == (0.01, br.KD_WEIGHT, 4.0, 30, "tpe/seed0/7")
    assert "export.distill=0.9" in job.overrides() and "export.lr=0.01" in job.overrides()
    ce = br.make_job(br.Settings(lr=0.05), raw, "finetune|resnet20|ce")
    assert (ce.lr, ce.distill) == (0.05, 0.0) and "export.distill=0" in ce.overrides()
    assert br.make_job(s, raw, "lr|resnet20|0.1").epochs == s.sweep_epochs
    # ResNet-56 waits for its own sweep, not ResNet-20's.
    raw["cells"]["search|resnet56"] = _search()
    with pytest.raises(br.NotReady, match="lr\\|resnet56"):
        br.make_job(s, raw, "finetune|resnet56|kd")
    sw = br.make_job(s, raw, "lr|resnet56|0.003")
    assert (sw.lr, sw.variant, sw.out_dir.parts[-3:]) == (0.003, "kd", ("resnet56", "sweep", "lr0.003-e3"))


def test_a_baselines_candidate_is_fine_tuned_with_the_sweeps_recipe_and_compared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(br, "RESULTS", tmp_path)
    s = br.Settings(models=("resnet20",))
    assert br.search_args(s, "resnet20", "uniform")[5:8] == [
        "n_trials=1", "searcher.name=uniform", "objective.budget.macs=0.5"]
    assert br.search_args(s, "resnet20")[5:7] == ["n_trials=100", "searcher.name=tpe"]
    raw: dict[str, Any] = {"cells": {"search|resnet20": _search(0.495)}}
    raw["cells"].update({f"lr|resnet20|{lr:g}": _sweep(lr, a) for lr, a in ((0.001, 87.5), (0.003, 87.8),
                                                                             (0.01, 88.0), (0.03, 87.0),
                                                                             (0.1, 86.0))})
    with pytest.raises(br.NotReady, match="search\\|resnet20\\|uniform"):
        br.make_job(s, raw, "cand|resnet20|uniform")
    uniform = _search(0.49)
    uniform["params"] = {"trials": 1, "searcher": "uniform"}
    uniform["best"] = {**uniform["best"], "trial": "uniform/seed0/0", "label": "uniform-seed0-trial0"}
    raw["cells"]["search|resnet20|uniform"] = uniform
    job = br.make_job(s, raw, "cand|resnet20|uniform")
    assert (job.trial, job.variant, job.lr, job.epochs, job.distill) == ("uniform/seed0/0", "kd", 0.01,
                                                                        s.sweep_epochs, br.KD_WEIGHT)
    assert job.out_dir.parts[-3:] == ("resnet20", "candidates", "uniform-lr0.01-e3")
    assert br.carried("resnet20/candidates/uniform-lr0.01-e3/finetune.ckpt")
    assert br.candidates(raw) == {}  # not fine-tuned yet
    cand = _sweep(0.01, 89.0)
    raw["cells"]["cand|resnet20|uniform"] = cand
    raw["cells"]["search|resnet20"]["params"]["searcher"] = "tpe"
    rows = br.candidates(raw)["resnet20"]
    assert [(r["searcher"], r["cell"], r["trial"], r["half_a"]) for r in rows] == [
        ("tpe", "lr|resnet20|0.01", "tpe/seed0/7", 88.0), ("uniform", "cand|resnet20|uniform", "uniform/seed0/0",
                                                          89.0)]
    md = br.summarise(raw, s, br.cell_names(s))
    assert "## The campaign's candidate against a baseline's" in md
    assert "| resnet20 | uniform | uniform/seed0/0 | 0.490 |" in md


def test_distillation_against_cross_entropy_at_equal_epochs_and_about_equal_compute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(br, "RESULTS", tmp_path)
    kd = _ft("kd", [(88.0, 88.0, 88.0), (89.5, 89.0, 89.0), (90.0, 90.0, 90.0), (90.6, 90.0, 90.0)], epochs=4)
    ce = _ft("ce", [(89.0, 89.0, 89.0), (89.0, 89.0, 89.0), (89.8, 89.0, 89.0), (90.1, 90.0, 90.0)], epochs=4)
    for e in kd["epochs_log"]:
        e["seconds"] = 120.0  # a distilled epoch takes twice the wall time here
    raw = {"cells": {"finetune|resnet20|kd": kd, "finetune|resnet20|ce": ce}}
    r = br.distillation(raw)["resnet20"]
    assert (r["epochs"], r["kd_leads"], r["kd_leads_from"], r["done"]) == (4, 3, 2, True)
    assert r["at_last"] == {"kd": 90.6, "ce": 90.1, "kd_minus_ce": 0.5}
    # Without a side-by-side measurement: the epochs' median wall seconds (2×) — 4 ce epochs ≈ 2 kd epochs.
    eq = r["equal_compute"]
    assert (eq["ce_epochs"], eq["kd_epochs"], eq["ce"], eq["kd"], eq["kd_over_ce"]) == (4, 2, 90.1, 89.5, 2.0)
    assert "median" in eq["basis"]
    # The per-step ratio bench_distill_cost measured takes precedence.
    (tmp_path / "distill_cost.json").write_text(json.dumps({"rows": [{"model": "resnet20", "kd_over_ce": 1.3}]}))
    assert br.step_cost_ratios() == {"resnet20": 1.3}
    eq = br.distillation(raw, br.step_cost_ratios())["resnet20"]["equal_compute"]
    assert (eq["kd_epochs"], eq["kd"]) == (3, 90.0) and "distill_cost" in eq["basis"]
    (tmp_path / "distill_cost.json").write_text("{damaged")
    assert br.step_cost_ratios() == {}
    # An unfinished pair is compared over its common epochs and says so; a model without both curves is absent.
    ce["status"], ce["epochs_log"] = "partial", ce["epochs_log"][:2]
    part = br.distillation(raw)
    assert set(part) == {"resnet20"} and part["resnet20"]["epochs"] == 2 and not part["resnet20"]["done"]
    md = "\n".join(br._distillation_section(raw))
    assert "| resnet20 | recalibrate | 2 (unfinished) | 1 of 2 | 2 |" in md


def test_cell_names_and_per_model_options() -> None:
    assert br.cell_names(br.Settings.quick_run()) == [
        "search|resnet20", "lr|resnet20|0.01", "lr|resnet20|0.1", "finetune|resnet20|kd", "finetune|resnet20|ce",
        "search|resnet20|uniform", "cand|resnet20|uniform",
        "infcop|resnet20|lth", "infcop|resnet20|IF", "infcop|resnet20|IF-cal", "infcop|resnet20|lth-GF",
        "infcop|resnet20|GF-cal", "infcop|resnet20|GF-auto"]
    full = br.cell_names(br.Settings())
    assert {n.split("|")[0] for n in full} == {"search", "lr", "finetune", "cand", "infcop"}
    assert [n for n in full if n.startswith(("search|", "cand|"))] == [
        "search|resnet20", "search|resnet20|uniform", "cand|resnet20|uniform", "search|resnet56",
        "search|resnet56|uniform", "cand|resnet56|uniform"]
    assert br.cell_names(br.Settings(baselines=())) == [n for n in full if n.count("|uniform") == 0]
    assert [n for n in full if n.startswith("lr|")] == [
        "lr|resnet20|0.001", "lr|resnet20|0.003", "lr|resnet20|0.01", "lr|resnet20|0.03", "lr|resnet20|0.1",
        "lr|resnet56|0.001", "lr|resnet56|0.003", "lr|resnet56|0.01", "lr|resnet56|0.03"]
    assert br.per_model("resnet56=12", {"resnet20": 30, "resnet56": 30}, "--epochs") == {"resnet20": 30,
                                                                                        "resnet56": 12}
    assert br.per_model("0.5", {"resnet20": 30, "resnet56": 30}, "--epochs") == {"resnet20": 0.5, "resnet56": 0.5}
    with pytest.raises(SystemExit):
        br.per_model("vgg=3", {"resnet20": 30}, "--epochs")
    assert br.callbacks_of(30) == 30 and br.callbacks_of(0.25) == 1 and br.callbacks_of(1.5) == 1


# --------------------------------------------------------------------------------------------- Markdown


@pytest.mark.parametrize("argv", [["--sweep-lrs", "0.01,abc"], ["--sweep-lrs", "0.01,-1"], ["--epochs", "vgg=3"],
                                  ["--epochs", "0"]])
def test_a_bad_option_value_is_an_error_with_a_hint_and_exit_2(argv: list[str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert br.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "\n  hint: " in err


def test_markdown_renders_with_missing_parts() -> None:
    s = br.Settings()
    empty = br.summarise({"cells": {}, "errors": {}, "runs": []}, s, br.cell_names(s))
    assert "0 of 25 cells done" in empty and "| resnet56 |" in empty and "not run" in empty
    assert "not chosen yet" in empty and "no fine-tune done yet" in empty
    raw = planted()
    raw["cells"].update({f"lr|resnet20|{lr:g}": _sweep(lr, a) for lr, a in ((0.01, 88.0), (0.03, 89.5),
                                                                             (0.1, 89.0))})
    raw["errors"]["finetune|resnet56|ce"] = "Traceback ..."
    raw["headline"], raw["recipe"] = br.headline(raw), br.recipe(raw)
    md = br.summarise(raw, s, br.cell_names(s))
    for fragment in ("## Goals", "| met |", "not run", "1 of 30 epochs, last test 90.00 %",
                     "learning rate of resnet20 **0.03**", "learning rate of resnet56: not chosen yet",
                     "## Curves: resnet20", "## Curves: resnet56", "## Learning-rate sweeps", "## InfCoP",
                     "epochs ratio 0.400, accuracy delta -0.20 pp", "error (see the JSON)", "reproduced",
                     "\"accuracy_delta\": -0.2"):
        assert fragment in md, fragment
    assert "| 2 | 0.03 | 91.20 | 91.40 | 91.50 | 91.70 | 60 | 60 |" in md


def test_the_teachers_cost_is_reported_over_the_epochs_of_the_exporting_process() -> None:
    rec = _ft("kd", [(88.0, 88.0, 88.0), (89.0, 89.0, 89.0), (90.0, 90.0, 90.0)])
    for e, secs in zip(rec["epochs_log"], (100.0, 60.0, 40.0), strict=True):
        e["seconds"] = secs
    assert br.teacher_share(rec) is None  # no distillation record: nothing claimed
    rec["export"].update(resumed_after_epoch=1, distill={"weight": 0.9, "temperature": 4.0, "teacher_seconds": 25.0,
                                                         "teacher_batches": 500})
    per_batch, share = br.teacher_share(rec)
    assert per_batch == pytest.approx(0.05) and share == pytest.approx(25.0 / 100.0)  # epochs 2 and 3 only
    raw = planted()
    raw["cells"]["finetune|resnet20|kd"] = rec
    md = br.summarise(raw, br.Settings(), br.cell_names(br.Settings()))
    assert "the teacher's forward passes (no gradients) took 50 ms per batch, 25 % of the fine-tune's wall time" in md


# ---------------------------------------------------------------------------------------- resumable cells


@pytest.fixture
def fake_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Fake cells: ``state["ran"]`` lists what ran; a fine-tune waits until its search is done."""
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setattr(br, "RESULTS", tmp_path)
    monkeypatch.setattr(br, "data_error", lambda models: None)
    monkeypatch.setattr(br, "git_commit", lambda: "abc")
    state: dict[str, Any] = {"ran": [], "json": tmp_path / "recovery.json"}

    def cell(s: br.Settings, name: str, raw: dict, path: Path, deadline: float | None) -> dict[str, Any]:
        state["ran"].append(name)
        kind, _model, arg = br.split_name(name)
        if kind == "search":
            return _search()
        if kind == "lr":
            return _sweep(float(arg), 88.0)
        if kind in ("finetune", "cand"):
            br.make_job(s, raw, name)  # raises NotReady like the real cell
            return _ft(arg, [(91.0, 91.0, 91.0)])
        return _imp(4.0 if arg == "IF" else 10.0, 90.0)

    monkeypatch.setattr(br, "run_cell", cell)
    return state


def test_resume_skips_finished_cells_and_a_fresh_run_refuses_to_clobber(fake_run: dict[str, Any]) -> None:
    path: Path = fake_run["json"]
    planted_cells = {"search|resnet20": _search(), "finetune|resnet20|kd": _ft("kd", [(90.0, 90.0, 90.0)],
                                                                               status="partial")}
    path.write_text(json.dumps({"cells": planted_cells, "errors": {}, "runs": []}))
    assert br.main(["--models", "resnet20"]) == 2 and fake_run["ran"] == []  # needs --resume
    assert br.main(["--models", "resnet20", "--resume"]) == 0
    assert "search|resnet20" not in fake_run["ran"]  # finished: skipped
    assert "finetune|resnet20|kd" in fake_run["ran"]  # partial: continued
    raw = json.loads(path.read_text())
    assert all(raw["cells"][n]["status"] == "done" for n in br.cell_names(br.Settings(models=("resnet20",))))
    assert {k: set(v) for k, v in raw["headline"].items()} == HEADLINE
    fake_run["ran"].clear()
    assert br.main(["--models", "resnet20", "--resume"]) == 0 and fake_run["ran"] == []
    assert (path.parent / "recovery.md").is_file()


def test_redo_and_changed_settings_keep_the_replaced_record_as_superseded(fake_run: dict[str, Any]) -> None:
    path: Path = fake_run["json"]
    old = _ft("kd", [(88.0, 88.0, 88.0), (88.9, 88.8, 89.2)], lr=0.01)
    path.write_text(json.dumps({"cells": {"search|resnet20": _search(), "finetune|resnet20|kd": old},
                                "errors": {}, "runs": []}))
    assert br.main(["--models", "resnet20", "--resume", "--only", "finetune|resnet20|kd", "--lr", "0.003",
                    "--redo", "finetune|resnet20|kd"]) == 0
    raw = json.loads(path.read_text())
    assert raw["superseded"]["finetune|resnet20|kd"] == [old]  # the lr-0.01 curve is kept, not dropped
    assert raw["cells"]["finetune|resnet20|kd"]["status"] == "done"
    md = (path.parent / "recovery.md").read_text()
    row = "| `finetune\\|resnet20\\|kd` | 0.01 | 3 | 0.9 | done | 2 | 88.90 | 89.20 | 88.90 (2) |"
    assert "## Superseded runs" in md and row in md
    # A partial record whose settings differ from the new one's is superseded when the new one is first written.
    partial = _ft("ce", [(87.0, 87.0, 87.0)], status="partial", lr=0.01)
    br.put_cell(path, "finetune|resnet20|ce", partial)
    br.put_cell(path, "finetune|resnet20|ce", _ft("ce", [(87.5, 87.5, 87.5)], status="partial", lr=0.003))
    raw = json.loads(path.read_text())
    assert raw["superseded"]["finetune|resnet20|ce"] == [partial]
    br.put_cell(path, "finetune|resnet20|ce", _ft("ce", [(87.5, 87.5, 87.5), (88.0, 88.0, 88.0)], lr=0.003))
    assert len(json.loads(path.read_text())["superseded"]["finetune|resnet20|ce"]) == 1  # same settings: updated


def test_the_run_installs_the_clis_interrupt_handler(fake_run: dict[str, Any]) -> None:
    """The run installs the CLI's handler (a Ctrl-C is recorded before it is raised, so the fine-tune's checks stop
    it even when the first KeyboardInterrupt is swallowed), also when the process began with SIGINT ignored."""
    import signal

    from autoprune import interrupts

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert br.main(["--models", "resnet20", "--only", "search"]) == 0
        assert signal.getsignal(signal.SIGINT) is interrupts.handle_sigint
    finally:
        signal.signal(signal.SIGINT, before)
        interrupts.clear()


def test_a_cell_whose_input_is_not_ready_waits_and_part_splits_the_cells(fake_run: dict[str, Any]) -> None:
    assert br.main(["--models", "resnet20", "--only", "finetune,infcop", "--part", "1/2"]) == 0
    raw = json.loads(fake_run["json"].read_text())
    assert fake_run["ran"] == ["finetune|resnet20|kd", "infcop|resnet20|lth", "infcop|resnet20|IF-cal",
                               "infcop|resnet20|GF-cal"]
    assert "finetune|resnet20|kd" not in raw["cells"] and "infcop|resnet20|lth" in raw["cells"]  # it waited
    assert br.main(["--models", "resnet20", "--only", "finetune,infcop", "--part", "2/2", "--resume"]) == 0
    assert "infcop|resnet20|IF" in json.loads(fake_run["json"].read_text())["cells"]


class _Ctx:
    camp = None


def test_a_fine_tune_continues_after_its_recorded_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Epochs 1-2 are in the JSON, the export's checkpoint holds epoch 3 (killed before it was recorded): epoch 3
    is recovered from the checkpoint and the export continues with epoch 4; an epoch past the deadline stops it."""
    path = tmp_path / "recovery.json"
    job = br.Job("finetune|resnet20|kd", "resnet20", "kd", 0.03, 6, 0.9, 4.0, "tpe/seed0/7", tmp_path / "out")
    previous = _ft("kd", [(80.0, 80.0, 80.0), (82.0, 82.0, 82.0)], status="partial", epochs=6)
    previous["params"]["bn_after"] = "keep"
    calls: dict[str, Any] = {"epochs": [], "recover_known": None}
    checkpoint = {"epoch": 3}

    monkeypatch.setattr(br, "open_context", lambda s, j: _Ctx())
    monkeypatch.setattr(br, "epoch_accuracy", lambda ctx, model: {"test_top1": 85.0, "half_a": 85.0, "half_b": 85.0,
                                                                  "test_images": 10_000})

    def recover(ctx: Any, j: br.Job, known: set[int]) -> Any:
        calls["recover_known"] = sorted(known)
        e = checkpoint["epoch"]
        return None if e in known else (e, {"test_top1": 84.0, "half_a": 84.0, "half_b": 84.0})

    def export(ctx: Any, j: br.Job, command: str, on_epoch: Any) -> Any:
        for e in range(checkpoint["epoch"] + 1, 7):  # as the product: after the checkpointed epoch
            checkpoint["epoch"] = e
            calls["epochs"].append(e)
            on_epoch(e, torch.nn.Linear(1, 1), 0.95)
        return type("R", (), {"metrics": {"ok": True}})()

    monkeypatch.setattr(br, "recover_epoch", recover)
    monkeypatch.setattr(br, "run_export", export)
    monkeypatch.setattr(br, "finish_export", lambda ctx, j, m: {"export": {"test_top1": 85.0}, "reload": {}})
    monkeypatch.setattr(br, "_finished_export", lambda j: None)
    # The deadline passes during epoch 4: the cell stops after recording it.
    monkeypatch.setattr(br, "_deadline_left", lambda d: -1.0 if d is not None else float("inf"))
    rec = br.run_finetune_cell(br.Settings(), job, previous, path, deadline=0.0)
    assert rec["status"] == "partial" and calls["recover_known"] == [1, 2] and calls["epochs"] == [4]
    assert [e["epoch"] for e in rec["epochs_log"]] == [1, 2, 3, 4]
    assert "recovered" in rec["epochs_log"][2]["note"] and rec["epochs_log"][2]["seconds"] is None
    assert json.loads(path.read_text())["cells"][job.cell]["epochs_log"][-1]["epoch"] == 4  # saved per epoch
    rec = br.run_finetune_cell(br.Settings(), job, rec, path, deadline=None)
    assert rec["status"] == "done" and calls["epochs"] == [4, 5, 6]
    assert [e["epoch"] for e in rec["epochs_log"]] == [1, 2, 3, 4, 5, 6]
    assert rec["epochs_log"][-1]["lr"] == pytest.approx(0.0) and rec["export"]["test_top1"] == 85.0
    # Other settings (here: epochs) start the cell again instead of mixing two runs.
    other = br.Job(job.cell, "resnet20", "kd", 0.03, 8, 0.9, 4.0, "tpe/seed0/7", tmp_path / "out8")
    checkpoint["epoch"] = 0
    monkeypatch.setattr(br, "recover_epoch", lambda ctx, j, known: None)
    rec8 = br.run_finetune_cell(br.Settings(), other, rec, path, deadline=None)
    assert [e["epoch"] for e in rec8["epochs_log"]] == [1, 2, 3, 4, 5, 6]  # from the fake export's 1..6


# ------------------------------------------------------------------------ the export's per-epoch callback


@pytest.fixture(scope="module")
def digits_campaign(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """small_cnn (random weights) on digits, 2 random candidates at 60 % of the MACs."""
    from autoprune import campaign
    from autoprune.config import config_from_dict

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("recovery")
    cfg = config_from_dict({
        "name": "rec", "output_dir": str(root / "camp"), "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "dataset": {"name": "digits", "batch_size": 64}, "n_trials": 2,
        "evaluator": {"name": "adaptive_bn", "kwargs": {"batches": 2}}, "objective": {"budget": {"macs": 0.6}},
        "searcher": {"name": "random"},
        "export": {"epochs": 3, "lr": 0.05, "formats": [], "latency": False, "memory_format": "contiguous",
                   "calibration_batches": 2}})
    camp, store = campaign.open_campaign(cfg, argv=["search", "rec.yaml"])
    campaign.run_search(camp, store, quiet=True)
    return camp, store


def _weights(res: Any) -> dict[str, torch.Tensor]:
    from autoprune import serialize

    return serialize.load_module(res.model_dir).state_dict()


def test_on_epoch_sees_a_copy_after_every_epoch_and_changes_nothing(digits_campaign: tuple, tmp_path: Path) -> None:
    from autoprune.evaluate import recalibrate_bn
    from autoprune.export import export_trial, select_trial

    camp, store = digits_campaign
    trial = select_trial(store.to_dataframe())
    plain = export_trial(camp, trial, out_dir=tmp_path / "plain")
    seen: list[tuple[int, float]] = []

    def on_epoch(epoch: int, model: torch.nn.Module, val_accuracy: float) -> None:
        recalibrate_bn(model, camp.calib_loader, 2)  # what the benchmark does to its copy
        torch.rand(3)  # and RNG draws: the fine-tune must not notice
        seen.append((epoch, val_accuracy))

    watched = export_trial(camp, trial, out_dir=tmp_path / "watched", on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2, 3] and all(0 <= a <= 1 for _, a in seen)
    a, b = _weights(plain), _weights(watched)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert watched.metrics["exported"]["test_accuracy"] == plain.metrics["exported"]["test_accuracy"]


def test_an_exception_in_on_epoch_stops_the_export_and_a_rerun_continues(digits_campaign: tuple,
                                                                         tmp_path: Path) -> None:
    from autoprune.export import FINETUNE_CHECKPOINT, export_trial, select_trial

    camp, store = digits_campaign
    trial = select_trial(store.to_dataframe())
    whole = export_trial(camp, trial, out_dir=tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_after_1(epoch: int, model: torch.nn.Module, val_accuracy: float) -> None:
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        export_trial(camp, trial, out_dir=tmp_path / "cut", on_epoch=stop_after_1)
    assert (tmp_path / "cut" / FINETUNE_CHECKPOINT).is_file()
    # The benchmark recovers an epoch that was checkpointed but not recorded from that checkpoint.
    from autoprune.data import make_loader
    from benchmarks._cifar import split_test

    ctx = br.Context(camp, trial, tuple(make_loader(h, 256) for h in split_test(camp.splits.test)), "")
    job = br.Job("finetune|x|kd", "x", "kd", 0.05, 3, 0.0, 4.0, "random/seed0/0", tmp_path / "cut")
    assert br.recover_epoch(ctx, job, {1}) is None
    epoch, acc = br.recover_epoch(ctx, job, set())  # type: ignore[misc]
    assert epoch == 1 and acc["test_images"] == len(camp.splits.test) and 0 <= acc["test_top1"] <= 100
    later: list[int] = []
    resumed = export_trial(camp, trial, out_dir=tmp_path / "cut", on_epoch=lambda e, m, v: later.append(e))
    assert later == [2, 3] and resumed.metrics["finetune"]["resumed_after_epoch"] == 1
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_how_far_reads_the_headline_curve_and_prices_the_published_schedules() -> None:
    raw = planted()
    # resnet20's headline is ce (higher final half A): final 91.5 ≥ 91.0, so no gap is reported for it.
    curve = [(88.0, 88.0, 88.0), (89.5, 89.4, 89.6), (89.2, 89.3, 89.1), (89.4, 89.35, 89.5)]
    raw["cells"]["finetune|resnet56|kd"] = _ft("kd", curve, epochs=4)
    raw["cells"]["finetune|resnet56|kd"]["epochs_log"][0]["seconds"] = 30.0  # a faster machine's epoch
    far = br.how_far(raw)
    assert far["resnet20"]["gap"] == -0.5
    r = far["resnet56"]
    assert (r["cell"], r["final"], r["gap"], r["best"], r["best_epoch"]) == ("finetune|resnet56|kd", 89.4, 3.6,
                                                                              89.5, 2)
    assert r["plateau_epoch"] == 2 and r["last_third_from_epoch"] == 3 and r["last_third_gain"] == 0.2
    assert r["seconds_per_epoch"] == {"median": 60.0, "fastest": 30.0}
    assert r["published_hours"] == {str(n): round(n * 60 / 3600, 1) for n in br.PUBLISHED_EPOCHS}
    md = "\n".join(br._how_far_section(raw))
    assert "| resnet56 | `finetune\\|resnet56\\|kd` | 93.0 | 89.40 | 3.60 | 89.50 (2) | 2 | +0.20 (epochs 3–4) |" in md
    assert "| resnet20 |" not in md  # its goal is met
    raw["cells"]["finetune|resnet56|kd"] = _ft("kd", curve[:1], epochs=1)  # one epoch: no last third to speak of
    assert br.how_far(raw)["resnet56"]["last_third_gain"] == 0.0
    del raw["cells"]["finetune|resnet56|kd"]
    assert br._how_far_section({"cells": {}}) == [] and "resnet56" not in br.how_far(raw)


# ------------------------------------------------------------------- BN statistics: both readings of every epoch


def _keep(variant: str, finals: list[tuple[float, float, float]], recalibrated: list[tuple[float, float, float]],
          **kw: Any) -> dict[str, Any]:
    """A cell run with ``bn_after=keep`` whose epochs also carry the ``recalibrate`` reading."""
    rec = _ft(variant, finals, **kw)
    rec["params"]["bn_after"] = "keep"
    for e, (t, a, b) in zip(rec["epochs_log"], recalibrated, strict=True):
        e["bn_recalibrate"] = {"test_top1": t, "half_a": a, "half_b": b, "test_images": 10_000}
    return rec


def test_epoch_accuracy_reads_the_running_and_the_re_estimated_statistics(digits_campaign: tuple) -> None:
    """The export's reading is the entry, the other one sits under ``bn_<mode>``; each equals testing a copy with
    the running statistics, or re-estimated as the export does."""
    import copy

    from autoprune.config import BN_AFTER
    from autoprune.data import make_loader
    from autoprune.evaluate import recalibrate_bn
    from autoprune.export import select_trial
    from benchmarks._cifar import split_test

    camp, store = digits_campaign
    trial = select_trial(store.to_dataframe())
    ctx = br.Context(camp, trial, tuple(make_loader(h, 256) for h in split_test(camp.splits.test)), "")
    net = copy.deepcopy(camp.model).train()
    with torch.no_grad():  # running statistics that are not those re-estimation gives
        for x, _ in list(camp.train_loader)[:3]:
            net(x * 3 + 1)
    running = br.top1_on_halves(ctx, copy.deepcopy(net))
    redone = copy.deepcopy(net)
    camp.calib_loader.set_epoch(0)
    recalibrate_bn(redone, camp.calib_loader, camp.config.export.calibration_batches)
    recalibrated = br.top1_on_halves(ctx, redone)
    assert running != recalibrated  # the two readings differ here, so the test tells them apart
    want = {"keep": running, "recalibrate": recalibrated}
    saved = camp.config
    try:
        for mode in BN_AFTER:
            camp.config = _with_bn(saved, mode)
            acc = br.epoch_accuracy(ctx, copy.deepcopy(net))
            other = next(m for m in BN_AFTER if m != mode)
            assert {k: acc[k] for k in running} == want[mode] and acc[f"bn_{other}"] == want[other]
    finally:
        camp.config = saved


def _with_bn(cfg: Any, mode: str) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, bn_after_finetune=mode))


def test_cells_without_the_setting_read_recalibrate_and_comparisons_use_a_reading_both_have() -> None:
    old = _ft("ce", [(89.0, 89.0, 89.0), (90.0, 90.0, 90.0)])
    new = _keep("kd", [(91.0, 91.0, 91.0), (92.0, 92.0, 92.0)], [(89.5, 89.5, 89.5), (89.8, 89.8, 89.8)])
    assert br.cell_bn(old) == "recalibrate" and br.cell_bn(new) == "keep"
    assert br.reading(new, new["epochs_log"][1], "keep")["test_top1"] == 92.0
    assert br.reading(new, new["epochs_log"][1], "recalibrate")["test_top1"] == 89.8
    assert br.reading(old, old["epochs_log"][1], "keep") is None
    assert br.common_bn(new, old) == "recalibrate" and br.common_bn(new, new) == "keep"
    assert br.common_bn(old, {**new, "epochs_log": [{"epoch": 1, "test_top1": 1.0}]}) is None
    raw = {"cells": {"finetune|resnet20|kd": new, "finetune|resnet20|ce": old}}
    d = br.distillation(raw)["resnet20"]
    assert d["bn_after"] == "recalibrate" and d["at_last"] == {"kd": 89.8, "ce": 90.0, "kd_minus_ce": -0.2}
    assert "| resnet20 | recalibrate | 2 | 1 of 2 |" in "\n".join(br._distillation_section(raw))
    ce_new = _keep("ce", [(90.0, 90.0, 90.0), (91.0, 91.0, 91.0)], [(88.0, 88.0, 88.0), (89.0, 89.0, 89.0)])
    raw["cells"]["finetune|resnet20|ce"] = ce_new
    d = br.distillation(raw)["resnet20"]
    assert d["bn_after"] == "keep" and d["at_last"]["kd_minus_ce"] == 1.0
    # The curves show both readings of a cell that has them.
    md = "\n".join(br._curves_section(raw, "resnet20"))
    assert "kd test % (keep) | kd half B % (keep) | kd test % (recalibrate)" in md
    assert "| 2 | 0.03 | 92.00 | 92.00 | 89.80 | 89.80 | 91.00 | 91.00 | 89.00 | 89.00 | 60 | 60 |" in md


def test_the_headline_reports_the_products_bn_setting_over_an_old_cell() -> None:
    raw = planted()
    # The old ce cell (recalibrate) has the higher final half A, but a kd cell with the export's default exists.
    raw["cells"]["finetune|resnet20|ce"] = _ft("ce", [(95.0, 95.0, 95.0)])
    raw["cells"]["finetune|resnet20|kd"] = _keep("kd", [(91.9, 91.8, 92.0)], [(90.0, 90.0, 90.0)])
    assert br.headline_source(raw, "resnet20") == "finetune|resnet20|kd"
    assert br.headline(raw)["resnet20"]["test_top1"] == 91.9
    del raw["cells"]["finetune|resnet20|kd"]  # only old cells: they are reported
    assert br.headline_source(raw, "resnet20") == "finetune|resnet20|ce"


def test_a_cell_recorded_before_the_setting_continues_only_with_recalibrate(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(br, "open_context", lambda s, j: _Ctx())
    monkeypatch.setattr(br, "recover_epoch", lambda ctx, j, known: None)
    monkeypatch.setattr(br, "_finished_export", lambda j: None)
    monkeypatch.setattr(br, "_log", seen.append)

    def stop(ctx: Any, j: br.Job, command: str, on_epoch: Any) -> Any:
        raise br.OutOfTime("at once")

    monkeypatch.setattr(br, "run_export", stop)
    old = _ft("kd", [(80.0, 80.0, 80.0)], status="partial", epochs=6)
    for mode, kept in (("recalibrate", [1]), ("keep", [])):
        job = br.Job("finetune|resnet20|kd", "resnet20", "kd", 0.03, 6, 0.9, 4.0, "tpe/seed0/7", tmp_path / mode,
                     bn_after=mode)
        assert "export.bn_after_finetune=" + mode in job.overrides()
        rec = br.run_finetune_cell(br.Settings(), job, old, tmp_path / "recovery.json", deadline=None)
        assert [e["epoch"] for e in rec["epochs_log"]] == kept
    assert any("settings changed" in m for m in seen)


def test_candidates_compare_a_reading_all_rows_have() -> None:
    s = br.Settings()
    raw = planted()
    raw["cells"]["lr|resnet20|0.01"] = _sweep(0.01, 88.0)  # an old sweep cell: recalibrate only
    uniform = _search(0.49)
    uniform["best"] = {**uniform["best"], "trial": "uniform/seed0/0"}
    raw["cells"]["search|resnet20|uniform"] = uniform
    cand = _keep("kd", [(85.0, 85.0, 85.0), (86.0, 86.0, 86.0)], [(84.0, 84.0, 84.0), (84.5, 84.4, 84.6)], lr=0.01)
    raw["cells"]["cand|resnet20|uniform"] = cand
    rows = br.candidates(raw)["resnet20"]
    assert [(r["cell"], r["bn_after"], r["half_a"]) for r in rows] == [
        ("lr|resnet20|0.01", "recalibrate", 88.0), ("cand|resnet20|uniform", "recalibrate", 84.4)]
    assert "| 3 | recalibrate | 84.40 | 84.50 | 84.60 |" in br.summarise(raw, s, br.cell_names(s))
