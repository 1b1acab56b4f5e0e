"""Exporting a campaign's candidate: final fine-tune, standalone model, deployment artifact and model card.

:func:`export_trial` takes one trial of a campaign (the best, or a given number), rebuilds its physically
smaller network from the dense model, fine-tunes it (``export.finetune``: ``fixed`` epochs with the ``full``
evaluator, ``infcop`` until the flow is consistent, or ``none``), quantizes and calibrates it when the
candidate has bits, and measures its test accuracy. It then writes, under ``<campaign>/export/<trial>/``:

* ``model/`` — the architecture as data (``arch.json`` + ``weights.pt``; :func:`autoprune.pruning.save_pruned`
  or :func:`autoprune.quantization.save_quantized`), loadable with :func:`autoprune.serialize.load_module`
  without the original model code;
* ``deploy/`` — optional deployment artifacts (:func:`autoprune.serialize.export_deployment`);
* ``MODEL_CARD.md`` and ``export.json`` — accuracy, MACs, parameters, size, CPU latency before and after,
  per-layer widths and bits, and the commands that reproduce the model.

Before reporting anything the export **reloads** the written model, re-evaluates it on the test split and
compares: a different accuracy (or outputs that differ beyond float tolerance) raises
:class:`ExportCheckError`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import nn

from autoprune.config import BN_AFTER
from autoprune.deploy import memory_format_summary
from autoprune.errors import AutoPruneError, ConfigError
from autoprune.types import Candidate, QuantSpec
from autoprune.utils import atomic_write, progress_line

if TYPE_CHECKING:
    from autoprune.campaign import Campaign

Loader = Iterable[tuple[torch.Tensor, torch.Tensor]]
#: ``on_epoch(epoch, model_copy, val_accuracy)`` of :func:`finetune` / :func:`export_trial`.
EpochCallback = Callable[[int, nn.Module, float], None]

log = logging.getLogger("autoprune.export")

EXPORT_DIR = "export"
#: The export fine-tune saved after every epoch (removed once the export is complete).
FINETUNE_CHECKPOINT = "finetune.ckpt"
#: Largest tolerated difference between the in-memory and the reloaded model's logits.
LOGIT_TOLERANCE = 1e-4


class ExportCheckError(RuntimeError):
    """The reloaded model does not reproduce the accuracy measured before saving (a bug, not a user error)."""


@dataclass(frozen=True)
class SelectedTrial:
    """The trial being exported.

    Attributes:
        searcher: Searcher of its study.
        seed: Seed of its study.
        number: Trial number in the study.
        candidate: Its candidate.
        accuracy: Validation accuracy found during the search.
        reward: Its reward.
        macs: Closed-form MACs.
    """

    searcher: str
    seed: int
    number: int
    candidate: Candidate
    accuracy: float
    reward: float | None
    macs: int

    @property
    def label(self) -> str:
        """``<searcher>-seed<seed>-trial<number>`` (the export's directory name)."""
        return f"{self.searcher}-seed{self.seed}-trial{self.number}"


_TRIAL_RE = re.compile(r"^(?:(?P<searcher>[A-Za-z0-9_.\-]+)/(?:seed(?P<seed>\d+)/)?)?(?P<number>\d+)$")


def select_trial(df: pd.DataFrame, spec: str = "best", *, searcher: str | None = None,
                 seed: int | None = None) -> SelectedTrial:
    """Pick a trial from the campaign's trial table.

    Args:
        df: :meth:`~autoprune.store.TrialStore.to_dataframe` of the campaign.
        spec: ``best`` (highest reward among completed, feasible trials of every study, ties to higher accuracy),
            ``N`` (trial ``N`` of the study of ``searcher``/``seed``), ``SEARCHER/N`` or ``SEARCHER/seedS/N``.
        searcher: Default searcher for ``N`` (and a filter for ``best``).
        seed: Default seed for ``N`` (and a filter for ``best``).

    Raises:
        ConfigError: Malformed spec, no such trial, or a trial without a usable evaluation.
    """
    from autoprune.report import evaluated

    ok = evaluated(df)
    if spec == "best":
        pick = ok
        if searcher is not None:
            pick = pick[pick["searcher"] == searcher]
        if seed is not None:
            pick = pick[pick["seed"] == seed]
        if pick.empty:
            raise ConfigError("the campaign has no completed candidate within the budget to export",
                              hint="run (or resume) the search first: autoprune search CONFIG")
        pick = pick.assign(_r=pick["reward"].astype(float).fillna(-math.inf), _a=pick["accuracy"].astype(float))
        row = pick.sort_values(["_r", "_a", "macs", "number"], ascending=[False, False, True, True]).iloc[0]
        return _selected(row)
    m = _TRIAL_RE.match(spec.strip())
    if m is None:
        raise ConfigError(f"--trial {spec!r} is not 'best', a trial number, SEARCHER/N or SEARCHER/seedS/N",
                          hint="e.g. --trial best, --trial 12, --trial tpe/seed0/12")
    s = m.group("searcher") or searcher
    sd = int(m.group("seed")) if m.group("seed") is not None else seed
    number = int(m.group("number"))
    rows = df[(df["searcher"] == s) & (df["seed"] == sd) & (df["number"] == number)]
    if rows.empty:
        studies = sorted({f"{a}/seed{b}" for a, b in zip(df["searcher"], df["seed"], strict=True)})
        raise ConfigError(f"no trial {number} in study {s}/seed{sd}", hint=f"studies: {', '.join(studies)}")
    if evaluated(rows).empty:
        row = rows.iloc[0]
        raise ConfigError(f"trial {s}/seed{sd}/{number} is {row['state']} (feasible: {row['feasible']}), "
                          "not a completed candidate within the budget", hint="pick another trial, or --trial best")
    return _selected(rows.iloc[0])


def _selected(row: pd.Series) -> SelectedTrial:
    cand = Candidate.from_dict({"widths": row["widths"] or {}, "bits": row["bits"] or {}})
    reward = None if row["reward"] is None or pd.isna(row["reward"]) else float(row["reward"])
    return SelectedTrial(str(row["searcher"]), int(row["seed"]), int(row["number"]), cand, float(row["accuracy"]),
                         reward, int(row["macs"]))


# ---------------------------------------------------------------------------------------------------------
# Steps


def finetune(camp: Campaign, module: nn.Module, *, method: str, epochs: float, lr: float,
             settings: Mapping[str, Any] | None = None, bn_batches: int = 20,
             checkpoint: Path | None = None, checkpoint_key: str = "",
             on_epoch: EpochCallback | None = None, bn_after: str = "keep") -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a copy of ``module`` with the campaign's training data; return it and what was done.

    BN statistics of the pruned network are re-estimated on ``bn_batches`` training batches before training
    (the running statistics of the dense network no longer fit). After training they are what ``bn_after``
    says: ``keep`` the running averages training left (the default; see :class:`~autoprune.config.ExportConfig`
    ``bn_after_finetune`` for the measurement) or ``recalibrate`` them on ``bn_batches`` un-augmented training
    batches (how the search scored the candidate before it was trained). Progress:
    a line per epoch (or four for less than one epoch) with loss, training accuracy, learning rate and seconds
    (:func:`autoprune.train.watch_training`; not under ``--quiet``).

    Args:
        camp: The :class:`~autoprune.campaign.Campaign`.
        module: The pruned network (not modified).
        method: ``fixed`` (the ``full`` evaluator: ``epochs`` epochs, cosine schedule; a fractional number
            of epochs runs that share of the training set, e.g. ``0.25`` a quarter of an epoch, ``1.5`` one and
            a half), ``infcop`` (the ``infcop`` evaluator) or ``none`` (only the BN re-estimation).
        epochs: Epochs for ``fixed`` (fractions allowed).
        lr: Peak learning rate.
        settings: More evaluator settings (``momentum``, ``max_steps`` for ``infcop``, ...).
        bn_batches: Batches of the BN re-estimation.
        bn_after: ``keep`` or ``recalibrate``: the BN statistics after a ``fixed`` or ``infcop`` fine-tune.
        checkpoint: For ``fixed``: the file the fine-tune is saved to after every epoch; a killed export run
            again continues after the last saved epoch, with the same result.
        checkpoint_key: What is fine-tuned (a checkpoint of another candidate or other settings is not resumed).
        on_epoch: For ``fixed``: called after every completed epoch (after its checkpoint is saved) as
            ``on_epoch(epoch, model, val_accuracy)`` with a **copy** of the network being trained (BN statistics as
            training left them; the caller may change the copy freely) and its validation accuracy. It runs under a
            forked RNG, so the fine-tune is the same with and without it (e.g. to record accuracy-vs-epoch curves;
            nothing is selected on it). An exception it raises stops the fine-tune after that epoch; a later run
            with the same ``checkpoint`` continues from there. Not called for ``infcop`` or ``none``.
    """
    from autoprune.campaign import make_evaluator
    from autoprune.evaluate import TrainingEvaluator, recalibrate_bn
    from autoprune.train import evaluate, watch_training

    if bn_after not in BN_AFTER:
        raise ConfigError(f"unknown BN setting after the fine-tune {bn_after!r}",
                          hint="use " + " or ".join(BN_AFTER))
    def recalibrate(model: nn.Module) -> None:
        camp.calib_loader.set_epoch(0)
        recalibrate_bn(model, camp.calib_loader, bn_batches)

    if method == "none":
        work = copy.deepcopy(module)
        recalibrate(work)
        return work.eval(), {"method": "none", "bn_batches": bn_batches}
    kw: dict[str, Any] = {"lr": lr, "bn_calibration": bn_batches, **dict(settings or {})}
    if method == "fixed":
        name = "full"
        if checkpoint is not None:
            kw.update(checkpoint=str(checkpoint), checkpoint_key=checkpoint_key)
        if float(epochs).is_integer():
            kw.setdefault("epochs", int(epochs))
        else:
            kw.setdefault("epochs", 1)
            kw.setdefault("steps_per_epoch", max(1, round(len(camp.train_loader) * float(epochs))))
    elif method == "infcop":
        name = "infcop"
    else:
        raise ConfigError(f"unknown fine-tune method {method!r}", hint="use fixed, infcop or none")
    work = copy.deepcopy(module)
    per_epoch = len(camp.train_loader)
    total = None
    if name == "full":
        total = int(kw["epochs"]) * int(kw.get("steps_per_epoch", per_epoch))
        progress_line(f"fine-tune: {_epochs_text(total / per_epoch)}, {total:,} SGD steps of batch "
                      f"{camp.config.dataset.batch_size}, lr {kw['lr']:g} cosine; a line per "
                      f"{'epoch' if total >= per_epoch else 'quarter of the run'}", with_bars=True)
    else:
        progress_line(f"fine-tune: {method} (at most {kw.get('max_steps', 'the default number of')} steps, "
                      f"{per_epoch:,} steps per epoch), lr {kw['lr']:g}", with_bars=True)
    with watch_training(work, camp.train_loader, total_steps=total, steps_per_epoch=per_epoch) as loader:
        ev = make_evaluator(camp.config, name, kw, model=camp.model, train_loader=loader,
                            calib_loader=camp.calib_loader, val_loader=camp.val_loader)
        assert isinstance(ev, TrainingEvaluator), f"the {name!r} evaluator does not train"
        torch.manual_seed(camp.config.seed)
        camp.train_loader.set_epoch(0)
        camp.calib_loader.set_epoch(0)
        report: Callable[[int, float], bool] | None = None
        if on_epoch is not None and name == "full":
            callback = on_epoch

            def after_epoch(epoch: int, val_accuracy: float) -> bool:
                with torch.random.fork_rng(devices=[]):
                    callback(epoch, copy.deepcopy(work), val_accuracy)
                return False  # never stops the run early

            report = after_epoch
        outcome = ev.fine_tune(work, report=report)  # trains our own copy in place (we keep the weights)
    work = work.cpu()
    if bn_after == "recalibrate":
        recalibrate(work)
    val = evaluate(work, camp.val_loader, desc="val")
    info = {"method": method, "evaluator": name, "settings": {k: v for k, v in kw.items() if _plain(v)},
            "val_accuracy": float(val.top1), "bn_batches": bn_batches, "bn_after": bn_after,
            **{k: v for k, v in outcome.extra.items() if k in ("steps", "epochs", "stop_reason", "distill",
                                                                "resumed_after_epoch")}}
    if info.get("resumed_after_epoch"):
        progress_line(f"fine-tune: continued after epoch {info['resumed_after_epoch']} saved by an earlier run",
                      with_bars=True)
    return work.eval(), info


def _epochs_text(epochs: float) -> str:
    """``3`` → ``"3 epochs"``, ``1`` → ``"1 epoch"``, ``0.25`` → ``"0.25 of an epoch"``."""
    text = f"{epochs:.3f}".rstrip("0").rstrip(".")
    if epochs < 1:
        return f"{text} of an epoch"
    return f"{text} epoch{'' if epochs == 1 else 's'}"


def _plain(v: Any) -> bool:
    return isinstance(v, str | int | float | bool | type(None)) or (
        isinstance(v, list | tuple) and all(isinstance(x, str | int | float) for x in v))


def quantize(camp: Campaign, module: nn.Module, bits: Mapping[str, QuantSpec], batches: int) -> nn.Module:
    """Fake-quantize ``module`` with ``bits``, calibrate its input quantizers and freeze its weight scales."""
    from autoprune import quantization

    qm = quantization.apply(module, dict(bits), first_last_min_bits=camp.config.search_space.first_last_min_bits)
    camp.calib_loader.set_epoch(0)
    quantization.calibrate(qm, camp.calib_loader, batches=batches)
    quantization.freeze(qm)
    return qm.eval()


def _test(model: nn.Module, loader: Loader) -> tuple[float, float, int]:
    from autoprune.train import evaluate

    m = evaluate(model, loader, desc="test")
    return float(m.top1), float(m.loss), int(m.samples)


def _max_logit_diff(a: nn.Module, b: nn.Module, loader: Loader) -> float:
    x, _ = next(iter(loader))
    with torch.inference_mode():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def _check_onnx(deployment: Mapping[str, Path], model: nn.Module, example: torch.Tensor) -> dict[str, Any] | None:
    """ONNX Runtime's outputs and latency beside torch's for an ONNX artifact (None without one, or without
    onnxruntime: then the reason)."""
    if "onnx" not in deployment:
        return None
    from autoprune import serialize
    from autoprune._imports import is_available

    if not is_available("onnxruntime"):
        return {"skipped": "onnxruntime is not installed (pip install autoprune[onnx])"}
    progress_line("checking model.onnx with ONNX Runtime (batches 1 and 7; latency at batch 1, 1 thread)")
    try:
        return serialize.check_onnx(deployment["onnx"], model, example)
    except AutoPruneError as exc:
        log.warning("ONNX check failed: %s", exc.message)
        return {"error": exc.message.strip().splitlines()[0]}


def _latency(models: Mapping[str, nn.Module], example: torch.Tensor) -> dict[str, dict[str, float]]:
    from autoprune.latency import compare_latency

    res = compare_latency(dict(models), example, rounds=3, threads=1, min_run_time=0.1)
    return {k: {"low_ms": v.low_ms, "median_ms": v.median_ms, "iqr_ms": v.iqr_ms} for k, v in res.items()}


def latency_caveat(lat: Mapping[str, Mapping[str, float]]) -> str:
    """A plain warning when the measured latency difference is within the run-to-run spread ("" otherwise).

    ``lat`` holds ``original`` and ``exported`` timings (``low_ms`` when present, else ``median_ms``, and
    ``iqr_ms``) from interleaved rounds. On a busy machine the spread of single runs can exceed the difference
    between the two models; a ratio printed without that caveat reads as a real slow-down or speed-up.
    """
    o, e = lat.get("original"), lat.get("exported")
    if not o or not e:
        return ""
    key = "low_ms" if "low_ms" in o and "low_ms" in e else "median_ms"
    diff, spread = abs(e[key] - o[key]), max(o["iqr_ms"], e["iqr_ms"])
    if diff > spread:
        return ""
    return (f"Caution: the latency difference ({diff:.3f} ms) is not larger than the run-to-run spread on this "
            f"machine (inter-quartile range up to {spread:.3f} ms), so this measurement cannot tell which model is "
            "faster; time them again on an idle machine (the figures come from interleaved rounds, so background "
            "load hit both alike, but not evenly enough).")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportResult:
    """What :func:`export_trial` wrote and measured.

    Attributes:
        out_dir: The export directory.
        model_dir: The standalone model (``arch.json`` + ``weights.pt``).
        card: ``MODEL_CARD.md``.
        metrics: Everything in ``export.json``.
        deployment: Deployment format → file.
    """

    out_dir: Path
    model_dir: Path
    card: Path
    metrics: dict[str, Any]
    deployment: dict[str, Path] = field(default_factory=dict)


def export_trial(camp: Campaign, trial: SelectedTrial, *, out_dir: str | os.PathLike[str] | None = None,
                 finetune_method: str | None = None, epochs: float | None = None,
                 formats: Sequence[str] | None = None, measure_latency: bool | None = None,
                 command: str = "", search_command: str = "", on_epoch: EpochCallback | None = None) -> ExportResult:
    """Fine-tune, save, reload-check and describe ``trial`` of the campaign ``camp``.

    Args:
        camp: The :class:`~autoprune.campaign.Campaign`.
        trial: The trial (:func:`select_trial`).
        out_dir: Export directory (default ``<campaign>/export/<searcher>-seed<S>-trial<N>``).
        finetune_method: Override of ``export.finetune``.
        epochs: Override of ``export.epochs``.
        formats: Override of ``export.formats`` (deployment artifacts; empty for none).
        measure_latency: Override of ``export.latency``.
        command: The export command line (for the model card).
        search_command: The search command line (for the model card).
        on_epoch: Called after every epoch of a ``fixed`` fine-tune with a copy of the network (see
            :func:`finetune`).

    Raises:
        ExportCheckError: If the reloaded model does not reproduce the measured accuracy.
    """
    from autoprune import pruning, serialize

    cfg = camp.config
    ecfg = cfg.export
    out = Path(out_dir) if out_dir is not None else cfg.out_dir / EXPORT_DIR / trial.label
    out.mkdir(parents=True, exist_ok=True)
    cand = trial.candidate
    camp.space.validate(cand)
    from autoprune.campaign import val_caveat

    caveat = val_caveat(cfg)
    progress_line(f"exporting {trial.label}: val accuracy {100 * trial.accuracy:.2f} % during the search"
                  + (f" ({caveat})" if caveat else ""), with_bars=True)

    pruned = pruning.apply(camp.model, camp.groups, dict(cand.widths), importance=cfg.search_space.importance,
                           round_to=cfg.search_space.round_to)
    tuned, ft_info = finetune(camp, pruned, method=finetune_method or ecfg.finetune,
                              epochs=ecfg.epochs if epochs is None else epochs, lr=ecfg.lr,
                              settings={"distill": ecfg.distill, "distill_temperature": ecfg.distill_temperature,
                                        **ecfg.kwargs},
                              bn_batches=ecfg.calibration_batches, checkpoint=out / FINETUNE_CHECKPOINT,
                              checkpoint_key=f"{trial.label}|{cand.key()}|seed{cfg.seed}", on_epoch=on_epoch,
                              bn_after=ecfg.bn_after_finetune)
    if "val_accuracy" in ft_info:
        bn = ("after batch-norm re-estimation" if ft_info.get("bn_after", "recalibrate") == "recalibrate"
              else "with the batch-norm statistics training left")
        progress_line(f"fine-tuned: val accuracy {100 * ft_info['val_accuracy']:.2f} % {bn}", with_bars=True)
    deploy_info: dict[str, Any] = {"bn_folded": bool(cand.bits), "memory_format": "contiguous"}
    if cand.bits:
        final = quantize(camp, tuned, cand.bits, ecfg.calibration_batches)  # folds BN itself
    else:  # BN folded (exact in eval mode), memory layout chosen by timing: autoprune.deploy
        from autoprune.deploy import deployable

        if ecfg.memory_format == "auto":
            progress_line("choosing the memory layout (timing both at batch 1 and 64)", with_bars=True)
        final, deploy_info = deployable(tuned, camp.example_input, fold_bn=ecfg.fold_bn,
                                        memory_format=ecfg.memory_format)
    progress_line(f"testing on {len(camp.splits.test):,} test images (the exported and the original model)",
                  with_bars=True)
    test_acc, test_loss, n_test = _test(final, camp.test_loader)
    dense_acc, dense_loss, _ = _test(camp.model, camp.test_loader)
    progress_line(f"test accuracy {100 * test_acc:.2f} % (original {100 * dense_acc:.2f} %); saving to {out}",
                  with_bars=True)

    cost, dense_cost = camp.problem.cost(cand), camp.problem.dense_cost
    meta = {"campaign": cfg.name, "model": cfg.model.name, "dataset": cfg.dataset.name, "trial": trial.label,
            "candidate": cand.to_dict(), "test_accuracy": test_acc, "cost": cost.to_dict()}
    model_dir = out / "model"
    if cand.bits:
        from autoprune import quantization

        quantization.save_quantized(final, model_dir, camp.example_input, metadata=meta)
    else:
        pruning.save_pruned(final, model_dir, camp.example_input, metadata=meta)

    reloaded = serialize.load_module(model_dir)
    re_acc, _, _ = _test(reloaded, camp.test_loader)
    diff = _max_logit_diff(final, reloaded, camp.test_loader)
    check = {"test_accuracy": test_acc, "reloaded_test_accuracy": re_acc, "max_logit_difference": diff,
             "passed": re_acc == test_acc and diff <= LOGIT_TOLERANCE}

    deployment: dict[str, Path] = {}
    deploy_error = None
    fmts = list(ecfg.formats if formats is None else formats)
    if fmts:
        try:
            deployment = serialize.export_deployment(reloaded, camp.example_input, out / "deploy", formats=fmts)
        except AutoPruneError as exc:
            deploy_error = exc.message.strip().splitlines()[0]
            log.warning("deployment export failed: %s", exc.message)
    onnx_check = _check_onnx(deployment, reloaded, camp.example_input)
    latency: dict[str, dict[str, float]] = {}
    if ecfg.latency if measure_latency is None else measure_latency:
        progress_line("measuring CPU latency (batch 1, 1 thread)", with_bars=True)
        latency = _latency({"original": camp.model, "exported": reloaded}, camp.example_input)

    metrics: dict[str, Any] = {
        "campaign": cfg.name, "model": cfg.model.name, "dataset": cfg.dataset.name, "trial": trial.label,
        "searcher": trial.searcher, "seed": trial.seed, "number": trial.number,
        "search_val_accuracy": trial.accuracy, "search_reward": trial.reward, "val_caveat": caveat,
        "finetune": ft_info, "test_samples": n_test,
        "original": {"test_accuracy": dense_acc, "test_loss": dense_loss, **dense_cost.to_dict()},
        "exported": {"test_accuracy": test_acc, "test_loss": test_loss, **cost.to_dict(),
                     "file_bytes": _dir_bytes(model_dir)},
        "check": check, "latency": latency,
        "deployment": {k: str(v) for k, v in deployment.items()}, "deployment_error": deploy_error,
        "onnx_check": onnx_check, "bn_folded": deploy_info["bn_folded"], "deploy": deploy_info,
        "candidate": cand.to_dict(), "command": command, "search_command": search_command,
        "files": {"model": str(model_dir), "card": str(out / "MODEL_CARD.md")},
    }
    atomic_write(out / "export.json", json.dumps(metrics, indent=2, default=str) + "\n")
    if not check["passed"]:
        raise ExportCheckError(
            f"the exported model in {model_dir} does not reproduce the measured accuracy: test accuracy "
            f"{test_acc:.6f} before saving, {re_acc:.6f} after reloading (max logit difference {diff:.3g})")
    card = out / "MODEL_CARD.md"
    atomic_write(card, model_card(camp, trial, metrics))
    (out / FINETUNE_CHECKPOINT).unlink(missing_ok=True)  # the export is complete: nothing left to resume
    return ExportResult(out, model_dir, card, metrics, deployment)


# ---------------------------------------------------------------------------------------------------------
# Model card


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1%}" if b else "–"


def layer_table(camp: Campaign, cand: Candidate) -> pd.DataFrame:
    """Per searched group: its producing layers, original and kept width, keep ratio (and bits per layer)."""
    from autoprune.search_spaces import producers

    gs = {g.id: g for g in camp.groups.prunable()}
    rows = []
    for g in camp.space.groups:
        kept = int(cand.widths.get(g.group_id, g.size))
        layers = producers(gs[g.group_id]) if g.group_id in gs else []
        rows.append({"group": g.group_id, "layers": ", ".join(layers), "original": g.size, "kept": kept,
                     "keep ratio": f"{kept / g.size:.2f}"})
    table = pd.DataFrame(rows, columns=["group", "layers", "original", "kept", "keep ratio"])
    if cand.bits:
        bits_rows = [{"layer": name, "w_bits": spec.w_bits, "a_bits": spec.a_bits if spec.a_bits else "float"}
                     for name, spec in cand.bits.items()]
        table.attrs["bits"] = pd.DataFrame(bits_rows, columns=["layer", "w_bits", "a_bits"])
    return table


def _distill_text(d: Mapping[str, Any]) -> str:
    return (f", distilled from the dense model (weight {d['weight']:g}, temperature {d['temperature']:g}; the "
            f"teacher's forward passes took {d['teacher_seconds']:.0f} s)")


def model_card(camp: Campaign, trial: SelectedTrial, m: Mapping[str, Any]) -> str:
    """The Markdown model card of an export."""
    from autoprune.report import to_markdown

    o, e = m["original"], m["exported"]
    lat = m.get("latency") or {}
    caveat = latency_caveat(lat)
    ft = m["finetune"]
    rows = [
        ("test accuracy", _pct(o["test_accuracy"]), _pct(e["test_accuracy"]), ""),
        ("MACs", f"{o['macs']:,}", f"{e['macs']:,}", _ratio(e["macs"], o["macs"])),
        ("parameters", f"{o['params']:,}", f"{e['params']:,}", _ratio(e["params"], o["params"])),
        ("size (bytes, closed form)", f"{o['bytes']:,}", f"{e['bytes']:,}", _ratio(e["bytes"], o["bytes"])),
        ("files on disk (bytes)", "", f"{e['file_bytes']:,}", ""),
    ]
    if lat:
        ol, el = lat["original"], lat["exported"]
        key = "low_ms" if "low_ms" in ol and "low_ms" in el else "median_ms"

        def cell(v: Mapping[str, float]) -> str:
            return (f"{v['low_ms']:.3f} (median {v['median_ms']:.3f} ± {v['iqr_ms']:.3f})" if key == "low_ms"
                    else f"{v['median_ms']:.3f} ± {v['iqr_ms']:.3f}")

        rows.append(("CPU latency, batch 1, 1 thread (ms" + (", 10th percentile" if key == "low_ms" else "") + ")",
                     cell(ol), cell(el), _ratio(el[key], ol[key])))
    summary = pd.DataFrame(rows, columns=["", "original", "exported", "exported / original"])
    layers = layer_table(camp, trial.candidate)
    ft_text = {"none": "none",
               "fixed": f"{ft.get('epochs', '?')} epoch(s), {ft.get('steps', '?')} SGD steps in all, cosine LR "
                        f"from {ft.get('settings', {}).get('lr', '?')} (`full` evaluator)",
               "infcop": f"InfCoP, {ft.get('steps', '?')} steps, stopped by `{ft.get('stop_reason', '?')}`",
               }[ft["method"]]
    check = m["check"]
    parts = [
        f"# Model card: {m['model']} compressed on {m['dataset']} ({m['campaign']})\n",
        f"Candidate **{trial.label}** (searcher `{trial.searcher}`, seed {trial.seed}, trial {trial.number}); "
        f"validation accuracy during the search {_pct(trial.accuracy)}"
        + (f" (validation images {m['val_caveat']})" if m.get("val_caveat") else "")
        + (f", reward {trial.reward:.4f}" if trial.reward is not None else "") + ".\n",
        f"Final fine-tune: {ft_text}" + (_distill_text(ft["distill"]) if ft.get("distill") else "")
        + ({"keep": "; batch-norm statistics as training left them",
            "recalibrate": f"; batch-norm statistics re-estimated on {ft.get('bn_batches', '?')} training batches "
                           "after it"}.get(ft.get("bn_after", ""), ""))
        + (f"; validation accuracy after it {_pct(ft.get('val_accuracy'))}" if "val_accuracy" in ft else "")
        + ".\n",
        "## Results (test split)\n",
        to_markdown(summary),
        ("Batch norm is folded into the convolutions of the exported model (`export.fold_bn`).\n"
         if m.get("bn_folded") else "")
        + (memory_format_summary(m["deploy"]) + " (`export.memory_format`)\n" if m.get("deploy") else "")
        + (caveat + "\n" if caveat else "")
        + f"Reload check: the saved model was reloaded without the model code and re-evaluated: test accuracy "
        f"{_pct(check['reloaded_test_accuracy'])}, largest logit difference {check['max_logit_difference']:.2e} "
        f"({'passed' if check['passed'] else 'FAILED'}). {m['test_samples']} test images.\n",
        "## Per-layer widths\n",
        to_markdown(layers),
    ]
    if "bits" in layers.attrs:
        parts += ["## Per-layer bits", to_markdown(layers.attrs["bits"])]
    files = [
        f"- `model/` — architecture as data (`arch.json`) and weights (`weights.pt`). Load with "
        f"`from autoprune.serialize import load_module; model = load_module(\"{m['files']['model']}\")` "
        "(no model code needed; tensors are read with `weights_only=True`). Inputs are images in [0, 1] of "
        f"shape {tuple(camp.example_input.shape[1:])}; the model normalises them itself."]
    files += [f"- `deploy/{Path(path).name}` — deployment artifact ({fmt})."
              for fmt, path in (m.get("deployment") or {}).items()]
    if m.get("deployment_error"):
        files.append(f"- deployment export failed: {m['deployment_error']}")
    oc = m.get("onnx_check")
    if oc and "max_abs_diff" in oc:
        lat = oc.get("latency_ms") or {}
        files.append(f"- `deploy/model.onnx` checked with ONNX Runtime {oc['onnxruntime']}: largest output difference "
                     f"{oc['max_abs_diff']:.2g} at batches {', '.join(map(str, oc['batches']))} "
                     f"({'within' if oc['passed'] else 'OVER'} {oc['tolerance']:g})"
                     + (f"; batch 1, 1 thread: {lat['onnxruntime']:.3f} ms in ONNX Runtime, {lat['torch']:.3f} ms "
                        "in torch" if lat else "") + ".")
    elif oc:
        files.append(f"- `deploy/model.onnx` not checked: {oc.get('skipped') or oc.get('error')}.")
    files.append("- `export.json` — every number on this card.")
    commands = [c for c in (m.get("search_command"), m.get("command")) if c]
    parts += ["## Files", "\n".join(files)]
    if commands:
        parts += ["## Reproduce", "```sh\n" + "\n".join(commands) + "\n```"]
    return "\n".join(p.strip("\n") + "\n" for p in parts)
