"""Benchmark (issue #20): the BN statistics of an exported model — the running averages training left, or
re-estimated after the fine-tune.

Until 2026-12-06 the export re-estimated every BN layer's statistics after its fine-tune on
``export.calibration_batches`` un-augmented training batches (as the search scores candidates before training),
and ``bench_recovery`` tested its curves the same way. This benchmark measures what that costs: the product's
export fine-tune (:func:`autoprune.export.export_trial`, distillation, the recovery recipe's learning rate, cosine
over ``--epochs``) of each recovery campaign's candidate (``recovery.json``'s ``search|M`` cells; the campaigns come
from ``recovery_carry.tar.gz`` where this machine lacks them), and after every epoch the network (a copy) is tested
on the full CIFAR-10 test set and on half B three ways: with the running statistics as training left them, and
after re-estimating them on 20 and on 100 un-augmented training batches of 128 (cumulative averages:
:func:`autoprune.evaluate.recalibrate_bn`). The export itself runs with ``export.bn_after_finetune=keep`` (the new
default); its test accuracy and the reloaded model's are recorded.

One cell per model (``resnet20``, ``resnet56``), each written to ``results/benchmarks/bn_after_finetune.json`` when
it ends (``--resume`` skips finished cells). ``--quick`` is a smoke run (ResNet-20, 0.05 of an epoch, 1,000 test
images; ``bn_after_finetune_quick.*``). Usage::

    python -m benchmarks.bench_bn_after_finetune [--quick] [--models resnet20,resnet56] [--epochs 1] [--threads 1]
        [--resume]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import bench_recovery as br
from benchmarks._common import RESULTS, command_line, git_commit, write_result

NAME = "bn_after_finetune"
RECAL_BATCHES = (20, 100)


def _log(msg: str) -> None:
    print(f"[bn {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def json_path(quick: bool = False) -> Path:
    return RESULTS / f"{NAME}{'_quick' if quick else ''}.json"


def measure_both(ctx: br.Context, model: Any) -> dict[str, Any]:
    """Full-test and half-A/B top-1 of ``model`` (a copy) with its running BN statistics, then after re-estimating
    them on each of :data:`RECAL_BATCHES` un-augmented training batches."""
    from autoprune.evaluate import recalibrate_bn

    out: dict[str, Any] = {"running": br.top1_on_halves(ctx, model)}
    calib = ctx.camp.calib_loader
    for n in RECAL_BATCHES:
        calib.set_epoch(0)
        recalibrate_bn(model, calib, n)
        out[f"recalibrated_{n}"] = br.top1_on_halves(ctx, model)
    return out


def run_cell(s: br.Settings, raw_recovery: dict[str, Any], model: str, epochs: float) -> dict[str, Any]:
    """The export fine-tune of ``model``'s campaign candidate, measured after every epoch (see the module doc)."""
    search = br.done(raw_recovery, f"search|{model}")
    chosen = br.choose_lr(raw_recovery, model)
    assert search is not None and chosen is not None, "main() checks the recovery cells first"
    job = br.Job(f"bn|{model}", model, "kd", float(chosen["lr"]), float(epochs), s.kd_weight, s.kd_temperature,
                 search["best"]["trial"], br.work_dir(s) / model / "bn" / f"kd-lr{chosen['lr']:g}-e{epochs:g}",
                 latency=False, extra=("export.bn_after_finetune=keep",))
    ctx = br.open_context(s, job)
    log: list[dict[str, Any]] = []
    clock = {"t": time.perf_counter()}

    def on_epoch(epoch: int, net: Any, val_accuracy: float) -> None:
        seconds = time.perf_counter() - clock["t"]
        acc = measure_both(ctx, net)
        log.append({"epoch": epoch, "seconds": round(seconds, 1), **acc})
        _log(f"{model} epoch {epoch}: full test {acc['running']['test_top1']:.2f} % with the running statistics, "
             + ", ".join(f"{acc[f'recalibrated_{n}']['test_top1']:.2f} % re-estimated on {n} batches"
                         for n in RECAL_BATCHES))
        clock["t"] = time.perf_counter()

    res = br.run_export(ctx, job, br.export_command(s, job), on_epoch)
    final = br.finish_export(ctx, job, res.metrics)
    return {"status": "done", "model": model, "params": {**job.params(), "bn_after_finetune": "keep"},
            "macs_ratio": search["best"]["macs_ratio"], "epochs_log": log, **final}


