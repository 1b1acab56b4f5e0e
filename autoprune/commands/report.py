"""``autoprune report DIR``: tables and figures of a campaign (Pareto front, best-so-far, per-layer widths)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoprune report``."""
    p = subparsers.add_parser(
        "report",
        help="tables and figures of a campaign directory",
        description="Write DIR/report/: trials.csv, summary.md, leaderboard.{csv,md}, pareto.csv and the figures "
        "pareto.png (accuracy vs MACs and size), best_so_far.png (per agent) and widths.png (per-layer widths "
        "and bits of the best candidates vs the original). Works while a search is still running.",
    )
    p.add_argument("dir", metavar="DIR", help="campaign directory, e.g. results/<campaign name>")
    p.add_argument("--out", default=None, help="output directory (default: DIR/report)")
    p.add_argument("--reference", default="uniform", help="baseline searcher of the leaderboard")
    p.add_argument("--salvage", action="store_true",
                   help="when the SQLite trial store is damaged, report the trials that can still be read: they are "
                   "copied into a temporary store and read from there; the damaged file is only read, never changed")
    return p


def prepare(args: argparse.Namespace) -> None:
    """Check that ``DIR`` holds a campaign before anything heavy is imported.

    Raises:
        ConfigError: ``DIR`` is missing or holds no ``config.resolved.yaml``.
    """
    from autoprune.provenance import load_resolved

    args.campaign = load_resolved(args.dir)


def _salvage_command(args: argparse.Namespace) -> str:
    out = ["autoprune", "report", args.dir]
    if args.out is not None:
        out += ["--out", args.out]
    if args.reference != "uniform":
        out += ["--reference", args.reference]
    return shlex.join([*out, "--salvage"])


def run(args: argparse.Namespace) -> int:
    """Write the report and print where it is (with ``--salvage``, from the readable trials of a damaged store)."""
    from autoprune.provenance import load_resolved, open_store, storage_location
    from autoprune.report import leaderboard_markdown, write_report
    from autoprune.salvage import load_trials

    cfg = getattr(args, "campaign", None) or load_resolved(args.dir)
    salvage = bool(getattr(args, "salvage", False))
    df, salvaged = load_trials(lambda: open_store(cfg), storage_location(cfg), campaign=cfg.name, salvage=salvage,
                               command=_salvage_command(args))
    if salvaged is not None:
        print(f"warning: {salvaged.summary}", file=sys.stderr)
        for note in salvaged.notes:
            print(f"warning: {note}", file=sys.stderr)
        print(f"salvaged {salvaged.recovered} trials (read-only copy of {salvaged.source}):")
        for line in salvaged.trial_lines():
            print(f"  {line}")
    elif salvage:
        print("note: the trial store is intact; --salvage was not needed", file=sys.stderr)
    res = write_report(args.dir, df=df, out_dir=args.out, reference=args.reference)
    if res.leaderboard is not None and not res.leaderboard.empty:
        print(leaderboard_markdown(res.leaderboard))
    print(f"report of {res.trials} trials in {res.out_dir}:")
    for name, path in {**res.figures, **res.tables}.items():
        print(f"  {name:<16} {path}")
    return 0
