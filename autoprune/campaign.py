"""Campaigns: one validated :class:`~autoprune.config.CampaignConfig` wired into a running search.

This module owns the path from a campaign file to trials in the store, and nothing about how candidates are
proposed, built or scored:

* :func:`open_campaign` checks everything a user can get wrong *before* anything is written (output directory,
  checkpoint, storage URL, budget, a config that contradicts the campaign already on disk), then builds the
  model, data, search space, evaluator and :class:`~autoprune.problem.Problem` (:class:`Campaign`) and writes
  the provenance beside the results: ``config.resolved.yaml``, ``command.txt`` (plus ``commands.log``),
  ``environment.json`` (package versions, git commit) and ``space.json`` (groups, layers, dense cost and
  accuracy, read by reports and exports).
* :func:`run_search` runs one searcher on the campaign's store (a SQLite file ``<out>/trials.db`` by default,
  or the ``storage`` URL, e.g. PostgreSQL, shared by many workers), with a progress bar and clean Ctrl-C.
* :func:`compare` runs several searchers × seeds on the identical problem and budget and returns the
  leaderboard (:func:`autoprune.report.leaderboard`).

**Resume.** A campaign is resumed by running the same command again: each ``(searcher, seed)`` study keeps its
finished trials, the searcher restores its state from the store, and ``n_trials`` is the total of the study.

**Workers.** Several processes (``autoprune search`` plus any number of ``autoprune worker``) may share one
study. Each running trial carries its worker's host, process id and a heartbeat (refreshed by a thread every
``workers.heartbeat_seconds``). A process counts the finished trials *plus* the live running trials of the
others towards ``n_trials``, and after asking for a trial checks that fewer than ``n_trials`` trials precede it
(by trial number) — so the study ends with exactly ``n_trials`` counted trials, none lost, none twice.
Running trials whose process is gone (same host) or whose heartbeat is older than ``workers.stale_seconds``
are marked ``interrupted`` and proposed again.

**Reproducibility.** Every evaluation is a function of the candidate alone (:class:`ReproducibleEvaluator`
restarts the data loaders and the torch RNG for each call), so an interrupted and resumed search, a second
run with the same seed and every agent of a comparison see the same scores for the same candidates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from autoprune.config import CampaignConfig, load_config
from autoprune.errors import AutoPruneError, CheckpointError, ConfigError
from autoprune.store import COUNTED_STATES, TrialStore, storage_error
from autoprune.types import TrialRecord

log = logging.getLogger("autoprune.campaign")

CONFIG_FILE = "config.resolved.yaml"
COMMAND_FILE = "command.txt"
HISTORY_FILE = "commands.log"
ENVIRONMENT_FILE = "environment.json"
SPACE_FILE = "space.json"
STORE_FILE = "trials.db"
#: Config sections that define the problem: a campaign directory refuses a config that changes them.
IDENTITY_KEYS = ("model", "dataset", "search_space", "objective", "evaluator")
#: Trial user attributes written by campaign processes (see the module docstring, "Workers").
WORKER_ATTR = "autoprune.worker"
HEARTBEAT_ATTR = "autoprune.heartbeat"
_PACKAGES = ("autoprune", "torch", "numpy", "optuna", "sqlalchemy", "pandas", "matplotlib", "scikit-learn",
             "stable-baselines3", "gymnasium", "pyyaml", "psycopg2-binary")


# ---------------------------------------------------------------------------------------------------------
# Output directory, storage, provenance


def prepare_out_dir(path: str | os.PathLike[str]) -> Path:
    """Create the campaign directory and check that files can be written in it.

    Raises:
        AutoPruneError: If it cannot be created or written (names the directory and the reason).
    """
    out = Path(path).expanduser()
    hint = "set output_dir=<a writable directory> (or run from a directory where results/ can be written)"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutoPruneError(f"cannot create the output directory {out}: {exc.strerror or exc}", hint=hint) from None
    probe = out / f".autoprune-write-test-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise AutoPruneError(f"the output directory {out} is not writable: {exc.strerror or exc}", hint=hint) from None
    return out


def storage_location(cfg: CampaignConfig) -> str:
    """The trial store of ``cfg``: its ``storage`` URL/path, else ``<out_dir>/trials.db``."""
    return cfg.storage or str(cfg.out_dir / STORE_FILE)


def open_store(cfg: CampaignConfig) -> TrialStore:
    """Open (creating if needed) the campaign's trial store; RL artifacts go to ``<out_dir>/artifacts``.

    Processes opening a new store at the same moment are serialised by the store itself.

    Raises:
        AutoPruneError: Unwritable location, missing database driver, a server that cannot be reached, or a
            database locked by another program for longer than ``storage_timeout`` seconds.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return TrialStore(storage_location(cfg), campaign=cfg.name, artifact_root=cfg.out_dir / "artifacts",
                      timeout=cfg.storage_timeout)


