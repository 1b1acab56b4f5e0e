"""The layer-wise compression environment: AMC-style pruning, HAQ-style quantization, or both.

:class:`LayerwiseCompressionEnv` is a Gymnasium environment in which an agent walks a model in execution
order and decides, one step at a time,

* ``mode="prune"``: a keep ratio per prunable channel group (one step per group, AMC);
* ``mode="quantize"``: a bit-width per conv/linear layer (one step per layer, HAQ);
* ``mode="joint"``: first a keep ratio per group, then bits per layer (``len(groups) + len(layers)`` steps).
  The action is 2-D (keep ratio, bits); the pruning steps read component 0 and the quantization steps read
  component 1, the other component is ignored. The observation carries both feature blocks and a phase flag
  (see :mod:`autoprune.envs.embedding`).

Actions live in ``Box(-1, 1)`` and are rescaled inside: a keep ratio ``a = lb + (1 − lb)(u + 1)/2`` with
``lb = space.min_ratio``, rounded to the nearest legal width of the group's grid (legal widths of the
search space within ``[ceil(lb·C), C]``); bits by equal-width bins of ``(u + 1)/2`` over the layer's
allowed bit choices (HAQ's mapping; ``None`` = float ranks above 8). Activation bits are taken from the same
action component as weight bits (one step per layer).

Budgets (:class:`autoprune.objectives.Budget`):

* **Widths — the autoprune rule (ALGORITHMS.md §1.2).** With ``legal_actions=True`` every pruning step is
  clipped to ``[w_lo, w_hi]`` on the group's grid, where ``w_hi`` is the largest width whose closed-form cost
  with every later group at its minimum width is within every width-dependent limit, and ``w_lo`` the smallest
  width whose cost with every later group at full width reaches a limit (keeps the episode from removing more
  than the budget needs). If ``w_lo > w_hi`` feasibility wins. MACs and params limits are two-sided; a size
  limit is two-sided in prune mode and one-sided in joint mode (priced with every layer at its lowest bits, so
  the bit legalizer can always finish the job). Both bounds are found by bisection on the monotone cost.
* **Bits — HAQ's post-episode legalizer (§2.2).** With ``bits_legalize=True`` and a size limit, after the
  last step weight bits are lowered one choice at a time, last layer first, sweep after sweep, until the
  exact packed size fits.
* **Feasibility.** At ``reset`` the smallest candidate of the search space is priced; if it misses a limit
  a :class:`~autoprune.errors.ConfigError` says so, with the minimum achievable cost.

Every intermediate step has reward 0. The final step builds the :class:`~autoprune.types.Candidate`, scores
it with ``problem.evaluate`` and returns the chosen reward. Its ``info`` holds the candidate (as a dict),
its cost and the dense cost, the evaluation (as a dict), the budget and its feasibility, the realised
actions and timing: ``env_seconds`` (environment logic over the whole episode: embedding, clipping, costs,
legalizer), ``build_seconds`` (building the pruned model, from the problem), ``evaluator_seconds`` and
``eval_seconds`` (their sum, the wall time of ``problem.evaluate``).

The environment talks to the engine only through the :class:`~autoprune.problem.Problem` seam
(``problem.space``, ``problem.cost``, ``problem.dense_cost``, ``problem.evaluate``; ``problem.model`` and
``problem.example_input`` are read once, lazily, for the static features). Nothing is built in ``__init__``.
For vectorised use (SB3 ``SubprocVecEnv``), :func:`make_env` returns a picklable factory that builds the
problem inside each worker, so the workers evaluate their candidates in parallel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from autoprune.errors import ConfigError
from autoprune.objectives import Budget, Reward, make_reward, reward_value
from autoprune.problem import GroupChoice, LayerChoice
from autoprune.types import Candidate, CostReport, QuantSpec

from .embedding import StateEmbedding

if TYPE_CHECKING:
    from autoprune.problem import ProblemLike

MODES: tuple[str, ...] = ("prune", "quantize", "joint")
#: Where an action of 0 lands (see :class:`LayerwiseCompressionEnv`).
ACTION_CENTERS: tuple[str, ...] = ("middle", "uniform")
#: Limits the width steps can enforce through the problem's cost (latency when the problem predicts it).
WIDTH_METRICS: tuple[str, ...] = ("macs", "params", "size_bytes", "latency_ms")


def keep_ratio(u: float, lb: float, center: float | None = None) -> float:
    """Rescale an action component ``u`` in [-1, 1] to a keep ratio in [lb, 1].

    Without ``center`` the map is linear (AMC's: ``u = 0`` is the middle of [lb, 1]); with it, piecewise linear
    so that ``u = 0`` is ``center`` ([-1, 0] → [lb, center], [0, 1] → [center, 1]).
    """
    u = float(u)
    if center is None:
        return lb + (1.0 - lb) * (u + 1.0) / 2.0
    c = min(1.0, max(lb, float(center)))
    return c + (c - lb) * u if u <= 0 else c + (1.0 - c) * u


def _bits_order(b: int | None) -> tuple[bool, int]:
    return (b is None, b or 0)


def pick_bits(choices: Sequence[int | None], u: float) -> int | None:
    """Map ``u`` in [-1, 1] to one of ``choices`` by equal-width bins (float ``None`` ranks highest)."""
    ordered = sorted(choices, key=_bits_order)
    a = (float(u) + 1.0) / 2.0
    return ordered[min(len(ordered) - 1, max(0, math.floor(a * len(ordered))))]


def legalize_bits(bits: Mapping[str, QuantSpec], layers: Sequence[LayerChoice],
                  size_of: Callable[[dict[str, QuantSpec]], float], limit: float) -> tuple[dict[str, QuantSpec], bool]:
    """HAQ's post-episode legalizer on weight bits (ALGORITHMS.md §2.2), over the search space's bit choices.

    Sweeps the layers from last to first, lowering each layer's weight bits by one allowed choice and
    re-pricing after every change, until ``size_of(bits) <= limit``. The algorithm is
    :func:`autoprune.quantization.legalize_bits`; this adapter passes the layers' choices and order.

    Args:
        bits: Current bits per layer name.
        layers: :class:`~autoprune.problem.LayerChoice` objects in execution order (their ``w_bits`` are the
            allowed choices; the lowest is the floor).
        size_of: Prices a bits mapping (e.g. exact packed bytes at the chosen widths).
        limit: The size limit.

    Returns:
        The new bits and whether the limit is met (``False`` when every layer is at its floor and the size
        still exceeds the limit — reported, not hidden, unlike the reference code).
    """
    from autoprune.quantization import legalize_bits as legalize

    return legalize(bits, size_of, limit, order=[lc.layer for lc in layers], kinds=("w",),
                    choices={lc.layer: lc.w_bits for lc in layers})


def _last_true(n: int, pred: Callable[[int], bool]) -> int:
    """Largest i in [0, n) with pred(i), for pred monotone True…False; -1 if none."""
    lo, hi = 0, n - 1
    best = -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if pred(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _first_true(n: int, pred: Callable[[int], bool]) -> int:
    """Smallest i in [0, n) with pred(i), for pred monotone False…True; n if none."""
    lo, hi = 0, n - 1
    best = n
    while lo <= hi:
        mid = (lo + hi) // 2
        if pred(mid):
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    return best


class LayerwiseCompressionEnv(gym.Env[np.ndarray, np.ndarray]):
    """Gymnasium environment: one step per channel group and/or layer, terminal reward from the evaluator.

    Args:
        problem: The :class:`~autoprune.problem.Problem`, or a view of one
            (:class:`~autoprune.problem.ProblemLike`).
        mode: ``"prune"``, ``"quantize"`` or ``"joint"`` (see the module docstring).
        reward: Name in :data:`autoprune.objectives.REWARDS` or a :class:`~autoprune.objectives.Reward`.
        reward_kwargs: Parameters of the reward.
        budget: A :class:`~autoprune.objectives.Budget` (or a mapping such as ``{"macs": 0.5}``).
        legal_actions: Clip pruning actions with the autoprune rule so every episode meets the width limits.
        bits_legalize: Lower weight bits after the episode until a size limit holds (quantize/joint modes).
        action_center: ``"middle"`` (AMC: an action of 0 keeps the middle of [lb, 1]) or ``"uniform"`` (an action of
            0 keeps the uniform keep ratio that meets the budget, so an untrained or exploring agent proposes
            allocations around the ``uniform`` baseline; the middle when nothing limits the widths).
        render_mode: Must be ``None`` (nothing to render).

    Raises:
        ConfigError: Unknown mode or reward, a render mode, or a search space with nothing to decide.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 - Gymnasium's class attribute

    def __init__(self, problem: ProblemLike, *, mode: str = "prune", reward: str | Reward = "r_err",
                 reward_kwargs: Mapping[str, Any] | None = None, budget: Budget | Mapping[str, float] | None = None,
                 legal_actions: bool = True, bits_legalize: bool = True, action_center: str = "middle",
                 render_mode: str | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"unknown environment mode {mode!r}", hint=f"choices: {', '.join(MODES)}")
        if action_center not in ACTION_CENTERS:
            raise ConfigError(f"unknown action_center {action_center!r}", hint=f"choices: {', '.join(ACTION_CENTERS)}")
        self.action_center = action_center
        self.center: float | None = None  # the keep ratio of action 0 ("uniform": set when the budget is known)
        if render_mode is not None:
            raise ConfigError(f"render_mode {render_mode!r} is not supported", hint="use render_mode=None")
        self.render_mode = render_mode
        self.problem = problem
        self.mode = mode
        self.reward_fn = make_reward(reward, **dict(reward_kwargs or {}))
        self.budget = Budget.from_config(budget)
        self.legal_actions = bool(legal_actions)
        self.bits_legalize = bool(bits_legalize)

        space = problem.space
        self.lb = float(space.min_ratio)
        self.groups = tuple(space.groups) if mode in ("prune", "joint") else ()
        self.layers = tuple(space.layers) if mode in ("quantize", "joint") else ()
        if not self.groups and mode != "quantize":
            raise ConfigError(f"mode {mode!r} needs prunable groups, but the search space has none",
                              hint="check the model's group analysis, or use mode='quantize'")
        if not self.layers and mode != "prune":
            raise ConfigError(f"mode {mode!r} needs quantizable layers, but the search space has none",
                              hint="build the search space with quantize=True, or use mode='prune'")
        self._grids = tuple(self._grid(g) for g in self.groups)
        self._steps = tuple([("prune", i) for i in range(len(self.groups))]
                            + [("quantize", j) for j in range(len(self.layers))])

        self.feature_names: tuple[str, ...] = StateEmbedding.names(mode)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(self.feature_names),), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2 if mode == "joint" else 1,), dtype=np.float32)

        self._prepared = False
        self._embedding: StateEmbedding | None = None
        self._dense: CostReport | None = None
        self._limits: dict[str, float] = {}
        self._min_bits = {lc.layer: QuantSpec(w_bits=min(lc.w_bits, key=_bits_order),
                                              a_bits=min(lc.a_bits, key=_bits_order)) for lc in self.layers}
        self._t = -1
        self._widths: dict[str, int] = {}
        self._bits: dict[str, QuantSpec] = {}
        self._trace: list[dict[str, Any]] = []
        self._env_seconds = 0.0

    # -- static set-up ---------------------------------------------------------------------------------
    def _grid(self, g: GroupChoice) -> tuple[int, ...]:
        floor = math.ceil(self.lb * g.size - 1e-9)
        grid = tuple(sorted(w for w in g.widths if floor <= w <= g.size))
        return grid or (int(g.size),)

    @property
    def episode_length(self) -> int:
        """Number of steps per episode."""
        return len(self._steps)

    @property
    def dense_cost(self) -> CostReport:
        """The problem's dense cost (read lazily)."""
        if self._dense is None:
            self._dense = self.problem.dense_cost
        return self._dense

    def _width_metrics(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(metrics for the upper bound, metrics for the lower bound) of the width steps."""
        if not self.legal_actions:
            return (), ()
        hi = tuple(m for m in WIDTH_METRICS if m in self._limits)
        lo = tuple(m for m in hi if not (m == "size_bytes" and self.mode == "joint"))
        return hi, lo

    def _primary(self) -> str:
        for m in WIDTH_METRICS:
            if m in self._limits:
                return m
        return "macs"

    def _prepare(self) -> None:
        if self._prepared:
            return
        dense = self.dense_cost
        if "latency_ms" in self.budget.metrics() and dense.latency_ms is None:
            raise ConfigError("the budget limits latency_ms, but this problem's cost model does not predict latency",
                              hint="give the problem a latency predictor (autoprune.latency_model; a campaign with "
                              "objective.budget.latency_ms builds one), or use a MACs/params/size budget")
        self._limits = self.budget.limits(dense)
        self._check_feasible(dense)
        if self.action_center == "uniform" and self.groups:
            self.center = self._uniform_ratio()
        self._embedding = StateEmbedding.from_problem(self.mode, self.problem, [g.group_id for g in self.groups],
                                                      [g.size for g in self.groups], [lc.layer for lc in self.layers])
        self._prepared = True

    def _uniform_ratio(self) -> float | None:
        """The largest common keep ratio whose candidate meets the width limits (bisection; None: no limit)."""
        metrics = tuple(m for m in WIDTH_METRICS if m in self._limits)
        if not metrics:
            return None
        bits = self._min_bits if "size_bytes" in metrics and self.mode == "joint" else None

        def fits(r: float) -> bool:
            widths = {g.group_id: min(grid, key=lambda w, t=r * g.size: (abs(w - t), w))
                      for g, grid in zip(self.groups, self._grids, strict=True)}
            c = self._cost(widths, bits)
            return all(self._metric(c, m) <= self._limits[m] for m in metrics)

        lo, hi = self.lb, 1.0
        if fits(hi):
            return None  # nothing to cut: the middle it is
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def minimal_candidate(self) -> Candidate:
        """The cheapest candidate this environment can produce (every step at its minimum)."""
        return Candidate(widths={g.group_id: grid[0] for g, grid in zip(self.groups, self._grids, strict=True)},
                         bits=dict(self._min_bits))

    def _check_feasible(self, dense: CostReport) -> None:
        lowest = self.problem.cost(self.minimal_candidate())
        for metric, limit in self._limits.items():
            value = lowest.metric(metric)
            base = dense.metric(metric)
            if value is not None and value > limit:
                share = f" ({value / base:.1%} of dense)" if base else ""
                raise ConfigError(
                    f"budget {metric} <= {limit:,.0f} is infeasible in mode {self.mode!r}: the minimum achievable "
                    f"{metric} of this search space is {value:,.0f}{share}",
                    hint="raise the budget, lower the search space's min_ratio, or allow lower bits")

    # -- cost helpers ----------------------------------------------------------------------------------
    def _cost(self, widths: Mapping[str, int], bits: Mapping[str, QuantSpec] | None = None) -> CostReport:
        return self.problem.cost(Candidate(widths=dict(widths), bits=dict(bits or {})))

    def _metric(self, cost: CostReport, metric: str) -> float:
        value = cost.metric(metric)
        return 0.0 if value is None else float(value)

    def _later(self, i: int, at: str) -> dict[str, int]:
        if at == "min":
            return {g.group_id: grid[0] for g, grid in zip(self.groups[i + 1:], self._grids[i + 1:], strict=True)}
        return {g.group_id: int(g.size) for g in self.groups[i + 1:]}

    def width_bounds(self, i: int) -> tuple[int, int]:
        """Legal ``(w_lo, w_hi)`` for group step ``i`` given the widths chosen so far (the autoprune rule)."""
        grid = self._grids[i]
        hi_metrics, lo_metrics = self._width_metrics()
        if not hi_metrics:
            return grid[0], grid[-1]
        gid = self.groups[i].group_id
        chosen = dict(self._widths)
        hi_bits = self._min_bits if "size_bytes" in hi_metrics and self.mode == "joint" else None
        later_min, later_full = self._later(i, "min"), self._later(i, "full")

        def fits(k: int) -> bool:
            c = self._cost({**chosen, gid: grid[k], **later_min}, hi_bits)
            return all(self._metric(c, m) <= self._limits[m] for m in hi_metrics)

        def reaches(k: int) -> bool:
            c = self._cost({**chosen, gid: grid[k], **later_full})
            return any(self._metric(c, m) >= self._limits[m] for m in lo_metrics)

        k_hi = max(_last_true(len(grid), fits), 0)
        k_lo = _first_true(len(grid), reaches) if lo_metrics else 0
        k_lo = min(k_lo, len(grid) - 1, k_hi)
        return grid[k_lo], grid[k_hi]

    # -- observations ----------------------------------------------------------------------------------
    def _dynamic_prune(self, i: int | None) -> list[float]:
        metric = self._primary()
        dense = max(self._metric(self.dense_cost, metric), 1e-12)
        target = min(1.0, self._limits[metric] / dense) if metric in self._limits else 1.0
        n = len(self.groups)
        k = n if i is None else i
        chosen = {g.group_id: self._widths[g.group_id] for g in self.groups[:k]}
        now = self._metric(self._cost({**chosen, **self._later(k - 1, "full")}), metric)
        if k < n:
            floor = self._metric(self._cost({**chosen, self.groups[k].group_id: self.groups[k].size,
                                             **self._later(k, "min")}), metric)
        else:
            floor = now
        prev = 1.0 if k == 0 else self._widths[self.groups[k - 1].group_id] / self.groups[k - 1].size
        return [1.0 - now / dense, (now - floor) / dense, prev, target]

    def _dynamic_quant(self, j: int | None) -> list[float]:
        widths = dict(self._widths)
        float_size = max(self._metric(self._cost(widths), "size_bytes"), 1e-12)
        n = len(self.layers)
        k = n if j is None else j
        so_far = {lc.layer: self._bits[lc.layer] for lc in self.layers[:k]}
        now = self._metric(self._cost(widths, so_far), "size_bytes")
        if k < n:
            lowest = {lc.layer: self._min_bits[lc.layer] for lc in self.layers[k + 1:]}
            floor = self._metric(self._cost(widths, {**so_far, **lowest}), "size_bytes")
        else:
            floor = now
        prev = 1.0 if k == 0 else ((self._bits[self.layers[k - 1].layer].w_bits or 8) / 8.0)
        dense_bytes = max(self._metric(self.dense_cost, "size_bytes"), 1e-12)
        target = min(1.0, self._limits["size_bytes"] / dense_bytes) if "size_bytes" in self._limits else 1.0
        return [1.0 - now / float_size, (now - floor) / float_size, prev, target]

    def _observe(self, terminal: bool = False) -> np.ndarray:
        assert self._embedding is not None
        if terminal:
            phase = self._steps[-1][0]
            index = None
        else:
            phase, index = self._steps[self._t]
        dyn = self._dynamic_prune(index) if phase == "prune" else self._dynamic_quant(index)
        return self._embedding.observation(phase, index, dyn)

    # -- Gymnasium API ---------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode (validates the budget on the first call; ``options`` is accepted and unused)."""
        super().reset(seed=seed)
        start = time.perf_counter()
        self._prepare()
        self._t = 0
        self._widths, self._bits, self._trace = {}, {}, []
        obs = self._observe()
        self._env_seconds = time.perf_counter() - start
        return obs, {"step": 0, "phase": self._steps[0][0], "episode_length": self.episode_length}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply one decision; the last step evaluates the candidate and returns the reward."""
        if self._t < 0 or self._t >= len(self._steps):
            raise RuntimeError("step() called before reset() or after the episode ended; call reset()")
        start = time.perf_counter()
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != self.action_space.shape or not np.all(np.isfinite(a)):
            raise ValueError(f"action must be {self.action_space.shape[0]} finite number(s) in [-1, 1], got {action!r}")
        a = np.clip(a, -1.0, 1.0)
        phase, index = self._steps[self._t]
        info = self._prune_step(index, float(a[0])) if phase == "prune" else self._quant_step(index, float(a[-1]))
        info["step"] = self._t
        self._trace.append(info)
        self._t += 1
        if self._t < len(self._steps):
            obs = self._observe()
            self._env_seconds += time.perf_counter() - start
            return obs, 0.0, False, False, dict(info)
        self._env_seconds += time.perf_counter() - start
        return self._finish()

    def _prune_step(self, i: int, u: float) -> dict[str, Any]:
        g, grid = self.groups[i], self._grids[i]
        target = keep_ratio(u, self.lb, self.center) * g.size
        proposed = min(grid, key=lambda w: (abs(w - target), w))
        lo, hi = self.width_bounds(i)
        width = min(max(proposed, lo), hi)
        self._widths[g.group_id] = width
        return {"phase": "prune", "group": g.group_id, "proposed": proposed, "width": width, "bounds": (lo, hi),
                "ratio": width / g.size}

    def _quant_step(self, j: int, u: float) -> dict[str, Any]:
        lc = self.layers[j]
        spec = QuantSpec(w_bits=pick_bits(lc.w_bits, u), a_bits=pick_bits(lc.a_bits, u))
        self._bits[lc.layer] = spec
        return {"phase": "quantize", "layer": lc.layer, "bits": spec.to_dict()}

    def _final_candidate(self) -> tuple[Candidate, bool, bool]:
        """The episode's candidate after the bit legalizer: (candidate, legalized?, legalizer met the limit?)."""
        bits = dict(self._bits)
        changed, met = False, True
        if self.layers and self.bits_legalize and "size_bytes" in self._limits:
            widths = dict(self._widths)
            limit = self._limits["size_bytes"]
            new_bits, met = legalize_bits(bits, self.layers,
                                          lambda b: self._metric(self._cost(widths, b), "size_bytes"), limit)
            changed = new_bits != bits
            bits = new_bits
        return Candidate(widths=dict(self._widths), bits=bits), changed, met

    def _finish(self) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        start = time.perf_counter()
        candidate, legalized, legal_ok = self._final_candidate()
        self._widths, self._bits = dict(candidate.widths), dict(candidate.bits)
        obs = self._observe(terminal=True)
        self._env_seconds += time.perf_counter() - start
        t_eval = time.perf_counter()
        result, cost = self.problem.evaluate(candidate)
        eval_seconds = time.perf_counter() - t_eval
        start = time.perf_counter()
        dense = self.dense_cost
        feasible = self.budget.feasible(cost, dense)
        reward = reward_value(self.reward_fn, result, cost, dense, self.budget)
        self._env_seconds += time.perf_counter() - start
        build = float(result.extra.get("build_seconds", 0.0)) if result.extra else 0.0
        info = {
            "step": len(self._steps) - 1,
            "candidate": candidate.to_dict(),
            "key": candidate.key(),
            "cost": cost.to_dict(),
            "dense_cost": dense.to_dict(),
            "eval": result.to_dict(),
            "reward": reward,
            "budget": self.budget.to_dict(),
            "limits": dict(self._limits),
            "feasible": bool(feasible),
            "legalized": legalized,
            "legalizer_met_limit": legal_ok,
            "trace": list(self._trace),
            "timing": {"env_seconds": self._env_seconds, "eval_seconds": eval_seconds, "build_seconds": build,
                       "evaluator_seconds": max(eval_seconds - build, 0.0)},
        }
        return obs, reward, True, False, info

    def render(self) -> None:
        """Nothing to render (``render_mode`` is always ``None``)."""
        return None


@dataclass(frozen=True)
class EnvFactory:
    """A picklable environment constructor for vectorised use (e.g. SB3 ``SubprocVecEnv``).

    Each call builds the problem (when given a factory) and the environment in the calling process, so a
    worker owns its model, data and evaluator and scores its candidates in parallel with the others.

    Attributes:
        problem: A zero-argument callable returning the problem (preferred: nothing large is pickled), or a
            picklable problem instance.
        env_kwargs: Keyword arguments of :class:`LayerwiseCompressionEnv`.
        threads: ``torch.set_num_threads`` in the worker (``None`` leaves it alone); one thread per worker
            keeps parallel workers from oversubscribing the cores.
    """

    problem: ProblemLike | Callable[[], ProblemLike]
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    threads: int | None = 1

    def __call__(self) -> LayerwiseCompressionEnv:
        """Build the environment."""
        if self.threads is not None:
            torch.set_num_threads(max(1, int(self.threads)))
        problem = self.problem() if callable(self.problem) and not hasattr(self.problem, "space") else self.problem
        return LayerwiseCompressionEnv(problem, **dict(self.env_kwargs))


def make_env(problem: ProblemLike | Callable[[], ProblemLike], *, threads: int | None = 1,
             **env_kwargs: Any) -> EnvFactory:
    """A picklable factory for :class:`LayerwiseCompressionEnv`.

    Args:
        problem: Zero-argument callable building the problem inside the worker (e.g. a module-level function or
            ``functools.partial``), or a problem instance.
        threads: Torch threads per worker (``None``: unchanged).
        **env_kwargs: Passed to the environment (``mode``, ``reward``, ``budget``, ...).

    Example:
        >>> from stable_baselines3.common.vec_env import SubprocVecEnv
        >>> venv = SubprocVecEnv([make_env(build_problem, mode="prune", budget={"macs": 0.5})] * 2)
    """
    return EnvFactory(problem=problem, env_kwargs=dict(env_kwargs), threads=threads)
