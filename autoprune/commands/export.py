"""``autoprune export DIR [--trial best|N]``: fine-tune a campaign's candidate and save it standalone.

Writes DIR/export/<searcher>-seed<S>-trial<N>/ with ``model/`` (architecture as data + weights, loadable
without the model code), optional deployment artifacts, ``MODEL_CARD.md`` and ``export.json``. The saved
model is reloaded and re-evaluated on the test split; if it does not reproduce the accuracy the command fails
(exit 1).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_CHECK_FAILED = 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoprune export``."""
    p = subparsers.add_parser("export", help="fine-tune and export a campaign's best (or chosen) candidate",
                              description=__doc__)
    p.add_argument("dir", metavar="DIR", help="campaign directory, e.g. results/<campaign name>")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", default=[],
                   help="overrides of the export section, e.g. export.epochs=5 export.finetune=infcop")
    p.add_argument("--trial", default="best",
                   help="best (default), a trial number of the configured searcher/seed, SEARCHER/N or "
                   "SEARCHER/seedS/N")
    p.add_argument("--searcher", default=None, help="study searcher for --trial N (default: the config's)")
    p.add_argument("--seed", type=int, default=None, help="study seed for --trial N (default: the config's)")
    p.add_argument("--finetune", choices=("fixed", "infcop", "none"), default=None,
                   help="final fine-tune (default: export.finetune of the config)")
    p.add_argument("--epochs", type=float, default=None,
                   help="epochs of the fixed fine-tune (default: export.epochs of the config); fractions are "
                   "allowed: --epochs 0.25 trains on a quarter of the training set (a quarter of an epoch), "
                   "--epochs 1.5 on one and a half. The shipped configs (configs/*.yaml) state what an epoch "
                   "costs on a CPU")
    p.add_argument("--formats", default=None,
                   help="deployment formats, comma-separated (pt2, torchscript, onnx) or 'none' (default: config)")
    p.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    p.add_argument("--out", default=None, help="export directory (default: DIR/export/<trial>)")
    return p


def _argv(args: argparse.Namespace) -> list[str]:
    out = ["export", args.dir, *args.overrides, "--trial", args.trial]
    for flag, value in (("--searcher", args.searcher), ("--seed", args.seed), ("--finetune", args.finetune),
                        ("--epochs", args.epochs), ("--formats", args.formats), ("--out", args.out)):
        if value is not None:
            out += [flag, str(value)]
    return out + (["--no-latency"] if args.no_latency else [])


def _search_command(out_dir: Any) -> str:
    path = out_dir / "command.txt"
    if not path.is_file():
        return ""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return lines[-1] if lines else ""


def prepare(args: argparse.Namespace) -> None:
    """Read the campaign's resolved config with the overrides before anything heavy is imported.

    Raises:
        ConfigError: ``DIR`` holds no campaign, or an override is bad.
    """
    from autoprune.provenance import load_resolved

    args.campaign = load_resolved(args.dir, args.overrides)


def run(args: argparse.Namespace) -> int:
    """Select, fine-tune, save, reload-check and describe the candidate."""
    from autoprune.campaign import build_campaign
    from autoprune.export import ExportCheckError, export_trial, select_trial
    from autoprune.names import check_names
    from autoprune.provenance import check_identity, command_line, open_store

    if getattr(args, "campaign", None) is None:
        prepare(args)
    cfg = args.campaign
    check_names(cfg, searchers=[("--searcher", args.searcher)] if args.searcher else [])
    check_identity(cfg)
    store = open_store(cfg)
    trial = select_trial(store.to_dataframe(), args.trial,
                         searcher=args.searcher or (None if args.trial == "best" else cfg.searcher.name),
                         seed=args.seed if args.seed is not None or args.trial == "best" else cfg.seed)
    camp = build_campaign(cfg, measure_dense=False)
    formats = None if args.formats is None else [f for f in args.formats.split(",") if f and f != "none"]
    try:
        res = export_trial(camp, trial, out_dir=args.out, finetune_method=args.finetune, epochs=args.epochs,
                           formats=formats, measure_latency=False if args.no_latency else None,
                           command=command_line(_argv(args)), search_command=_search_command(cfg.out_dir))
    except ExportCheckError as exc:
        print(f"export check FAILED: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    m = res.metrics
    o, e = m["original"], m["exported"]
    print(f"exported {trial.label}: test accuracy {e['test_accuracy']:.4f} (original {o['test_accuracy']:.4f}), "
          f"MACs {e['macs']:,} ({e['macs'] / o['macs']:.1%}), params {e['params']:,} ({e['params'] / o['params']:.1%})")
    print(f"reload check passed: the saved model reproduces test accuracy {m['check']['reloaded_test_accuracy']:.4f}")
    print(f"model: {res.model_dir}")
    for fmt, path in res.deployment.items():
        print(f"deployment ({fmt}): {path}")
    if m.get("deployment_error"):
        print(f"warning: deployment export failed: {m['deployment_error']}", file=sys.stderr)
    print(f"model card: {res.card}")
    return 0
