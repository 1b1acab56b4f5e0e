"""The latency predictor (issue #21): layer configurations follow the widths exactly, the per-layer table is timed
once, kept in the campaign directory, reused and re-timed when threads/batch change; the calibration is stored
and reused; and a latency budget holds, by the prediction, for every kind of searcher.

Nothing here asserts how fast anything is (the machine is shared): the predictions are compared with the
predictor's own tables, and the budget with the predictor's own figures.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from autoprune import graph, pruning
from autoprune.agents.base import make_searcher
from autoprune.campaign import build_campaign
from autoprune.config import config_from_dict
from autoprune.errors import ConfigError
from autoprune.latency_model import MODEL_FILE, TABLE_FILE, LatencyPredictor, layer_sites
from autoprune.models import build_model
from autoprune.objectives import Budget
from autoprune.store import TrialStore

ROOT = Path(__file__).resolve().parents[1]
FAST = 0.002  # seconds of timing per table entry: the figures are not judged here, only where they go


class Blocks(nn.Module):
    """Residual block, a depthwise conv and a linear head: every kind of layer site."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.b = nn.Conv2d(24, 24, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.relu(self.a(x))
        y = y + self.b(torch.relu(self.dw(y)))
        return self.head(y.mean((2, 3)))


def test_layer_sites_leave_every_training_flag_as_it_was() -> None:
    model, x = Blocks().eval(), torch.randn(1, 3, 16, 16)
    model.a.train()  # mixed flags: the user's model is shared with the traced module
    gs = graph.analyze(model, x)
    before = {n: m.training for n, m in model.named_modules()}
    layer_sites(gs)
    assert {n: m.training for n, m in model.named_modules()} == before and model.a.training


def test_layer_sites_follow_the_widths_exactly() -> None:
    model, x = Blocks().eval(), torch.randn(1, 3, 16, 16)
    gs = graph.analyze(model, x)
    sites = {s.name: s for s in layer_sites(gs)}
    assert set(sites) == {"stem", "a", "dw", "b", "head"}
    assert sites["dw"].depthwise and sites["a"].stride == 2 and sites["a"].h == 16 and sites["b"].h == 8
    pred = LatencyPredictor(gs, None, min_run_time=FAST)
    rng = random.Random(0)
    for _ in range(5):
        widths = {g: rng.randint(1, gs[g].size) for g in gs.prunable_ids}
        small = pruning.apply(model, gs, widths)
        w = pred.width_vector(widths)
        for name, s in sites.items():
            m = small.get_submodule(name)
            c_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            c_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            assert (s.c_in[0] + s.c_in[1] @ w, s.c_out[0] + s.c_out[1] @ w) == (c_in, c_out), name


def test_the_table_is_timed_once_kept_reused_and_retimed_for_other_settings(tmp_path: Path) -> None:
    model, x = Blocks().eval(), torch.randn(1, 3, 16, 16)
    gs = graph.analyze(model, x)
    first = LatencyPredictor(gs, tmp_path, min_run_time=FAST)
    timed = first.fill()
    assert timed > 0 and (tmp_path / TABLE_FILE).is_file()
    # a second process (a resumed search, another worker) reads the table instead of timing it again
    again = LatencyPredictor(gs, tmp_path, min_run_time=FAST)
    assert again.fill() == 0
    full = {g: gs[g].size for g in gs.prunable_ids}
    assert again.predict(full) == first.predict(full)
    # at a grid point, the uncalibrated prediction is the sum of the table's entries of the layers
    expected = sum(first.table.lookup(s.op, s.full_in, s.full_out, s.k, s.stride, s.h, s.w,
                                      s.full_out if s.depthwise else s.groups) for s in first.sites)
    assert first.predict(full) == pytest.approx(expected)
    for changed in ({"threads": 2}, {"batch": 2}):
        other = LatencyPredictor(gs, tmp_path, min_run_time=FAST, **changed)
        assert other.fill() == timed  # timed again for the new settings
        doc = json.loads((tmp_path / TABLE_FILE).read_text())
        assert (doc["threads"], doc["batch"]) == (changed.get("threads", 1), changed.get("batch", 1))


