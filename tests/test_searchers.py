"""Searchers behind one interface: a contract suite over every registered searcher, plus targeted tests.

Everything runs on a small fake problem: five chained channel groups with a bilinear closed-form cost
(MACs = Σ hw_i · 9 · w_{i−1} · w_i) and a fake evaluator whose accuracy falls with the pruned fraction of each
group, at group-specific sensitivities. The engine is never touched, so the suite is fast.
"""

from __future__ import annotations

import math
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from autoprune import graph
from autoprune._imports import is_available
from autoprune.agents.base import (
    SEARCHERS,
    BudgetGuard,
    Objective,
    Searcher,
    derive_seed,
    load_builtin_searchers,
    load_hyperparams,
    make_searcher,
)
from autoprune.errors import AutoPruneError, ConfigError
from autoprune.objectives import Budget
from autoprune.problem import GroupChoice, LayerChoice, Problem, SearchSpace
from autoprune.store import TrialStore
from autoprune.types import Candidate, CostReport, EvalResult, QuantSpec, TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)
load_builtin_searchers()

SIZES = (8, 8, 16, 16, 32)
HW = (256, 256, 64, 64, 16)
SENS = (0.30, 0.05, 0.20, 0.05, 0.10)
RL = ("ddpg", "td3", "sac", "ppo", "a2c")
BUDGET = {"macs": 0.5}
N = 3  # trials before the stop; the resumed search runs to 2N

# Tiny hyper-parameters so that the RL searchers learn something within a few episodes.
RL_TINY: dict[str, dict[str, Any]] = {
    "ddpg": {"warmup_episodes": 2, "net_arch": [8], "batch_size": 4},
    "td3": {"warmup_episodes": 2, "net_arch": [8], "batch_size": 4},
    "sac": {"warmup_episodes": 2, "net_arch": [8], "batch_size": 4},
    "ppo": {"rollout_episodes": 2, "batch_size": 5, "n_epochs": 1, "net_arch": [8]},
    "a2c": {"rollout_episodes": 1, "net_arch": [8]},
}


class _Built(nn.Module):
    """What the fake problem "builds": a module that only carries its candidate."""

    def __init__(self, candidate: Candidate) -> None:
        super().__init__()
        self.candidate = candidate


def fake_accuracy(c: Candidate) -> float:
    acc = 0.92
    for i, size in enumerate(SIZES):
        acc -= SENS[i] * (1.0 - c.widths.get(f"g{i}", size) / size) ** 2
    for spec in c.bits.values():
        acc -= 0.01 * (8 - (spec.w_bits or 8)) / 2
    return max(0.0, acc)


class FakeEvaluator:
    """Accuracy from the widths; counts calls; optionally reports intermediate values or fails."""

    def __init__(self, name: str = "fake", fail_on: tuple[int, ...] = (), interrupt_on: tuple[int, ...] = (),
                 reports_intermediate: bool = False) -> None:
        self.name = name
        self.reports_intermediate = reports_intermediate
        self.calls = 0
        self.fail_on = fail_on
        self.interrupt_on = interrupt_on

    def evaluate(self, module: nn.Module, *, key: str | None = None, report: Any = None) -> EvalResult:
        self.calls += 1
        if self.calls in self.interrupt_on:
            raise KeyboardInterrupt
        if self.calls in self.fail_on:
            raise RuntimeError("evaluator exploded")
        acc = fake_accuracy(module.candidate)  # type: ignore[attr-defined]
        if report is not None:
            for step in (1, 2, 3):
                if report(step, acc * step / 3):
                    return EvalResult(acc * step / 3, 1.0, 0.0, 0, self.name, {"pruned": True})
        return EvalResult(acc, 1.0 - acc, 0.0, 0, self.name, {})


class FakeProblem(Problem):
    """A :class:`Problem` with a bilinear closed-form cost and a fake evaluator (no engine)."""

    def cost(self, candidate: Candidate) -> CostReport:
        prev, macs, params, bits = 3, 0, 0, 0
        for i, size in enumerate(SIZES):
            w = candidate.widths.get(f"g{i}", size)
            p = 9 * prev * w
            macs += HW[i] * p
            params += p
            spec = candidate.bits.get(f"conv{i}")
            bits += p * (spec.w_bits if spec is not None and spec.w_bits else 32)
            prev = w
        macs += prev * 10
        params += prev * 10
        bits += 32 * prev * 10
        return CostReport(macs=macs, params=params, bytes=math.ceil(bits / 8))

    def build(self, candidate: Candidate) -> nn.Module:
        return _Built(candidate)


def make_space(quantize: bool = False, min_ratio: float = 0.25) -> SearchSpace:
    groups = tuple(GroupChoice(f"g{i}", s, tuple(range(1, s + 1)) if i < 2 else tuple(range(2, s + 1, 2)))
                   for i, s in enumerate(SIZES))
    layers = tuple(LayerChoice(f"conv{i}", w_bits=(2, 4, 8)) for i in range(len(SIZES))) if quantize else ()
    return SearchSpace(groups=groups, layers=layers, min_ratio=min_ratio)


