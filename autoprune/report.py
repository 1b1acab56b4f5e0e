"""Campaign reports: pandas tables and matplotlib figures (Agg backend) from a campaign's trial store.

Input is the trial table of :meth:`autoprune.store.TrialStore.to_dataframe` (one row per trial) and the
campaign's ``space.json`` (groups, layers, dense cost and accuracy, budget; written by
:mod:`autoprune.campaign`). Nothing here builds models or touches data: the campaign directory is read through
:mod:`autoprune.provenance`, never :mod:`autoprune.campaign` (which imports this module).

* :func:`leaderboard` — per agent, mean ± std over seeds of the best reward, the best validation accuracy
  within the budget, and the candidates and seconds it took to reach the reference (uniform) baseline's
  accuracy.
* :func:`write_report` — ``report/`` with ``trials.csv``, ``summary.md``, ``leaderboard.{csv,md}``,
  ``pareto.csv`` and three figures: ``pareto.png`` (accuracy vs MACs and vs size), ``best_so_far.png``
  (best-so-far accuracy per agent, mean and range over seeds) and ``widths.png`` (per-group widths — and bits
  — of each agent's best candidate against the original).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from autoprune.errors import ConfigError
from autoprune.provenance import SPACE_FILE, load_resolved, open_store
from autoprune.store import COUNTED_STATES
from autoprune.types import COST_METRICS
from autoprune.utils import prepare_out_dir

REPORT_DIR = "report"
LEADERBOARD_COLUMNS = {
    "agent": "agent",
    "seeds": "seeds",
    "trials": "trials",
    "best_reward": "best reward",
    "best_accuracy": "best val acc (in budget)",
    "best_macs": "MACs of best",
    "to_baseline_candidates": "candidates to baseline",
    "to_baseline_seconds": "seconds to baseline",
    "reached": "reached baseline",
    "seconds": "search seconds",
}
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#7f7f7f")


# ---------------------------------------------------------------------------------------------------------
# Tables


def counted(df: pd.DataFrame) -> pd.DataFrame:
    """Trials that count towards a searcher's budget, ordered by study and trial number."""
    if df.empty:
        return df
    out = df[df["state"].isin(COUNTED_STATES)]
    return out.sort_values(["searcher", "seed", "number"]).reset_index(drop=True)


def evaluated(df: pd.DataFrame) -> pd.DataFrame:
    """Completed, feasible trials with an accuracy (the candidates a user could pick)."""
    if df.empty:
        return df
    ok = (df["state"] == "complete") & df["accuracy"].notna() & (df["feasible"].astype(object) != False)  # noqa: E712
    return df[ok]


def reference_accuracy(df: pd.DataFrame, reference: str = "uniform") -> float | None:
    """Best accuracy of the reference searcher over its studies (``None`` if it has none)."""
    ev = evaluated(df)
    ref = ev[ev["searcher"] == reference] if not ev.empty else ev
    return None if ref.empty else float(ref["accuracy"].max())


def run_stats(df: pd.DataFrame, reference_acc: float | None) -> pd.DataFrame:
    """One row per (searcher, seed): trials, best reward/accuracy/MACs, seconds, and the effort to reach
    ``reference_acc`` (1-based candidate index and cumulative trial seconds; NaN if never reached)."""
    rows = []
    for (searcher, seed), g in counted(df).groupby(["searcher", "seed"], sort=True):
        g = g.reset_index(drop=True)
        ev = evaluated(g)
        seconds = g["seconds"].fillna(0.0).astype(float)
        row: dict[str, Any] = {"agent": searcher, "seed": int(seed), "trials": len(g),
                               "seconds": float(seconds.sum()), "best_reward": math.nan,
                               "best_accuracy": math.nan, "best_macs": math.nan,
                               "to_baseline_candidates": math.nan, "to_baseline_seconds": math.nan}
        if not ev.empty:
            rewards = ev["reward"].astype(float)
            row["best_reward"] = float(rewards.max())
            best = ev.loc[ev["accuracy"].astype(float).idxmax()]
            row["best_accuracy"] = float(best["accuracy"])
            row["best_macs"] = float(best["macs"])
            if reference_acc is not None:
                hit = ev[ev["accuracy"].astype(float) >= reference_acc - 1e-12]
                if not hit.empty:
                    idx = int(hit.index[0])
                    row["to_baseline_candidates"] = idx + 1
                    row["to_baseline_seconds"] = float(seconds.iloc[: idx + 1].sum())
        rows.append(row)
    return pd.DataFrame(rows, columns=["agent", "seed", "trials", "seconds", "best_reward", "best_accuracy",
                                       "best_macs", "to_baseline_candidates", "to_baseline_seconds"])


