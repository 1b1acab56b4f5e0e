"""Campaign configuration: YAML → typed, validated, frozen config objects.

A campaign is described by one YAML file (loaded with ``yaml.safe_load`` only). Every key is checked against
the dataclasses below: unknown keys and wrong types are rejected with the full key path and the allowed keys
or values. ``key=value`` overrides from the command line are applied before validation
(``searcher.name=tpe``, ``objective.budget.macs=0.3``, ``n_trials=20``); values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from autoprune.errors import ConfigError
from autoprune.objectives import Budget
from autoprune.plugins import load_entry_points, load_plugins

# Numbers bigger than this are certainly a typo (and would overflow torch/numpy ints downstream).
_MAX_INT = 2**53
#: Bounds on a config document: its text, and the values it expands to (YAML anchors/aliases are counted at
#: every place they are used, so a "billion laughs" document is refused instead of expanding downstream).
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 64
_MAX_SEED = 2**32 - 1  # NumPy's and Optuna's samplers refuse anything else

log = logging.getLogger("autoprune.config")


@dataclass(frozen=True)
class ModelConfig:
    """The model to compress.

    Attributes:
        name: Zoo name (``autoprune list models``), ``package.module:callable``, or ``torchvision:<name>``.
        checkpoint: Optional checkpoint to load (akamaster, plain state dict, or autoprune format).
        kwargs: Extra keyword arguments for the model constructor.
    """

    name: str
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetConfig:
    """The data: ``val`` is carved from the training set; ``test`` is used only by final reports.

    Attributes:
        name: Dataset name (``autoprune list datasets``).
        data_dir: Where the files are (relative paths are relative to the working directory).
        val_size: Validation samples carved from the training set: a count (int) or a fraction (float < 1);
            ``null`` takes the dataset's default (5000 for CIFAR, 10 % otherwise).
        batch_size: Batch size of the training/calibration loader.
        eval_batch_size: Batch size of the validation and test loaders.
        seed: Seed of the validation split and of the loaders.
        kwargs: Options of the dataset: ``image_folder``'s ``image_size``, ``channels``, ``test_size``,
            ``hflip``, ``crop_padding``; the keyword arguments of a ``package.module:callable`` dataset. The
            other built-in datasets take none (checked when the data is loaded).
    """

    name: str
    data_dir: str | None = None
    val_size: int | float | None = None
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)


def _default_criterion() -> str:
    # the library's one default; imported on first use so that importing this module stays free of torch
    from autoprune.importance import DEFAULT_CRITERION

    return DEFAULT_CRITERION


@dataclass(frozen=True)
class SearchSpaceConfig:
    """Which groups/layers are searched and how.

    ``importance`` defaults to :data:`autoprune.importance.DEFAULT_CRITERION`, the library's default criterion.
    """

    family: str | None = None
    round_to: int = 1
    min_ratio: float = 0.2
    quantize: bool = False
    prune: bool = True
    w_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8])
    a_bits: list[int | None] = field(default_factory=lambda: [None])
    first_last_min_bits: int = 8
    exclude: list[str] = field(default_factory=list)
    importance: str = field(default_factory=_default_criterion)


@dataclass(frozen=True)
class ObjectiveConfig:
    """The reward (single objective) or objectives (multi-objective searchers) and the budget.

    ``budget`` is validated straight into an :class:`~autoprune.objectives.Budget` (its keys and value rule:
    a value ≤ 1 is a fraction of the dense model's cost, > 1 an absolute number).
    """

    reward: str = "r_err"
    kwargs: dict[str, Any] = field(default_factory=dict)
    objectives: list[str] = field(default_factory=lambda: ["accuracy", "macs"])
    budget: Budget = field(default_factory=Budget)


@dataclass(frozen=True)
class EvaluatorConfig:
    """How candidates are scored during the search."""

    name: str = "adaptive_bn"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SearcherConfig:
    """The searcher and its hyper-parameters (override the defaults in ``agents/hyperparams``).

    Attributes:
        name: Searcher name (``autoprune list searchers``). Default ``gp`` (Optuna's Gaussian-process sampler):
            the best search score within 32 and within 100 candidates at 50 % and at 30 % of the MACs, both
            seeds (``results/benchmarks/search_budget.md``, "Best searcher by budget"); the campaign's default
            budget is 20 trials.
        kwargs: Hyper-parameters of ``name``. They belong to the searcher the config file names: an override
            of ``searcher.name`` moves them to ``agent_kwargs[<the file's searcher>]`` (with a note) instead of
            handing them to the other searcher.
        agent_kwargs: Hyper-parameters per searcher name (``{ddpg: {...}}``), used whichever searcher runs
            (``search`` with ``name`` overridden, ``compare``); ``kwargs`` still applies to ``name``.
    """

    name: str = "gp"
    kwargs: dict[str, Any] = field(default_factory=dict)
    agent_kwargs: dict[str, Any] = field(default_factory=dict)

    def kwargs_for(self, agent: str) -> dict[str, Any]:
        """Hyper-parameters of searcher ``agent``: ``agent_kwargs[agent]``, plus ``kwargs`` if it is ``name``."""
        out = dict(self.agent_kwargs.get(agent) or {})
        if agent == self.name:
            out.update(self.kwargs)
        return out


#: What the export does with BN statistics after its fine-tune (``export.bn_after_finetune``).
BnAfter = Literal["keep", "recalibrate"]
BN_AFTER: tuple[str, ...] = typing.get_args(BnAfter)


@dataclass(frozen=True)
class ExportConfig:
    """Final fine-tune and artifacts of ``autoprune export``.

    Attributes:
        finetune: ``fixed`` (``epochs`` of SGD with a cosine schedule: the ``full`` evaluator), ``infcop``
            (fine-tune until the flow is consistent with the dense network's: the ``infcop`` evaluator) or
            ``none``.
        epochs: Epochs of the ``fixed`` fine-tune (a fraction runs part of an epoch).
        lr: Peak learning rate of the fine-tune (cosine to 0). Default 0.01: after 3 distilled epochs it led the
            swept rates on both pruned ResNets at 50 % of the MACs, bracketed on each side (ResNet-20: 0.001–0.1,
            ResNet-56: 0.001–0.03; ``results/benchmarks/recovery.md``).
        kwargs: More settings of the fine-tuning evaluator (e.g. ``max_steps`` for ``infcop``).
        calibration_batches: Training batches used to re-estimate BN statistics and to calibrate activation
            quantizers.
        formats: Deployment artifacts (``pt2``, ``torchscript``, ``onnx``); empty for none.
        latency: Measure CPU latency of the original and the exported model for the model card.
        distill: Weight ``α`` in [0, 1] of knowledge distillation from the dense model in the fine-tune
            (:mod:`autoprune.distill`; 0 = plain cross-entropy). Default 0.9: on ResNet-20 at 50 % of the MACs
            it led plain cross-entropy at every one of 30 equal epochs, by 0.5–1.6 points on the full test set
            (88.71 % against 87.60 % after 30), on ResNet-56 from epoch 10 on (91.27 % against 90.31 % after 30;
            at about equal compute 90.96 % after 19 distilled epochs), both curves read with re-estimated BN
            statistics (``results/benchmarks/recovery.md``). With the statistics kept, 30 distilled epochs
            reached 91.15 % (ResNet-20, dense 91.73 %) and 93.19 % (ResNet-56, dense 93.39 %).
        distill_temperature: Temperature ``T`` of the distillation.
        fold_bn: Fold every BatchNorm that follows a conv into it in the exported float model (exact in eval
            mode and faster on CPUs: results/benchmarks/latency.md); quantized exports always fold.
        memory_format: Memory layout of the exported float model: ``auto`` (both timed on this machine at batch
            1 and 64, the faster kept: :mod:`autoprune.deploy`), ``contiguous`` or ``channels_last``; recorded
            in the artifact, which loads in it.
        bn_after_finetune: The BN statistics of the fine-tuned network: ``keep`` (the running averages training
            left, the default) or ``recalibrate`` (re-estimated on ``calibration_batches`` un-augmented training
            batches, as the search scores candidates; the behaviour before 2026-12-06). Re-estimating after
            training cost the pruned CIFAR ResNet-20 2.1 points of test accuracy after one distilled epoch
            (89.15 → 87.05 %, 100 batches 86.97 %: ``results/benchmarks/bn_after_finetune.md``) and 2.4 points
            after the 30-epoch distilled recipe (91.15 → 88.71 %; ResNet-56 93.19 → 91.27 %,
            ``results/benchmarks/recovery.md``); a likely reason: training normalised augmented batches, and the
            un-augmented training images it has fitted are not like test images.
    """

    finetune: Literal["fixed", "infcop", "none"] = "fixed"
    epochs: float = 1.0
    lr: float = 0.01
    kwargs: dict[str, Any] = field(default_factory=dict)
    calibration_batches: int = 20
    formats: list[str] = field(default_factory=lambda: ["pt2"])
    latency: bool = True
    distill: float = 0.9
    distill_temperature: float = 4.0
    fold_bn: bool = True
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    bn_after_finetune: BnAfter = "keep"


@dataclass(frozen=True)
class LatencyConfig:
    """How a candidate's latency is predicted when the campaign budgets or optimises it (``objective.budget.
    latency_ms``, the ``latency`` objective, the ``latency_aware`` reward): per-layer timings on this machine plus
    a calibration on end-to-end timings (:mod:`autoprune.latency_model`), kept in the campaign directory.

    Attributes:
        threads: Intra-op threads of every timing (the prediction is for this thread count).
        batch: Batch size of the timings (the prediction is for this batch).
        calibration: Candidates timed end to end to calibrate the prediction (the dense model and random
            candidates of the search space).
        min_run_time: Seconds of timed runs per table entry and per calibration round.
    """

    threads: int = 1
    batch: int = 1
    calibration: int = 8
    min_run_time: float = 0.05


@dataclass(frozen=True)
class WorkersConfig:
    """How processes sharing one campaign recognise each other's dead trials.

    Every running trial carries its worker's host, process id and a heartbeat refreshed every
    ``heartbeat_seconds``. A running trial counts as abandoned (and is marked ``interrupted``) when its
    process is gone (same host) or its heartbeat is older than ``stale_seconds``.
    """

    heartbeat_seconds: float = 10.0
    stale_seconds: float = 120.0


@dataclass(frozen=True)
class CampaignConfig:
    """A whole search campaign.

    ``time_limit_per_trial`` (seconds, default none) stops an evaluation that runs longer and records the
    candidate as a failed trial; ``storage_timeout`` (seconds) bounds the wait for a database lock held by
    another program or for a server to answer before the command fails with a clear error. ``plugins`` lists
    modules to import before any name is looked up (their searchers, evaluators, rewards, criteria, search
    spaces, models and datasets register themselves; :mod:`autoprune.plugins`, docs/EXTENDING.md).
    """

    name: str
    model: ModelConfig
    dataset: DatasetConfig
    search_space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    searcher: SearcherConfig = field(default_factory=SearcherConfig)
    n_trials: int = 20
    time_limit: float | None = None
    time_limit_per_trial: float | None = None
    seed: int = 0
    storage: str | None = None
    storage_timeout: float = 60.0
    output_dir: str | None = None
    device: str | None = None
    export: ExportConfig = field(default_factory=ExportConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    plugins: list[str] = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        """Where results go (``results/<name>`` unless ``output_dir`` is set)."""
        return Path(self.output_dir) if self.output_dir else Path("results") / self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what is written to ``config.resolved.yaml``)."""
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:  # noqa: C901 - one branch per supported type
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                if arg is not type(None):
                    errors.append(exc)
        if len(errors) == 1:  # Optional[X]: X's message is the precise one
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{path}: {value!r} is not allowed", hint=f"allowed values: {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path}: expected a mapping with string keys, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > _MAX_INT:
                raise ConfigError(f"{path}: {value} is out of range",
                                  hint=f"integers up to {_MAX_INT:,} in magnitude")
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            f = float(value)
            if f != f or f in (float("inf"), float("-inf")) or abs(f) > _MAX_INT:
                raise ConfigError(f"{path}: {value!r} is not a finite number in range",
                                  hint=f"give a finite number, at most {_MAX_INT:,} in magnitude")
            return f
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _flow(value: Any) -> str:
    """``value`` as one line of YAML (how it is written in an override)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _value_hint(where: str, f: dataclasses.Field[Any], tp: Any) -> str:
    """The hint of a value error at ``where``: what the key takes, and its default as an example."""
    default: Any = f.default
    if default is dataclasses.MISSING and typing.get_origin(tp) in (list, dict):
        default = f.default_factory()  # type: ignore[misc]  # only the list/dict factories (others may be heavy)
    if typing.get_origin(tp) is dict:
        return f"{where} takes a mapping, e.g. {where}.KEY=VALUE or {where}={{KEY: VALUE}}"
    if default is dataclasses.MISSING or default is None:
        return f"{where} takes {_type_name(tp)}"
    return f"{where} takes {_type_name(tp)}, e.g. {where}={_flow(default)} (the default)"


def _build(cls: type, data: Any, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}",
                          hint=f"write {path or 'the config'} as a mapping of its keys: {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            did = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key.{did}", hint=f"allowed keys here: {', '.join(fields)}")
        try:
            kwargs[key] = _convert(value, hints[key], where)
        except ConfigError as exc:
            if exc.hint is not None:
                raise
            raise ConfigError(exc.message, hint=_value_hint(where, fields[key], hints[key])) from None
        if cls is Budget:  # the budget's own value rule, reported with the key path
            Budget.check_limit(key, kwargs[key], where)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        where = path or "config"
        need = ("a campaign needs at least name, model.name and dataset.name" if cls is CampaignConfig
                else "set " + ", ".join(f"{where}.{m}" for m in missing))
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}",
                          hint=f"{need}; see configs/ for examples")
    return cls(**kwargs)


def _check_values(cfg: CampaignConfig) -> None:
    if cfg.n_trials < 1:
        raise ConfigError(f"n_trials: must be ≥ 1, got {cfg.n_trials}",
                          hint="n_trials is the number of candidates a study evaluates in total, e.g. n_trials=20")
    if cfg.time_limit is not None and cfg.time_limit <= 0:
        raise ConfigError(f"time_limit: must be > 0 seconds, got {cfg.time_limit}",
                          hint="e.g. time_limit=3600, or null for no limit (the search then stops at n_trials)")
    if not 0 < cfg.search_space.min_ratio <= 1:
        raise ConfigError(f"search_space.min_ratio: must be in (0, 1], got {cfg.search_space.min_ratio}",
                          hint="the narrowest width a group may keep, as a fraction of its channels, "
                          "e.g. search_space.min_ratio=0.2")
    if cfg.search_space.round_to < 1:
        raise ConfigError(f"search_space.round_to: must be ≥ 1, got {cfg.search_space.round_to}",
                          hint="widths are rounded to multiples of it, e.g. search_space.round_to=8; 1 keeps every "
                          "width")
    if cfg.dataset.batch_size < 1:
        raise ConfigError(f"dataset.batch_size: must be ≥ 1, got {cfg.dataset.batch_size}",
                          hint="e.g. dataset.batch_size=128")
    if cfg.dataset.eval_batch_size < 1:
        raise ConfigError(f"dataset.eval_batch_size: must be ≥ 1, got {cfg.dataset.eval_batch_size}",
                          hint="e.g. dataset.eval_batch_size=512")
    val = cfg.dataset.val_size
    if val is not None and (val <= 0 or (isinstance(val, float) and val >= 1)):
        raise ConfigError(f"dataset.val_size: must be a count ≥ 1 or a fraction in (0, 1), got {val}",
                          hint="e.g. 5000 or 0.1, or null for the dataset's default")
    _check_campaign_extras(cfg)
    for b in cfg.search_space.w_bits:
        if not 2 <= b <= 8:
            raise ConfigError(f"search_space.w_bits: {b} is outside 2..8",
                              hint="weight bit-widths are 2 to 8, e.g. search_space.w_bits=[4,6,8]")
    for b in cfg.search_space.a_bits:
        if b is not None and not 2 <= b <= 8:
            raise ConfigError(f"search_space.a_bits: {b} is outside 2..8 (or null for float)",
                              hint="activation bit-widths are 2 to 8 or null (float), e.g. "
                              "search_space.a_bits=[null,8]")
    for where, seed in (("seed", cfg.seed), ("dataset.seed", cfg.dataset.seed)):
        if not 0 <= seed <= _MAX_SEED:
            raise ConfigError(f"{where}: must be in 0..{_MAX_SEED}, got {seed}",
                              hint=f"seeds are non-negative 32-bit integers (NumPy's rule), e.g. {where}=0")
    if not cfg.name or any(c in cfg.name for c in "/\\\0") or cfg.name in (".", ".."):
        raise ConfigError(f"name: {cfg.name!r} cannot be used as a directory name",
                          hint="use letters, digits, '-', '_' and '.'")


def _check_campaign_extras(cfg: CampaignConfig) -> None:
    """Checks of the searcher, export, workers and time-limit settings."""
    if cfg.time_limit_per_trial is not None and cfg.time_limit_per_trial <= 0:
        raise ConfigError(f"time_limit_per_trial: must be > 0 seconds, got {cfg.time_limit_per_trial}",
                          hint="or null for no limit (a trial over the limit is recorded as failed)")
    if cfg.storage_timeout <= 0:
        raise ConfigError(f"storage_timeout: must be > 0 seconds, got {cfg.storage_timeout}",
                          hint="seconds to wait for a locked database or a server, e.g. storage_timeout=60")
    for agent, kw in cfg.searcher.agent_kwargs.items():
        if not isinstance(kw, Mapping):
            raise ConfigError(f"searcher.agent_kwargs.{agent}: expected a mapping of hyper-parameters, got {kw!r}",
                              hint=f"one mapping per searcher, e.g. searcher.agent_kwargs.{agent}.KEY=VALUE")
    if cfg.export.epochs <= 0:
        raise ConfigError(f"export.epochs: must be > 0, got {cfg.export.epochs}",
                          hint="e.g. export.epochs=30 (a fraction runs part of an epoch), or export.finetune=none")
    if cfg.export.lr <= 0:
        raise ConfigError(f"export.lr: must be > 0, got {cfg.export.lr}", hint="e.g. export.lr=0.01")
    if not 0.0 <= cfg.export.distill <= 1.0 or cfg.export.distill_temperature <= 0:
        raise ConfigError(f"export.distill must be in [0, 1] and export.distill_temperature > 0, got "
                          f"{cfg.export.distill} and {cfg.export.distill_temperature}",
                          hint="e.g. export.distill=0.9 export.distill_temperature=4, or export.distill=0 (off)")
    if cfg.export.calibration_batches < 1:
        raise ConfigError(f"export.calibration_batches: must be ≥ 1, got {cfg.export.calibration_batches}",
                          hint="e.g. export.calibration_batches=20")
    lat = cfg.latency
    if lat.threads < 1 or lat.batch < 1 or lat.calibration < 3 or lat.min_run_time <= 0:
        raise ConfigError(f"latency: need threads ≥ 1, batch ≥ 1, calibration ≥ 3 and min_run_time > 0, got "
                          f"{lat.threads}, {lat.batch}, {lat.calibration} and {lat.min_run_time}",
                          hint="e.g. latency.threads=1 latency.batch=1 latency.calibration=8 (the defaults)")
    if cfg.workers.heartbeat_seconds <= 0 or cfg.workers.stale_seconds <= cfg.workers.heartbeat_seconds:
        raise ConfigError("workers: need heartbeat_seconds > 0 and stale_seconds > heartbeat_seconds, got "
                          f"{cfg.workers.heartbeat_seconds} and {cfg.workers.stale_seconds}",
                          hint="e.g. workers.heartbeat_seconds=10 workers.stale_seconds=120 (the defaults)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a", "b", "c"], value) with the value read as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value", hint="e.g. searcher.name=tpe")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key", hint="e.g. n_trials=50 or searcher.name=tpe")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({getattr(exc, 'problem', None) or exc})",
                          hint=f"quote the value, e.g. {key}='...' (with the shell's quotes around the whole "
                          "argument)") from None
    except RecursionError:
        raise ConfigError(f"override {key!r}: value nests too deeply",
                          hint="campaign values need only a few levels") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key=value`` overrides applied (nested keys with dots)."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node.get(p, {}), dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {prefix} is not a mapping",
                                  hint=f"{prefix} holds a single value: set it with {prefix}=VALUE")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _searcher_kwargs_apart(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``overrides`` to ``data``, keeping ``searcher.kwargs`` with the searcher they were written for.

    The ``searcher.kwargs`` of a config belong to the config's own ``searcher.name``. When the overrides name
    another searcher, those settings move to ``searcher.agent_kwargs.<the config's searcher>`` (where
    ``compare`` still finds them) instead of reaching a searcher that does not take them, and one note says
    so; ``searcher.kwargs.KEY=VALUE`` overrides belong to the searcher the overrides name.
    """
    out = apply_overrides(dict(data), overrides)
    before, after = data.get("searcher"), out.get("searcher")
    if not isinstance(before, Mapping) or not isinstance(after, Mapping):
        return out
    owner, now = before.get("name", SearcherConfig.name), after.get("name", SearcherConfig.name)
    kwargs, agents = before.get("kwargs"), before.get("agent_kwargs") or {}
    if (owner == now or not isinstance(owner, str) or not kwargs or not isinstance(kwargs, Mapping)
            or not isinstance(agents, Mapping) or not isinstance(agents.get(owner) or {}, Mapping)):
        return out  # nothing to move (or malformed: validation names the problem)
    searcher = {k: v for k, v in before.items() if k != "kwargs"}
    searcher["agent_kwargs"] = {**agents, owner: {**(agents.get(owner) or {}), **kwargs}}
    log.warning("note: the config's searcher.kwargs %s are %s's settings and are not applied to %s (kept as "
                "searcher.agent_kwargs.%s; set %s's own with searcher.kwargs.KEY=VALUE)",
                _flow(dict(kwargs)), owner, now, owner, now)
    return apply_overrides({**data, "searcher": searcher}, overrides)


def check_bounded(data: Any, where: str = "config") -> None:
    """Refuse data that expands to more than :data:`MAX_CONFIG_NODES` values or nests deeper than
    :data:`MAX_CONFIG_DEPTH` (shared sub-objects, i.e. YAML aliases, count once per use).

    Raises:
        ConfigError: Naming the limit that was hit.
    """
    stack: list[tuple[Any, int]] = [(data, 0)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            raise ConfigError(f"{where} expands to more than {MAX_CONFIG_NODES:,} values (YAML anchors/aliases "
                              "repeated too often?)", hint="write the config out without nested aliases")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where} nests deeper than {MAX_CONFIG_DEPTH} levels",
                              hint="campaign configs need only a few levels")
        if isinstance(node, Mapping):
            stack.extend((v, depth + 1) for v in node.values())
            nodes += len(node)
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1) for v in node)


