"""Tests of the layer-wise compression environment (autoprune.envs) on a fast fake problem and on the engine."""

from __future__ import annotations

import math
import pickle
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torch import nn

from autoprune import graph
from autoprune._imports import is_available
from autoprune.agents.base import make_searcher
from autoprune.envs import ENV_IDS, LayerwiseCompressionEnv, legalize_bits, make_env
from autoprune.envs.embedding import PRUNE_STATIC, QUANT_STATIC, StateEmbedding, collect_layer_stats
from autoprune.envs.layerwise import keep_ratio, pick_bits
from autoprune.errors import ConfigError
from autoprune.objectives import Budget, Reward, make_reward
from autoprune.problem import GroupChoice, LayerChoice, SearchSpace
from autoprune.store import TrialStore
from autoprune.types import Candidate, CostReport, EvalResult, QuantSpec

# --------------------------------------------------------------------------------------------------------
# A fast fake problem: a 4-conv chain + linear head whose cost is bilinear in the group widths.


class TinyNet(nn.Module):
    """conv0 → conv1 (stride 2) → conv2 → conv3 → pool → fc, on 3×8×8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv0, self.conv1, self.conv2, self.conv3):
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


# (layer, input group or fixed channels, output group or fixed channels, kernel area, output h·w)
LAYERS = (
    ("conv0", 3, "conv0:out", 9, 64),
    ("conv1", "conv0:out", "conv1:out", 9, 16),
    ("conv2", "conv1:out", "conv2:out", 9, 16),
    ("conv3", "conv2:out", "conv3:out", 1, 16),
    ("fc", "conv3:out", 10, 1, 1),
)
SIZES = {"conv0:out": 8, "conv1:out": 16, "conv2:out": 16, "conv3:out": 32}


class FakeProblem:
    """A :class:`~autoprune.problem.ProblemLike` with a closed-form bilinear cost and a smooth fake accuracy."""

    def __init__(self, min_ratio: float = 0.2) -> None:
        self.model = TinyNet()
        self.example_input = torch.rand(1, 3, 8, 8)
        groups = []
        for gid, size in SIZES.items():
            widths = tuple(sorted({w for w in range(2, size + 1, 2) if w >= math.ceil(min_ratio * size)} | {size}))
            groups.append(GroupChoice(gid, size, widths))
        layers = [LayerChoice(name) for name, *_ in LAYERS]
        layers[0] = LayerChoice("conv0", w_bits=(8,))
        layers[-1] = LayerChoice("fc", w_bits=(8,))
        self.space = SearchSpace(groups=tuple(groups), layers=tuple(layers), min_ratio=min_ratio)
        self.calls = 0
        self._dense: CostReport | None = None

    @property
    def groups(self) -> graph.GroupSet:
        """The engine's analysis of the model, on each read (the environment reads it once; a traced graph
        does not pickle, and the fake must)."""
        return graph.analyze(self.model, self.example_input)

    def cost(self, candidate: Candidate) -> CostReport:
        macs = params = size = payload = 0
        for name, src, dst, k, hw in LAYERS:
            c_in = src if isinstance(src, int) else candidate.widths.get(src, SIZES[src])
            c_out = dst if isinstance(dst, int) else candidate.widths.get(dst, SIZES[dst])
            n = k * c_in * c_out
            macs += hw * n
            params += n + c_out
            spec = candidate.bits.get(name)
            if spec is None or spec.w_bits is None:
                size += 4 * (n + c_out)
                payload += 32 * n
            else:
                size += math.ceil(n * spec.w_bits / 8) + 2 * c_out + 4 * c_out
                payload += spec.w_bits * n
        return CostReport(macs=macs, params=params, bytes=size, payload_bits=payload)

    @property
    def dense_cost(self) -> CostReport:
        if self._dense is None:
            self._dense = self.cost(self.space.full())
        return self._dense

    def evaluate(self, candidate: Candidate) -> tuple[EvalResult, CostReport]:
        self.calls += 1
        ratios = [candidate.widths.get(g, s) / s for g, s in SIZES.items()]
        bits = [(8 - (spec.w_bits or 8)) / 6 for spec in candidate.bits.values()]
        acc = 0.3 + 0.6 * math.sqrt(sum(ratios) / len(ratios)) - 0.05 * (sum(bits) / max(len(bits), 1))
        acc = min(max(acc, 0.0), 1.0)
        return EvalResult(acc, 1.0 - acc, evaluator="fake", extra={"build_seconds": 0.0}), self.cost(candidate)


def build_fake_problem() -> FakeProblem:
    """Module-level factory (picklable by reference) for the vectorised-env test."""
    return FakeProblem()


def run_episode(env: gym.Env, actions: list[np.ndarray], seed: int | None = 0) -> tuple[list, list, dict]:
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    info: dict = {}
    for a in actions:
        obs, r, terminated, truncated, info = env.step(a)
        observations.append(obs)
        rewards.append(r)
        assert not truncated
        if terminated:
            break
    assert terminated
    return observations, rewards, info


def action_dim(mode: str) -> int:
    return 2 if mode == "joint" else 1


# --------------------------------------------------------------------------------------------------------
# Gymnasium contract


@pytest.mark.parametrize("mode", ["prune", "quantize", "joint"])
@pytest.mark.parametrize("budget", [None, {"macs": 0.5}, {"size_bytes": 0.3}])
def test_check_env_gymnasium_and_sb3(mode: str, budget: dict | None) -> None:
    if mode == "quantize" and budget and "macs" in budget:
        budget = {"size_bytes": 0.2}
    env = LayerwiseCompressionEnv(FakeProblem(), mode=mode, budget=budget)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(LayerwiseCompressionEnv(FakeProblem(), mode=mode, budget=budget), warn=True)


def test_spaces_and_feature_names() -> None:
    for mode, n_act in (("prune", 1), ("quantize", 1), ("joint", 2)):
        env = LayerwiseCompressionEnv(FakeProblem(), mode=mode)
        assert env.action_space.shape == (n_act,)
        assert float(env.action_space.low.min()) == -1.0 and float(env.action_space.high.max()) == 1.0
        assert env.observation_space.dtype == np.float32
        assert env.observation_space.shape == (len(env.feature_names),)
        assert len(set(env.feature_names)) == len(env.feature_names)
        assert env.render_mode is None
    assert LayerwiseCompressionEnv(FakeProblem(), mode="prune").episode_length == 4
    assert LayerwiseCompressionEnv(FakeProblem(), mode="quantize").episode_length == 5
    assert LayerwiseCompressionEnv(FakeProblem(), mode="joint").episode_length == 9


def test_init_builds_nothing() -> None:
    class Spy(FakeProblem):
        touched = 0

        @property
        def dense_cost(self) -> CostReport:
            Spy.touched += 1
            return super().dense_cost

    p = Spy()
    LayerwiseCompressionEnv(p, budget={"macs": 0.5})
    assert Spy.touched == 0 and p.calls == 0


def test_registered_ids_make() -> None:
    assert set(ENV_IDS) <= set(gym.registry)
    for env_id, n_act in (("autoprune/LayerwisePruning-v0", 1), ("autoprune/LayerwiseQuantization-v0", 1),
                          ("autoprune/JointCompression-v0", 2)):
        env = gym.make(env_id, problem=FakeProblem())
        assert env.action_space.shape == (n_act,)
        _, _, info = run_episode(env, [np.zeros(n_act, np.float32)] * env.unwrapped.episode_length)
        assert "candidate" in info
    env = gym.make("autoprune/LayerwiseCompression-v0", problem=FakeProblem(), mode="quantize")
    assert env.unwrapped.mode == "quantize"


def test_same_seed_same_episode() -> None:
    rng = np.random.default_rng(1)
    actions = [rng.uniform(-1, 1, 2).astype(np.float32) for _ in range(9)]
    env = LayerwiseCompressionEnv(FakeProblem(), mode="joint", budget={"macs": 0.4, "size_bytes": 0.2})
    obs_a, rew_a, info_a = run_episode(env, actions, seed=7)
    obs_b, rew_b, info_b = run_episode(env, actions, seed=7)
    for x, y in zip(obs_a, obs_b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert rew_a == rew_b
    assert info_a["candidate"] == info_b["candidate"] and info_a["trace"] == info_b["trace"]
    env.reset(seed=7)
    first = env.np_random.random()
    env.reset(seed=7)
    assert env.np_random.random() == first


def test_rewards_zero_until_terminal_and_formula() -> None:
    problem = FakeProblem()
    budget = Budget(macs=0.5)
    env = LayerwiseCompressionEnv(problem, mode="prune", reward="r_flops", budget=budget)
    _, rewards, info = run_episode(env, [np.array([0.3], np.float32)] * 4)
    assert rewards[:-1] == [0.0, 0.0, 0.0]
    cand = Candidate.from_dict(info["candidate"])
    result, cost = problem.evaluate(cand)
    expected = make_reward("r_flops")(result, cost, problem.dense_cost, budget)
    assert rewards[-1] == pytest.approx(expected)
    assert rewards[-1] == pytest.approx(-(1 - result.accuracy) * math.log(cost.macs))


def test_terminal_info_contents() -> None:
    problem = FakeProblem()
    env = LayerwiseCompressionEnv(problem, mode="joint", budget={"macs": 0.5, "size_bytes": 0.25})
    _, _, info = run_episode(env, [np.array([0.0, 1.0], np.float32)] * 9)
    cand = Candidate.from_dict(info["candidate"])
    problem.space.validate(cand)
    assert set(cand.widths) == set(SIZES) and len(cand.bits) == 5
    assert info["key"] == cand.key()
    assert info["cost"] == problem.cost(cand).to_dict()
    assert info["dense_cost"] == problem.dense_cost.to_dict()
    assert info["eval"]["evaluator"] == "fake" and 0 <= info["eval"]["accuracy"] <= 1
    assert info["feasible"] is True and info["budget"] == {"macs": 0.5, "size_bytes": 0.25}
    assert info["limits"]["macs"] == pytest.approx(0.5 * problem.dense_cost.macs)
    assert len(info["trace"]) == 9
    timing = info["timing"]
    assert timing["env_seconds"] > 0 and timing["eval_seconds"] >= 0
    assert set(timing) == {"env_seconds", "eval_seconds", "build_seconds", "evaluator_seconds"}
    assert problem.calls == 1


def test_observations_in_bounds_and_phase_flag() -> None:
    env = LayerwiseCompressionEnv(FakeProblem(), mode="joint", budget={"macs": 0.5})
    obs, _ = env.reset(seed=0)
    phase = env.feature_names.index("phase")
    seen = [obs]
    for _ in range(9):
        obs, *_ = env.step(env.action_space.sample())
        seen.append(obs)
    for o in seen:
        assert o.dtype == np.float32 and env.observation_space.contains(o)
    assert [o[phase] for o in seen[:4]] == [0.0] * 4
    assert all(o[phase] == 1.0 for o in seen[4:])


def test_dynamic_features_track_budget() -> None:
    env = LayerwiseCompressionEnv(FakeProblem(), mode="prune", budget={"macs": 0.5}, legal_actions=False)
    names = env.feature_names
    obs, _ = env.reset(seed=0)
    assert obs[names.index("reduced")] == 0.0
    assert obs[names.index("prev_ratio")] == 1.0
    assert obs[names.index("target")] == pytest.approx(0.5)
    rest0 = obs[names.index("rest")]
    obs, *_ = env.step(np.array([-1.0], np.float32))  # conv0 → smallest width 2 of 8
    assert obs[names.index("prev_ratio")] == pytest.approx(2 / 8)
    assert obs[names.index("reduced")] > 0.0
    assert obs[names.index("rest")] < rest0  # fewer groups left to remove cost


def test_static_features_follow_the_model() -> None:
    p = FakeProblem()
    stats = collect_layer_stats(p.model, p.example_input)
    assert list(stats) == ["conv0", "conv1", "conv2", "conv3", "fc"]
    assert stats["conv1"].macs == 16 * 9 * 8 * 16 and stats["conv1"].stride == 2
    assert stats["conv0"].in_hw == 64 and stats["conv1"].out_hw == 16
    assert stats["fc"].kind == "linear" and stats["fc"].stride == 0 and stats["fc"].macs == 320
    assert p.model.training  # training flag restored
    emb = StateEmbedding.from_problem("joint", p, list(SIZES), list(SIZES.values()), [n for n, *_ in LAYERS])
    g = emb.group_static
    assert g.shape == (4, len(PRUNE_STATIC)) and emb.layer_static.shape == (5, len(QUANT_STATIC))
    assert g.min() >= 0 and g.max() <= 1
    col = PRUNE_STATIC.index("c_out")  # sizes 8, 16, 16, 32 → min-max normalised
    np.testing.assert_allclose(g[:, col], [0.0, 1 / 3, 1 / 3, 1.0], rtol=1e-6)
    col = PRUNE_STATIC.index("stride")
    np.testing.assert_allclose(g[:, col], [0.0, 1.0, 0.0, 0.0])
    lin = QUANT_STATIC.index("q_is_linear")
    np.testing.assert_array_equal(emb.layer_static[:, lin], [0, 0, 0, 0, 1])


# --------------------------------------------------------------------------------------------------------
# Actions, clipping, budgets


def test_action_rescaling() -> None:
    assert keep_ratio(-1.0, 0.2) == pytest.approx(0.2)
    assert keep_ratio(1.0, 0.2) == pytest.approx(1.0)
    assert keep_ratio(0.0, 0.2) == pytest.approx(0.6)
    choices = (2, 3, 4, 5, 6, 7, 8)
    assert pick_bits(choices, -1.0) == 2 and pick_bits(choices, 1.0) == 8
    picked = [pick_bits(choices, u) for u in np.linspace(-1, 1, 7001)]
    counts = [picked.count(b) for b in choices]
    assert max(counts) - min(counts) <= 2  # equal-width bins (HAQ)
    assert pick_bits((4, None), 1.0) is None and pick_bits((4, None), -1.0) == 4


def test_a_centred_action_map_puts_action_zero_on_the_uniform_allocation() -> None:
    assert keep_ratio(0.0, 0.2, 0.7) == pytest.approx(0.7)
    assert keep_ratio(-1.0, 0.2, 0.7) == pytest.approx(0.2) and keep_ratio(1.0, 0.2, 0.7) == pytest.approx(1.0)
    assert keep_ratio(-0.5, 0.2, 0.7) == pytest.approx(0.45) and keep_ratio(0.5, 0.2, 0.7) == pytest.approx(0.85)
    problem = FakeProblem()
    env = LayerwiseCompressionEnv(problem, mode="prune", budget=Budget(macs=0.5), action_center="uniform")
    _, _, info = run_episode(env, [np.array([0.0], np.float32)] * 4)
    uniform = make_searcher("uniform", problem, store=TrialStore(":memory:", campaign="u"), n_trials=1,
                            budget={"macs": 0.5}).run().trials[0].candidate
    assert env.center is not None and 0.2 < env.center < 1.0
    assert info["cost"]["macs"] <= info["limits"]["macs"]
    widths = info["candidate"]["widths"]
    *first, last = list(widths)
    for gid in first:  # the uniform baseline's allocation, up to the grid ...
        assert abs(widths[gid] - uniform.widths[gid]) <= 2, (gid, widths[gid], uniform.widths[gid])
    assert widths[last] >= uniform.widths[last]  # ... and the last step spends what the budget still allows
    free = LayerwiseCompressionEnv(problem, mode="prune", action_center="uniform")
    free.reset(seed=0)
    assert free.center is None  # nothing limits the widths: AMC's middle
    with pytest.raises(ConfigError, match="action_center"):
        LayerwiseCompressionEnv(problem, mode="prune", action_center="left")


def test_unclipped_actions_map_to_nearest_legal_width() -> None:
    env = LayerwiseCompressionEnv(FakeProblem(), mode="prune")
    _, _, info = run_episode(env, [np.array([u], np.float32) for u in (-1.0, 1.0, 0.0, -1.0)])
    # sizes 8, 16, 16, 32; lb = 0.2 → ratios 0.2, 1.0, 0.6, 0.2; grids are even widths ≥ ceil(0.2·C)
    assert info["candidate"]["widths"] == {"conv0:out": 2, "conv1:out": 16, "conv2:out": 10, "conv3:out": 8}


def test_all_minimum_actions_land_just_under_the_budget() -> None:
    problem = FakeProblem()
    budget = Budget(macs=0.6)
    env = LayerwiseCompressionEnv(problem, mode="prune", budget=budget)
    _, _, info = run_episode(env, [np.array([-1.0], np.float32)] * 4)
    limit = info["limits"]["macs"]
    widths = dict(info["candidate"]["widths"])
    assert info["cost"]["macs"] <= limit
    # the lower bound kept the episode from removing more than needed: one grid step more on the last group
    # (or any group below full width) would break the budget, or the last group is already full
    last = "conv3:out"
    grid = problem.space.groups[-1].widths
    if widths[last] < grid[-1]:
        bigger = {**widths, last: grid[grid.index(widths[last]) + 1]}
        assert problem.cost(Candidate(widths=bigger)).macs > limit


def test_width_bounds_bracket_the_budget() -> None:
    problem = FakeProblem()
    env = LayerwiseCompressionEnv(problem, mode="prune", budget={"macs": 0.5})
    env.reset(seed=0)
    lo, hi = env.width_bounds(0)
    grid = problem.space.groups[0].widths
    assert grid[0] <= lo <= hi <= grid[-1]
    later_min = {g.group_id: g.widths[0] for g in problem.space.groups[1:]}
    limit = 0.5 * problem.dense_cost.macs
    assert problem.cost(Candidate(widths={"conv0:out": hi, **later_min})).macs <= limit
    if hi < grid[-1]:
        nxt = grid[grid.index(hi) + 1]
        assert problem.cost(Candidate(widths={"conv0:out": nxt, **later_min})).macs > limit


def test_infeasible_budget_names_minimum_cost() -> None:
    problem = FakeProblem()
    env = LayerwiseCompressionEnv(problem, mode="prune", budget={"macs": 0.01})
    minimal = problem.cost(env.minimal_candidate()).macs
    with pytest.raises(ConfigError, match="infeasible") as exc:
        env.reset(seed=0)
    assert f"{minimal:,.0f}" in str(exc.value) and "minimum achievable macs" in str(exc.value)
    assert exc.value.hint
    with pytest.raises(ConfigError, match="minimum achievable macs"):
        LayerwiseCompressionEnv(FakeProblem(), mode="quantize", budget={"macs": 0.9}).reset()


def test_latency_budget_without_latency_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="latency"):
        LayerwiseCompressionEnv(FakeProblem(), budget={"latency_ms": 0.5}).reset()


def test_bits_legalizer_meets_size_budget_last_layers_first() -> None:
    problem = FakeProblem()
    env = LayerwiseCompressionEnv(problem, mode="quantize", budget={"size_bytes": 0.18})
    _, _, info = run_episode(env, [np.array([1.0], np.float32)] * 5)  # every layer at its top bits
    assert info["legalized"] and info["legalizer_met_limit"] and info["feasible"]
    assert info["cost"]["bytes"] <= info["limits"]["size_bytes"]
    bits = info["candidate"]["bits"]
    assert bits["conv0"]["w_bits"] == 8 and bits["fc"]["w_bits"] == 8  # floors respected
    assert bits["conv3"]["w_bits"] <= bits["conv1"]["w_bits"]  # later layers were lowered first
    off = LayerwiseCompressionEnv(FakeProblem(), mode="quantize", budget={"size_bytes": 0.18}, bits_legalize=False)
    _, _, info = run_episode(off, [np.array([1.0], np.float32)] * 5)
    assert not info["legalized"] and not info["feasible"]


def test_legalize_bits_reports_failure_at_the_floor() -> None:
    layers = [LayerChoice("a", w_bits=(4, 8)), LayerChoice("b", w_bits=(2, 4, 8))]
    bits = {"a": QuantSpec(8), "b": QuantSpec(8)}

    def size(b: dict) -> float:
        return sum(s.w_bits for s in b.values())

    new, ok = legalize_bits(bits, layers, size, limit=12)  # last layer first: b 8 → 4 is enough
    assert ok and new == {"a": QuantSpec(8), "b": QuantSpec(4)}
    new, ok = legalize_bits(bits, layers, size, limit=11)  # one sweep: b → 4, then a → 4
    assert ok and new == {"a": QuantSpec(4), "b": QuantSpec(4)}
    new, ok = legalize_bits(bits, layers, size, limit=3)
    assert not ok and new == {"a": QuantSpec(4), "b": QuantSpec(2)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["prune", "quantize", "joint"]),
       metric=st.sampled_from(["macs", "params", "size_bytes"]),
       fraction=st.floats(0.02, 1.0),
       actions=st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=18, max_size=18))
def test_every_finished_episode_meets_the_budget_fake(mode: str, metric: str, fraction: float,
                                                      actions: list[float]) -> None:
    problem = FakeProblem()
    env = LayerwiseCompressionEnv(problem, mode=mode, budget={metric: fraction})
    limit = Budget(**{metric: fraction}).limit(metric, problem.dense_cost)
    try:
        env.reset(seed=0)
    except ConfigError as exc:  # only when even the smallest candidate misses the budget
        lowest = problem.cost(env.minimal_candidate())
        assert {"macs": lowest.macs, "params": lowest.params, "size_bytes": lowest.bytes}[metric] > limit
        assert "minimum achievable" in str(exc)
        return
    dim = action_dim(mode)
    info: dict = {}
    for t in range(env.episode_length):
        _, _, terminated, _, info = env.step(np.array(actions[dim * t: dim * t + dim], np.float32))
    assert terminated
    cost = CostReport(**info["cost"])
    assert {"macs": cost.macs, "params": cost.params, "size_bytes": cost.bytes}[metric] <= limit
    assert info["feasible"]
    problem.space.validate(Candidate.from_dict(info["candidate"]))


# --------------------------------------------------------------------------------------------------------
# Errors, pickling, vectorised use


def test_user_errors() -> None:
    with pytest.raises(ConfigError, match="mode"):
        LayerwiseCompressionEnv(FakeProblem(), mode="prunning")
    with pytest.raises(ConfigError, match="reward"):
        LayerwiseCompressionEnv(FakeProblem(), reward="r_flop")
    with pytest.raises(ConfigError, match="render_mode"):
        LayerwiseCompressionEnv(FakeProblem(), render_mode="human")
    with pytest.raises(ConfigError, match="budget key"):
        LayerwiseCompressionEnv(FakeProblem(), budget={"flops": 0.5})
    p = FakeProblem()
    p.space = SearchSpace(groups=p.space.groups)  # no layers
    with pytest.raises(ConfigError, match="quantizable layers"):
        LayerwiseCompressionEnv(p, mode="joint")
    env = LayerwiseCompressionEnv(FakeProblem())
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1, np.float32))
    env.reset()
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan], np.float32))
    with pytest.raises(ValueError, match="action"):
        env.step(np.zeros(2, np.float32))
    run_episode(env, [np.zeros(1, np.float32)] * 4)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1, np.float32))


def test_env_pickles_mid_episode() -> None:
    env = LayerwiseCompressionEnv(FakeProblem(), mode="joint", budget={"macs": 0.5})
    env.reset(seed=3)
    env.step(np.array([0.2, 0.1], np.float32))
    clone = pickle.loads(pickle.dumps(env))
    rest = [np.array([-0.5, 0.5], np.float32)] * 8
    out_a = [env.step(a)[1] for a in rest]
    out_b = [clone.step(a)[1] for a in rest]
    assert out_a == out_b


def test_subproc_vec_env_two_workers() -> None:
    from stable_baselines3.common.vec_env import SubprocVecEnv

    factory = make_env(build_fake_problem, mode="prune", budget={"macs": 0.5})
    assert pickle.loads(pickle.dumps(factory)) == factory
    # fork keeps this default-path test fast; the slow integration test uses the default start method
    venv = SubprocVecEnv([factory, factory], start_method="fork")
    try:
        obs = venv.reset()
        assert obs.shape == (2, len(venv.get_attr("feature_names")[0]))
        infos: list = []
        for _ in range(4):
            obs, rewards, dones, infos = venv.step(np.array([[-1.0], [1.0]], np.float32))
        assert dones.all() and rewards.shape == (2,)
        assert all(i["feasible"] for i in infos)
        assert infos[0]["candidate"] != infos[1]["candidate"]  # the workers ran their own episodes
    finally:
        venv.close()


# --------------------------------------------------------------------------------------------------------
# The real engine (cost model only, trivial evaluator); skipped until the engine modules exist.

ENGINE = all(is_available(m) for m in ("autoprune.graph", "autoprune.pruning", "autoprune.cost"))


class ConstantEvaluator:
    """Trivial evaluator: never builds anything expensive, scores every model 0.5."""

    def evaluate(self, model: nn.Module, *, key: str | None = None, report: object = None) -> EvalResult:
        return EvalResult(0.5, 0.5, evaluator="constant")


def _real_problem(model_name: str = "resnet20", quantize: bool = False, round_to: int = 1):
    from autoprune import graph
    from autoprune.models import build_model
    from autoprune.problem import Problem
    from autoprune.search_spaces import build_space

    model = build_model(model_name).eval()
    x = torch.rand(1, 3, 32, 32)
    gs = graph.analyze(model, x)
    space = build_space(gs, model_name=model_name, model=model, quantize=quantize, round_to=round_to)
    return Problem(model=model, groups=gs, space=space, evaluator=ConstantEvaluator(), example_input=x)


@pytest.fixture(scope="module")
def resnet20_problem():
    if not ENGINE:
        pytest.skip("engine modules (autoprune.graph/pruning/cost) not available yet")
    return _real_problem("resnet20", quantize=True)


class _CostOnly:
    """Wraps a real problem but skips building candidates (the property test prices thousands of them)."""

    def __init__(self, problem) -> None:
        self.inner = problem
        self.space = problem.space
        self.model, self.example_input, self.groups = problem.model, problem.example_input, problem.groups

    def cost(self, c: Candidate) -> CostReport:
        return self.inner.cost(c)

    @property
    def dense_cost(self) -> CostReport:
        return self.inner.dense_cost

    def evaluate(self, c: Candidate) -> tuple[EvalResult, CostReport]:
        return EvalResult(0.5, 0.5, evaluator="constant"), self.cost(c)


def test_real_engine_check_env_and_one_built_episode(resnet20_problem) -> None:
    env = LayerwiseCompressionEnv(resnet20_problem, mode="prune", budget={"macs": 0.5})
    gym_check_env(env, skip_render_check=True)
    _, rewards, info = run_episode(env, [np.array([0.0], np.float32)] * env.episode_length)
    assert info["feasible"] and info["cost"]["macs"] <= 0.5 * resnet20_problem.dense_cost.macs
    assert rewards[-1] == pytest.approx(-0.5)  # r_err with the constant evaluator
    assert info["timing"]["build_seconds"] > 0  # the pruned network was really built


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(["prune", "joint"]), fraction=st.floats(0.3, 0.95),
       data=st.data())
def test_every_finished_episode_meets_the_budget_real_engine(resnet20_problem, mode: str, fraction: float,
                                                             data: st.DataObject) -> None:
    problem = _CostOnly(resnet20_problem)
    metric = "macs" if mode == "prune" else data.draw(st.sampled_from(["macs", "size_bytes"]))
    env = LayerwiseCompressionEnv(problem, mode=mode, budget={metric: fraction})
    env.reset(seed=0)
    dim = action_dim(mode)
    actions = data.draw(st.lists(st.floats(-1, 1), min_size=env.episode_length * dim,
                                 max_size=env.episode_length * dim))
    info: dict = {}
    for t in range(env.episode_length):
        *_, info = env.step(np.array(actions[dim * t: dim * t + dim], np.float32))
    assert info["feasible"]
    limit = info["limits"][metric]
    assert {"macs": info["cost"]["macs"], "size_bytes": info["cost"]["bytes"]}[metric] <= limit


def test_a_broken_reward_stops_the_episode_before_an_agent_learns_from_it() -> None:
    class Broken(Reward):
        name = "broken_test"

        def __call__(self, result: Any, cost: Any, dense: Any, budget: Any) -> float:
            return math.nan

    env = LayerwiseCompressionEnv(FakeProblem(), mode="prune", reward=Broken(), budget=Budget(macs=0.5))
    with pytest.raises(ConfigError, match="'broken_test' returned nan"):
        run_episode(env, [np.array([0.0], np.float32)] * 4)
