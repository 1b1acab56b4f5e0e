"""Benchmark: search quality — every searcher, the same candidate budget and the same final fine-tune.

Grid: models (pretrained akamaster ResNet-20 and ResNet-56 on CIFAR-10) × MACs targets (50 % and 30 % of the
dense closed-form MACs) × searchers (every name in :data:`autoprune.agents.SEARCHERS`, or a subset) × seeds.
One grid point is a *cell*. In every cell the searcher gets the same problem (``cifar_resnet`` search space,
min keep ratio 0.2, L1 channel selection), the same evaluator (adaptive BN on fixed training batches, top-1
on the selection split) and the same candidate budget; the best feasible candidate is then built, its BN
statistics re-estimated and fine-tuned with the same schedule, and its test accuracy reported with its MACs,
parameters and fp32 size. ``dmcp`` and ``resrep`` train a network instead of proposing candidates: they get
their own training schedule (the ``cpu`` preset of their hyper-parameter files), emit one architecture with
its own weights, and are then fine-tuned exactly like the others; their extra training samples are reported.

Protocol (splits). The akamaster checkpoints were trained on all 50,000 CIFAR-10 training images, so a
validation split carved from the training set is memorised (≈ 96 % accuracy) and cannot rank candidates.
The 10,000 test images are therefore split once into two disjoint, stratified halves (seed 0):

* **half A — selection**: scores every candidate (a subset of ``val_images``), is the differentiable
  searchers' validation set, and picks each cell's finalist;
* **half B — report**: used only for the accuracies reported after the fine-tune (and the dense reference);
  nothing is ever selected on it.

BN calibration, search-time training and fine-tuning use training images only.

Published results (``benchmarks/published.py``, ALGORITHMS.md §7) are printed beside each model's table
with their (much longer) training budgets and caveats: absolute numbers are not comparable with a CPU-sized
fine-tune; the ranking of searchers within one table is what this benchmark measures.

Run as ``python -m benchmarks.bench_search_quality [--quick] [--resume] [--max-minutes M] [--searchers a,b]
[--models resnet20] [--targets 0.5]``. The raw results (``results/benchmarks/search_quality.json``,
``search_quality_quick.json`` with ``--quick``) are rewritten after every finished cell, and the table
(``search_quality.md``) is rebuilt from them; ``--resume`` skips finished cells and continues an interrupted
search from its trial store (``results/benchmarks/search_quality_work/``, not versioned). ``--max-minutes``
stops starting new cells after that many minutes, so a long run can be split into short parts on a shared
machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from autoprune.utils import configure_threads, seed_everything
from benchmarks import _cifar, published
from benchmarks._cells import cell_key, from_file, to_file
from benchmarks._cifar import CHECKPOINTS, SPLIT_SEED
from benchmarks._common import RESULTS, write_result

#: Searchers that train a network (one architecture with its own weights) instead of proposing candidates.
TRAINING = ("dmcp", "resrep")
QUICK_SEARCHERS = ("uniform", "tpe")
WORKDIR = RESULTS / "search_quality_work"
#: Forward+backward passes per training iteration of a differentiable searcher (DMCP's sandwich rule: 4).
PASSES_PER_ITER = {"dmcp": 4, "resrep": 1}


@dataclass(frozen=True)
class Sizes:
    """Everything that defines (and scales) a run; a resumed run must use the same sizes."""

    models: tuple[str, ...]
    targets: tuple[float, ...]
    candidates: int
    seeds: int
    calib_batches: int
    calib_batch: int
    val_images: int
    test_images: int
    ft_steps: int
    ft_batch: int
    ft_lr: float


FULL = Sizes(models=("resnet20", "resnet56"), targets=(0.5, 0.3), candidates=32, seeds=1, calib_batches=10,
             calib_batch=128, val_images=2000, test_images=5000, ft_steps=391, ft_batch=128, ft_lr=0.01)
QUICK = Sizes(models=("resnet20",), targets=(0.5,), candidates=3, seeds=1, calib_batches=2, calib_batch=64,
              val_images=256, test_images=500, ft_steps=5, ft_batch=32, ft_lr=0.01)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def searcher_options(name: str, sizes: Sizes, n_groups: int) -> dict[str, Any]:
    """Per-searcher settings that make the candidate budget fit (everything else: the defaults)."""
    if name == "sensitivity":  # dense + groups × ratios + the allocation must fit in k
        n = max(1, min(3, (sizes.candidates - 2) // max(1, n_groups)))
        return {"ratios": (0.5, 0.3, 0.7)[:n]}
    return _cifar.searcher_options(name, sizes.candidates, n_groups)


def default_searchers() -> list[str]:
    """Every registered searcher whose optional dependencies are installed."""
    from autoprune._imports import is_available
    from autoprune.agents.base import SEARCHERS, load_builtin_searchers

    load_builtin_searchers()
    return [n for n in SEARCHERS.names() if not (n == "cmaes" and not is_available("cmaes"))]


# ------------------------------------------------------------------------------------------------ set-up


def setup(model_name: str, sizes: Sizes, splits: Any, seed: int = 0) -> dict[str, Any]:
    """Model, groups, search space and loaders of one model (see :func:`benchmarks._cifar.context`)."""
    return _cifar.context(model_name, splits, calib_batches=sizes.calib_batches, calib_batch=sizes.calib_batch,
                          select_images=sizes.val_images, report_images=sizes.test_images, seed=seed)


# ------------------------------------------------------------------------------------------------ one cell


def campaign_name(model_name: str, target: float) -> str:
    """The trial-store campaign of one (model, target) block."""
    return f"sq-{model_name}-{round(100 * target)}"


def run_cell(ctx: Mapping[str, Any], sizes: Sizes, target: float, name: str, seed: int, store_dir: Path, *,
             options: Mapping[str, Any] | None = None, make_problem: Callable[[Mapping[str, Any]], Any] | None = None,
             callbacks: Sequence[Callable[..., None]] = ()) -> dict[str, Any]:
    """Search, pick the best feasible candidate on half A, fine-tune it, report it on half B.

    ``options`` replace :func:`searcher_options` (the searcher's settings), ``make_problem`` replaces
    :func:`benchmarks._cifar.make_problem` (another evaluator), ``callbacks`` go to the searcher
    (``callback(searcher, record)`` after every trial; :meth:`Searcher.stop` ends the search early).
    """
    from autoprune import serialize
    from autoprune.agents.base import make_searcher
    from autoprune.store import TrialStore

    problem = (make_problem or _cifar.make_problem)(ctx)
    store = TrialStore(store_dir / "trials.db", campaign=campaign_name(ctx["name"], target))
    opts = dict(options) if options is not None else searcher_options(name, sizes, len(ctx["space"].groups))
    if name in TRAINING:
        opts = {**opts, "train_loader": _cifar.train_loader(ctx, sizes.ft_batch, seed + 7), "val_loader": ctx["select"],
                "device": "cpu"}
    seed_everything(seed)
    t0 = time.perf_counter()
    searcher = make_searcher(name, problem, store=store, budget={"macs": target}, n_trials=sizes.candidates,
                             seed=seed, **({"callbacks": list(callbacks)} if callbacks else {}), **opts)
    res = searcher.run()
    wall = time.perf_counter() - t0
    dense = problem.dense_cost
    limit = target * dense.macs
    ok = [t for t in res.trials if t.state == "complete" and t.result is not None and t.cost.macs <= limit]
    record: dict[str, Any] = {
        "model": ctx["name"], "target": target, "searcher": name, "seed": seed, "stop_reason": res.stop_reason,
        "trials": len(res.trials), "candidates": len(ok), "options": {k: v for k, v in opts.items()
                                                                      if k not in ("train_loader", "val_loader")},
        "search_seconds": float(store.to_dataframe(searcher=name, seed=seed)["seconds"].fillna(0.0).sum()),
        "search_wall_this_run": wall,
    }
    if name in TRAINING:
        outcome = getattr(searcher, "outcome", None)
        record["search_train_samples"] = None if outcome is None else int(outcome.samples)
    else:  # forward-only calibration samples of the evaluated candidates
        record["search_train_samples"] = len(ok) * sizes.calib_batches * sizes.calib_batch
    if not ok:
        record["error"] = "no feasible evaluated candidate"
        return record
    best = max(ok, key=lambda t: (t.result.accuracy, -t.number))
    cost = problem.cost(best.candidate)
    if name in TRAINING:
        module = serialize.load_module(store.artifact_dir(name, seed) / "model")
    else:
        module = problem.build(best.candidate)
    record.update({
        "val_best": float(best.result.accuracy), "best_trial": best.number,
        "macs": cost.macs, "macs_ratio": cost.macs / dense.macs, "params": cost.params,
        "params_built": int(sum(p.numel() for p in module.parameters())), "bytes": cost.bytes,
        "widths": dict(best.candidate.widths),
    })
    record.update(_cifar.finetune_and_report(ctx, module, steps=sizes.ft_steps, batch=sizes.ft_batch, lr=sizes.ft_lr,
                                             seed=1234 + seed))
    return record


# ------------------------------------------------------------------------------------------------ the grid


#: The grid's axes: a resumed (or concurrent) run may cover other models, targets and seeds than the first one.
AXES = ("models", "targets", "seeds")


def cell_settings(sizes: Mapping[str, Any]) -> dict[str, Any]:
    """The settings every cell of one results file must share (everything but the grid's axes)."""
    return {k: v for k, v in json.loads(json.dumps(dict(sizes))).items() if k not in AXES}


def _union(*seqs: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(x for seq in seqs for x in seq))


def load_results(path: Path, sizes: Sizes, resume: bool) -> dict[str, Any]:
    """Existing results to continue (``resume``), or a fresh record; refuses to clobber a full run silently.

    A resumed run may name other models, targets or seeds (the grid grows; ``sizes`` records the union), but
    the per-cell settings (candidates, evaluator and fine-tune sizes) must be the same.
    """
    from autoprune.errors import ConfigError

    fresh: dict[str, Any] = {"sizes": asdict(sizes), "dense": {}, "cells": {}, "created": time.time(),
                             "runs": []}
    if not path.exists():
        return fresh
    old = from_file(json.loads(path.read_text()))
    if not resume:
        if old.get("cells") and not old.get("quick"):
            raise ConfigError(f"{path} already holds {len(old['cells'])} finished cells",
                              hint="pass --resume to continue that run, or --fresh to discard it")
        return fresh
    if cell_settings(old.get("sizes", {})) != cell_settings(asdict(sizes)):
        raise ConfigError(f"the per-cell settings of {path} differ from this run's; a resumed run must use the same "
                          "candidates, evaluator and fine-tune sizes",
                          hint="rerun with the same options, or --fresh to start over")
    old["sizes"] = merged_sizes(old["sizes"], asdict(sizes))
    return old


def merged_sizes(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """``a`` with the grid axes widened to cover ``b``'s."""
    return {**json.loads(json.dumps(dict(a))), "models": _union(a.get("models", ()), b.get("models", ())),
            "targets": _union(a.get("targets", ()), b.get("targets", ())),
            "seeds": max(int(a.get("seeds", 1)), int(b.get("seeds", 1)))}


def merge_results(disk: Mapping[str, Any], mine: Mapping[str, Any]) -> dict[str, Any]:
    """Combine the results file as another process left it (``disk``) with this process's (``mine``).

    Cells, dense references, searchers and runs are unions (a cell finished by both keeps ``mine``; of two
    copies of one run, the further one: another process's copy of a run goes stale as that run goes on); used
    when several processes (``--models resnet56`` beside ``--models resnet20``) share one results file. A file
    with other per-cell settings (or a quick run's) is replaced, as a fresh run replaces it.
    """
    if not disk or disk.get("quick") or cell_settings(disk.get("sizes", {})) != cell_settings(mine["sizes"]):
        return dict(mine)
    runs: dict[float, dict[str, Any]] = {}
    for r in [*disk.get("runs", []), *mine.get("runs", [])]:
        old = runs.get(r["started"])
        if old is None or (r["cells"], r["seconds"]) >= (old["cells"], old["seconds"]):
            runs[r["started"]] = r
    superseded = merge_entries(disk.get("superseded", {}), mine.get("superseded", {}))
    cells = {**drop_superseded(disk.get("cells", {}), superseded), **drop_superseded(mine.get("cells", {}), superseded)}
    return {**disk, **mine, "sizes": merged_sizes(disk["sizes"], mine["sizes"]),
            "cells": cells, "superseded": superseded,
            "rebuilt": merge_entries(disk.get("rebuilt", {}), mine.get("rebuilt", {})),
            "dense": {**disk.get("dense", {}), **mine.get("dense", {})},
            "searchers": _union(disk.get("searchers", []), mine.get("searchers", [])),
            "runs": sorted(runs.values(), key=lambda r: r["started"])}


def _entries(value: Any) -> list[dict[str, Any]]:
    """Superseded entries of one cell (``{"record", "at", "command"}``); an older file kept a bare record."""
    if isinstance(value, Mapping):
        return [{"record": dict(value), "at": None, "command": None}]
    return [dict(e) for e in value]


def merge_entries(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Union of two cell key → entries maps (``superseded``, ``rebuilt``), each entry once."""
    out: dict[str, list[dict[str, Any]]] = {}
    for src in (a, b):
        for key, value in src.items():
            for entry in _entries(value):
                if entry not in out.setdefault(key, []):
                    out[key].append(entry)
    return out


def drop_superseded(cells: Mapping[str, Any], superseded: Mapping[str, Sequence[Mapping[str, Any]]]
                    ) -> dict[str, Any]:
    """``cells`` without the records that were superseded (a process started before the rerun still holds them)."""
    return {k: v for k, v in cells.items() if all(e["record"] != v for e in superseded.get(k, ()))}


def supersede(raw: dict[str, Any], keys: Sequence[str], command: str) -> list[str]:
    """Move the finished cells ``keys`` to ``raw["superseded"]`` (so they run again); returns the keys moved."""
    moved = [k for k in keys if k in raw["cells"]]
    sup = merge_entries(raw.get("superseded", {}), {})
    for k in moved:
        sup.setdefault(k, []).append({"record": raw["cells"].pop(k), "at": time.time(), "command": command})
    raw["superseded"] = sup
    return moved


def rebuild(raw: dict[str, Any], keys: Sequence[str], sizes: Sizes,
            on_update: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Widths vs weights: fine-tune each named cell's widths cut from the *dense* weights (the protocol's L1
    selection, exactly as the candidate searchers' finalists are built), beside the searcher's own network.

    ``keys`` are cell keys; a key found only under ``superseded`` uses its latest superseded record. Results
    go to ``raw["rebuilt"][key]`` (one entry per rebuilt record, with its own after-FT accuracy for reference).
    """
    from autoprune.errors import ConfigError
    from autoprune.types import Candidate

    records = {}
    for key in keys:
        sup = merge_entries(raw.get("superseded", {}), {}).get(key, [])
        rec = raw["cells"].get(key) or (sup[-1]["record"] if sup else None)
        if rec is None or "widths" not in rec:
            raise ConfigError(f"--rebuild: no finished cell {key!r} with widths in the results",
                              hint="use a key of search_quality.json's cells or superseded, e.g. resnet20|0.5|dmcp|0")
        records[key] = rec
    splits = _cifar.load_cifar10()
    for key, rec in records.items():
        ctx = setup(rec["model"], sizes, splits)
        problem = _cifar.make_problem(ctx)
        module = problem.build(Candidate(widths=rec["widths"]))
        out = _cifar.finetune_and_report(ctx, module, steps=sizes.ft_steps, batch=sizes.ft_batch, lr=sizes.ft_lr,
                                         seed=1234 + int(rec["seed"]))
        entry = {"record": {"widths": rec["widths"], "own_test_after_ft": rec.get("test_after_ft"),
                            "superseded": key not in raw["cells"]}, "at": time.time(), **out}
        raw.setdefault("rebuilt", {}).setdefault(key, []).append(entry)
        _log(f"{key}: widths cut from the dense weights {out['test_after_ft']:.4f} after FT "
             f"(searcher's own network {rec.get('test_after_ft', float('nan')):.4f})")
        raw = on_update(raw)
    return raw


def rebuilt_block(raw: Mapping[str, Any]) -> list[str]:
    """The widths-vs-weights table (``--rebuild``)."""
    rows = [(k, e) for k, v in raw.get("rebuilt", {}).items() for e in v]
    if not rows:
        return []
    lines = ["", "## Widths vs weights", "",
             "A training searcher emits widths *and* weights. Rows: the cell's widths cut from the dense weights by "
             "L1 (as every candidate searcher's finalist is built), given the same fine-tune, beside the network the "
             "searcher emitted (`--rebuild KEY`).", "",
             "| cell | emitted network, test after FT % | same widths, dense weights: before FT % | after FT % |",
             "|---|---:|---:|---:|"]
    for key, e in rows:
        rec = e["record"]
        label = f"{key} (superseded record)" if rec.get("superseded") else key
        lines.append(f"| {label} | {_pct(rec.get('own_test_after_ft'))} | {_pct(e.get('test_before_ft'))} | "
                     f"**{_pct(e.get('test_after_ft'))}** |")
    return lines


def write_merged(path: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``raw`` into the results file under an exclusive lock, write it atomically, return the merge."""
    import fcntl
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".json.lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        try:
            disk = from_file(json.loads(path.read_text())) if path.exists() else {}
        except ValueError:
            disk = {}
        merged = dict(raw) if raw.get("quick") else merge_results(disk, raw)
        tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(to_file(merged), indent=1, default=str))
        tmp.replace(path)
    return merged


def full_grid(raw: Mapping[str, Any]) -> list[tuple[str, float, str, int]]:
    """The cells the status line counts: the full form's models and targets (a quick run: its own) × searchers."""
    s = raw["sizes"]
    if raw.get("quick"):
        models, targets, names = s["models"], s["targets"], raw["searchers"]
    else:
        models, targets = _union(FULL.models, s["models"]), _union(FULL.targets, s["targets"])
        names = _union(default_searchers(), raw.get("searchers", []))
    return [(m, float(t), n, sd) for m in models for t in targets for n in names for sd in range(int(s["seeds"]))]


def grid(sizes: Sizes, names: Sequence[str]) -> list[tuple[str, float, str, int]]:
    """Every cell, cheapest model first."""
    return [(m, t, n, s) for m in sizes.models for t in sizes.targets for n in names for s in range(sizes.seeds)]


def run(sizes: Sizes, names: Sequence[str], out_json: Path, store_dir: Path, *, resume: bool, quick: bool,
        max_minutes: float | None, on_update: Callable[[dict[str, Any]], dict[str, Any]],
        rerun: Sequence[str] = (), command: str = "",
        cells: Sequence[tuple[str, float, str, int]] | None = None,
        cell_runner: Callable[..., dict[str, Any]] | None = None,
        forget: Callable[[str, float, str, int], None] | None = None) -> dict[str, Any]:
    """Run (or continue) the grid.

    ``on_update`` receives the results after every finished cell and returns them merged with what other
    processes wrote meanwhile (cells they finished are skipped here). Finished cells of the searchers in
    ``rerun`` (within this run's models, targets and seeds) are first moved to ``superseded`` — kept in the
    file with the time and ``command`` — and their trial studies deleted, so they run again (after a change to
    a searcher's defaults).

    ``cells`` replaces the grid (``(model, target, searcher, seed)`` tuples, run in that order; ``rerun`` then
    picks among them), ``cell_runner`` replaces :func:`run_cell` (same arguments) and ``forget`` replaces the
    deletion of a rerun cell's trials (same tuple); another benchmark builds on the loop that way.
    """
    from autoprune.evaluate import validate
    from autoprune.store import TrialStore

    t0 = time.perf_counter()
    raw = load_results(out_json, sizes, resume)
    raw["quick"] = quick
    raw["searchers"] = list(dict.fromkeys([*raw.get("searchers", []), *names]))
    run_info = {"started": time.time(), "cells": 0, "seconds": 0.0}
    raw.setdefault("runs", []).append(run_info)
    if rerun:
        again = [c for c in cells if c[2] in rerun] if cells is not None else grid(sizes, list(rerun))
        moved = supersede(raw, [cell_key(*c) for c in again], command)
        for model_name, target, name, seed in again:
            if forget is not None:
                forget(model_name, target, name, seed)
            else:
                TrialStore(store_dir / "trials.db", campaign=campaign_name(model_name, target)).delete(name, seed)
        _log(f"rerunning {len(again)} cell(s); superseded: {', '.join(moved) or 'none'}")
        raw = on_update(raw)
    splits = _cifar.load_cifar10()
    cells = list(cells) if cells is not None else grid(sizes, names)
    todo = [c for c in cells if cell_key(*c) not in raw["cells"]]
    _log(f"{len(cells) - len(todo)} of {len(cells)} cells already done")
    ctx: dict[str, Any] | None = None
    for model_name, target, name, seed in todo:
        if cell_key(model_name, target, name, seed) in raw["cells"]:
            continue  # finished by a concurrent process
        if max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes:
            _log(f"stopping after {max_minutes} min: continue with --resume")
            break
        if ctx is None or ctx["name"] != model_name:
            ctx = setup(model_name, sizes, splits)
            if model_name not in raw["dense"]:
                dense_cost = _cifar.make_problem(ctx).dense_cost
                raw["dense"][model_name] = {
                    "select": float(validate(ctx["model"], ctx["select"], device="cpu")[0]),
                    "report": float(validate(ctx["model"], ctx["report"], device="cpu")[0]),
                    "macs": dense_cost.macs, "params": dense_cost.params, "bytes": dense_cost.bytes}
        rec = (cell_runner or run_cell)(ctx, sizes, target, name, seed, store_dir)
        raw["cells"][cell_key(model_name, target, name, seed)] = rec
        run_info["cells"] += 1
        run_info["seconds"] = time.perf_counter() - t0
        _log(f"{cell_key(model_name, target, name, seed)}: val {rec.get('val_best', float('nan')):.4f}, "
             f"MACs {rec.get('macs_ratio', float('nan')):.3f}, test after FT "
             f"{rec.get('test_after_ft', float('nan')):.4f} ({rec['search_seconds']:.0f}s search, "
             f"{rec.get('ft_seconds', 0):.0f}s FT)")
        raw = on_update(raw)
    if quick and ctx is not None and "rates" not in raw:
        raw["rates"] = measure_rates(ctx, FULL)  # for the estimate of the full form's duration
    run_info["seconds"] = time.perf_counter() - t0
    return on_update(raw)


# ------------------------------------------------------------------------------------------------ estimate


def measure_rates(ctx: Mapping[str, Any], sizes: Sizes, repeats: int = 2) -> dict[str, float]:
    """Single-thread rates of the dense model at ``sizes``' batch sizes: forward s/sample, training s/step."""
    from autoprune.train import train_steps

    model = copy.deepcopy(ctx["model"]).eval()
    x = torch.rand(sizes.calib_batch, 3, 32, 32)
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x)
        forward = (time.perf_counter() - t0) / (repeats * sizes.calib_batch)
    batch = [(torch.rand(sizes.ft_batch, 3, 32, 32), torch.randint(0, 10, (sizes.ft_batch,)))]
    train_steps(model, batch, 1, lr=0.01)
    t0 = time.perf_counter()
    train_steps(model, batch, repeats, lr=0.01)
    return {"model": ctx["name"], "forward_per_sample": forward, "train_step": (time.perf_counter() - t0) / repeats,
            "calib_batch": sizes.calib_batch, "ft_batch": sizes.ft_batch}


def estimate_full(raw: Mapping[str, Any], full: Sizes = FULL, searchers: Sequence[str] | None = None,
                  overhead_per_candidate: float = 0.2) -> dict[str, Any] | None:
    """Duration of the full grid, extrapolated from the dense-model rates measured in ``raw["rates"]``.

    Returns ``{"hours": total, "cell_minutes": {model: mean minutes per cell}}`` (``None`` without rates).

    A candidate costs its calibration and selection forwards plus ``overhead_per_candidate`` seconds (build,
    repair, searcher logic); a finalist costs ``ft_steps`` training steps at the *dense* model's step time (an
    upper bound) plus two passes over half B; ``dmcp``/``resrep`` cost ``iters`` steps (DMCP: four sub-networks
    per step, priced as four dense steps). Other models scale with their dense MACs relative to the measured
    model (×3.1 for ResNet-56 when not measured).
    """
    from autoprune.agents.base import load_hyperparams

    rates = raw.get("rates")
    if not rates:
        return None
    fwd, step = rates["forward_per_sample"], rates["train_step"] * full.ft_batch / rates["ft_batch"]
    dense = raw.get("dense", {})
    base_macs = dense.get(rates["model"], {}).get("macs")
    names = list(searchers) if searchers is not None else default_searchers()
    per_candidate = fwd * (full.calib_batches * full.calib_batch + full.val_images) + overhead_per_candidate
    finetune = step * full.ft_steps + fwd * (2 * full.test_images + full.calib_batches * full.calib_batch)
    seconds, cell_minutes = 0.0, {}
    for model in full.models:
        macs = dense.get(model, {}).get("macs")
        scale = macs / base_macs if macs and base_macs else (1.0 if model == rates["model"] else 3.1)
        cells = []
        for name in names:
            if name in TRAINING:
                search = step * int(load_hyperparams(name).get("iters", 300)) * PASSES_PER_ITER[name]
            else:
                search = per_candidate * full.candidates
            cells.append(scale * (search + finetune))
        cell_minutes[model] = statistics.fmean(cells) / 60 if cells else 0.0
        seconds += sum(cells) * len(full.targets) * full.seeds
    return {"hours": seconds / 3600.0, "cell_minutes": cell_minutes}


# ------------------------------------------------------------------------------------------------ report


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _mean_std(xs: Sequence[float], signed: bool = False) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return _pct(xs[0], signed)
    return f"{_pct(statistics.fmean(xs), signed)} ± {100 * statistics.stdev(xs):.2f}"


def cell_table(raw: Mapping[str, Any], model: str, target: float) -> list[str]:
    """Rows of one (model, target): one per searcher, aggregated over seeds."""
    dense = raw["dense"].get(model, {})
    lines = ["| searcher | seeds | candidates evaluated | best val % (half A) | MACs kept | params | size (KiB, fp32) "
             "| test % before FT | **test % after FT** (half B) | Δ vs dense (points) | search s | FT s "
             "| search training samples |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in raw["searchers"]:
        recs = [c for c in raw["cells"].values() if c["model"] == model and c["target"] == target
                and c["searcher"] == name]
        if not recs:
            continue
        done = [r for r in recs if "test_after_ft" in r]
        if not done:
            lines.append(f"| {name} | {len(recs)} | {statistics.fmean(r['candidates'] for r in recs):.0f} | "
                         f"{recs[0].get('error', '—')} |" + " — |" * 9)
            continue
        after = [r["test_after_ft"] for r in done]
        delta = [a - dense["report"] for a in after] if dense else []
        samples = [r["search_train_samples"] for r in done if r.get("search_train_samples") is not None]
        mean = {k: statistics.fmean(r[k] for r in done)
                for k in ("candidates", "macs_ratio", "params", "bytes", "search_seconds", "ft_seconds")}
        lines.append(
            f"| {name} | {len(done)} | {mean['candidates']:.0f} | {_mean_std([r['val_best'] for r in done])} | "
            f"{mean['macs_ratio']:.3f} | {mean['params']:,.0f} | {mean['bytes'] / 1024:,.1f} | "
            f"{_mean_std([r['test_before_ft'] for r in done])} | **{_mean_std(after)}** | "
            f"{_mean_std(delta, signed=True)} | {mean['search_seconds']:.0f} | {mean['ft_seconds']:.0f} | "
            f"{f'{statistics.fmean(samples):,.0f}' if samples else '—'} |")
    return lines


def across_cells(raw: Mapping[str, Any]) -> list[str]:
    """Each searcher over every (model, target) block that has a ``uniform`` row: its test accuracy after the
    fine-tune minus uniform's, per block and on average, and its mean rank (1 = best) within the blocks.

    Only searchers finished in all those blocks are ranked (means over seeds); fewer than two blocks: nothing.
    """
    acc: dict[tuple[str, float], dict[str, float]] = {}
    by: dict[tuple[str, float, str], list[float]] = {}
    for c in raw["cells"].values():
        if "test_after_ft" in c:
            by.setdefault((c["model"], c["target"], c["searcher"]), []).append(100 * c["test_after_ft"])
    for (model, target, name), values in by.items():
        acc.setdefault((model, target), {})[name] = statistics.fmean(values)
    blocks = [b for b in acc if "uniform" in acc[b]]
    if len(blocks) < 2:
        return []
    names = [n for n in raw["searchers"] if all(n in acc[b] for b in blocks)]
    rows = []
    for name in names:
        deltas = [acc[b][name] - acc[b]["uniform"] for b in blocks]
        ranks = [1 + sum(v > acc[b][name] for v in acc[b].values()) for b in blocks]
        rows.append((statistics.fmean(deltas), name, deltas, statistics.fmean(ranks)))
    rows.sort(key=lambda r: (-r[0], r[3], r[1]))
    head = " | ".join(f"{m} {100 * t:.0f} %" for m, t in blocks)
    lines = ["", "## Across the grid", "",
             f"Test accuracy after the fine-tune minus `uniform`'s, in points, over the {len(blocks)} (model, target) "
             "blocks, and the mean rank within them (1 = best; ties share the better rank). One seed per cell: "
             "differences under ~0.5 points in one block are within seed noise, a consistent sign across the blocks "
             "is the signal.", "",
             f"| searcher | mean Δ vs uniform | worst Δ | mean rank | {head} |",
             "|---|---|---|---|" + "---|" * len(blocks)]
    for mean, name, deltas, rank in rows:
        lines.append(f"| {name} | **{mean:+.2f}** | {min(deltas):+.2f} | {rank:.1f} | "
                     + " | ".join(f"{d:+.2f}" for d in deltas) + " |")
    return lines


def published_block(model: str, target: float, ft_epochs: float) -> list[str]:
    """Published rows for ``model`` near ``target`` (within 15 points of FLOPs↓), with budgets and caveats."""
    setting = published.setting_of(model)
    if setting is None:
        return []
    rows = [r for r in published.rows_for(setting) if r.has_result and r.flops_reduction is not None
            and abs(r.flops_reduction - (1 - target)) <= 0.15]
    if not rows:
        return ["", f"Published results for {model} near {100 * (1 - target):.0f} % FLOPs↓: none "
                "(see `published.md`)."]
    return ["", f"Published results for {model} near {100 * (1 - target):.0f} % FLOPs↓ (from `published.py`; their "
            f"baselines, recipes and training budgets, not ours — our fine-tune is {ft_epochs:.2f} epochs; compare "
            "Δ, and only loosely):", "", published.render_table(rows)]


def summarise(raw: Mapping[str, Any], command: str) -> str:
    """The markdown body."""
    s = raw["sizes"]
    epochs = s["ft_steps"] * s["ft_batch"] / 50000
    cells = full_grid(raw)
    n_done = sum(cell_key(*c) in raw["cells"] for c in cells)
    complete = n_done == len(cells)
    lines = [
        "**Protocol.** The akamaster checkpoints were trained on all 50,000 training images, so a validation split "
        "carved from them is memorised (≈ 96 % accuracy). The 10,000 CIFAR-10 test images are split once into two "
        f"disjoint stratified halves (seed {SPLIT_SEED}): **half A (selection)** scores every candidate "
        f"({s['val_images']} images), is the differentiable searchers' validation set and picks each cell's "
        f"finalist; **half B (report)** ({s['test_images']} images) is used only for the accuracies reported "
        "after the fine-tune. BN calibration, search-time training and fine-tuning use training images only.",
        "",
        f"**Budgets.** Every candidate-proposing searcher gets **{s['candidates']} candidates** per seed "
        f"({s['seeds']} seed(s)), scored by adaptive BN ({s['calib_batches']} fixed training batches of "
        f"{s['calib_batch']}); `dmcp`/`resrep` train instead (the `cpu` preset of their hyper-parameter files) and "
        "emit one architecture (DMCP with its own weights; ResRep's preset cuts its widths from the dense weights, "
        "`weights: dense`). Every finalist then gets the **same fine-tune**: BN "
        f"re-estimated, {s['ft_steps']} SGD steps × batch {s['ft_batch']} ({epochs:.2f} epochs), lr {s['ft_lr']} "
        "cosine, momentum 0.9, wd 5e-4, CIFAR augmentation. Search space `cifar_resnet` (block-internal widths; "
        "residual streams kept), min keep ratio 0.2, L1 channel selection. MACs are the closed-form "
        "multiply-accumulates of conv and linear layers (batch 1); size = fp32 bytes of the parameters and buffers.",
        "",
        f"Status: {n_done} of {len(cells)} cells done" + (" (complete)." if complete else
                                                         f" — continue with `{resume_command(command)}`."),
        *status_blocks(raw, cells),
        *across_cells(raw),
    ]
    if raw.get("quick"):
        est = estimate_full(raw)
        per_cell = "" if est is None else " (" + ", ".join(
            f"≈ {m:.0f} min per {k} cell" for k, m in est["cell_minutes"].items()) + ")"
        lines += ["", "_Quick form: a smoke test of the pipeline (tiny budgets), not a measurement of the searchers. "
                  "**The full form** (status and tables in `search_quality.md`): "
                  "`python -m benchmarks.bench_search_quality --resume` (add `--max-minutes M` to stop starting new "
                  "cells after M minutes, and repeat until the status "
                  "says complete), estimated "
                  + (f"**≈ {est['hours']:.0f} h** of single-thread CPU time on this machine{per_cell}" if est
                     else "several hours")
                  + f" for {len(default_searchers())} searchers × {len(FULL.models)} models × "
                  f"{len(FULL.targets)} targets × {FULL.seeds} seed ({FULL.candidates} candidates, "
                  f"{FULL.ft_steps} fine-tune steps × {FULL.ft_batch}; extrapolated from the dense ResNet-20's "
                  "single-thread forward and training rates measured in this run, ResNet-56 scaled by its MACs)._"]
    for model in dict.fromkeys(c["model"] for c in raw["cells"].values()):
        d = raw["dense"].get(model, {})
        lines += ["", f"## {model}", "",
                  f"Dense: {d.get('macs', 0) / 1e6:.2f} M MACs, {d.get('params', 0):,} params, "
                  f"{d.get('bytes', 0) / 1024:,.1f} KiB; top-1 {_pct(d.get('select'))} % on half A, "
                  f"**{_pct(d.get('report'))} %** on half B."]
        for target in dict.fromkeys(c["target"] for c in raw["cells"].values() if c["model"] == model):
            lines += ["", f"### {model} at {100 * target:.0f} % of the dense MACs", "", *cell_table(raw, model, target),
                      "", f"Figure: `figures/search_quality_{model}_{100 * target:.0f}.png` "
                      "(`python -m benchmarks.figures`).", *published_block(model, target, epochs)]
    opts = {c["searcher"]: c["options"] for c in raw["cells"].values() if c.get("options")}
    lines += ["", "Searcher settings changed from the defaults to fit the candidate budget: "
              + ("; ".join(f"{k}: {v}" for k, v in opts.items()) or "none") + ". `uniform` and "
              "`global_magnitude` propose a single candidate; `sensitivity` spends its budget on a scan and ends "
              "with one allocation.",
              "", "Runs: " + "; ".join(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(r['started']))} UTC: "
                                       f"{r['cells']} cells in {r['seconds'] / 60:.1f} min" for r in raw["runs"]
                                       if r["cells"])]
    lines += rebuilt_block(raw)
    sup = merge_entries(raw.get("superseded", {}), {})
    if sup:
        lines += ["", "Superseded cells (run again after a change to the searcher's defaults; the old records stay in "
                  "`search_quality.json` under `superseded`): " + "; ".join(
                      f"{k} {' → '.join(_pct(e['record'].get('test_after_ft')) + ' %' for e in v)}"
                      + (f" → now {_pct(raw['cells'][k].get('test_after_ft'))} %" if k in raw["cells"] else
                         " → rerun pending")
                      for k, v in sup.items()) + "."]
    return "\n".join(lines)


def status_blocks(raw: Mapping[str, Any], cells: Sequence[tuple[str, float, str, int]]) -> list[str]:
    """One line per (model, target) of the grid: how many of its cells are done, and which are missing."""
    if raw.get("quick"):
        return []
    lines = [""]
    for model in dict.fromkeys(c[0] for c in cells):
        for target in dict.fromkeys(c[1] for c in cells if c[0] == model):
            block = [c for c in cells if c[0] == model and c[1] == target]
            todo = [c for c in block if cell_key(*c) not in raw["cells"]]
            missing = ", ".join(f"`{n}`" for n in dict.fromkeys(c[2] for c in todo))
            state = "complete" if not todo else "not started" if len(todo) == len(block) else f"missing {missing}"
            lines.append(f"- {model} at {100 * target:.0f} % MACs: {len(block) - len(todo)} of {len(block)} cells "
                         f"— {state}")
    return lines


def resume_command(command: str) -> str:
    """The command that continues the whole grid (a quick run: the same command again, resumed).

    A full run's last command may have named a subset (``--models``, ``--targets``, ``--searchers``); the
    continuation drops those, so it covers every missing cell (add them back to split the work).
    """
    if "--quick" in command:
        return command if "--resume" in command else command + " --resume"
    return "python -m benchmarks.bench_search_quality --resume"


# ------------------------------------------------------------------------------------------------ CLI


def parse_sizes(args: argparse.Namespace) -> Sizes:
    """Sizes from the preset and the overriding options."""
    sizes = QUICK if args.quick else FULL
    over: dict[str, Any] = {}
    if args.models:
        over["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.targets:
        over["targets"] = tuple(float(t) for t in args.targets.split(",") if t.strip())
    for key in ("candidates", "seeds", "ft_steps"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    return replace(sizes, **over)


def checked_searchers(parser: argparse.ArgumentParser, spec: str | None, *, models: Sequence[str],
                      targets: Sequence[float], default: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The searchers named in ``spec`` (comma-separated; ``default`` when empty), after the checks every grid of
    searchers shares; a failed check ends the program through ``parser.error`` before anything runs.

    Checked: CIFAR-10 and the models' checkpoints are present, every target is a MACs fraction in (0, 1), and
    every name (and every name in ``extra``) is a registered searcher.
    """
    from autoprune.agents.base import SEARCHERS
    from autoprune.errors import AutoPruneError

    missing = _cifar.data_error(models)
    if missing:
        parser.exit(2, missing + "\n")
    if any(not 0.0 < t < 1.0 for t in targets):
        parser.error("targets must be fractions of the dense MACs in (0, 1)")
    names = [n.strip() for n in spec.split(",") if n.strip()] if spec else list(default)
    try:
        for n in [*names, *extra]:
            SEARCHERS.get(n)
    except AutoPruneError as exc:
        parser.error(str(exc))
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (2 searchers, ResNet-20, 50 %%)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the results JSON")
    parser.add_argument("--fresh", action="store_true", help="discard earlier full results and trial stores")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting new cells after this")
    parser.add_argument("--searchers", default=None, help="comma-separated subset (default: every searcher)")
    parser.add_argument("--rerun", default=None,
                        help="comma-separated searchers whose finished cells (of --models/--targets) run again, "
                             "after a change to their defaults; the old records stay in the JSON as superseded "
                             "(needs --resume)")
    parser.add_argument("--rebuild", default=None,
                        help="comma-separated cell keys (e.g. resnet20|0.5|resrep|0): fine-tune their widths cut "
                             "from the dense weights beside the searcher's own network, instead of running the grid "
                             "(needs --resume)")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(CHECKPOINTS)}")
    parser.add_argument("--targets", default=None, help="comma-separated MACs fractions, e.g. 0.5,0.3")
    parser.add_argument("--candidates", type=int, default=None, help="candidates per searcher and seed")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per searcher")
    parser.add_argument("--ft-steps", type=int, default=None, help="fine-tune steps of every finalist")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)

    import optuna

    from autoprune.agents.base import load_builtin_searchers
    from autoprune.errors import AutoPruneError

    load_builtin_searchers()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    configure_threads(args.threads)
    from autoprune import interrupts

    interrupts.install()  # as the CLI does: a Ctrl-C swallowed inside a trial still stops the run at the next check
    sizes = parse_sizes(args)
    unknown = sorted(set(sizes.models) - set(CHECKPOINTS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(CHECKPOINTS)}")
    names = checked_searchers(parser, args.searchers, models=sizes.models, targets=sizes.targets,
                              default=list(QUICK_SEARCHERS) if args.quick else default_searchers())
    rerun = [n.strip() for n in args.rerun.split(",") if n.strip()] if args.rerun else []
    if rerun and not args.resume:
        parser.error("--rerun replaces cells of an existing run: add --resume")
    if set(rerun) - set(names):
        parser.error(f"--rerun names searchers outside --searchers: {sorted(set(rerun) - set(names))}")
    name = "search_quality_quick" if args.quick else "search_quality"
    out_json = RESULTS / f"{name}.json"
    if args.quick:
        store_dir = Path(tempfile.mkdtemp(prefix="bench-search-quality-"))
    else:
        store_dir = WORKDIR
        if args.fresh:
            shutil.rmtree(store_dir, ignore_errors=True)
            out_json.unlink(missing_ok=True)
        store_dir.mkdir(parents=True, exist_ok=True)
    from benchmarks._common import command_line

    command = command_line()
    title = "Search quality: every searcher at equal budgets (CIFAR-10 ResNets)" + (" (quick)" if args.quick else "")

    def on_update(raw: dict[str, Any]) -> dict[str, Any]:
        merged = write_merged(out_json, raw)
        write_result(name, title, summarise(merged, command), command=command)
        return merged

    try:
        if args.rebuild:
            if not args.resume:
                parser.error("--rebuild adds to an existing run: add --resume")
            keys = [k.strip() for k in args.rebuild.split(",") if k.strip()]
            rebuild(load_results(out_json, sizes, resume=True), keys, sizes, on_update)
        else:
            run(sizes, names, out_json, store_dir, resume=args.resume, quick=args.quick,
                max_minutes=args.max_minutes, on_update=on_update, rerun=rerun, command=command)
    except AutoPruneError as exc:
        parser.error(str(exc))
    finally:
        if args.quick:
            shutil.rmtree(store_dir, ignore_errors=True)
    _log(f"wrote {RESULTS / (name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