def _identity(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: data.get(k) for k in IDENTITY_KEYS}


def check_identity(cfg: CampaignConfig) -> None:
    """Refuse a config whose problem (model, data, space, objective, evaluator) differs from the stored one.

    Trials scored on another problem would silently mix with this campaign's; ``n_trials``, ``time_limit``,
    the searcher, the seed, the storage and the export settings may change between runs.

    Raises:
        ConfigError: Naming the differing keys.
    """
    path = cfg.out_dir / CONFIG_FILE
    if not path.is_file():
        return
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the campaign's stored config {path}: {exc}",
                          hint="restore the file, or use a new campaign name") from None
    mine = json.loads(json.dumps(_identity(cfg.to_dict())))
    theirs = json.loads(json.dumps(_identity(stored), default=str))
    diff = []
    for key in IDENTITY_KEYS:
        a, b = theirs.get(key) or {}, mine.get(key) or {}
        for sub in sorted(set(a) | set(b)):
            if a.get(sub) != b.get(sub):
                diff.append(f"{key}.{sub}: {a.get(sub)!r} → {b.get(sub)!r}")
    if diff:
        raise ConfigError(f"campaign {cfg.name!r} in {cfg.out_dir} was run with another problem: "
                          + "; ".join(diff[:6]) + (" ..." if len(diff) > 6 else ""),
                          hint="keep those settings to resume, or start a new campaign (name=<new> or "
                          "output_dir=<dir>); the stored trials were left untouched")


