"""Optuna samplers as searchers: ``tpe``, ``cmaes``, ``optuna_random``, ``qmc``, ``gp`` and ``nsga2``.

**Parametrisation.** One keep ratio per prunable group, ``ratio:<group_id>`` ∈ [``space.min_ratio``, 1]
(a float, mapped to the nearest legal width of the group), and — when the search space quantizes — one
categorical ``w_bits:<layer>`` (and ``a_bits:<layer>`` when there is a choice) per layer. Ratios rather than
width indices because they are continuous (CMA-ES, GP and QMC need a continuous space), mean the same thing in
every group whatever its legal-width grid, and let the budget repair act on all groups at once.

**Budget.** Every trial carries Optuna constraint values ``cost / limit − 1`` per budget metric
(``Trial.set_constraint``; a ``constraints_func`` on Optuna < 5); TPE, GP and NSGA-II use them to learn the
feasible region. With ``repair=True`` (the default) a
sampled point that misses the budget is shrunk towards ``min_ratio`` (:meth:`BudgetGuard.repair`) before it
is evaluated: the objective the sampler sees is ``f(params) = score(repair(params))``, a deterministic
function of the parameters, and every evaluated candidate is feasible. With ``repair=False`` over-budget
points are recorded as ``infeasible`` without evaluation (worst objective value, positive constraints).

**Pruning.** With an evaluator that reports intermediate values (its registered class declares
``reports_intermediate``: ``finetune``, ``infcop``, ``full``) single-objective searchers use Optuna's median
pruner on the intermediate validation accuracies (``pruner="auto"``; ``"none"``, ``"median"``,
``"hyperband"``, ``"successive_halving"``, ``"percentile"`` or a pruner object may be given).

**Sampler state and resume.** The sampler is rebuilt before every trial with seed
``derive_seed(seed, k)``, ``k`` = number of counted trials so far. All other sampler state already lives in
the storage (CMA-ES pickles its optimizer into trial system attributes, NSGA-II its generations, QMC its
sample index; TPE and GP refit from the trials), so nothing is pickled and a search that is interrupted and
resumed proposes exactly the candidates an uninterrupted one would.
"""

from __future__ import annotations

import inspect
import time
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import optuna
from optuna.trial import FrozenTrial

from autoprune._imports import optional_import
from autoprune.errors import ConfigError
from autoprune.problem import Problem
from autoprune.types import Candidate, QuantSpec

from .base import SEARCHERS, Searcher, derive_seed, load_hyperparams

if TYPE_CHECKING:
    from autoprune.evaluate import CandidateEvaluator

_PRUNERS = ("auto", "none", "median", "hyperband", "successive_halving", "percentile")


#: Optuna ≥ 5 takes constraints through ``Trial.set_constraint`` (the store does that); older versions need a
#: ``constraints_func``, which reads the values the store keeps in the trial's user attributes.
_NEEDS_CONSTRAINTS_FUNC = not hasattr(optuna.Trial, "set_constraint")


def _constraints_of(trial: FrozenTrial) -> list[float]:
    return list((trial.user_attrs.get("constraints") or {}).values())


def _evaluator_reports(evaluator: CandidateEvaluator) -> bool:
    """True if the evaluator reports intermediate values (so that Optuna can prune).

    Evaluators declare it with the class attribute ``reports_intermediate`` (see
    :class:`~autoprune.evaluate.Evaluator`); wrappers such as the campaign's reproducible evaluator pass on the
    declaration of the evaluator they wrap. An evaluator that declares nothing does not report.
    """
    return bool(getattr(evaluator, "reports_intermediate", False))


