"""Benchmark: the differentiable searchers DMCP and ResRep against uniform pruning (ResNet-20 / CIFAR-10, 50 % MACs).

Starting from the pretrained akamaster ResNet-20 (``../shared``), each method produces a network at ≤ 50 % of
the dense closed-form MACs:

* ``uniform`` — the same keep ratio in every prunable group (the largest that meets the target), channels
  chosen by filter L1, BN statistics re-estimated (cumulative average);
* ``dmcp`` — :func:`autoprune.agents.dmcp.search` with a CPU-sized schedule (supernet fine-tuned from the
  dense weights with the sandwich rule, α trained in the second half); its own weights sliced with the
  ``prefix`` criterion, BN recalibrated;
* ``resrep`` — :func:`autoprune.agents.resrep.search` with a CPU-sized schedule; the exactly converted network
  with its trained weights.

Every network then gets the *same short fine-tune* (SGD, cosine, ``ft_steps`` steps). Reported: closed-form
MACs, test accuracy before and after the fine-tune, the training samples each method consumed before the
fine-tune, and wall-clock seconds. Uniform pruning and DMCP search every prunable group (the option-A residual
streams included, through the engine's pad rule); ResRep, as in its paper, places compactors on
single-producer groups only (the block-internal widths, §6.3.6). Keep ratios stay ≥ 0.2 for all methods.

Splits: search, calibration and fine-tuning use training images only; accuracy is measured on a stratified
subset of the CIFAR-10 test set (all 10,000 images without ``--quick``).

Run as ``python -m benchmarks.bench_differentiable [--quick] [--threads 1] [--methods uniform,dmcp,resrep]``
(methods may be run in separate invocations; their rows are merged); the table goes to
``results/benchmarks/differentiable.md`` (``differentiable_quick.md`` with ``--quick``) and the raw numbers to
the matching ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from autoprune.utils import configure_threads, seed_everything
from benchmarks._common import CIFAR10_DIR, RESULTS, WEIGHTS_DIR, write_result

TARGET = 0.5
MIN_RATIO = 0.2  # the search space's default lower bound on keep ratios (both searchers respect it)
SHARED = ("batch", "test_images", "bn_batches", "ft_steps", "ft_lr")


@dataclass(frozen=True)
class Sizes:
    """Everything that scales the benchmark's run time."""

    batch: int
    test_images: int
    bn_batches: int
    ft_steps: int
    ft_lr: float
    dmcp: dict[str, Any]
    resrep: dict[str, Any]


FULL = Sizes(batch=64, test_images=10000, bn_batches=20, ft_steps=300, ft_lr=0.01,
             dmcp={"iters": 300, "lr": 0.02, "lr_min": 0.002, "bn_batches": 20},
             resrep={"iters": 600, "warmup_iters": 100, "mask_interval": 10, "step_cap": 8, "lasso": 0.01,
                     "bn_batches": 20})
QUICK = Sizes(batch=32, test_images=1000, bn_batches=10, ft_steps=40, ft_lr=0.01,
              dmcp={"iters": 40, "lr": 0.01, "lr_min": 0.001, "bn_batches": 10, "p_uniform_decay": 0.9},
              resrep={"iters": 150, "warmup_iters": 30, "mask_interval": 3, "step_cap": 16, "lasso": 0.03,
                      "bn_batches": 10})


# ------------------------------------------------------------------------------------------------ set-up


def _setup(sizes: Sizes, seed: int) -> dict[str, Any]:
    from autoprune import graph
    from autoprune.data import load_dataset, make_loader, stratified_indices
    from autoprune.models import build_model
    from autoprune.models.checkpoint import load_checkpoint

    splits = load_dataset("cifar10", CIFAR10_DIR, val_size=0, seed=seed)
    test = splits.test
    if sizes.test_images < len(test):
        test = test.take(stratified_indices(test.labels, sizes.test_images, seed=seed))
    model = build_model("resnet20", num_classes=10, mean=splits.info.mean, std=splits.info.std)
    load_checkpoint(model, WEIGHTS_DIR / "resnet20-12fca82f.th")
    model.eval()
    groups = graph.analyze(model, torch.rand(1, 3, 32, 32))
    return {
        "model": model,
        "groups": groups,
        "test": make_loader(test, 500),
        "train": make_loader(splits.train, sizes.batch, shuffle=True, augment=True, seed=seed + 1),
        "calib": make_loader(splits.train, sizes.batch, shuffle=True, seed=seed + 2),
    }


