"""Shared set-up of the CIFAR-10 benchmarks on the pretrained akamaster ResNets (``../shared``).

Protocol. The akamaster checkpoints were trained on all 50,000 training images, so a validation split carved
from the training set is memorised and cannot rank candidates. The 10,000 test images are therefore split once
into two disjoint stratified halves: **half A** selects (scores candidates, picks finalists), **half B**
reports (accuracies after fine-tuning); nothing is ever selected on half B. Calibration, search-time training
and fine-tuning use training images only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from benchmarks._common import CIFAR10_DIR, SHARED, WEIGHTS_DIR

CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th",
               "resnet44": "resnet44-014dd654.th", "resnet56": "resnet56-4bfd9763.th"}
SPLIT_SEED = 0
#: The search space's lower bound on keep ratios in every benchmark.
MIN_RATIO = 0.2


def missing_data(models: tuple[str, ...] = ("resnet20",)) -> str | None:
    """``None`` when CIFAR-10 and the checkpoints of ``models`` are in ``../shared``, else what is missing."""
    missing = [str(CIFAR10_DIR)] if not (CIFAR10_DIR / "test_batch.bin").is_file() else []
    missing += [str(WEIGHTS_DIR / CHECKPOINTS[m]) for m in models if not (WEIGHTS_DIR / CHECKPOINTS[m]).is_file()]
    if not missing:
        return None
    return ("missing " + ", ".join(missing) + ": this benchmark needs the binary CIFAR-10 and the pretrained "
            "akamaster ResNets")


def data_error(models: tuple[str, ...] = ("resnet20",)) -> str | None:
    """``None`` when the data of :func:`missing_data` is there, else the ``error:``/``hint:`` lines a benchmark
    prints before it exits 2 (nothing has run)."""
    missing = missing_data(models)
    if missing is None:
        return None
    return (f"error: {missing}\nhint: put data/cifar-10-batches-bin and weights/ in {SHARED}, or set "
            "AUTOPRUNE_SHARED to the folder that holds them")


def load_cifar10(seed: int = 0) -> Any:
    """The CIFAR-10 splits (all 50,000 training images; no validation split, see the module docstring)."""
    from autoprune.data import load_dataset

    return load_dataset("cifar10", CIFAR10_DIR, val_size=0, seed=seed)


def split_test(test: Any, seed: int = SPLIT_SEED) -> tuple[Any, Any]:
    """Two disjoint stratified halves of the test set: (A: selection, B: report)."""
    from autoprune.data import stratified_indices

    half_a = stratified_indices(test.labels, len(test) // 2, seed=seed)
    in_a = torch.zeros(len(test), dtype=torch.bool)
    in_a[half_a] = True
    return test.take(half_a), test.take(torch.nonzero(~in_a).flatten())


def load_pretrained(model_name: str, splits: Any) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    """The pretrained model in evaluation mode, its channel groups and the example input they were traced with."""
    from autoprune import graph
    from autoprune.models import build_model
    from autoprune.models.checkpoint import load_checkpoint

    model = build_model(model_name, num_classes=10, mean=splits.info.mean, std=splits.info.std)
    load_checkpoint(model, WEIGHTS_DIR / CHECKPOINTS[model_name])
    model.eval()
    example = torch.rand(1, 3, 32, 32)
    return model, graph.analyze(model, example), example


def context(model_name: str, splits: Any, *, calib_batches: int, calib_batch: int, select_images: int,
            report_images: int, seed: int = 0) -> dict[str, Any]:
    """Everything a search benchmark needs for one model.

    Keys: ``name``, ``model``, ``groups``, ``space`` (``cifar_resnet``-style preset, min ratio
    :data:`MIN_RATIO`), ``example``, ``calib`` (the same ``calib_batches`` training batches for every
    candidate), ``select`` (``select_images`` of half A), ``report`` (``report_images`` of half B),
    ``train_set``.
    """
    from autoprune.data import make_loader, subset
    from autoprune.search_spaces import build_space

    part_a, part_b = split_test(splits.test)
    model, groups, example = load_pretrained(model_name, splits)
    calib = subset(splits.train, calib_batches * calib_batch, seed=seed + 1)
    return {
        "name": model_name, "model": model, "groups": groups, "example": example,
        "space": build_space(groups, model_name=model_name, min_ratio=MIN_RATIO),
        "calib": make_loader(calib, calib_batch), "calib_batches": calib_batches,
        "select": make_loader(subset(part_a, select_images, seed=seed), 500),
        "report": make_loader(subset(part_b, report_images, seed=seed), 500),
        "train_set": splits.train,
    }


def make_problem(ctx: Mapping[str, Any]) -> Any:
    """A fresh problem (own evaluation cache, so every searcher pays for its own evaluations).

    Evaluator: adaptive BN on the context's calibration batches, top-1 on the selection half.
    """
    from autoprune.evaluate import AdaptiveBNEvaluator
    from autoprune.problem import Problem

    ev = AdaptiveBNEvaluator(ctx["calib"], ctx["select"], batches=ctx["calib_batches"], device="cpu")
    return Problem(ctx["model"], ctx["groups"], ctx["space"], ev, ctx["example"], importance="l1")


def searcher_options(name: str, candidates: int, n_groups: int) -> dict[str, Any]:
    """Per-searcher settings that make a budget of ``candidates`` proposals fit (everything else: defaults)."""
    k = candidates
    if name in ("ddpg", "td3", "sac"):
        return {"warmup_episodes": max(1, k // 4)}  # AMC's 100-episode warm-up does not fit in k episodes
    if name == "ppo":
        return {"rollout_episodes": max(1, min(8, k // 5)), "batch_size": n_groups}
    if name in ("tpe", "gp"):
        return {"n_startup_trials": max(2, min(10, k // 4))}
    if name == "nsga2":
        return {"population_size": max(4, min(20, k // 4))}
    return {}


def uniform_widths(groups: Any, target: float) -> tuple[dict[str, int], float]:
    """The largest common keep ratio whose widths meet ``target`` × dense closed-form MACs (bisection)."""
    from autoprune import cost, pruning

    dense = cost.closed_form(groups, {}).macs
    lo, hi = 0.05, 1.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if cost.closed_form(groups, pruning.widths_from_ratios(groups, mid)).macs <= target * dense:
            lo = mid
        else:
            hi = mid
    return pruning.widths_from_ratios(groups, lo), lo


def train_loader(ctx: Mapping[str, Any], batch: int, seed: int) -> Any:
    """Shuffled, augmented training batches (a fresh loader: the same batches in the same order per seed)."""
    from autoprune.data import make_loader

    return make_loader(ctx["train_set"], batch, shuffle=True, augment=True, seed=seed)


def finetune_and_report(ctx: Mapping[str, Any], module: torch.nn.Module, *, steps: int, batch: int, lr: float,
                        seed: int) -> dict[str, float]:
    """The shared fine-tune of every finalist, reported on half B before and after.

    BN statistics are re-estimated on the calibration batches, then ``steps`` SGD steps (momentum 0.9, weight
    decay 5e-4, cosine learning rate from ``lr``, CIFAR augmentation) on a fresh loader seeded by ``seed``.
    Returns ``test_before_ft``, ``test_after_ft`` and ``ft_seconds``.
    """
    import time

    from autoprune.evaluate import recalibrate_bn, validate
    from autoprune.train import train_steps

    recalibrate_bn(module, ctx["calib"], ctx["calib_batches"], device="cpu")
    before = float(validate(module, ctx["report"], device="cpu")[0])
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train_steps(module, train_loader(ctx, batch, seed), steps, lr=lr, momentum=0.9, weight_decay=5e-4,
                schedule="cosine", device="cpu")
    ft_seconds = time.perf_counter() - t0
    after = float(validate(module, ctx["report"], device="cpu")[0])
    return {"test_before_ft": before, "test_after_ft": after, "ft_seconds": ft_seconds}