def make_problem(evaluator: Any = None, quantize: bool = False) -> FakeProblem:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    x = torch.zeros(1, 3, 8, 8)
    model(x)
    # the model's real analysis; the space's ids (g0, g1, ...) are not its groups (the cost is the fake's own)
    return FakeProblem(model=model, groups=graph.analyze(model, x), space=make_space(quantize),
                       evaluator=evaluator or FakeEvaluator(), example_input=x)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store") / "trials.db"


def new_store(path: Path | None = None) -> TrialStore:
    """A fresh campaign: in this process's memory by default (fast), or in the SQLite file ``path``."""
    return TrialStore(path if path is not None else ":memory:", campaign=f"t-{uuid.uuid4().hex[:10]}")


def searcher_kwargs(name: str, **extra: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"budget": BUDGET}
    if name == "global_magnitude":
        rng = np.random.default_rng(0)
        kw["scores"] = {f"g{i}": rng.uniform(0.1, 1.0, s) for i, s in enumerate(SIZES)}
    elif name == "nsga2":
        kw["population_size"] = 4
    elif name == "tpe":
        kw["n_startup_trials"] = 2
    elif name == "gp":
        kw["n_startup_trials"] = 2 * N - 1  # one GP fit per 2N-trial run keeps the suite fast
    elif name in RL:
        kw.update(RL_TINY[name])
    kw.update(extra)
    return kw


def _run(name: str, store: TrialStore, n_trials: int, stop_after: int | None = None, **kw: Any
         ) -> tuple[Searcher, list[TrialRecord]]:
    def cb(s: Searcher, rec: TrialRecord) -> None:
        if stop_after is not None and s.n_done >= stop_after:
            s.stop()

    s = make_searcher(name, make_problem(), store=store, n_trials=n_trials, seed=7, callbacks=[cb],
                      **searcher_kwargs(name, **kw))
    res = s.run()
    return s, res.trials


def _check_trials(store: TrialStore, name: str, trials: list[TrialRecord]) -> None:
    space = make_space()
    problem = make_problem()
    limit = Budget.from_config(BUDGET).limit("macs", problem.dense_cost)
    df = store.to_dataframe(searcher=name)
    for rec in trials:
        space.validate(rec.candidate)
        row = df[df["number"] == rec.number].iloc[0]
        assert row["macs"] == problem.cost(rec.candidate).macs
        if row["feasible"]:
            assert rec.cost.macs <= limit
        else:
            assert rec.cost.macs > limit
        if rec.state == "complete" and row["feasible"]:
            assert rec.result is not None and rec.result.accuracy == pytest.approx(fake_accuracy(rec.candidate))


#: Searchers that train a real network (supernet / re-parametrised model) and need real loaders: their
#: behaviour is covered by their own suites; the fake problem here cannot feed them.
TRAINING_SEARCHERS = {"dmcp": "tests/test_dmcp.py", "resrep": "tests/test_resrep.py"}


def _skip_unavailable(name: str) -> None:
    if name in TRAINING_SEARCHERS:
        pytest.skip(f"{name} trains a real network and needs data loaders; covered by {TRAINING_SEARCHERS[name]}")
    if name in RL:
        pytest.importorskip("autoprune.envs", reason="the RL searchers need autoprune.envs")
    if name == "cmaes" and not is_available("cmaes"):
        pytest.skip("the `cmaes` package (needed by Optuna's CmaEsSampler) is not installed")


def registered() -> Iterator[str]:
    yield from SEARCHERS.names()


@pytest.mark.parametrize("name", list(registered()))
def test_contract_valid_budgeted_recorded_resumable_deterministic(name: str) -> None:
    """Run N, stop, resume to 2N (exactly 2N trials); identical to an uninterrupted 2N run when deterministic."""
    _skip_unavailable(name)
    store = new_store()
    first, trials1 = _run(name, store, 2 * N, stop_after=N)
    exhausted = first.stop_reason == "exhausted"
    assert first.stop_reason in ("stopped", "exhausted"), first.stop_reason
    assert len(trials1) == (len(trials1) if exhausted else N) >= 1
    second, trials2 = _run(name, store, 2 * N)
    numbers = [t.number for t in trials2]
    assert numbers == sorted(set(numbers)), "trial numbers are unique and ordered"
    if second.stop_reason == "exhausted":
        assert len(trials2) <= 2 * N
    else:
        assert second.stop_reason == "n_trials" and len(trials2) == 2 * N
    assert [t.candidate for t in trials2[:len(trials1)]] == [t.candidate for t in trials1], "finished trials kept"
    _check_trials(store, name, trials2)
    assert any(t.state == "complete" and t.result is not None for t in trials2)
    if SEARCHERS.get(name).deterministic:
        _, straight = _run(name, new_store(), 2 * N)
        assert [t.candidate.key() for t in straight] == [t.candidate.key() for t in trials2]


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes"])
def test_different_seeds_differ(name: str) -> None:
    _skip_unavailable(name)
    store = new_store()
    a = make_searcher(name, make_problem(), store=store, n_trials=3, seed=1, **searcher_kwargs(name)).run()
    b = make_searcher(name, make_problem(), store=store, n_trials=3, seed=2, **searcher_kwargs(name)).run()
    assert [t.candidate.key() for t in a.trials] != [t.candidate.key() for t in b.trials]
    assert sorted(store.study_names()) == [store.study_name(name, 1), store.study_name(name, 2)]


