"""The fair-budget search benchmark (``benchmarks/bench_search_budget.py``): its cells, best-so-far curves, the
budget table, resume and split runs. Nothing here loads CIFAR-10 or runs a search: the heavy functions are
replaced by fakes."""

from __future__ import annotations

import json
import shutil
import signal
import tarfile
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from benchmarks import _cifar, _common
from benchmarks import bench_search_budget as bsb
from benchmarks import bench_search_quality as bsq
from benchmarks._cells import PUBLISHED, from_file, to_file

T0 = datetime(2024, 1, 1, 12, 0, 0)


# ------------------------------------------------------------------------------------------------ cells


def test_full_cells_counts_seeds_and_rl_warmup() -> None:
    cells = bsb.cells(bsb.FULL, bsb.SEARCHERS)
    per = Counter(c[2] for c in cells)
    two = {"uniform", "random", "tpe", "cmaes", "gp", "ddpg", "ppo"}
    for name in bsb.SEARCHERS:  # two targets × seeds
        assert per[name] == 2 * (2 if name in two else 1), name
    assert len(cells) == 36 and len(set(cells)) == 36
    assert {c[0] for c in cells} == {"resnet20"} and {c[1] for c in cells} == {0.5, 0.3}
    # seed 0 of every searcher comes before any second seed (a partial run covers every searcher first)
    first_seed1 = min(i for i, c in enumerate(cells) if c[3] == 1)
    assert all(c[3] == 0 for c in cells[:first_seed1]) and first_seed1 == 22
    # another "best other RL agent"
    per_sac = Counter(c[2] for c in bsb.cells(bsb.FULL, bsb.SEARCHERS, extra_rl="sac"))
    assert per_sac["sac"] == 4 and per_sac["ppo"] == 2
    assert bsb.FULL.candidates == 400


def test_searcher_options_at_400_candidates() -> None:
    for name in ("ddpg", "td3", "sac"):  # AMC: 100 warm-up episodes + 300 agent episodes
        assert bsb.searcher_options(name, bsb.FULL, 9) == {"warmup_episodes": 100}
    assert "warmup_episodes" not in bsb.searcher_options("ppo", bsb.FULL, 9)
    assert bsb.searcher_options("ppo", bsb.FULL, 9)["rollout_episodes"] == 8
    assert bsb.searcher_options("tpe", bsb.FULL, 9) == {"n_startup_trials": 10}
    assert bsb.searcher_options("nsga2", bsb.FULL, 9) == {"population_size": 20}
    # the quick form's warm-up fits in its 6 candidates
    assert bsb.searcher_options("ddpg", bsb.QUICK, 9)["warmup_episodes"] == 2


def test_parts_cover_every_cell_once() -> None:
    cells = bsb.cells(bsb.FULL, bsb.SEARCHERS)
    for n in (1, 2, 3, 5):
        parts = [bsb.part_of(cells, i, n) for i in range(1, n + 1)]
        assert sorted(c for p in parts for c in p) == sorted(cells)
        assert sum(len(p) for p in parts) == len(cells)


def test_grid_evaluator_is_the_search_quality_one() -> None:
    assert bsb.problem_factory(bsb.FULL) is None  # run_cell then builds the grid's own problem
    assert bsb.default_evaluator() == bsb.FULL.evaluator == "adaptive_bn"
    assert callable(bsb.problem_factory(bsb.replace(bsb.FULL, evaluator="plain")))


# ------------------------------------------------------------------------------------------------ curves


def _trial(number: int, state: str, acc: float | None, macs: int, seconds: float, done_after: float) -> dict:
    return {"number": number, "state": state, "accuracy": acc, "macs": macs, "seconds": seconds,
            "datetime_complete": T0 + timedelta(seconds=done_after)}


