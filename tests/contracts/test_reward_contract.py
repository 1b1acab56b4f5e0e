"""Contract of every registered reward (:data:`autoprune.objectives.REWARDS`).

Each reward is built by name through :func:`autoprune.objectives.make_reward` with its default parameters
(``REQUIRED`` supplies the parameters that have no default) and judged on a grid of accuracies × candidate costs
(every cost metric — MACs, parameters, bytes, BitOPs, latency — at fractions of a dense cost report) × budgets
(none, MACs, params + size, latency). It must:

* have a non-empty help line and carry its registered name;
* be finite for every grid point, and a pure function (same inputs, same value);
* never fall when accuracy rises at equal cost;
* never fall when any cost metric falls at equal accuracy (constrained rewards may be flat in cost within the
  budget; flat is allowed, a drop is not);
* have a finite failure value (:func:`autoprune.objectives.failure_reward`, the reward's ``worst``) that no
  candidate at or below the dense cost undercuts, feasible or not, whatever its accuracy;
* refuse unknown parameters with :class:`~autoprune.errors.ConfigError`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from typing import Any

import pytest

from autoprune.errors import ConfigError
from autoprune.objectives import REWARDS, Budget, Reward, failure_reward, make_reward
from autoprune.types import CostReport, EvalResult

from . import product_entries

NAMES = product_entries(REWARDS)

#: Constructor parameters without a default, per reward (everything else stays at its default).
REQUIRED: dict[str, dict[str, Any]] = {"haq": {"reference_accuracy": 0.9}}

DENSE = CostReport(macs=40_000_000, params=270_000, bytes=1_080_000, bitops=40_960_000_000,
                   payload_bits=8_640_000, latency_ms=4.0)
METRICS = ("macs", "params", "bytes", "bitops", "payload_bits", "latency_ms")
FRACTIONS = (0.1, 0.3, 0.5, 0.55, 0.8, 1.0)
ACCURACIES = (0.0, 0.05, 0.4, 0.5, 0.9, 0.99, 1.0)
BUDGETS = {
    "none": None,
    "macs": Budget(macs=0.5),
    "params+size": Budget(params=0.6, size_bytes=0.6),
    "latency": Budget(latency_ms=0.8),
}


def scaled(fraction: float, metrics: tuple[str, ...] = METRICS) -> CostReport:
    """The dense cost with ``metrics`` scaled by ``fraction`` (integers stay integers)."""
    changes = {m: (type(getattr(DENSE, m)))(getattr(DENSE, m) * fraction) for m in metrics}
    return replace(DENSE, **changes)


def result(acc: float) -> EvalResult:
    return EvalResult(accuracy=acc, loss=1.0, evaluator="contract")


def reward(name: str) -> Reward:
    return make_reward(name, **REQUIRED.get(name, {}))


def test_the_registry_has_the_builtin_rewards() -> None:
    assert {"r_err", "r_flops", "r_param", "accuracy", "constrained_accuracy", "weighted", "size_aware",
            "latency_aware", "haq"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_builds_by_name_with_defaults_and_has_help(name: str) -> None:
    cls = REWARDS.get(name)
    required = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.name != "self" and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = sorted(set(required) - set(REQUIRED.get(name, {})))
    assert not missing, f"reward {name!r} has parameters without a default {missing}: add them to REQUIRED"
    r = reward(name)
    assert isinstance(r, Reward) and type(r).name == name
    assert REWARDS.help(name).strip(), f"reward {name!r} has no help line (first docstring line)"


@pytest.mark.parametrize("budget", list(BUDGETS), ids=list(BUDGETS))
@pytest.mark.parametrize("name", NAMES)
def test_finite_and_pure(name: str, budget: str) -> None:
    r, b = reward(name), BUDGETS[budget]
    for acc in ACCURACIES:
        for f in FRACTIONS:
            value = r(result(acc), scaled(f), DENSE, b)
            assert isinstance(value, float) and math.isfinite(value), (acc, f, value)
            assert r(result(acc), scaled(f), DENSE, b) == value


@pytest.mark.parametrize("budget", list(BUDGETS), ids=list(BUDGETS))
@pytest.mark.parametrize("name", NAMES)
def test_higher_accuracy_never_lowers_the_reward(name: str, budget: str) -> None:
    r, b = reward(name), BUDGETS[budget]
    for f in FRACTIONS:
        values = [r(result(acc), scaled(f), DENSE, b) for acc in ACCURACIES]
        assert values == sorted(values), f"cost fraction {f}: rewards over accuracies {ACCURACIES}: {values}"


@pytest.mark.parametrize("budget", list(BUDGETS), ids=list(BUDGETS))
@pytest.mark.parametrize("name", NAMES)
def test_lower_cost_never_lowers_the_reward(name: str, budget: str) -> None:
    r, b = reward(name), BUDGETS[budget]
    for metrics in [METRICS, *((m,) for m in METRICS)]:
        for acc in ACCURACIES:
            values = [r(result(acc), scaled(f, metrics), DENSE, b) for f in FRACTIONS]  # cost rising
            assert values == sorted(values, reverse=True), (
                f"{'+'.join(metrics)} rising over {FRACTIONS} at accuracy {acc}: rewards {values}")


@pytest.mark.parametrize("budget", list(BUDGETS), ids=list(BUDGETS))
@pytest.mark.parametrize("name", NAMES)
def test_failure_reward_is_below_every_real_candidate(name: str, budget: str) -> None:
    b = BUDGETS[budget]
    worst = failure_reward(name, DENSE, b, **REQUIRED.get(name, {}))
    assert isinstance(worst, float) and math.isfinite(worst)
    assert worst == reward(name).worst(DENSE, b)
    r = reward(name)
    for metrics in [METRICS, *((m,) for m in METRICS)]:
        for acc in ACCURACIES:
            for f in FRACTIONS:
                value = r(result(acc), scaled(f, metrics), DENSE, b)
                assert worst <= value, f"failure {worst} above a candidate ({acc=}, {metrics} at {f}): {value}"


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameters_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError):
        make_reward(name, **REQUIRED.get(name, {}), no_such_parameter=1)
