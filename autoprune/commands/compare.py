"""``autoprune compare CONFIG --agents a,b,c --seeds N``: several searchers on the identical problem.

Every agent runs for every seed (``seed``, ``seed + 1``, ...) with the campaign's budget, evaluator and
``n_trials``; the uniform baseline runs too. The leaderboard (best reward, best validation accuracy within the
budget, candidates and time to reach the baseline's accuracy; mean ± std over seeds) is printed and saved as
``leaderboard.csv`` and ``leaderboard.md`` in the campaign directory. Re-running resumes unfinished runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from autoprune.commands.search import (
    EXIT_INTERRUPTED,
    add_campaign_args,
    campaign_argv,
    campaign_config,
    load_campaign_config,
)

if TYPE_CHECKING:
    from autoprune.agents.base import SearchResult


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``autoprune compare``."""
    p = subparsers.add_parser("compare", help="compare searchers × seeds on one campaign (leaderboard)",
                              description=__doc__)
    add_campaign_args(p)
    p.add_argument("--agents", required=True, help="comma-separated searcher names, e.g. tpe,random,ddpg")
    p.add_argument("--seeds", type=int, default=1, help="seeds per agent (default: %(default)s)")
    p.add_argument("--reference", default="uniform", help="baseline searcher to reach (default: %(default)s)")
    return p


def agent_names(args: argparse.Namespace) -> list[str]:
    """The ``--agents`` list (names stripped, empty entries dropped).

    Raises:
        ConfigError: If it names no agent.
    """
    from autoprune.errors import ConfigError

    agents = [a.strip() for a in args.agents.split(",") if a.strip()]
    if not agents:
        raise ConfigError(f"--agents {args.agents!r} names no searcher", hint="e.g. --agents tpe,random,ddpg")
    return agents


def prepare(args: argparse.Namespace) -> None:
    """Check the options and the config before anything heavy is imported.

    Raises:
        ConfigError: ``--seeds`` below 1, an empty ``--agents``, or a bad config.
    """
    from autoprune.errors import ConfigError

    if args.seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {args.seeds}", hint="--seeds N runs every agent with N seeds")
    agent_names(args)
    load_campaign_config(args)


def run(args: argparse.Namespace) -> int:
    """Run every agent × seed, then print and save the leaderboard."""
    import sys

    from autoprune.campaign import compare, open_campaign, summarize, val_label
    from autoprune.report import leaderboard_markdown, write_leaderboard

    if getattr(args, "campaign", None) is None:
        prepare(args)
    agents = agent_names(args)
    cfg = campaign_config(args)
    argv = campaign_argv("compare", args, "--agents", ",".join(agents), "--seeds", str(args.seeds))
    searchers = [*(("--agents", a) for a in agents), ("--reference", args.reference)]
    camp, store = open_campaign(cfg, argv=argv, role="compare", searchers=searchers)
    dense = camp.problem.dense_cost.macs
    label = val_label(cfg)

    def on_result(result: SearchResult) -> None:
        print(summarize(result, dense, val_label=label), flush=True)

    board = compare(camp, store, agents, list(range(cfg.seed, cfg.seed + args.seeds)), quiet=args.quiet,
                    reference=args.reference, on_result=on_result)
    csv, md = write_leaderboard(board, cfg.out_dir)
    print()
    print(leaderboard_markdown(board))
    print(f"leaderboard: {md} and {csv}")
    if board.attrs.get("interrupted"):
        print("interrupted: finished trials are stored; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
