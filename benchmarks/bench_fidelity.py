"""Benchmark: how faithfully the *training* evaluators (and the cheap ones beside them) rank pruned ResNet-20s.

The search's default score is measured by the larger ranking study (``benchmarks.bench_ranking``: 48 candidates,
truth = the grid's 1-epoch fine-tune), which publishes ``evaluator_fidelity.{md,json}`` with issue #19's
headline. This older study adds the ``finetune`` and ``infcop`` evaluators against a longer fine-tune and writes
``evaluator_fidelity_training.*``.

On the pretrained akamaster ResNet-20 / CIFAR-10 (``../shared``), N candidates at 50 % ± 2 % of the dense MACs
with different per-group widths (random keep ratios per channel group, rescaled until the engine's closed-form
cost hits the target; channels chosen by filter L1, as EagleEye) are scored by

* ``plain``: no recalibration (dense BN statistics);
* ``adaptive_bn``: BN statistics re-estimated on a few training batches (two sizes);
* ``finetune``: a short fine-tune;
* ``infcop``: a fine-tune of the same budget that stops once the information flow is consistent with the
  dense network's;

and compared with the ground truth: the accuracy of every candidate after a *longer* fine-tune. Reported per
evaluator: cost (seconds and training samples, absolute and as % of the long fine-tune) and the Spearman and
Kendall rank correlations with the ground truth.

Splits. The pretrained weights were trained on all 50,000 CIFAR-10 training images, so a validation split
carved from the training set is memorised (the dense model scores ≈ 99.9 % on it) and says nothing about
generalisation. This benchmark therefore splits the 10,000 *test* images into two disjoint, stratified halves:
evaluators score on half A, the ground truth is measured on half B. Calibration and fine-tuning use training
images only.

Run as ``python -m benchmarks.bench_fidelity [--quick] [--threads 1]``; the table goes to
``results/benchmarks/evaluator_fidelity_training.md`` (``evaluator_fidelity_training_quick.md`` with
``--quick``) and the raw per-candidate numbers to the matching ``.json`` (``.partial.json`` while running,
updated per candidate; ``--summarise FILE`` turns such a file into the markdown table).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autoprune.utils import configure_threads, seed_everything
from benchmarks import _cifar
from benchmarks._common import RESULTS, command_line, write_result

TITLE = "Evaluator fidelity: cheap scores vs fine-tuned accuracy (ResNet-20, CIFAR-10)"


@dataclass(frozen=True)
class Sizes:
    """Everything that scales the benchmark's run time."""

    candidates: int
    score_images: int  # test half A (evaluators)
    truth_images: int  # test half B (ground truth)
    batch: int
    truth_steps: int
    abn_small: int
    abn_large: int
    ft_steps: int
    infcop_check: int
    flow_images: int


FULL = Sizes(candidates=20, score_images=2000, truth_images=5000, batch=64, truth_steps=300, abn_small=10,
             abn_large=50, ft_steps=15, infcop_check=5, flow_images=128)
TIGHT_EPS = 0.02
"""ε of the tightened InfCoP variant (RMS over pairs of mean |C|); the paper's ε = 1.0 on the signed mean is
met at the first check by every candidate (distances ≈ 0.15 on ResNet-20's 19 layer pairs)."""
QUICK = Sizes(candidates=5, score_images=256, truth_images=512, batch=32, truth_steps=20, abn_small=4,
              abn_large=8, ft_steps=4, infcop_check=2, flow_images=64)


