"""Benchmark: the differentiable searchers DMCP and ResRep against uniform pruning (ResNet-20 / CIFAR-10, 50 % MACs).

Starting from the pretrained akamaster ResNet-20 (``../shared``), each method produces a network at ≤ 50 % of
the dense closed-form MACs:

* ``uniform`` — the same keep ratio in every prunable group (the largest that meets the target), channels
  chosen by filter L1, BN statistics re-estimated (cumulative average);
* ``dmcp`` — :func:`autoprune.agents.dmcp.search` with a CPU-sized schedule (supernet fine-tuned from the
  dense weights with the sandwich rule, α trained in the second half); its own weights sliced with the
  ``prefix`` criterion, BN recalibrated;
* ``resrep`` — :func:`autoprune.agents.resrep.search` with a CPU-sized schedule; its final widths cut from the
  dense weights by filter L1 (the default ``weights="dense"``; ResRep's own trained weights fine-tune worse at
  this budget, see ``search_quality.md``).

Every network then gets the *same fine-tune* as the finalists of ``bench_searchers`` (BN re-estimated, then
``ft_steps`` SGD steps × ``ft_batch``, lr 0.01 cosine, momentum 0.9, wd 5e-4, seed 1234), so the table is
printed beside theirs (read from ``results/benchmarks/searchers.json`` when its fine-tune and report set
match). Reported: closed-form MACs, test accuracy before and after the fine-tune, the training samples each
method consumed before the fine-tune, and wall-clock seconds. Here uniform pruning and DMCP search *every*
prunable group (the option-A residual streams included, through the engine's pad rule); ResRep, as in its
paper, places compactors on single-producer groups only (the block-internal widths, §6.3.6). Keep ratios stay
≥ 0.2 for all methods. (``bench_search_quality`` runs DMCP and ResRep in the candidate searchers' smaller
``cifar_resnet`` space instead.)

Splits (``benchmarks/_cifar.py``): search, calibration and fine-tuning use training images only; accuracy is
reported on test half B (5,000 images; 500 with ``--quick``), the half no searcher ever selects on.

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

from torch import nn

from autoprune.utils import configure_threads, seed_everything
from benchmarks import _cifar
from benchmarks._cifar import MIN_RATIO
from benchmarks._common import RESULTS, result_path, write_json, write_result

TARGET = 0.5
SHARED = ("batch", "test_images", "bn_batches", "ft_steps", "ft_batch", "ft_lr")
FT_SEED = 1234  # the finalists' fine-tune seed in bench_searchers


@dataclass(frozen=True)
class Sizes:
    """Everything that scales the benchmark's run time."""

    batch: int
    test_images: int
    bn_batches: int
    ft_steps: int
    ft_batch: int
    ft_lr: float
    dmcp: dict[str, Any]
    resrep: dict[str, Any]


FULL = Sizes(batch=64, test_images=5000, bn_batches=20, ft_steps=300, ft_batch=128, ft_lr=0.01,
             dmcp={"iters": 300, "lr": 0.02, "lr_min": 0.002, "bn_batches": 20},
             resrep={"iters": 600, "warmup_iters": 100, "mask_interval": 10, "step_cap": 8, "lasso": 0.01,
                     "bn_batches": 20})
QUICK = Sizes(batch=32, test_images=500, bn_batches=5, ft_steps=20, ft_batch=32, ft_lr=0.01,
              dmcp={"iters": 20, "lr": 0.01, "lr_min": 0.001, "bn_batches": 5, "p_uniform_decay": 0.8},
              resrep={"iters": 80, "warmup_iters": 15, "mask_interval": 3, "step_cap": 16, "lasso": 0.03,
                      "bn_batches": 5})


# ------------------------------------------------------------------------------------------------ set-up


def _setup(sizes: Sizes, seed: int) -> dict[str, Any]:
    """The shared CIFAR context (half A selects, half B reports) plus the search-time training loader."""
    ctx = _cifar.context("resnet20", _cifar.load_cifar10(seed), calib_batches=sizes.bn_batches,
                         calib_batch=sizes.batch, select_images=sizes.test_images, report_images=sizes.test_images,
                         seed=seed)
    ctx["train"] = _cifar.train_loader(ctx, sizes.batch, seed + 1)
    return ctx