def test_a_damaged_table_is_timed_again(tmp_path: Path) -> None:
    model, x = Blocks().eval(), torch.randn(1, 3, 16, 16)
    gs = graph.analyze(model, x)
    (tmp_path / TABLE_FILE).write_text("{ not json")
    assert LatencyPredictor(gs, tmp_path, min_run_time=FAST).fill() > 0


def test_calibration_is_fitted_stored_and_reused_only_for_the_same_model(tmp_path: Path) -> None:
    model, x = Blocks().eval(), torch.randn(1, 3, 16, 16)
    gs = graph.analyze(model, x)
    pred = LatencyPredictor(gs, tmp_path, min_run_time=FAST)
    pred.fill()
    rng = random.Random(1)
    cands = [{g: gs[g].size for g in gs.prunable_ids}] + [
        {g: rng.randint(1, gs[g].size) for g in gs.prunable_ids} for _ in range(4)]
    fit = pred.calibrate(lambda w: pruning.apply(model, gs, dict(w)), cands, x, rounds=1)
    assert fit["candidates"] == 5 and len(fit["measured_ms"]) == 5
    assert pred.coef is not None and all(c >= 0 for c in pred.coef)
    assert all(p > 0 for p in fit["predicted_ms"])
    reread = LatencyPredictor(gs, tmp_path, min_run_time=FAST)
    assert reread.load_calibration() and reread.coef == pred.coef
    other_form = LatencyPredictor(gs, tmp_path, min_run_time=FAST, deploy={"fold_bn": False})
    assert not other_form.load_calibration()  # calibrated for another deployed form
    other = LatencyPredictor(gs, tmp_path, min_run_time=FAST, threads=2)
    assert not other.load_calibration()  # fitted with other settings
    gs2 = graph.analyze(build_model("small_cnn", in_channels=3), x)
    assert not LatencyPredictor(gs2, tmp_path, min_run_time=FAST).load_calibration()
    with pytest.raises(ConfigError, match="at least 3"):
        pred.calibrate(lambda w: pruning.apply(model, gs, dict(w)), cands[:2], x)


# ------------------------------------------------------------------------------------- budgets in searchers


def campaign_dict(out: Path, **patch: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "lat", "output_dir": str(out),
        "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "dataset": {"name": "digits", "batch_size": 32},
        "evaluator": {"name": "adaptive_bn", "kwargs": {"batches": 1}},
        "objective": {"objectives": ["accuracy", "latency"]},  # a latency objective: the predictor is built
        "latency": {"min_run_time": FAST, "calibration": 4},
        "searcher": {"name": "random"}, "n_trials": 3,
    }
    data.update(patch)
    return data


@pytest.fixture(scope="module")
def camp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_campaign(config_from_dict(campaign_dict(tmp_path_factory.mktemp("lat"))), measure_dense=False)


def midway(problem: Any) -> float:
    """A latency budget (fraction of the dense model) halfway between the smallest candidate's predicted latency
    and the dense model's: feasible, and binding, whatever this machine's timings are."""
    low = problem.cost(problem.space.minimal()).latency_ms / problem.dense_cost.latency_ms
    assert low < 1.0  # the prediction follows the widths
    return round((1.0 + low) / 2, 4)


SEARCHERS = {"random": {}, "uniform": {}, "tpe": {"n_startup_trials": 2}, "nsga2": {"population_size": 4},
             "ddpg": {"warmup_episodes": 2, "net_arch": [8], "batch_size": 4},
             "ppo": {"rollout_episodes": 2, "batch_size": 4, "n_epochs": 1, "net_arch": [8]}}