# ------------------------------------------------------------------------------------------------ statistics


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else float("nan")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ (scipy.stats when installed, else Pearson correlation of average ranks)."""
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(a, b).statistic)
    except ImportError:
        return _pearson(_ranks(a), _ranks(b))


def kendall(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's τ-b (scipy.stats when installed, else the O(n²) definition with tie correction)."""
    try:
        from scipy.stats import kendalltau

        return float(kendalltau(a, b).statistic)
    except ImportError:
        conc = disc = ties_a = ties_b = 0
        for i in range(len(a)):
            for j in range(i + 1, len(a)):
                da, db = a[i] - a[j], b[i] - b[j]
                if da == 0 and db == 0:
                    continue
                if da == 0:
                    ties_a += 1
                elif db == 0:
                    ties_b += 1
                elif da * db > 0:
                    conc += 1
                else:
                    disc += 1
        denom = ((conc + disc + ties_a) * (conc + disc + ties_b)) ** 0.5
        return (conc - disc) / denom if denom else float("nan")


# ------------------------------------------------------------------------------------------------ candidates


def sample_candidates(groups: Any, n: int, target: float, tol: float, seed: int) -> list[dict[str, int]]:
    """``n`` distinct width maps with closed-form MACs within ``target ± tol`` of the dense MACs.

    Each candidate draws a keep ratio U(0.2, 1) per prunable group, then a common scale factor is bisected so
    that the rescaled ratios (clipped to (0, 1]) hit the target; draws that cannot land inside the tolerance
    (width rounding) are discarded.
    """
    from autoprune import cost, pruning

    dense = cost.closed_form(groups, {}).macs
    rng = random.Random(seed)
    prunable = list(groups.prunable())
    out: list[dict[str, int]] = []
    seen: set[tuple[int, ...]] = set()
    for _ in range(200 * n):
        if len(out) == n:
            break
        raw = {g.id: rng.uniform(0.2, 1.0) for g in prunable}

        def frac(s: float, raw: Mapping[str, float] = raw) -> tuple[float, dict[str, int]]:
            ratios = {k: min(1.0, max(1e-3, s * v)) for k, v in raw.items()}
            widths = pruning.widths_from_ratios(groups, ratios)
            return cost.closed_form(groups, widths).macs / dense, widths

        lo, hi = 0.01, 1.0 / min(raw.values())
        for _ in range(40):
            mid = (lo + hi) / 2
            f, widths = frac(mid)
            if abs(f - target) <= tol / 2:
                break
            lo, hi = (mid, hi) if f < target else (lo, mid)
        f, widths = frac(mid)
        key = tuple(widths[g.id] for g in prunable)
        if abs(f - target) <= tol and key not in seen:
            seen.add(key)
            out.append(widths)
    if len(out) < n:
        raise RuntimeError(f"could only draw {len(out)} candidates at {target:.0%} ± {tol:.0%} MACs")
    return out


# ------------------------------------------------------------------------------------------------ the run


def _setup(sizes: Sizes, seed: int) -> dict[str, Any]:
    from autoprune.data import make_loader, subset

    splits = _cifar.load_cifar10(seed)
    part_a, part_b = _cifar.split_test(splits.test, seed)
    score_set = subset(part_a, sizes.score_images, seed=seed)
    truth_set = subset(part_b, sizes.truth_images, seed=seed)
    model, groups, _ = _cifar.load_pretrained("resnet20", splits)
    return {
        "model": model,
        "groups": groups,
        "score": make_loader(score_set, 500),
        "truth": make_loader(truth_set, 500),
        "calib": make_loader(splits.train, sizes.batch, shuffle=True, seed=seed + 1),
        "train": make_loader(splits.train, sizes.batch, shuffle=True, augment=True, seed=seed + 2),
        "flow": make_loader(subset(splits.train, sizes.flow_images, seed=seed + 3), sizes.flow_images),
    }


