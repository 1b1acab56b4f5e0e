"""Benchmark: InfCoP early stopping versus fixed retraining in iterative magnitude pruning.

Default setting: ``small_cnn`` on scikit-learn ``digits`` (8×8, offline), because a full IMP campaign on
ResNet-20 / CIFAR-10 does not fit a shared 2-core CPU. One dense warm-up is shared by every variant (θ_w and the
accuracy target come from it); then each variant runs the same IMP schedule — unstructured, layer-wise 20 % of
the alive weights per iteration, rewinding to θ_w, identical SGD — and differs only in when each retraining
phase stops:

* ``lth``: the full round budget every iteration (fixed retraining);
* ``IF``: information flow consistent with the dense network's (paper settings: signed mean, L2, ε = 1.0), or
  validation accuracy back at the warm-up best;
* ``GF``: gradient flow consistent (corrected GF, mean |∇W ⊙ M|, L2, ε = 0.5), or accuracy back;
* ``IF tight``: IF with mean |C| per pair and the RMS distance (ε below), or accuracy back.

Reported: epochs and seconds to each sparsity level, validation accuracy per iteration, and the final test
accuracy (the only use of the test split). Run as ``python -m benchmarks.bench_infcop_imp [--quick]``; the table
goes to ``results/benchmarks/infcop_imp.md`` (``infcop_imp_quick.md`` with ``--quick``), raw rows to ``.json``.
``--model resnet20 --dataset cifar10 --train-subset 5000`` runs the same protocol on CIFAR-10 (slow on CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from autoprune.utils import configure_threads
from benchmarks._common import CIFAR10_DIR, write_json, write_result

TIGHT_EPS = 0.01


def _variants(base: Any) -> dict[str, Any]:
    from autoprune.imp import IMPConfig

    common = {k: getattr(base, k) for k in ("iterations", "max_rounds", "round_epochs", "sgd", "seed",
                                             "flow_samples", "min_keep")}
    return {
        "lth": IMPConfig.lth(warmup_rounds=0, **common),
        "IF": IMPConfig(flow="IF", warmup_rounds=0, **common),
        "GF": IMPConfig(flow="GF", warmup_rounds=0, **common),
        "IF tight": IMPConfig(flow="IF", reduce="abs", form="rms", eps=TIGHT_EPS, warmup_rounds=0, **common),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up once, run every variant from the same warm-up, return the raw results."""
    from autoprune.commands.train import model_kwargs_for
    from autoprune.data import load_dataset, make_loader, subset
    from autoprune.evaluate import SGDSettings, StepTrainer, validate
    from autoprune.imp import IMPConfig, run_imp
    from autoprune.models import build_model
    from autoprune.utils import seed_everything

    t0 = time.perf_counter()
    data_dir = CIFAR10_DIR if args.dataset == "cifar10" else None
    splits = load_dataset(args.dataset, data_dir, seed=args.seed)
    train_set = subset(splits.train, args.train_subset, seed=args.seed) if args.train_subset else splits.train
    seed_everything(args.seed)
    model = build_model(args.model, **model_kwargs_for(splits.info), **({"width": args.width}
                                                                         if args.model == "small_cnn" else {}))
    train = make_loader(train_set, args.batch_size, shuffle=True, augment=True, seed=args.seed, drop_last=True)
    flow = make_loader(train_set, 256)
    val = make_loader(splits.val, 512)
    test = make_loader(splits.test, 512)
    sgd = SGDSettings(lr=args.lr, momentum=0.9, weight_decay=5e-4)
    base = IMPConfig(iterations=args.iterations, max_rounds=args.rounds, round_epochs=args.round_epochs, sgd=sgd,
                     seed=args.seed, flow_samples=args.flow_samples)
    steps_per_round = max(1, round(base.round_epochs * len(train)))
    warm_start = time.perf_counter()
    trainer = StepTrainer(model, train, sgd)
    best = 0.0
    for _ in range(args.warmup_rounds):
        trainer.run(steps_per_round)
        best = max(best, validate(model, val)[0])
    warm = {"rounds": args.warmup_rounds, "epochs": args.warmup_rounds * base.round_epochs,
            "seconds": time.perf_counter() - warm_start, "best_val_accuracy": best}
    print(f"warm-up: {warm['epochs']:g} epochs, best val {best:.4f}, {warm['seconds']:.0f}s", flush=True)
    results = {}
    epoch = train.epoch
    for name, cfg in _variants(base).items():
        train.set_epoch(epoch)  # every variant sees the same batches
        res = run_imp(model, train, val, replace(cfg, seed=args.seed), flow_loader=flow, test_loader=test,
                      target_accuracy=best)
        results[name] = {"rows": [asdict(r) for r in res.rows], "test_accuracy": res.test_accuracy,
                         "config": res.config.summary()}
        last = res.rows[-1]
        print(f"{name}: {last.cum_epochs:g} epochs, {last.cum_seconds:.0f}s, final sparsity {last.sparsity:.3f}, "
              f"test {res.test_accuracy:.4f}", flush=True)
    return {"model": args.model, "dataset": args.dataset, "train_samples": len(train_set), "warmup": warm,
            "variants": results, "seconds": time.perf_counter() - t0, "settings": base.summary()}