def test_cmaes_does_not_warn_about_constraints_on_every_trial() -> None:
    """The budget constraints are set on every trial; CMA-ES ignoring them is documented, not warned per trial."""
    _skip_unavailable("cmaes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = make_searcher("cmaes", make_problem(), store=new_store(), n_trials=4, seed=0,
                            **searcher_kwargs("cmaes")).run()
    assert len(res.trials) == 4
    assert not [w for w in caught if "CmaEsSampler will not use them" in str(w.message)]


def test_registry_and_errors() -> None:
    assert {"tpe", "cmaes", "optuna_random", "qmc", "gp", "nsga2", "uniform", "random", "global_magnitude",
            "sensitivity"} <= set(SEARCHERS.names())
    store = new_store()
    with pytest.raises(ConfigError, match="Did you mean 'tpe'"):
        make_searcher("tpee", make_problem(), store=store, n_trials=1)
    with pytest.raises(ConfigError, match="n_trials and/or time_limit"):
        make_searcher("tpe", make_problem(), store=store)
    with pytest.raises(ConfigError, match="cannot be met"):
        make_searcher("random", make_problem(), store=store, n_trials=1, budget={"macs": 0.01})
    with pytest.raises(ConfigError, match="unknown option"):
        make_searcher("tpe", make_problem(), store=store, n_trials=1, population_size=3)
    with pytest.raises(ConfigError, match="bad arguments for searcher 'sensitivity'"):  # **kwargs passed to the base
        make_searcher("sensitivity", make_problem(), store=store, n_trials=1, iters=3)
    with pytest.raises(ConfigError, match="unknown reward"):
        make_searcher("tpe", make_problem(), store=store, n_trials=1, objective="nope")
    with pytest.raises(ConfigError, match="unknown objective metric"):
        Objective(objectives=("accuracy", "speed"))
    if not is_available("cmaes"):
        with pytest.raises(AutoPruneError, match="cmaes"):
            make_searcher("cmaes", make_problem(), store=store, n_trials=1)
    assert load_hyperparams("tpe")["n_startup_trials"] == 10
    assert load_hyperparams("tpe", {"n_startup_trials": 3})["n_startup_trials"] == 3
    assert derive_seed(3, 4) == derive_seed(3, 4) != derive_seed(3, 5)


def test_budget_guard_repair_lands_just_under_the_budget() -> None:
    problem = make_problem()
    guard = BudgetGuard(problem, Budget(macs=0.5))
    limit = 0.5 * problem.dense_cost.macs
    rng = np.random.default_rng(0)
    for _ in range(20):
        ratios = rng.uniform(0.25, 1.0, len(SIZES))
        cand, info = guard.repair(ratios)
        macs = problem.cost(cand).macs
        assert macs <= limit
        if info["scale"] < 1.0:
            assert macs > 0.8 * limit  # shrunk just enough, not to the floor
    # a point inside the budget is left alone
    cand, info = guard.repair([0.3] * len(SIZES))
    assert info == {"scale": 1.0, "bit_cap": None, "repaired": False}


def test_budget_guard_caps_bits_only_when_widths_cannot_fit() -> None:
    problem = make_problem(quantize=True)
    dense_bytes = problem.dense_cost.bytes
    eight = {f"conv{i}": QuantSpec(8, None) for i in range(5)}
    # 8-bit weights at the smallest widths take 2.5 % of the dense size, 4-bit ones 1.7 %: a 2 % budget
    # needs a 4-bit cap, and then the widths grow back as far as the budget allows.
    guard = BudgetGuard(problem, Budget(size_bytes=0.02))
    cand, info = guard.repair([1.0] * 5, eight)
    assert problem.cost(cand).bytes <= 0.02 * dense_bytes
    assert info["bit_cap"] == 4 and all(b.w_bits == 4 for b in cand.bits.values())
    assert info["scale"] > 0.0
    loose = BudgetGuard(problem, Budget(size_bytes=0.2))
    cand, info = loose.repair([1.0] * 5, eight)
    assert info["bit_cap"] is None and all(b.w_bits == 8 for b in cand.bits.values())
    assert problem.cost(cand).bytes <= 0.2 * dense_bytes


def test_uniform_is_the_largest_common_ratio_within_budget() -> None:
    problem = make_problem()
    res = make_searcher("uniform", problem, store=new_store(), n_trials=5, budget=BUDGET).run()
    assert res.stop_reason == "exhausted" and len(res.trials) == 1
    cand = res.trials[0].candidate
    ratios = [cand.widths[f"g{i}"] / s for i, s in enumerate(SIZES)]
    assert max(ratios) - min(ratios) < 0.15  # one ratio, up to the legal-width grid
    limit = 0.5 * problem.dense_cost.macs
    assert problem.cost(cand).macs <= limit
    guard = BudgetGuard(problem, Budget(macs=0.5))
    r = float(np.mean(ratios))
    assert problem.cost(guard.candidate([min(1.0, r + 0.1)] * 5)).macs > limit


