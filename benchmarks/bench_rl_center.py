"""Where an RL agent's action 0 lands (issue #19): AMC's map (``action_center: middle``) against the centred one
(``uniform``), DDPG on pretrained ResNet-20 / CIFAR-10 at 50 % MACs, beside the ``uniform`` baseline.

Each cell (``uniform-baseline``, ``ddpg-middle``, ``ddpg-uniform``) is one campaign in ``results/benchmarks/
rl_center_work/<cell>`` (resumable: the campaign resumes from its store) and is recorded in ``rl_center.json`` when it
ends; finished cells are skipped. Figures: validation accuracy (adaptive BN on 20 training batches of 64, 1,000
validation images) of every proposal; the mean of the warm-up episodes, of the agent's episodes, of its last 30,
and the best.

Usage::

    python -m benchmarks.bench_rl_center [--quick] [--warmup 30] [--trials 90]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from benchmarks._common import CIFAR10_DIR, REPO, RESULTS, WEIGHTS_DIR, result_path, write_json, write_result

CELLS = {"uniform-baseline": ["searcher.name=uniform", "n_trials=1"],
         "ddpg-middle": ["searcher.name=ddpg", "searcher.kwargs.action_center=middle"],
         "ddpg-uniform": ["searcher.name=ddpg", "searcher.kwargs.action_center=uniform"]}


def run_cell(name: str, warmup: int, trials: int, quick: bool) -> dict[str, Any]:
    """One campaign of the comparison; returns its proposals' accuracies and MACs fractions."""
    from autoprune import campaign
    from autoprune.config import load_config

    out = RESULTS / ("rl_center_work_quick" if quick else "rl_center_work") / name
    overrides = [f"output_dir={out}", f"dataset.data_dir={CIFAR10_DIR.parent}",
                 f"model.checkpoint={WEIGHTS_DIR / 'resnet20-12fca82f.th'}", "dataset.batch_size=64",
                 "evaluator.kwargs.batches=20", "dataset.val_size=1000", f"n_trials={trials}",
                 f"searcher.kwargs.warmup_episodes={warmup}", *CELLS[name]]
    if name == "uniform-baseline":
        overrides = [o for o in overrides if not o.startswith("searcher.kwargs")]
    cfg = load_config(REPO / "configs" / "resnet20_cifar10.yaml", overrides)
    camp, store = campaign.open_campaign(cfg, argv=["bench_rl_center", name])
    start = time.perf_counter()
    res = campaign.run_search(camp, store, quiet=True)
    dense = camp.problem.dense_cost.macs
    accs = [t.result.accuracy for t in res.trials if t.result is not None]
    return {"accs": accs, "macs": [t.cost.macs / dense for t in res.trials], "seconds": time.perf_counter() - start,
            "warmup": warmup, "trials": trials, "overrides": overrides}


def summary(rec: dict[str, Any]) -> dict[str, float]:
    a, w = rec["accs"], rec["warmup"]
    agent = a[w:] or a
    return {"best": max(a), "warmup_mean": sum(a[:w]) / max(1, len(a[:w])), "agent_mean": sum(agent) / len(agent),
            "last30_mean": sum(a[-30:]) / len(a[-30:])}


def main(argv: list[str] | None = None) -> int:
    """Run the missing cells and write ``rl_center.{md,json}``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4 warm-up + 4 agent episodes")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--trials", type=int, default=90)
    args = p.parse_args(argv)
    warmup, trials = (4, 8) if args.quick else (args.warmup, args.trials)
    path = result_path("rl_center", ".json")
    raw: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    for name in CELLS:
        if name not in raw["cells"]:
            raw["cells"][name] = run_cell(name, warmup, trials, args.quick)
            write_json("rl_center", raw)
    rows = ["| cell | proposals | warm-up mean | agent mean | last 30 mean | best |", "|---|---|---|---|---|---|"]
    for name, rec in raw["cells"].items():
        s = summary(rec)
        rows.append(f"| {name} | {len(rec['accs'])} | {100 * s['warmup_mean']:.1f} | {100 * s['agent_mean']:.1f} | "
                    f"{100 * s['last30_mean']:.1f} | {100 * s['best']:.1f} |")
    write_result("rl_center", "RL action map: AMC's middle vs the centred (uniform) one",
                 "Validation accuracy (%) of the proposals, adaptive BN (20 batches of 64), 1,000 validation "
                 "images (optimistic: the checkpoint trained on them; for ranking only).\n\n" + "\n".join(rows)
                 + (f"\n\n{raw['note']}" if raw.get("note") else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