def summarise(raw: dict[str, Any]) -> str:
    """Markdown body: per-iteration side-by-side table and totals."""
    names = list(raw["variants"])
    v0 = raw["variants"][names[0]]
    s = raw["settings"]
    lines = [
        f"Model `{raw['model']}`, dataset `{raw['dataset']}` ({raw['train_samples']} training images). Shared dense "
        f"warm-up: {raw['warmup']['epochs']:g} epochs ({raw['warmup']['seconds']:.1f} s), best validation accuracy "
        f"{100 * raw['warmup']['best_val_accuracy']:.2f} % (the accuracy target).",
        f"IMP: {s['iterations']} iterations, unstructured, layer-wise 20 % of alive weights per iteration, rewinding, "
        f"min keep {s['min_keep']}; retraining rounds of {s['round_epochs']:g} epochs, budget {s['max_rounds']} rounds;"
        f" SGD lr {s['sgd']['lr']}, momentum {s['sgd']['momentum']}, wd {s['sgd']['weight_decay']} for every variant;"
        f" flow subset {s['flow_samples']} training images. Epochs and seconds below exclude the shared warm-up.",
        "",
        "| iteration | sparsity | " + " | ".join(f"{n}: epochs (cum) / s (cum) / val %" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for i, row in enumerate(v0["rows"]):
        cells = []
        for n in names:
            r = raw["variants"][n]["rows"][i]
            cells.append(f"{r['epochs']:g} ({r['cum_epochs']:g}) / {r['seconds']:.1f} ({r['cum_seconds']:.1f}) / "
                         f"{100 * r['val_accuracy']:.2f} [{r['stop_reason']}]")
        lines.append(f"| {i} | {row['sparsity']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| variant | total epochs | total seconds | epochs vs lth | final sparsity | final val % | "
              "final test % |", "|---|---|---|---|---|---|---|"]
    lth_epochs = raw["variants"]["lth"]["rows"][-1]["cum_epochs"] if "lth" in names else None
    for n in names:
        rows = raw["variants"][n]["rows"]
        ep = rows[-1]["cum_epochs"]
        ratio = f"{ep / lth_epochs:.2f}×" if lth_epochs else "–"
        lines.append(f"| {n} | {ep:g} | {rows[-1]['cum_seconds']:.1f} | {ratio} | {rows[-1]['sparsity']:.3f} | "
                     f"{100 * rows[-1]['val_accuracy']:.2f} | {100 * raw['variants'][n]['test_accuracy']:.2f} |")
    lines += ["", "Cells: epochs used in the iteration (cumulative) / seconds (cumulative, including flow checks) / "
              "validation accuracy [stop reason]. Stop reasons: `consistent` (flow), `accuracy` (validation back at "
              "the warm-up best), `budget`.", f"IF tight uses ε = {TIGHT_EPS} on the RMS distance of mean |C|.",
              "", f"Total run time: {raw['seconds'] / 60:.1f} min."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--width", type=int, default=16, help="small_cnn width (default: %(default)s)")
    p.add_argument("--train-subset", type=int, default=None, help="use this many training images")
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="round budget per iteration")
    p.add_argument("--round-epochs", type=float, default=2.0)
    p.add_argument("--warmup-rounds", type=int, default=10)
    p.add_argument("--flow-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.rounds, args.warmup_rounds, args.round_epochs = 3, 2, 2, 0.5
    configure_threads(args.threads)
    torch.manual_seed(args.seed)
    raw = run(args)
    write_json("infcop_imp", raw)
    path = write_result("infcop_imp", "InfCoP vs fixed retraining in IMP", summarise(raw))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
