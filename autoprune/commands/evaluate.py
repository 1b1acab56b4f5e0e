"""``autoprune evaluate``: accuracy of a checkpoint on a dataset split (top-1, top-5, loss, per class)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from autoprune.commands.train import (
    add_data_args,
    check_model_name,
    format_metrics,
    json_safe,
    load_data,
    model_kwargs_for,
    percent,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoprune evaluate``."""
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint on a dataset split",
        description="Load a checkpoint (autoprune, akamaster or plain state dict) into a model and report top-1, "
        "top-5 and loss on the test (default) or validation split.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model name (optional for checkpoints written by `autoprune train`, which record it)",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file (or a directory with checkpoint.pt)")
    add_data_args(p)
    p.add_argument("--split", choices=("test", "val"), default="test", help="which split (default: %(default)s)")
    p.add_argument("--per-class", action="store_true", help="also print the accuracy of every class")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(batch_size=512, seed=None)
    return p


def resolve_model_args(
    args_model: str | None, meta: dict[str, Any], dataset_kwargs: dict[str, Any], dataset: str
) -> tuple[str, dict[str, Any]]:
    """The model name and ``build_model`` arguments for a checkpoint evaluated on a dataset.

    Our own checkpoints carry the model's name and arguments (including its normalisation); other formats get
    the dataset's. Raises :class:`~autoprune.errors.ConfigError` if the model name is unknown or the
    checkpoint's classes / channels do not fit the dataset.
    """
    from autoprune.errors import ConfigError

    saved_name = meta.get("model_name")
    if not args_model and isinstance(saved_name, str) and ":" in saved_name:
        # Import strings come from the user's own command line or config only, never from a file.
        raise ConfigError(
            f"{meta['path']} names its model by the import string {saved_name!r}; a checkpoint never decides "
            "which code is imported",
            hint=f"pass --model {saved_name} yourself if you trust that code",
        )
    name = args_model or saved_name
    if not name:
        raise ConfigError(
            f"{meta['path']} ({meta['format']} format) does not say which model it holds",
            hint="pass --model (see `autoprune list models`)",
        )
    kwargs = dict(dataset_kwargs)
    saved = meta.get("model_kwargs") or {}
    if saved_name == name and saved:
        kwargs.update(saved)
    for key, dataset_key in (("num_classes", "num_classes"), ("in_channels", "in_channels")):
        if kwargs.get(key) != dataset_kwargs[dataset_key]:
            raise ConfigError(
                f"the checkpoint's model has {key}={kwargs.get(key)} but dataset {dataset!r} has "
                f"{dataset_kwargs[dataset_key]}",
                hint="evaluate on the dataset the checkpoint was trained on",
            )
    return name, kwargs


def run(args: argparse.Namespace) -> int:
    """Load, evaluate, print."""
    from autoprune.data import make_loader
    from autoprune.models import build_model
    from autoprune.models.checkpoint import checkpoint_metadata, load_checkpoint
    from autoprune.train import evaluate

    if args.model:
        check_model_name(args.model)
    meta = checkpoint_metadata(args.checkpoint)
    # Re-create the training run's validation split unless told otherwise (our checkpoints record it).
    recorded = meta.get("extra") or {}
    if args.val_size is None and recorded.get("dataset") == args.dataset:
        args.val_size = recorded.get("val_size")
    if args.seed is None:
        args.seed = int(recorded.get("seed") or 0) if recorded.get("dataset") == args.dataset else 0
    splits = load_data(args)
    name, kwargs = resolve_model_args(args.model, meta, model_kwargs_for(splits.info), args.dataset)
    model = build_model(name, **kwargs)
    loaded = load_checkpoint(model, meta["path"], model_name=name)
    split = splits.test if args.split == "test" else splits.val
    metrics = evaluate(model, make_loader(split, args.batch_size), device=args.device, desc=f"eval {args.split}")
    classes = list(splits.info.class_names)
    if args.json:
        result = {
            "model": name,
            "dataset": args.dataset,
            "split": args.split,
            "checkpoint": loaded["path"],
            "format": loaded["format"],
            "normalize": loaded["normalize"],
            **metrics.to_dict(),
        }
        if not args.per_class:
            result.pop("per_class")
        else:
            result["per_class"] = dict(zip(classes, metrics.per_class))
        print(json.dumps(json_safe(result), indent=2))
        return 0
    print(f"{name} on {args.dataset} {args.split} ({loaded['format']} checkpoint {loaded['path']})")
    print(format_metrics(args.split, metrics))
    if args.per_class:
        width = max(len(c) for c in classes)
        for cls, acc in zip(classes, metrics.per_class):
            print(f"  {cls:<{width}}  {percent(acc) if acc == acc else 'n/a'}")
    return 0
