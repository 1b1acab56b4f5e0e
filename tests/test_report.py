"""Reports: leaderboard arithmetic on a hand-made trial table, Pareto/best-so-far helpers, and the figures and
tables written for a real (tiny) campaign, through the ``autoprune report`` command."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.image
import pandas as pd
import pytest
import torch

from autoprune import campaign, cli
from autoprune.config import config_from_dict
from autoprune.errors import ConfigError
from autoprune.report import (
    best_per_agent,
    best_so_far,
    leaderboard,
    leaderboard_markdown,
    pareto_front,
    plot_widths,
    run_stats,
    to_markdown,
    write_report,
)

COLUMNS = ["study", "number", "searcher", "seed", "state", "reason", "accuracy", "loss", "reward", "macs", "params",
           "bytes", "feasible", "seconds", "key", "widths", "bits", "values", "datetime_start", "datetime_complete"]


def trial(searcher: str, seed: int, number: int, state: str, acc: float | None = None, *, macs: int = 100,
          seconds: float = 1.0, feasible: bool | None = True, widths: dict[str, int] | None = None,
          bits: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"study": f"c/{searcher}/seed{seed}", "number": number, "searcher": searcher, "seed": seed,
            "state": state, "reason": "", "accuracy": acc, "loss": None,
            "reward": None if acc is None else acc - 1.0, "macs": macs, "params": macs // 2, "bytes": 4 * macs,
            "feasible": feasible, "seconds": seconds, "key": f"{searcher}{seed}{number}",
            "widths": widths or {"g0:out": 4, "g1:out": 8}, "bits": bits or {}, "values": None,
            "datetime_start": None, "datetime_complete": None}


@pytest.fixture
def table() -> pd.DataFrame:
    rows = [
        trial("uniform", 0, 0, "complete", 0.80, macs=50),
        trial("a", 0, 0, "complete", 0.70, seconds=1.0),
        trial("a", 0, 1, "infeasible", None, seconds=1.0, feasible=False),
        trial("a", 0, 2, "complete", 0.85, seconds=2.0, macs=90),
        trial("a", 0, 3, "complete", 0.75, seconds=5.0),
        trial("a", 1, 0, "complete", 0.81, seconds=3.0, macs=70),
        trial("a", 1, 1, "failed", None, seconds=0.5),
        trial("a", 1, 2, "interrupted", None, seconds=0.0),
        trial("b", 0, 0, "complete", 0.60, seconds=2.0),
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def test_run_stats_count_candidates_and_time_to_the_baseline(table: pd.DataFrame) -> None:
    stats = run_stats(table, 0.80).set_index(["agent", "seed"])
    a0, a1 = stats.loc[("a", 0)], stats.loc[("a", 1)]
    assert a0["trials"] == 4 and a1["trials"] == 2  # the interrupted trial does not count
    assert a0["best_accuracy"] == 0.85 and a0["best_macs"] == 90
    assert a0["to_baseline_candidates"] == 3 and a0["to_baseline_seconds"] == 4.0  # 1 + 1 (infeasible) + 2
    assert a1["to_baseline_candidates"] == 1 and a1["to_baseline_seconds"] == 3.0
    assert math.isnan(stats.loc[("b", 0)]["to_baseline_candidates"])


def test_leaderboard_means_stds_and_order(table: pd.DataFrame) -> None:
    board = leaderboard(table)
    assert list(board["agent"]) == ["a", "uniform", "b"]
    a = board.set_index("agent").loc["a"]
    assert a["seeds"] == 2 and a["reached"] == 2
    assert a["best_accuracy_mean"] == pytest.approx(0.83) and a["best_accuracy_std"] == pytest.approx(0.02 * 2**0.5)
    assert a["to_baseline_candidates_mean"] == 2 and a["to_baseline_candidates_std"] == pytest.approx(2**0.5)
    assert a["to_baseline_seconds_mean"] == 3.5 and a["trials_mean"] == 3
    assert board.attrs["reference_accuracy"] == 0.80
    b = board.set_index("agent").loc["b"]
    assert b["reached"] == 0 and math.isnan(b["best_accuracy_std"])
    md = leaderboard_markdown(board)
    assert "| a | 2 | 3 ± 1 | -0.1700 ± 0.0283 | 0.8300 ± 0.0283 |" in md
    assert "| b | 1 |" in md and "0/1" in md and "reaches val accuracy 0.8000" in md
    only = leaderboard(table, agents=["b"], seeds=[0])
    assert list(only["agent"]) == ["b"]


def test_pareto_front_and_best_so_far() -> None:
    pts = pd.DataFrame({"macs": [10, 20, 15, 30, 40], "accuracy": [0.5, 0.7, 0.4, 0.65, 0.9]})
    front = pareto_front(pts)
    assert list(zip(front["macs"], front["accuracy"], strict=True)) == [(10, 0.5), (20, 0.7), (40, 0.9)]
    rows = [trial("a", 0, 0, "infeasible", None, feasible=False), trial("a", 0, 1, "complete", 0.5),
            trial("a", 0, 2, "complete", 0.4), trial("a", 0, 3, "complete", 0.6)]
    curve = best_so_far(pd.DataFrame(rows, columns=COLUMNS))
    assert math.isnan(curve["best_accuracy"].iloc[0])
    assert list(curve["best_accuracy"].iloc[1:]) == [0.5, 0.5, 0.6]
    assert list(curve["candidate"]) == [1, 2, 3, 4]


def test_markdown_escapes_cells() -> None:
    md = to_markdown(pd.DataFrame({"x": ["a|b"], "y": [float("nan")], "z": [0.123456]}))
    assert md.splitlines() == ["| x | y | z |", "|---|---|---|", "| a\\|b | – | 0.1235 |"]


def _png_shape(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path).shape


def test_widths_figure_shows_bits_of_quantized_candidates(tmp_path: Path) -> None:
    bits = {"conv1": {"w_bits": 8, "a_bits": None}, "conv2": {"w_bits": 3, "a_bits": 8}}
    df = pd.DataFrame([trial("a", 0, 0, "complete", 0.7, bits=bits), trial("b", 0, 0, "complete", 0.6)],
                      columns=COLUMNS)
    space = {"groups": [{"id": "g0:out", "size": 8}, {"id": "g1:out", "size": 16}],
             "layers": [{"layer": "conv1"}, {"layer": "conv2"}]}
    assert set(best_per_agent(df)["searcher"]) == {"a", "b"}
    h, w, _ = _png_shape(plot_widths(df, space, tmp_path / "w.png"))
    h2, _, _ = _png_shape(plot_widths(df.assign(bits=[{}, {}]), space, tmp_path / "w2.png"))
    assert h > h2 and w >= 800  # a second panel with the bits


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("rep") / "camp"
    cfg = config_from_dict({
        "name": "rep", "output_dir": str(out), "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "dataset": {"name": "digits", "batch_size": 64}, "n_trials": 3,
        "evaluator": {"name": "adaptive_bn", "kwargs": {"batches": 2}}, "objective": {"budget": {"macs": 0.5}},
        "searcher": {"name": "random", "agent_kwargs": {"tpe": {"n_startup_trials": 2}}}})
    camp, store = campaign.open_campaign(cfg)
    campaign.compare(camp, store, ["random", "tpe"], [0], quiet=True)
    return out


def test_report_command_writes_tables_and_readable_figures(campaign_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(campaign_dir)]) == 0
    out = capsys.readouterr().out
    rep = campaign_dir / "report"
    for name in ("pareto.png", "best_so_far.png", "widths.png", "trials.csv", "summary.md", "leaderboard.csv",
                 "leaderboard.md", "pareto.csv"):
        assert (rep / name).is_file(), name
        assert str(rep / name) in out
    for fig in ("pareto.png", "best_so_far.png", "widths.png"):
        h, w, _ = _png_shape(rep / fig)
        assert h >= 400 and w >= 700
    trials = pd.read_csv(rep / "trials.csv")
    assert len(trials) == 7 and set(trials["searcher"]) == {"random", "tpe", "uniform"}
    board = pd.read_csv(rep / "leaderboard.csv")
    assert set(board["agent"]) == {"random", "tpe", "uniform"}
    assert "| agent |" in (rep / "leaderboard.md").read_text() and "| agent |" in out
    summary = (rep / "summary.md").read_text()
    assert "rep/tpe/seed0" in summary and "best_trial" in summary


def test_report_of_an_empty_campaign_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no finished trial"):
        write_report(tmp_path, df=pd.DataFrame(columns=COLUMNS))
    with pytest.raises(ConfigError, match="holds no campaign"):
        write_report(tmp_path)
