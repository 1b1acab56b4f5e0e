"""Baseline searchers: ``uniform``, ``random``, ``global_magnitude`` and ``sensitivity``.

All four price candidates with the closed-form cost model and meet the budget before anything is evaluated:

* ``uniform`` — the same keep ratio in every group, the largest that meets the budget (bisection on the cost;
  one candidate).
* ``random`` — independent uniform keep ratios in [``min_ratio``, 1] (and uniform random bits), shrunk to the
  budget (:meth:`~autoprune.agents.base.BudgetGuard.repair`); trial ``k`` draws from a generator seeded by
  ``(seed, k)``, so a resumed search continues the same sequence.
* ``global_magnitude`` — one global ranking of channels across groups by magnitude scores normalised per group
  (score / group mean, ENGINE.md §3.2); the lowest-ranked channels are removed until the budget is met (one
  candidate).
* ``sensitivity`` — prune one group at a time to a few keep ratios (with every other group dense), score each,
  then allocate greedily: starting from the dense network, repeatedly lower the group whose next ratio costs
  the least accuracy per unit of budget gained, until the budget is met; the last step is refined by
  bisection so that the cost lands just under the budget.

When the search space also quantizes, baselines keep every layer at its highest weight bits and cap bits
uniformly only if no width assignment fits the budget (the repair rule). Their progress is a function of the
stored trials (each trial's ``reason`` names its phase), so they resume where they stopped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from autoprune.errors import ConfigError
from autoprune.problem import Problem
from autoprune.store import TrialStore
from autoprune.types import Candidate, QuantSpec

from .base import SEARCHERS, Searcher, derive_seed


def highest_bits(problem: Problem) -> dict[str, QuantSpec]:
    """Every quantizable layer at its highest weight bits and its last activation choice."""
    return {lc.layer: QuantSpec(w_bits=lc.w_bits[-1], a_bits=lc.a_bits[-1]) for lc in problem.space.layers}


@SEARCHERS.register("uniform")
class UniformSearcher(Searcher):
    """The same keep ratio in every group, the largest that meets the budget (one candidate)."""

    name = "uniform"

    def _run(self) -> None:
        if self.n_done >= 1 or self.should_stop():
            return
        started = time.perf_counter()
        trial = self.new_trial()
        n = len(self.problem.space.groups)
        cand, info = self.guard.repair([1.0] * n, highest_bits(self.problem))
        ratio = self.guard.lo + info["scale"] * (1.0 - self.guard.lo)
        self.evaluate_and_record(trial, cand, started=started, reason="uniform",
                                 extra={"uniform_ratio": ratio, "repair_bit_cap": info["bit_cap"]})


@SEARCHERS.register("random")
class RandomSearcher(Searcher):
    """Independent uniform keep ratios (and random bits) per group, shrunk to the budget."""

    name = "random"

    def propose(self, index: int) -> tuple[Candidate, dict[str, Any]]:
        """The candidate of trial ``index`` (a function of ``(seed, index)`` only)."""
        rng = np.random.default_rng(derive_seed(self.seed, index))
        space = self.problem.space
        ratios = rng.uniform(self.guard.lo, 1.0, size=len(space.groups))
        bits = {lc.layer: QuantSpec(w_bits=int(rng.choice(lc.w_bits)),
                                    a_bits=lc.a_bits[int(rng.integers(len(lc.a_bits)))]) for lc in space.layers}
        cand, info = self.guard.repair(ratios.tolist(), bits)
        return cand, {"repair_scale": info["scale"], "repair_bit_cap": info["bit_cap"]}

    def _run(self) -> None:
        while not self.should_stop():
            started = time.perf_counter()
            cand, extra = self.propose(self.n_done)
            trial = self.new_trial()
            self.evaluate_and_record(trial, cand, started=started, reason="random", extra=extra)


# ---------------------------------------------------------------------------------------------------------
# Global magnitude


def engine_channel_scores(problem: Problem, criterion: str | None = None) -> dict[str, np.ndarray]:
    """Per-channel importance of every search-space group from the engine (:mod:`autoprune.importance`).

    Args:
        problem: The problem (its dense model and group analysis are scored).
        criterion: Importance criterion name (default: the problem's own, so that the global ranking and the
            channels the engine keeps agree).
    """
    from autoprune.importance import group_scores

    ids = [g.group_id for g in problem.space.groups]
    raw = group_scores(problem.model, problem.groups, ids, criterion or problem.importance)
    return {gid: raw[gid].detach().cpu().double().numpy() for gid in ids}


@SEARCHERS.register("global_magnitude")
class GlobalMagnitudeSearcher(Searcher):
    """One global ranking of channels by per-group-normalised magnitude, pruned until the budget is met.

    Args:
        problem: The compression problem.
        scores: Per-channel scores ``{group_id: array of length size}`` (default: the engine's ``criterion``).
        criterion: Engine importance criterion used when ``scores`` is not given (default: the problem's).
        **kwargs: :class:`~autoprune.agents.base.Searcher` arguments.
    """

    name = "global_magnitude"

    def __init__(self, problem: Problem, *, scores: Mapping[str, Sequence[float]] | None = None,
                 criterion: str | None = None, **kwargs: Any) -> None:
        super().__init__(problem, **kwargs)
        raw = dict(scores) if scores is not None else engine_channel_scores(problem, criterion)
        self.scores: dict[str, np.ndarray] = {}
        for g in problem.space.groups:
            if g.group_id not in raw:
                raise ConfigError(f"no channel scores for group {g.group_id!r}", hint="give one array per group")
            s = np.abs(np.asarray(raw[g.group_id], dtype=float).reshape(-1))
            if s.size != g.size:
                raise ConfigError(f"group {g.group_id!r} has {g.size} channels but {s.size} scores")
            mean = s.mean()
            self.scores[g.group_id] = s / mean if mean > 0 else np.ones_like(s)

    def widths_at(self, tau: float) -> dict[str, int]:
        """Widths keeping, per group, the channels scoring above ``tau`` (rounded up to a legal width ≥ lo)."""
        out = {}
        for g in self.problem.space.groups:
            keep = int((self.scores[g.group_id] > tau).sum())
            floor = g.width_for_ratio(self.guard.lo)
            legal = [w for w in g.widths if w >= max(keep, floor, 1)]
            out[g.group_id] = legal[0] if legal else g.widths[-1]
        return out

    def allocate(self) -> tuple[Candidate, dict[str, Any]]:
        """The candidate at the smallest threshold that meets the budget."""
        bits = highest_bits(self.problem)
        taus = np.unique(np.concatenate([[-np.inf], *self.scores.values()]))
        if not self.guard.candidate_feasible(Candidate(self.widths_at(taus[-1]), bits)):
            ratios = [w / g.size for g, w in zip(self.problem.space.groups, self.widths_at(taus[-1]).values(),
                                                 strict=True)]
            cand, info = self.guard.repair(ratios, bits)
            return cand, {"threshold": float(taus[-1]), "repair_bit_cap": info["bit_cap"]}
        lo, hi = 0, len(taus) - 1  # feasible at hi; find the smallest feasible index
        while lo < hi:
            mid = (lo + hi) // 2
            if self.guard.candidate_feasible(Candidate(self.widths_at(taus[mid]), bits)):
                hi = mid
            else:
                lo = mid + 1
        return Candidate(self.widths_at(taus[hi]), bits), {"threshold": float(taus[hi])}

    def _run(self) -> None:
        if self.n_done >= 1 or self.should_stop():
            return
        started = time.perf_counter()
        cand, extra = self.allocate()
        trial = self.new_trial()
        self.evaluate_and_record(trial, cand, started=started, reason="global_magnitude", extra=extra)


# ---------------------------------------------------------------------------------------------------------
# Sensitivity scan + greedy allocation


@SEARCHERS.register("sensitivity")
class SensitivitySearcher(Searcher):
    """Per-group sensitivity scan (one group pruned at a time), then greedy allocation to the budget.

    The scan evaluates the dense network and then every ``(group, ratio)`` pair, ratio-major (every group at
    ``ratios[0]`` first), so that a scan cut short by the trial budget still covers every group. The
    allocation trial is proposed when the scan is complete or when one trial of the budget is left; missing
    scan points are filled with the mean accuracy drop of the other groups at that ratio.

    Args:
        problem: The compression problem.
        ratios: Keep ratios of the scan (each in [min_ratio, 1)).
        **kwargs: :class:`~autoprune.agents.base.Searcher` arguments.
    """

    name = "sensitivity"

    def __init__(self, problem: Problem, *, ratios: Sequence[float] = (0.5, 0.25, 0.75), **kwargs: Any) -> None:
        super().__init__(problem, **kwargs)
        lo = float(problem.space.min_ratio)
        bad = [r for r in ratios if not lo <= r < 1.0]
        if bad or not ratios:
            raise ConfigError(f"sensitivity ratios {list(ratios)} must be non-empty and in [{lo}, 1)",
                              hint="e.g. ratios=[0.5, 0.25, 0.75]")
        self.ratios = tuple(float(r) for r in ratios)
        self.bits = highest_bits(problem)
        self.plan = ["scan:dense"] + [f"scan:{i}:{r}" for r in self.ratios for i in range(len(problem.space.groups))]

    def _scan_candidate(self, item: str) -> Candidate:
        n = len(self.problem.space.groups)
        ratios = [1.0] * n
        if item != "scan:dense":
            _, i, r = item.split(":")
            ratios[int(i)] = float(r)
        return self.guard.candidate(ratios, self.bits)

    def _measured(self) -> dict[str, float]:
        assert self.study is not None
        out = {}
        for t in TrialStore.counted(self.study):
            if t.user_attrs.get("reason", "").startswith("scan:") and t.user_attrs.get("accuracy") is not None:
                out[t.user_attrs["reason"]] = float(t.user_attrs["accuracy"])
        return out

    def drops(self, measured: Mapping[str, float]) -> np.ndarray:
        """Accuracy drop per (group, level), levels ``[1.0, *sorted(ratios, reverse=True)]``; gaps filled."""
        n = len(self.problem.space.groups)
        levels = self.levels()
        dense = measured.get("scan:dense")
        d = np.full((n, len(levels)), np.nan)
        d[:, 0] = 0.0
        for j, r in enumerate(levels[1:], start=1):
            for i in range(n):
                acc = measured.get(f"scan:{i}:{r}")
                if acc is not None and dense is not None:
                    d[i, j] = dense - acc
            col = d[:, j]
            if np.isnan(col).all():
                known = [(d[i, k], 1.0 - levels[k]) for i in range(n) for k in range(1, len(levels))
                         if not np.isnan(d[i, k])]
                slope = float(np.mean([a / b for a, b in known])) if known else 0.0
                col[:] = slope * (1.0 - r)
            else:
                col[np.isnan(col)] = float(np.nanmean(col))
        return d

    def levels(self) -> list[float]:
        """Keep-ratio levels of the greedy allocation, from dense down."""
        return [1.0, *sorted(self.ratios, reverse=True)]

    def allocate(self, measured: Mapping[str, float]) -> tuple[Candidate, dict[str, Any]]:
        """Greedy allocation of the budget from the scan results."""
        d = self.drops(measured)
        levels = self.levels()
        n = len(self.problem.space.groups)
        idx = [0] * n

        def cand_for(ix: Sequence[int], override: tuple[int, float] | None = None) -> Candidate:
            ratios = [levels[k] for k in ix]
            if override is not None:
                ratios[override[0]] = override[1]
            return self.guard.candidate(ratios, self.bits)

        def violation(c: Candidate) -> float:
            return self.guard.violation(self.problem.cost(c))

        last = None
        while violation(cand_for(idx)) > 0:
            v0 = violation(cand_for(idx))
            best, best_score = None, np.inf
            for i in range(n):
                if idx[i] + 1 >= len(levels):
                    continue
                trial_idx = list(idx)
                trial_idx[i] += 1
                gain = v0 - violation(cand_for(trial_idx))
                if gain <= 0:
                    continue
                score = (d[i, idx[i] + 1] - d[i, idx[i]]) / gain
                if score < best_score:
                    best, best_score = i, score
            if best is None:  # every group at its lowest level and still over budget
                cand, info = self.guard.repair([levels[k] for k in idx], self.bits)
                return cand, {"greedy_steps": sum(idx), "repair_scale": info["scale"]}
            idx[best] += 1
            last = best
        if last is None:
            return cand_for(idx), {"greedy_steps": 0}
        # Refine the last move: the largest ratio between its new and its previous level that still fits.
        lo_r, hi_r = levels[idx[last]], levels[idx[last] - 1]
        for _ in range(20):
            mid = 0.5 * (lo_r + hi_r)
            if violation(cand_for(idx, (last, mid))) <= 0:
                lo_r = mid
            else:
                hi_r = mid
        return cand_for(idx, (last, lo_r)), {"greedy_steps": sum(idx)}

    def _run(self) -> None:
        assert self.study is not None
        while not self.should_stop():
            done = {t.user_attrs.get("reason", "") for t in TrialStore.counted(self.study)}
            pending = [item for item in self.plan if item not in done]
            if "allocate:final" in done:
                return  # scan complete and allocated: nothing left to propose
            started = time.perf_counter()
            if pending and not (self.remaining() == 1 and "scan:dense" in done):
                item = pending[0]
                trial = self.new_trial()
                self.evaluate_and_record(trial, self._scan_candidate(item), started=started, reason=item,
                                         evaluate_infeasible=True)
                continue
            cand, extra = self.allocate(self._measured())
            trial = self.new_trial()
            extra["scan_points"] = len(self.plan) - len(pending)
            self.evaluate_and_record(trial, cand, started=started, extra=extra,
                                     reason="allocate:partial" if pending else "allocate:final")