def test_global_magnitude_keeps_the_high_scoring_groups() -> None:
    scores = {f"g{i}": np.full(s, 1.0) for i, s in enumerate(SIZES)}
    scores["g4"] = np.concatenate([np.full(16, 10.0), np.full(16, 0.01)])  # half of g4 is clearly useless
    res = make_searcher("global_magnitude", make_problem(), store=new_store(), n_trials=3,
                        budget={"macs": 0.93}, scores=scores).run()
    cand = res.trials[0].candidate
    assert cand.widths["g4"] == 16  # exactly the useless half goes first ...
    assert all(cand.widths[f"g{i}"] == SIZES[i] for i in range(4))  # ... and that already meets 93 %
    with pytest.raises(ConfigError, match="scores"):
        make_searcher("global_magnitude", make_problem(), store=new_store(), n_trials=1,
                      scores={"g0": [1.0]})


def test_sensitivity_prunes_insensitive_groups_more() -> None:
    problem = make_problem()
    n_scan = 1 + 3 * len(SIZES)
    res = make_searcher("sensitivity", problem, store=new_store(), n_trials=100, budget=BUDGET).run()
    assert res.stop_reason == "exhausted" and len(res.trials) == n_scan + 1
    final = res.trials[-1]
    assert final.reason == "allocate:final"
    assert problem.cost(final.candidate).macs <= 0.5 * problem.dense_cost.macs
    r = {i: final.candidate.widths[f"g{i}"] / s for i, s in enumerate(SIZES)}
    assert r[1] <= r[0] and r[3] <= r[2]  # low-sensitivity groups give up more channels
    uni = make_searcher("uniform", problem, store=new_store(), n_trials=1, budget=BUDGET).run()
    assert final.result is not None and uni.best is not None and uni.best.result is not None
    assert final.result.accuracy > uni.best.result.accuracy
    # a trial budget smaller than the scan still ends with an allocation that meets the budget
    short = make_searcher("sensitivity", problem, store=new_store(), n_trials=4, budget=BUDGET).run()
    assert [t.reason for t in short.trials][-1] == "allocate:partial"
    assert problem.cost(short.trials[-1].candidate).macs <= 0.5 * problem.dense_cost.macs


def test_tpe_beats_nothing_but_finds_feasible_best_and_nsga2_gives_a_front() -> None:
    problem = make_problem()
    res = make_searcher("tpe", problem, store=new_store(), n_trials=8, n_startup_trials=3,
                        budget=BUDGET, seed=0).run()
    assert res.best is not None and res.best.reward == max(t.reward for t in res.trials if t.reward is not None)
    mo = make_searcher("nsga2", problem, store=new_store(), n_trials=8, population_size=4,
                       budget=BUDGET, objective={"objectives": ["accuracy", "macs"]}).run()
    assert mo.pareto and all(p.result is not None for p in mo.pareto)
    accs = [p.result.accuracy for p in mo.pareto if p.result is not None]
    macs = [p.cost.macs for p in mo.pareto]
    order = np.argsort(macs)
    assert all(np.diff(np.asarray(accs)[order]) >= 0)  # on a front, more MACs buys more accuracy


def test_without_repair_over_budget_points_are_recorded_not_evaluated() -> None:
    ev = FakeEvaluator()
    problem = make_problem(ev)
    store = new_store()
    res = make_searcher("optuna_random", problem, store=store, n_trials=6, budget={"macs": 0.3}, repair=False).run()
    states = [t.state for t in res.trials]
    assert "infeasible" in states
    assert ev.calls == states.count("complete")
    df = store.to_dataframe()
    assert (df[df["state"] == "infeasible"]["feasible"] == False).all()  # noqa: E712
    assert df[df["state"] == "infeasible"]["accuracy"].isna().all()


@pytest.mark.parametrize("sampler", ["tpe", "gp"])  # not `name`: the contract suite runs tests taking a name
def test_quantizing_space_proposes_legal_bits_within_a_size_budget(sampler: str) -> None:
    _skip_unavailable(sampler)
    problem = make_problem(quantize=True)  # gp: its model of the categorical bits is fitted after 2 trials
    res = make_searcher(sampler, problem, store=new_store(), n_trials=4, n_startup_trials=2,
                        budget={"size_bytes": 0.1}).run()
    for t in res.trials:
        problem.space.validate(t.candidate)
        assert set(t.candidate.bits) == {f"conv{i}" for i in range(5)}
        assert t.cost.bytes <= 0.1 * problem.dense_cost.bytes


