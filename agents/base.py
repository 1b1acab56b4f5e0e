"""The searcher interface: one small base class, a registry of searchers, and the shared budget helpers.

A :class:`Searcher` proposes candidates for a :class:`~autoprune.problem.Problem`, has every proposal scored by
the problem's evaluator (the same evaluator for every searcher), and records each one as a trial in a
:class:`~autoprune.store.TrialStore`. Implementations (Optuna samplers, baselines, stable-baselines3 agents)
subclass it and are picked by name from :data:`SEARCHERS` (:func:`make_searcher`).

Life cycle of :meth:`Searcher.run`:

1. open (or re-open) the study of ``(searcher, seed)`` in the store; trials left running by a killed process
   are marked ``interrupted`` (they do not count and their candidate is proposed again);
2. call the subclass's :meth:`Searcher._run`, which loops ``while not self.should_stop()``: propose, then
   :meth:`Searcher.evaluate_and_record`;
3. stop when the store holds ``n_trials`` counted trials (``n_trials`` is the *total* for the study, so a
   resumed search continues to the same target), when ``time_limit`` seconds of this run have passed, when
   :meth:`Searcher.stop` was called (e.g. from a callback or another thread), when the searcher has nothing
   left to propose, or on ``KeyboardInterrupt`` (the running trial is recorded as ``interrupted``).

Sharing a study: the steps above that depend on who else works on the study — which running trials are
abandoned, what counts towards ``n_trials``, how a trial is asked for and whether it still has a slot, what
guards a store write and what runs beside the loop — are hooks of a :class:`StudySharing` passed as
``sharing=``. The default is one process that owns its study; :class:`autoprune.workers.SharedStudy` lets the
processes of a campaign share one (a trial asked for beyond ``n_trials`` raises :class:`NoSlotLeft`, and the
run stops with ``stop_reason == "n_trials"``).

Resume: a new searcher on the same store and seed continues. Optuna samplers and baselines derive all their
randomness from ``(seed, number of counted trials)`` and all other state from the stored trials, so an
interrupted and resumed search proposes exactly what an uninterrupted one would have; RL searchers save their
agents beside the store (see :mod:`autoprune.agents.rl`).

Budgets: :class:`BudgetGuard` prices candidates with the problem's closed-form cost model and *repairs*
over-budget keep ratios by shrinking them towards the lower bound (bisection on a common scale), so evaluated
candidates meet the budget. Every recorded trial carries the constraint values ``cost / limit − 1``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import pkgutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import optuna
import yaml

from autoprune import interrupts
from autoprune.errors import AutoPruneError, ConfigError
from autoprune.objectives import Budget, Reward, failure_reward, make_reward, reward_value
from autoprune.problem import Problem, SearchSpace
from autoprune.registry import Registry
from autoprune.store import COUNTED_STATES, TrialStore, record_candidate_params
from autoprune.types import Candidate, CostReport, EvalResult, QuantSpec, TrialRecord

if TYPE_CHECKING:
    from autoprune.config import ObjectiveConfig

HYPERPARAMS_DIR = Path(__file__).resolve().parent / "hyperparams"

#: Metrics a multi-objective searcher may optimise, with their direction. Cost metrics (read with
#: :meth:`~autoprune.types.CostReport.metric`) are told to Optuna as fractions of the dense model's cost.
OBJECTIVE_METRICS: dict[str, str] = {
    "accuracy": "maximize",
    "loss": "minimize",
    "macs": "minimize",
    "params": "minimize",
    "size_bytes": "minimize",
    "bitops": "minimize",
    "latency": "minimize",
    "latency_ms": "minimize",
}


class TooManyFailures(AutoPruneError, RuntimeError):
    """The search stopped because ``max_failures`` candidate evaluations failed in a row."""


class NoSlotLeft(Exception):
    """The trial just asked for lies beyond ``n_trials``: other processes sharing the study took the last slots.

    Raised by :meth:`Searcher.new_trial` after the trial was given back (recorded ``interrupted``);
    :meth:`Searcher.run` then stops with ``stop_reason == "n_trials"``.
    """


def derive_seed(seed: int, index: int) -> int:
    """A 32-bit seed that depends only on ``(seed, index)`` (used to re-seed per trial)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(1)[0])