def git_commit(path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``path`` (default: this package), or ``None``."""
    where = Path(path) if path is not None else Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "--no-optional-locks", "-C", str(where), "status", "--porcelain",
                                 "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def environment_info() -> dict[str, Any]:
    """Python, platform, package versions, git commit, host and time (written to ``environment.json``)."""
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "packages": versions,
        "git": git_commit(),
        "host": socket.gethostname(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def command_line(argv: Sequence[str] | None) -> str:
    """The exact command as a shell line (``autoprune`` + ``argv``; the process's own argv if ``None``)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return shlex.join(["autoprune", *args])


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_provenance(cfg: CampaignConfig, argv: Sequence[str] | None, *, role: str = "search") -> None:
    """Write ``config.resolved.yaml``, ``command.txt``, ``environment.json`` and append to ``commands.log``.

    A ``worker`` only appends to the log (and writes the other files if the directory is new), so that the
    command that started the campaign stays in ``command.txt``.
    """
    out = cfg.out_dir
    line = command_line(argv)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(out / HISTORY_FILE, "a", encoding="utf-8") as fh:
        fh.write(f"{stamp}\t{role}\t{socket.gethostname()}:{os.getpid()}\tcwd={os.getcwd()}\t{line}\n")
    if role == "worker" and (out / CONFIG_FILE).is_file():
        return
    _atomic_text(out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _atomic_text(out / COMMAND_FILE, f"# run from {os.getcwd()}\n{line}\n")
    _atomic_text(out / ENVIRONMENT_FILE, json.dumps(environment_info(), indent=2) + "\n")


def load_resolved(campaign_dir: str | os.PathLike[str], overrides: Sequence[str] = ()) -> CampaignConfig:
    """The config a campaign directory was run with (``config.resolved.yaml``), with ``overrides`` applied.

    ``output_dir`` is pointed at ``campaign_dir`` so that a moved directory still finds its files.

    Raises:
        ConfigError: If the directory holds no campaign.
    """
    d = Path(campaign_dir)
    path = d / CONFIG_FILE
    if not d.is_dir():
        raise ConfigError(f"campaign directory {d} does not exist",
                          hint="pass the directory of a campaign, e.g. results/<campaign name>")
    if not path.is_file():
        raise ConfigError(f"{d} holds no campaign ({CONFIG_FILE} is missing)",
                          hint="run `autoprune search CONFIG` first, and pass its results/<name> directory")
    cfg = load_config(path, overrides)
    return dataclasses.replace(cfg, output_dir=str(d))


# ---------------------------------------------------------------------------------------------------------
# Building the problem


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

    def __init__(self, inner: Any, loaders: Sequence[Any], seed: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = getattr(inner, "device", None)
        self.loaders = [ld for ld in loaders if hasattr(ld, "set_epoch")]
        self.seed = int(seed)

    def evaluate(self, model: nn.Module, *, key: str | None = None, report: Any = None) -> Any:
        """Score ``model`` with the inner evaluator from a fixed data and RNG state."""
        for ld in self.loaders:
            ld.set_epoch(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.inner.evaluate(model, key=key, report=report)


class FirstEpoch:
    """A view of a loader that always iterates its first epoch (same batches every time)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
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
    """

    config: CampaignConfig
    model: nn.Module
    model_kwargs: dict[str, Any]
    splits: Any
    example_input: torch.Tensor
    groups: Any
    space: Any
    evaluator: Any
    train_loader: Any
    calib_loader: Any
    val_loader: Any
    test_loader: Any
    dense_accuracy: float | None = None
    _problem: Any = field(default=None, repr=False)

    @property
    def out_dir(self) -> Path:
        """The campaign directory."""
        return self.config.out_dir

    def new_problem(self) -> Any:
        """A fresh :class:`~autoprune.problem.Problem` (empty evaluation cache) on the shared model and space."""
        from autoprune.problem import Problem

        return Problem(self.model, self.groups, self.space, self.evaluator, self.example_input,
                       importance=self.config.search_space.importance, round_to=self.config.search_space.round_to,
                       calib_loader=FirstEpoch(self.calib_loader))

    @property
    def problem(self) -> Any:
        """The campaign's problem (built once)."""
        if self._problem is None:
            self._problem = self.new_problem()
        return self._problem

    def budget(self) -> Any:
        """The budget of the objective as an :class:`~autoprune.objectives.Budget`."""
        from autoprune.objectives import Budget

        b = dataclasses.asdict(self.config.objective.budget)
        return Budget.from_config({k: v for k, v in b.items() if v is not None})

    def objective(self) -> Any:
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


def build_model(cfg: CampaignConfig, info: Any) -> tuple[nn.Module, dict[str, Any]]:
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


def make_loaders(cfg: CampaignConfig, splits: Any) -> tuple[Any, Any, Any, Any]:
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
                   train_loader: Any, calib_loader: Any, val_loader: Any) -> Any:
    """An evaluator from :data:`autoprune.evaluate.EVALUATORS` with the campaign's loaders.

    Calibration-only evaluators (``adaptive_bn``) get the un-augmented training loader, training evaluators
    the augmented one; ``infcop`` also gets the dense model and the un-augmented loader for its flow subset.
    """
    from autoprune.evaluate import EVALUATORS
    from autoprune.evaluate import make_evaluator as make

    cls = EVALUATORS.get(name)
    kw = dict(settings)
    if cfg.device is not None:
        kw.setdefault("device", cfg.device)
    if cfg.time_limit_per_trial is not None:
        kw.setdefault("timeout", cfg.time_limit_per_trial)
    params = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            params |= set(inspect.signature(init).parameters)
    if "dense" in params and "references" not in kw:
        kw.setdefault("dense", model)
    if "flow_loader" in params:
        kw.setdefault("flow_loader", calib_loader)
    trains = name not in ("plain", "adaptive_bn")
    return make(name, train_loader if trains else calib_loader, val_loader, **kw)


def check_budget(problem: Any, budget: Any, min_ratio: float) -> None:
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
            attr = {"size_bytes": "bytes"}.get(metric, metric)
            have, full = getattr(floor, attr, None), getattr(dense, attr, None)
            if have is None or full is None or have <= limit:
                continue
            parts.append(f"objective.budget.{metric}={getattr(budget, metric):g} allows {limit:,.0f} but the "
                         f"smallest achievable is {have:,} ({have / full:.1%} of the dense model's {full:,}; every "
                         f"group at keep ratio {min_ratio})")
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
    from autoprune.data import load_dataset
    from autoprune.search_spaces import build_space

    d = cfg.dataset
    data_dir = str(_resolve_path(d.data_dir)) if d.data_dir else None
    splits = load_dataset(d.name, data_dir, val_size=_val_size(d.val_size), seed=d.seed)
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
    check_budget(camp.problem, camp.budget(), s.min_ratio)
    if measure_dense:
        camp.dense_accuracy = _dense_accuracy(camp)
    return camp


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


def open_campaign(cfg: CampaignConfig, *, argv: Sequence[str] | None = None, role: str = "search"
                  ) -> tuple[Campaign, TrialStore]:
    """Validate, build and open a campaign; write its provenance.

    Everything that can fail because of the input fails here, before anything is written to the store or
    the campaign directory (the directory is only created): an unwritable output directory, a missing
    checkpoint, a storage URL that cannot be reached, bad names, an impossible budget, or a config that
    contradicts the campaign already in the directory.

    Args:
        cfg: The validated config.
        argv: The command line (for ``command.txt``); ``None`` takes the process's.
        role: ``search``, ``worker``, ``compare`` or ``quickstart`` (recorded in ``commands.log``).
    """
    prepare_out_dir(cfg.out_dir)
    check_checkpoint(cfg)
    store = open_store(cfg)
    camp = build_campaign(cfg)
    check_identity(cfg)
    try:
        write_provenance(cfg, argv, role=role)
        _atomic_text(cfg.out_dir / SPACE_FILE, json.dumps(space_summary(camp), indent=2) + "\n")
    except OSError as exc:  # a full disk or a directory that became read-only: nothing in the store changed
        raise (storage_error(exc, str(cfg.out_dir)) or AutoPruneError(
            f"cannot write the campaign files in {cfg.out_dir}: {exc.strerror or exc}",
            hint="check the disk space and permissions of the output directory")) from exc
    log.info("campaign %s: %s on %s, %d groups / %d layers searched, dense %s MACs, val accuracy %.4f",
             cfg.name, cfg.model.name, cfg.dataset.name, len(camp.space.groups), len(camp.space.layers),
             f"{camp.problem.dense_cost.macs:,}", camp.dense_accuracy or float("nan"))
    return camp, store


# ---------------------------------------------------------------------------------------------------------
# Workers: running-trial ownership, heartbeats, stale trials


@dataclass(frozen=True)
class WorkerIdentity:
    """Who runs a trial: host name, process id and a random id for this process."""

    host: str
    pid: int
    id: str

    @classmethod
    def current(cls) -> WorkerIdentity:
        """The identity of this process."""
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:12])

    def to_dict(self) -> dict[str, Any]:
        """JSON form stored on the trial."""
        return {"host": self.host, "pid": self.pid, "id": self.id}


def pid_alive(pid: Any) -> bool:
    """True if process ``pid`` exists on this host and is not a zombie."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def is_stale(trial: FrozenTrial, *, me: WorkerIdentity, stale_seconds: float, now: float | None = None) -> bool:
    """Whether a RUNNING trial has been abandoned by its process.

    It is when its worker is this host's process that no longer exists (or this very process, for a trial it
    is not running), or when its last heartbeat (its start, if it has none) is older than ``stale_seconds``.
    """
    now = time.time() if now is None else now
    w = trial.user_attrs.get(WORKER_ATTR)
    same_host = isinstance(w, dict) and w.get("host") == me.host
    if same_host and (w.get("pid") == me.pid or not pid_alive(w.get("pid"))):  # type: ignore[union-attr]
        return True
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    if isinstance(beat, int | float):
        last = float(beat)
    elif trial.datetime_start is not None:
        last = trial.datetime_start.timestamp()
    else:
        return False
    return now - last > stale_seconds


def fail_stale(study: optuna.Study, *, me: WorkerIdentity, stale_seconds: float) -> int:
    """Mark the abandoned RUNNING trials of ``study`` as ``interrupted``; return how many."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t, me=me, stale_seconds=stale_seconds):
            continue
        storage = study._storage
        try:
            storage.set_trial_user_attr(t._trial_id, "state", "interrupted")
            storage.set_trial_user_attr(t._trial_id, "reason", "its process stopped (killed or crashed)")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except (RuntimeError, ValueError):  # finished in the meantime by its owner
            continue
        n += 1
    return n


class _NoSlotLeft(Exception):
    """The trial just asked for lies beyond ``n_trials`` (other workers took the last slots)."""


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold back Ctrl-C while the store is written; raise the ``KeyboardInterrupt`` afterwards.

    A no-op outside the main thread (signal handlers live there).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    previous = signal.getsignal(signal.SIGINT)

    def hold(signum: int, frame: Any) -> None:
        pending.append(frame)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):
                previous(signal.SIGINT, pending[0])
            else:
                raise KeyboardInterrupt