def test_pruner_stops_reporting_evaluations() -> None:
    problem = make_problem(FakeEvaluator(name="finetune", reports_intermediate=True))
    s = make_searcher("tpe", problem, store=new_store(), n_trials=3, budget=BUDGET,
                      pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # every report is "too low"
    res = s.run()
    assert [t.state for t in res.trials] == ["pruned"] * 3
    # "auto" picks the median pruner for a reporting evaluator and none otherwise
    auto = make_searcher("tpe", problem, store=new_store(), n_trials=1, budget=BUDGET)
    assert isinstance(auto.make_pruner(), optuna.pruners.MedianPruner)
    plain = make_searcher("tpe", make_problem(), store=new_store(), n_trials=1, budget=BUDGET)
    assert plain.make_pruner() is None


def test_failed_evaluation_is_recorded_and_the_search_goes_on() -> None:
    problem = make_problem(FakeEvaluator(fail_on=(2,)))
    res = make_searcher("random", problem, store=new_store(), n_trials=3, budget=BUDGET).run()
    assert [t.state for t in res.trials] == ["complete", "failed", "complete"]
    assert "evaluator exploded" in res.trials[1].reason
    broken = make_problem(FakeEvaluator(fail_on=tuple(range(1, 10))))
    with pytest.raises(RuntimeError, match="in a row"):
        make_searcher("random", broken, store=new_store(), n_trials=5, budget=BUDGET, max_failures=2).run()


def test_keyboard_interrupt_is_clean_and_resumable() -> None:
    store = new_store()
    problem = make_problem(FakeEvaluator(interrupt_on=(3,)))
    res = make_searcher("tpe", problem, store=store, n_trials=4, budget=BUDGET, seed=3).run()
    assert res.stop_reason == "interrupted" and len(res.trials) == 2
    assert store.to_dataframe()["state"].tolist() == ["complete", "complete", "interrupted"]
    res2 = make_searcher("tpe", make_problem(), store=store, n_trials=4, budget=BUDGET, seed=3).run()
    assert res2.stop_reason == "n_trials" and len(res2.trials) == 4
    straight = make_searcher("tpe", make_problem(), store=new_store(), n_trials=4, budget=BUDGET, seed=3).run()
    assert [t.candidate.key() for t in straight.trials] == [t.candidate.key() for t in res2.trials]


def test_time_limit_stops_the_search() -> None:
    res = make_searcher("random", make_problem(), store=new_store(), time_limit=1e-6,
                        budget=BUDGET).run()
    assert res.stop_reason == "time_limit" and len(res.trials) <= 1


# ---------------------------------------------------------------------------------------------------------
# RL searchers


def test_rl_resume_loads_the_agent_and_continues_learning_with_amc_recipe(tmp_path: Path) -> None:
    """DDPG on a SQLite store: AMC's recipe is in place, and a new searcher resumes agent, buffer and noise."""
    pytest.importorskip("autoprune.envs", reason="the RL searchers need autoprune.envs")
    store = TrialStore(tmp_path / "rl.db", campaign="rl")
    kw = {"budget": BUDGET, "warmup_episodes": 1, "batch_size": 4}  # default 300×300 networks
    first = make_searcher("ddpg", make_problem(), store=store, n_trials=3, seed=1, **kw)
    res = first.run()
    assert res.stop_reason == "n_trials" and len(res.trials) == 3
    ep_len = len(SIZES)
    model = first.model
    assert model is not None
    assert model.learning_starts == ep_len and model.buffer_size == 100 * ep_len
    assert model.gamma == 1.0 and model.tau == 0.01 and model.batch_size == 4
    assert model.actor.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert model.critic.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert [m.out_features for m in model.actor.mu if isinstance(m, nn.Linear)] == [300, 300, 1]
    noise = model.action_noise
    assert noise.sigma0 == pytest.approx(1.0) and noise.decay == pytest.approx(0.95)  # 0.5 on [0, 1]
    assert noise.episode == 3 and noise.sigma == pytest.approx(0.95 ** 2)
    state = store.load_state("ddpg", 1, "agent")
    assert Path(state["agent"]).is_file() and Path(state["replay"]).is_file() and state["episodes"] == 3
    assert model.replay_buffer.size() >= 3 * ep_len - 1
    # a new process: re-open the store, resume to 5 episodes
    second = make_searcher("ddpg", make_problem(), store=TrialStore(tmp_path / "rl.db", campaign="rl"),
                           n_trials=5, seed=1, **kw)
    res2 = second.run()
    assert second.resumed_from["agent"] == state["agent"]
    assert [t.number for t in res2.trials] == [0, 1, 2, 3, 4]
    assert [t.candidate for t in res2.trials[:3]] == [t.candidate for t in res.trials]
    assert second.model is not None and second.model.num_timesteps > model.num_timesteps
    assert second.model.replay_buffer.size() > model.replay_buffer.size()  # the buffer was restored
    assert second.model.action_noise.episode == 5  # the exploration schedule continued too
    assert store.load_state("ddpg", 1, "agent")["episodes"] == 5
    assert isinstance(store.load_state("ddpg", 1, "reward_baseline"), float)


def test_rl_run_with_nothing_left_removes_checkpoints_the_store_does_not_name(tmp_path: Path) -> None:
    """A process killed while deleting its older checkpoints leaves some; a later run that has no episode left
    to play (the study is full) still removes them and keeps the checkpoint the store points at."""
    pytest.importorskip("autoprune.envs", reason="the RL searchers need autoprune.envs")
    kw = {"budget": BUDGET, "warmup_episodes": 1, "batch_size": 4, "net_arch": [8, 8]}
    store = TrialStore(tmp_path / "rl.db", campaign="rl")
    make_searcher("ddpg", make_problem(), store=store, n_trials=2, seed=0, **kw).run()
    state = store.load_state("ddpg", 0, "agent")
    directory = Path(state["agent"]).parent
    left_over = [directory / "replay_buffer-1-0123abcd.pkl", directory / "agent-1-0123abcd.zip",
                 directory / ".replay_buffer-1-0123abcd.pkl.999999999.tmp.pkl"]  # a writer no longer running
    for path in left_over:
        path.write_bytes(b"old")
    (directory / "notes.txt").write_text("not a checkpoint")
    again = make_searcher("ddpg", make_problem(), store=TrialStore(tmp_path / "rl.db", campaign="rl"),
                          n_trials=2, seed=0, **kw)
    res = again.run()
    assert res.stop_reason == "n_trials" and again.model is None  # nothing trained
    assert store.load_state("ddpg", 0, "agent") == state
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [Path(state["agent"]).name, Path(state["replay"]).name, "notes.txt"])