def load_hyperparams(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults from ``agents/hyperparams/<name>.yaml`` (empty when there is no file), updated by ``overrides``.

    Raises:
        ConfigError: If the file is not a YAML mapping.
    """
    path = HYPERPARAMS_DIR / f"{name}.yaml"
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"hyper-parameter file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"hyper-parameter file {path} must hold a mapping, got {type(loaded).__name__}")
        data = dict(loaded or {})
    data.update(overrides or {})
    return data


# ---------------------------------------------------------------------------------------------------------
# Objective


@dataclass(frozen=True)
class Objective:
    """What a searcher maximises.

    Single-objective searchers maximise the reward ``reward`` (a name in
    :data:`autoprune.objectives.REWARDS`, built with ``kwargs``); multi-objective searchers optimise
    ``objectives`` (names in :data:`OBJECTIVE_METRICS`, e.g. ``("accuracy", "macs")``).
    """

    reward: str = "r_err"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    objectives: tuple[str, ...] = ("accuracy", "macs")

    def __post_init__(self) -> None:
        object.__setattr__(self, "objectives", tuple(self.objectives))
        bad = [m for m in self.objectives if m not in OBJECTIVE_METRICS]
        if bad or not self.objectives:
            raise ConfigError(f"unknown objective metric(s) {bad}" if bad else "no objectives given",
                              hint=f"choose from {', '.join(OBJECTIVE_METRICS)}")
        make_reward(self.reward, **dict(self.kwargs))  # validates the name and parameters now

    @classmethod
    def from_spec(cls, spec: Objective | str | Mapping[str, Any] | ObjectiveConfig | None) -> Objective:
        """Build from a reward name, a mapping ``{reward, kwargs, objectives}``, or the campaign's
        :class:`~autoprune.config.ObjectiveConfig`."""
        if spec is None:
            return cls()
        if isinstance(spec, Objective):
            return spec
        if isinstance(spec, str):
            return cls(reward=spec)
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {"reward", "kwargs", "objectives", "budget"})
            if unknown:
                raise ConfigError(f"unknown objective key(s) {unknown}", hint="keys: reward, kwargs, objectives")
            return cls(reward=spec.get("reward", "r_err"), kwargs=dict(spec.get("kwargs") or {}),
                       objectives=tuple(spec.get("objectives") or ("accuracy", "macs")))
        if hasattr(spec, "reward"):  # an ObjectiveConfig (recognised without importing autoprune.config)
            return cls(reward=spec.reward, kwargs=dict(spec.kwargs or {}),
                       objectives=tuple(spec.objectives or ("accuracy", "macs")))
        raise ConfigError(f"cannot read an objective from {spec!r}",
                          hint="pass a reward name, a mapping or an autoprune.agents.base.Objective")

    def make_reward(self) -> Reward:
        """The reward object."""
        return make_reward(self.reward, **dict(self.kwargs))

    def directions(self) -> list[str]:
        """Optuna directions of the multi-objective metrics."""
        return [OBJECTIVE_METRICS[m] for m in self.objectives]

    def values(self, result: EvalResult | None, cost: CostReport, dense: CostReport) -> list[float]:
        """Multi-objective values (accuracy 0 and loss ∞ for an unevaluated candidate)."""
        out = []
        for m in self.objectives:
            if m == "accuracy":
                out.append(result.ranking_score if result else 0.0)
            elif m == "loss":
                out.append(float(result.loss) if result and math.isfinite(result.loss) else math.inf)
            else:
                den = float(dense.metric(m) or 0.0)
                num = float(cost.metric(m) or 0.0)
                out.append(num / den if den > 0 else num)
        return out


# ---------------------------------------------------------------------------------------------------------
# Budget guard: candidates from ratios, constraint values, repair


class BudgetGuard:
    """Turns keep ratios into legal candidates and keeps them within a budget, using the closed-form cost.

    Args:
        problem: The problem (its search space and cost model are used; nothing is evaluated).
        budget: The budget (an empty budget accepts everything).

    Raises:
        ConfigError: If even the smallest candidate the searchers may propose (every group at
            ``space.min_ratio``, every layer at its lowest weight bits) exceeds the budget.
    """

    def __init__(self, problem: Problem, budget: Budget) -> None:
        self.problem = problem
        self.space: SearchSpace = problem.space
        self.budget = budget
        self.dense = problem.dense_cost
        self.lo = float(self.space.min_ratio)
        self.limits = budget.limits(self.dense)
        self._levels = sorted({b for lc in self.space.layers for b in lc.w_bits}, reverse=True)
        floor = self.floor_candidate()
        if not self.feasible(problem.cost(floor)):
            cost = problem.cost(floor)
            raise ConfigError(
                f"the budget {budget.to_dict()} cannot be met: the smallest candidate in the search space "
                f"(keep ratio {self.lo} everywhere{', lowest bits' if floor.bits else ''}) has "
                f"{cost.macs} MACs, {cost.params} params, {cost.bytes} bytes "
                f"(violation {budget.violation(cost, self.dense):.3f})",
                hint="raise the budget or lower search_space.min_ratio")

    # -- candidates ----------------------------------------------------------------------------------
    def candidate(self, ratios: Sequence[float], bits: Mapping[str, QuantSpec] | None = None) -> Candidate:
        """The candidate with group ``i`` at the legal width nearest ``ratios[i] * size`` (clipped to [lo, 1])."""
        if len(ratios) != len(self.space.groups):
            raise ValueError(f"expected {len(self.space.groups)} ratios, got {len(ratios)}")
        widths = self.space.widths_for_ratios([min(1.0, max(self.lo, float(r))) for r in ratios])
        return Candidate(widths=widths, bits=dict(bits or {}))

    def lowest_bits(self) -> dict[str, QuantSpec]:
        """Every layer at its lowest weight bits (and lowest activation choice)."""
        return {lc.layer: QuantSpec(w_bits=lc.w_bits[0], a_bits=lc.a_bits[0]) for lc in self.space.layers}

    def floor_candidate(self) -> Candidate:
        """Every group at keep ratio ``lo`` and every layer at its lowest bits."""
        return self.candidate([self.lo] * len(self.space.groups), self.lowest_bits())

    # -- constraints ---------------------------------------------------------------------------------
    def constraints(self, cost: CostReport) -> dict[str, float]:
        """``cost_m / limit_m − 1`` by budget metric (≤ 0 is feasible; empty for an empty budget)."""
        return dict(zip(self.budget.metrics(), self.budget.constraint_values(cost, self.dense), strict=True))

    def violation(self, cost: CostReport) -> float:
        """Largest constraint value (≤ 0 when feasible; 0 for an empty budget)."""
        return max(self.constraints(cost).values(), default=0.0)

    def feasible(self, cost: CostReport) -> bool:
        """True if ``cost`` meets every limit."""
        return self.violation(cost) <= 0.0

    def candidate_feasible(self, candidate: Candidate) -> bool:
        """True if ``candidate``'s closed-form cost meets every limit."""
        return self.feasible(self.problem.cost(candidate))

    # -- repair --------------------------------------------------------------------------------------
    def _cap_bits(self, bits: Mapping[str, QuantSpec], cap: int) -> dict[str, QuantSpec]:
        layers = {lc.layer: lc for lc in self.space.layers}
        out = {}
        for name, spec in bits.items():
            legal = layers[name].w_bits
            want = cap if spec.w_bits is None else min(spec.w_bits, cap)
            below = [b for b in legal if b <= want]
            out[name] = QuantSpec(w_bits=below[-1] if below else legal[0], a_bits=spec.a_bits)
        return out

    def shrink(self, ratios: Sequence[float], bits: Mapping[str, QuantSpec] | None = None,
               iters: int = 30) -> tuple[Candidate, float]:
        """Largest ``s`` in [0, 1] such that ratios ``lo + s·(r − lo)`` meet the budget; returns (candidate, s).

        The cost is non-decreasing in ``s`` (widths are non-decreasing in the ratio and the cost in the
        widths), so bisection finds the boundary; ``s = 0`` is returned (possibly infeasible) if nothing fits.
        """
        r = np.clip(np.asarray(ratios, dtype=float), self.lo, 1.0)
        first = self.candidate(r, bits)
        if self.candidate_feasible(first):
            return first, 1.0
        lo_s, hi_s = 0.0, 1.0
        best = self.candidate(self.lo + 0.0 * (r - self.lo), bits)
        if not self.candidate_feasible(best):
            return best, 0.0
        for _ in range(iters):
            mid = 0.5 * (lo_s + hi_s)
            cand = self.candidate(self.lo + mid * (r - self.lo), bits)
            if self.candidate_feasible(cand):
                lo_s, best = mid, cand
            else:
                hi_s = mid
        return best, lo_s

    def repair(self, ratios: Sequence[float], bits: Mapping[str, QuantSpec] | None = None
               ) -> tuple[Candidate, dict[str, Any]]:
        """A feasible candidate close to ``(ratios, bits)``.

        Widths shrink first (common scale towards ``lo``, :meth:`shrink`); only if every group at ``lo``
        still misses the budget are weight bits capped, from the highest level down, before widths are
        re-grown as far as the budget allows.

        Returns:
            The candidate and a dict ``{"scale": s, "bit_cap": cap or None, "repaired": bool}``.
        """
        bits = dict(bits or {})
        cand, s = self.shrink(ratios, bits)
        if self.candidate_feasible(cand):
            return cand, {"scale": s, "bit_cap": None, "repaired": s < 1.0}
        for cap in self._levels:
            capped = self._cap_bits(bits, cap)
            cand, s = self.shrink(ratios, capped)
            if self.candidate_feasible(cand):
                return cand, {"scale": s, "bit_cap": cap, "repaired": True}
        # Unreachable when the floor candidate is feasible (checked in __init__).
        raise ConfigError(f"no candidate meets the budget {self.budget.to_dict()}", hint="raise the budget")


# ---------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class SearchResult:
    """What :meth:`Searcher.run` returns.

    Attributes:
        searcher: Searcher name.
        seed: Seed.
        trials: Every counted trial of the study (this run and earlier ones), in trial order.
        best: The feasible evaluated trial with the highest reward (highest accuracy for multi-objective).
        pareto: Non-dominated feasible evaluated trials (multi-objective searchers; else ``[best]``).
        stop_reason: ``n_trials``, ``time_limit``, ``stopped``, ``exhausted`` or ``interrupted``.
        seconds: Wall-clock seconds of this run.
    """

    searcher: str
    seed: int
    trials: list[TrialRecord]
    best: TrialRecord | None
    pareto: list[TrialRecord]
    stop_reason: str
    seconds: float


def _dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    better = False
    for x, y, d in zip(a, b, directions, strict=True):
        if (x < y) if d == "maximize" else (x > y):
            return False
        if x != y:
            better = True
    return better


# ---------------------------------------------------------------------------------------------------------
# Sharing a study: the hooks of the run loop


class StudySharing:
    """How a searcher's run shares its study with other processes: the hooks :meth:`Searcher.run` calls.

    This base class shares nothing: one process owns its study, which is what a searcher does on its own.
    :class:`autoprune.workers.SharedStudy` overrides the hooks so that several processes (a campaign's
    workers) can work on one study.
    """

    def open(self, study: optuna.Study) -> None:
        """Prepare the study a run just opened: trials left RUNNING (by a killed run) become ``interrupted``."""
        TrialStore.fail_running(study)

    def occupied(self, study: optuna.Study, counted: int, running: optuna.Trial | None) -> int:
        """Trials that use up ``n_trials``.

        Args:
            study: The searcher's study.
            counted: Its counted trials as the searcher keeps them (read when the run started, then
                incremented by each recorded trial).
            running: The searcher's own running trial, if any.

        Returns:
            ``counted`` (nobody else adds trials to the study).
        """
        return counted

    def ask(self, study: optuna.Study) -> optuna.Trial:
        """A new RUNNING trial of ``study`` for the next proposal."""
        return study.ask()

    def admits(self, study: optuna.Study, trial: optuna.Trial, n_trials: int | None) -> bool:
        """Whether ``trial``, just asked, lies within ``n_trials`` (always, when one process owns the study)."""
        return True

    def writing(self) -> AbstractContextManager[None]:
        """Context around each store write of the loop: asking for, recording and giving back a trial."""
        return contextlib.nullcontext()

    def running(self, current: Callable[[], optuna.Trial | None]) -> AbstractContextManager[None]:
        """Context around the search loop; ``current()`` is the trial being evaluated (``None`` between trials)."""
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------
# The interface


class Searcher(ABC):
    """Base class of every searcher.

    Subclasses set :attr:`name` and implement :meth:`_run` (the only abstract method): a loop
    ``while not self.should_stop()`` that proposes a candidate, asks :meth:`new_trial` for a trial and calls
    :meth:`evaluate_and_record`. They may override :meth:`directions` (multi-objective).

    Args:
        problem: The compression problem (search space, cost model, evaluator).
        store: Trial store (a :class:`~autoprune.store.TrialStore`, or a path/URL to open one).
        objective: Reward name, mapping or :class:`Objective` (default: ``r_err``).
        budget: :class:`~autoprune.objectives.Budget` or a mapping such as ``{"macs": 0.5}``.
        n_trials: Total counted trials the study should hold when the search stops.
        time_limit: Seconds this :meth:`run` may take (checked between trials).
        seed: Seed; one study per ``(searcher, seed)``.
        callbacks: ``callback(searcher, record)`` called after each recorded trial.
        max_failures: Consecutive failed evaluations after which the search raises.
        sharing: Who else works on the study (default: nobody; see :class:`StudySharing`).

    Raises:
        ConfigError: Neither ``n_trials`` nor ``time_limit`` given, or an infeasible budget.
    """

    name: ClassVar[str] = ""
    #: Same seed → same trial sequence.
    deterministic: ClassVar[bool] = True
    #: Optimises :attr:`Objective.objectives` instead of a scalar reward.
    multi_objective: ClassVar[bool] = False

    def __init__(self, problem: Problem, *, store: TrialStore | str | Path,
                 objective: Objective | str | Mapping[str, Any] | ObjectiveConfig | None = None,
                 budget: Budget | Mapping[str, Any] | None = None, n_trials: int | None = None,
                 time_limit: float | None = None, seed: int = 0,
                 callbacks: Sequence[Callable[[Searcher, TrialRecord], None]] = (), max_failures: int = 5,
                 sharing: StudySharing | None = None) -> None:
        if n_trials is None and time_limit is None:
            raise ConfigError(f"searcher {self.name!r} needs n_trials and/or time_limit",
                              hint="e.g. n_trials=100 (total trials in the study) or time_limit=3600 (seconds)")
        if n_trials is not None and n_trials < 1:
            raise ConfigError(f"n_trials must be >= 1, got {n_trials}")
        if time_limit is not None and time_limit <= 0:
            raise ConfigError(f"time_limit must be > 0 seconds, got {time_limit}")
        if not problem.space.groups and not problem.space.layers:
            raise ConfigError("the search space is empty (no prunable groups, no quantizable layers)",
                              hint="check the search space / freeze settings of the model")
        self.problem = problem
        self.store = store if isinstance(store, TrialStore) else TrialStore(store)
        self.objective = Objective.from_spec(objective)
        self.reward_fn = self.objective.make_reward()
        self.budget = Budget.from_config(budget)
        self.n_trials = n_trials
        self.time_limit = time_limit
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ConfigError(f"seed must be an integer in 0..{2**32 - 1}, got {seed!r}", hint="e.g. seed=0")
        self.seed = int(seed)
        self.callbacks = list(callbacks)
        self.max_failures = int(max_failures)
        self.sharing = sharing if sharing is not None else StudySharing()
        self.guard = BudgetGuard(problem, self.budget)
        self.dense = problem.dense_cost
        if self.multi_objective:
            unmeasured = [m for m in self.objective.objectives if m not in ("accuracy", "loss")
                          and self.dense.metric(m) is None]
            if unmeasured:
                raise ConfigError(f"objective(s) {unmeasured} need a cost model that predicts them, and this "
                                  "problem's does not", hint="give the problem a latency predictor "
                                  "(autoprune.latency_model; a campaign listing `latency` builds one)")
        self.study: optuna.Study | None = None
        self.stop_reason = ""
        self._stop_event = threading.Event()
        self._start = 0.0
        self._running: optuna.Trial | None = None
        self._pruner: optuna.pruners.BasePruner | None = None
        self._consecutive_failures = 0
        self._count = 0

    # -- the part a subclass writes ------------------------------------------------------------------
    @abstractmethod
    def _run(self) -> None:
        """Propose, evaluate and record candidates until :meth:`should_stop` (or nothing is left to propose)."""

    def directions(self) -> list[str]:
        """Optuna study directions: ``["maximize"]`` (the reward) unless multi-objective."""
        return self.objective.directions() if self.multi_objective else ["maximize"]

    def make_pruner(self) -> optuna.pruners.BasePruner | None:
        """The Optuna pruner used on intermediate reports (``None``: never prune)."""
        return None

    def save_state(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Persist resumable state (called when :meth:`run` ends, however it ends)."""

    # -- control -------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the search to stop after the current trial (thread-safe)."""
        self._stop_event.set()

    @property
    def n_done(self) -> int:
        """Trials that use up ``n_trials``: the counted trials of the study (all runs; read from the store when the
        run starts, then kept here) plus, in a shared study, the trials other live processes are running."""
        if self.study is None:
            return self._count
        return self.sharing.occupied(self.study, self._count, self._running)

    def elapsed(self) -> float:
        """Seconds since this run started."""
        return time.monotonic() - self._start

    def should_stop(self) -> bool:
        """True when the trial budget or time limit is reached or :meth:`stop` was called (sets the reason).

        Raises:
            KeyboardInterrupt: When a Ctrl-C was requested whose first ``KeyboardInterrupt`` was swallowed
                somewhere (see :mod:`autoprune.interrupts`).
        """
        interrupts.check()
        if self._stop_event.is_set():
            self.stop_reason = self.stop_reason or "stopped"
        elif self.n_trials is not None and self.n_done >= self.n_trials:
            self.stop_reason = "n_trials"
        elif self.time_limit is not None and self.elapsed() >= self.time_limit:
            self.stop_reason = "time_limit"
        return bool(self.stop_reason)

    def remaining(self) -> int | None:
        """Counted trials still allowed by ``n_trials`` (``None`` if only a time limit is set)."""
        return None if self.n_trials is None else max(0, self.n_trials - self.n_done)

    def run(self) -> SearchResult:
        """Search until a stopping condition; resumes the study of ``(name, seed)`` if it exists."""
        self._stop_event.clear()
        self.stop_reason = ""
        self._consecutive_failures = 0
        self._pruner = self.make_pruner()
        self.study = self.store.study(self.name, self.seed, directions=self.directions(), pruner=self._pruner)
        self.sharing.open(self.study)
        self._count = len(TrialStore.counted(self.study))
        self._start = time.monotonic()
        try:
            with self.sharing.running(lambda: self._running):
                try:
                    self._run()
                    if not self.stop_reason and not self.should_stop():
                        self.stop_reason = "exhausted"
                except KeyboardInterrupt:
                    self.stop_reason = "interrupted"
                    self._abandon_running("interrupted by the user (KeyboardInterrupt)")
                except NoSlotLeft:
                    self.stop_reason = "n_trials"
        finally:
            self.save_state()
        return self.result()

    def result(self) -> SearchResult:
        """Trials, best trial and Pareto front of the study as stored now."""
        assert self.study is not None, "run() first"
        counted = TrialStore.counted(self.study)
        records = [t for t in self.store.trials(self.name, self.seed)
                   if t.number in {c.number for c in counted}]
        by_number = {t.number: t for t in counted}
        ok = [r for r in records if r.state == "complete" and r.result is not None
              and by_number[r.number].user_attrs.get("feasible", True)]
        best = None
        if ok:
            key = (lambda r: r.result.ranking_score) if self.multi_objective else (lambda r: r.reward)
            best = max(ok, key=lambda r: (key(r), -r.number))
        pareto = [best] if best is not None else []
        if self.multi_objective:
            dirs = self.objective.directions()
            vals = {r.number: list(by_number[r.number].values or []) for r in ok}
            pareto = [r for r in ok if not any(_dominates(vals[o.number], vals[r.number], dirs) for o in ok)]
        return SearchResult(self.name, self.seed, records, best, pareto, self.stop_reason, self.elapsed())

    # -- trials --------------------------------------------------------------------------------------
    def new_trial(self) -> optuna.Trial:
        """Ask the study for the next trial (samplers suggest parameters on it).

        Raises:
            NoSlotLeft: In a shared study, when ``n_trials`` trials precede it (it is given back first).
        """
        assert self.study is not None
        with self.sharing.writing():
            trial = self._running = self.sharing.ask(self.study)
        if not self.sharing.admits(self.study, trial, self.n_trials):
            with self.sharing.writing():
                self._abandon_running("n_trials already reached by other workers")
            raise NoSlotLeft
        return trial

    def _abandon_running(self, reason: str) -> None:
        if self._running is None or self.study is None:
            return
        trial, self._running = self._running, None
        trial.set_user_attr("searcher", self.name)
        trial.set_user_attr("seed", self.seed)
        trial.set_user_attr("state", "interrupted")
        trial.set_user_attr("reason", reason)
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def reward(self, result: EvalResult, cost: CostReport) -> float:
        """The objective's reward of an evaluated candidate."""
        return reward_value(self.reward_fn, result, cost, self.dense, self.budget)

    def failure_value(self) -> float:
        """Reward of a candidate that could not be (or was not) evaluated."""
        return failure_reward(self.reward_fn, self.dense, self.budget)

    def _evaluate(self, candidate: Candidate, trial: optuna.Trial | None) -> EvalResult:
        """Score through the problem; with a pruner, intermediate values go to the trial."""
        if trial is None or self._pruner is None:
            return self.problem.evaluate(candidate)[0]

        def report(step: int, value: float) -> bool:
            trial.report(float(value), int(step))
            return trial.should_prune()

        return self.problem.evaluate(candidate, report=report)[0]

    def evaluate_and_record(self, trial: optuna.Trial, candidate: Candidate, *, started: float,
                            reason: str = "", extra: Mapping[str, Any] | None = None,
                            evaluate_infeasible: bool = False, result: EvalResult | None = None,
                            reward: float | None = None) -> TrialRecord:
        """Validate, price, (maybe) evaluate and record ``candidate`` as ``trial``.

        Over-budget candidates are recorded as ``infeasible`` without evaluation unless
        ``evaluate_infeasible`` (sensitivity scans). A failed evaluation is recorded as ``failed`` and the
        search continues, unless it is a user error (:class:`AutoPruneError`) or ``max_failures`` evaluations
        failed in a row. A ``result``/``reward`` computed elsewhere (an RL environment) is recorded as is.

        Args:
            trial: The trial from :meth:`new_trial`.
            candidate: The proposal.
            started: ``time.perf_counter()`` when the proposal began (for ``seconds``).
            reason: Free text stored with the trial (e.g. the phase of a baseline).
            extra: More user attributes.
            evaluate_infeasible: Score over-budget candidates too.
            result: An evaluation already made (skip evaluating).
            reward: The reward already computed for ``result``.
        """
        self.problem.space.validate(candidate)
        cost = self.problem.cost(candidate)
        constraints = self.guard.constraints(cost)
        feasible = all(c <= 0 for c in constraints.values())
        state = "complete"
        if result is None and (feasible or evaluate_infeasible):
            try:
                result = self._evaluate(candidate, trial)
            except AutoPruneError:
                self._record(trial, candidate, cost, None, None, started, "failed", "user error", constraints, extra)
                raise
            except Exception as exc:  # an evaluation bug must not lose the campaign: record and go on
                return self.record_failure(trial, candidate, started, f"{type(exc).__name__}: {exc}", extra,
                                           cause=exc)
            self._consecutive_failures = 0
            from autoprune.evaluate import was_pruned

            if was_pruned(result):
                state = "pruned"
        elif result is None:
            state = "infeasible"
        if result is not None and reward is None:
            reward = self.reward(result, cost)
        elif result is None:
            reward = self.failure_value()
        return self._record(trial, candidate, cost, result, reward, started, state, reason, constraints, extra)

    def record_failure(self, trial: optuna.Trial, candidate: Candidate, started: float, reason: str,
                       extra: Mapping[str, Any] | None = None, *, cause: BaseException | None = None
                       ) -> TrialRecord:
        """Record ``candidate`` as a ``failed`` trial (reward :meth:`failure_value`, Optuna state FAIL).

        The evaluation raised (diverged, crashed, ran out of its per-trial time limit); the search goes on
        unless ``max_failures`` evaluations failed in a row.

        Raises:
            TooManyFailures: After ``max_failures`` consecutive failures (the trials are recorded first).
        """
        self._consecutive_failures += 1
        cost = self.problem.cost(candidate)
        rec = self._record(trial, candidate, cost, None, self.failure_value(), started, "failed", reason,
                           self.guard.constraints(cost), extra)
        if self._consecutive_failures >= self.max_failures:
            raise TooManyFailures(
                f"{self.max_failures} evaluations failed in a row (all recorded as failed trials); last: {reason}",
                hint="check the evaluator settings and the model (e.g. a lower learning rate if losses diverge), "
                "then run the same command again to resume; raise max_failures to tolerate more") from cause
        return rec

    def _record(self, trial: optuna.Trial, candidate: Candidate, cost: CostReport, result: EvalResult | None,
                reward: float | None, started: float, state: str, reason: str, constraints: dict[str, float],
                extra: Mapping[str, Any] | None) -> TrialRecord:
        assert self.study is not None
        with self.sharing.writing():
            if self.multi_objective:
                values = self.objective.values(result if state == "complete" else None, cost, self.dense)
            else:
                values = [reward if reward is not None else self.failure_value()]
            seconds = time.perf_counter() - started
            if not trial.params:  # proposed without trial.suggest_*: the same dashboard axes as the Optuna searchers
                record_candidate_params(trial, candidate, self.problem.space)
            TrialStore.finish(self.study, trial, candidate=candidate, cost=cost, result=result, reward=reward,
                              seconds=seconds, searcher=self.name, seed=self.seed, state=state, reason=reason,
                              values=values, constraints=constraints, extra=extra)
            self._running = None
            if state in COUNTED_STATES:
                self._count += 1
            record = TrialRecord(number=trial.number, candidate=candidate, cost=cost, result=result,
                                 reward=reward, searcher=self.name, seed=self.seed, state=state, reason=reason)
            for cb in self.callbacks:
                cb(self, record)
            return record


# ---------------------------------------------------------------------------------------------------------
# Registry

SEARCHERS: Registry[type[Searcher]] = Registry("searcher")


def load_builtin_searchers() -> None:
    """Import every public module of this package, which registers its searchers in :data:`SEARCHERS`.

    The modules are discovered on disk (:func:`pkgutil.iter_modules` over the package), so dropping a new
    searcher module into ``agents/`` is all it takes; names starting with ``_`` are skipped. Called when a
    searcher is first needed, never at import (the RL modules import stable-baselines3, which is slow).
    Idempotent.
    """
    package = importlib.import_module(__package__ or __name__.rpartition(".")[0])
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def make_searcher(name: str, problem: Problem, **kwargs: Any) -> Searcher:
    """Build the searcher registered as ``name``.

    Args:
        name: A name in :data:`SEARCHERS` (``tpe``, ``nsga2``, ``uniform``, ``ddpg``, ...).
        problem: The compression problem.
        **kwargs: Arguments of :class:`Searcher` and of the searcher itself (hyper-parameters).

    Raises:
        ConfigError: Unknown name (with the choices and a close match) or bad arguments.
    """
    load_builtin_searchers()
    cls = SEARCHERS.get(name)
    try:
        inspect.signature(cls).bind(problem, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for searcher {name!r}: {exc}", hint=f"{name}: {SEARCHERS.help(name)}"
                          ) from None
    try:
        return cls(problem, **kwargs)
    except TypeError as exc:  # a **kwargs constructor handed an unknown name on to its base class
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ConfigError(f"bad arguments for searcher {name!r}: {exc}", hint=f"{name}: {SEARCHERS.help(name)}"
                          ) from None