def config_from_dict(data: Any, overrides: Sequence[str] = ()) -> CampaignConfig:
    """Validate plain data (e.g. parsed YAML) into a :class:`CampaignConfig`.

    The modules listed under ``plugins`` and the installed ``autoprune.plugins`` entry points are imported here
    (:func:`autoprune.plugins.load_plugins`), before any name of the config is looked up in a registry.

    Raises:
        ConfigError: Anything wrong with the data, including documents that expand too much
            (:func:`check_bounded`), and a plugin module that cannot be imported.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"a campaign config must be a YAML mapping, got {type(data).__name__}",
                          hint="see configs/ for examples")
    check_bounded(data)
    data = _searcher_kwargs_apart(data, overrides)
    check_bounded(data)
    cfg = _build(CampaignConfig, data, "")
    # the plugins register their names before anything looks a name up (also when a campaign is reopened
    # from its config.resolved.yaml); installed plugin packages come in through their entry points
    load_plugins(cfg.plugins)
    load_entry_points()
    _check_values(cfg)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> CampaignConfig:
    """Read, override and validate a campaign YAML file.

    Raises:
        ConfigError: If the file is missing, is not valid YAML, or fails validation (the message names the
            key path and the allowed keys/values).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist", hint="see configs/ for examples") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc}",
                          hint="pass a readable UTF-8 YAML file (a directory or a binary file does not work)") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(p)!r} is {len(text):,} characters; the limit is {MAX_CONFIG_BYTES:,}",
                          hint="a campaign config is a few dozen lines; check that this is the right file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: malformed YAML{where}: {getattr(exc, 'problem', exc)}",
                          hint="fix the syntax there (indentation, brackets, quotes); see configs/ for examples"
                          ) from None
    except RecursionError:
        raise ConfigError(f"{p}: YAML nesting is too deep", hint="campaign configs need only a few levels") from None
    return config_from_dict(data, overrides)