def test_truncated_normal_noise_stays_in_the_box_and_decays() -> None:
    from autoprune.agents.rl import TruncatedNormalDecayNoise

    noise = TruncatedNormalDecayNoise(1, sigma=1.0, decay=0.5, warmup_episodes=2, seed=0)
    draws = np.array([noise.perturb(np.array([0.9]))[0] for _ in range(2000)])
    assert draws.min() >= -1.0 and draws.max() <= 1.0
    assert 0.2 < draws.mean() < 0.6  # pulled towards the inside of the box by the truncation
    for _ in range(2):
        noise.reset()
    assert noise.sigma == 1.0  # still in the warm-up
    noise.reset()
    assert noise.sigma == 0.5
    small = TruncatedNormalDecayNoise(1, sigma=0.01, seed=0)
    assert abs(float(np.mean([small.perturb(np.array([0.0]))[0] for _ in range(200)]))) < 0.01
    with pytest.raises(ConfigError):
        TruncatedNormalDecayNoise(1, sigma=0.0)


def test_the_noise_floor_keeps_exploring_after_the_decay_and_old_checkpoints_have_none() -> None:
    import pickle

    from autoprune.agents.rl import TruncatedNormalDecayNoise

    floored = TruncatedNormalDecayNoise(2, sigma=1.0, decay=0.5, sigma_min=0.2, seed=0)
    for _ in range(10):
        floored.reset()
    assert floored.sigma == 0.2  # 0.5^10 would be 0.001
    draws = np.array([floored.perturb(np.zeros(2)) for _ in range(4000)])
    assert 0.18 < float(draws.std()) < 0.22
    with pytest.raises(ConfigError, match="noise_min"):
        TruncatedNormalDecayNoise(1, sigma=0.2, sigma_min=0.3)
    old = TruncatedNormalDecayNoise(1, sigma=1.0, decay=0.5, seed=0)
    del old.__dict__["sigma_min"]  # as unpickled from an agent saved before the floor existed
    back = pickle.loads(pickle.dumps(old))
    back.episode = 10
    assert back.sigma == 0.5 ** 10


def test_the_ddpg_noise_floor_comes_from_the_hyper_parameters_in_amcs_units() -> None:
    from autoprune.agents.rl import TruncatedNormalDecayNoise

    pytest.importorskip("autoprune.envs", reason="the RL searchers need autoprune.envs")
    agent = make_searcher("ddpg", make_problem(), store=new_store(), n_trials=2, budget=BUDGET, noise_min=0.05,
                          warmup_episodes=1, batch_size=4)
    agent.run()
    noise = agent.model.action_noise
    assert isinstance(noise, TruncatedNormalDecayNoise) and noise.sigma_min == pytest.approx(0.1)  # [0,1] → [-1,1]


