"""Benchmark: every searcher on the same problem, the same evaluator and the same candidate budget.

Problem: the pretrained akamaster ResNet-20 on CIFAR-10 (``../shared``), the ``cifar_resnet`` search space
(one keep ratio per residual block's inner convolution; residual streams kept, min ratio 0.2), a budget of
50 % of the dense MACs, L1 channel selection. Every searcher gets ``candidates`` proposals per seed, scored
by the adaptive-BN evaluator (EagleEye: BN statistics re-estimated on a fixed set of training batches, then
top-1 on a validation set). Reported over seeds (mean ± std):

* the best validation accuracy among the feasible candidates;
* the number of candidates until the best-so-far reaches the accuracy of the ``uniform`` baseline (the same
  keep ratio everywhere, one candidate), or "not reached".

Then the best architecture of each searcher (over all seeds, by validation accuracy) is fine-tuned with the
same short schedule and its test accuracy reported, next to uniform's.

Splits. The pretrained weights were trained on all 50,000 training images, so a validation split carved from
the training set is memorised and cannot rank candidates. The 10,000 test images are therefore split into two
disjoint, stratified halves: candidates are scored on a subset of half A ("val"), the fine-tuned finalists on
half B ("test"), which no searcher ever sees. Calibration and fine-tuning use training images only.

Run as ``python -m benchmarks.bench_searchers [--quick] [--searchers tpe,uniform,...] [--store PATH]``;
results go to ``results/benchmarks/searchers.md`` (``searchers_quick.md`` with ``--quick``) and the raw
numbers to the matching ``.json``. ``--store`` keeps the trials in a SQLite file, so an interrupted run
resumes (each searcher continues its study); by default a fresh temporary store is used.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from autoprune.utils import configure_threads, seed_everything
from benchmarks import _cifar
from benchmarks._common import write_json, write_result

BUDGET = {"macs": 0.5}
#: Searchers that train a network instead of proposing candidates (benchmarked in bench_differentiable).
TRAINING = ("dmcp", "resrep")
#: The quick form's searchers: one of each kind (baseline, Optuna, RL); the contract tests cover the others.
QUICK_SEARCHERS = ("uniform", "random", "tpe", "ddpg")


@dataclass(frozen=True)
class Sizes:
    """Everything that scales the run time."""

    candidates: int
    seeds: int
    calib_batches: int
    calib_batch: int
    val_images: int
    test_images: int
    ft_steps: int
    ft_batch: int


FULL = Sizes(candidates=40, seeds=3, calib_batches=20, calib_batch=128, val_images=2000, test_images=5000,
             ft_steps=300, ft_batch=128)
QUICK = Sizes(candidates=3, seeds=1, calib_batches=2, calib_batch=64, val_images=256, test_images=256,
              ft_steps=3, ft_batch=32)


def setup(sizes: Sizes, seed: int = 0) -> dict[str, Any]:
    """Model, groups, search space, loaders (fixed calibration batches, val on test half A, test on half B)."""
    return _cifar.context("resnet20", _cifar.load_cifar10(seed), calib_batches=sizes.calib_batches,
                          calib_batch=sizes.calib_batch, select_images=sizes.val_images,
                          report_images=sizes.test_images, seed=seed)


# ------------------------------------------------------------------------------------------------ the run


def run_searcher(name: str, seed: int, ctx: Mapping[str, Any], sizes: Sizes, store: Any) -> dict[str, Any]:
    """One search; returns the trial sequence (validation accuracy, feasibility, MACs, widths)."""
    from autoprune.agents.base import make_searcher

    problem = _cifar.make_problem(ctx)
    seed_everything(seed)
    t0 = time.perf_counter()
    searcher = make_searcher(name, problem, store=store, budget=BUDGET, n_trials=sizes.candidates, seed=seed,
                             **_cifar.searcher_options(name, sizes.candidates, len(ctx["space"].groups)))
    res = searcher.run()
    dense = problem.dense_cost.macs
    trials = [{"number": t.number, "state": t.state, "accuracy": t.result.accuracy if t.result else None,
               "macs": t.cost.macs / dense, "feasible": t.cost.macs <= BUDGET["macs"] * dense,
               "widths": dict(t.candidate.widths)} for t in res.trials]
    # Seconds from the store (sum over trials: proposal + evaluation), so that resumed runs count every trial.
    seconds = float(store.to_dataframe(searcher=name, seed=seed)["seconds"].fillna(0.0).sum())
    return {"searcher": name, "seed": seed, "trials": trials, "stop_reason": res.stop_reason,
            "seconds": seconds, "wall_seconds_this_call": time.perf_counter() - t0}


def best_so_far(trials: Sequence[Mapping[str, Any]]) -> list[float]:
    """Best feasible validation accuracy after each candidate (0 before the first feasible one)."""
    out, best = [], 0.0
    for t in trials:
        if t["feasible"] and t["accuracy"] is not None:
            best = max(best, t["accuracy"])
        out.append(best)
    return out


def to_reach(trials: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """1-based number of candidates until the best-so-far reaches ``target`` (``None``: never)."""
    for i, b in enumerate(best_so_far(trials), start=1):
        if b >= target - 1e-12:
            return i
    return None


def finetune_test(ctx: Mapping[str, Any], sizes: Sizes, widths: Mapping[str, int], seed: int) -> float:
    """Build ``widths``, re-estimate BN, fine-tune ``ft_steps`` SGD steps, return test (half B) accuracy."""
    from autoprune import pruning

    net = pruning.apply(ctx["model"], ctx["groups"], dict(widths), importance="l1")
    # A fresh loader per finalist: every finalist sees the same fine-tuning batches in the same order.
    return _cifar.finetune_and_report(ctx, net, steps=sizes.ft_steps, batch=sizes.ft_batch, lr=0.01,
                                      seed=seed)["test_after_ft"]


def run(sizes: Sizes, names: Sequence[str], store_path: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Every searcher × seed, then the fine-tuned finalists."""
    from autoprune.evaluate import validate
    from autoprune.store import TrialStore

    t0 = time.perf_counter()
    ctx = setup(sizes)
    store = TrialStore(store_path, campaign="bench-searchers")
    dense_val = float(validate(ctx["model"], ctx["select"], device="cpu")[0])
    dense_test = float(validate(ctx["model"], ctx["report"], device="cpu")[0])
    log(f"set-up {time.perf_counter() - t0:.0f}s; {len(ctx['space'].groups)} groups; dense val {dense_val:.4f}, "
        f"test {dense_test:.4f}")
    runs = []
    for name in names:
        for seed in range(sizes.seeds):
            r = run_searcher(name, seed, ctx, sizes, store)
            runs.append(r)
            log(f"{name} seed {seed}: best val {max(best_so_far(r['trials']), default=0):.4f} in "
                f"{len(r['trials'])} candidates, {r['seconds']:.0f}s ({r['stop_reason']})")
    finalists = {}
    for name in names:
        cands = [t for r in runs if r["searcher"] == name for t in r["trials"]
                 if t["feasible"] and t["accuracy"] is not None]
        if not cands:
            continue
        best = max(cands, key=lambda t: t["accuracy"])
        acc = finetune_test(ctx, sizes, best["widths"], seed=1234)
        finalists[name] = {"val": best["accuracy"], "macs": best["macs"], "test": acc, "widths": best["widths"]}
        log(f"{name}: fine-tuned test accuracy {acc:.4f} (val {best['accuracy']:.4f}, MACs {best['macs']:.3f})")
    return {"sizes": asdict(sizes), "budget": BUDGET, "dense": {"val": dense_val, "test": dense_test},
            "groups": len(ctx["space"].groups), "runs": runs, "finalists": finalists,
            "options": {n: _cifar.searcher_options(n, sizes.candidates, len(ctx["space"].groups)) for n in names},
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ report


def _mean_std(xs: Sequence[float]) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def summarise(raw: Mapping[str, Any]) -> str:
    """The markdown body."""
    s = raw["sizes"]
    names = list(dict.fromkeys(r["searcher"] for r in raw["runs"]))
    uniform = [max(best_so_far(r["trials"]), default=0.0) for r in raw["runs"] if r["searcher"] == "uniform"]
    target = uniform[0] if uniform else None
    lines = [
        f"ResNet-20 (akamaster weights), CIFAR-10, budget {int(100 * raw['budget']['macs'])} % of the dense MACs, "
        f"`cifar_resnet` search space ({raw['groups']} channel groups, min keep ratio 0.2), L1 channel selection.",
        f"Candidate budget: **{s['candidates']} candidates per searcher and seed**, {s['seeds']} seed(s). "
        f"Evaluator: adaptive BN on {s['calib_batches']} fixed training batches of {s['calib_batch']}, top-1 on "
        f"{s['val_images']} images of test half A (\"val\"). Dense model: val {100 * raw['dense']['val']:.2f} %, "
        f"test {100 * raw['dense']['test']:.2f} % ({s['test_images']} images of the disjoint half B).",
        "",
        "| searcher | best val acc % (mean ± std) | candidates to reach uniform (mean ± std; runs reaching) |"
        " feasible candidates | seconds per run (sum over candidates) |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        runs = [r for r in raw["runs"] if r["searcher"] == name]
        best = [100 * max(best_so_far(r["trials"]), default=0.0) for r in runs]
        reach = [to_reach(r["trials"], target) for r in runs] if target is not None else []
        got = [x for x in reach if x is not None]
        feas = statistics.fmean(sum(t["feasible"] for t in r["trials"]) for r in runs)
        secs = statistics.fmean(r["seconds"] for r in runs)
        lines.append(f"| {name} | {_mean_std(best)} | {_mean_std([float(x) for x in got])} ({len(got)}/{len(runs)}) "
                     f"| {feas:.1f} | {secs:.0f} |")
    lines += [
        "",
        f"Fine-tuned finalists (the best candidate of each searcher over all seeds by val accuracy; BN re-estimated, "
        f"then {s['ft_steps']} SGD steps × batch {s['ft_batch']}, lr 0.01 cosine, momentum 0.9, wd 5e-4, CIFAR "
        "augmentation; one fine-tune per finalist, same seed): test accuracy on half B.",
        "",
        "| searcher | val acc % | MACs (fraction of dense) | test acc % after fine-tune |",
        "|---|---|---|---|",
    ]
    for name, f in raw["finalists"].items():
        lines.append(f"| {name} | {100 * f['val']:.2f} | {f['macs']:.3f} | {100 * f['test']:.2f} |")
    opts = "; ".join(f"{k}: {v}" for k, v in raw["options"].items() if v)
    lines += [
        "",
        f"Searcher settings changed from the defaults to fit the candidate budget: {opts or 'none'}.",
        "`uniform` and `global_magnitude` propose a single candidate; `sensitivity` spends its budget on a scan "
        "(dense + one group at a time) and ends with one allocation. The \"reach uniform\" column counts "
        "candidates until the best feasible validation accuracy so far is at least uniform's.",
        "",
        f"Total run time: {raw['seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, minutes)")
    parser.add_argument("--searchers", default=None,
                        help="comma-separated names (default: every available one except dmcp and resrep; "
                        f"with --quick: {','.join(QUICK_SEARCHERS)})")
    parser.add_argument("--candidates", type=int, default=None, help="candidates per searcher and seed")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
    parser.add_argument("--store", type=Path, default=None, help="SQLite file for the trials (resumable)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)

    import optuna

    from autoprune._imports import is_available
    from autoprune.agents.base import SEARCHERS, load_builtin_searchers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    missing = _cifar.data_error()
    if missing:
        parser.exit(2, missing + "\n")
    configure_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.candidates is not None:
        sizes = replace(sizes, candidates=args.candidates)
    if args.seeds is not None:
        sizes = replace(sizes, seeds=args.seeds)
    load_builtin_searchers()
    if args.searchers:
        names = [n.strip() for n in args.searchers.split(",") if n.strip()]
    elif args.quick:
        names = list(QUICK_SEARCHERS)
    else:
        names = [n for n in SEARCHERS.names()
                 if n not in TRAINING and not (n == "cmaes" and not is_available("cmaes"))]
    if "uniform" not in names:
        names = ["uniform", *names]
    names = ["uniform", *[n for n in names if n != "uniform"]]
    for n in names:
        SEARCHERS.get(n)  # unknown names fail before anything runs
    store_path = args.store or Path(tempfile.mkdtemp(prefix="bench-searchers-")) / "trials.db"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    raw = run(sizes, names, store_path, log)
    write_json("searchers", raw)
    title = "Searchers on ResNet-20 / CIFAR-10 at 50 % MACs" + (" (quick)" if args.quick else "")
    path = write_result("searchers", title, summarise(raw))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