def summarise(raw: dict[str, Any]) -> str:
    lines = [
        *(["**Smoke run** (`--quick`): a fraction of an epoch, 1,000 test images; its accuracies mean nothing.", ""]
          if raw.get("quick") else []),
        "The product's export fine-tune (distillation, the recovery recipe's learning rate, cosine over the run) of "
        "each recovery campaign's candidate; after every epoch a copy of the network is tested with the BN running "
        "statistics training left and after re-estimating them on un-augmented training batches (what the export "
        "did after its fine-tune until 2026-12-06, with 20 batches). Full CIFAR-10 test set; half B in brackets.",
        "", "| model | MACs ratio | epoch | running statistics % | "
        + " | ".join(f"re-estimated, {n} batches %" for n in RECAL_BATCHES) + " | re-estimation costs pp |",
        "|---|---|---|---|" + "---|" * len(RECAL_BATCHES) + "---|"]
    for m, rec in raw.get("cells", {}).items():
        for e in rec.get("epochs_log", []):
            run = e["running"]
            recal = [e[f"recalibrated_{n}"] for n in RECAL_BATCHES]
            lines.append(f"| {m} | {rec['macs_ratio']:.3f} | {e['epoch']} | {run['test_top1']:.2f} "
                         f"({run['half_b']:.2f}) | "
                         + " | ".join(f"{r['test_top1']:.2f} ({r['half_b']:.2f})" for r in recal)
                         + f" | {run['test_top1'] - recal[0]['test_top1']:+.2f} |")
    exports = [(m, r) for m, r in raw.get("cells", {}).items() if r.get("export")]
    if exports:
        lines += ["", "The exports (`export.bn_after_finetune=keep`), reloaded with `load_module`:", ""]
        lines += [f"- {m}: test {r['export']['test_top1']:.2f} % (dense {r['export']['dense_test_top1']:.2f} %), "
                  f"{r['export']['macs_ratio']:.3f} of the MACs; reloaded {r['reload']['test_top1']:.2f} % "
                  f"({'reproduced' if r['reload']['matches_export'] else 'NOT reproduced'})" for m, r in exports]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: ResNet-20, 0.05 of an epoch, 1,000 test images")
    p.add_argument("--models", default=None, help="comma-separated (default resnet20,resnet56)")
    p.add_argument("--epochs", type=float, default=None, help="export fine-tune epochs (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--resume", action="store_true", help="keep finished cells of the JSON")
    args = p.parse_args(argv)
    models = tuple(m.strip() for m in (args.models or ("resnet20" if args.quick else "resnet20,resnet56")).split(",")
                   if m.strip())
    epochs = args.epochs if args.epochs is not None else (0.05 if args.quick else 1.0)
    if not set(models) <= set(br.MODELS) or epochs <= 0:
        print(f"error: --models must name {', '.join(br.MODELS)} and --epochs be > 0\n"
              "hint: e.g. --models resnet56 --epochs 1", file=sys.stderr)
        return 2
    missing = br.data_error(models)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    from autoprune.utils import configure_threads

    configure_threads(args.threads)
    s = br.Settings(models=models, threads=args.threads, test_images=1000 if args.quick else None,
                    val_images=500 if args.quick else None)
    problem = br.restore_carry(s)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    recovery = br.read_raw(br.json_path(s))
    not_ready = [m for m in models if br.done(recovery, f"search|{m}") is None or br.choose_lr(recovery, m) is None]
    if not_ready:
        print(f"error: recovery.json has no finished search and learning-rate sweep of {', '.join(not_ready)}\n"
              "hint: run python -m benchmarks.bench_recovery --resume --only 'search,lr' first", file=sys.stderr)
        return 2
    path = json_path(args.quick)
    raw: dict[str, Any] = json.loads(path.read_text()) if args.resume and path.is_file() else {"cells": {}}
    for m in models:
        if m in raw["cells"]:
            _log(f"{m}: done (kept)")
            continue
        raw["cells"][m] = run_cell(s, recovery, m, epochs)
        raw.update(command=command_line(), commit=git_commit(), quick=args.quick)
        path.write_text(json.dumps(raw, indent=1, default=str))
        write_result(NAME + ("_quick" if args.quick else ""),
                     "BN statistics of an exported model: kept or re-estimated after the fine-tune", summarise(raw))
    _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