def leaderboard(df: pd.DataFrame, *, agents: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                reference: str = "uniform") -> pd.DataFrame:
    """Agents ranked by best validation accuracy within the budget (mean over seeds), with ± std columns.

    Args:
        df: The trial table (:meth:`~autoprune.store.TrialStore.to_dataframe`).
        agents: Agents to rank (default: every searcher in ``df``).
        seeds: Seeds to include (default: all).
        reference: Searcher whose best accuracy is the baseline to reach.

    Returns:
        One row per agent: ``agent``, ``seeds``, ``reached`` (seeds that reached the baseline), and
        ``<metric>_mean`` / ``<metric>_std`` for ``trials``, ``seconds``, ``best_reward``, ``best_accuracy``,
        ``best_macs``, ``to_baseline_candidates``, ``to_baseline_seconds`` (std is NaN for one seed).
        ``attrs["reference_accuracy"]`` holds the baseline accuracy.
    """
    ref_acc = reference_accuracy(df, reference)
    stats = run_stats(df, ref_acc)
    if agents is not None:
        stats = stats[stats["agent"].isin(list(agents))]
    if seeds is not None:
        stats = stats[stats["seed"].isin(list(seeds))]
    metrics = ["trials", "seconds", "best_reward", "best_accuracy", "best_macs", "to_baseline_candidates",
               "to_baseline_seconds"]
    rows = []
    for agent, g in stats.groupby("agent", sort=False):
        row: dict[str, Any] = {"agent": agent, "seeds": len(g),
                               "reached": int(g["to_baseline_candidates"].notna().sum())}
        for m in metrics:
            vals = g[m].astype(float).dropna()
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        rows.append(row)
    cols = ["agent", "seeds", "reached"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    board = pd.DataFrame(rows, columns=cols)
    if not board.empty:
        board = board.sort_values(["best_accuracy_mean", "best_reward_mean"], ascending=False, na_position="last")
        board = board.reset_index(drop=True)
    board.attrs["reference"] = reference
    board.attrs["reference_accuracy"] = ref_acc
    return board


def _pm(mean: float, std: float, fmt: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = format(mean, fmt)
    return text if std is None or math.isnan(std) else f"{text} ± {format(std, fmt)}"


def format_leaderboard(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as display strings (``mean ± std``), with readable column names."""
    rows = []
    for _, r in board.iterrows():
        rows.append({
            LEADERBOARD_COLUMNS["agent"]: r["agent"],
            LEADERBOARD_COLUMNS["seeds"]: int(r["seeds"]),
            LEADERBOARD_COLUMNS["trials"]: _pm(r["trials_mean"], r["trials_std"], ".0f"),
            LEADERBOARD_COLUMNS["best_reward"]: _pm(r["best_reward_mean"], r["best_reward_std"], ".4f"),
            LEADERBOARD_COLUMNS["best_accuracy"]: _pm(r["best_accuracy_mean"], r["best_accuracy_std"], ".4f"),
            LEADERBOARD_COLUMNS["best_macs"]: _pm(r["best_macs_mean"], r["best_macs_std"], ",.0f"),
            LEADERBOARD_COLUMNS["to_baseline_candidates"]: _pm(r["to_baseline_candidates_mean"],
                                                               r["to_baseline_candidates_std"], ".1f"),
            LEADERBOARD_COLUMNS["to_baseline_seconds"]: _pm(r["to_baseline_seconds_mean"],
                                                            r["to_baseline_seconds_std"], ".1f"),
            LEADERBOARD_COLUMNS["reached"]: f"{int(r['reached'])}/{int(r['seeds'])}",
            LEADERBOARD_COLUMNS["seconds"]: _pm(r["seconds_mean"], r["seconds_std"], ".1f"),
        })
    return pd.DataFrame(rows, columns=list(LEADERBOARD_COLUMNS.values()))


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (cells rendered with ``str``; ``|`` escaped)."""
    def cell(v: Any) -> str:
        if isinstance(v, float) and math.isnan(v):
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(cell(v) for v in row.tolist()) + " |")
    return "\n".join(lines) + "\n"


def leaderboard_markdown(board: pd.DataFrame) -> str:
    """The leaderboard table plus a line naming the baseline accuracy."""
    ref, acc = board.attrs.get("reference", "uniform"), board.attrs.get("reference_accuracy")
    note = (f"Baseline: `{ref}` reaches val accuracy {acc:.4f}; \"to baseline\" = candidates evaluated and "
            "cumulative trial seconds until an agent first matches it. Mean ± std over seeds.\n"
            if acc is not None else f"Baseline `{ref}` has no evaluated candidate.\n")
    return to_markdown(format_leaderboard(board)) + "\n" + note


def write_leaderboard(board: pd.DataFrame, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``leaderboard.csv`` (numbers) and ``leaderboard.md`` (display) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / "leaderboard.csv", out / "leaderboard.md"
    board.to_csv(csv, index=False)
    md.write_text(leaderboard_markdown(board), encoding="utf-8")
    return csv, md


def pareto_front(df: pd.DataFrame, cost: str = "macs", score: str = "accuracy") -> pd.DataFrame:
    """Rows of ``df`` not dominated in (lower ``cost``, higher ``score``), sorted by ``cost``."""
    if df.empty:
        return df
    d = df.sort_values([cost, score], ascending=[True, False])
    keep, best = [], -math.inf
    for idx, s in zip(d.index, d[score].astype(float), strict=True):
        if s > best:
            keep.append(idx)
            best = s
    return d.loc[keep]


def best_per_agent(df: pd.DataFrame) -> pd.DataFrame:
    """Each searcher's best evaluated trial (highest reward, then accuracy), over all its seeds."""
    ev = evaluated(df)
    if ev.empty:
        return ev
    ev = ev.assign(_r=ev["reward"].astype(float).fillna(-math.inf), _a=ev["accuracy"].astype(float))
    ev = ev.sort_values(["_r", "_a", "number"], ascending=[False, False, True])
    return ev.groupby("searcher", sort=True).head(1).drop(columns=["_r", "_a"]).reset_index(drop=True)


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per study: counted trials by state and the best trial (reward, accuracy, MACs, params, bytes)."""
    rows = []
    for study, g in df.groupby("study", sort=True):
        ev = evaluated(g)
        row: dict[str, Any] = {"study": study, "trials": int(g["state"].isin(COUNTED_STATES).sum())}
        for st in ("complete", "infeasible", "pruned", "failed", "interrupted"):
            row[st] = int((g["state"] == st).sum())
        if not ev.empty:
            b = ev.loc[ev["reward"].astype(float).idxmax()]
            row.update(best_trial=int(b["number"]), reward=float(b["reward"]), accuracy=float(b["accuracy"]),
                       macs=int(b["macs"]), params=int(b["params"]), bytes=int(b["bytes"]))
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------
# Figures


def _colors(agents: Sequence[str]) -> dict[str, str]:
    return {a: _PALETTE[i % len(_PALETTE)] for i, a in enumerate(sorted(agents))}


def _budget_fraction(space: Mapping[str, Any], metric: str, dense_value: float) -> float | None:
    limit = (space.get("budget") or {}).get(metric)
    if limit is None or not dense_value:
        return None
    return float(limit) if float(limit) <= 1 else float(limit) / dense_value


def plot_pareto(df: pd.DataFrame, space: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Accuracy vs MACs and vs size (percent of the dense model) of every candidate, with the Pareto front."""
    dense = space.get("dense") or {}
    ev = evaluated(df)
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    colors = _colors(df["searcher"].dropna().unique().tolist())
    for ax, (metric, label) in zip(axes, (("macs", "MACs"), ("size_bytes", "size")), strict=True):
        attr = COST_METRICS[metric]  # the trial table's cost columns are named like CostReport's attributes
        full = float(dense.get(attr) or 0) or float(df[attr].max() or 1)
        for agent, g in ev.groupby("searcher", sort=True):
            ax.scatter(100 * g[attr].astype(float) / full, 100 * g["accuracy"].astype(float), s=18, alpha=0.7,
                       color=colors[agent], label=agent, edgecolors="none")
        front = pareto_front(ev, cost=attr)
        if not front.empty:
            ax.step(100 * front[attr].astype(float) / full, 100 * front["accuracy"].astype(float), where="post",
                    color="black", lw=1.2, label="Pareto front")
        if dense.get("accuracy") is not None:
            ax.scatter([100.0], [100 * float(dense["accuracy"])], marker="*", s=160, color="gold",
                       edgecolors="black", zorder=5, label="original")
        frac = _budget_fraction(space, metric, full)
        if frac is not None:
            ax.axvline(100 * frac, color="gray", ls="--", lw=1, label=f"budget ({100 * frac:.0f} %)")
        ax.set_xlabel(f"{label} (% of the original: {full:,.0f}{' bytes' if attr == 'bytes' else ''})")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{space.get('campaign', '')}: {space.get('model', '')} on {space.get('dataset', '')} — "
                 f"{len(ev)} evaluated candidates")
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out


def best_so_far(df: pd.DataFrame) -> pd.DataFrame:
    """Per (searcher, seed) and candidate index (1-based): the best accuracy within budget so far."""
    rows = []
    for (agent, seed), g in counted(df).groupby(["searcher", "seed"], sort=True):
        best = math.nan
        ok = evaluated(g)
        for i, idx in enumerate(g.index, start=1):
            if idx in ok.index:
                acc = float(ok.at[idx, "accuracy"])
                best = acc if math.isnan(best) else max(best, acc)
            rows.append({"agent": agent, "seed": int(seed), "candidate": i, "best_accuracy": best})
    return pd.DataFrame(rows, columns=["agent", "seed", "candidate", "best_accuracy"])


def plot_best_so_far(df: pd.DataFrame, path: str | os.PathLike[str], reference_acc: float | None = None,
                     dense_acc: float | None = None) -> Path:
    """Best-so-far validation accuracy (within budget) against candidates evaluated: mean and range over seeds."""
    curves = best_so_far(df)
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    colors = _colors(curves["agent"].unique().tolist())
    for agent, g in curves.groupby("agent", sort=True):
        wide = g.pivot_table(index="candidate", columns="seed", values="best_accuracy").sort_index()
        mean, lo, hi = wide.mean(axis=1), wide.min(axis=1), wide.max(axis=1)
        x = wide.index.to_numpy()
        if len(x) == 1:
            ax.scatter(x, 100 * mean, color=colors[agent], s=40, zorder=3,
                       label=f"{agent} ({wide.shape[1]} seed{'s' if wide.shape[1] > 1 else ''})")
            continue
        ax.plot(x, 100 * mean, color=colors[agent], lw=1.8,
                label=f"{agent} ({wide.shape[1]} seed{'s' if wide.shape[1] > 1 else ''})")
        if wide.shape[1] > 1:
            ax.fill_between(x, 100 * lo, 100 * hi, color=colors[agent], alpha=0.15)
    if reference_acc is not None:
        ax.axhline(100 * reference_acc, color="gray", ls="--", lw=1,
                   label=f"uniform baseline ({100 * reference_acc:.2f} %)")
    if dense_acc is not None:
        ax.axhline(100 * dense_acc, color="goldenrod", ls=":", lw=1.2, label=f"original ({100 * dense_acc:.2f} %)")
    ax.set_xlabel("candidates evaluated")
    ax.set_ylabel("best validation accuracy within budget (%)")
    ax.set_title("best so far per agent (line: mean over seeds, band: min–max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out


def _short(name: str, limit: int = 18) -> str:
    name = name.removesuffix(":out")
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def plot_widths(df: pd.DataFrame, space: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Per-group widths (and per-layer weight bits) of each agent's best candidate against the original."""
    best = best_per_agent(df)
    groups = list(space.get("groups") or [])
    layers = [lc["layer"] for lc in space.get("layers") or []]
    has_bits = bool(layers) and any(bool(b) for b in best.get("bits", pd.Series(dtype=object)))
    n_agents = max(1, len(best))
    width = max(7.0, 0.32 * max(len(groups), len(layers)) * (n_agents + 1))
    fig = Figure(figsize=(min(width, 30.0), 7.5 if has_bits else 4.6), layout="constrained")
    axes = fig.subplots(2, 1) if has_bits else [fig.subplots()]
    colors = _colors(best["searcher"].tolist() if not best.empty else [])
    ax = axes[0]
    x = np.arange(len(groups))
    sizes = [int(g["size"]) for g in groups]
    ax.bar(x, sizes, width=0.9, color="#dddddd", edgecolor="#999999", label="original")
    step = 0.8 / n_agents
    for i, (_, row) in enumerate(best.iterrows()):
        widths = row["widths"] or {}
        kept = [int(widths.get(g["id"], g["size"])) for g in groups]
        ax.bar(x - 0.4 + step * (i + 0.5), kept, width=step, color=colors[row["searcher"]],
               label=f"{row['searcher']} #{int(row['number'])} (acc {float(row['accuracy']):.3f})")
    ax.set_xticks(x, [_short(g["id"]) for g in groups], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("channels kept")
    ax.set_title("per-group widths of each agent's best candidate vs the original")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if has_bits:
        ax = axes[1]
        xl = np.arange(len(layers))
        ax.axhline(32, color="#999999", lw=1, label="original (fp32)")
        for _, row in best.iterrows():
            bits = row["bits"] or {}
            wb = [(bits.get(name) or {}).get("w_bits") or 32 for name in layers]
            ax.plot(xl, wb, marker="o", ms=4, color=colors[row["searcher"]], label=row["searcher"])
        ax.set_yscale("log", base=2)
        ax.set_yticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
        ax.set_xticks(xl, [_short(n) for n in layers], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("weight bits")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out


# ---------------------------------------------------------------------------------------------------------
# The report


@dataclass
class ReportResult:
    """Paths written by :func:`write_report` and the leaderboard."""

    out_dir: Path
    tables: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    leaderboard: pd.DataFrame | None = None
    trials: int = 0


def read_space(campaign_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The campaign's ``space.json`` (empty if missing or unreadable)."""
    path = Path(campaign_dir) / SPACE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_report(campaign_dir: str | os.PathLike[str], *, df: pd.DataFrame | None = None,
                 out_dir: str | os.PathLike[str] | None = None, reference: str = "uniform") -> ReportResult:
    """Write the tables and figures of a campaign into ``<campaign_dir>/report`` (or ``out_dir``).

    Args:
        campaign_dir: The campaign directory (holds ``config.resolved.yaml`` and ``space.json``).
        df: The trial table; read from the campaign's store when omitted.
        out_dir: Where to write (default ``<campaign_dir>/report``).
        reference: Baseline searcher of the leaderboard.

    Raises:
        ConfigError: If the campaign has no finished trial yet.
    """
    if df is None:
        cfg = load_resolved(campaign_dir)
        df = open_store(cfg).to_dataframe()
    if df.empty or counted(df).empty:
        raise ConfigError(f"campaign {campaign_dir} has no finished trial yet",
                          hint="run `autoprune search CONFIG` (or compare) first")
    space = read_space(campaign_dir)
    out = prepare_out_dir(Path(out_dir) if out_dir is not None else Path(campaign_dir) / REPORT_DIR,
                          hint="pass --out <a writable directory> for the report")
    res = ReportResult(out_dir=out, trials=len(counted(df)))
    flat = df.drop(columns=["widths", "bits"]).assign(
        widths=df["widths"].map(lambda w: json.dumps(w, sort_keys=True) if w is not None else ""),
        bits=df["bits"].map(lambda b: json.dumps(b, sort_keys=True) if b else ""))
    res.tables["trials"] = out / "trials.csv"
    flat.to_csv(res.tables["trials"], index=False)
    summary = summary_table(df)
    res.tables["summary"] = out / "summary.md"
    res.tables["summary"].write_text(f"# {space.get('campaign', Path(campaign_dir).name)}: trials per study\n\n"
                                     + to_markdown(summary), encoding="utf-8")
    board = leaderboard(df, reference=reference)
    res.leaderboard = board
    res.tables["leaderboard_csv"], res.tables["leaderboard_md"] = write_leaderboard(board, out)
    front = pareto_front(evaluated(df))
    res.tables["pareto_csv"] = out / "pareto.csv"
    front.drop(columns=["widths", "bits"]).to_csv(res.tables["pareto_csv"], index=False)
    res.figures["pareto"] = plot_pareto(df, space, out / "pareto.png")
    dense_acc = (space.get("dense") or {}).get("accuracy")
    res.figures["best_so_far"] = plot_best_so_far(df, out / "best_so_far.png", board.attrs.get("reference_accuracy"),
                                                  dense_acc)
    res.figures["widths"] = plot_widths(df, space, out / "widths.png")
    return res