# ------------------------------------------------------------------------------------------------ methods


def _uniform(ctx: dict[str, Any], sizes: Sizes, seed: int) -> tuple[nn.Module, dict[str, int], int]:
    from autoprune import pruning
    from autoprune.evaluate import recalibrate_bn

    widths, _ = _cifar.uniform_widths(ctx["groups"], TARGET)
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

    seed_everything(seed)
    t0 = time.perf_counter()
    ctx = _setup(sizes, seed)
    dense_macs = cost.closed_form(ctx["groups"], {}).macs
    dense_acc = validate(ctx["model"], ctx["report"])[0]
    log(f"setup {time.perf_counter() - t0:.0f}s; dense: {dense_macs / 1e6:.2f} M MACs, test accuracy {dense_acc:.4f}")
    rows: dict[str, Any] = {}
    for name in methods:
        seed_everything(seed)
        start = time.perf_counter()
        net, widths, samples = METHODS[name](ctx, sizes, seed)
        seconds = time.perf_counter() - start
        macs = cost.closed_form(ctx["groups"], widths).macs
        acc = validate(net, ctx["report"])[0]
        ft = _cifar.finetune_and_report(ctx, net, steps=sizes.ft_steps, batch=sizes.ft_batch, lr=sizes.ft_lr,
                                        seed=FT_SEED)
        acc_ft, ft_seconds = ft["test_after_ft"], ft["ft_seconds"]
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
        f"MACs ({dense['macs'] / 1e6:.2f} M). Test accuracy on {s['test_images']} images of test half B (never "
        f"selected on); dense: **{dense['test_acc']:.2%}**. Every result then gets the same fine-tune as the "
        f"candidate searchers' finalists: BN re-estimated, {s['ft_steps']} SGD steps × batch {s['ft_batch']}, "
        f"lr {s['ft_lr']} cosine, momentum 0.9, wd 5e-4, CIFAR augmentation, seed {FT_SEED}.",
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
    lines += beside_searchers(data)
    if quick:
        lines += ["", "_Quick form: a few dozen search iterations on a 500-image test subset — a smoke test of "
                  "the pipeline, not a measurement of the methods._"]
    lines += ["", f"Total wall time {data['seconds']:.0f}s."]
    return "\n".join(lines)


def beside_searchers(data: dict[str, Any], path: Any = None) -> list[str]:
    """The candidate searchers' fine-tuned finalists (``searchers.json``) when their protocol matches ours."""
    path = path or RESULTS / "searchers.json"
    try:
        other = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    s, o = data["sizes"], other.get("sizes", {})
    if (o.get("ft_steps"), o.get("ft_batch"), o.get("test_images")) != (s["ft_steps"], s["ft_batch"],
                                                                        s["test_images"]):
        return []
    finalists = sorted(other.get("finalists", {}).items(), key=lambda kv: -kv[1]["test"])
    if not finalists:
        return []
    lines = ["", f"Beside: the candidate searchers' finalists from `searchers.md` (same fine-tune, same half B; "
             f"`cifar_resnet` space — block-internal widths only; best of {o['seeds']} × {o['candidates']} "
             f"adaptive-BN-scored candidates; dense there: {other['dense']['test']:.2%}):", "",
             "| searcher | MACs kept | test acc after fine-tune |", "|---|---|---|"]
    lines += [f"| {n} | {f['macs']:.1%} | {f['test']:.2%} |" for n, f in finalists]
    return lines


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
    ap.add_argument("--quick", action="store_true", help="tiny schedules and a 500-image test subset")
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
    missing = _cifar.data_error()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    configure_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    data = run(sizes, args.seed, methods, lambda msg: print(msg, flush=True))
    data = _merge(result_path("differentiable", ".json"), data, methods)
    write_json("differentiable", data, indent=2)
    title = "Differentiable searchers: DMCP and ResRep vs uniform (ResNet-20, CIFAR-10, 50 % MACs)"
    path = write_result("differentiable", title, render(data, args.quick))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
