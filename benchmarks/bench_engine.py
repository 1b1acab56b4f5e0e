"""Benchmark: speed of the pruning engine and the CPU latency gain of a pruned ResNet-56.

Measures, single-threaded on the CPU:

* ``graph.analyze`` time for ResNet-56 (option A) and MobileNetV2 (targets: < 2 s);
* ``pruning.plan`` + ``pruning.apply`` time for one candidate (every prunable group at 50 % width; target
  < 0.2 s);
* ``cost.closed_form`` calls per second on random candidates (fp32, and with per-layer bits);
* the measured latency speed-up of ResNet-56 pruned to about 50 % of its MACs (batch 1 and 64, median of
  interleaved A/B rounds) versus the MACs ratio, with ``round_to`` 1 and 8.

Run as ``python -m benchmarks.bench_engine [--quick]``; the table goes to ``results/benchmarks/engine.md``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from autoprune import cost, graph, pruning
from autoprune.types import QuantSpec
from benchmarks._common import write_result


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _speed_rows(names: Sequence[str], repeats: int) -> tuple[list[str], dict[str, graph.GroupSet]]:
    from autoprune.models import build_model

    rows, analyses = [], {}
    for name in names:
        model = build_model(name).eval()
        x = torch.rand(1, 3, 32, 32)
        graph.analyze(model, x)  # warm-up (imports, first trace)
        t_an, gs = _median_time(lambda m=model, x=x: graph.analyze(m, x), repeats)
        widths = {g.id: max(1, g.size // 2) for g in gs.prunable()}
        t_plan, plan = _median_time(lambda m=model, g=gs, w=widths: pruning.plan(m, g, w), repeats)
        t_apply, _ = _median_time(lambda m=model, p=plan: pruning.apply(m, p), repeats)
        t_both, _ = _median_time(lambda m=model, g=gs, w=widths: pruning.apply(m, g, w), repeats)
        rows.append(f"| {name} | {len(gs)} | {len(gs.prunable())} | {t_an:.3f} | {1e3 * t_plan:.0f} | "
                    f"{1e3 * t_apply:.0f} | {1e3 * t_both:.0f} |")
        analyses[name] = gs
        _log(f"{name}: analyze {t_an:.3f} s, plan {t_plan:.3f} s, apply {t_apply:.3f} s, both {t_both:.3f} s")
    return rows, analyses


def _closed_form_rows(analyses: dict[str, graph.GroupSet], calls: int) -> list[str]:
    rows = []
    rng = random.Random(0)
    for name, gs in analyses.items():
        cands = [{g.id: rng.randint(1, g.size) for g in gs.prunable()} for _ in range(calls)]
        layers = list(gs.cost_terms.layers) if gs.cost_terms is not None else []
        bits = {layer: QuantSpec(w_bits=rng.randint(2, 8), a_bits=8) for layer in layers}
        for label, b in (("fp32", None), ("mixed bits", bits)):
            cost.closed_form(gs, cands[0], b)
            t = time.perf_counter()
            for w in cands:
                cost.closed_form(gs, w, b)
            per = (time.perf_counter() - t) / calls
            rows.append(f"| {name} | {label} | {1e6 * per:.1f} | {1 / per:,.0f} |")
            _log(f"{name} closed_form ({label}): {1e6 * per:.1f} µs/call")
    return rows


def _timings(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, min_run_time: float) -> dict[str, float]:
    try:
        from autoprune.latency import compare_latency
    except ImportError:
        compare_latency = None
    if compare_latency is not None:
        res = compare_latency(models, x, rounds=rounds, threads=1, min_run_time=min_run_time)
        return {k: v.median_ms for k, v in res.items()}
    from torch.utils import benchmark

    pooled: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for k, m in models.items():
                m.eval()
                timer = benchmark.Timer("m(x)", globals={"m": m, "x": x}, num_threads=1)
                pooled[k].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    return {k: statistics.median(v) for k, v in pooled.items()}


def _widths_for_macs(gs: graph.GroupSet, target: float, round_to: int) -> tuple[dict[str, int], float]:
    """One keep ratio for every prunable group, bisected so that the MACs are just under ``target``."""
    dense = cost.closed_form(gs).macs
    lo, hi = 0.05, 1.0
    for _ in range(25):
        mid = 0.5 * (lo + hi)
        if cost.closed_form(gs, pruning.widths_from_ratios(gs, mid, round_to=round_to)).macs > target * dense:
            hi = mid
        else:
            lo = mid
    return pruning.widths_from_ratios(gs, lo, round_to=round_to), lo


def _latency_rows(gs: graph.GroupSet, model: nn.Module, batches: Sequence[int], rounds: int,
                  min_run_time: float) -> list[str]:
    dense_macs = cost.closed_form(gs).macs
    variants: dict[str, nn.Module] = {"dense": model}
    ratios: dict[str, float] = {"dense": 1.0}
    for round_to in (1, 8):
        widths, ratio = _widths_for_macs(gs, 0.5, round_to)
        name = f"keep ratio {ratio:.2f}, round_to={round_to}"
        variants[name] = pruning.apply(model, gs, widths).eval()
        ratios[name] = cost.closed_form(gs, widths).macs / dense_macs
    rows = []
    for b in batches:
        x = torch.rand(b, 3, 32, 32)
        ms = _timings(variants, x, rounds, min_run_time)
        for name, t in ms.items():
            speedup = ms["dense"] / t
            rows.append(f"| {b} | {name} | {ratios[name]:.3f} | {1 / ratios[name]:.2f}× | {t:.2f} | {speedup:.2f}× |")
            _log(f"batch {b} {name}: {t:.2f} ms, speed-up {speedup:.2f}x (MACs ratio {ratios[name]:.3f})")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write ``results/benchmarks/engine.md``; return 0."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batch 1 only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    repeats = 3 if args.quick else 7
    rows, analyses = _speed_rows(["resnet56", "mobilenetv2"], repeats)
    cf_rows = _closed_form_rows(analyses, 300 if args.quick else 3000)
    from autoprune.models import build_model

    resnet = build_model("resnet56").eval()
    lat_rows = _latency_rows(analyses["resnet56"], resnet, [1] if args.quick else [1, 64],
                             rounds=2 if args.quick else 3, min_run_time=0.3 if args.quick else 1.0)
    body = [
        "Single thread (`torch.set_num_threads(1)`), input 1×3×32×32 for analysis; medians over "
        f"{repeats} repeats. The machine is shared with other jobs, so absolute times are noisy.",
        "",
        "## Analysis and apply",
        "",
        "| model | groups | prunable | analyze (s) | plan (ms) | apply (ms) | plan + apply (ms) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Targets: analysis < 2 s, plan + apply < 200 ms per candidate (every prunable group at 50 % width).",
        "",
        "## Closed-form cost",
        "",
        "| model | bits | µs / call | calls / s |",
        "|---|---|---|---|",
        *cf_rows,
        "",
        "## Latency of ResNet-56 (option A) pruned to about 50 % MACs",
        "",
        "One keep ratio for every prunable group (block-internal widths and, through the zero-pad rule, the "
        "residual streams), bisected so that the closed-form MACs are just under 50 % of the dense model. "
        "Medians of interleaved rounds (dense, pruned, pruned …), one thread, `torch.inference_mode()`.",
        "",
        "| batch | model | MACs ratio | ideal speed-up | median (ms) | measured speed-up |",
        "|---|---|---|---|---|---|",
        *lat_rows,
    ]
    path = write_result("engine", "Engine: analysis, apply, closed-form cost and pruned latency", "\n".join(body))
    _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
