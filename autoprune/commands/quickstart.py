"""``autoprune quickstart``: the whole workflow offline, in about a minute on a 2-core CPU.

1. train ``small_cnn`` on scikit-learn's 8×8 digits (bundled, nothing is downloaded) → ``<out>/checkpoint.pt``
   and ``<out>/metrics.json`` (reused when a checkpoint of the same recipe is already there);
2. compare two searchers (default ``tpe`` and ``random``, plus the ``uniform`` baseline) on a small budget:
   half the dense model's MACs, each candidate scored with adaptive batch norm on the validation split;
3. write the report (leaderboard, Pareto front, best-so-far curves, per-layer widths);
4. export the best candidate: a short fine-tune, the test accuracy, the standalone model (reloaded and
   re-checked), a deployment artifact and a model card;

and print a summary with the paths. ``<out>`` is an ordinary campaign directory: ``autoprune report``,
``autoprune export`` and ``autoprune search <out>/config.resolved.yaml`` work on it. The command fails
(exit 1) if the dense model's test accuracy is below 95 % or the exported model does not reproduce its
accuracy, so ``make quickstart`` doubles as an end-to-end smoke test.

Two validation figures appear: the dense model's top-1 as trained (BN running statistics from training), and
its accuracy after batch-norm re-estimation on 10 training batches, which is how every candidate of the search
is scored (adaptive BN); both on the same validation images, carved from the training set and never trained on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from autoprune.commands.train import format_metrics, json_safe, model_kwargs_for, percent, seed_value

MODEL = "small_cnn"
DATASET = "digits"
MODEL_OPTIONS: dict[str, Any] = {"width": 16}
EPOCHS = 10
LR = 0.1
BATCH_SIZE = 64
MIN_TEST_ACCURACY = 0.95
AGENTS = "tpe,random"
TRIALS = 12


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoprune quickstart``."""
    p = subparsers.add_parser(
        "quickstart",
        help="offline tour in about a minute: train a small CNN, search with two agents, compare, export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="results/quickstart", help="output directory (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs (default: %(default)s)")
    p.add_argument("--agents", default=AGENTS, help="searchers to compare (default: %(default)s)")
    p.add_argument("--trials", type=int, default=TRIALS, help="candidates per searcher (default: %(default)s)")
    p.add_argument("--seed", type=seed_value, default=0,
                   help="seed of the split, init, shuffling and search (default: 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--retrain", action="store_true", help="train again even if <out>/checkpoint.pt exists")
    return p


def campaign_dict(out: Path, checkpoint: Path, trials: int, seed: int, device: str | None) -> dict[str, Any]:
    """The quickstart's campaign (the same as ``configs/small_cnn_digits.yaml``, smaller)."""
    return {
        "name": "quickstart",
        "output_dir": str(out),
        "model": {"name": MODEL, "checkpoint": str(checkpoint)},
        "dataset": {"name": DATASET, "batch_size": BATCH_SIZE, "seed": seed},
        "search_space": {"min_ratio": 0.25},
        "objective": {"reward": "r_err", "budget": {"macs": 0.5}},
        "evaluator": {"name": "adaptive_bn", "kwargs": {"batches": 10}},
        "searcher": {"name": "tpe", "agent_kwargs": {"tpe": {"n_startup_trials": 4}}},
        "n_trials": trials,
        "seed": seed,
        "device": device,
        "export": {"finetune": "fixed", "epochs": 3, "lr": 0.02, "formats": ["pt2"]},
    }


def _trained(ckpt: Path, epochs: int, seed: int) -> bool:
    """Whether ``ckpt`` is a finished quickstart training run of this recipe."""
    from autoprune.errors import AutoPruneError
    from autoprune.models.checkpoint import checkpoint_metadata

    if not ckpt.is_file():
        return False
    try:
        meta = checkpoint_metadata(ckpt)
    except AutoPruneError:
        return False
    extra = meta.get("extra") or {}
    width = (meta.get("model_kwargs") or {}).get("width")
    return (meta.get("model_name") == MODEL and meta.get("epoch") == epochs and extra.get("seed") == seed
            and extra.get("dataset") == DATASET and width == MODEL_OPTIONS["width"])


def train_dense(out: Path, args: argparse.Namespace) -> tuple[float, bool]:
    """Train (or reuse) the dense model; return its test accuracy and whether it was trained now."""
    import torch

    from autoprune.data import load_dataset, make_loader
    from autoprune.models import build_model
    from autoprune.models.checkpoint import load_checkpoint
    from autoprune.train import Metrics, evaluate, train

    ckpt = out / "checkpoint.pt"
    splits = load_dataset(DATASET, seed=args.seed)
    kwargs = {**model_kwargs_for(splits.info), **MODEL_OPTIONS}
    torch.manual_seed(args.seed)
    model = build_model(MODEL, **kwargs)
    reuse = not args.retrain and _trained(ckpt, args.epochs, args.seed) and (out / "metrics.json").is_file()
    if reuse:
        load_checkpoint(model, ckpt, model_name=MODEL)
        test = evaluate(model, make_loader(splits.test, 512), desc="test")
        print(f"reusing the trained {MODEL} in {ckpt} (--retrain to train again)")
        stored = json.loads((out / "metrics.json").read_text()).get("val")
        val = Metrics.from_dict(stored) if stored else None
    else:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"1/4 train {MODEL} ({n_params:,} parameters) on {DATASET} ({len(splits.train)} train / "
              f"{len(splits.val)} val / {len(splits.test)} test images, {args.epochs} epochs)")
        start = time.perf_counter()
        history = train(
            model,
            make_loader(splits.train, BATCH_SIZE, shuffle=True, augment=True, seed=args.seed, drop_last=True),
            epochs=args.epochs, lr=LR, val_loader=make_loader(splits.val, 512), checkpoint_path=ckpt,
            checkpoint_meta={"model_name": MODEL, "model_kwargs": kwargs,
                             "extra": {"dataset": DATASET, "val_size": None, "seed": args.seed}},
            device=args.device, seed=args.seed, desc="quickstart")
        test = evaluate(model, make_loader(splits.test, 512), desc="test")
        val = history.last.val if history.last else None
        summary = {"model": MODEL, "dataset": DATASET, "model_kwargs": kwargs,
                   "seconds": time.perf_counter() - start, "val": val.to_dict() if val else None,
                   "test": test.to_dict(), "history": history.to_dict()}
        (out / "metrics.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    if val is not None:
        print(format_metrics("val ", val) + "  (as trained)")
    print(format_metrics("test", test))
    return float(test.top1), not reuse


def run(args: argparse.Namespace) -> int:
    """Train, search with two agents, compare, report, export, summarise."""
    from autoprune.campaign import compare, dense_score_label, open_campaign, searched, summarize, val_label
    from autoprune.config import config_from_dict
    from autoprune.errors import ConfigError
    from autoprune.export import ExportCheckError, export_trial, select_trial
    from autoprune.provenance import SPACE_FILE, open_store
    from autoprune.report import leaderboard_markdown, write_leaderboard, write_report
    from autoprune.utils import prepare_out_dir

    start = time.perf_counter()
    if args.trials < 1:
        raise ConfigError(f"--trials must be ≥ 1, got {args.trials}")
    out = prepare_out_dir(args.out, hint="pass --out <a writable directory>")
    dense_acc, retrained = train_dense(out, args)
    if dense_acc < MIN_TEST_ACCURACY:
        print(f"quickstart check FAILED: test accuracy {percent(dense_acc)} < {percent(MIN_TEST_ACCURACY)}")
        return 1

    cfg = config_from_dict(campaign_dict(out, out / "checkpoint.pt", args.trials, args.seed, args.device))
    if retrained:  # trials scored on earlier weights would mix with the new ones
        stale = open_store(cfg).delete()
        (out / SPACE_FILE).unlink(missing_ok=True)
        if stale:
            print(f"the model was retrained: removed {stale} earlier search stud{'y' if stale == 1 else 'ies'}")
    agents = [a.strip() for a in args.agents.split(",") if a.strip()]
    argv = ["quickstart", "--out", str(out), "--agents", ",".join(agents), "--trials", str(args.trials),
            "--seed", str(args.seed), "--epochs", str(args.epochs)]
    camp, store = open_campaign(cfg, argv=argv, role="quickstart")
    dense = camp.problem.dense_cost
    print(f"2/4 search: {', '.join(agents)} and the uniform baseline, {args.trials} candidates each, budget "
          f"{cfg.objective.budget.macs:.0%} of {dense.macs:,} MACs, {searched(camp.space)}")
    if camp.dense_accuracy is not None:
        print(f"   dense model: val top-1 {percent(camp.dense_accuracy)} {dense_score_label(camp)}; the same "
              "validation images as the val top-1 above, which is as trained")
    label = val_label(cfg)
    board = compare(camp, store, agents, [args.seed], quiet=args.quiet,
                    on_result=lambda r: print("   " + summarize(r, dense.macs, val_label=label), flush=True))
    write_leaderboard(board, out)
    if board.attrs.get("interrupted"):
        print("interrupted: run the same command again to resume")
        return 130

    print("3/4 report")
    report = write_report(out, df=store.to_dataframe())
    trial = select_trial(store.to_dataframe(), "best")
    print(f"4/4 export {trial.label}: fine-tune, test, save, reload and re-check")
    try:
        res = export_trial(camp, trial, command=f"autoprune export {out} --trial {trial.searcher}/seed{trial.seed}/"
                           f"{trial.number}", search_command="autoprune " + " ".join(argv))
    except ExportCheckError as exc:
        print(f"quickstart check FAILED: {exc}")
        return 1

    m = res.metrics
    o, e = m["original"], m["exported"]
    seconds = time.perf_counter() - start
    print()
    print(leaderboard_markdown(board))
    print(f"original  {MODEL}: test accuracy {percent(o['test_accuracy'])}, {o['macs']:,} MACs, "
          f"{o['params']:,} params")
    print(f"exported  {trial.label}: test accuracy {percent(e['test_accuracy'])}, {e['macs']:,} MACs "
          f"({e['macs'] / o['macs']:.0%}), {e['params']:,} params ({e['params'] / o['params']:.0%}); the reloaded "
          f"file reproduces {percent(m['check']['reloaded_test_accuracy'])}")
    print(f"report:      {report.out_dir}  ({', '.join(p.name for p in report.figures.values())})")
    print(f"model:       {res.model_dir}")
    print(f"model card:  {res.card}")
    print(f"quickstart done in {seconds:.0f} s. Next: autoprune compare {out / 'config.resolved.yaml'} "
          "--agents tpe,random,ddpg --seeds 3")
    return 0
