"""Benchmark: latency you can budget and speed-ups you can measure (issue #21).

Cells (``--only`` takes a comma-separated subset of the keys):

* ``predictor|resnet20``, ``predictor|resnet56``, ``predictor|mobilenetv2``: the latency predictor built the
  product's way (:func:`autoprune.campaign.build_latency_predictor`: per-layer table, calibration on 8 seeded
  candidates; 1 thread, batch 1, a fresh directory per cell), then other random candidates of the model's
  search space (uniform keep ratios in [min_ratio, 1], seeded): predicted vs measured end-to-end latency
  (:func:`autoprune.latency.compare_latency`, interleaved rounds). Weights do not matter (random init).
* ``speedup|resnet56``: ResNet-56 at 50 % MACs (the ``uniform`` candidate): measured speed-up over the dense
  model divided by the MACs ratio, at batch 1 and 64 (1 thread), for the exported model and for variants that
  show where the time goes (plain ``nn.Module``, BN folded, channels_last weights, frozen TorchScript, the pt2
  artifact, ``optimize_for_inference``, widths rounded to 8), each also against the dense model given the same
  treatment, plus per-op profiles (torch.profiler) of dense and pruned at both batches.
* ``search|resnet20``: two campaigns on pretrained CIFAR-10 ResNet-20 (tpe, adaptive BN, same seed): a MACs
  budget of 0.5, then a latency budget at the first one's best as the latency campaign's predictor prices it
  (so that candidate is legal in both); both finalists fine-tuned by ``export_trial`` identically, timed again
  interleaved and tested on the 10,000 test images.

Every finished cell is written to ``results/benchmarks/latency.json`` (``latency_quick.json`` with ``--quick``)
at once and the Markdown table is rebuilt; ``--resume`` skips finished cells (campaigns continue from their
stores in ``results/benchmarks/latency_work/``). Without ``--resume`` the selected cells run again and the
other records in the file are kept. Run as ``python -m benchmarks.bench_latency [--quick] [--resume]
[--only CELLS]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.utils import configure_threads
from benchmarks._common import RESULTS, SHARED, WEIGHTS_DIR, command_line, result_path, write_result

CELLS = ("predictor|resnet20", "predictor|resnet56", "predictor|mobilenetv2", "speedup|resnet56", "search|resnet20",
         "search|resnet20|seed1")


def _search_cells(cells: Mapping[str, Any]) -> dict[str, Any]:
    """The finished search cells (``search|resnet20`` is seed 0, ``search|resnet20|seedN`` seed N)."""
    return {k: c for k, c in cells.items() if k.startswith("search|")}


def _seed_of(key: str) -> int:
    last = key.split("|")[-1]
    return int(last[4:]) if last.startswith("seed") else 0
GOALS = {"within_10pct": 0.9, "speedup_over_macs_ratio": 0.8, "latency_search_vs_macs_search": 0.0}
WORKDIR = RESULTS / "latency_work"
INPUT = (3, 32, 32)
nan = float("nan")


@dataclass(frozen=True)
class Sizes:
    """What scales a run (a resumed run keeps the file only if they match)."""

    candidates: int = 50  # predicted-vs-measured candidates per model (besides the calibration set)
    rounds: int = 5  # interleaved rounds of every comparison
    run_time: float = 0.1  # seconds per model per round (candidates)
    table_run_time: float = 0.05  # latency.min_run_time of the product (table entries, calibration)
    speed_run_time: tuple[float, float] = (0.3, 1.0)  # seconds per model per round at batch 1 / big batch
    big_batch: int = 64
    profile_iters: int = 50
    trials: int = 60
    ft_epochs: float = 1.0
    val_size: int = 1000
    eval_batches: int = 10


FULL = Sizes()
QUICK = Sizes(candidates=6, rounds=2, run_time=0.02, table_run_time=0.01, speed_run_time=(0.05, 0.1), big_batch=8,
              profile_iters=5, trials=4, ft_epochs=0.02, val_size=500, eval_batches=2)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ (scipy when installed, else Pearson on numpy ranks)."""
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(a, b).statistic)
    except ImportError:
        ra, rb = (np.argsort(np.argsort(np.asarray(v, dtype=float))) for v in (a, b))
        return float(np.corrcoef(ra, rb)[0, 1])


def _timed(models: Mapping[str, nn.Module], x: torch.Tensor, rounds: int, run_time: float) -> dict[str, Any]:
    from autoprune.latency import compare_latency

    return compare_latency(models, x, rounds=rounds, threads=1, min_run_time=run_time)


# ------------------------------------------------------------------------------------------------ predictor


