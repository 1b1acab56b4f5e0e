"""Benchmark: what a search costs — candidates per minute per evaluator, framework overhead, growth with depth.

Measured in one process, single-threaded (``--threads``), so the ratios within a run are comparable:

* **Throughput per evaluator** (pretrained ResNet-20, CIFAR-10, budget 50 % MACs, ``cifar_resnet`` space): the
  same random candidates (keep ratios drawn uniformly in [min ratio, 1], repaired to the budget by the
  searchers' :class:`~autoprune.agents.base.BudgetGuard`) are scored by ``plain``, ``adaptive_bn``, a small
  ``finetune`` and a small ``infcop`` evaluator, each through a fresh :class:`~autoprune.problem.Problem`.
  Per candidate: budget repair (the searchers' equivalent of the environment's legal-action clipping; a
  bisection over the closed-form cost), pricing (``Problem.cost``), building the physically pruned network
  (``Problem.build`` inside ``Problem.evaluate``) and the evaluation itself. Reported: candidates per minute
  and the framework overhead (repair + pricing + build) as a share of the evaluation time; the one-off
  analysis (``graph.analyze`` + ``build_space``) and the InfCoP dense flow reference are reported separately
  (paid once per search, not per candidate).
* **Growth with depth** (ResNet-20 → 56 → 110, option A; weights do not matter for timing, so ResNet-110 is
  randomly initialised): analysis time, ``pruning.apply`` time for one candidate (every prunable group at the
  common keep ratio meeting 50 % MACs), closed-form cost µs/call, and one adaptive-BN evaluation of that
  candidate with fixed calibration/validation sizes.

Data: calibration and fine-tuning batches come from the CIFAR-10 training images; the validation images
(scores are only timed here, never reported as accuracy results) are a stratified subset of the test set.

Run as ``python -m benchmarks.bench_search_cost [--quick] [--threads 1]``; writes
``results/benchmarks/search_cost.md`` (``search_cost_quick.md`` with ``--quick``) and the raw numbers to the
matching ``.json``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from autoprune.utils import configure_threads, seed_everything
from benchmarks._cifar import uniform_widths
from benchmarks._common import CIFAR10_DIR, WEIGHTS_DIR, write_json, write_result

EVALUATORS = ("plain", "adaptive_bn", "finetune", "infcop")
BUDGET = {"macs": 0.5}
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Sizes:
    """Everything that scales the run time."""

    candidates: int
    batch: int
    calib_batches: int
    val_images: int
    ft_steps: int
    infcop_check: int
    flow_images: int
    depth_models: tuple[str, ...]
    repeats: int
    closed_form_calls: int


FULL = Sizes(candidates=4, batch=64, calib_batches=20, val_images=1000, ft_steps=40, infcop_check=10,
             flow_images=256, depth_models=("resnet20", "resnet56", "resnet110"), repeats=5, closed_form_calls=2000)
QUICK = Sizes(candidates=2, batch=32, calib_batches=2, val_images=128, ft_steps=4, infcop_check=2, flow_images=32,
              depth_models=("resnet20", "resnet56", "resnet110"), repeats=1, closed_form_calls=200)


@dataclass
class Context:
    """A model to search with its loaders (any dataset; the tests use small_cnn on digits)."""

    name: str
    model: nn.Module
    example: torch.Tensor
    calib: Iterable[Batch]  # fixed batches, test-time transforms (BN calibration, flow subset)
    train: Iterable[Batch]  # shuffled, augmented (fine-tuning)
    val: Iterable[Batch]
    extra: dict[str, Any] = field(default_factory=dict)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def make_evaluator(name: str, ctx: Context, sizes: Sizes) -> Any:
    """The evaluator ``name`` at this benchmark's sizes (``finetune``/``infcop`` calibrate BN first)."""
    from autoprune.evaluate import make_evaluator as build

    sgd = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "device": "cpu"}
    if name == "plain":
        return build("plain", None, ctx.val, device="cpu")
    if name == "adaptive_bn":
        return build("adaptive_bn", ctx.calib, ctx.val, batches=sizes.calib_batches, device="cpu")
    if name == "finetune":
        return build("finetune", ctx.train, ctx.val, steps=sizes.ft_steps, report_every=sizes.ft_steps,
                     bn_calibration=sizes.calib_batches, bn_loader=ctx.calib, **sgd)
    if name == "infcop":
        return build("infcop", ctx.train, ctx.val, dense=ctx.model, flow="IF", flow_loader=ctx.calib,
                     flow_samples=sizes.flow_images, check_every=sizes.infcop_check, max_steps=sizes.ft_steps,
                     bn_calibration=sizes.calib_batches, bn_loader=ctx.calib, **sgd)
    raise ValueError(f"unknown evaluator {name!r}; choose from {EVALUATORS}")


