"""Benchmark: how much of evaluating ResNet-20 on the CIFAR-10 test set is spent in the data pipeline.

Measures (on the real CIFAR-10 binary batches in ``../shared``):

1. reading the dataset and carving the validation split (``load_dataset``);
2. iterating the 10,000 test images with the loader alone (uint8 → float32 batches);
3. one training epoch of the loader alone with shuffling + augmentation (45,000 images);
4. ResNet-20 inference over the test set through the same loader, and the loader's share of it.

With the pretrained akamaster weights present, the test accuracy is reported as an end-to-end check of the
pixel layout (published: 91.73 %). Run as ``python -m benchmarks.bench_data_loading [--quick]``; the table goes
to ``results/benchmarks/data_loading.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from autoprune.data import load_dataset, make_loader
from autoprune.utils import configure_threads
from benchmarks._common import CIFAR10_DIR, WEIGHTS_DIR, write_result


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _drain(loader: object) -> int:
    n = 0
    for _, y in loader:  # type: ignore[attr-defined]
        n += int(y.shape[0])
    return n


def _model(mean: Sequence[float], std: Sequence[float]) -> tuple[nn.Module, str, bool]:
    """ResNet-20 from the zoo, with the pretrained weights when available; (model, description, pretrained)."""
    from autoprune.models import build_model

    model = build_model("resnet20", num_classes=10, mean=mean, std=std)
    ckpt = WEIGHTS_DIR / "resnet20-12fca82f.th"
    if ckpt.is_file():
        try:
            from autoprune.models.checkpoint import load_checkpoint

            load_checkpoint(model, ckpt)
            return model, f"autoprune.models resnet20 + {ckpt.name}", True
        except Exception as exc:  # the checkpoint module is optional for this measurement
            return model, f"autoprune.models resnet20, random weights ({type(exc).__name__}: {exc})", False
    return model, "autoprune.models resnet20, random weights (no checkpoint found)", False


def _infer(model: nn.Module, loader: object) -> tuple[int, int]:
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:  # type: ignore[attr-defined]
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.shape[0])
    return correct, total


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 0 on success, 2 when the data is missing."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_data_loading", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=CIFAR10_DIR, help="CIFAR-10 batches (default: ../shared)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the cheap measurements")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="20 inference batches instead of the full test set")
    args = parser.parse_args(argv)

    if not (args.data_dir / "test_batch.bin").is_file():
        print(f"CIFAR-10 not found at {args.data_dir}; put ../shared beside the checkout", file=sys.stderr)
        return 2
    threads = configure_threads(args.threads)
    load_before = os.getloadavg()[0]

    load_times = _timed(lambda: load_dataset("cifar10", args.data_dir), args.repeats)
    splits = load_dataset("cifar10", args.data_dir)
    limit = 20 if args.quick else None
    test_loader = make_loader(splits.test, args.batch_size, limit=limit)
    n_test = test_loader.num_samples
    iter_times = _timed(lambda: _drain(test_loader), args.repeats)
    train_loader = make_loader(splits.train, 128, shuffle=True, augment=True, limit=60 if args.quick else None)
    aug_times = _timed(lambda: _drain(train_loader), 1)

    model, model_desc, pretrained = _model(splits.info.mean, splits.info.std)
    model.eval()
    _infer(model, make_loader(splits.test, args.batch_size, limit=2))  # warm-up
    start = time.perf_counter()
    correct, total = _infer(model, test_loader)
    infer_time = time.perf_counter() - start
    load_after = os.getloadavg()[0]

    loader_time = statistics.median(iter_times)
    share = loader_time / infer_time
    rows = [
        ("read CIFAR-10 + carve val split (load_dataset)", f"{statistics.median(load_times):.2f} s",
         f"min {min(load_times):.2f} s, max {max(load_times):.2f} s over {args.repeats}"),
        (f"iterate test set, loader alone ({n_test} images, batch {args.batch_size})", f"{loader_time:.3f} s",
         f"{n_test / loader_time:,.0f} images/s"),
        (f"iterate train set, shuffle + augment ({train_loader.num_samples} images, batch 128)",
         f"{statistics.median(aug_times):.3f} s", f"{train_loader.num_samples / statistics.median(aug_times):,.0f} "
                                                  "images/s"),
        (f"ResNet-20 inference over the test set ({total} images, incl. loader)", f"{infer_time:.2f} s",
         f"{total / infer_time:,.0f} images/s"),
        ("**loader share of inference (loader alone / inference total)**", f"**{share:.1%}**",
         f"ratio {share:.4f}"),
    ]
    body = [f"- model: {model_desc}", f"- torch threads: {threads}; 1-minute load average before / after: "
            f"{load_before:.1f} / {load_after:.1f} (the machine is shared; timings are noisy)"]
    if pretrained:
        body.append(f"- test accuracy (end-to-end check of the pixel layout): {correct / total:.2%} "
                    f"({correct}/{total}; published 91.73 % on the full test set)")
    body += ["", "| measurement | time | note |", "|---|---|---|"]
    body += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(body)
    print(text)
    path = write_result("data_loading", "CIFAR-10 data loading vs ResNet-20 inference", text)
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