def predictor_summary(rows: Sequence[Mapping[str, Any]], dense: Mapping[str, float] | None = None
                      ) -> dict[str, Any]:
    """Share within ±10 %, median |error| and Spearman ρ (prediction and MACs vs measurement) of candidates.

    With ``dense`` (its ``predicted_ms`` and ``measured_ms``, timed beside the candidates), also the errors of the
    predicted fraction of the dense latency (what a budget reads), which a uniform drift of the machine's speed
    since the calibration does not move.
    """
    err = [abs(r["rel_error"]) for r in rows]
    meas = [r["measured_ms"] for r in rows]
    out = {"candidates": len(rows), "within_10pct": sum(e <= 0.1 for e in err) / len(rows),
           "median_abs_error": statistics.median(err), "max_abs_error": max(err),
           "spearman": spearman([r["predicted_ms"] for r in rows], meas),
           "spearman_macs": spearman([r["macs_fraction"] for r in rows], meas)}
    if dense is not None:
        rel = [abs(r["predicted_ms"] / dense["predicted_ms"] / (r["measured_ms"] / dense["measured_ms"]) - 1)
               for r in rows]
        out |= {"within_10pct_vs_dense": sum(e <= 0.1 for e in rel) / len(rows),
                "median_abs_error_vs_dense": statistics.median(rel)}
    return out


def run_predictor(model_name: str, sizes: Sizes, work: Path, seed: int = 0,
                  model_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build the predictor as a campaign does, then compare it with interleaved timings of other candidates."""
    from autoprune import cost, graph
    from autoprune.campaign import build_latency_predictor
    from autoprune.config import config_from_dict
    from autoprune.latency_model import LatencyPredictor
    from autoprune.models import build_model
    from autoprune.search_spaces import build_space

    torch.manual_seed(seed)
    model = build_model(model_name, **dict(model_kwargs or {})).eval()
    example = torch.rand(1, *INPUT)
    groups = graph.analyze(model, example)
    space = build_space(groups, model_name=model_name)
    shutil.rmtree(work, ignore_errors=True)
    cfg = config_from_dict({"name": f"latency-{model_name}", "model": {"name": model_name},
                            "dataset": {"name": "cifar10"}, "output_dir": str(work), "seed": seed,
                            "latency": {"min_run_time": sizes.table_run_time}})
    lc = cfg.latency
    t0 = time.perf_counter()
    entries = LatencyPredictor(groups, work, threads=lc.threads, batch=lc.batch, min_run_time=lc.min_run_time).fill()
    table_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = build_latency_predictor(cfg, model, groups, space, example)  # reads the table, calibrates
    calib_s = time.perf_counter() - t0

    def draw(rng: random.Random) -> dict[str, int]:
        return dict(space.widths_for_ratios([rng.uniform(space.min_ratio, 1.0) for _ in space.groups]))

    calib_rng = random.Random(seed)  # the calibration set, as the campaign draws it: never among the candidates
    calib = [dict(space.full().widths)] + [draw(calib_rng) for _ in range(lc.calibration - 1)]
    seen = {tuple(sorted(w.items())) for w in calib}
    rng, cands = random.Random(seed + 1), []
    while len(cands) < sizes.candidates:
        w = draw(rng)
        if tuple(sorted(w.items())) not in seen:
            seen.add(tuple(sorted(w.items())))
            cands.append(w)
    dense_macs = cost.closed_form(groups, {}).macs
    # the calibration set is timed again beside the candidates: its error now tells a prediction error from a
    # change of the machine's speed since the calibration (load on a shared machine)
    # every candidate in the form the predictor is calibrated for: what `autoprune export` writes
    models = {**{f"k{i}": pred.build(w) for i, w in enumerate(calib)},
              **{f"c{i}": pred.build(w) for i, w in enumerate(cands)}}
    t0 = time.perf_counter()
    measured = _timed(models, example, sizes.rounds, sizes.run_time)
    measure_s = time.perf_counter() - t0
    stored_coef, stored_fit = pred.coef, dict(pred.fit)
    stored = {i: pred.predict(w) for i, w in enumerate(cands)}
    now = [pred.predict(w) / measured[f"k{i}"].low_ms - 1 for i, w in enumerate(calib)]
    # The same calibration refitted on the calibration set's timings from this session: the machine's speed drifts
    # by 10-30 % over minutes (other tenants of the host), so this separates the model's error from the drift
    pred.fit_timings(calib, [measured[f"k{i}"].low_ms for i in range(len(calib))])
    rows = []
    for i, w in enumerate(cands):
        m, p = measured[f"c{i}"], pred.predict(w)
        rows.append({"macs_fraction": cost.closed_form(groups, w).macs / dense_macs, "predicted_ms": p,
                     "predicted_stored_ms": stored[i], "measured_ms": m.low_ms, "median_ms": m.median_ms,
                     "iqr_ms": m.iqr_ms, "rel_error": p / m.low_ms - 1.0,
                     "rel_error_stored": stored[i] / m.low_ms - 1.0, "rel_error_median": p / m.median_ms - 1.0,
                     "widths": [w[g.group_id] for g in space.groups]})
    dense = {"predicted_ms": pred.predict(calib[0]), "measured_ms": measured["k0"].low_ms}
    stored_rows = [{**r, "predicted_ms": r["predicted_stored_ms"], "rel_error": r["rel_error_stored"]} for r in rows]
    return {"model": model_name, "groups": len(space.groups), "sites": len(pred.sites),
            "table_entries": entries, "table_seconds": table_s, "calibration_seconds": calib_s,
            "measure_seconds": measure_s, "coef": list(pred.coef or ()), "calibration_fit": pred.fit,
            "stored_coef": list(stored_coef or ()), "stored_fit": stored_fit, "dense": dense, "layout": pred.layout,
            "calibration_set_now": now, "summary": predictor_summary(rows, dense),
            "summary_stored": predictor_summary(stored_rows), "rows": rows}


# ------------------------------------------------------------------------------------------------ speed-up


def plain_module(dense: nn.Module, pruned: nn.Module) -> nn.Module:
    """A copy of the dense ``nn.Module`` with its conv/BN/linear layers replaced by the pruned model's (no fx)."""
    out = copy.deepcopy(dense)
    for name, mod in pruned.named_modules():
        if isinstance(mod, nn.Conv2d | nn.BatchNorm2d | nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, copy.deepcopy(mod))
    return out.eval()


class _Held(nn.Module):
    """Calls ``fn`` (a TorchScript or ``torch.export`` module, which refuse ``train()``), held outside the tree."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.__dict__["fn"] = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.__dict__["fn"](x)


def _cl(model: nn.Module) -> nn.Module:
    """A copy with channels_last weights (the input stays NCHW: the first conv's output follows its weight)."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last).eval()


def _frozen(model: nn.Module, x: torch.Tensor, *, optimize: bool = False) -> nn.Module:
    """``model`` traced and frozen by TorchScript (BN folded, no Python per op); ``optimize``: then
    ``torch.jit.optimize_for_inference`` (oneDNN layouts, prepacked weights)."""
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(copy.deepcopy(model).eval(), x))
        return _Held(torch.jit.optimize_for_inference(frozen) if optimize else frozen)


def op_profile(model: nn.Module, x: torch.Tensor, iters: int, top: int = 8) -> dict[str, Any]:
    """Per-op self CPU time of ``iters`` forward passes (torch.profiler): convolution time, top ops and shares."""
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            with profile(activities=[ProfilerActivity.CPU]):  # the profiler's own start-up, not counted
                model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(iters):
                    model(x)
    finally:
        torch.set_num_threads(threads)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)
    return {"batch": int(x.shape[0]), "op_ms": total / 1e3 / iters,
            "ops_per_forward": sum(e.count for e in events) / iters,
            "conv_ms": sum(e.self_cpu_time_total for e in events if "conv" in e.key) / 1e3 / iters,
            "top": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count / iters,
                     "us_per_forward": e.self_cpu_time_total / iters} for e in ranked[:top]]}