def evaluator_label(name: str, sizes: Sizes) -> str:
    """Human-readable evaluator settings."""
    return {
        "plain": "plain (no recalibration)",
        "adaptive_bn": f"adaptive_bn ({sizes.calib_batches} batches)",
        "finetune": f"finetune (BN + {sizes.ft_steps} steps)",
        "infcop": f"infcop (BN + ≤ {sizes.ft_steps} steps, IF check every {sizes.infcop_check})",
    }[name]


def throughput_rows(ctx: Context, sizes: Sizes, evaluators: Sequence[str] = EVALUATORS, seed: int = 0
                    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score the same repaired random candidates with every evaluator; per-evaluator cost breakdown.

    Returns:
        ``(setup, rows)``: one-off seconds (``analysis``, and ``infcop_reference`` if measured) and one row
        per evaluator with mean seconds per candidate of each stage, candidates per minute and the overhead
        share (repair + pricing + build over evaluation).
    """
    from autoprune import graph
    from autoprune.agents.base import BudgetGuard
    from autoprune.objectives import Budget
    from autoprune.problem import Problem
    from autoprune.search_spaces import build_space

    t_an, groups = _timed(lambda: graph.analyze(ctx.model, ctx.example))
    t_space, space = _timed(lambda: build_space(groups, model_name=ctx.name))
    setup = {"analysis": t_an + t_space}
    rng = random.Random(seed)
    draws = [[rng.uniform(space.min_ratio, 1.0) for _ in space.groups] for _ in range(sizes.candidates)]
    rows = []
    for name in evaluators:
        ev = make_evaluator(name, ctx, sizes)
        if name == "infcop":
            setup["infcop_reference"], _ = _timed(ev.references)
        problem = Problem(ctx.model, groups, space, ev, ctx.example, importance="l1")
        guard = BudgetGuard(problem, Budget.from_config(BUDGET))
        per: dict[str, list[float]] = {k: [] for k in ("repair", "price", "build", "evaluate", "total", "macs")}
        samples = []
        for i, ratios in enumerate(draws):
            torch.manual_seed(seed + i)
            t0 = time.perf_counter()
            candidate, _info = guard.repair(ratios)
            t1 = time.perf_counter()
            cost = problem.cost(candidate)
            t2 = time.perf_counter()
            result, _ = problem.evaluate(candidate)
            t3 = time.perf_counter()
            per["repair"].append(t1 - t0)
            per["price"].append(t2 - t1)
            per["build"].append(float(result.extra["build_seconds"]))
            per["evaluate"].append(float(result.seconds))
            per["total"].append(t3 - t0)
            per["macs"].append(cost.macs / problem.dense_cost.macs)
            samples.append(result.samples)
        mean = {k: statistics.fmean(v) for k, v in per.items()}
        overhead = mean["repair"] + mean["price"] + mean["build"]
        rows.append({
            "evaluator": name, "label": evaluator_label(name, sizes), "candidates": len(draws),
            "repair_ms": 1e3 * mean["repair"], "price_ms": 1e3 * mean["price"], "build_ms": 1e3 * mean["build"],
            "evaluate_s": mean["evaluate"], "total_s": mean["total"], "per_minute": 60.0 / mean["total"],
            "overhead_share": overhead / mean["evaluate"], "analysis_share": setup["analysis"] / mean["evaluate"],
            "samples": statistics.fmean(samples), "macs_fraction": mean["macs"],
        })
        _log(f"{name}: {rows[-1]['per_minute']:.1f} candidates/min, overhead "
             f"{100 * rows[-1]['overhead_share']:.2f} % of evaluation")
    return setup, rows


def depth_row(name: str, model: nn.Module, example: torch.Tensor, calib: Iterable[Batch], val: Iterable[Batch],
              sizes: Sizes, seed: int = 0) -> dict[str, Any]:
    """Analysis, apply, closed-form and adaptive-BN evaluation times of one model.

    Analysis and apply are medians over ``sizes.repeats``; the closed form is averaged over
    ``sizes.closed_form_calls`` calls on random widths; the adaptive-BN evaluation runs once.
    """
    from autoprune import cost, graph, pruning
    from autoprune.evaluate import AdaptiveBNEvaluator

    model.eval()
    graph.analyze(model, example)  # warm-up: imports and the first trace are not the model's cost
    t_an = statistics.median(_timed(lambda: graph.analyze(model, example))[0] for _ in range(sizes.repeats))
    groups = graph.analyze(model, example)
    widths, ratio = uniform_widths(groups, BUDGET["macs"])
    t_apply = statistics.median(_timed(lambda: pruning.apply(model, groups, widths, importance="l1"))[0]
                                for _ in range(sizes.repeats))
    rng = random.Random(seed)
    prunable = list(groups.prunable())
    cands = [{g.id: rng.randint(max(1, g.size // 5), g.size) for g in prunable} for _ in range(50)]
    n = max(1, sizes.closed_form_calls)
    for c in cands[:5]:  # warm-up
        cost.closed_form(groups, c)
    t0 = time.perf_counter()
    for i in range(n):
        cost.closed_form(groups, cands[i % len(cands)])
    t_cf = (time.perf_counter() - t0) / n
    pruned = pruning.apply(model, groups, widths, importance="l1")
    ev = AdaptiveBNEvaluator(calib, val, batches=sizes.calib_batches, device="cpu")
    t_abn = ev.evaluate(pruned).seconds  # one evaluation (seconds, not milliseconds: repeats add little)
    return {"model": name, "groups": len(groups), "prunable": len(prunable), "analyze_s": t_an,
            "apply_ms": 1e3 * t_apply, "closed_form_us": 1e6 * t_cf, "abn_eval_s": t_abn, "keep_ratio": ratio,
            "macs_fraction": cost.closed_form(groups, widths).macs / cost.closed_form(groups, {}).macs}


# ------------------------------------------------------------------------------------------------ CIFAR set-up


def cifar_context(sizes: Sizes, seed: int = 0) -> tuple[Context, Any]:
    """Pretrained ResNet-20 with CIFAR-10 loaders; also returns the splits (for the depth rows)."""
    from autoprune.data import load_dataset, make_loader, subset
    from autoprune.models import build_model
    from autoprune.models.checkpoint import load_checkpoint

    splits = load_dataset("cifar10", CIFAR10_DIR, val_size=0, seed=seed)
    model = build_model("resnet20", num_classes=10, mean=splits.info.mean, std=splits.info.std)
    load_checkpoint(model, WEIGHTS_DIR / "resnet20-12fca82f.th")
    model.eval()
    calib = make_loader(subset(splits.train, sizes.calib_batches * sizes.batch, seed=seed + 1), sizes.batch)
    ctx = Context(
        name="resnet20", model=model, example=torch.rand(1, 3, 32, 32), calib=calib,
        train=make_loader(splits.train, sizes.batch, shuffle=True, augment=True, seed=seed + 2),
        val=make_loader(subset(splits.test, sizes.val_images, seed=seed), 500),
    )
    return ctx, splits


def run(sizes: Sizes, evaluators: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Throughput rows on ResNet-20 and depth rows on ``sizes.depth_models``."""
    from autoprune.models import build_model

    t0 = time.perf_counter()
    seed_everything(seed)
    ctx, splits = cifar_context(sizes, seed)
    setup, rows = throughput_rows(ctx, sizes, evaluators, seed)
    depth = []
    for name in sizes.depth_models:
        model = build_model(name, num_classes=10, mean=splits.info.mean, std=splits.info.std)
        depth.append(depth_row(name, model, torch.rand(1, 3, 32, 32), ctx.calib, ctx.val, sizes, seed))
        _log(f"{name}: analyze {depth[-1]['analyze_s']:.2f}s, apply {depth[-1]['apply_ms']:.0f}ms, "
             f"closed form {depth[-1]['closed_form_us']:.0f}us, adaptive BN {depth[-1]['abn_eval_s']:.2f}s")
    return {"sizes": asdict(sizes), "setup": setup, "evaluators": rows, "depth": depth,
            "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ report


def summarise(raw: Mapping[str, Any]) -> str:
    """The markdown body."""
    s = raw["sizes"]
    setup = raw["setup"]
    lines = [
        f"Pretrained ResNet-20, CIFAR-10, budget {int(100 * BUDGET['macs'])} % MACs, `cifar_resnet` space; "
        f"{s['candidates']} random candidates (keep ratios uniform in [min ratio, 1], repaired to the budget), the "
        f"same ones for every evaluator; batches of {s['batch']} training images, {s['val_images']} validation "
        f"images; torch threads: {raw['threads']}. All numbers from one run (ratios comparable; absolute times "
        "move with the load of this shared machine).",
        "",
        f"One-off per search: analysis (`graph.analyze` + `build_space`) {setup['analysis']:.2f} s"
        + (f"; InfCoP dense flow reference {setup['infcop_reference']:.2f} s" if "infcop_reference" in setup
           else "") + ".",
        "",
        "| evaluator | candidates / min | evaluation (s) | repair (ms) | pricing (ms) | build (ms) | "
        "**overhead / evaluation** | analysis / one evaluation | training samples / candidate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in raw["evaluators"]:
        lines.append(
            f"| {r['label']} | {r['per_minute']:.1f} | {r['evaluate_s']:.2f} | {r['repair_ms']:.1f} | "
            f"{r['price_ms']:.2f} | {r['build_ms']:.0f} | **{100 * r['overhead_share']:.2f} %** | "
            f"{100 * r['analysis_share']:.1f} % | {r['samples']:.0f} |")
    lines += [
        "",
        "Overhead = budget repair (bisection over the closed-form cost; the searchers' counterpart of the "
        "environment's legal-action clipping) + pricing + building the pruned network, per candidate. The "
        "analysis is paid once per search, so over a search of N candidates its share is the last-but-one "
        "column divided by N.",
        "",
        "## Growth with depth",
        "",
        f"Option-A ResNets (random weights: timing only), one candidate at the common keep ratio meeting "
        f"{int(100 * BUDGET['macs'])} % MACs; analysis and apply: medians over {s['repeats']} repeat(s); closed "
        f"form: mean over {s['closed_form_calls']} calls on random widths; one adaptive-BN evaluation with "
        f"{s['calib_batches']} × {s['batch']} calibration and {s['val_images']} validation images.",
        "",
        "| model | engine groups (prunable) | analyze (s) | apply (ms) | closed form (µs / call) "
        "| adaptive-BN evaluation (s) | apply / evaluation |",
        "|---|---|---|---|---|---|---|",
    ]
    base = raw["depth"][0] if raw["depth"] else None
    for d in raw["depth"]:
        lines.append(f"| {d['model']} | {d['groups']} ({d['prunable']}) | {d['analyze_s']:.2f} | {d['apply_ms']:.0f} | "
                     f"{d['closed_form_us']:.0f} | {d['abn_eval_s']:.2f} | "
                     f"{100 * d['apply_ms'] / 1e3 / d['abn_eval_s']:.1f} % |")
    if base is not None and len(raw["depth"]) > 1:
        last = raw["depth"][-1]
        lines += ["", f"From {base['model']} to {last['model']}: "
                  f"analysis ×{last['analyze_s'] / base['analyze_s']:.1f}, "
                  f"apply ×{last['apply_ms'] / base['apply_ms']:.1f}, closed form "
                  f"×{last['closed_form_us'] / base['closed_form_us']:.1f}, adaptive-BN evaluation "
                  f"×{last['abn_eval_s'] / base['abn_eval_s']:.1f}."]
    lines += ["", f"Total run time: {raw['seconds'] / 60:.1f} min."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, about a minute)")
    parser.add_argument("--evaluators", default=",".join(EVALUATORS), help="comma-separated subset")
    parser.add_argument("--candidates", type=int, default=None, help="candidates per evaluator")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    evaluators = [e.strip() for e in args.evaluators.split(",") if e.strip()]
    unknown = sorted(set(evaluators) - set(EVALUATORS))
    if unknown:
        parser.error(f"unknown evaluator(s) {unknown}; choose from {', '.join(EVALUATORS)}")
    configure_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.candidates is not None:
        sizes = replace(sizes, candidates=args.candidates)
    raw = run(sizes, evaluators)
    write_json("search_cost", raw)
    path = write_result("search_cost", "Search cost: evaluator throughput, framework overhead, growth with depth"
                        + (" (quick)" if args.quick else ""), summarise(raw))
    _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
