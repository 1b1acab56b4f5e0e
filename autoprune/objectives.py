"""Budgets, rewards and constraints: how a scored candidate becomes one number for a searcher.

This module owns three things:

* :class:`Budget` — resource limits on MACs, parameters, storage bytes and latency, each given as a
  fraction of the dense model (``0 < x <= 1``) or as an absolute number (``x > 1``), resolved against the
  dense cost with :meth:`Budget.limits`.
* :data:`REWARDS` — a registry of reward functions with the uniform signature
  ``reward(result, cost, dense, budget) -> float`` (picked by name, parameters from the config through
  :func:`make_reward`), each formula written in its class docstring.
* Constraint helpers: :meth:`Budget.violation` (relative excess over the limits) and
  :meth:`Budget.constraint_values` (Optuna's ``constraints_func`` convention, ``<= 0`` means satisfied), and
  :func:`failure_reward` (the value given to candidates whose evaluation failed).

Conventions (ALGORITHMS.md): error ``Err = 1 - accuracy`` with accuracy in ``[0, 1]``; ``log`` is natural;
"FLOPs" in AMC's reward names means MACs here.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from autoprune.errors import ConfigError
from autoprune.registry import Registry
from autoprune.types import COST_METRICS, CostReport, EvalResult

log = logging.getLogger("autoprune.objectives")

#: Largest reward magnitude that fits the scale of every built-in reward at its defaults (``r_flops`` of a
#: 10-GMAC network is about −23) and that the RL agents' defaults assume (AMC's rewards are of order 1): a larger
#: one is reported once per reward, as a likely unit mistake (accuracy in percent, a cost in bytes, ...).
REWARD_SCALE = 100.0
_SCALE_REPORTED: set[str] = set()


@dataclass(frozen=True)
class Budget:
    """Resource limits for a compressed model.

    Every limit is either a fraction of the dense model's cost (``0 < x <= 1``) or an absolute number
    (``x > 1``: MACs, parameters, bytes, milliseconds). ``1`` therefore means "no larger than the dense
    model". Unset limits (``None``) are not enforced.

    This class is the one budget schema: its fields are the allowed keys (:data:`BUDGET_METRICS`, each a
    metric of :data:`~autoprune.types.COST_METRICS`) and :meth:`check_limit` the one rule for their values;
    the campaign config (``objective.budget``) is validated into this class.

    Attributes:
        macs: Multiply-accumulates per input (batch 1).
        params: Number of parameters.
        size_bytes: Storage in bytes (the exact packed size when quantized).
        latency_ms: Measured latency in milliseconds (needs a cost model that measures latency).

    Example:
        >>> Budget(macs=0.5).limits(dense)["macs"] == 0.5 * dense.macs
        True
    """

    macs: float | None = None
    params: float | None = None
    size_bytes: float | None = None
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            self.check_limit(f.name, getattr(self, f.name))

    @staticmethod
    def check_limit(metric: str, value: object, where: str | None = None) -> None:
        """Raise :class:`ConfigError` unless ``value`` is a valid limit: ``None`` or a finite number > 0.

        Args:
            metric: The budget key.
            value: Its value.
            where: Key path of the value in a config (e.g. ``"objective.budget.macs"``), named in the message.
        """
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            hint = "give a fraction of the dense model in (0, 1] or an absolute value > 1"
            if where is not None:
                raise ConfigError(f"{where}: must be > 0, got {value}", hint=hint)
            raise ConfigError(f"budget {metric}={value!r} is not a positive number", hint=hint)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Budget | None) -> Budget:
        """Build a budget from a mapping such as ``{"macs": 0.5}`` (``None`` gives an empty budget)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, Budget):
            return cfg
        unknown = sorted(set(cfg) - set(BUDGET_METRICS))
        if unknown:
            raise ConfigError(f"unknown budget key(s) {', '.join(map(repr, unknown))}",
                              hint=f"budget keys: {', '.join(BUDGET_METRICS)}")
        return cls(**{k: (None if v is None else float(v)) for k, v in cfg.items()})

    def metrics(self) -> tuple[str, ...]:
        """Names of the limits that are set, in field order."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is not None)

    def is_empty(self) -> bool:
        """True if no limit is set."""
        return not self.metrics()

    def is_relative(self, metric: str) -> bool:
        """True if the limit on ``metric`` is a fraction of the dense cost."""
        v = getattr(self, metric)
        return v is not None and v <= 1.0

    def limit(self, metric: str, dense: CostReport | None = None) -> float:
        """Absolute limit on ``metric``.

        Raises:
            ConfigError: If the limit is not set, or is a fraction and ``dense`` (or its value) is missing.
        """
        v = getattr(self, metric, None)
        if v is None:
            raise ConfigError(f"budget has no {metric!r} limit", hint=f"set limits: {', '.join(self.metrics())}")
        if v > 1.0:
            return float(v)
        base = None if dense is None else dense.metric(metric)
        if base is None:
            raise ConfigError(f"budget {metric}={v} is a fraction of the dense model, but the dense {metric} "
                              "is unknown", hint="pass the dense cost, or give an absolute limit (> 1)")
        return float(v) * base

    def limits(self, dense: CostReport | None = None) -> dict[str, float]:
        """Absolute limits of every metric that is set."""
        return {m: self.limit(m, dense) for m in self.metrics()}

    def _value(self, cost: CostReport, metric: str) -> float:
        value = cost.metric(metric)
        if value is None:
            raise ConfigError(f"the budget limits {metric}, but this cost report has no {metric}",
                              hint="measure latency (autoprune.latency) or drop the latency_ms limit")
        return float(value)

    def violation(self, cost: CostReport, dense: CostReport | None = None) -> float:
        """Largest relative excess over a limit: ``max_m (cost_m / limit_m - 1)``, or 0 when feasible."""
        worst = 0.0
        for m, lim in self.limits(dense).items():
            worst = max(worst, self._value(cost, m) / lim - 1.0)
        return worst

    def feasible(self, cost: CostReport, dense: CostReport | None = None) -> bool:
        """True if ``cost`` meets every limit (``dense`` is needed for fractional limits)."""
        return all(self._value(cost, m) <= lim for m, lim in self.limits(dense).items())

    def constraint_values(self, cost: CostReport, dense: CostReport | None = None) -> list[float]:
        """One value per limit, ``cost_m / limit_m - 1``: ``<= 0`` means satisfied (Optuna's convention)."""
        return [self._value(cost, m) / lim - 1.0 for m, lim in self.limits(dense).items()]

    def to_dict(self) -> dict[str, float]:
        """The limits that are set, as given (fractions stay fractions)."""
        return {m: float(getattr(self, m)) for m in self.metrics()}


#: The budget keys (the fields of :class:`Budget`), each a cost metric of :data:`~autoprune.types.COST_METRICS`.
BUDGET_METRICS: tuple[str, ...] = tuple(f.name for f in fields(Budget))


# ---------------------------------------------------------------------------------------------------------
# Rewards


class Reward(ABC):
    """A reward: maps an evaluated candidate to a scalar, higher is better.

    Subclasses implement :meth:`__call__` (with the formula in their docstring) and :meth:`worst`, the value
    of a useless candidate (accuracy 0 at dense cost), which :func:`failure_reward` hands to candidates whose
    evaluation failed so that a failure never scores above a real candidate.
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def __call__(self, result: EvalResult, cost: CostReport, dense: CostReport, budget: Budget | None) -> float:
        """The reward of ``result`` at ``cost``."""

    def worst(self, dense: CostReport, budget: Budget | None) -> float:
        """Reward of a zero-accuracy candidate at dense cost (a lower bound over real candidates)."""
        zero = EvalResult(accuracy=0.0, loss=math.inf, evaluator="failure")
        return self(zero, dense, dense, budget)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


REWARDS: Registry[type[Reward]] = Registry("reward")


def _error(result: EvalResult) -> float:
    """``1 − accuracy``, where accuracy is the result's ranking score (:attr:`EvalResult.ranking_score`: top-1
    unless the evaluator's ``score`` setting asks for another signal)."""
    acc = result.ranking_score
    if not math.isfinite(acc) or not 0.0 <= acc <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {acc!r}")
    return 1.0 - acc


def _budget(budget: Budget | None) -> Budget:
    return Budget() if budget is None else budget


@REWARDS.register("r_err")
class ErrorReward(Reward):
    """AMC's R_err = −Err, for the resource-constrained protocol (the environment enforces the budget).

    Args:
        scale: Multiplier (AMC's code uses ``0.01 * acc%``, i.e. a constant shift of ``-Err``).
    """

    name = "r_err"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)

    def __call__(self, result: EvalResult, cost: CostReport, dense: CostReport, budget: Budget | None) -> float:
        """``-scale * Err``."""
        return -self.scale * _error(result)


