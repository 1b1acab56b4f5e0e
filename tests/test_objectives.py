"""Tests of budgets, the reward registry and constraints (autoprune.objectives)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoprune import objectives
from autoprune.errors import ConfigError
from autoprune.objectives import (
    BUDGET_METRICS,
    REWARDS,
    Budget,
    Reward,
    failure_reward,
    make_reward,
    reward_value,
)
from autoprune.types import COST_METRICS, CostReport, EvalResult

DENSE = CostReport(macs=40_000_000, params=270_000, bytes=1_080_000, bitops=40_000_000 * 1024, latency_ms=4.0)
HALF = CostReport(macs=20_000_000, params=150_000, bytes=300_000, bitops=20_000_000 * 256, latency_ms=2.5)


def res(acc: float) -> EvalResult:
    return EvalResult(accuracy=acc, loss=1.0 - acc, evaluator="test")


# --------------------------------------------------------------------------------------------------------
# Cost metrics and the budget


def test_cost_metrics_are_read_through_one_table() -> None:
    assert HALF.metric("size_bytes") == HALF.metric("bytes") == 300_000
    assert [HALF.metric(m) for m in ("macs", "params", "bitops")] == [HALF.macs, HALF.params, HALF.bitops]
    assert HALF.metric("latency_ms") == 2.5 and CostReport(macs=1, params=1, bytes=1).metric("latency_ms") is None
    with pytest.raises(ConfigError, match="flops") as exc:
        HALF.metric("flops")
    assert "size_bytes" in str(exc.value)
    # every budget key and every weighted-reward metric is a cost metric
    assert BUDGET_METRICS == ("macs", "params", "size_bytes", "latency_ms")
    assert set(BUDGET_METRICS) <= set(COST_METRICS)
    for metric in COST_METRICS:
        assert make_reward("weighted", metric=metric).metric == metric


def test_budget_fraction_and_absolute_limits() -> None:
    b = Budget(macs=0.5, params=100_000, size_bytes=1.0)
    assert b.metrics() == ("macs", "params", "size_bytes")
    assert b.limits(DENSE) == {"macs": 20_000_000, "params": 100_000, "size_bytes": 1_080_000}
    assert b.is_relative("macs") and not b.is_relative("params") and b.is_relative("size_bytes")
    assert Budget(params=150_000).feasible(HALF)  # absolute limits need no dense cost
    with pytest.raises(ConfigError, match="dense"):
        Budget(macs=0.5).feasible(HALF)
    assert Budget().is_empty() and Budget().feasible(HALF, DENSE)


def test_budget_feasible_violation_and_constraints() -> None:
    b = Budget(macs=0.5, params=0.5)
    assert b.feasible(HALF, DENSE) is False  # params 150k > 135k
    assert b.violation(HALF, DENSE) == pytest.approx(150_000 / 135_000 - 1)
    values = b.constraint_values(HALF, DENSE)
    assert values[0] == pytest.approx(0.0) and values[1] == pytest.approx(150_000 / 135_000 - 1)
    assert Budget(macs=0.6).violation(HALF, DENSE) == 0.0
    assert Budget(macs=0.5).feasible(HALF, DENSE)  # exactly on the limit is feasible


def test_budget_latency_needs_measurement() -> None:
    b = Budget(latency_ms=0.7)
    assert b.limit("latency_ms", DENSE) == pytest.approx(2.8)
    assert b.feasible(HALF, DENSE)
    unmeasured = CostReport(macs=1, params=1, bytes=4)
    with pytest.raises(ConfigError, match="latency"):
        b.feasible(unmeasured, DENSE)
    with pytest.raises(ConfigError, match="dense"):
        b.limit("latency_ms", unmeasured)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), True, "0.5"])
def test_budget_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ConfigError, match="budget"):
        Budget(macs=bad)  # type: ignore[arg-type]


def test_budget_from_config() -> None:
    assert Budget.from_config({"macs": 0.5, "size_bytes": 2_000_000}) == Budget(macs=0.5, size_bytes=2e6)
    assert Budget.from_config(None) == Budget()
    b = Budget(params=0.3)
    assert Budget.from_config(b) is b
    with pytest.raises(ConfigError, match="flops") as exc:
        Budget.from_config({"flops": 0.5})
    assert "macs" in str(exc.value)
    assert Budget(macs=0.5, params=None).to_dict() == {"macs": 0.5}
    with pytest.raises(ConfigError, match="no 'params' limit"):
        Budget(macs=0.5).limit("params", DENSE)


# --------------------------------------------------------------------------------------------------------
# Rewards against their formulas


def test_registry_names_and_help() -> None:
    expected = {"r_err", "r_flops", "r_param", "accuracy", "constrained_accuracy", "weighted", "size_aware",
                "latency_aware", "haq"}
    assert expected <= set(REWARDS.names())
    for name in expected:
        assert REWARDS.help(name), name
        assert issubclass(REWARDS.get(name), Reward)


def test_amc_rewards() -> None:
    r = res(0.9)
    assert make_reward("r_err")(r, HALF, DENSE, None) == pytest.approx(-0.1)
    assert make_reward("r_err", scale=100)(r, HALF, DENSE, None) == pytest.approx(-10.0)
    assert make_reward("r_flops")(r, HALF, DENSE, None) == pytest.approx(-0.1 * math.log(20_000_000))
    assert make_reward("r_param")(r, HALF, DENSE, None) == pytest.approx(-0.1 * math.log(150_000))
    # R_FLOPs prefers the cheaper model at equal error
    assert make_reward("r_flops")(r, HALF, DENSE, None) > make_reward("r_flops")(r, DENSE, DENSE, None)


def test_accuracy_and_constrained_accuracy() -> None:
    r = res(0.8)
    tight = Budget(macs=0.25)
    loose = Budget(macs=0.75)
    assert make_reward("accuracy")(r, HALF, DENSE, loose) == pytest.approx(0.8)
    assert make_reward("accuracy")(r, HALF, DENSE, tight) == 0.0
    assert make_reward("accuracy", infeasible=-1.0)(r, HALF, DENSE, tight) == -1.0
    ca = make_reward("constrained_accuracy", penalty=2.0)
    assert ca(r, HALF, DENSE, loose) == pytest.approx(0.8)
    assert ca(r, HALF, DENSE, tight) == pytest.approx(-2.0 * (20 / 10 - 1))
    slightly = Budget(macs=0.45)
    assert ca(r, HALF, DENSE, tight) < ca(r, HALF, DENSE, slightly) < 0 < ca(res(0.0), HALF, DENSE, loose) + 1e-12
    assert make_reward("accuracy")(r, HALF, DENSE, None) == pytest.approx(0.8)


def test_weighted_size_latency_and_haq() -> None:
    r = res(0.7)
    assert make_reward("weighted", lam=0.4)(r, HALF, DENSE, None) == pytest.approx(0.7 - 0.4 * 0.5)
    assert make_reward("weighted", lam=1.0, metric="params")(r, HALF, DENSE, None) == pytest.approx(
        0.7 - 150_000 / 270_000)
    assert make_reward("size_aware", lam=0.5)(r, HALF, DENSE, None) == pytest.approx(0.7 - 0.5 * 300_000 / 1_080_000)
    assert make_reward("latency_aware", lam=0.2)(r, HALF, DENSE, None) == pytest.approx(0.7 - 0.2 * 2.5 / 4.0)
    assert make_reward("weighted", metric="bitops", lam=1)(r, HALF, DENSE, None) == pytest.approx(0.7 - 0.125)
    with pytest.raises(ConfigError, match="latency"):
        make_reward("latency_aware")(r, CostReport(1, 1, 4), CostReport(2, 2, 8), None)
    assert make_reward("haq", reference_accuracy=0.75)(r, HALF, DENSE, None) == pytest.approx(10 * (0.7 - 0.75))


def test_make_reward_errors() -> None:
    with pytest.raises(ConfigError, match="r_flops"):
        make_reward("r_flop")
    with pytest.raises(ConfigError, match="bad parameters"):
        make_reward("r_err", lam=3)
    with pytest.raises(ConfigError, match="metric"):
        make_reward("weighted", metric="joules")
    with pytest.raises(ConfigError, match="reference_accuracy"):
        make_reward("haq", reference_accuracy=75.0)
    inst = make_reward("r_err")
    assert make_reward(inst) is inst
    with pytest.raises(ConfigError):
        make_reward(inst, scale=2)
    with pytest.raises(ValueError, match="accuracy"):
        inst(res(1.5), HALF, DENSE, None)


def test_failure_reward_values() -> None:
    assert failure_reward("r_err", DENSE) == -1.0
    assert failure_reward("r_flops", DENSE) == pytest.approx(-math.log(DENSE.macs))
    assert failure_reward("weighted", DENSE, lam=0.3) == pytest.approx(-0.3)
    assert failure_reward("constrained_accuracy", DENSE, Budget(macs=0.25), penalty=1.0) == pytest.approx(-3.0)
    assert failure_reward("haq", DENSE, reference_accuracy=0.9) == pytest.approx(-9.0)


CONFIGS = [("r_err", {}), ("r_flops", {}), ("r_param", {}), ("accuracy", {}), ("constrained_accuracy", {}),
           ("weighted", {"lam": 0.7}), ("size_aware", {}), ("latency_aware", {}),
           ("haq", {"reference_accuracy": 0.9})]


@settings(max_examples=200, deadline=None)
@given(acc=st.floats(0.0, 1.0), frac=st.floats(0.05, 1.0), budget_frac=st.floats(0.05, 1.0),
       which=st.sampled_from(CONFIGS))
def test_failure_never_beats_a_scored_candidate(acc: float, frac: float, budget_frac: float,
                                                which: tuple[str, dict]) -> None:
    name, kwargs = which
    cost = CostReport(macs=max(1, int(DENSE.macs * frac)), params=max(1, int(DENSE.params * frac)),
                      bytes=max(1, int(DENSE.bytes * frac)), bitops=max(1, int(DENSE.bitops * frac)),
                      latency_ms=DENSE.latency_ms * frac)
    budget = Budget(macs=budget_frac)
    reward = make_reward(name, **kwargs)
    assert failure_reward(reward, DENSE, budget) <= reward(res(acc), cost, DENSE, budget) + 1e-12


# --------------------------------------------------------------------------------------------------------
# The reward every searcher ranks by is checked


class _Fixed(Reward):
    """A plugin-like reward that returns whatever it was given."""

    name = "fixed_test"

    def __init__(self, value: object) -> None:
        self.value = value

    def __call__(self, result: EvalResult, cost: CostReport, dense: CostReport, budget: Budget | None) -> float:
        return self.value  # type: ignore[return-value]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.5x", None])
def test_a_reward_that_is_not_a_finite_number_is_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"'fixed_test' returned .* a reward must be a finite number") as err:
        reward_value(_Fixed(bad), res(0.8), HALF, DENSE, None)
    assert err.value.hint


def test_a_reward_out_of_scale_is_reported_once_and_built_ins_stay_in_scale(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objectives, "_SCALE_REPORTED", set())
    with caplog.at_level("WARNING", logger="autoprune.objectives"):
        assert reward_value(_Fixed(-42.0), res(0.8), HALF, DENSE, None) == -42.0  # in scale: silent
        assert not caplog.records
        assert reward_value(_Fixed(-4200.0), res(0.8), HALF, DENSE, None) == -4200.0  # accuracy in percent × …
        assert reward_value(_Fixed(-4300.0), res(0.8), HALF, DENSE, None) == -4300.0
    assert len(caplog.records) == 1 and "unit mistake" in caplog.text
    big = CostReport(macs=10_000_000_000, params=25_000_000, bytes=100_000_000, bitops=10**13, latency_ms=50.0)
    for name in REWARDS.names():  # every built-in reward at its defaults, worst case (accuracy 0, huge network)
        r = make_reward(name, **({"reference_accuracy": 1.0} if name == "haq" else {}))
        value = reward_value(r, res(0.0), big, big, Budget(macs=0.5))
        assert abs(value) <= objectives.REWARD_SCALE, (name, value)
