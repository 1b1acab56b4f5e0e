"""Campaigns: one validated :class:`~autoprune.config.CampaignConfig` wired into a running search.

This module builds and runs a campaign, and knows nothing about how candidates are proposed, built or scored:

* :func:`open_campaign` checks everything a user can get wrong *before* anything is written (output directory,
  checkpoint, storage URL, budget, a config that contradicts the campaign already on disk), then builds the
  model, data, search space, evaluator and :class:`~autoprune.problem.Problem` (:class:`Campaign`) and writes
  the provenance beside the results (:mod:`autoprune.provenance`: ``config.resolved.yaml``, ``command.txt``
  plus ``commands.log``, ``environment.json``) and ``space.json`` (groups, layers, dense cost and accuracy,
  read by reports and exports).
* :func:`run_search` runs one searcher on the campaign's store (a SQLite file ``<out>/trials.db`` by default,
  or the ``storage`` URL, e.g. PostgreSQL, shared by many workers), with a progress bar and clean Ctrl-C.
* :func:`compare` runs several searchers × seeds on the identical problem and budget and returns the
  leaderboard (:func:`autoprune.report.leaderboard`).

**Resume.** A campaign is resumed by running the same command again: each ``(searcher, seed)`` study keeps its
finished trials, the searcher restores its state from the store, and ``n_trials`` is the total of the study.

**Workers.** Several processes (``autoprune search`` plus any number of ``autoprune worker``) may share one
study: every campaign searcher runs with :class:`autoprune.workers.SharedStudy` (running-trial owners,
heartbeats, stale trials, exactly ``n_trials`` counted trials; see :mod:`autoprune.workers`).

**Reproducibility.** Every evaluation is a function of the candidate alone (:class:`ReproducibleEvaluator`
restarts the data loaders and the torch RNG for each call), so an interrupted and resumed search, a second
run with the same seed and every agent of a comparison see the same scores for the same candidates.

The campaign-directory names of :mod:`autoprune.provenance` and the worker-protocol names of
:mod:`autoprune.workers` are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import optuna
import torch
from torch import nn

from autoprune.config import CampaignConfig
from autoprune.errors import AutoPruneError, CheckpointError, ConfigError, DataError
from autoprune.interrupts import deferred_sigint, sigterm_as_interrupt
from autoprune.names import check_names
from autoprune.provenance import (
    COMMAND_FILE,
    CONFIG_FILE,
    ENVIRONMENT_FILE,
    HISTORY_FILE,
    IDENTITY_KEYS,
    SPACE_FILE,
    STORE_FILE,
    check_identity,
    command_line,
    environment_info,
    git_commit,
    identity_changes,
    load_resolved,
    open_store,
    release_identity,
    storage_location,
    stored_trials,
    write_atomic,
    write_provenance,
)
from autoprune.store import TrialStore, storage_error, storage_errors
from autoprune.types import TrialRecord
from autoprune.utils import prepare_out_dir
from autoprune.workers import (
    HEARTBEAT_ATTR,
    WORKER_ATTR,
    SharedStudy,
    WorkerIdentity,
    fail_stale,
    is_stale,
    pid_alive,
)

if TYPE_CHECKING:
    import pandas as pd

    from autoprune.agents.base import Objective, Searcher, SearchResult
    from autoprune.data import BatchLoader, DatasetInfo, DataSplits
    from autoprune.evaluate import Batch, Evaluator, ReportFn
    from autoprune.graph import GroupSet
    from autoprune.latency_model import LatencyPredictor
    from autoprune.objectives import Budget
    from autoprune.problem import Problem, SearchSpace
    from autoprune.types import EvalResult

__all__ = [
    "COMMAND_FILE", "CONFIG_FILE", "ENVIRONMENT_FILE", "HEARTBEAT_ATTR", "HISTORY_FILE", "IDENTITY_KEYS",
    "SPACE_FILE", "STORE_FILE", "WORKER_ATTR", "Campaign", "EpochLoader", "FirstEpoch", "ProgressBar",
    "ReproducibleEvaluator", "WorkerIdentity", "build_campaign", "build_latency_predictor", "build_model",
    "campaign_summary", "check_budget", "check_checkpoint", "check_identity", "check_names", "command_line",
    "compare", "deferred_sigint", "dense_score_label", "environment_info", "fail_stale", "git_commit",
    "identity_changes", "is_stale", "latency_summary", "load_resolved", "make_campaign_searcher", "make_evaluator",
    "make_loaders", "needs_latency", "open_campaign", "open_store", "pid_alive", "prepare_out_dir",
    "release_identity", "run_search", "searched", "sigterm_as_interrupt", "space_summary", "storage_location",
    "stored_trials", "summarize", "val_caveat", "val_label", "write_provenance",
]

log = logging.getLogger("autoprune.campaign")


# ---------------------------------------------------------------------------------------------------------
# Building the problem


@runtime_checkable
class EpochLoader(Protocol):
    """Batches whose order and augmentation depend on the epoch only (:class:`autoprune.data.BatchLoader`)."""

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration the one of epoch ``epoch``."""