def uniform_widths(groups: Any, target: float) -> dict[str, int]:
    """The largest common keep ratio whose legal widths meet ``target`` × dense MACs (bisection)."""
    from autoprune import cost, pruning

    dense = cost.closed_form(groups, {}).macs
    lo, hi = 0.0, 1.0
    best = pruning.widths_from_ratios(groups, 0.05)
    for _ in range(40):
        mid = (lo + hi) / 2
        widths = pruning.widths_from_ratios(groups, mid)
        if cost.closed_form(groups, widths).macs <= target * dense:
            lo, best = mid, widths
        else:
            hi = mid
    return best


# ------------------------------------------------------------------------------------------------ methods


def _uniform(ctx: dict[str, Any], sizes: Sizes, seed: int) -> tuple[nn.Module, dict[str, int], int]:
    from autoprune import pruning
    from autoprune.evaluate import recalibrate_bn

    widths = uniform_widths(ctx["groups"], TARGET)
    net = pruning.apply(ctx["model"], ctx["groups"], widths, importance="l1")
    samples = recalibrate_bn(net, ctx["calib"], sizes.bn_batches)
    return net, widths, samples


def _dmcp(ctx: dict[str, Any], sizes: Sizes, seed: int) -> tuple[nn.Module, dict[str, int], int]:
    from autoprune.agents import dmcp

    cfg = dmcp.DMCPConfig.from_mapping({**sizes.dmcp, "macs_target": TARGET, "seed": seed})
    legal = dmcp.legal_widths_of(None, ctx["groups"], MIN_RATIO)
    res = dmcp.search(ctx["model"], ctx["groups"], ctx["train"], cfg, legal=legal)
    return res.module, dict(res.candidate.widths), res.samples


def _resrep(ctx: dict[str, Any], sizes: Sizes, seed: int) -> tuple[nn.Module, dict[str, int], int]:
    from autoprune.agents import resrep

    cfg = resrep.ResRepConfig.from_mapping({**sizes.resrep, "macs_target": TARGET, "seed": seed})
    legal = resrep.legal_widths_of(None, ctx["groups"], MIN_RATIO)
    res = resrep.search(ctx["model"], ctx["groups"], ctx["train"], cfg, legal=legal)
    return res.module, dict(res.candidate.widths), res.samples


METHODS: dict[str, Callable[[dict[str, Any], Sizes, int], tuple[nn.Module, dict[str, int], int]]] = {
    "uniform": _uniform,
    "dmcp": _dmcp,
    "resrep": _resrep,
}