def test_best_so_far_against_candidates_and_seconds() -> None:
    df = pd.DataFrame([
        _trial(0, "complete", 0.50, 90, 2.0, 2.0),
        _trial(1, "infeasible", None, 150, 0.1, 2.1),
        _trial(2, "complete", 0.70, 120, 2.0, 5.0),     # over the MACs limit: not a finalist
        _trial(3, "interrupted", None, 90, 1.0, 6.0),   # a killed run's trial: not counted
        _trial(4, "complete", 0.60, 100, 2.0, 10.0),    # 3 s after #2 completed (1 s of agent update): counted
        _trial(5, "complete", 0.55, 80, 2.0, 500.0),    # a pause (resume): only its own 2 s count
        _trial(6, "failed", None, 80, 1.0, 501.0),
    ]).sample(frac=1.0, random_state=0)  # any row order
    curve = bsb.best_so_far(df, macs_limit=100)
    assert curve["n"] == [1, 2, 3, 4, 5, 6]
    assert curve["best"] == [0.5, 0.5, 0.5, 0.6, 0.6, 0.6]
    assert curve["seconds"] == pytest.approx([2.0, 2.1, 5.0, 10.0, 12.0, 13.0])
    assert all(b >= a for a, b in zip(curve["seconds"], curve["seconds"][1:]))
    assert bsb.value_at(curve, "n", 3) == (0.5, False)
    assert bsb.value_at(curve, "n", 400) == (0.6, True)  # ended before the budget
    assert bsb.value_at(curve, "seconds", 9.9) == (0.5, False)
    assert bsb.value_at(curve, "seconds", 10.0) == (0.6, False)
    assert bsb.value_at(curve, "seconds", 1.0) == (None, False)
    none_yet = bsb.best_so_far(pd.DataFrame([_trial(0, "infeasible", None, 150, 1.0, 1.0)]), macs_limit=100)
    assert none_yet["best"] == [None]


def test_best_so_far_from_a_real_trial_store(tmp_path: Path) -> None:
    from autoprune.store import TrialStore
    from autoprune.types import Candidate, CostReport, EvalResult

    store = TrialStore(tmp_path / "trials.db", campaign="sb-test")
    study = store.study("random", 0)
    for i, (acc, macs) in enumerate([(0.4, 50), (0.6, 200), (0.5, 60)]):
        trial = study.ask()
        TrialStore.finish(study, trial, candidate=Candidate(widths={"g": i + 1}), cost=CostReport(macs, 1, 4),
                          result=EvalResult(acc, 1.0, seconds=0.01), reward=acc, seconds=0.02, searcher="random",
                          seed=0, values=[acc])
    curve = bsb.best_so_far(store.to_dataframe(searcher="random", seed=0), macs_limit=100)
    assert curve["n"] == [1, 2, 3] and curve["best"] == [0.4, 0.4, 0.5]
    assert all(s > 0 for s in curve["seconds"]) and curve["seconds"] == sorted(curve["seconds"])
    assert bsb.overhead_per_candidate(store, "random", 0) == pytest.approx(0.01, abs=1e-6)


def test_proposal_guard_stops_after_patience_slow_candidates() -> None:
    now = [0.0]
    guard = bsb.ProposalGuard(10.0, patience=3, clock=lambda: now[0])
    searcher = SimpleNamespace(n_done=0, stopped=False)
    searcher.stop = lambda: setattr(searcher, "stopped", True)
    record = SimpleNamespace(result=SimpleNamespace(seconds=5.0))
    for dt in (1, 14, 16, 12, 16, 16, 16):  # own time = dt - 5: 9 (start) 11 7 11 11 11 ...
        now[0] += dt
        searcher.n_done += 1
        guard(searcher, record)
        if searcher.stopped:
            break
    assert searcher.stopped and guard.tripped is not None
    assert guard.tripped["at"] == 7 and guard.tripped["limit_seconds"] == 10.0


# ------------------------------------------------------------------------------------------------ tables


def _curve(values: list[float | None], seconds_each: float) -> dict[str, list[Any]]:
    return {"n": list(range(1, len(values) + 1)),
            "seconds": [seconds_each * (i + 1) for i in range(len(values))], "best": values}


def _record(name: str, seed: int, target: float, curve: dict, test: float, **extra: Any) -> dict[str, Any]:
    return {"model": "resnet20", "target": target, "searcher": name, "seed": seed, "trials": len(curve["n"]),
            "candidates": len(curve["n"]), "options": {}, "search_seconds": curve["seconds"][-1], "curve": curve,
            "val_best": max(v for v in curve["best"] if v is not None), "test_after_ft": test,
            "test_before_ft": test - 0.1, "ft_seconds": 1.0, "macs_ratio": target, **extra}


