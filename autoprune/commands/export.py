"""``autoprune export DIR [--trial best|N]``: fine-tune a campaign's candidate and save it standalone.

Writes DIR/export/<searcher>-seed<S>-trial<N>/ with ``model/`` (architecture as data + weights, loadable
without the model code), optional deployment artifacts, ``MODEL_CARD.md`` and ``export.json``. The saved
model is reloaded and re-evaluated on the test split; if it does not reproduce the accuracy the command fails
(exit 1).
"""

from __future__ import annotations

import argparse
import errno
import shlex
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autoprune.export import ExportResult
    from autoprune.salvage import Salvage

EXIT_CHECK_FAILED = 1
#: ``errno`` values of a failed write that are the user's to fix (space, permissions, a read-only or bad path).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOTDIR,
                 errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOENT}


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
    p.add_argument("--salvage", action="store_true",
                   help="when the SQLite trial store is damaged, choose among the trials that can still be read: they "
                   "are copied into a temporary store and read from there; the damaged file is only read, never "
                   "changed. The model card records that the trial came from a salvaged store")
    return p


def _argv(args: argparse.Namespace) -> list[str]:
    out = ["export", args.dir, *args.overrides, "--trial", args.trial]
    for flag, value in (("--searcher", args.searcher), ("--seed", args.seed), ("--finetune", args.finetune),
                        ("--epochs", args.epochs), ("--formats", args.formats), ("--out", args.out)):
        if value is not None:
            out += [flag, str(value)]
    out += ["--no-latency"] if args.no_latency else []
    return out + (["--salvage"] if getattr(args, "salvage", False) else [])


def _note_salvage(res: ExportResult, salvaged: Salvage) -> None:
    """Record in ``export.json`` and the model card that the trial was chosen from a salvaged store."""
    import json

    from autoprune.utils import atomic_write

    res.metrics["salvaged_store"] = {"store": str(salvaged.source), "damage": salvaged.damage,
                                     "recovered_trials": salvaged.recovered, "lost_trials": salvaged.lost,
                                     "notes": list(salvaged.notes)}
    atomic_write(res.out_dir / "export.json", json.dumps(res.metrics, indent=2, default=str) + "\n")
    card = res.card.read_text(encoding="utf-8").rstrip("\n")
    atomic_write(res.card, f"{card}\n\n## Trial store\n\nThis trial was chosen from a salvaged, read-only copy of the "
                           f"damaged trial store `{salvaged.source}` ({salvaged.damage}): {salvaged.recovered} trials "
                           f"were recovered, {salvaged.lost} lost. The damaged file was not changed.\n")


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
    from autoprune.provenance import check_identity, command_line, open_store, storage_location
    from autoprune.salvage import load_trials

    if getattr(args, "campaign", None) is None:
        prepare(args)
    cfg = args.campaign
    check_names(cfg, searchers=[("--searcher", args.searcher)] if args.searcher else [])
    check_identity(cfg)
    salvage = bool(getattr(args, "salvage", False))
    retry = shlex.join(["autoprune", *_argv(args), *([] if salvage else ["--salvage"])])
    df, salvaged = load_trials(lambda: open_store(cfg), storage_location(cfg), campaign=cfg.name, salvage=salvage,
                               command=retry)
    if salvaged is not None:
        print(f"warning: {salvaged.summary}", file=sys.stderr)
        for note in salvaged.notes:
            print(f"warning: {note}", file=sys.stderr)
    elif salvage:
        print("note: the trial store is intact; --salvage was not needed", file=sys.stderr)
    trial = select_trial(df, args.trial,
                         searcher=args.searcher or (None if args.trial == "best" else cfg.searcher.name),
                         seed=args.seed if args.seed is not None or args.trial == "best" else cfg.seed)
    camp = build_campaign(cfg, measure_dense=False)
    formats = None if args.formats is None else [f for f in args.formats.split(",") if f and f != "none"]
    try:
        res = export_trial(camp, trial, out_dir=args.out, finetune_method=args.finetune, epochs=args.epochs,
                           formats=formats, measure_latency=False if args.no_latency else None,
                           command=command_line(_argv(args)), search_command=_search_command(cfg.out_dir))
        if salvaged is not None:
            _note_salvage(res, salvaged)
    except ExportCheckError as exc:
        print(f"export check FAILED: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except OSError as exc:  # a full disk or an unwritable --out (the fine-tune is lost, the inputs are untouched)
        if exc.errno not in _WRITE_ERRNOS:
            raise
        from autoprune.errors import AutoPruneError

        raise AutoPruneError(
            f"writing the export failed ({exc.strerror or exc}): {exc.filename or args.out or cfg.out_dir}",
            hint="free disk space or choose a writable --out, then run the same command again (a model whose "
            "files were not completely written is refused when loaded)") from exc
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
