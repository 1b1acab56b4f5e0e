"""Figures of the benchmark results, drawn from the JSON files the benchmarks already wrote (never runs one).

Every entry of :data:`FIGURES` names an output image, the JSON file under ``results/benchmarks/`` it is drawn
from, the function that draws it and a one-sentence description (copied into ``figures/README.md``). A file
that is missing, unreadable (e.g. half-written by a running benchmark) or holds no usable data is skipped with
a one-line note on stderr.

* ``searchers_best_so_far.png`` (``searchers.json``) — best feasible validation accuracy so far per searcher.
* ``searchers_finalists.png`` (``searchers.json``) — fine-tuned test accuracy of each searcher's finalist.
* ``search_quality_<model>_<pct>.png`` (``search_quality.json``) — per (model, MACs target): test accuracy
  after (and before) fine-tuning per searcher.
* ``fidelity_scatter.png`` (``evaluator_fidelity_training.json``) — each evaluator's score vs the ground truth.
* ``deployment_latency.png`` (``deployment.json``) — latency per variant and batch size, bytes on disk.
* ``search_cost_depth.png`` (``search_cost.json``) — analysis / apply / closed-form / adaptive-BN time vs depth.

Run as ``python -m benchmarks.figures [--results DIR] [--out DIR] [--quick]`` (defaults:
``results/benchmarks`` and ``<results>/figures``). ``--quick`` draws from the ``*_quick.json`` files of
``make bench-quick`` instead and suffixes every image (and the README) with ``_quick``. Exit code 0 when at
least one figure was written, 2 when none could be drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from benchmarks._cells import from_file
from benchmarks._common import REPO, RESULTS

DPI = 120
LINESTYLES: tuple[Any, ...] = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p", "d", "H", "8")
REFERENCE = "uniform"  # the searchers' baseline: the same keep ratio everywhere


class NoData(Exception):
    """The JSON file exists but holds nothing that this figure can draw."""


@dataclass(frozen=True)
class Part:
    """One image of a figure that is drawn once per key (e.g. per model and MACs target)."""

    suffix: str  # appended to the figure's name: ``<name>_<suffix>.png``
    figure: Figure
    note: str = ""  # appended to the description in the README


Drawn = Figure | list[Part]
DrawFn = Callable[[Mapping[str, Any]], Drawn]


@dataclass(frozen=True)
class FigureSpec:
    """A figure: output name (without ``.png``), the JSON it is drawn from, how, and what it shows."""

    name: str
    source: str  # file name under the results folder (``_quick`` is inserted before ``.json`` with --quick)
    draw: DrawFn
    description: str


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson correlation of average ranks (ties share their mean rank).

    Args:
        a: First sample.
        b: Second sample, same length as ``a``.

    Returns:
        ρ in [-1, 1], or NaN when fewer than two pairs or one sample is constant.
    """
    if len(a) != len(b):
        raise ValueError(f"samples differ in length: {len(a)} vs {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    da, db = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((da * da).sum() * (db * db).sum()))
    return float((da * db).sum() / denom) if denom > 0 else math.nan


def _ranks(xs: Sequence[float]) -> np.ndarray:
    values = np.asarray(xs, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _colors(n: int) -> list[Any]:
    """``n`` distinct colours: tab10 up to 10, else tab20 with the dark shades first."""
    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    cmap = matplotlib.colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return [cmap(order[i % 20]) for i in range(n)]


def _zoom(values: Sequence[float], *, pad: float = 0.12, min_span: float = 1.0) -> tuple[float, float]:
    """Axis limits around ``values`` with a margin (for accuracies in %: never 0 unless the data is)."""
    lo, hi = min(values), max(values)
    span = max(hi - lo, min_span)
    return lo - pad * span, hi + pad * span


def _wrap(text: str, width: int = 34) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _pct(x: float) -> float:
    return 100.0 * float(x)


def _num(x: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _si(x: float) -> str:
    for factor, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.1f} {unit}"
    return f"{x:.0f}"


# ---------------------------------------------------------------------------------------------------------
# Figures


def best_so_far_curves(runs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per searcher, the best feasible accuracy so far after each candidate: a (seeds × candidates) array.

    Before a run's first feasible candidate (and after its last one) the entry is NaN, not 0.

    Args:
        runs: ``searchers.json``'s ``runs`` (each with ``searcher`` and ``trials``).

    Returns:
        Searcher name → array of shape (number of runs, longest run), in order of first appearance.
    """
    per: dict[str, list[list[float]]] = defaultdict(list)
    for run in runs:
        best, curve = math.nan, []
        for t in sorted(run.get("trials") or [], key=lambda t: t.get("number", 0)):
            acc = _num(t.get("accuracy"))
            if t.get("feasible") and acc is not None and t.get("state", "complete") == "complete":
                best = acc if math.isnan(best) else max(best, acc)
            curve.append(best)
        per[str(run["searcher"])].append(curve)
    out = {}
    for name, curves in per.items():
        arr = np.full((len(curves), max((len(c) for c in curves), default=0)), np.nan)
        for i, c in enumerate(curves):
            arr[i, :len(c)] = c
        out[name] = arr
    return out


def _nanmean(arr: np.ndarray) -> np.ndarray:
    counts = np.sum(~np.isnan(arr), axis=0)
    sums = np.nansum(arr, axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def draw_searchers_best_so_far(raw: Mapping[str, Any]) -> Figure:
    """Best feasible validation accuracy so far vs candidates, mean over seeds, one line per searcher.

    Args:
        raw: The content of ``searchers.json``.

    Returns:
        The figure.
    """
    curves = best_so_far_curves(raw.get("runs") or [])
    means = {name: _nanmean(arr) for name, arr in curves.items() if arr.size and not np.isnan(arr).all()}
    if not means:
        raise NoData("no run has a feasible candidate")
    ref = means.pop(REFERENCE, None)
    ref_value = float(np.nanmax(ref)) if ref is not None else None
    final = {name: float(m[~np.isnan(m)][-1]) for name, m in means.items()}
    order = sorted(means, key=lambda n: -final[n])
    fig = Figure(figsize=(10.5, 5.6), layout="constrained")
    ax = fig.subplots()
    for i, (name, color) in enumerate(zip(order, _colors(len(order)))):
        m = means[name]
        x = np.arange(1, len(m) + 1)
        seeds = curves[name].shape[0]
        single = int(np.sum(~np.isnan(m))) == 1  # e.g. one-shot searchers: a big marker, drawn on top
        ax.plot(x, 100 * m, color=color, ls=LINESTYLES[i % len(LINESTYLES)], marker=MARKERS[i % len(MARKERS)],
                ms=10 if single else 5, mec="black" if single else color, zorder=4 if single else 2, lw=1.6,
                label=f"{name} ({100 * final[name]:.1f} %, {seeds} seed{'s' * (seeds > 1)})")
    if ref_value is not None:
        ax.axhline(100 * ref_value, color="black", ls="--", lw=1.4, label=f"{REFERENCE} ({100 * ref_value:.1f} %)")
    longest = max(len(m) for m in means.values())
    ax.set_xticks(np.arange(1, longest + 1))
    ax.set_xlim(0.5, longest + 0.5)
    ax.set_xlabel("candidates evaluated")
    ax.set_ylabel("best feasible validation accuracy so far (%)")
    budget = (raw.get("budget") or {}).get("macs")
    dense = (raw.get("dense") or {}).get("val")
    bits = [f"budget {100 * budget:.0f} % of dense MACs" if budget is not None else "",
            f"dense val {100 * dense:.1f} %" if dense is not None else ""]
    ax.set_title("Best feasible validation accuracy so far, mean over seeds (gaps: no feasible candidate yet)"
                 + ("\n" + "; ".join(b for b in bits if b) if any(bits) else ""), fontsize=11)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, title="searcher (final mean)", title_fontsize=8)
    return fig


def draw_searchers_finalists(raw: Mapping[str, Any]) -> Figure:
    """Horizontal bars of each searcher finalist's fine-tuned test accuracy, sorted, with the dense model's.

    Args:
        raw: The content of ``searchers.json``.

    Returns:
        The figure.
    """
    fin = {name: _num(f.get("test")) for name, f in (raw.get("finalists") or {}).items()}
    fin = {name: v for name, v in fin.items() if v is not None}
    if not fin:
        raise NoData("no finalist has a test accuracy")
    names = sorted(fin, key=lambda n: fin[n])  # best at the top
    values = [_pct(fin[n]) for n in names]
    dense = _num((raw.get("dense") or {}).get("test"))
    fig = Figure(figsize=(8.5, 0.32 * len(names) + 1.8), layout="constrained")
    ax = fig.subplots()
    colors = ["#9e9e9e" if n == REFERENCE else "#1f77b4" for n in names]
    lo, hi = _zoom([*values, *([_pct(dense)] if dense is not None else [])], pad=0.15)
    y = np.arange(len(names))
    ax.barh(y, [v - lo for v in values], left=lo, color=colors, height=0.7)
    for yi, v in zip(y, values):
        ax.text(v + 0.01 * (hi - lo), yi, f"{v:.2f}", va="center", fontsize=8)
    if dense is not None:
        ax.axvline(_pct(dense), color="goldenrod", ls="--", lw=1.5, label=f"dense ({_pct(dense):.2f} %)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y, names, fontsize=9)
    ax.set_xlim(lo, hi + 0.06 * (hi - lo))
    ax.set_xlabel("test accuracy after fine-tuning (%)")
    ft = (raw.get("sizes") or {}).get("ft_steps")
    ax.set_title("Fine-tuned finalists: each searcher's best candidate (grey: uniform baseline)"
                 + (f"\n{ft} fine-tuning steps" if ft else ""), fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _search_quality_part(model: str, target: float, recs: Sequence[Mapping[str, Any]],
                         raw: Mapping[str, Any]) -> Figure:
    after: dict[str, list[float]] = defaultdict(list)
    before: dict[str, list[float]] = defaultdict(list)
    failed: dict[str, int] = defaultdict(int)
    for r in recs:
        name = str(r["searcher"])
        a = _num(r.get("test_after_ft"))
        if a is None or r.get("error"):
            failed[name] += 1
            continue
        after[name].append(_pct(a))
        b = _num(r.get("test_before_ft"))
        if b is not None:
            before[name].append(_pct(b))
    # bottom to top: searchers without any result, then by mean accuracy after fine-tuning (best at the top)
    names = sorted(n for n in failed if n not in after) + sorted(after, key=lambda n: float(np.mean(after[n])))
    dense = _num(((raw.get("dense") or {}).get(model) or {}).get("report"))
    means = {n: float(np.mean(after[n])) for n in after}
    values = [*means.values(), *(v for vs in before.values() for v in vs),
              *([_pct(dense)] if dense is not None else [])]
    lo, hi = _zoom(values, pad=0.08)
    fig = Figure(figsize=(9.0, 0.36 * len(names) + 2.4), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names))
    # the legend's bar: a searcher's colour, the reference's grey only when it is alone
    labelled = next((n for n in names if n in after and n != REFERENCE), REFERENCE)
    for yi, n in zip(y, names):
        if n not in after:
            ax.text(lo + 0.01 * (hi - lo), yi, f"no feasible candidate ({failed[n]} run{'s' * (failed[n] > 1)})",
                    va="center", fontsize=8, color="#b00020")
            continue
        sd = float(np.std(after[n], ddof=1)) if len(after[n]) > 1 else 0.0
        ax.barh(yi, means[n] - lo, left=lo, height=0.7, color="#9e9e9e" if n == REFERENCE else "#1f77b4",
                xerr=sd or None, ecolor="black", capsize=2,
                label="after fine-tuning (mean ± std over seeds)" if n == labelled else None)
        seeds = f"{len(after[n])} seed{'s' * (len(after[n]) > 1)}" + (f", {failed[n]} failed" if failed[n] else "")
        ax.text(means[n] + sd + 0.01 * (hi - lo), yi, f"{means[n]:.2f}  ({seeds})", va="center", fontsize=8)
    xs = [(v, yi) for yi, n in zip(y, names) for v in before.get(n, [])]
    if xs:
        ax.scatter([v for v, _ in xs], [yi for _, yi in xs], marker="o", s=30, facecolors="white",
                   edgecolors="#6baed6", linewidths=1.5, zorder=3, label="before fine-tuning (each seed)")
    if dense is not None:
        ax.axvline(_pct(dense), color="goldenrod", ls="--", lw=1.5, label=f"dense ({_pct(dense):.2f} %)")
    ax.set_yticks(y, names, fontsize=9)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlim(lo, hi + 0.1 * (hi - lo))
    ax.set_xlabel("test accuracy (%)")
    sizes = raw.get("sizes") or {}
    detail = ", ".join(s for s in (f"{sizes['candidates']} candidates" if sizes.get("candidates") else "",
                                   f"{sizes['ft_steps']} fine-tuning steps" if sizes.get("ft_steps") else "") if s)
    ax.set_title(f"Search quality: {model} at {100 * target:.0f} % of the dense MACs"
                 + (f"\n{detail}" if detail else ""), fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    return fig


def draw_search_quality(raw: Mapping[str, Any]) -> list[Part]:
    """One figure per (model, MACs target): test accuracy after fine-tuning per searcher, before as markers.

    Args:
        raw: The content of ``search_quality.json`` (``cells``: records with model, target, searcher, seed,
            ``test_after_ft``/``test_before_ft`` or ``error``; ``dense[model]["report"]``).

    Returns:
        One :class:`Part` per (model, target), suffix ``<model>_<percent>``.
    """
    raw = from_file(raw)
    cells: dict[tuple[str, float], list[Mapping[str, Any]]] = defaultdict(list)
    for rec in raw["cells"].values():
        if isinstance(rec, Mapping) and "model" in rec and "target" in rec and "searcher" in rec:
            cells[(str(rec["model"]), float(rec["target"]))].append(rec)
    parts = []
    for (model, target), recs in sorted(cells.items()):
        if not any(_num(r.get("test_after_ft")) is not None and not r.get("error") for r in recs):
            continue
        pct = f"{100 * target:.0f}"
        parts.append(Part(f"{model}_{pct}", _search_quality_part(model, target, recs, raw),
                          note=f"{model}, {pct} % of the dense MACs"))
    if not parts:
        raise NoData("no cell has a test accuracy after fine-tuning yet")
    return parts


def draw_fidelity_scatter(raw: Mapping[str, Any]) -> Figure:
    """One scatter per evaluator: its score (x) vs the ground-truth accuracy (y), with Spearman's ρ.

    The ground truth of a record is ``record["truth"]["accuracy"]`` (accuracy after the long fine-tune).

    Args:
        raw: The content of ``evaluator_fidelity_training.json``.

    Returns:
        The figure.
    """
    records = [r for r in raw.get("records") or [] if _num(_truth(r)) is not None]
    if not records:
        raise NoData("no record with a ground-truth accuracy")
    labels = list(dict.fromkeys([*(raw.get("evaluators") or []), *(k for r in records for k in r.get("scores", {}))]))
    series = {}
    for label in labels:
        pairs = [(_num(r["scores"][label].get("accuracy")), float(_truth(r)), _num(r["scores"][label].get("seconds")))
                 for r in records if isinstance(r.get("scores", {}).get(label), Mapping)]
        pairs = [p for p in pairs if p[0] is not None]
        if pairs:
            series[label] = pairs
    if not series:
        raise NoData("no evaluator scores")
    ncols = min(4, len(series))
    nrows = math.ceil(len(series) / ncols)
    fig = Figure(figsize=(3.6 * ncols + 0.6, 3.5 * nrows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    truth_all = [100 * t for ps in series.values() for _, t, _ in ps]
    for ax, (label, pairs) in zip(axes, series.items()):
        xs, ys = [100 * p[0] for p in pairs], [100 * p[1] for p in pairs]
        rho = spearman(xs, ys)
        secs = [p[2] for p in pairs if p[2] is not None]
        ax.scatter(xs, ys, s=28, color="#1f77b4", alpha=0.8, edgecolors="black", linewidths=0.4)
        rho_txt = "n/a" if math.isnan(rho) else f"{rho:+.2f}"
        cost = f", {np.mean(secs):.0f} s/cand." if secs else ""
        ax.set_title(f"{_wrap(label)}\nSpearman ρ = {rho_txt}{cost}", fontsize=9)
        ax.set_xlabel("evaluator score: accuracy (%)", fontsize=8)
        ax.set_xlim(*_zoom(xs, pad=0.1))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes[len(series):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("ground truth: accuracy after\nlong fine-tune (%)", fontsize=8)
    axes[0].set_ylim(*_zoom(truth_all, pad=0.1))
    sizes = raw.get("sizes") or {}
    steps = f" ({sizes['truth_steps']} steps)" if sizes.get("truth_steps") else ""
    fig.suptitle(f"Evaluator fidelity: {len(records)} pruned candidates, score vs ground truth{steps}; "
                 "higher ρ = better ranking", fontsize=11)
    return fig


def _truth(record: Mapping[str, Any]) -> Any:
    truth = record.get("truth")
    return truth.get("accuracy") if isinstance(truth, Mapping) else truth


def _latency_panel(ax: Axes, latency: Mapping[str, Mapping[str, Any]], colors: Mapping[str, Any]) -> None:
    batches = sorted(latency, key=lambda b: int(b))
    variants = list(dict.fromkeys(v for b in batches for v in latency[b]))
    width = 0.8 / max(1, len(variants))
    for i, var in enumerate(variants):
        xs, ys = [], []
        for j, b in enumerate(batches):
            ms = _num((latency[b].get(var) or {}).get("median_ms"))
            if ms is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(ms)
        ax.bar(xs, ys, width=width, color=colors[var], label=var)
        for x, v in zip(xs, ys):
            ax.text(x, v * 1.05, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("median latency per batch (ms, log)")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")


def _bytes_panel(ax: Axes, variants: Mapping[str, Mapping[str, Any]], colors: Mapping[str, Any]) -> None:
    names = [n for n in variants if _num(variants[n].get("bytes")) is not None]
    kb = [float(variants[n]["bytes"]) / 1e3 for n in names]
    y = np.arange(len(names))[::-1]
    ax.barh(y, kb, color=[colors[n] for n in names], height=0.7)
    for yi, n, v in zip(y, names, kb):
        top1 = _num(variants[n].get("top1"))
        ax.text(v + 0.01 * max(kb), yi, f"{v:,.0f} kB" + (f" · top-1 {100 * top1:.1f} %" if top1 is not None else ""),
                va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlim(0, 1.55 * max(kb))
    ax.set_xlabel("size on disk (kB)")
    ax.grid(axis="x", alpha=0.3)


def draw_deployment_latency(raw: Mapping[str, Any]) -> Figure:
    """Per model: grouped bars of median latency per variant and batch size (log), and bytes on disk per variant.

    Args:
        raw: The content of ``deployment.json``.

    Returns:
        The figure.
    """
    models = [m for m in raw.get("models") or [] if m.get("latency") or m.get("variants")]
    if not models:
        raise NoData("no model with latency or size measurements")
    names = list(dict.fromkeys([*(v for m in models for v in m.get("variants") or {}),
                                *(v for m in models for lat in (m.get("latency") or {}).values() for v in lat)]))
    colors = dict(zip(names, _colors(len(names))))
    fig = Figure(figsize=(12.5, 3.9 * len(models) + 0.6), layout="constrained")
    axes = fig.subplots(len(models), 2, squeeze=False, width_ratios=[1.1, 1])
    for row, m in zip(axes, models):
        macs = m.get("macs") or {}
        desc = (f", MACs {_si(macs['pruned'])} pruned vs {_si(macs['dense'])} dense"
                if _num(macs.get("pruned")) and _num(macs.get("dense")) else "")
        if m.get("latency"):
            _latency_panel(row[0], m["latency"], colors)
        else:
            row[0].text(0.5, 0.5, "no latency measured", ha="center", va="center", transform=row[0].transAxes)
        row[0].set_title(f"{m.get('model', '?')}: latency{desc}", fontsize=10)
        if m.get("variants"):
            _bytes_panel(row[1], m["variants"], colors)
        row[1].set_title(f"{m.get('model', '?')}: bytes on disk per variant", fontsize=10)
    threads = raw.get("threads")
    fig.suptitle("Deployment: pruned and quantised variants" + (f" (CPU, {threads} thread{'s' * (threads != 1)})"
                                                               if threads else ""), fontsize=11)
    return fig


_DEPTH_SERIES = (  # key, factor to milliseconds, label, vertical offset of the value labels (points)
    ("analyze_s", 1e3, "graph analysis (once per search)", 6),
    ("apply_ms", 1.0, "pruning.apply (one candidate)", -13),
    ("closed_form_us", 1e-3, "closed-form cost (one call)", 6),
    ("abn_eval_s", 1e3, "adaptive-BN evaluation (one candidate)", 6),
)


def _duration(ms: float) -> str:
    if ms >= 1e3:
        return f"{ms / 1e3:.3g} s"
    return f"{ms:.3g} ms" if ms >= 1 else f"{ms * 1e3:.3g} µs"


def draw_search_cost_depth(raw: Mapping[str, Any]) -> Figure:
    """Analysis, apply, closed-form cost and adaptive-BN evaluation time vs model depth (log y).

    Args:
        raw: The content of ``search_cost.json`` (``depth`` rows).

    Returns:
        The figure.
    """
    rows = [r for r in raw.get("depth") or [] if any(_num(r.get(s[0])) is not None for s in _DEPTH_SERIES)]
    if not rows:
        raise NoData("no depth rows")
    depths = [re.search(r"(\d+)$", str(r.get("model", ""))) for r in rows]
    if all(depths) and len({int(d.group(1)) for d in depths if d}) == len(rows):
        xs = [float(d.group(1)) for d in depths if d]
        xlabel = "model depth (layers)"
    else:
        xs = [float(r.get("groups", i)) for i, r in enumerate(rows)]
        xlabel = "channel groups"
    order = np.argsort(xs)
    xs = [xs[i] for i in order]
    rows = [rows[i] for i in order]
    fig = Figure(figsize=(8.5, 5.0), layout="constrained")
    ax = fig.subplots()
    for (key, factor, label, dy), color, marker in zip(_DEPTH_SERIES, _colors(len(_DEPTH_SERIES)), MARKERS):
        pts = [(x, _num(r.get(key))) for x, r in zip(xs, rows)]
        pts = [(x, v * factor) for x, v in pts if v is not None]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, lw=1.8, label=label)
        for x, v in pts:
            ax.annotate(_duration(v), (x, v), textcoords="offset points", xytext=(6, dy), fontsize=7, color=color)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{r.get('model', '')}\n{r['groups']} groups" if "groups" in r else str(r.get("model", ""))
                       for r in rows], fontsize=8)
    ax.margins(x=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("time (ms, log scale)")
    ax.set_title("Search cost vs model depth: one-off analysis and per-candidate steps", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(0.01, 0.38))  # the empty band between the curves
    return fig


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("searchers_best_so_far", "searchers.json", draw_searchers_best_so_far,
               "Best feasible validation accuracy so far against candidates evaluated, mean over seeds, one line "
               "per searcher, with the uniform baseline dashed."),
    FigureSpec("searchers_finalists", "searchers.json", draw_searchers_finalists,
               "Test accuracy after fine-tuning of each searcher's best candidate, sorted, against the dense model."),
    FigureSpec("search_quality", "search_quality.json", draw_search_quality,
               "Test accuracy after fine-tuning (bars, mean over seeds) and before it (markers) per searcher, "
               "against the dense model."),
    FigureSpec("fidelity_scatter", "evaluator_fidelity_training.json", draw_fidelity_scatter,
               "Each cheap evaluator's score against the ground-truth accuracy after a long fine-tune, with "
               "Spearman's rank correlation."),
    FigureSpec("deployment_latency", "deployment.json", draw_deployment_latency,
               "Median CPU latency per variant and batch size (log scale) and bytes on disk per variant, per model."),
    FigureSpec("search_cost_depth", "search_cost.json", draw_search_cost_depth,
               "Time of graph analysis, pruning.apply, the closed-form cost and one adaptive-BN evaluation against "
               "model depth (log scale)."),
)


# ---------------------------------------------------------------------------------------------------------
# Command line


def _source(spec: FigureSpec, quick: bool) -> str:
    return spec.source.removesuffix(".json") + "_quick.json" if quick else spec.source


def _load(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise NoData(f"{path.name} not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NoData(f"{path.name} is unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, Mapping):
        raise NoData(f"{path.name} does not hold a JSON object")
    return raw


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def draw_all(results: Path, out: Path, *, quick: bool = False,
             specs: Sequence[FigureSpec] = FIGURES) -> list[tuple[Path, str, str]]:
    """Draw every figure whose JSON holds usable data; skipped ones get a one-line note on stderr.

    Args:
        results: Folder with the benchmark JSON files.
        out: Folder the PNG files go to (created when something is written).
        quick: Draw from the ``*_quick.json`` files and suffix the images with ``_quick``.
        specs: The figures to draw.

    Returns:
        (image path, description, source JSON name) of every image written, in registry order.
    """
    written: list[tuple[Path, str, str]] = []
    cache: dict[str, Mapping[str, Any] | NoData] = {}
    tag = "_quick" if quick else ""
    for spec in specs:
        source = _source(spec, quick)
        try:
            if source not in cache:
                try:
                    cache[source] = _load(results / source)
                except NoData as exc:
                    cache[source] = exc
            raw = cache[source]
            if isinstance(raw, NoData):
                raise raw
            try:
                drawn = spec.draw(raw)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                raise NoData(f"{source} has an unexpected structure ({type(exc).__name__}: {exc})") from exc
        except NoData as exc:
            print(f"figures: skipped {spec.name}{tag}: {exc}", file=sys.stderr)
            continue
        parts = [Part("", drawn)] if isinstance(drawn, Figure) else drawn
        out.mkdir(parents=True, exist_ok=True)
        for part in parts:
            path = out / f"{spec.name}{'_' + part.suffix if part.suffix else ''}{tag}.png"
            part.figure.savefig(path, dpi=DPI)
            desc = spec.description.removesuffix(".") + (f" ({part.note})." if part.note else ".")
            written.append((path, desc, source))
    return written


def readme(written: Sequence[tuple[Path, str, str]], results: Path, *, quick: bool = False) -> str:
    """The markdown of ``figures/README.md``: each image with its description and source JSON.

    Args:
        written: What :func:`draw_all` returned.
        results: The results folder the JSON files were read from.
        quick: Whether the quick results were drawn.

    Returns:
        The markdown text.
    """
    cmd = "python -m benchmarks.figures" + (" --quick" if quick else "")
    lines = [
        f"# Benchmark figures{' (quick runs)' if quick else ''}",
        "",
        f"Drawn by `{cmd}` from the JSON results in `{_shown(results)}/` (it never runs a benchmark; "
        f"`make bench{'-quick' if quick else ''}` produces the JSON files). Regenerate after a benchmark run.",
        "",
    ]
    lines += [f"- [`{p.name}`]({p.name}): {desc} Source: `{source}`." for p, desc, source in written]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Draw the benchmark figures; print the files written.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        0 when at least one figure was written, 2 when none could be drawn.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder with the benchmark JSON files "
                        "(default: results/benchmarks)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG files (default: <results>/figures)")
    parser.add_argument("--quick", action="store_true", help="draw the *_quick.json results of `make bench-quick`")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else args.results / "figures"
    written = draw_all(args.results, out, quick=args.quick)
    if not written:
        wanted = ", ".join(dict.fromkeys(_source(s, args.quick) for s in FIGURES))
        print(f"figures: no figure could be drawn: none of {wanted} in {args.results} holds usable data. "
              f"Produce them with `make bench{'-quick' if args.quick else ''}` "
              f"(python -m benchmarks.run{' --quick' if args.quick else ''}) first.", file=sys.stderr)
        return 2
    doc = out / f"README{'_quick' if args.quick else ''}.md"
    doc.write_text(readme(written, args.results, quick=args.quick))
    for path, _, _ in written:
        print(path)
    print(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