def planted() -> dict[str, Any]:
    """Fast-early ``fast`` (wins at 5 min), slow-but-better ``slow`` (wins at 400 candidates and 2 h)."""
    fast = [0.50] * 20 + [0.60] * 380   # 1 s per candidate: all 400 within 400 s
    slow = [0.40] * 150 + [0.70] * 250  # 10 s per candidate: 30 candidates in 5 min
    cells = {}
    for t in (0.5, 0.3):
        for s in (0, 1):
            cells[bsq.cell_key("resnet20", t, "random", s)] = _record("random", s, t, _curve(fast, 1.0), 0.80 + s / 100)
        cells[bsq.cell_key("resnet20", t, "gp", 0)] = _record(
            "gp", 0, t, _curve(slow, 10.0), 0.85, truncated={"at": 400, "limit_seconds": 60})
        cells[bsq.cell_key("resnet20", t, "uniform", 0)] = _record("uniform", 0, t, _curve([0.55], 3.0), 0.79)
    return {"sizes": asdict_sizes(), "cells": cells, "dense": {}, "searchers": ["uniform", "random", "gp"],
            "runs": [], "quick": False, "extra_rl": "td3", "gp_max_seconds": 60.0}


def asdict_sizes() -> dict[str, Any]:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(bsb.FULL)))


def test_budget_table_picks_from_planted_data() -> None:
    raw = planted()
    assert [n for n, _ in bsb.ranking(raw, 0.5, "seconds", 300)] == ["random", "uniform", "gp"]
    assert bsb.ranking(raw, 0.5, "seconds", 300)[0][1]["mean"] == pytest.approx(0.60)
    assert bsb.ranking(raw, 0.5, "seconds", 7200)[0][0] == "gp"
    at_100 = dict(bsb.ranking(raw, 0.5, "n", 100))
    assert at_100["random"]["mean"] == pytest.approx(0.60) and at_100["gp"]["mean"] == pytest.approx(0.40)
    assert at_100["uniform"]["ended"] and not at_100["random"]["ended"]
    at_2h = dict(bsb.ranking(raw, 0.5, "seconds", 7200))
    assert at_2h["random"]["ended"] and at_2h["gp"]["ended"] and at_2h["gp"]["truncated"]
    assert bsb.finalist_ranking(raw, 0.5)[0][0] == "gp"
    assert bsb.finalist_ranking(raw, 0.5)[1] == ("random", pytest.approx(0.805), 2)
    table = "\n".join(bsb.best_by_budget_table(raw))
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "**random** 60.00" in rows["search score within 5 min"]
    assert "**gp** 70.00†" in rows["search score within 2 h"]
    assert "**random** 60.00" in rows["search score within 32 candidates"]
    assert "**gp** 70.00" in rows["search score within 400 candidates"]
    assert "**gp** 85.00" in rows["finalist after the fine-tune (test half B)"]
    text = bsb.summarise(raw, "python -m benchmarks.bench_search_budget --resume")
    assert "## Best searcher by budget" in text and "## 50 % of the dense MACs" in text
    assert "seed 0 stopped by the guard at 400 candidates" in text
    assert "continue with `python -m benchmarks.bench_search_budget --resume`" in text


def test_estimate_from_quick_rates() -> None:
    raw = planted()
    assert bsb.estimate_full(raw) is None
    raw["rates"] = {"model": "resnet20", "forward_per_sample": 1e-3, "train_step": 0.1, "calib_batch": 128,
                    "ft_batch": 128}
    raw["dense"] = {"resnet20": {"macs": 41e6}}
    est = bsb.estimate_full(raw, names=list(bsb.SEARCHERS))
    assert est is not None and est["cells"] == 36
    # a 2-seed candidate searcher: 2 targets × 2 seeds × (400 × (3.28 + 0.2) s + 391 × 0.1 + 11.28 s)
    per_cell = 400 * (1e-3 * (1280 + 2000) + 0.2) + 0.1 * 391 + 1e-3 * (2 * 5000 + 1280)
    assert est["per_searcher_hours"]["tpe"] == pytest.approx(4 * per_cell / 3600)
    finetune = 0.1 * 391 + 1e-3 * (2 * 5000 + 1280)
    assert est["per_searcher_hours"]["uniform"] == pytest.approx(4 * (1e-3 * 3280 + 0.2 + finetune) / 3600)
    assert est["per_searcher_hours"]["nsga2"] == pytest.approx(est["per_searcher_hours"]["tpe"] / 2)  # one seed
    assert est["hours"] == pytest.approx(sum(est["per_searcher_hours"].values()))