class _LogCostReward(Reward):
    metric: ClassVar[str] = "macs"

    def __call__(self, result: EvalResult, cost: CostReport, dense: CostReport, budget: Budget | None) -> float:
        value = float(cost.metric(self.metric) or 0.0)
        if value <= 0:
            raise ValueError(f"{self.metric} must be positive for a log-cost reward, got {value}")
        return -_error(result) * math.log(value)

    def worst(self, dense: CostReport, budget: Budget | None) -> float:
        """``-log(dense cost)`` (Err = 1 at dense cost)."""
        return -math.log(max(float(dense.metric(self.metric) or 0.0), 1.0))


@REWARDS.register("r_flops")
class FlopsReward(_LogCostReward):
    """AMC's R_FLOPs = −Err·log(MACs), for the accuracy-guaranteed protocol (no budget wall)."""

    name = "r_flops"
    metric = "macs"


@REWARDS.register("r_param")
class ParamReward(_LogCostReward):
    """AMC's R_Param = −Err·log(#params), the model-size counterpart of R_FLOPs."""

    name = "r_param"
    metric = "params"


@REWARDS.register("accuracy")
class AccuracyReward(Reward):
    """Plain accuracy with the budget as a hard constraint: ``acc`` if the budget is met, else ``infeasible``.

    Args:
        infeasible: Value of an over-budget candidate (default 0, the worst accuracy).
    """

    name = "accuracy"

    def __init__(self, infeasible: float = 0.0) -> None:
        self.infeasible = float(infeasible)

    def __call__(self, result: EvalResult, cost: CostReport, dense: CostReport, budget: Budget | None) -> float:
        """``acc`` if ``budget.feasible(cost)`` else ``infeasible``."""
        acc = 1.0 - _error(result)
        return acc if _budget(budget).feasible(cost, dense) else self.infeasible

    def worst(self, dense: CostReport, budget: Budget | None) -> float:
        """``min(0, infeasible)``."""
        return min(0.0, self.infeasible)