@pytest.mark.parametrize("agent", ["ddpg", "td3"])
def test_self_imitation_keeps_the_best_episodes_pulls_the_actor_to_them_and_resumes(agent: str,
                                                                                   tmp_path: Path) -> None:
    """The elites are the top-k episodes by raw reward (warm-up included); an imitation step moves the actor's
    actions on their states towards theirs; the elites travel with the agent checkpoint."""
    pytest.importorskip("autoprune.envs", reason="the RL searchers need autoprune.envs")
    store = TrialStore(tmp_path / "rl.db", campaign="sil")
    fast_actor = {"actor_lr": 1e-2} if agent == "ddpg" else {"learning_rate": 1e-2}  # td3: one learning rate
    kw = {**RL_TINY[agent], "budget": BUDGET, "elite_episodes": 2, "imitation_weight": 1.0, **fast_actor}
    first = make_searcher(agent, make_problem(), store=store, n_trials=6, seed=3, **kw)
    res = first.run()
    model = first.model
    assert model is not None and model.elite_episodes == 2
    assert model.actor.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    rewards = sorted((t.reward for t in res.trials), reverse=True)
    assert [e[0] for e in model.elites] == pytest.approx(rewards[:2])  # raw rewards, not baseline-shaped ones
    for _, obs, act in model.elites:
        assert obs.shape == (len(SIZES), *model.observation_space.shape) and act.shape == (len(SIZES), 1)
        assert np.all(np.abs(act) <= 1.0)
    before = float(model.imitation_loss().detach())
    model.train(gradient_steps=200, batch_size=4)
    assert float(model.imitation_loss().detach()) < 0.5 * before
    # off: no elites are kept, no imitation loss
    plain = make_searcher(agent, make_problem(), store=new_store(), n_trials=3, seed=3,
                          **{**kw, "elite_episodes": 0})
    plain.run()
    assert plain.model.elites == [] and plain.model.imitation_loss() is None
    # resume: the elites come back with the agent and keep being updated
    second = make_searcher(agent, make_problem(), store=TrialStore(tmp_path / "rl.db", campaign="sil"),
                           n_trials=8, seed=3, **kw)
    res2 = second.run()
    assert second.resumed_from
    rewards2 = sorted((t.reward for t in res2.trials), reverse=True)
    assert [e[0] for e in second.model.elites] == pytest.approx(rewards2[:2])
    assert all(obs.shape[0] == act.shape[0] == len(SIZES) for _, obs, act in second.model.elites)  # whole episodes


def test_self_imitation_settings_are_checked_and_amcs_preset_turns_it_off() -> None:
    from autoprune.agents.rl import PRESETS

    pytest.importorskip("autoprune.envs", reason="the RL searchers need autoprune.envs")
    with pytest.raises(ConfigError, match="elite_episodes"):
        make_searcher("ddpg", make_problem(), store=new_store(), n_trials=1, budget=BUDGET,
                      elite_episodes=-1).run()
    assert PRESETS["amc"]["elite_episodes"] == 0 and PRESETS["amc"]["noise_min"] == 0.0
    amc = make_searcher("ddpg", make_problem(), store=new_store(), n_trials=2, budget=BUDGET, preset="amc",
                        warmup_episodes=1, batch_size=4)
    amc.run()
    assert amc.model.elite_episodes == 0 and amc.model.action_noise.sigma_min == 0.0
    with pytest.raises(ConfigError, match="actor_lr"):  # TD3 has one learning rate: not silently ignored
        make_searcher("td3", make_problem(), store=new_store(), n_trials=1, budget=BUDGET, actor_lr=1e-3)


def test_moving_average_baseline_shapes_the_terminal_reward() -> None:
    import gymnasium as gym

    from autoprune.agents.rl import MovingAverageBaseline

    class OneStep(gym.Env):
        observation_space = gym.spaces.Box(0, 1, (1,))
        action_space = gym.spaces.Box(-1, 1, (1,))

        def __init__(self) -> None:
            self.rewards = iter([1.0, 3.0, 3.0])

        def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
            return np.zeros(1, np.float32), {}

        def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
            return np.zeros(1, np.float32), next(self.rewards), True, False, {}

    env = MovingAverageBaseline(OneStep(), alpha=0.5)
    shaped = []
    for _ in range(3):
        env.reset()
        _, r, *_, info = env.step(np.zeros(1))
        shaped.append((r, info["raw_reward"]))
    # b: 1 → 1 + 0.5·(3 − 1) = 2 → 2.5
    assert shaped == [(0.0, 1.0), (2.0, 3.0), (1.0, 3.0)]
    with pytest.raises(ConfigError):
        MovingAverageBaseline(OneStep(), alpha=0.0)


@pytest.mark.parametrize("name", RL)
def test_rl_hyperparameter_files_load_and_unknown_keys_are_rejected(name: str) -> None:
    pytest.importorskip("autoprune.envs", reason="the RL searchers need autoprune.envs")
    hp = load_hyperparams(name)
    assert hp["gamma"] == 1.0 and "reward_baseline" in hp
    with pytest.raises(ConfigError, match="unknown hyper-parameter"):
        make_searcher(name, make_problem(), store=new_store(), n_trials=1, learning_rat=0.1)


def test_global_magnitude_with_the_engines_scores_on_a_real_model() -> None:
    """On a tiny real CNN the scores come from ``autoprune.importance`` and the candidate meets the budget."""
    from autoprune import graph
    from autoprune.search_spaces import build_space

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        model[0].weight[:8] *= 0.01  # half of the first layer's filters are tiny: those go first
    x = torch.rand(1, 3, 16, 16)
    groups = graph.analyze(model, x)
    space = build_space(groups, family="generic", min_ratio=0.25)

    class Scorer:
        name = "fake"

        def evaluate(self, module: nn.Module, *, key: str | None = None, report: Any = None) -> EvalResult:
            return EvalResult(0.5, 1.0, 0.0, 0, "fake", {})

    problem = Problem(model, groups, space, Scorer(), x, importance="l1")
    res = make_searcher("global_magnitude", problem, store=new_store(), n_trials=1, budget={"macs": 0.8}).run()
    cand = res.trials[0].candidate
    space.validate(cand)
    assert res.trials[0].cost.macs <= 0.8 * problem.dense_cost.macs
    first = next(g for g in space.groups if g.size == 16)
    second = next(g for g in space.groups if g.size == 32)
    # 20 % of the MACs go by removing 4 channels of the first group: the globally lowest-ranked are 4 of the
    # 8 tiny filters, so the first group shrinks and the second one is untouched.
    assert cand.widths[first.group_id] == 12 and cand.widths[second.group_id] == 32
    assert res.trials[0].result is not None and res.trials[0].result.accuracy == 0.5