def test_figures_from_planted_curves(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = bsb.write_figures(planted(), tmp_path)
    assert sorted(p.name for p in written) == ["search_budget_30.png", "search_budget_50.png"]


# ------------------------------------------------------------------------------------------------ resume, parts


@pytest.fixture()
def fake_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> dict[str, Any]:
    """``main`` with every heavy function replaced: no data, no search; the runner logs the cells it ran."""
    import autoprune.evaluate

    results = tmp_path / "results"
    monkeypatch.setattr(_common, "RESULTS", results)
    monkeypatch.setattr(_common, "git_commit", lambda: "test")
    monkeypatch.setattr(bsb, "RESULTS", results)
    monkeypatch.setattr(bsb, "WORKDIR", results / "search_budget_work")
    monkeypatch.setattr(_cifar, "missing_data", lambda models=(): None)
    monkeypatch.setattr(_cifar, "load_cifar10", lambda seed=0: None)
    ctx = {"model": None, "select": None, "report": None}
    monkeypatch.setattr(bsq, "setup", lambda model, sizes, splits, seed=0: {**ctx, "name": model})
    dense = SimpleNamespace(dense_cost=SimpleNamespace(macs=100, params=10, bytes=40))
    monkeypatch.setattr(_cifar, "make_problem", lambda ctx: dense)
    monkeypatch.setattr(autoprune.evaluate, "validate", lambda *a, **k: (0.9, 0.3))
    monkeypatch.setattr(bsb, "write_figures", lambda *a, **k: [])
    state: dict[str, Any] = {"ran": [], "fail_at": None, "results": results}

    def runner(ctx: Any, sizes: Any, target: float, name: str, seed: int, store_dir: Path) -> dict[str, Any]:
        if state["fail_at"] is not None and len(state["ran"]) == state["fail_at"]:
            raise RuntimeError("killed")
        state["ran"].append((ctx["name"], target, name, seed))
        curve = _curve([0.5 + seed / 10, 0.6], 1.0)
        return _record(name, seed, target, curve, 0.8)

    monkeypatch.setattr(bsb, "make_cell_runner", lambda sizes, gp_max: runner)
    previous = signal.getsignal(signal.SIGINT)  # main installs the CLI's Ctrl-C handler: give it back afterwards
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    return state


def _cells_in(results: Path) -> set[str]:
    cells = json.loads((results / "search_budget.json").read_text())["cells"]
    assert isinstance(cells, list) and all(list(c)[:len(PUBLISHED)] == list(PUBLISHED) for c in cells)
    return {bsq.cell_key(c["model"], c["target"], c["searcher"], c["seed"]) for c in cells}


def test_resume_skips_finished_cells(fake_bench: dict[str, Any]) -> None:
    args = ["--searchers", "uniform,random,nsga2", "--targets", "0.5"]
    fake_bench["fail_at"] = 2
    with pytest.raises(RuntimeError, match="killed"):
        bsb.main(args)
    first = list(fake_bench["ran"])
    assert len(first) == 2 and _cells_in(fake_bench["results"]) == {bsq.cell_key(*c) for c in first}
    with pytest.raises(SystemExit):  # finished cells are never overwritten without --resume
        bsb.main(args)
    fake_bench["fail_at"] = None
    assert bsb.main([*args, "--resume"]) == 0
    rest = fake_bench["ran"][2:]
    expected = bsb.cells(bsb.replace(bsb.FULL, targets=(0.5,)), ["uniform", "random", "nsga2"])
    assert len(expected) == 5 and sorted(first + rest) == sorted(expected) and not set(first) & set(rest)
    raw = json.loads((fake_bench["results"] / "search_budget.json").read_text())
    assert raw["evaluator"] == {"name": "adaptive_bn", "kwargs": {}} and raw["sizes"]["candidates"] == 400
    md = (fake_bench["results"] / "search_budget.md").read_text()
    assert "## Best searcher by budget" in md and "- command: `" in md
    fake_bench["ran"].clear()
    assert bsb.main([*args, "--resume"]) == 0 and fake_bench["ran"] == []  # nothing left to do


def test_resume_refuses_other_per_cell_settings(fake_bench: dict[str, Any]) -> None:
    args = ["--searchers", "uniform", "--targets", "0.5"]
    assert bsb.main(args) == 0
    with pytest.raises(SystemExit):
        bsb.main([*args, "--resume", "--evaluator", "plain"])


def test_parts_merge_to_the_same_cells(fake_bench: dict[str, Any]) -> None:
    args = ["--searchers", "uniform,random,tpe,sac", "--targets", "0.5,0.3", "--resume"]
    assert bsb.main([*args, "--part", "1/2"]) == 0
    part1 = list(fake_bench["ran"])
    assert bsb.main([*args, "--part", "2/2"]) == 0
    part2 = fake_bench["ran"][len(part1):]
    whole = bsb.cells(bsb.FULL, ["uniform", "random", "tpe", "sac"])
    assert sorted(part1 + part2) == sorted(whole) and not set(part1) & set(part2)
    assert _cells_in(fake_bench["results"]) == {bsq.cell_key(*c) for c in whole}
    with pytest.raises(SystemExit):
        bsb.main([*args, "--part", "3/2"])


def test_an_interrupted_cell_is_carried_to_a_machine_without_the_work_directory(
        fake_bench: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder of a cell killed mid-search is packed into the versioned archive (a finished cell's is not) and
    put back when the work directory is gone, so the cell continues from its store."""
    seen: list[tuple[str, str]] = []

    def runner(ctx: Any, sizes: Any, target: float, name: str, seed: int, store_dir: Path) -> dict[str, Any]:
        d = bsb.cell_dir(store_dir, ctx["name"], target, name, seed)
        d.mkdir(parents=True, exist_ok=True)
        marker = d / "progress.txt"
        seen.append((name, marker.read_text() if marker.exists() else "nothing"))
        marker.write_text(f"{name} half-way")
        if name == "random" and len(seen) == 2:
            raise RuntimeError("killed")
        return _record(name, seed, target, _curve([0.5, 0.6], 1.0), 0.8)

    monkeypatch.setattr(bsb, "make_cell_runner", lambda sizes, gp_max: runner)
    args = ["--searchers", "uniform,random", "--targets", "0.5", "--seeds", "1", "--resume"]
    with pytest.raises(RuntimeError, match="killed"):
        bsb.main(args)
    archive = bsb.carry_path()
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["resnet20-50-random-seed0/progress.txt"]  # the finished uniform cell: not carried
    shutil.rmtree(fake_bench["results"] / "search_budget_work")  # a new machine
    assert bsb.main(args) == 0
    assert seen == [("uniform", "nothing"), ("random", "nothing"), ("random", "random half-way")]
    assert not archive.exists()  # every cell finished: nothing left to carry


def test_seed_curves_hold_an_ended_seeds_final_value() -> None:
    """Averaged over seeds, a best-so-far curve never drops where one seed ended before the other."""
    np = pytest.importorskip("numpy")
    short = {"n": [1, 2], "seconds": [10.0, 20.0], "best": [None, 0.6]}
    long = {"n": [1, 2, 3, 4], "seconds": [10.0, 20.0, 30.0, 40.0], "best": [0.5, 0.5, 0.7, 0.8]}
    grid = np.array([5.0, 15.0, 25.0, 35.0, 45.0])
    by_n, by_s = bsb.seed_curves([short, long], grid)
    assert np.allclose(by_n[0], [np.nan, 0.6, 0.6, 0.6], equal_nan=True)
    assert np.allclose(by_s[0], [np.nan, np.nan, 0.6, 0.6, np.nan], equal_nan=True)  # held to the longest end
    assert np.allclose(by_s[1], [np.nan, 0.5, 0.5, 0.7, np.nan], equal_nan=True)


def test_ctrl_c_exits_130_and_still_carries_the_running_cell(fake_bench: dict[str, Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def runner(ctx: Any, sizes: Any, target: float, name: str, seed: int, store_dir: Path) -> dict[str, Any]:
        d = bsb.cell_dir(store_dir, ctx["name"], target, name, seed)
        d.mkdir(parents=True, exist_ok=True)
        (d / "progress.txt").write_text("half-way")
        raise KeyboardInterrupt

    monkeypatch.setattr(bsb, "make_cell_runner", lambda sizes, gp_max: runner)
    assert bsb.main(["--searchers", "random", "--targets", "0.5", "--seeds", "1", "--resume"]) == 130
    with tarfile.open(bsb.carry_path()) as tar:
        assert tar.getnames() == ["resnet20-50-random-seed0/progress.txt"]


def test_results_file_publishes_cells_as_a_list_and_reads_older_files() -> None:
    rec = _record("tpe", 1, 0.3, _curve([0.5, 0.6], 1.0), 0.8)
    raw = {"sizes": {}, "cells": {bsq.cell_key("resnet20", 0.3, "tpe", 1): rec},
           "superseded": {bsq.cell_key("resnet20", 0.3, "tpe", 1): [{"record": rec, "at": 1.0, "command": "c"}]}}
    on_disk = json.loads(json.dumps(to_file(raw)))
    cell = on_disk["cells"][0]
    assert list(cell)[:len(PUBLISHED)] == list(PUBLISHED)
    assert (cell["model"], cell["target"], cell["searcher"], cell["seed"]) == ("resnet20", 0.3, "tpe", 1)
    assert cell["candidates"] == 2 and cell["val_best"] == 0.6 and cell["test_after_ft"] == 0.8
    assert from_file(on_disk) == raw  # the round trip gives the in-memory form back
    failed = {"model": "resnet20", "target": 0.5, "searcher": "gp", "seed": 0, "error": "no feasible candidate"}
    back = from_file(json.loads(json.dumps(to_file({"cells": {"k": failed}}))))
    assert back["cells"] == {bsq.cell_key("resnet20", 0.5, "gp", 0): failed}  # no None fields added
    legacy_rec = {k: v for k, v in rec.items() if k not in ("val_best", "macs_ratio", "candidates")}
    legacy_rec.update(best_val=0.6, macs_fraction=0.3, evaluated=2)
    legacy = {"cells": {bsq.cell_key("resnet20", 0.3, "tpe", 1): legacy_rec},
              "superseded": {bsq.cell_key("resnet20", 0.3, "tpe", 1): legacy_rec}}  # oldest form: a bare record
    read = from_file(legacy)
    assert read["cells"] == raw["cells"]
    assert read["superseded"][bsq.cell_key("resnet20", 0.3, "tpe", 1)] == rec


def test_goal_checks_follow_the_issue_and_stay_open_until_every_seed_is_in() -> None:
    c = _curve([0.5], 1.0)
    cells = [_record("uniform", 0, 0.5, c, 0.860), _record("uniform", 1, 0.5, c, 0.862),
             _record("ddpg", 0, 0.5, c, 0.875), _record("ddpg", 1, 0.5, c, 0.877),
             _record("tpe", 0, 0.5, c, 0.880), _record("cmaes", 0, 0.5, c, 0.884),
             _record("ppo", 0, 0.5, c, 0.855), _record("gp", 0, 0.5, c, 0.0, error="no feasible candidate")]
    raw = {"sizes": {"seeds": 2}, "extra_rl": "td3",
           "cells": {bsq.cell_key("resnet20", r["target"], r["searcher"], r["seed"]): r for r in cells}}
    checks = {g["goal"].split(" ")[0] + g["goal"].split(" ")[2]: g for g in bsb.goal_checks(raw, 0.5)}
    over = checks["ddpguniform"]
    assert over["value"] == pytest.approx(1.5) and over["met"] is True
    behind = checks["ddpgbest"]  # cmaes leads (the failed gp cell does not count); tpe/cmaes miss a seed
    assert "cmaes" in behind["goal"] and behind["value"] == pytest.approx(-0.8) and behind["met"] is None
    assert checks["ppouniform"]["value"] == pytest.approx(-0.6) and checks["ppouniform"]["met"] is False
    text = "\n".join(bsb.goals_lines(raw))
    assert "**not met**" in text and "open (cells missing)" in text and "| 50 % | ddpg − uniform" in text


def test_a_damaged_carry_is_an_error_with_a_hint_and_runs_nothing(fake_bench: dict[str, Any],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    archive = bsb.carry_path()
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.with_name(archive.name + ".001").write_bytes(b"half of")
    archive.with_name(archive.name + ".003").write_bytes(b"an archive")  # .002 is missing
    with pytest.raises(SystemExit) as exit_:
        bsb.main(["--searchers", "uniform", "--targets", "0.5", "--resume"])
    assert exit_.value.code == 2 and fake_bench["ran"] == []
    err = capsys.readouterr().err
    assert err.startswith("error: search_budget_carry.tar.gz: volumes [1, 3]") and "hint: git checkout" in err
    assert len(bsb._carry.volumes(archive)) == 2  # nothing deleted


def test_finished_cells_outside_the_plan_are_named_in_the_protocol() -> None:
    grid = bsb.cells(bsb.replace(bsb.FULL, targets=(0.5,)), ["uniform", "td3", "ppo"], extra_rl="ppo")
    raw = {"cells": {bsq.cell_key(*c): {"searcher": c[2], "target": c[1], "seed": c[3]} for c in grid}}
    assert bsb.beyond_plan(raw, grid) == ""
    raw["cells"][bsq.cell_key("resnet20", 0.5, "td3", 1)] = {"searcher": "td3", "target": 0.5, "seed": 1}
    raw["cells"][bsq.cell_key("resnet20", 0.5, "sac", 0)] = {"searcher": "sac", "target": 0.5, "seed": 0,
                                                             "error": "crashed"}  # a failure is not counted
    assert bsb.beyond_plan(raw, grid) == " (kept from earlier runs and counted: `td3` seed 1 at 50 %)"


def test_rerun_supersedes_a_searchers_cells_and_starts_them_from_an_empty_store(
        fake_bench: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def runner(ctx: Any, sizes: Any, target: float, name: str, seed: int, store_dir: Path) -> dict[str, Any]:
        fake_bench["ran"].append((ctx["name"], target, name, seed))  # a rerun gives another result
        return _record(name, seed, target, _curve([0.5, 0.6], 1.0), 0.8 + len(fake_bench["ran"]) / 100)

    monkeypatch.setattr(bsb, "make_cell_runner", lambda sizes, gp_max: runner)
    args = ["--searchers", "uniform,ddpg", "--targets", "0.5", "--seeds", "1", "--resume"]
    assert bsb.main(args) == 0
    work = fake_bench["results"] / "search_budget_work"
    old_dir = bsb.cell_dir(work, "resnet20", 0.5, "ddpg", 0)
    old_dir.mkdir(parents=True)
    (old_dir / "trials.db").write_text("the old study")
    fake_bench["ran"].clear()
    assert bsb.main([*args, "--rerun", "ddpg"]) == 0
    assert fake_bench["ran"] == [("resnet20", 0.5, "ddpg", 0)]  # uniform kept, ddpg ran again
    assert not (old_dir / "trials.db").exists()  # from an empty store
    raw = json.loads((fake_bench["results"] / "search_budget.json").read_text())
    assert list(raw["superseded"]) == ["resnet20|0.5|ddpg|0"] and _cells_in(fake_bench["results"]) == {
        "resnet20|0.5|uniform|0", "resnet20|0.5|ddpg|0"}
    md = (fake_bench["results"] / "search_budget.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| ddpg | 50 % | 1 |"))  # the superseded section
    earlier = raw["superseded"]["resnet20|0.5|ddpg|0"][0]["record"]
    now = next(c for c in raw["cells"] if c["searcher"] == "ddpg")
    assert row.endswith(
        f"| {100 * earlier['test_after_ft']:.2f} | {100 * now['val_best']:.2f} | {100 * now['test_after_ft']:.2f} |")
    with pytest.raises(SystemExit):
        bsb.main([*args, "--rerun", "tpe"])  # not among this run's searchers