def run(sizes: Sizes, seed: int, methods: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    """Run every method, fine-tune each result with the same budget, and measure test accuracy."""
    from autoprune import cost
    from autoprune.evaluate import validate
    from autoprune.train import train_steps

    seed_everything(seed)
    t0 = time.perf_counter()
    ctx = _setup(sizes, seed)
    dense_macs = cost.closed_form(ctx["groups"], {}).macs
    dense_acc = validate(ctx["model"], ctx["test"])[0]
    log(f"setup {time.perf_counter() - t0:.0f}s; dense: {dense_macs / 1e6:.2f} M MACs, test accuracy {dense_acc:.4f}")
    rows: dict[str, Any] = {}
    for name in methods:
        seed_everything(seed)
        start = time.perf_counter()
        net, widths, samples = METHODS[name](ctx, sizes, seed)
        seconds = time.perf_counter() - start
        macs = cost.closed_form(ctx["groups"], widths).macs
        acc = validate(net, ctx["test"])[0]
        seed_everything(seed + 7)
        ft_start = time.perf_counter()
        train_steps(net, ctx["train"], sizes.ft_steps, lr=sizes.ft_lr, schedule="cosine", desc=f"{name} ft")
        ft_seconds = time.perf_counter() - ft_start
        acc_ft = validate(net, ctx["test"])[0]
        schedule = {"uniform": {"importance": "l1", "bn_batches": sizes.bn_batches}, "dmcp": sizes.dmcp,
                    "resrep": sizes.resrep}[name]
        rows[name] = {"macs": macs, "macs_fraction": macs / dense_macs, "widths": widths, "test_acc": acc,
                      "test_acc_ft": acc_ft, "samples": samples, "seconds": seconds, "ft_seconds": ft_seconds,
                      "schedule": schedule}
        log(f"{name}: {macs / 1e6:.2f} M MACs ({macs / dense_macs:.1%}), test {acc:.4f} -> {acc_ft:.4f} after "
            f"{sizes.ft_steps} fine-tune steps; {samples} training samples, {seconds:.0f}s")
    return {"sizes": asdict(sizes), "seed": seed, "dense": {"macs": dense_macs, "test_acc": dense_acc},
            "methods": rows, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ report


def render(data: dict[str, Any], quick: bool) -> str:
    """The markdown body."""
    s = data["sizes"]
    dense = data["dense"]
    lines = [
        f"Pretrained ResNet-20 (akamaster, option A) on CIFAR-10, target ≤ {TARGET:.0%} of the dense closed-form "
        f"MACs ({dense['macs'] / 1e6:.2f} M). Test accuracy on {s['test_images']} test images "
        f"({'stratified subset' if s['test_images'] < 10000 else 'full test set'}); dense: "
        f"**{dense['test_acc']:.2%}**. Every result then gets the same fine-tune: {s['ft_steps']} SGD steps, "
        f"batch {s['batch']}, lr {s['ft_lr']} cosine, wd 5e-4.",
        "",
        "| method | MACs (M) | MACs kept | test acc (own weights) | test acc after fine-tune | Δ vs dense | "
        "training samples before fine-tune | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in data["methods"].items():
        lines.append(f"| {name} | {r['macs'] / 1e6:.2f} | {r['macs_fraction']:.1%} | {r['test_acc']:.2%} | "
                     f"{r['test_acc_ft']:.2%} | {r['test_acc_ft'] - dense['test_acc']:+.2%} | {r['samples']} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", f"Schedules (keep ratios ≥ {MIN_RATIO} in every group):", ""]
    for name, r in data["methods"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in r["schedule"].items()))
    lines += [
        "",
        "Widths per group:",
        "",
        "| group | " + " | ".join(data["methods"]) + " |",
        "|---|" + "---|" * len(data["methods"]),
    ]
    gids = list(next(iter(data["methods"].values()))["widths"])
    for g in gids:
        lines.append(f"| {g} | " + " | ".join(str(r["widths"].get(g, "")) for r in data["methods"].values()) + " |")
    if quick:
        lines += ["", "_Quick form: a few dozen search iterations on a 1,000-image test subset — a smoke test of "
                  "the pipeline, not a measurement of the methods._"]
    lines += ["", f"Total wall time {data['seconds']:.0f}s."]
    return "\n".join(lines)


def _merge(path: Any, data: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """Keep the rows of methods not run now from an earlier run with the same shared settings and seed."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return data
    same = all(old.get("sizes", {}).get(k) == data["sizes"][k] for k in SHARED)
    if not same or old.get("seed") != data["seed"] or "schedule" not in next(iter(old["methods"].values()), {}):
        return data
    rows = {k: v for k, v in old.get("methods", {}).items() if k not in methods}
    rows.update(data["methods"])
    ordered = {k: rows[k] for k in METHODS if k in rows}
    return {**data, "methods": ordered, "seconds": data["seconds"] + old.get("seconds", 0.0)}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny schedules and a 1,000-image test subset")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of uniform,dmcp,resrep; rows of the others are kept from an "
                    "earlier run with the same settings")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not (CIFAR10_DIR / "test_batch.bin").is_file() or not (WEIGHTS_DIR / "resnet20-12fca82f.th").is_file():
        print(f"needs CIFAR-10 at {CIFAR10_DIR} and the ResNet-20 weights at {WEIGHTS_DIR}", file=sys.stderr)
        return 2
    configure_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    data = run(sizes, args.seed, methods, lambda msg: print(msg, flush=True))
    name = "differentiable_quick" if args.quick else "differentiable"
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = _merge(RESULTS / f"{name}.json", data, methods)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    path = write_result(name, "Differentiable searchers: DMCP and ResRep vs uniform (ResNet-20, CIFAR-10, 50 % MACs)",
                        render(data, args.quick))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
