"""``autoprune imp``: iterative magnitude pruning whose retraining stops by the InfCoP criterion.

Runs ``autoprune.imp.run_imp`` (the loop of docs/ALGORITHMS.md §4.4) and writes ``imp.csv`` (one row per iteration:
sparsity, rounds/epochs used, seconds, validation accuracy, stop reason), ``imp.json`` (settings, warm-up,
dense flow reference, per-round trajectories, final test accuracy) and ``final.pt`` (state dict + masks).
The test split is evaluated once, at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from autoprune.commands.train import add_data_args, load_data, model_kwargs_for, percent, safe_name

DEFAULT_OUT = Path("results") / "imp"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoprune imp``."""
    p = subparsers.add_parser(
        "imp",
        help="iterative magnitude pruning with InfCoP early stopping (IF/GF) or fixed retraining",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="zoo name (`autoprune list models`), module:callable or torchvision:X"
    )
    p.add_argument("--checkpoint", default=None, help="initialise the weights from this checkpoint")
    add_data_args(p)
    g = p.add_argument_group("IMP")
    g.add_argument(
        "--flow",
        choices=("IF", "GF", "none"),
        default="IF",
        help="stopping criterion of each retraining: information flow, gradient flow, or none (the "
        "fixed budget of `lth`) (default: %(default)s)",
    )
    g.add_argument(
        "--lth", action="store_true", help="the lth baseline preset: --flow none --scope layer --prune-ratio 0.2, no PQ"
    )
    g.add_argument("--iterations", type=int, default=5, help="IMP iterations (default: %(default)s)")
    g.add_argument(
        "--granularity",
        choices=("unstructured", "structured"),
        default="unstructured",
        help="weights or whole filters (default: %(default)s)",
    )
    g.add_argument("--scope", choices=("layer", "global"), default="layer", help="magnitude ranking scope")
    g.add_argument("--prune-ratio", type=float, default=0.2, help="fraction of alive units pruned per iteration")
    g.add_argument("--pq", action="store_true", help="adaptive prune ratio from the PQ index instead")
    g.add_argument("--p", type=float, default=0.5, help="PQ index p (default: %(default)s)")
    g.add_argument("--q", type=float, default=1.0, help="PQ index q (default: %(default)s)")
    g.add_argument("--beta", type=float, default=0.9, help="PQ ratio cap (default: %(default)s)")
    g.add_argument("--min-keep", type=float, default=0.01, help="per-layer minimum kept fraction")
    g.add_argument("--no-rewind", action="store_true", help="keep training the pruned weights (no rewinding)")
    g.add_argument("--warmup-rounds", type=int, default=2, help="dense warm-up rounds (default: %(default)s)")
    g.add_argument("--rounds", type=int, default=10, help="round budget per iteration (default: %(default)s)")
    g.add_argument("--round-epochs", type=float, default=2.0, help="epochs per round (default: %(default)s)")
    f = p.add_argument_group("flow consistency")
    f.add_argument("--eps", type=_eps, default=None,
                   help="tolerance (default: 1.0 for IF, 0.5 for GF), or auto: measured in iteration 0 as the "
                        "largest distance that retraining the unpruned network reaches (its full round budget)")
    f.add_argument("--form", choices=("l2", "rms", "relative"), default="l2", help="distance form")
    f.add_argument("--reduce", choices=("mean", "abs"), default="mean", help="IF reduction per layer pair")
    f.add_argument("--stat", choices=("mean", "fro"), default="mean", help="GF statistic per layer")
    f.add_argument("--flow-samples", type=int, default=2000, help="fixed flow subset size (training samples)")
    f.add_argument(
        "--no-accuracy-stop", action="store_true", help="do not stop when validation accuracy reaches the warm-up best"
    )
    o = p.add_argument_group("optimizer (the same for every variant)")
    o.add_argument("--lr", type=float, default=0.01, help="learning rate (default: %(default)s)")
    o.add_argument("--momentum", type=float, default=0.9, help="momentum (default: %(default)s)")
    o.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: %(default)s)")
    o.add_argument("--no-augment", action="store_true", help="disable the dataset's training augmentation")
    o.add_argument("--distill", type=float, default=0.0,
                   help="weight in [0, 1] of distillation from the starting model while retraining (default: off)")
    o.add_argument("--distill-temperature", type=float, default=4.0,
                   help="distillation temperature (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: results/imp/<model>-<dataset>-<flow>)")
    return p