def run_speedup(sizes: Sizes, work: Path, model_name: str = "resnet56", target: float = 0.5,
                seed: int = 0) -> dict[str, Any]:
    """Speed-up over the MACs ratio of the uniform candidate at ``target`` MACs, and what changes it."""
    from autoprune import cost, graph, pruning, serialize
    from autoprune.agents.base import BudgetGuard
    from autoprune.deploy import deployable
    from autoprune.models import build_model
    from autoprune.objectives import Budget
    from autoprune.problem import Problem
    from autoprune.quantization import fold_batchnorm as fold
    from autoprune.search_spaces import build_space

    torch.manual_seed(seed)
    model = build_model(model_name).eval()
    example = torch.rand(1, *INPUT)
    groups = graph.analyze(model, example)
    space = build_space(groups, model_name=model_name)
    guard = BudgetGuard(Problem(model, groups, space, None, example), Budget(macs=target))
    cand, scale = guard.shrink([1.0] * len(space.groups))
    widths = dict(cand.widths)
    legal8 = {g.group_id: g.widths for g in build_space(groups, model_name=model_name, round_to=8).groups}
    widths8 = {g: min(legal8[g], key=lambda v: (abs(v - w), -v)) for g, w in widths.items()}
    dense_macs = cost.closed_form(groups, {}).macs
    macs = {"pruned": cost.closed_form(groups, widths).macs, "r8": cost.closed_form(groups, widths8).macs}
    shutil.rmtree(work, ignore_errors=True)
    unfolded = pruning.apply(model, groups, widths).eval()
    # what `autoprune export` writes with its defaults (export.fold_bn, export.memory_format: auto), saved and
    # reloaded
    shipped, deploy_info = deployable(unfolded, example)
    pruning.save_pruned(shipped, work / "export", example)
    exported = serialize.load_module(work / "export").eval()
    r8 = pruning.apply(model, groups, widths8).eval()

    def ts(module: nn.Module, name: str) -> nn.Module:  # `export.formats: [torchscript]`: traced and frozen
        path = serialize.export_deployment(module, example, work / name, formats=["torchscript"])["torchscript"]
        return _Held(torch.jit.load(str(path)))

    def pt2(module: nn.Module, name: str) -> nn.Module:  # `autoprune export`'s default deployment artifact
        path = serialize.export_deployment(module, example, work / name, formats=["pt2"])["pt2"]
        return _Held(torch.export.load(str(path)).module())

    x = example
    variants: dict[str, tuple[nn.Module, str, str]] = {}  # name: (module, MACs key, like-for-like dense)
    for who, mod, key in (("dense", model, "dense"), ("pruned", exported, "pruned")):
        for how, build in (("", lambda m: m), (", BN folded", fold), (", channels_last", _cl),
                           (", BN folded, channels_last", lambda m: _cl(fold(m))),
                           (", TorchScript artifact (model.ts, frozen)", lambda m, who=who: ts(m, f"ts-{who}")),
                           (", frozen TorchScript, channels_last", lambda m: _frozen(_cl(m), x)),
                           (", pt2 module", lambda m, who=who: pt2(m, f"pt2-{who}")),
                           (", optimize_for_inference", lambda m: _frozen(m, x, optimize=True))):
            name = "pruned (export, fx)" if who == "pruned" and not how else who + how
            variants[name] = (build(mod).eval(), key, "dense" + how)
    variants["pruned, BN not folded (export.fold_bn: false)"] = (unfolded, "pruned", "dense")
    variants["pruned, plain nn.Module"] = (plain_module(model, unfolded), "pruned", "dense")
    variants["pruned, widths to ×8"] = (r8, "r8", "dense")
    variants["pruned, widths to ×8, BN folded, channels_last"] = (_cl(fold(r8)), "r8",
                                                                   "dense, BN folded, channels_last")
    macs_ratio = {"dense": 1.0, "pruned": dense_macs / macs["pruned"], "r8": dense_macs / macs["r8"]}
    rows: dict[str, dict[str, Any]] = {n: {"macs_ratio": macs_ratio[k], "like_for_like": ref}
                                       for n, (_, k, ref) in variants.items()}
    mods = {n: v[0] for n, v in variants.items()}
    for key, batch, run_time in (("batch1", 1, sizes.speed_run_time[0]),
                                 ("batch64", sizes.big_batch, sizes.speed_run_time[1])):
        res = _timed(mods, torch.rand(batch, *INPUT), sizes.rounds, run_time)
        for n, r in res.items():
            ref = rows[n]["like_for_like"]
            rows[n][key] = {"low_ms": r.low_ms, "median_ms": r.median_ms, "iqr_ms": r.iqr_ms,
                            "rounds_ms": list(r.rounds_ms),
                            "speedup": res["dense"].low_ms / r.low_ms,
                            "ratio": res["dense"].low_ms / r.low_ms / rows[n]["macs_ratio"],
                            "ratio_median": res["dense"].median_ms / r.median_ms / rows[n]["macs_ratio"],
                            "ratio_like_for_like": res[ref].low_ms / r.low_ms / rows[n]["macs_ratio"]}
    big = torch.rand(sizes.big_batch, *INPUT)
    profile = {f"{n} @ batch 1": op_profile(mods[n], example, sizes.profile_iters)
               for n in ("dense", "pruned (export, fx)", "pruned, BN folded")}
    profile |= {f"{n} @ batch {sizes.big_batch}": op_profile(mods[n], big, max(1, sizes.profile_iters // 16))
                for n in ("dense", "pruned (export, fx)")}
    rec = {"model": model_name, "target": target, "uniform_scale": scale,
           "widths": sorted(set(widths.values())), "widths_x8": sorted(set(widths8.values())),
           "macs_fraction": macs["pruned"] / dense_macs, "macs_fraction_x8": macs["r8"] / dense_macs,
           "big_batch": sizes.big_batch, "deploy": deploy_info, "variants": rows, "profile": profile}
    rec["findings"] = speedup_findings(rec)
    return rec


def speedup_findings(rec: Mapping[str, Any]) -> list[str]:
    """Plain-words reading of a speed-up record (which variant gets how close to the MACs ratio, and why)."""
    v, out = rec["variants"], []
    base = v["pruned (export, fx)"]
    for key, label in (("batch1", "batch 1"), ("batch64", f"batch {rec['big_batch']}")):
        best = max(v, key=lambda n: v[n][key]["ratio"] if n.startswith("pruned") else -1.0)
        out.append(f"{label}: the exported model reaches {base[key]['ratio']:.2f} of the MACs ratio "
                   f"({base[key]['speedup']:.2f}× for {base['macs_ratio']:.2f}× fewer MACs); best variant "
                   f"'{best}' {v[best][key]['ratio']:.2f} (speed-up {v[best][key]['speedup']:.2f}× over the "
                   f"dense model as shipped; {v[best][key]['ratio_like_for_like']:.2f} against its like-for-like "
                   f"dense '{v[best]['like_for_like']}').")
    r8, r8cl = v.get("pruned, widths to ×8"), v.get("pruned, widths to ×8, BN folded, channels_last")
    plain, shipped = v.get("pruned, BN not folded (export.fold_bn: false)"), v["pruned (export, fx)"]
    if r8 and r8cl and plain:
        def cmp(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
            return ", ".join(f"{a[k]['ratio']:.2f} vs {b[k]['ratio']:.2f} at {lab}"
                             for k, lab in (("batch1", "batch 1"), ("batch64", f"batch {rec['big_batch']}")))
        def gain(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
            return " / ".join(f"{a[k]['ratio'] - b[k]['ratio']:+.2f}" for k in ("batch1", "batch64"))
        out.append(f"round_to 8 (widths {rec['widths_x8']} instead of {rec['widths']}): ratio {cmp(r8, plain)} "
                   f"(both unfolded, NCHW: {gain(r8, plain)} at batch 1 / {rec['big_batch']}); {cmp(r8cl, shipped)} "
                   f"(rounded and BN folded, channels-last, against the exported model: {gain(r8cl, shipped)}).")
    prof = rec["profile"]
    for b in sorted({p["batch"] for p in prof.values()}):
        d, p = prof.get(f"dense @ batch {b}"), prof.get(f"pruned (export, fx) @ batch {b}")
        if d and p:
            out.append(f"profile at batch {b}: convolution kernels {d['conv_ms']:.2f} → {p['conv_ms']:.2f} ms "
                       f"({d['conv_ms'] / p['conv_ms']:.2f}× for {base['macs_ratio']:.2f}× fewer MACs); every other "
                       f"op {d['op_ms'] - d['conv_ms']:.2f} → {p['op_ms'] - p['conv_ms']:.2f} ms; "
                       f"{p['ops_per_forward']:.0f} op calls per forward in both (pruning removes none).")
    return out


# ------------------------------------------------------------------------------------------------ search


def _search_config(name: str, out: Path, sizes: Sizes, budget: Mapping[str, float], seed: int) -> Any:
    from autoprune.config import config_from_dict
    from benchmarks._cifar import CHECKPOINTS, MIN_RATIO

    return config_from_dict({
        "name": name, "output_dir": str(out), "seed": seed, "n_trials": sizes.trials,
        "model": {"name": "resnet20", "checkpoint": str(WEIGHTS_DIR / CHECKPOINTS["resnet20"])},
        "dataset": {"name": "cifar10", "data_dir": str(SHARED / "data"), "val_size": sizes.val_size,
                    "batch_size": 128, "eval_batch_size": 500},
        "search_space": {"family": "cifar_resnet", "min_ratio": MIN_RATIO},
        "objective": {"budget": dict(budget)},
        "evaluator": {"name": "adaptive_bn", "kwargs": {"batches": sizes.eval_batches}},
        "searcher": {"name": "tpe"},
        "export": {"finetune": "fixed", "epochs": sizes.ft_epochs, "lr": 0.01, "formats": [], "latency": False}})


def _latency_budget(arm: tuple[Any, Any, Any], sizes: Sizes, out: Path, seed: int) -> dict[str, float]:
    """The MACs search's best as a fraction of the dense latency: measured, and as the latency campaign's
    predictor (built now in its directory, where the campaign finds it) prices it, which is the budget: the MACs
    search's best is then a legal candidate of the latency search."""
    from autoprune import pruning
    from autoprune.campaign import build_latency_predictor

    camp, _, res = arm
    widths = dict(res.best.candidate.widths)
    m = _timed({"dense": camp.model, "best": pruning.apply(camp.model, camp.groups, widths)}, camp.example_input,
               sizes.rounds, 0.2)
    cfg = _search_config("latency-latency_search", out, sizes, {"latency_ms": 1.0}, seed)
    pred = build_latency_predictor(cfg, camp.model, camp.groups, camp.space, camp.example_input)
    return {"measured_fraction": m["best"].low_ms / m["dense"].low_ms,
            "predicted_fraction": pred.predict(widths) / pred.predict(camp.space.full().widths)}


def run_search_cell(sizes: Sizes, work: Path, seed: int = 0) -> dict[str, Any]:
    """MACs-budget search, then a latency-budget search at the same measured latency; fine-tune both, compare."""
    from autoprune import serialize
    from autoprune.campaign import open_campaign, run_search
    from autoprune.export import export_trial, select_trial

    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"trials": sizes.trials, "ft_epochs": sizes.ft_epochs, "val_size": sizes.val_size,
                           "eval_batches": sizes.eval_batches, "searcher": "tpe", "evaluator": "adaptive_bn"}
    camps, finals = {}, {}
    budget_file = work / "latency_budget.json"
    for arm in ("macs_search", "latency_search"):
        if arm == "macs_search":
            budget: dict[str, float] = {"macs": 0.5}
        else:
            if not budget_file.is_file():  # kept, so that a resumed run reopens the same campaign
                budget_file.write_text(json.dumps(_latency_budget(camps["macs_search"], sizes, work / arm, seed)))
            out["budget_from"] = json.loads(budget_file.read_text())
            budget = {"latency_ms": out["budget_from"]["predicted_fraction"]}
        t0 = time.perf_counter()
        camp, store = open_campaign(_search_config(f"latency-{arm}", work / arm, sizes, budget, seed),
                                    argv=["bench_latency", arm])
        res = run_search(camp, store, quiet=True)
        camps[arm] = (camp, store, res)
        out[arm] = {"budget": budget, "search_seconds": time.perf_counter() - t0, "best_number": res.best.number,
                    "val_accuracy": res.best.result.accuracy, "macs_fraction":
                    res.best.cost.macs / camp.problem.dense_cost.macs}
        if camp.latency is not None:
            out[arm]["predicted_ms"] = camp.latency.predict(res.best.candidate.widths)
            out[arm]["latency_fit"] = camp.latency.fit
    for arm, (camp, store, _) in camps.items():
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        exp = export_trial(camp, select_trial(store.to_dataframe(), "best"), out_dir=work / f"export-{arm}",
                           finetune_method="fixed", epochs=sizes.ft_epochs, formats=[], measure_latency=False)
        finals[arm] = serialize.load_module(exp.model_dir).eval()
        out[arm].update({"test_accuracy": exp.metrics["exported"]["test_accuracy"],
                         "dense_test_accuracy": exp.metrics["original"]["test_accuracy"],
                         "export_seconds": time.perf_counter() - t0})
    camp = camps["macs_search"][0]
    m = _timed({"dense": camp.model, **finals}, camp.example_input, sizes.rounds, 0.2)
    for arm in finals:
        out[arm].update({"measured_ms": m[arm].low_ms, "median_ms": m[arm].median_ms, "iqr_ms": m[arm].iqr_ms,
                         "latency_fraction": m[arm].low_ms / m["dense"].low_ms})
    out["dense_ms"] = m["dense"].low_ms
    out["delta_points"] = 100 * (out["latency_search"]["test_accuracy"] - out["macs_search"]["test_accuracy"])
    return out


# ------------------------------------------------------------------------------------------------ results


def headline(cells: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's figures from whatever cells are done (None for parts not run yet)."""
    preds = [c for k, c in cells.items() if k.startswith("predictor|")]
    rows = [r for c in preds for r in c["rows"]]
    sp = cells.get("speedup|resnet56")
    deltas = [c["delta_points"] for c in _search_cells(cells).values()]
    base = sp["variants"]["pruned (export, fx)"] if sp else None
    return {
        "within_10pct": sum(abs(r["rel_error"]) <= 0.1 for r in rows) / len(rows) if rows else None,
        # each model's candidates ranked among themselves (pooled ranks would mostly rank the models)
        "spearman": (sum(c["summary"]["spearman"] * c["summary"]["candidates"] for c in preds) / len(rows)
                     if rows else None),
        "candidates": len(rows) if rows else None,
        "speedup_over_macs_ratio": {"batch1": base["batch1"]["ratio"] if base else None,
                                    "batch64": base["batch64"]["ratio"] if base else None},
        # mean over the seeds run (each seed: both searches and both fine-tunes with that seed)
        "latency_search_vs_macs_search": statistics.fmean(deltas) if deltas else None,
    }


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _met(x: float | None, goal: float, strict: bool = False) -> str:
    if x is None:
        return "not run"
    return "yes" if (x > goal if strict else x >= goal) else "**no**"


def summarise(raw: Mapping[str, Any]) -> str:
    """Markdown body: headline, predictor tables, speed-up investigation, search comparison, how to resume."""
    h, cells = raw["headline"], raw["cells"]
    sp = h["speedup_over_macs_ratio"]
    lines = [
        "Issue #21. All timings: CPU, 1 thread, `compare_latency` interleaved rounds; a latency is the 10th "
        "percentile of the timed runs (`LatencyResult.low_ms`: other processes on this shared machine only ever "
        "add time, so the median follows their load), with the median beside it where shown. The predictor's "
        "table and calibration use the same statistic.", "",
        "| figure | value | goal | met |", "|---|---|---|---|",
        f"| predicted within ±10 % of measured | {_f(h['within_10pct'])} ({h['candidates'] or 0} candidates) | "
        f"≥ {GOALS['within_10pct']} | {_met(h['within_10pct'], GOALS['within_10pct'])} |",
        f"| Spearman ρ predicted vs measured (per model, weighted mean) | {_f(h['spearman'], '.3f')} | – | – |",
        f"| speed-up / MACs ratio, ResNet-56 at 50 % MACs, batch 1 | {_f(sp['batch1'])} | "
        f"≥ {GOALS['speedup_over_macs_ratio']} | {_met(sp['batch1'], GOALS['speedup_over_macs_ratio'])} |",
        f"| speed-up / MACs ratio, batch {raw['sizes']['big_batch']} | {_f(sp['batch64'])} | "
        f"≥ {GOALS['speedup_over_macs_ratio']} | {_met(sp['batch64'], GOALS['speedup_over_macs_ratio'])} |",
        f"| test accuracy, latency search − MACs search (points) | {_f(h['latency_search_vs_macs_search'], '+.2f')} "
        f"| > 0 | {_met(h['latency_search_vs_macs_search'], 0.0, strict=True)} |", ""]
    preds = {k: c for k, c in cells.items() if k.startswith("predictor|")}
    if preds:
        lines += ["## Predictor vs measurement", "",
                  "| model | layout | candidates | within ±10 % | median abs error | max abs error | within ±10 %, "
                  "as a fraction of dense (median abs error) | ρ predicted | ρ MACs | "
                  "table s (entries) | calibration s | α, β, γ | within ±10 % with the stored calibration "
                  "(median abs error) | stored calibration's median error (then / now) |",
                  "|---" * 14 + "|"]
        for c in preds.values():
            s, fit = c["summary"], c.get("stored_fit", c["calibration_fit"])
            ss = c.get("summary_stored", {})
            lines.append(f"| {c['model']} | {c.get('layout', 'contiguous')} | {s['candidates']} | "
                         f"{s['within_10pct']:.2f} | "
                         f"{100 * s['median_abs_error']:.1f} % | {100 * s['max_abs_error']:.1f} % | "
                         f"{_f(s.get('within_10pct_vs_dense'))} "
                         f"({100 * s.get('median_abs_error_vs_dense', nan):.1f} %) | "
                         f"{s['spearman']:.3f} | {s['spearman_macs']:.3f} | {c['table_seconds']:.1f} "
                         f"({c['table_entries']}) | {c['calibration_seconds']:.1f} | "
                         f"{', '.join(f'{x:.3g}' for x in c['coef'])} | {_f(ss.get('within_10pct'))} "
                         f"({100 * ss.get('median_abs_error', nan):.1f} %) | "
                         f"{100 * fit.get('median_rel_error', nan):.1f} % / "
                         f"{100 * statistics.median(map(abs, c.get('calibration_set_now', [nan]))):.1f} % |")
        lines += ["", "Within ±10 %: the campaign's predictor (its table, timed once) with its calibration refitted "
                  "on the calibration set's timings taken in the same interleaved session as the candidates (the "
                  "model's own error); with the stored calibration, fitted minutes earlier, the error also holds "
                  "the machine's drift in between (this shared host's speed moves by 10–30 % over minutes even "
                  "in the low quantile). ρ MACs: Spearman ρ of the closed-form MACs against the measured latency "
                  "(the proxy the predictor replaces). As a fraction of dense: predicted / predicted dense against "
                  "measured / measured dense (the dense model timed beside the candidates; a budget reads this). "
                  "Calibration error then / now: on the calibration set when it was fitted, and timed again beside the "
                  "candidates (a large 'now' with a small 'then' means the machine's speed changed since the "
                  "calibration, not a wrong model). Candidates by MACs:", ""]
        for c in preds.values():
            lines += [f"<details><summary>{c['model']}: dense predicted {c['dense']['predicted_ms']:.3f} ms, "
                      f"measured {c['dense']['measured_ms']:.3f} ms</summary>", "",
                      "| MACs % | predicted ms | measured ms (median, IQR) | error |", "|---|---|---|---|"]
            lines += [f"| {100 * r['macs_fraction']:.1f} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} "
                      f"({r.get('median_ms', nan):.3f}, {r['iqr_ms']:.3f}) | {100 * r['rel_error']:+.1f} % |"
                      for r in sorted(c["rows"], key=lambda r: r["macs_fraction"])]
            lines += ["", "</details>", ""]
    if "speedup|resnet56" in cells:
        c = cells["speedup|resnet56"]
        b = c["big_batch"]
        lines += ["## Speed-up of ResNet-56 at 50 % MACs", "",
                  f"Uniform candidate (widths {c['widths']}, {100 * c['macs_fraction']:.1f} % MACs; rounded to "
                  f"multiples of 8: {c['widths_x8']}, {100 * c['macs_fraction_x8']:.1f} % MACs). Ratio = speed-up "
                  "over the dense model as shipped ÷ MACs ratio; like-for-like = over the dense model given the same "
                  "treatment.", "",
                  f"The exported model (`pruned (export, fx)`): batch norm folded, memory layout "
                  f"{c.get('deploy', {}).get('memory_format', 'contiguous')} (`export.memory_format: auto` timed "
                  "both).", "",
                  "| variant | MACs ratio | batch 1 ms (median) | speed-up | ratio | like-for-like | "
                  f"batch {b} ms (median) | speed-up | ratio | like-for-like |", "|---" * 10 + "|"]
        for n, v in c["variants"].items():
            cols = [f"{v[k].get('low_ms', v[k]['median_ms']):.2f} ({v[k]['median_ms']:.2f}) | {v[k]['speedup']:.2f} | "
                    f"{v[k]['ratio']:.2f} | "
                    f"{v[k]['ratio_like_for_like']:.2f}" for k in ("batch1", "batch64")]
            lines.append(f"| {n} | {v['macs_ratio']:.2f} | {cols[0]} | {cols[1]} |")
        lines += ["", "Per-op profile (torch.profiler, self CPU time per forward; share of the op time):", "",
                  "| model | op | share | calls / forward | µs / forward |", "|---|---|---|---|---|"]
        for n, p in c["profile"].items():
            lines += [f"| {n} | `{t['op']}` | {100 * t['share']:.1f} % | {t['calls']:.0f} | {t['us_per_forward']:.0f} |"
                      for t in p["top"][:8]]
        lines += ["", "Findings:", ""] + [f"- {f}" for f in c["findings"]] + [""]
    searches = _search_cells(cells)
    if searches:
        lines += ["## Latency-aware search vs MACs search (ResNet-20, CIFAR-10)", ""]
    for key, c in sorted(searches.items(), key=lambda kv: _seed_of(kv[0])):
        lines += [f"### Seed {_seed_of(key)} (`{key}`)", "",
                  f"tpe, {c['trials']} trials each, adaptive BN ({c['eval_batches']} batches, {c['val_size']} "
                  f"validation images carved from the training set, which the checkpoint saw), the same seed for "
                  f"both searches and both fine-tunes; both "
                  f"finalists fine-tuned by `export_trial` ({c['ft_epochs']:g} epoch, lr 0.01) and tested on the "
                  f"10,000 test images; dense {c['dense_ms']:.3f} ms.", "",
                  "| search | budget | MACs % | val % | latency ms (IQR) | latency vs dense | test % after FT |",
                  "|---|---|---|---|---|---|---|"]
        for arm in ("macs_search", "latency_search"):
            a = c[arm]
            budget = (f"MACs ≤ {a['budget']['macs']:g}" if "macs" in a["budget"] else
                      f"predicted latency ≤ {a['budget']['latency_ms']:.3f} of dense")
            lines.append(f"| {arm.replace('_', ' ')} | {budget} | {100 * a['macs_fraction']:.1f} | "
                         f"{100 * a['val_accuracy']:.2f} | {a['measured_ms']:.3f} ({a['iqr_ms']:.3f}) | "
                         f"{100 * a['latency_fraction']:.1f} % | {100 * a['test_accuracy']:.2f} |")
        bf = c.get("budget_from", {})
        lines += ["", f"The latency budget is the MACs search's best as the latency campaign's predictor prices it "
                  f"({_f(bf.get('predicted_fraction'), '.3f')} of dense; measured "
                  f"{_f(bf.get('measured_fraction'), '.3f')}), so that candidate is legal in both searches.", "",
                  f"Δ (latency − MACs) = {c['delta_points']:+.2f} points.", ""]
    if len(searches) > 1:
        ds = [c["delta_points"] for c in searches.values()]
        lines += [f"Mean Δ over {len(ds)} seeds: {statistics.fmean(ds):+.2f} points (per seed: "
                  f"{', '.join(f'{d:+.2f}' for d in ds)}).", ""]
    load = {k: f", 1-minute load average {' → '.join(f'{x:.1f}' for x in c['load_average'])} on {os.cpu_count()} "
            "cores" if c.get("load_average") else "" for k, c in cells.items()}
    lines += ["## Runs", "", *[f"- `{k}`: {c['seconds']:.0f} s, {c['finished']}{load[k]}" for k, c in cells.items()],
              "",
              "Resume an interrupted run with `--resume` (finished cells are skipped; the search campaigns "
              "continue from their stores under `results/benchmarks/latency_work/`); rerun single cells with "
              "`--only 'speedup|resnet56'` (the other records are kept)."]
    return "\n".join(lines)


def load(path: Path, sizes: Sizes, quick: bool) -> dict[str, Any]:
    """The results file if it was written with the same sizes, else an empty one."""
    if path.is_file():
        raw = json.loads(path.read_text())
        if raw.get("sizes") == json.loads(json.dumps(asdict(sizes))):
            return raw
        _log(f"{path} was written with other sizes: starting a new file")
    return {"version": 1, "quick": quick, "sizes": asdict(sizes), "cells": {}, "headline": headline({})}


def save(raw: dict[str, Any], command: str) -> None:
    """Write the JSON (with a fresh headline) and the Markdown."""
    raw["headline"] = headline(raw["cells"])
    result_path("latency", ".json").write_text(json.dumps(raw, indent=1, default=str))
    write_result("latency", "Latency: predictor accuracy, speed-ups and latency-aware search" +
                 (" (quick)" if raw["quick"] else ""), summarise(raw), command=command)


def run_cell(key: str, sizes: Sizes, work: Path) -> dict[str, Any]:
    """Run one cell by key."""
    kind, model = key.split("|")[:2]
    if kind == "predictor":
        return run_predictor(model, sizes, work / key.replace("|", "-"))
    if kind == "speedup":
        return run_speedup(sizes, work / key.replace("|", "-"), model)
    return run_search_cell(sizes, work / key.replace("|", "-"), seed=_seed_of(key))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run; writes latency_quick.*)")
    p.add_argument("--resume", action="store_true", help="skip the cells already in the results file")
    p.add_argument("--only", default=None, help=f"comma-separated cells of: {', '.join(CELLS)}")
    p.add_argument("--trials", type=int, default=None, help="trials per search (default 60, quick 4)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()] if args.only else list(CELLS)
    if set(keys) - set(CELLS):
        p.error(f"unknown cells {sorted(set(keys) - set(CELLS))}; choose from {', '.join(CELLS)}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    configure_threads(1)
    sizes = QUICK if args.quick else FULL
    if args.trials is not None:
        sizes = replace(sizes, trials=args.trials)
    if any(k.startswith("search|") for k in keys):
        from benchmarks._cifar import missing_data

        if missing_data():
            _log(f"skipping the search cells: {missing_data()}")
            keys = [k for k in keys if not k.startswith("search|")]
    command = command_line()
    raw = load(result_path("latency", ".json"), sizes, args.quick)
    work = Path(tempfile.mkdtemp(prefix="bench-latency-")) if args.quick else WORKDIR
    for key in keys:
        if args.resume and key in raw["cells"]:
            _log(f"{key}: done already")
            continue
        if not args.resume and key.startswith("search|"):
            shutil.rmtree(work / key.replace("|", "-"), ignore_errors=True)
        _log(f"{key}: running")
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        rec = run_cell(key, sizes, work)
        rec["seconds"] = time.perf_counter() - t0
        rec["load_average"] = [load0, os.getloadavg()[0]]  # 1-minute load before / after: how shared the CPUs were
        rec["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        raw["cells"][key] = rec
        save(raw, command)
        _log(f"{key}: {rec['seconds']:.0f} s; headline {json.dumps(raw['headline'])}")
    save(raw, command)
    print(f"wrote {result_path('latency')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