class OptunaSearcher(Searcher):
    """Common ask/tell loop of the Optuna searchers (subclasses choose the sampler).

    Args:
        problem: The compression problem.
        repair: Shrink over-budget points until they meet the budget (default) instead of recording them as
            infeasible.
        pruner: ``"auto"`` (median pruner when the evaluator reports intermediate values), a pruner name or an
            :class:`optuna.pruners.BasePruner`.
        **kwargs: :class:`~autoprune.agents.base.Searcher` arguments (``store``, ``objective``, ``budget``,
            ``n_trials``, ``time_limit``, ``seed``, ``callbacks``, ``max_failures``) and sampler options
            (e.g. ``n_startup_trials``, ``population_size``), defaults from ``agents/hyperparams/<name>.yaml``.
    """

    sampler_cls: ClassVar[type[optuna.samplers.BaseSampler]]
    #: The sampler accepts ``constraints_func``.
    takes_constraints: ClassVar[bool] = False
    #: The sampler accepts ``independent_sampler`` (used for parameters it cannot model jointly).
    takes_independent: ClassVar[bool] = False

    def __init__(self, problem: Problem, *, repair: bool = True,
                 pruner: str | optuna.pruners.BasePruner | None = "auto", **kwargs: Any) -> None:
        base_names = set(inspect.signature(Searcher.__init__).parameters) - {"self", "problem"}
        base = {k: v for k, v in kwargs.items() if k in base_names}
        options = load_hyperparams(self.name, {k: v for k, v in kwargs.items() if k not in base_names})
        super().__init__(problem, **base)
        allowed = set(inspect.signature(self.sampler_cls.__init__).parameters) - {"self", "seed",
                                                                                  "constraints_func"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for searcher {self.name!r}",
                              hint=f"{self.sampler_cls.__name__} takes: {', '.join(sorted(allowed))}")
        self.sampler_options = options
        self.repair = bool(repair)
        if isinstance(pruner, str) and pruner not in _PRUNERS:
            raise ConfigError(f"unknown pruner {pruner!r}", hint=f"choices: {', '.join(_PRUNERS)}")
        self.pruner_spec = pruner

    # -- sampler and pruner --------------------------------------------------------------------------
    def make_sampler(self, index: int) -> optuna.samplers.BaseSampler:
        """The sampler for the trial after ``index`` counted trials (seeded from ``(seed, index)``)."""
        kw: dict[str, Any] = dict(self.sampler_options)
        kw["seed"] = derive_seed(self.seed, index)
        if self.takes_constraints and _NEEDS_CONSTRAINTS_FUNC and not self.budget.is_empty():
            kw["constraints_func"] = _constraints_of
        if self.takes_independent:
            kw.setdefault("independent_sampler", optuna.samplers.RandomSampler(seed=derive_seed(self.seed + 1,
                                                                                                index)))
            kw.setdefault("warn_independent_sampling", False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return self.sampler_cls(**kw)

    def make_pruner(self) -> optuna.pruners.BasePruner | None:
        """The pruner (never for multi-objective searchers: Optuna cannot prune those)."""
        spec = self.pruner_spec
        if self.multi_objective or spec is None or spec == "none":
            return None
        if isinstance(spec, optuna.pruners.BasePruner):
            return spec
        if spec == "auto":
            return optuna.pruners.MedianPruner(n_startup_trials=5) if _evaluator_reports(
                self.problem.evaluator) else None
        return {
            "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=5),
            "hyperband": optuna.pruners.HyperbandPruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
            "percentile": lambda: optuna.pruners.PercentilePruner(25.0, n_startup_trials=5),
        }[spec]()

    # -- proposals -----------------------------------------------------------------------------------
    def suggest(self, trial: optuna.Trial) -> tuple[list[float], dict[str, QuantSpec]]:
        """Keep ratios (one per group) and bits (one per quantizable layer) suggested on ``trial``."""
        space = self.problem.space
        lo = float(space.min_ratio)
        ratios = [trial.suggest_float(f"ratio:{g.group_id}", lo, 1.0) for g in space.groups]
        bits: dict[str, QuantSpec] = {}
        for lc in space.layers:
            w = trial.suggest_categorical(f"w_bits:{lc.layer}", list(lc.w_bits)) if len(lc.w_bits) > 1 \
                else lc.w_bits[0]
            a = trial.suggest_categorical(f"a_bits:{lc.layer}", list(lc.a_bits)) if len(lc.a_bits) > 1 \
                else lc.a_bits[0]
            bits[lc.layer] = QuantSpec(w_bits=w, a_bits=a)
        return ratios, bits

    def propose(self, trial: optuna.Trial) -> tuple[Candidate, dict[str, Any]]:
        """The candidate for ``trial`` (repaired when ``repair``) and extra attributes to record."""
        ratios, bits = self.suggest(trial)
        if not self.repair:
            return self.guard.candidate(ratios, bits), {}
        cand, info = self.guard.repair(ratios, bits)
        return cand, {"repair_scale": info["scale"], "repair_bit_cap": info["bit_cap"]}

    def _run(self) -> None:
        assert self.study is not None
        while not self.should_stop():
            self.study.sampler = self.make_sampler(self.n_done)
            started = time.perf_counter()
            trial = self.new_trial()
            cand, extra = self.propose(trial)
            self.evaluate_and_record(trial, cand, started=started, extra=extra,
                                     reason="repaired" if extra.get("repair_scale", 1.0) < 1.0 else "")


@SEARCHERS.register("tpe")
class TPESearcher(OptunaSearcher):
    """Optuna TPE (tree-structured Parzen estimator) on keep ratios, with budget constraints and repair."""

    name = "tpe"
    sampler_cls = optuna.samplers.TPESampler
    takes_constraints = True


class _CmaEsSampler(optuna.samplers.CmaEsSampler):
    """Optuna's CMA-ES without its per-trial "constraints … will not use them" warning.

    The store sets constraint values on every trial (other samplers learn from them); CMA-ES ignores them,
    which is expected here and said once in :class:`CmaEsSearcher`'s documentation instead of once per trial.
    """

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: optuna.trial.TrialState,
                    values: Any) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Constraints have been set, but CmaEsSampler",
                                    category=UserWarning)
            super().after_trial(study, trial, state, values)