def _evaluators(ctx: Mapping[str, Any], sizes: Sizes) -> dict[str, Callable[[], Any]]:
    """Factories (fresh loaders' epoch counters do not matter: each evaluator is built per candidate)."""
    from autoprune.evaluate import AdaptiveBNEvaluator, FineTuneEvaluator, InfCoPEvaluator, PlainEvaluator
    from autoprune.infcop import FlowReference

    ft = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "device": "cpu"}
    paper = FlowReference.compute(ctx["model"], ctx["flow"], "IF", max_samples=sizes.flow_images)
    tight = FlowReference.compute(ctx["model"], ctx["flow"], "IF", max_samples=sizes.flow_images, reduce="abs",
                                  form="rms", eps=TIGHT_EPS)
    return {
        "plain": lambda: PlainEvaluator(val_loader=ctx["score"], device="cpu"),
        f"adaptive_bn ({sizes.abn_small}×{sizes.batch})": lambda: AdaptiveBNEvaluator(
            ctx["calib"], ctx["score"], batches=sizes.abn_small, device="cpu"),
        f"adaptive_bn ({sizes.abn_large}×{sizes.batch})": lambda: AdaptiveBNEvaluator(
            ctx["calib"], ctx["score"], batches=sizes.abn_large, device="cpu"),
        f"finetune ({sizes.ft_steps} steps)": lambda: FineTuneEvaluator(
            ctx["train"], ctx["score"], steps=sizes.ft_steps, report_every=sizes.ft_steps, **ft),
        f"finetune (ABN + {sizes.ft_steps} steps)": lambda: FineTuneEvaluator(
            ctx["train"], ctx["score"], steps=sizes.ft_steps, report_every=sizes.ft_steps,
            bn_calibration=sizes.abn_small, bn_loader=ctx["calib"], **ft),
        f"infcop (IF paper: mean, l2, ε=1; ≤{sizes.ft_steps} steps)": lambda: InfCoPEvaluator(
            ctx["train"], ctx["score"], references=[paper], check_every=sizes.infcop_check,
            max_steps=sizes.ft_steps, bn_calibration=sizes.abn_small, bn_loader=ctx["calib"], **ft),
        f"infcop (IF tight: mean abs C, rms, ε={TIGHT_EPS}; ≤{sizes.ft_steps} steps)": lambda: InfCoPEvaluator(
            ctx["train"], ctx["score"], references=[tight], check_every=sizes.infcop_check,
            max_steps=sizes.ft_steps, bn_calibration=sizes.abn_small, bn_loader=ctx["calib"], **ft),
    }