class _Heartbeat:
    """Refreshes the heartbeat of the searcher's running trial every ``interval`` seconds (daemon thread)."""

    def __init__(self, searcher: Any, interval: float) -> None:
        self.searcher = searcher
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="autoprune-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            trial = self.searcher._running
            if trial is None:
                continue
            with contextlib.suppress(Exception):  # the trial may have finished meanwhile
                trial.set_user_attr(HEARTBEAT_ATTR, time.time())


class CampaignSearcherMixin:
    """Makes a searcher safe to share its study with other processes (see the module docstring).

    Mixed in front of a registered searcher class by :func:`make_campaign_searcher`. With one process it
    proposes exactly what the plain searcher would.
    """

    worker: WorkerIdentity
    heartbeat_seconds: float = 10.0
    stale_seconds: float = 120.0

    def _occupied(self, study: optuna.Study, before: int | None = None) -> int:
        """Counted trials plus live RUNNING trials of other processes (only numbers < ``before``)."""
        mine = getattr(self._running, "number", None)  # type: ignore[attr-defined]
        now = time.time()
        n = 0
        for t in study.get_trials(deepcopy=False):
            if before is not None and t.number >= before:
                continue
            if t.state.is_finished():
                n += t.user_attrs.get("state") in COUNTED_STATES
            elif t.state == TrialState.RUNNING and t.number != mine:
                n += not is_stale(t, me=self.worker, stale_seconds=self.stale_seconds, now=now)
        return n

    @property
    def n_done(self) -> int:
        """Counted trials of the study plus the trials other live workers are running now."""
        study = self.study  # type: ignore[attr-defined]
        return self._count if study is None else self._occupied(study)  # type: ignore[attr-defined]

    def _ask_owned(self) -> optuna.Trial:
        """``study.ask()``, but the trial is created already tagged with this worker (one transaction), so a
        process killed at any moment never leaves a running trial without an owner."""
        study: optuna.Study = self.study  # type: ignore[attr-defined]
        template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, values=None,
                               datetime_start=datetime.now(), datetime_complete=None, params={}, distributions={},
                               user_attrs={WORKER_ATTR: self.worker.to_dict(), HEARTBEAT_ATTR: time.time()},
                               system_attrs={}, intermediate_values={}, trial_id=-1)
        local = getattr(study, "_thread_local", None)
        if local is not None and hasattr(local, "cached_all_trials"):
            local.cached_all_trials = None  # as Study.ask does
        trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
        return optuna.Trial(study, trial_id)

    def new_trial(self) -> optuna.Trial:
        """Ask for a trial owned by this worker; give it back if ``n_trials`` trials precede it."""
        with deferred_sigint():
            trial = self._running = self._ask_owned()
        n_trials = self.n_trials  # type: ignore[attr-defined]
        if n_trials is not None and self._occupied(self.study, before=trial.number) >= n_trials:  # type: ignore[attr-defined]
            with deferred_sigint():
                self._abandon_running("n_trials already reached by other workers")  # type: ignore[attr-defined]
            raise _NoSlotLeft
        return trial

    def _record(self, *args: Any, **kwargs: Any) -> TrialRecord:
        with deferred_sigint():
            return super()._record(*args, **kwargs)  # type: ignore[misc]

    def run(self) -> Any:
        """As :meth:`Searcher.run`, but only abandoned trials are failed and other workers' trials count."""
        self._stop_event.clear()  # type: ignore[attr-defined]
        self.stop_reason = ""
        self._consecutive_failures = 0
        self._pruner = self.make_pruner()  # type: ignore[attr-defined]
        self.study = self.store.study(self.name, self.seed, directions=self.directions(),  # type: ignore[attr-defined]
                                      pruner=self._pruner)
        fail_stale(self.study, me=self.worker, stale_seconds=self.stale_seconds)
        self._count = len(TrialStore.counted(self.study))
        self._start = time.monotonic()
        beat = _Heartbeat(self, self.heartbeat_seconds)
        beat.start()
        try:
            self._run()  # type: ignore[attr-defined]
            if not self.stop_reason and not self.should_stop():  # type: ignore[attr-defined]
                self.stop_reason = "exhausted"
        except KeyboardInterrupt:
            self.stop_reason = "interrupted"
            self._abandon_running("interrupted by the user (KeyboardInterrupt)")  # type: ignore[attr-defined]
        except _NoSlotLeft:
            self.stop_reason = "n_trials"
        finally:
            beat.stop()
            self.save_state()  # type: ignore[attr-defined]
        return self.result()  # type: ignore[attr-defined]


