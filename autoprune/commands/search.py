"""``autoprune search CONFIG [key=value ...]``: run or resume one searcher on a campaign.

Also holds the helpers the campaign commands share (the ``CONFIG`` and ``key=value`` arguments, exit codes).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autoprune.agents.base import SearchResult
    from autoprune.campaign import Campaign
    from autoprune.config import CampaignConfig

EXIT_INTERRUPTED = 130

OVERRIDES_HELP = ("config overrides such as n_trials=50 searcher.name=tpe objective.budget.macs=0.5 "
                  "storage=postgresql://user@host/db (values are YAML scalars)")


def add_campaign_args(p: argparse.ArgumentParser) -> None:
    """The ``CONFIG`` file and ``key=value`` overrides."""
    p.add_argument("config", metavar="CONFIG", help="campaign YAML file (see configs/)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", default=[], help=OVERRIDES_HELP)


def load_campaign_config(args: argparse.Namespace) -> None:
    """Read and validate ``CONFIG`` with its overrides into ``args.campaign`` (before torch is imported).

    Raises:
        ConfigError: A missing or malformed file, or a bad key or value (with the key path and a hint).
    """
    from autoprune.config import load_config

    args.campaign = load_config(args.config, args.overrides)


def campaign_config(args: argparse.Namespace) -> CampaignConfig:
    """The config read by :func:`load_campaign_config` (read now if ``prepare`` did not run)."""
    if getattr(args, "campaign", None) is None:
        load_campaign_config(args)
    return args.campaign


def campaign_argv(command: str, args: argparse.Namespace, *extra: str) -> list[str]:
    """The command line of a campaign command, rebuilt from its parsed arguments (for ``command.txt``)."""
    return [command, args.config, *args.overrides, *extra]


def report_result(result: SearchResult, camp: Campaign) -> int:
    """Print the summary of a search run; return its exit code (130 when it was interrupted)."""
    from autoprune.campaign import latency_summary, summarize, val_label

    print(summarize(result, camp.problem.dense_cost.macs, val_label=val_label(camp.config)))
    if result.best is not None and result.best.result is not None and camp.latency is not None:
        print(latency_summary(camp, result.best))
    if result.stop_reason == "interrupted":
        print("interrupted: finished trials are stored; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoprune search``."""
    p = subparsers.add_parser(
        "search",
        help="run (or resume) a search campaign from a YAML file",
        description="Search compressed candidates of the campaign's model with the configured searcher. Trials "
        "go to results/<name>/trials.db (or the `storage` URL); the resolved config, the command, package "
        "versions and the git commit are written beside them. Running the same command again resumes; Ctrl-C "
        "stops cleanly (exit 130). Add processes with `autoprune worker CONFIG`.",
    )
    add_campaign_args(p)
    return p


def prepare(args: argparse.Namespace) -> None:
    """Validate the config before anything heavy is imported."""
    load_campaign_config(args)


def run(args: argparse.Namespace) -> int:
    """Open the campaign, search, print the best candidate."""
    from autoprune.campaign import open_campaign, run_search

    cfg = campaign_config(args)
    camp, store = open_campaign(cfg, argv=campaign_argv("search", args), role="search")
    result = run_search(camp, store, quiet=args.quiet)
    code = report_result(result, camp)
    print(f"campaign directory: {cfg.out_dir}  (next: autoprune report {cfg.out_dir})")
    return code