def run(sizes: Sizes, seed: int, log: Callable[[str], None],
        checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Score every candidate with every evaluator and the ground truth; return the raw records.

    ``checkpoint`` (if given) receives the partial raw results after every candidate.
    """
    from autoprune import cost, pruning
    from autoprune.evaluate import FineTuneEvaluator, validate

    seed_everything(seed)
    t0 = time.perf_counter()
    ctx = _setup(sizes, seed)
    dense_macs = cost.closed_form(ctx["groups"], {}).macs
    dense = {"score_acc": validate(ctx["model"], ctx["score"])[0], "truth_acc": validate(ctx["model"], ctx["truth"])[0],
             "macs": dense_macs}
    log(f"setup {time.perf_counter() - t0:.0f}s; dense accuracy A {dense['score_acc']:.4f}, B {dense['truth_acc']:.4f}")
    candidates = sample_candidates(ctx["groups"], sizes.candidates, 0.5, 0.02, seed)
    factories = _evaluators(ctx, sizes)
    truth = FineTuneEvaluator(ctx["train"], ctx["truth"], steps=sizes.truth_steps, report_every=sizes.truth_steps,
                              lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine", device="cpu")
    records = []
    for i, widths in enumerate(candidates):
        seed_everything(seed + 100 + i)
        net = pruning.apply(ctx["model"], ctx["groups"], widths, importance="l1")
        rec: dict[str, Any] = {"widths": widths, "macs_fraction": cost.closed_form(ctx["groups"], widths).macs /
                               dense_macs, "scores": {}}
        for name, make in factories.items():
            torch.manual_seed(seed + 1000 + i)
            r = make().evaluate(net)
            rec["scores"][name] = {"accuracy": r.accuracy, "seconds": r.seconds, "samples": r.samples,
                                   "stop_reason": r.extra.get("stop_reason"), "steps": r.extra.get("steps")}
        torch.manual_seed(seed + 2000 + i)
        gt = truth.evaluate(net)
        rec["truth"] = {"accuracy": gt.accuracy, "seconds": gt.seconds, "samples": gt.samples}
        records.append(rec)
        if checkpoint is not None:
            checkpoint({"sizes": sizes.__dict__, "seed": seed, "dense": dense, "records": records,
                        "evaluators": list(factories), "seconds": time.perf_counter() - t0})
        log(f"candidate {i + 1}/{len(candidates)}: MACs {rec['macs_fraction']:.3f}, truth {gt.accuracy:.4f} "
            f"({gt.seconds:.0f}s), " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in rec["scores"].items()))
    return {"sizes": sizes.__dict__, "seed": seed, "dense": dense, "records": records,
            "evaluators": list(factories), "seconds": time.perf_counter() - t0}


def spearman_interval(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0
                      ) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of Spearman's ρ (candidates resampled with replacement)."""
    import random

    rng = random.Random(seed)
    n, stats = len(a), []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        xa, xb = [a[i] for i in idx], [b[i] for i in idx]
        if len(set(xa)) > 1 and len(set(xb)) > 1:
            stats.append(spearman(xa, xb))
    if not stats:
        return float("nan"), float("nan")
    stats.sort()
    return stats[int(0.025 * (len(stats) - 1))], stats[int(0.975 * (len(stats) - 1))]


def pick_regret(scores: Sequence[float], truth: Sequence[float]) -> float:
    """Ground-truth points lost by keeping the evaluator's top-scored candidate instead of the truly best one."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return max(truth) - truth[best]


def summarise(raw: Mapping[str, Any]) -> str:
    """The markdown body: evaluator table, spread of the ground truth, per-candidate table."""
    recs = raw["records"]
    truth = [r["truth"]["accuracy"] for r in recs]
    t_sec = statistics.fmean(r["truth"]["seconds"] for r in recs)
    t_smp = statistics.fmean(r["truth"]["samples"] for r in recs)
    s = raw["sizes"]
    lines = [
        f"ResNet-20 (akamaster weights), CIFAR-10. {len(recs)} candidates at "
        f"{min(r['macs_fraction'] for r in recs):.3f}–{max(r['macs_fraction'] for r in recs):.3f} of the dense MACs "
        f"({raw['dense']['macs'] / 1e6:.2f} M), random per-group widths, L1 channel selection.",
        f"Dense accuracy: {100 * raw['dense']['score_acc']:.2f} % on test half A ({s['score_images']} images, "
        f"evaluators), {100 * raw['dense']['truth_acc']:.2f} % on half B ({s['truth_images']} images, ground "
        "truth).",
        f"Ground truth: {s['truth_steps']} SGD steps × batch {s['batch']} (lr 0.01 cosine, momentum 0.9, wd 5e-4, "
        f"CIFAR augmentation), accuracy on half B: mean {100 * statistics.fmean(truth):.2f} %, range "
        f"{100 * min(truth):.2f}–{100 * max(truth):.2f} %; mean cost {t_sec:.1f} s, {t_smp:.0f} training samples.",
        "",
        "| evaluator | seconds | % of long FT (s) | train samples | % of long FT (samples) | Spearman | "
        "Spearman 95 % CI (bootstrap) | Kendall | regret of its top pick (points) | mean score |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in raw["evaluators"]:
        acc = [r["scores"][name]["accuracy"] for r in recs]
        label = name.replace("|", "\\|")
        sec = statistics.fmean(r["scores"][name]["seconds"] for r in recs)
        smp = statistics.fmean(r["scores"][name]["samples"] for r in recs)
        lo, hi = spearman_interval(acc, truth)
        lines.append(
            f"| {label} | {sec:.2f} | {100 * sec / t_sec:.1f} % | {smp:.0f} | {100 * smp / t_smp:.1f} % | "
            f"{spearman(acc, truth):+.3f} | [{lo:+.2f}, {hi:+.2f}] | {kendall(acc, truth):+.3f} | "
            f"{100 * pick_regret(acc, truth):.2f} | {100 * statistics.fmean(acc):.2f} % |"
        )
    lines += ["", f"InfCoP variants calibrate BN on {s['abn_small']} batches first, then fine-tune and check the "
              f"information flow (fixed subset of {s['flow_images']} training images) every {s['infcop_check']} "
              "steps, within the same step budget as the short fine-tune."]
    for infcop in (n for n in raw["evaluators"] if n.startswith("infcop")):
        reasons = [r["scores"][infcop]["stop_reason"] for r in recs]
        steps = [r["scores"][infcop]["steps"] for r in recs]
        counts = ", ".join(f"{k} × {reasons.count(k)}" for k in sorted(set(reasons)))
        lines.append(f"- {infcop.replace('|', '')}: stop reasons {counts}; steps used: mean "
                     f"{statistics.fmean(steps):.1f}.")
    lines += ["", "Seconds include scoring on half A (evaluators) or half B (ground truth); samples count training "
              "images forwarded (calibration, fine-tuning, flow measurement), so a forward-only sample is cheaper "
              "than a fine-tuning one. Spearman/Kendall: scipy.stats; the interval resamples the candidates (2,000 "
              "bootstrap draws), so with a few dozen candidates it is wide. Regret: the best ground truth minus the "
              "ground truth of the candidate the evaluator scores highest (what a search keeping its top pick "
              "loses).", "",
              "Per candidate (accuracy %):", "",
              "| # | MACs | truth | " + " | ".join(n.replace("|", "\\|") for n in raw["evaluators"]) + " |",
              "|---|---|---|" + "---|" * len(raw["evaluators"])]
    for i, r in enumerate(recs):
        lines.append(f"| {i} | {r['macs_fraction']:.3f} | {100 * r['truth']['accuracy']:.2f} | "
                     + " | ".join(f"{100 * r['scores'][n]['accuracy']:.2f}" for n in raw["evaluators"]) + " |")
    lines += ["", f"Total run time: {raw['seconds'] / 60:.1f} min."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, minutes)")
    parser.add_argument("--candidates", type=int, default=None, help="number of candidates")
    parser.add_argument("--truth-steps", type=int, default=None, help="steps of the long (ground-truth) fine-tune")
    parser.add_argument("--score-images", type=int, default=None, help="test-half-A images the evaluators score on")
    parser.add_argument("--truth-images", type=int, default=None, help="test-half-B images for the ground truth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--summarise", default=None, metavar="JSON",
                        help="only write the markdown table from a (partial) raw JSON file of an earlier run")
    args = parser.parse_args(argv)
    if args.summarise:
        raw = json.loads(Path(args.summarise).read_text())
        name = Path(args.summarise).name.split(".")[0]  # evaluator_fidelity_training[_quick](.partial).json
        print(f"wrote {write_result(name, TITLE, summarise(raw), command=raw.get('command'))}")
        return 0
    missing = _cifar.data_error()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    configure_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    overrides = {k: getattr(args, k) for k in ("candidates", "truth_steps", "score_images", "truth_images")
                 if getattr(args, k)}
    sizes = Sizes(**{**sizes.__dict__, **overrides})
    name = "evaluator_fidelity_training_quick" if args.quick else "evaluator_fidelity_training"
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = RESULTS / f"{name}.partial.json"
    command = command_line()
    raw = run(sizes, args.seed, lambda s: print(s, flush=True),
              lambda r: partial.write_text(json.dumps({**r, "command": command}, indent=1, default=str)))
    raw["command"] = command
    (RESULTS / f"{name}.json").write_text(json.dumps(raw, indent=1, default=str))
    partial.unlink(missing_ok=True)
    path = write_result(name, TITLE, summarise(raw))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