_CLASS_CACHE: dict[type, type] = {}


def _campaign_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"Campaign{cls.__name__}", (CampaignSearcherMixin, cls), {"__doc__": cls.__doc__})
    return _CLASS_CACHE[cls]


def make_campaign_searcher(camp: Campaign, store: TrialStore, name: str, *, seed: int,
                           kwargs: Mapping[str, Any] | None = None,
                           callbacks: Sequence[Callable[[Any, TrialRecord], None]] = (),
                           n_trials: int | None = None, problem: Any = None) -> Any:
    """The searcher ``name`` on the campaign's problem and store, made worker-safe.

    Raises:
        ConfigError: Unknown searcher (with the choices) or bad hyper-parameters.
    """
    from autoprune.agents.base import SEARCHERS, load_builtin_searchers

    load_builtin_searchers()
    cls = SEARCHERS.get(name)
    cfg = camp.config
    args: dict[str, Any] = {"store": store, "objective": camp.objective(), "budget": camp.budget(),
                            "n_trials": n_trials if n_trials is not None else cfg.n_trials,
                            "time_limit": cfg.time_limit, "seed": int(seed), "callbacks": list(callbacks),
                            **dict(kwargs or {})}
    prob = problem if problem is not None else camp.problem
    try:
        inspect.signature(cls).bind(prob, **args)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for searcher {name!r}: {exc}", hint=f"{name}: {SEARCHERS.help(name)}"
                          ) from None
    searcher = _campaign_class(cls)(prob, **args)
    searcher.worker = WorkerIdentity.current()
    searcher.heartbeat_seconds = cfg.workers.heartbeat_seconds
    searcher.stale_seconds = cfg.workers.stale_seconds
    return searcher


