"""``autoprune quickstart``: a one-minute, offline tour — train ``small_cnn`` on scikit-learn's digits, evaluate.

It needs no downloads (the digits ship with scikit-learn), writes ``<out>/checkpoint.pt`` and
``<out>/metrics.json``, prints validation and test accuracy, and fails (exit 1) if the test accuracy is
below :data:`MIN_TEST_ACCURACY`, so ``make quickstart`` doubles as an end-to-end smoke test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from autoprune.commands.train import format_metrics, json_safe, model_kwargs_for, percent

MODEL = "small_cnn"
DATASET = "digits"
MODEL_OPTIONS: dict[str, Any] = {"width": 16}
EPOCHS = 10
LR = 0.1
BATCH_SIZE = 64
MIN_TEST_ACCURACY = 0.95


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoprune quickstart``."""
    p = subparsers.add_parser(
        "quickstart",
        help="train and evaluate a small CNN on the offline digits dataset (about a minute)",
        description=__doc__,
    )
    p.add_argument("--out", default="results/quickstart", help="output directory (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, init and shuffling (default: 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return p


def run(args: argparse.Namespace) -> int:
    """Train, evaluate, summarise."""
    import torch

    from autoprune.data import load_dataset, make_loader
    from autoprune.models import build_model
    from autoprune.train import evaluate, train

    start = time.perf_counter()
    out = Path(args.out)
    splits = load_dataset(DATASET, seed=args.seed)
    kwargs = {**model_kwargs_for(splits.info), **MODEL_OPTIONS}
    torch.manual_seed(args.seed)
    model = build_model(MODEL, **kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"quickstart: {MODEL} ({n_params:,} parameters) on {DATASET} "
        f"({len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images)"
    )
    history = train(
        model,
        make_loader(splits.train, BATCH_SIZE, shuffle=True, augment=True, seed=args.seed, drop_last=True),
        epochs=args.epochs,
        lr=LR,
        val_loader=make_loader(splits.val, 512),
        checkpoint_path=out / "checkpoint.pt",
        checkpoint_meta={
            "model_name": MODEL,
            "model_kwargs": kwargs,
            "extra": {"dataset": DATASET, "val_size": None, "seed": args.seed},
        },
        device=args.device,
        seed=args.seed,
        desc="quickstart",
    )
    test = evaluate(model, make_loader(splits.test, 512), desc="test")
    val = history.last.val if history.last else None
    seconds = time.perf_counter() - start
    summary = {
        "model": MODEL,
        "dataset": DATASET,
        "model_kwargs": kwargs,
        "seconds": seconds,
        "val": val.to_dict() if val else None,
        "test": test.to_dict(),
        "history": history.to_dict(),
    }
    (out / "metrics.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    if val is not None:
        print(format_metrics("val ", val))
    print(format_metrics("test", test))
    print(f"checkpoint: {out / 'checkpoint.pt'}  ({seconds:.1f} s in all)")
    print(f"next: autoprune evaluate --dataset {DATASET} --checkpoint {out / 'checkpoint.pt'} --per-class")
    if test.top1 < MIN_TEST_ACCURACY:
        print(f"quickstart check FAILED: test accuracy {percent(test.top1)} < {percent(MIN_TEST_ACCURACY)}")
        return 1
    return 0
