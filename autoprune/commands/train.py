"""``autoprune train``: train a zoo (or user) model on a dataset and write a checkpoint in autoprune's format.

Also holds the small helpers the data-driven commands share (data options, dataset → model arguments).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autoprune.data import DatasetInfo, DataSplits

DEFAULT_OUT = Path("results") / "train"


def int_or_float(text: str) -> int | float:
    """Parse ``"5000"`` as an int and ``"0.1"`` as a float (for ``--val-size``)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None


def seed_value(text: str) -> int:
    """Parse a ``--seed``: an integer in 0..2**32-1 (NumPy's rule; anything else would fail deep inside)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"must be in 0..{2**32 - 1}, got {value}")
    return value


def add_data_args(p: argparse.ArgumentParser, *, dataset_required: bool = True) -> None:
    """``--dataset``, ``--data-dir``, ``--data-option``, ``--download``, ``--val-size``, ``--seed``, ``--batch-size``,
    ``--device``."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=dataset_required, help="dataset name (see `autoprune list datasets`)")
    g.add_argument(
        "--data-dir", default=None, help="where the dataset files are (default: $AUTOPRUNE_DATA, else ./data)"
    )
    g.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE", type=data_option,
                   help="a dataset option, repeatable; the value is read as YAML, e.g. --data-option image_size=32 "
                   "for image_folder, or a keyword argument of your own dataset callable (a campaign's "
                   "dataset.kwargs)")
    g.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    g.add_argument(
        "--val-size",
        type=int_or_float,
        default=None,
        help="validation samples carved from the training set: a count or a fraction (default: per dataset)",
    )
    g.add_argument("--seed", type=seed_value, default=0, help="seed of the validation split, init and shuffling")
    g.add_argument("--batch-size", type=int, default=128, help="batch size (default: %(default)s)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def check_model_name(name: str) -> None:
    """Fail fast (before loading data) on an unknown zoo model name; import strings are checked when built."""
    from autoprune.models import MODELS
    from autoprune.models.external import is_external_name

    if not is_external_name(name):
        MODELS.get(name)


def data_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → ``(KEY, VALUE read as YAML)`` (an argparse type: a bad form is a usage error)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r} (e.g. image_size=32)")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"the value of {key.strip()!r} is not valid YAML: {exc}") from exc


def load_data(args: argparse.Namespace) -> DataSplits:
    """``load_dataset`` with the command-line data options."""
    from autoprune.data import load_dataset

    options = dict(getattr(args, "data_option", None) or [])
    return load_dataset(args.dataset, args.data_dir, val_size=args.val_size, seed=args.seed, download=args.download,
                        options=options or None)


def model_kwargs_for(info: DatasetInfo) -> dict[str, Any]:
    """``build_model`` arguments that fit a dataset: classes, input channels, normalisation statistics."""
    return {
        "num_classes": int(info.num_classes),
        "in_channels": int(info.input_shape[0]),
        "mean": [float(v) for v in info.mean],
        "std": [float(v) for v in info.std],
    }


def safe_name(text: str) -> str:
    """A file-system friendly version of a model or dataset name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def percent(x: float) -> str:
    """``0.9173`` → ``"91.73 %"``."""
    return f"{100.0 * x:.2f} %"


def format_metrics(label: str, m: Any) -> str:
    """One line: top-1, top-5, loss and sample count of a :class:`~autoprune.train.Metrics`."""
    return f"{label} top-1: {percent(m.top1)}  top-5: {percent(m.top5)}  loss: {m.loss:.4f}  ({m.samples} samples)"


def json_safe(obj: Any) -> Any:
    """Replace non-finite floats (e.g. ``nan`` accuracy of an absent class) by ``None``, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoprune train``."""
    p = subparsers.add_parser(
        "train",
        help="train a model on a dataset and save a checkpoint",
        description="Train a model with SGD (cosine LR by default) and write <out>/checkpoint.pt (model, optimizer, "
        "history; resumable) and <out>/metrics.json. Prints a line per epoch (loss, accuracy, learning rate, "
        "seconds; progress bars as well on a terminal; nothing with --quiet), then the validation and test "
        "accuracy. The validation split is carved from the training set; the test split is used once, at the "
        "end.",
    )
    p.add_argument(
        "--model", required=True, help="zoo name (`autoprune list models`), module:callable or torchvision:X"
    )
    add_data_args(p)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=30,
                   help="whole epochs (default: %(default)s); a line per epoch shows loss, accuracy, learning rate "
                   "and seconds. Fractional epochs are for fine-tunes: `autoprune export DIR --epochs 0.25` "
                   "fine-tunes on a quarter of the training set")
    t.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default: %(default)s)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: %(default)s)")
    t.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    t.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default: %(default)s)")
    t.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine", help="LR schedule")
    t.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear LR warm-up epochs; fractions allowed, e.g. 0.5 (default: %(default)s)")
    t.add_argument("--no-augment", action="store_true", help="disable the dataset's training augmentation")
    o = p.add_argument_group("checkpoints")
    o.add_argument("--out", default=None, help="output directory (default: results/train/<model>-<dataset>)")
    o.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if it exists")
    o.add_argument("--checkpoint", default=None, metavar="INIT", help="initialise the weights from this checkpoint")
    return p


def run(args: argparse.Namespace) -> int:
    """Train, evaluate on the test split, print the summary."""
    import logging

    import torch

    from autoprune.data import make_loader
    from autoprune.models import build_model
    from autoprune.models.checkpoint import load_checkpoint
    from autoprune.train import evaluate, train
    from autoprune.utils import prepare_out_dir

    log = logging.getLogger("autoprune.train")
    check_model_name(args.model)
    splits = load_data(args)
    kwargs = model_kwargs_for(splits.info)
    torch.manual_seed(args.seed)
    model = build_model(args.model, **kwargs)
    if args.checkpoint:
        meta = load_checkpoint(model, args.checkpoint, model_name=args.model)
        log.info("initialised %s from %s (%s format)", args.model, meta["path"], meta["format"])
    out = Path(args.out) if args.out else DEFAULT_OUT / f"{safe_name(args.model)}-{safe_name(args.dataset)}"
    prepare_out_dir(out, hint="pass --out <a writable directory>")
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and not args.resume:
        log.warning("overwriting %s (pass --resume to continue it instead)", ckpt)

    train_loader = make_loader(
        splits.train,
        args.batch_size,
        shuffle=True,
        augment=not args.no_augment,
        seed=args.seed,
        drop_last=len(splits.train) > args.batch_size,
    )
    val_loader = make_loader(splits.val, 512) if len(splits.val) else None
    history = train(
        model,
        train_loader,
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        nesterov=args.nesterov,
        label_smoothing=args.label_smoothing,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        val_loader=val_loader,
        checkpoint_path=ckpt,
        checkpoint_meta={
            "model_name": args.model,
            "model_kwargs": kwargs,
            "extra": {"dataset": args.dataset, "val_size": args.val_size, "seed": args.seed},
        },
        resume=args.resume,
        device=args.device,
        seed=args.seed,
        desc=f"train {args.model}",
    )
    test = evaluate(model, make_loader(splits.test, 512), desc="test")
    val = history.last.val if history.last is not None else None
    summary = {
        "model": args.model,
        "dataset": args.dataset,
        "epochs": len(history.epochs),
        "val": val.to_dict() if val else None,
        "test": test.to_dict(),
        "checkpoint": str(ckpt),
        "history": history.to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    if val is not None:
        print(format_metrics("val ", val))
    print(format_metrics("test", test))
    print(f"checkpoint: {ckpt}")
    return 0