class ReproducibleEvaluator:
    """Wraps an evaluator so that each evaluation depends on the candidate only.

    Before every call the given loaders restart at epoch 0 (same batches, same augmentation) and the torch
    RNG is forked and seeded, so the order of evaluations (resume, other agents, other workers) never changes
    a score. The wrapped evaluator is :attr:`inner` (searchers look at ``inner.name``).

    Args:
        inner: The evaluator.
        loaders: Loaders with ``set_epoch`` that the evaluator iterates.
        seed: Seed of the torch RNG during each evaluation.
    """

    def __init__(self, inner: Evaluator, loaders: Sequence[object], seed: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.reports_intermediate = inner.reports_intermediate
        self.device = getattr(inner, "device", None)
        self.loaders = [ld for ld in loaders if isinstance(ld, EpochLoader)]
        self.seed = int(seed)

    def evaluate(self, model: nn.Module, *, key: str | None = None, report: ReportFn | None = None
                 ) -> EvalResult:
        """Score ``model`` with the inner evaluator from a fixed data and RNG state."""
        for ld in self.loaders:
            ld.set_epoch(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.inner.evaluate(model, key=key, report=report)


class FirstEpoch:
    """A view of a loader that always iterates its first epoch (same batches every time)."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Batch]:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(0)
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


@dataclass
class Campaign:
    """Everything a search of one campaign needs, built from its config.

    Attributes:
        config: The validated config.
        model: The dense model (with its checkpoint loaded), on the CPU, in eval mode.
        model_kwargs: Arguments ``build_model`` got (dataset classes/channels/statistics, checkpoint and
            config arguments).
        splits: Train / val / test splits.
        example_input: One validation image (batch 1), for tracing and shapes.
        groups: The engine's channel groups.
        space: The search space.
        evaluator: The (reproducible) search evaluator.
        train_loader: Shuffled, augmented training batches (fine-tuning).
        calib_loader: Shuffled training batches without augmentation (BN / quantizer calibration).
        val_loader: Validation batches.
        test_loader: Test batches (export and final reports only).
        dense_accuracy: Validation accuracy of the dense model under the evaluator (``None``: not measured).
        latency: The latency predictor (only when the campaign budgets or optimises latency:
            :func:`needs_latency`); its problem's cost reports then carry ``latency_ms``.
    """

    config: CampaignConfig
    model: nn.Module
    model_kwargs: dict[str, Any]
    splits: DataSplits
    example_input: torch.Tensor
    groups: GroupSet
    space: SearchSpace
    evaluator: ReproducibleEvaluator
    train_loader: BatchLoader
    calib_loader: BatchLoader
    val_loader: BatchLoader
    test_loader: BatchLoader
    dense_accuracy: float | None = None
    latency: LatencyPredictor | None = None
    _problem: Problem | None = field(default=None, repr=False)

    @property
    def out_dir(self) -> Path:
        """The campaign directory."""
        return self.config.out_dir

    def new_problem(self) -> Problem:
        """A fresh :class:`~autoprune.problem.Problem` (empty evaluation cache) on the shared model and space."""
        from autoprune.problem import Problem

        return Problem(self.model, self.groups, self.space, self.evaluator, self.example_input,
                       importance=self.config.search_space.importance, round_to=self.config.search_space.round_to,
                       calib_loader=FirstEpoch(self.calib_loader), latency=self.latency)

    @property
    def problem(self) -> Problem:
        """The campaign's problem (built once)."""
        if self._problem is None:
            self._problem = self.new_problem()
        return self._problem

    def budget(self) -> Budget:
        """The budget of the objective as an :class:`~autoprune.objectives.Budget`."""
        from autoprune.objectives import Budget

        b = dataclasses.asdict(self.config.objective.budget)
        return Budget.from_config({k: v for k, v in b.items() if v is not None})

    def objective(self) -> Objective:
        """The searchers' :class:`~autoprune.agents.base.Objective`."""
        from autoprune.agents.base import Objective

        o = self.config.objective
        return Objective(reward=o.reward, kwargs=dict(o.kwargs), objectives=tuple(o.objectives))


def _resolve_path(text: str) -> Path:
    return Path(text).expanduser()


def check_checkpoint(cfg: CampaignConfig) -> None:
    """Raise :class:`CheckpointError` early if ``model.checkpoint`` is set but missing."""
    ckpt = cfg.model.checkpoint
    if ckpt and not _resolve_path(ckpt).exists():
        raise CheckpointError(f"model.checkpoint {ckpt!r} does not exist (looked at {_resolve_path(ckpt).resolve()})",
                              hint="relative paths are relative to the working directory; train one with "
                              "`autoprune train` or fix the path (model.checkpoint=PATH)")


def build_model(cfg: CampaignConfig, info: DatasetInfo) -> tuple[nn.Module, dict[str, Any]]:
    """Build the config's model for the dataset described by ``info`` and load its checkpoint.

    Arguments come from the dataset (classes, channels, statistics), then from an autoprune checkpoint's own
    ``model_kwargs`` (e.g. a width it was trained with), then from ``model.kwargs``.
    """
    from autoprune.models import build_model as zoo_build
    from autoprune.models.checkpoint import checkpoint_metadata, load_checkpoint

    kwargs: dict[str, Any] = {"num_classes": int(info.num_classes), "in_channels": int(info.input_shape[0]),
                              "mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std]}
    ckpt = cfg.model.checkpoint
    if ckpt:
        check_checkpoint(cfg)
        meta = checkpoint_metadata(_resolve_path(ckpt))
        if meta.get("format") == "autoprune" and meta.get("model_name") in (None, cfg.model.name):
            kwargs.update({k: v for k, v in (meta.get("model_kwargs") or {}).items() if k not in ("mean", "std")})
    kwargs.update(cfg.model.kwargs)
    torch.manual_seed(cfg.seed)
    try:
        model = zoo_build(cfg.model.name, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {cfg.model.name!r} does not accept these arguments: {exc}",
                          hint="check model.kwargs") from None
    if ckpt:
        load_checkpoint(model, _resolve_path(ckpt), model_name=cfg.model.name)
    return model.eval(), kwargs


def _val_size(v: int | float | None) -> int | float | None:
    if isinstance(v, float) and v >= 1 and v.is_integer():
        return int(v)
    return v


def make_loaders(cfg: CampaignConfig, splits: DataSplits
                 ) -> tuple[BatchLoader, BatchLoader, BatchLoader, BatchLoader]:
    """(train with augmentation, calibration without, validation, test) loaders of the campaign."""
    from autoprune.data import make_loader

    d = cfg.dataset
    train = make_loader(splits.train, d.batch_size, shuffle=True, augment=True, seed=d.seed,
                        drop_last=len(splits.train) > d.batch_size)
    calib = make_loader(splits.train, d.batch_size, shuffle=True, augment=False, seed=d.seed + 1)
    val = make_loader(splits.val, d.eval_batch_size)
    test = make_loader(splits.test, d.eval_batch_size)
    return train, calib, val, test


def make_evaluator(cfg: CampaignConfig, name: str, settings: Mapping[str, Any], *, model: nn.Module,
                   train_loader: BatchLoader, calib_loader: BatchLoader, val_loader: BatchLoader) -> Evaluator:
    """An evaluator from :data:`autoprune.evaluate.EVALUATORS` with the campaign's loaders.

    What each evaluator gets is declared on its class (:class:`~autoprune.evaluate.Evaluator`): evaluators that
    train (``trains``) get the augmented training loader, the others the un-augmented one; ``needs_dense``
    ones (``infcop``) also get the dense model, and ``needs_flow_loader`` ones the un-augmented loader for
    their flow subset; training evaluators with ``distill`` > 0 get the dense model as their teacher.
    """
    from autoprune.evaluate import EVALUATORS, REFERENCE_SCORES
    from autoprune.evaluate import make_evaluator as make

    cls = EVALUATORS.get(name)
    kw = dict(settings)
    if cfg.device is not None:
        kw.setdefault("device", cfg.device)
    if cfg.time_limit_per_trial is not None:
        kw.setdefault("timeout", cfg.time_limit_per_trial)
    if cls.needs_dense and "references" not in kw:
        kw.setdefault("dense", model)
    if kw.get("score") in REFERENCE_SCORES:
        kw.setdefault("reference_model", model)  # agreement / KL with the dense model's outputs
    if cls.needs_flow_loader:
        kw.setdefault("flow_loader", calib_loader)
    distill = kw.get("distill")
    if cls.trains and isinstance(distill, int | float) and not isinstance(distill, bool) and distill > 0:
        kw.setdefault("teacher", model)  # distillation: the dense model teaches the candidate
    return make(name, train_loader if cls.trains else calib_loader, val_loader, **kw)


def check_budget(problem: Problem, budget: Budget, min_ratio: float) -> None:
    """Raise a :class:`ConfigError` naming the smallest achievable cost if ``budget`` cannot be met.

    The smallest candidate a searcher may propose has every group at its narrowest legal width (keep ratio
    ``search_space.min_ratio``) and every layer at its lowest bits.
    """
    from autoprune.agents.base import BudgetGuard

    try:
        BudgetGuard(problem, budget)
    except ConfigError:
        floor = problem.cost(problem.space.minimal())
        dense = problem.dense_cost
        parts, fixes = [], []
        for metric, limit in budget.limits(dense).items():
            have, full = floor.metric(metric), dense.metric(metric)
            if have is None or full is None or have <= limit:
                continue
            def num(v: float, metric: str = metric) -> str:
                return f"{v:.3g} ms" if metric == "latency_ms" else f"{v:,.0f}"

            parts.append(f"objective.budget.{metric}={getattr(budget, metric):g} allows {num(limit)} but the "
                         f"smallest achievable is {num(have)} ({have / full:.1%} of the dense model's {num(full)}; "
                         f"every group at keep ratio {min_ratio}"
                         + ("; latency as predicted on this machine" if metric == "latency_ms" else "") + ")")
            fixes.append(f"objective.budget.{metric}={math.ceil(1000 * have / full) / 1000:g}")
        if not parts:
            raise
        raise ConfigError("the budget cannot be met: " + "; ".join(parts),
                          hint=f"raise the budget to at least {', '.join(fixes)} (a fraction of the dense model) "
                          "or lower search_space.min_ratio") from None


def build_campaign(cfg: CampaignConfig, *, measure_dense: bool = True) -> Campaign:
    """Load data and model, analyse the graph, build the search space and evaluator.

    Raises:
        AutoPruneError: Bad names, missing files, an empty search space or an impossible budget.
    """
    from autoprune import graph
    from autoprune.data import DataNotFound, load_dataset
    from autoprune.data.base import ENV_DATA_DIR
    from autoprune.search_spaces import build_space

    d = cfg.dataset
    data_dir = str(_resolve_path(d.data_dir)) if d.data_dir else None
    try:
        splits = load_dataset(d.name, data_dir, val_size=_val_size(d.val_size), seed=d.seed, options=d.kwargs)
    except DataNotFound as exc:  # a campaign names its data directory with a key, not with --data-dir
        raise DataError(exc.message, hint=f"set dataset.data_dir=DIR in the config or as an override, DIR being "
                        f"{exc.point_at}; the files are looked up in dataset.data_dir, else ${ENV_DATA_DIR}, else "
                        f"./data (this run looked in {exc.root})") from None
    model, kwargs = build_model(cfg, splits.info)
    example = (splits.val.images[:1] if len(splits.val) else splits.train.images[:1]).float().div(255.0)
    groups = graph.analyze(model, example)
    s = cfg.search_space
    space = build_space(groups, family=s.family, model_name=cfg.model.name, model=model, round_to=s.round_to,
                        min_ratio=s.min_ratio, prune=s.prune, quantize=s.quantize, w_bits=s.w_bits,
                        a_bits=s.a_bits, first_last_min_bits=s.first_last_min_bits, exclude=s.exclude)
    if not space.groups and not space.layers:
        raise ConfigError(f"the search space of {cfg.model.name} is empty (no prunable group, no quantizable layer)",
                          hint="check search_space.prune/quantize/exclude/family")
    train, calib, val, test = make_loaders(cfg, splits)
    inner = make_evaluator(cfg, cfg.evaluator.name, cfg.evaluator.kwargs, model=model, train_loader=train,
                           calib_loader=calib, val_loader=val)
    evaluator = ReproducibleEvaluator(inner, [train, calib], seed=cfg.seed)
    camp = Campaign(cfg, model, kwargs, splits, example, groups, space, evaluator, train, calib, val, test)
    if needs_latency(cfg):
        camp.latency = build_latency_predictor(cfg, model, groups, space, example)
    check_budget(camp.problem, camp.budget(), s.min_ratio)
    if measure_dense:
        camp.dense_accuracy = _dense_accuracy(camp)
    return camp


def needs_latency(cfg: CampaignConfig) -> bool:
    """True when the campaign budgets latency, lists it as an objective or rewards it."""
    o = cfg.objective
    return (o.budget.latency_ms is not None or any(m in ("latency", "latency_ms") for m in o.objectives)
            or o.reward == "latency_aware" or o.kwargs.get("metric") in ("latency", "latency_ms"))


def build_latency_predictor(cfg: CampaignConfig, model: nn.Module, groups: GroupSet, space: SearchSpace,
                            example: torch.Tensor) -> LatencyPredictor:
    """The campaign's latency predictor: the per-layer table and the calibration are read from the campaign
    directory when they were measured there with the same settings, else measured now (once) and saved."""
    import random

    from autoprune import pruning
    from autoprune.deploy import choose_memory_format, deployable
    from autoprune.latency_model import LatencyPredictor
    from autoprune.utils import progress_line

    lc, ec = cfg.latency, cfg.export
    deploy = {"fold_bn": ec.fold_bn, "memory_format": ec.memory_format}

    def build(layout: str) -> Callable[[Mapping[str, int]], nn.Module]:  # the candidate as export writes it
        return lambda w: deployable(pruning.apply(model, groups, dict(w)), example, fold_bn=ec.fold_bn,
                                    memory_format=layout)[0]

    layout = ec.memory_format
    if layout == "auto":  # the dense model's faster layout, as export would choose it; resolved once and kept
        layout = (LatencyPredictor.stored_layout(cfg.out_dir, deploy)
                  or choose_memory_format(build("contiguous")(space.full().widths), example)[0])
    pred = LatencyPredictor(groups, cfg.out_dir, threads=lc.threads, batch=lc.batch, min_run_time=lc.min_run_time,
                            deploy=deploy, layout=layout)
    new = pred.fill(progress=progress_line)
    if new:
        log.info("latency table: timed %d layer configurations on this machine (batch %d, %d thread%s), kept in %s",
                 new, lc.batch, lc.threads, "s" if lc.threads != 1 else "", pred.table.path)
    if new or not pred.load_calibration(lc.calibration):
        rng = random.Random(cfg.seed)  # the dense model, the smallest candidate and random ones in between
        cands = [space.full().widths, space.minimal().widths] + [
            space.widths_for_ratios([rng.uniform(space.min_ratio, 1.0) for _ in space.groups])
            for _ in range(lc.calibration - 2)]
        fit = pred.calibrate(build(layout), cands, example, progress=progress_line)
        log.info("latency model: calibrated on %d candidates timed end to end (median error %.1f %%, largest "
                 "%.1f %%)", fit["candidates"], 100 * fit["median_rel_error"], 100 * fit["max_rel_error"])
    pred.build = build(layout)
    return pred


def _dense_accuracy(camp: Campaign) -> float:
    """Validation accuracy of the dense model under the campaign's evaluator (read from ``space.json`` if there)."""
    path = camp.out_dir / SPACE_FILE
    if path.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            stored = json.loads(path.read_text())
            if stored.get("evaluator") == camp.config.evaluator.name and stored["dense"]["accuracy"] is not None:
                return float(stored["dense"]["accuracy"])
    return float(camp.evaluator.evaluate(camp.model, key="dense").accuracy)


def space_summary(camp: Campaign) -> dict[str, Any]:
    """What reports and exports need to know about the problem without rebuilding it (``space.json``)."""
    from autoprune.search_spaces import producers

    groups = {g.id: g for g in camp.groups.prunable()}
    return {
        "campaign": camp.config.name,
        "model": camp.config.model.name,
        "dataset": camp.config.dataset.name,
        "evaluator": camp.config.evaluator.name,
        "min_ratio": camp.space.min_ratio,
        "budget": camp.budget().to_dict(),
        "groups": [{"id": g.group_id, "size": g.size, "widths": [g.widths[0], g.widths[-1]],
                    "layers": producers(groups[g.group_id]) if g.group_id in groups else []}
                   for g in camp.space.groups],
        "layers": [{"layer": lc.layer, "w_bits": list(lc.w_bits), "a_bits": list(lc.a_bits)}
                   for lc in camp.space.layers],
        "dense": {**camp.problem.dense_cost.to_dict(), "accuracy": camp.dense_accuracy},
        "input_shape": list(camp.example_input.shape[1:]),
    }


def open_campaign(cfg: CampaignConfig, *, argv: Sequence[str] | None = None, role: str = "search",
                  searchers: Sequence[tuple[str, str]] | None = None) -> tuple[Campaign, TrialStore]:
    """Validate, build and open a campaign; write its provenance.

    Everything that can fail because of the input fails here, before anything is written to the store or
    the campaign directory (the directory is only created): bad names (checked first, before anything is
    loaded: :func:`autoprune.names.check_names`), an unwritable output directory, a missing checkpoint, a
    storage URL that cannot be reached, an impossible budget, or a config that contradicts the campaign already in the
    directory. A directory whose store holds no trial yet (a run that failed before its first trial) takes the
    new problem (:func:`~autoprune.provenance.check_identity`).

    Args:
        cfg: The validated config.
        argv: The command line (for ``command.txt``); ``None`` takes the process's.
        role: ``search``, ``worker``, ``compare`` or ``quickstart`` (recorded in ``commands.log``).
        searchers: ``(where, name)`` of the searchers that will run (see :func:`autoprune.names.check_names`);
            default: the config's ``searcher.name``.
    """
    check_names(cfg, searchers)
    prepare_out_dir(cfg.out_dir)
    check_checkpoint(cfg)
    store = open_store(cfg)
    with storage_errors(repr(store)):  # a disk that fills or a server that goes away now: a clear error
        replaced = [] if stored_trials(store) else identity_changes(cfg)
        if replaced:  # nothing computed, nothing to protect: forget the old problem before its dense score is read
            release_identity(cfg)
            log.warning("note: %s holds no trial yet, so it takes this config's problem (%s)", cfg.out_dir,
                        "; ".join(replaced[:3]) + (" ..." if len(replaced) > 3 else ""))
        camp = build_campaign(cfg)
        check_identity(cfg, store)  # after the build, so that e.g. an impossible budget is named as such
    try:
        write_provenance(cfg, argv, role=role, new_identity=bool(replaced))
        write_atomic(cfg.out_dir / SPACE_FILE, json.dumps(space_summary(camp), indent=2) + "\n")
    except OSError as exc:  # a full disk or a directory that became read-only: nothing in the store changed
        raise (storage_error(exc, str(cfg.out_dir)) or AutoPruneError(
            f"cannot write the campaign files in {cfg.out_dir}: {exc.strerror or exc}",
            hint="check the disk space and permissions of the output directory")) from exc
    log.info("%s", campaign_summary(camp))
    return camp, store


def make_campaign_searcher(camp: Campaign, store: TrialStore, name: str, *, seed: int,
                           kwargs: Mapping[str, Any] | None = None,
                           callbacks: Sequence[Callable[[Searcher, TrialRecord], None]] = (),
                           n_trials: int | None = None, problem: Problem | None = None) -> Searcher:
    """The searcher ``name`` on the campaign's problem and store, sharing its study with the campaign's other
    processes (:class:`~autoprune.workers.SharedStudy` with the config's ``workers`` settings).

    With one process it proposes exactly what the plain searcher would.

    Raises:
        ConfigError: Unknown searcher (with the choices) or bad hyper-parameters.
    """
    from autoprune.agents.base import SEARCHERS, load_builtin_searchers

    load_builtin_searchers()
    cls = SEARCHERS.get(name)
    cfg = camp.config
    sharing = SharedStudy(WorkerIdentity.current(), heartbeat_seconds=cfg.workers.heartbeat_seconds,
                          stale_seconds=cfg.workers.stale_seconds)
    args: dict[str, Any] = {"store": store, "objective": camp.objective(), "budget": camp.budget(),
                            "n_trials": n_trials if n_trials is not None else cfg.n_trials,
                            "time_limit": cfg.time_limit, "seed": int(seed), "callbacks": list(callbacks),
                            **dict(kwargs or {}), "sharing": sharing}
    prob = problem if problem is not None else camp.problem
    try:
        inspect.signature(cls).bind(prob, **args)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for searcher {name!r}: {exc}", hint=f"{name}: {SEARCHERS.help(name)}"
                          ) from None
    return cls(prob, **args)


# ---------------------------------------------------------------------------------------------------------
# Running


class ProgressBar:
    """A searcher callback showing trials done and the best-so-far reward, accuracy and MACs.

    How is decided once, when it is created, by :func:`autoprune.utils.progress_mode` (``quiet`` forces
    silence): a tqdm bar on a terminal; on a file or a pipe (CI, ``nohup``, ``tee``) one flushed stdout line per
    trial with its number, state, reward, validation accuracy and MACs, the best so far and the elapsed time
    (:meth:`trial_line`); nothing under ``--quiet``.
    """

    def __init__(self, desc: str, total: int | None, initial: int, dense_macs: int, *, quiet: bool = False,
                 earlier: Iterable[TrialRecord] = ()) -> None:
        from autoprune.utils import progress_mode

        self.mode = "quiet" if quiet else progress_mode()
        self.enabled = self.mode != "quiet"
        self.desc = desc
        self.total = total
        self.dense_macs = max(1, int(dense_macs))
        self.best: TrialRecord | None = None
        for record in earlier:  # a resumed search: the best so far includes the trials of earlier runs
            self._offer(record)
        self.started = time.perf_counter()
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=desc, total=total, initial=initial, dynamic_ncols=True, leave=True)
        elif self.mode == "lines":
            done = f"{initial}/{total}" if total is not None else str(initial)
            finished = total is not None and initial >= total
            print(f"{desc}: {done} trials done" + (" already" if finished else
                                                   f"{', resuming' if initial else ''} (a line per trial)"),
                  flush=True)

    def _figures(self, record: TrialRecord) -> str:
        parts = [] if record.reward is None else [f"reward {record.reward:.4f}"]
        if record.result is not None:
            parts.append(f"val acc {100 * record.result.accuracy:.2f} %")
        parts.append(f"MACs {record.cost.macs / self.dense_macs:.1%}")
        if record.cost.latency_ms is not None:
            parts.append(f"latency {record.cost.latency_ms:.3g} ms (predicted)")
        return ", ".join(parts)

    def trial_line(self, searcher: Searcher, record: TrialRecord) -> str:
        """The line of a finished trial: ``tpe seed0 trial 5/12 (#6) complete: reward ..., val acc ..., MACs ...;
        best #2: ...; 35 s``."""
        done = f"{searcher.n_done}/{self.total}" if self.total is not None else str(searcher.n_done)
        reason = f" ({record.reason})" if record.reason and record.state != "complete" else ""
        best = (f"best #{self.best.number}: {self._figures(self.best)}" if self.best is not None
                else "no feasible candidate yet")
        return (f"{self.desc} trial {done} (#{record.number}) {record.state}{reason}: {self._figures(record)}; "
                f"{best}; {time.perf_counter() - self.started:.0f} s")

    def _offer(self, record: TrialRecord) -> None:
        ok = record.state == "complete" and record.result is not None and record.reward is not None
        if ok and (self.best is None or record.reward > self.best.reward):  # type: ignore[operator]
            self.best = record

    def __call__(self, searcher: Searcher, record: TrialRecord) -> None:
        self._offer(record)
        if self.mode == "lines":
            print(self.trial_line(searcher, record), flush=True)
        if self.bar is None:
            return
        self.bar.n = searcher.n_done
        if self.best is not None and self.best.result is not None:
            self.bar.set_postfix_str(f"best reward {self.best.reward:.4f} acc {self.best.result.accuracy:.4f} "
                                     f"MACs {self.best.cost.macs / self.dense_macs:.1%}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


def run_search(camp: Campaign, store: TrialStore, *, searcher: str | None = None, seed: int | None = None,
               kwargs: Mapping[str, Any] | None = None, quiet: bool = False, n_trials: int | None = None,
               fresh_problem: bool = False) -> SearchResult:
    """Run (or resume, or join) one searcher's study of the campaign.

    Args:
        camp: The campaign.
        store: Its trial store.
        searcher: Searcher name (default: ``searcher.name`` of the config).
        seed: Seed (default: the config's).
        kwargs: Hyper-parameters (default: the config's for that searcher).
        quiet: No progress bar.
        n_trials: Total trials of the study (default: the config's).
        fresh_problem: Use a problem with an empty evaluation cache (fair timings in comparisons).

    Returns:
        The :class:`~autoprune.agents.base.SearchResult`; ``stop_reason == "interrupted"`` after Ctrl-C.
    """
    cfg = camp.config
    name = searcher or cfg.searcher.name
    seed = cfg.seed if seed is None else int(seed)
    hp = cfg.searcher.kwargs_for(name) if kwargs is None else dict(kwargs)
    problem = camp.new_problem() if fresh_problem else camp.problem
    total = n_trials if n_trials is not None else cfg.n_trials
    from autoprune import utils

    bar: ProgressBar | None = None
    try:
        done = _counted(store, name, seed)  # reads the store: a server lost since the start is a clear error too
        bar = ProgressBar(f"{name} seed{seed}", total, min(done, total), problem.dense_cost.macs, quiet=quiet,
                          earlier=store.trials(name, seed) if done else ())
        s = make_campaign_searcher(camp, store, name, seed=seed, kwargs=hp, callbacks=[bar], n_trials=total,
                                   problem=problem)
        # the evaluators' own per-batch bars would flicker under the search's bar
        with utils.quiet(), sigterm_as_interrupt():
            return s.run()
    except Exception as exc:  # a locked database, a full disk, a lost server: a clear error, trials kept
        err = storage_error(exc, repr(store))
        if err is None:
            raise
        raise err from exc
    finally:
        if bar is not None:
            bar.close()


def _counted(store: TrialStore, searcher: str, seed: int) -> int:
    name = store.study_name(searcher, seed)
    if name not in store.study_names():
        return 0
    return len(TrialStore.counted(optuna.load_study(study_name=name, storage=store.storage)))


def summarize(result: SearchResult, dense_macs: int, *, val_label: str = "val accuracy") -> str:
    """One line about a search result: trials, stop reason, best reward / accuracy / MACs.

    Args:
        result: The search result.
        dense_macs: MACs of the dense model (for the percentage).
        val_label: What the validation accuracy is called (:func:`val_label` adds a caveat when the figure is
            optimistic).
    """
    head = f"{result.searcher} seed{result.seed}: {len(result.trials)} trials ({result.stop_reason})"
    b = result.best
    if b is None or b.result is None:
        return head + ", no feasible evaluated candidate yet"
    return (f"{head}, best #{b.number}: reward {b.reward:.4f}, {val_label} {100 * b.result.accuracy:.2f} %, "
            f"MACs {b.cost.macs:,} ({b.cost.macs / max(1, dense_macs):.1%} of dense)")


def latency_summary(camp: Campaign, best: TrialRecord) -> str | None:
    """The best candidate's and the dense model's latency, predicted and measured now (interleaved), in one line;
    ``None`` when the campaign does not predict latency."""
    pred = camp.latency
    if pred is None:
        return None
    res = pred.measure(None, {"best": best.candidate.widths, "dense": camp.space.full().widths},
                       camp.example_input)
    b, d = res["best"], res["dense"]
    return (f"latency (batch {pred.batch}, {pred.threads} thread{'s' if pred.threads != 1 else ''}): best "
            f"#{best.number} predicted {b['predicted_ms']:.3g} ms, measured {b['measured_ms']:.3g} ms; dense "
            f"predicted {d['predicted_ms']:.3g} ms, measured {d['measured_ms']:.3g} ms")


def val_caveat(cfg: CampaignConfig) -> str | None:
    """Why the campaign's validation accuracies may be optimistic; ``None`` when they are not.

    The validation split is carved from the dataset's training set (``dataset.val_size``, ``dataset.seed``).
    Its accuracies are honest only if the model's weights never trained on those images: no checkpoint, or an
    autoprune checkpoint (written by ``autoprune train`` / ``quickstart``) that records training on this
    dataset with the same validation size and seed. Any other checkpoint — another format, such as the
    pretrained CIFAR-10 ResNets (akamaster's, trained on all 50,000 training images), or an autoprune one
    trained on another split or not saying which — may have seen them.
    """
    from autoprune.models.checkpoint import checkpoint_metadata

    ckpt = cfg.model.checkpoint
    if not ckpt:
        return None
    try:
        meta = checkpoint_metadata(_resolve_path(ckpt))
    except AutoPruneError:
        return None  # the build reports the broken checkpoint
    if meta.get("format") != "autoprune":  # e.g. akamaster's: not trained by autoprune on this split
        return "carved from the training set the pretrained weights were trained on: optimistic"
    extra = meta.get("extra") or {}
    if not {"dataset", "val_size", "seed"} <= set(extra):
        return "carved from the training set; the checkpoint does not record its training split: maybe optimistic"
    d = cfg.dataset
    if (extra["dataset"] != d.name or _val_size(extra["val_size"]) != _val_size(d.val_size)
            or int(extra["seed"] or 0) != int(d.seed)):
        return "carved from the training set; the checkpoint was trained with another validation split: optimistic"
    return None


def val_label(cfg: CampaignConfig) -> str:
    """``"val accuracy"``, with the :func:`val_caveat` in parentheses when there is one."""
    caveat = val_caveat(cfg)
    return "val accuracy" + (f" ({caveat})" if caveat else "")


def searched(space: SearchSpace) -> str:
    """What a search space searches, e.g. ``"9 channel groups"`` or ``"9 channel groups and the bits of 20
    layers"`` (only what is searched)."""
    parts = []
    if space.groups:
        parts.append(f"{len(space.groups)} channel group{'s' if len(space.groups) != 1 else ''}")
    if space.layers:
        parts.append(f"the bits of {len(space.layers)} layer{'s' if len(space.layers) != 1 else ''}")
    return " and ".join(parts) or "nothing"


def dense_score_label(camp: Campaign) -> str:
    """How the dense model's validation accuracy was measured: with the campaign's evaluator, like every
    candidate (after batch-norm re-estimation for ``adaptive_bn``)."""
    name = camp.config.evaluator.name
    if name == "adaptive_bn":
        batches = getattr(camp.evaluator.inner, "batches", None)
        on = f" on {batches} training batches" if batches else ""
        return f"after batch-norm re-estimation{on} (adaptive_bn: how every candidate is scored)"
    return f"under the {name} evaluator (how every candidate is scored)"


def campaign_summary(camp: Campaign) -> str:
    """The line a campaign starts with: model, data, what is searched, the dense model's MACs and accuracy.

    A model whose channels are mostly frozen says so, with the causes (:meth:`GroupSet.frozen_warning`).
    """
    cfg = camp.config
    acc = camp.dense_accuracy
    caveat = val_caveat(cfg)
    score = ("dense val accuracy not measured" if acc is None else
             f"dense val accuracy {100 * acc:.2f} % {dense_score_label(camp)}")
    return (f"campaign {cfg.name}: {cfg.model.name} on {cfg.dataset.name}, {searched(camp.space)} searched, "
            f"dense {camp.problem.dense_cost.macs:,} MACs, {score}"
            + (f"; the validation images are {caveat}" if caveat else "")
            + (f"; WARNING: {frozen}" if (frozen := camp.groups.frozen_warning()) else ""))


def compare(camp: Campaign, store: TrialStore, agents: Sequence[str], seeds: Sequence[int], *,
            quiet: bool = False, reference: str = "uniform",
            on_result: Callable[[SearchResult], None] | None = None) -> pd.DataFrame:
    """Run every agent for every seed on the identical problem, budget and evaluator; return the leaderboard.

    The ``reference`` searcher (default ``uniform``) also runs (once, with the first seed) if it is not among
    ``agents``: its accuracy is the target of the leaderboard's "to reach the baseline" columns. Runs that
    already finished are resumed instantly (their studies are complete), so re-running continues a comparison.

    Returns:
        The leaderboard DataFrame of the agents and the reference (see :func:`autoprune.report.leaderboard`);
        stops early (returning the partial leaderboard) if a run is interrupted, with
        ``attrs["interrupted"] = True``.

    Raises:
        ConfigError: Unknown agent names (checked before anything runs) or an empty list.
    """
    from autoprune.agents.base import SEARCHERS, load_builtin_searchers
    from autoprune.report import leaderboard

    load_builtin_searchers()
    agents = [a.strip() for a in agents if a.strip()]
    if not agents:
        raise ConfigError("no agents to compare", hint="e.g. --agents tpe,random,uniform")
    for a in [*agents, reference]:
        SEARCHERS.get(a)
    if not seeds:
        raise ConfigError("no seeds to compare", hint="--seeds N with N ≥ 1")
    runs = [(a, s) for a in agents for s in seeds]
    if reference not in agents:
        runs.insert(0, (reference, seeds[0]))
    interrupted = False
    for agent, seed in runs:
        result = run_search(camp, store, searcher=agent, seed=seed, quiet=quiet, fresh_problem=True)
        if on_result is not None:
            on_result(result)
        if result.stop_reason == "interrupted":
            interrupted = True
            break
    shown = [*agents, *([] if reference in agents else [reference])]
    board = leaderboard(store.to_dataframe(), agents=shown, seeds=list(seeds), reference=reference)
    board.attrs["interrupted"] = interrupted
    return board