def _eps(text: str) -> float | str:
    """``--eps``: a positive number or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or auto, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or auto, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Build model and data, run IMP, write the table, print it."""
    import logging

    import torch

    from autoprune.data import make_loader
    from autoprune.distill import Distillation
    from autoprune.evaluate import SGDSettings
    from autoprune.imp import IMPConfig, run_imp
    from autoprune.models import build_model
    from autoprune.models.checkpoint import load_checkpoint

    log = logging.getLogger("autoprune.imp")
    settings: dict[str, Any] = {
        "flow": args.flow,
        "iterations": args.iterations,
        "granularity": args.granularity,
        "scope": args.scope,
        "prune_ratio": args.prune_ratio,
        "pq": args.pq,
        "p": args.p,
        "q": args.q,
        "beta": args.beta,
        "min_keep": args.min_keep,
        "rewind": not args.no_rewind,
        "warmup_rounds": args.warmup_rounds,
        "max_rounds": args.rounds,
        "round_epochs": args.round_epochs,
        "eps": None if args.eps == "auto" else args.eps,
        "calibrate": args.eps == "auto",
        "form": args.form,
        "reduce": args.reduce,
        "stat": args.stat,
        "flow_samples": args.flow_samples,
        "stop_on_accuracy": not args.no_accuracy_stop,
        "seed": args.seed,
        "sgd": SGDSettings(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay),
        "distill": Distillation(args.distill, args.distill_temperature),
    }
    config = (
        IMPConfig.lth(**{k: v for k, v in settings.items() if k not in ("flow", "scope", "prune_ratio", "pq")})
        if args.lth
        else IMPConfig(**settings)
    )
    splits = load_data(args)
    torch.manual_seed(args.seed)
    model = build_model(args.model, **model_kwargs_for(splits.info))
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, model_name=args.model)
    train_loader = make_loader(
        splits.train,
        args.batch_size,
        shuffle=True,
        augment=not args.no_augment,
        seed=args.seed,
        drop_last=len(splits.train) > args.batch_size,
    )
    flow_loader = make_loader(splits.train, args.batch_size)  # test-time transforms, fixed order
    val_loader = make_loader(splits.val, 512)
    test_loader = make_loader(splits.test, 512)
    result = run_imp(
        model,
        train_loader,
        val_loader,
        config,
        flow_loader=flow_loader,
        test_loader=test_loader,
        device=args.device,
        log=log.info,
    )
    name = "lth" if args.lth else config.flow
    out = Path(args.out) if args.out else DEFAULT_OUT / f"{safe_name(args.model)}-{safe_name(args.dataset)}-{name}"
    paths = result.write(out)
    print(f"{'iter':>4} {'sparsity':>8} {'rounds':>6} {'epochs':>7} {'seconds':>8} {'val acc':>8}  stop")
    for r in result.rows:
        print(
            f"{r.iteration:>4} {r.sparsity:>8.3f} {r.rounds:>6} {r.epochs:>7g} {r.seconds:>8.1f} "
            f"{100 * r.val_accuracy:>7.2f}%  {r.stop_reason}"
        )
    total = result.rows[-1].cum_epochs if result.rows else 0.0
    print(f"total epochs (incl. warm-up): {total:g}; final test accuracy: {percent(result.test_accuracy or 0.0)}")
    if config.calibrate and result.eps is not None:
        print(f"flow tolerance eps: {result.eps:.4g} (calibrated in iteration 0)")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