@pytest.mark.parametrize("name", list(SEARCHERS))
def test_every_kind_of_searcher_keeps_the_latency_budget(camp: Any, name: str) -> None:
    problem = camp.new_problem()
    dense = problem.dense_cost
    assert dense.latency_ms is not None and dense.latency_ms > 0
    frac = midway(problem)
    limit = Budget(latency_ms=frac).limit("latency_ms", dense)
    kwargs: dict[str, Any] = dict(SEARCHERS[name])
    if name == "nsga2":
        kwargs["objective"] = {"objectives": ["accuracy", "latency"]}
    res = make_searcher(name, problem, store=TrialStore(":memory:", campaign="lat"), n_trials=3,
                        budget={"latency_ms": frac}, **kwargs).run()
    counted = [t for t in res.trials if t.state == "complete"]
    assert counted
    for t in counted:
        assert t.cost.latency_ms is not None and t.cost.latency_ms <= limit * (1 + 1e-9), (name, t.cost)
        assert t.cost.latency_ms == pytest.approx(problem.cost(t.candidate).latency_ms)


def test_dmcp_turns_a_latency_budget_into_the_uniform_candidates_macs(camp: Any) -> None:
    problem = camp.new_problem()
    frac = midway(problem)
    s = make_searcher("dmcp", problem, store=TrialStore(":memory:", campaign="lat"), n_trials=1,
                      budget={"latency_ms": frac}, train_loader=camp.train_loader, val_loader=camp.val_loader)
    uniform = make_searcher("uniform", problem, store=TrialStore(":memory:", campaign="lat"), n_trials=1,
                            budget={"latency_ms": frac}).run().trials[0]
    assert s.config.macs_target == pytest.approx(uniform.cost.macs)


def test_search_with_a_latency_budget_from_the_command_line(tmp_path: Path) -> None:
    import os

    data = campaign_dict(tmp_path / "out", searcher={"name": "tpe"})
    # the table and the calibration are measured here once; the command reads them from the campaign directory
    frac = midway(build_campaign(config_from_dict(data), measure_dense=False).problem)
    data["objective"] = {"budget": {"macs": 0.5}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AUTOPRUNE_THREADS": "1"}

    def search(n: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "autoprune.cli", "search", str(cfg),
                               f"objective.budget.latency_ms={frac}", "objective.budget.macs=null", f"n_trials={n}"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)

    r = search(4)
    assert r.returncode == 0, r.stderr
    assert "latency table: timed" not in r.stderr and "calibrated" not in r.stderr  # reused, not re-timed
    assert "latency (batch 1, 1 thread): best #" in r.stdout and "predicted" in r.stdout and "measured" in r.stdout
    assert (tmp_path / "out" / TABLE_FILE).is_file() and (tmp_path / "out" / MODEL_FILE).is_file()
    stored = json.loads((tmp_path / "out" / MODEL_FILE).read_text())  # timed in the form export writes
    assert stored["layout"] in ("contiguous", "channels_last")
    assert json.loads((tmp_path / "out" / TABLE_FILE).read_text())["statistic"] == "p10"
    df = TrialStore(tmp_path / "out" / "trials.db", campaign="lat").to_dataframe()
    space = json.loads((tmp_path / "out" / "space.json").read_text())
    limit = frac * space["dense"]["latency_ms"]
    done = df[df["state"] == "complete"]
    assert len(done) == 4 and (done["latency_ms"] <= limit * (1 + 1e-9)).all()
    assert search(5).returncode == 0  # resumed


def test_a_latency_objective_without_a_predictor_is_refused_up_front() -> None:
    from tests.test_searchers import BUDGET, make_problem  # the searchers' fake problem has no latency predictor

    with pytest.raises(ConfigError, match=r"\['latency'\] need a cost model that predicts them"):
        make_searcher("nsga2", make_problem(), store=TrialStore(":memory:", campaign="x"), n_trials=2,
                      budget=BUDGET, objective={"objectives": ["accuracy", "latency"]})


def test_grouped_convs_are_timed_at_widths_their_groups_divide(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1, groups=4),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)).eval()
    gs = graph.analyze(model, torch.randn(1, 3, 8, 8))
    pred = LatencyPredictor(gs, tmp_path, min_run_time=FAST)
    assert pred.fill() > 0
    assert all(int(k.split("|")[1]) % 4 == 0 for k in pred.table.entries if k.split("|")[7] == "4")
