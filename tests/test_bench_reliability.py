"""The reliability soak's orchestrator: cells are checkpointed one by one, a crashed cell is recorded and runs again
on ``--resume``, split parts merge into one file, and the headline sums the cells with exactly the issue's keys.

The cells here are fakes (the real ones kill processes and fill disks for an hour); the part modules' own quick
forms are exercised by ``python -m benchmarks.bench_reliability --quick``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _common
from benchmarks import bench_reliability as br
from benchmarks._reliability import CellResult

HEADLINE_KEYS = {"kill_cycles", "postgres_workers", "server_restarts", "fuzzed_inputs", "lost_trials",
                 "duplicate_trials", "unhandled_exceptions", "suite_runs_under_load", "suite_failures_under_load"}


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Four fake cells; ``state["crash"]`` names a cell that raises (a harness error)."""
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setattr(br.sys, "argv", ["bench_reliability"])  # no --quick: the full file name
    state: dict[str, Any] = {"ran": [], "crash": None}

    def cell(name: str, work: Path, seed: int, log: Any, quick: bool = False) -> CellResult:
        assert work.is_dir() and not any(work.iterdir())
        state["ran"].append(name)
        if name == state["crash"]:
            raise RuntimeError("harness broke")
        if name.startswith("kill"):
            return CellResult(kill_cycles=60, server_restarts=2 if "pg" in name else 0,
                              postgres_workers=4 if "pg" in name else 0)
        if name.startswith("fuzz"):
            return CellResult(fuzzed_inputs=700, unhandled_exceptions=1, failures=["input X gave a traceback"])
        return CellResult(details={"runs": 1, "failed": 0})

    table = {n: ("fake", cell) for n in ("kill|sqlite", "kill|pg", "fuzz|config", "suite|1")}
    monkeypatch.setattr(br, "cell_table", lambda quick: table)
    state["json"] = tmp_path / "reliability.json"
    return state


def test_cells_are_checkpointed_and_summed_into_the_headline(fake: dict[str, Any]) -> None:
    assert br.main(["--quiet"]) == 1  # the fuzz cell found a violation
    raw = json.loads(fake["json"].read_text())
    assert set(raw["headline"]) == HEADLINE_KEYS
    h = raw["headline"]
    assert (h["kill_cycles"], h["postgres_workers"], h["server_restarts"], h["fuzzed_inputs"]) == (120, 4, 2, 700)
    assert (h["unhandled_exceptions"], h["suite_runs_under_load"], h["suite_failures_under_load"]) == (1, 1, 0)
    md = fake["json"].with_suffix(".md").read_text()
    assert "4 of 4 cells done" in md and "input X gave a traceback" in md and "- command:" in md


def test_a_crashed_cell_is_recorded_and_runs_again_on_resume(fake: dict[str, Any]) -> None:
    fake["crash"] = "kill|pg"
    br.main(["--quiet"])
    raw = json.loads(fake["json"].read_text())
    assert "kill|pg" in raw["errors"] and "kill|pg" not in raw["cells"] and len(raw["cells"]) == 3
    assert br.main(["--quiet"]) == 2  # finished cells are never overwritten without --resume
    fake["crash"], fake["ran"] = None, []
    br.main(["--quiet", "--resume"])
    assert fake["ran"] == ["kill|pg"]
    raw = json.loads(fake["json"].read_text())
    assert not raw["errors"] and len(raw["cells"]) == 4


def test_split_parts_merge_into_one_record(fake: dict[str, Any]) -> None:
    br.main(["--quiet", "--part", "1/2"])
    assert fake["ran"] == ["kill|sqlite", "fuzz|config"]
    br.main(["--quiet", "--part", "2/2", "--resume"])
    assert fake["ran"][2:] == ["kill|pg", "suite|1"]
    raw = json.loads(fake["json"].read_text())
    assert len(raw["cells"]) == 4 and raw["headline"]["kill_cycles"] == 120


def test_bad_arguments_are_user_errors(fake: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert br.main(["--only", "nothing"]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="hint"):
        br.main(["--part", "3/2"])