def test_rl_searchers_leave_no_sb3_log_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SB3's default logger creates ``<tmp>/SB3-<timestamp>`` per ``learn``; the searchers use a silent one."""
    import tempfile

    pytest.importorskip("autoprune.envs", reason="the RL searchers need autoprune.envs")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name in ("ddpg", "ppo"):
        make_searcher(name, make_problem(), store=new_store(), n_trials=2, seed=0, **searcher_kwargs(name)).run()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("SB3-")]


def test_gp_sampler_runs_batched_without_the_greenlet_fallback_warning() -> None:
    """greenlet is a dependency, so Optuna's GP sampler does not fall back to (and warn about) sequential L-BFGS-B."""
    _skip_unavailable("gp")
    code = ("import optuna\n"
            "s = optuna.create_study(sampler=optuna.samplers.GPSampler(seed=0, n_startup_trials=2))\n"
            "s.optimize(lambda t: (t.suggest_float('x', 0, 1) - 0.3) ** 2, n_trials=4)\n"
            "print(len(s.trials))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "4"
    assert "greenlet" not in out.stderr, out.stderr


@pytest.mark.parametrize("agent", RL)  # not `name`: the searcher contract suite reruns `name` tests for plugins
def test_rl_searchers_search_the_bits_a_quantizing_space_holds(agent: str) -> None:
    problem = make_problem(quantize=True)
    s = make_searcher(agent, problem, store=new_store(), n_trials=2, budget=BUDGET, **RL_TINY[agent])
    assert s.mode == "joint"  # the mode follows the space: channel groups and layer bits
    assert s.hp["action_center"] == "uniform"  # measured default (docs/ALGORITHMS.md §1.2); AMC's map: middle
    res = s.run()
    assert res.trials
    for t in res.trials:
        assert set(t.candidate.bits) == {f"conv{i}" for i in range(5)}


@pytest.mark.parametrize("agent", RL)
def test_the_amc_preset_restores_amcs_action_map_and_user_keys_still_win(agent: str) -> None:
    problem = make_problem()
    amc = make_searcher(agent, problem, store=new_store(), n_trials=1, budget=BUDGET, preset="amc")
    assert amc.preset == "amc" and amc.hp["action_center"] == "middle"
    assert amc.make_env().unwrapped.action_center == "middle"
    mixed = make_searcher(agent, problem, store=new_store(), n_trials=1, budget=BUDGET, preset="amc",
                          action_center="uniform")
    assert mixed.hp["action_center"] == "uniform"  # a key the user sets beats the preset
    default = make_searcher(agent, problem, store=new_store(), n_trials=1, budget=BUDGET)
    assert default.preset == "default" and default.hp["action_center"] == "uniform"
    with pytest.raises(ConfigError, match="unknown preset 'haq'") as err:
        make_searcher(agent, problem, store=new_store(), n_trials=1, budget=BUDGET, preset="haq")
    assert "amc" in (err.value.hint or "")


@pytest.mark.parametrize("agent", ["ddpg", "ppo", "tpe"])
def test_a_reward_that_is_not_finite_stops_the_search_with_a_user_error(agent: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprune.objectives import REWARDS, Reward

    class Broken(Reward):
        name = "broken_test"

        def __call__(self, result: Any, cost: Any, dense: Any, budget: Any) -> float:
            return math.inf

    monkeypatch.setitem(REWARDS._items, "broken_test", Broken)
    s = make_searcher(agent, make_problem(), store=new_store(), n_trials=3, budget=BUDGET,
                      objective="broken_test", **RL_TINY.get(agent, {}))
    with pytest.raises(ConfigError, match="'broken_test' returned inf"):
        s.run()


def test_an_rl_mode_that_leaves_out_part_of_the_space_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="autoprune.agents.rl"):
        s = make_searcher("ddpg", make_problem(quantize=True), store=new_store(), n_trials=1, budget=BUDGET,
                          mode="prune")
    assert s.mode == "prune"
    assert "leaves out the search space's layer bit-widths" in caplog.text and "'joint'" in caplog.text
    assert make_searcher("ddpg", make_problem(), store=new_store(), n_trials=1, budget=BUDGET).mode == "prune"
    with pytest.raises(ConfigError, match="unknown environment mode 'both'"):
        make_searcher("ddpg", make_problem(), store=new_store(), n_trials=1, budget=BUDGET, mode="both")


def test_a_seed_that_is_not_an_integer_is_a_config_error() -> None:
    for bad in ("x", -1, 2**32, 1.5, True):
        with pytest.raises(ConfigError, match="seed must be an integer"):
            make_searcher("random", make_problem(), store=new_store(), n_trials=1, budget=BUDGET, seed=bad)
