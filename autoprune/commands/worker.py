"""``autoprune worker CONFIG [key=value ...]``: one more process on a running campaign's study.

Workers share the study of ``(searcher, seed)`` through the campaign's storage: a SQLite file on one machine,
a PostgreSQL URL (``storage=postgresql://user@host:5432/db``) across machines. Together they stop at exactly
``n_trials`` trials; the running trials of killed workers are marked interrupted and proposed again.
"""

from __future__ import annotations

import argparse
from typing import Any

from autoprune.commands.search import (
    add_campaign_args,
    campaign_argv,
    campaign_config,
    load_campaign_config,
    report_result,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoprune worker``."""
    p = subparsers.add_parser(
        "worker",
        help="add a worker process to a running campaign (same study, shared storage)",
        description=__doc__,
    )
    add_campaign_args(p)
    return p


def prepare(args: argparse.Namespace) -> None:
    """Validate the config before anything heavy is imported."""
    load_campaign_config(args)


def run(args: argparse.Namespace) -> int:
    """Join the campaign's study and search until it holds ``n_trials`` trials."""
    from autoprune.campaign import open_campaign, run_search

    cfg = campaign_config(args)
    camp, store = open_campaign(cfg, argv=campaign_argv("worker", args), role="worker")
    print(f"worker joined study {store.study_name(cfg.searcher.name, cfg.seed)} ({store!r})")
    result = run_search(camp, store, quiet=args.quiet)
    return report_result(result, camp)