@REWARDS.register("constrained_accuracy")
class ConstrainedAccuracyReward(Reward):
    """Accuracy within budget, else a penalty proportional to the violation.

    ``R = acc`` if every limit holds, else ``R = -penalty * v`` with ``v = max_m (cost_m / limit_m - 1) > 0``
    (the relative excess over the tightest limit). Every feasible candidate (``R >= 0``) beats every
    infeasible one (``R < 0``), and among infeasible ones the smaller violation wins.

    Args:
        penalty: Slope of the penalty per unit of relative violation.
    """

    name = "constrained_accuracy"

    def __init__(self, penalty: float = 1.0) -> None:
        if penalty <= 0:
            raise ConfigError(f"penalty must be positive, got {penalty}")
        self.penalty = float(penalty)

    def __call__(self, result: EvalResult, cost: CostReport, dense: CostReport, budget: Budget | None) -> float:
        """``acc`` if feasible else ``-penalty * violation``."""
        acc = 1.0 - _error(result)
        v = _budget(budget).violation(cost, dense)
        return acc if v <= 0 else -self.penalty * v

    def worst(self, dense: CostReport, budget: Budget | None) -> float:
        """``-penalty * max(1, violation(dense))``."""
        try:
            v = _budget(budget).violation(dense, dense)
        except ConfigError:  # a limit the dense cost cannot be judged on (unmeasured latency)
            v = 0.0
        return -self.penalty * max(1.0, v)


@REWARDS.register("weighted")
class WeightedReward(Reward):
    """Scalarised trade-off: ``R = acc − λ · cost_m / dense_m``.

    Args:
        lam: Weight λ of the cost ratio.
        metric: ``macs`` (default), ``params``, ``size_bytes``, ``latency_ms`` or ``bitops``.
    """

    name = "weighted"
    default_metric: ClassVar[str] = "macs"

    def __init__(self, lam: float = 0.5, metric: str | None = None) -> None:
        metric = metric or self.default_metric
        if metric not in COST_METRICS:
            raise ConfigError(f"unknown cost metric {metric!r} for reward {self.name!r}",
                              hint=f"choices: {', '.join(COST_METRICS)}")
        if lam < 0:
            raise ConfigError(f"lam must be >= 0, got {lam}")
        self.lam = float(lam)
        self.metric = metric

    def ratio(self, cost: CostReport, dense: CostReport) -> float:
        """``cost_m / dense_m`` for the configured metric."""
        num, den = cost.metric(self.metric), dense.metric(self.metric)
        if num is None or den is None or den <= 0:
            raise ConfigError(f"reward {self.name!r} needs {self.metric} in both the candidate and dense cost",
                              hint="measure latency, or pick metric=macs|params|size_bytes|bitops")
        return float(num) / float(den)

    def __call__(self, result: EvalResult, cost: CostReport, dense: CostReport, budget: Budget | None) -> float:
        """``acc - lam * cost_m / dense_m``."""
        return (1.0 - _error(result)) - self.lam * self.ratio(cost, dense)

    def worst(self, dense: CostReport, budget: Budget | None) -> float:
        """``-lam`` (accuracy 0 at the dense cost ratio 1)."""
        return -self.lam


