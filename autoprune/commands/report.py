"""``autoprune report DIR``: tables and figures of a campaign (Pareto front, best-so-far, per-layer widths)."""

from __future__ import annotations

import argparse
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
    return p


def prepare(args: argparse.Namespace) -> None:
    """Check that ``DIR`` holds a campaign before anything heavy is imported.

    Raises:
        ConfigError: ``DIR`` is missing or holds no ``config.resolved.yaml``.
    """
    from autoprune.provenance import load_resolved

    load_resolved(args.dir)


def run(args: argparse.Namespace) -> int:
    """Write the report and print where it is."""
    from autoprune.report import leaderboard_markdown, write_report

    res = write_report(args.dir, out_dir=args.out, reference=args.reference)
    if res.leaderboard is not None and not res.leaderboard.empty:
        print(leaderboard_markdown(res.leaderboard))
    print(f"report of {res.trials} trials in {res.out_dir}:")
    for name, path in {**res.figures, **res.tables}.items():
        print(f"  {name:<16} {path}")
    return 0