@SEARCHERS.register("cmaes")
class CmaEsSearcher(OptunaSearcher):
    """Optuna CMA-ES on keep ratios (categorical bits by an independent random sampler), with repair.

    CMA-ES does not model the budget constraints: with ``repair=True`` (the default) every evaluated candidate
    meets the budget anyway; with ``repair=False`` over-budget points get the worst objective value, which
    CMA-ES ranks last.
    """

    name = "cmaes"
    sampler_cls = _CmaEsSampler
    takes_independent = True

    def __init__(self, problem: Problem, **kwargs: Any) -> None:
        optional_import("cmaes", "the `cmaes` searcher (Optuna's CmaEsSampler)")
        super().__init__(problem, **kwargs)


@SEARCHERS.register("optuna_random")
class OptunaRandomSearcher(OptunaSearcher):
    """Optuna's random sampler on the same parametrisation as the other Optuna searchers (a control)."""

    name = "optuna_random"
    sampler_cls = optuna.samplers.RandomSampler


@SEARCHERS.register("qmc")
class QMCSearcher(OptunaSearcher):
    """Optuna quasi-Monte-Carlo (scrambled Sobol) sampling of keep ratios, with repair."""

    name = "qmc"
    sampler_cls = optuna.samplers.QMCSampler
    takes_independent = True

    def make_sampler(self, index: int) -> optuna.samplers.BaseSampler:
        """QMC keeps one scrambling seed for the whole study; only its independent sampler is re-seeded."""
        kw: dict[str, Any] = {"scramble": True, **self.sampler_options}
        kw.setdefault("independent_sampler", optuna.samplers.RandomSampler(seed=derive_seed(self.seed + 1, index)))
        kw.setdefault("warn_independent_sampling", False)
        kw.setdefault("warn_asynchronous_seeding", False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(seed=self.seed, **kw)


@SEARCHERS.register("gp")
class GPSearcher(OptunaSearcher):
    """Optuna Gaussian-process Bayesian optimisation (needs scipy and torch), with budget constraints."""

    name = "gp"
    sampler_cls = optuna.samplers.GPSampler
    takes_constraints = True
    takes_independent = True

    def __init__(self, problem: Problem, **kwargs: Any) -> None:
        optional_import("scipy", "the `gp` searcher (Optuna's GPSampler)")
        optional_import("torch", "the `gp` searcher (Optuna's GPSampler)")
        super().__init__(problem, **kwargs)


@SEARCHERS.register("nsga2")
class NSGA2Searcher(OptunaSearcher):
    """Optuna NSGA-II, multi-objective (default accuracy ↑ and MACs ↓) → a Pareto front within the budget."""

    name = "nsga2"
    sampler_cls = optuna.samplers.NSGAIISampler
    takes_constraints = True
    multi_objective = True