@REWARDS.register("size_aware")
class SizeAwareReward(WeightedReward):
    """``R = acc − λ · bytes / dense_bytes`` (the weighted reward on storage size)."""

    name = "size_aware"
    default_metric = "size_bytes"


@REWARDS.register("latency_aware")
class LatencyAwareReward(WeightedReward):
    """``R = acc − λ · latency / dense_latency`` (needs a cost model that measures latency)."""

    name = "latency_aware"
    default_metric = "latency_ms"


@REWARDS.register("haq")
class HaqReward(Reward):
    """HAQ's reward ``R = scale · (acc − acc_ref)``, the accuracy change against a reference model.

    Args:
        reference_accuracy: Accuracy of the uncompressed model on the same split (in [0, 1]).
        scale: Multiplier (HAQ uses 0.1 with accuracy in percent, i.e. 10 with accuracy in [0, 1]).
    """

    name = "haq"

    def __init__(self, reference_accuracy: float, scale: float = 10.0) -> None:
        if not 0.0 <= reference_accuracy <= 1.0:
            raise ConfigError(f"reference_accuracy must be in [0, 1], got {reference_accuracy}")
        self.reference_accuracy = float(reference_accuracy)
        self.scale = float(scale)

    def __call__(self, result: EvalResult, cost: CostReport, dense: CostReport, budget: Budget | None) -> float:
        """``scale * (acc - reference_accuracy)``."""
        return self.scale * ((1.0 - _error(result)) - self.reference_accuracy)


def make_reward(name: str | Reward, **kwargs: Any) -> Reward:
    """Instantiate the reward registered as ``name`` with parameters ``kwargs`` (a :class:`Reward` passes through).

    Raises:
        ConfigError: Unknown name (with the choices), or parameters the reward does not take.
    """
    if isinstance(name, Reward):
        if kwargs:
            raise ConfigError("reward parameters were given together with a reward instance",
                              hint="pass the parameters to the reward's constructor instead")
        return name
    cls = REWARDS.get(name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad parameters {sorted(kwargs)} for reward {name!r}: {exc}",
                          hint=f"{name}: {REWARDS.help(name)}") from None


def reward_value(reward: Reward, result: EvalResult, cost: CostReport, dense: CostReport,
                 budget: Budget | None) -> float:
    """``reward(result, cost, dense, budget)`` as a float, checked: every searcher ranks and every agent learns
    from this value, so a broken one is stopped here instead of silently poisoning the search.

    A value beyond :data:`REWARD_SCALE` is reported once per reward name and process (a warning on the
    ``autoprune.objectives`` logger): RL agents learn poorly from rewards far from order 1.

    Raises:
        ConfigError: The reward is not a finite number (NaN, ±inf, or not a number at all).
    """
    raw = reward(result, cost, dense, budget)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    name = getattr(reward, "name", "") or type(reward).__name__
    if not math.isfinite(value):
        raise ConfigError(f"reward {name!r} returned {raw!r} for a candidate with accuracy "
                          f"{result.accuracy:.4f} at {cost.macs:,} MACs: a reward must be a finite number",
                          hint="check the reward's formula and parameters (a plugin reward: its __call__); "
                          "built-in rewards: r_err, r_flops, r_param, accuracy, weighted, ...")
    if abs(value) > REWARD_SCALE and name not in _SCALE_REPORTED:
        _SCALE_REPORTED.add(name)
        log.warning("reward %r returned %.4g, beyond the scale of the built-in rewards (|r| <= %g): a unit mistake "
                    "(accuracy in percent, a cost not divided by the dense one) makes RL agents learn poorly; "
                    "scale it to order 1", name, value, REWARD_SCALE)
    return value


def failure_reward(reward: Reward | str, dense: CostReport, budget: Budget | None = None, **kwargs: Any) -> float:
    """The reward given to a candidate whose build or evaluation failed.

    It is the reward's :meth:`Reward.worst` value (accuracy 0 at dense cost), so a failure never ranks above
    a candidate that was actually scored.
    """
    return make_reward(reward, **kwargs).worst(dense, budget)