# ---------------------------------------------------------------------------------------------------------
# Running


class ProgressBar:
    """A searcher callback showing trials done and the best-so-far reward, accuracy and MACs.

    A tqdm bar on a terminal; silent when stderr is not a terminal or ``quiet``.
    """

    def __init__(self, desc: str, total: int | None, initial: int, dense_macs: int, *, quiet: bool = False) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self.dense_macs = max(1, int(dense_macs))
        self.best: TrialRecord | None = None
        self.bar = None
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=desc, total=total, initial=initial, dynamic_ncols=True, leave=True)

    def __call__(self, searcher: Any, record: TrialRecord) -> None:
        ok = record.state == "complete" and record.result is not None and record.reward is not None
        if ok and (self.best is None or record.reward > self.best.reward):  # type: ignore[operator]
            self.best = record
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


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C inside the block (clean stop of batch jobs); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_search(camp: Campaign, store: TrialStore, *, searcher: str | None = None, seed: int | None = None,
               kwargs: Mapping[str, Any] | None = None, quiet: bool = False, n_trials: int | None = None,
               fresh_problem: bool = False) -> Any:
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
    done = _counted(store, name, seed)
    bar = ProgressBar(f"{name} seed{seed}", total, min(done, total), problem.dense_cost.macs, quiet=quiet)
    s = make_campaign_searcher(camp, store, name, seed=seed, kwargs=hp, callbacks=[bar], n_trials=total,
                               problem=problem)
    from autoprune import utils

    inner_quiet = utils._QUIET  # the evaluators' own per-batch bars would flicker under the search's bar
    utils.set_quiet(True)
    try:
        with sigterm_as_interrupt():
            return s.run()
    except Exception as exc:  # a locked database, a full disk, a lost server: a clear error, trials kept
        err = storage_error(exc, repr(store))
        if err is None:
            raise
        raise err from exc
    finally:
        utils.set_quiet(inner_quiet)
        bar.close()


def _counted(store: TrialStore, searcher: str, seed: int) -> int:
    name = store.study_name(searcher, seed)
    if name not in store.study_names():
        return 0
    return len(TrialStore.counted(optuna.load_study(study_name=name, storage=store.storage)))


def summarize(result: Any, dense_macs: int) -> str:
    """One line about a search result: trials, stop reason, best reward / accuracy / MACs."""
    head = f"{result.searcher} seed{result.seed}: {len(result.trials)} trials ({result.stop_reason})"
    b = result.best
    if b is None or b.result is None:
        return head + ", no feasible evaluated candidate yet"
    return (f"{head}, best #{b.number}: reward {b.reward:.4f}, val accuracy {b.result.accuracy:.4f}, "
            f"MACs {b.cost.macs:,} ({b.cost.macs / max(1, dense_macs):.1%} of dense)")


def compare(camp: Campaign, store: TrialStore, agents: Sequence[str], seeds: Sequence[int], *,
            quiet: bool = False, reference: str = "uniform", on_result: Callable[[Any], None] | None = None) -> Any:
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
