"""Fault-injection suite (issue #11): faults inside trials, killed processes, storage failures, hostile input and
determinism. Every test is marked ``reliability``; the whole directory runs in the default CI path.

Shared helpers live here: a tiny campaign (``small_cnn`` width 8 on the offline digits, the ``adaptive_bn``
evaluator with 2 batches), the CLI command line, and a store checker that opens a SQLite store with Optuna and
SQLite's own integrity check.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from autoprune.store import COUNTED_STATES

optuna.logging.set_verbosity(optuna.logging.WARNING)


def config_dict(out: Path, **patch: Any) -> dict[str, Any]:
    """A small, fast campaign writing to ``out``; ``patch`` replaces top-level keys."""
    data: dict[str, Any] = {
        "name": "rel",
        "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "dataset": {"name": "digits", "batch_size": 32},
        "evaluator": {"name": "adaptive_bn", "kwargs": {"batches": 2}},
        "objective": {"budget": {"macs": 0.5}},
        "searcher": {"name": "random"},
        "n_trials": 5,
        "output_dir": str(out),
        "workers": {"heartbeat_seconds": 1, "stale_seconds": 60},
    }
    data.update(patch)
    return data


def write_config(path: Path, out: Path, **patch: Any) -> Path:
    """Write :func:`config_dict` as YAML to ``path``."""
    path.write_text(yaml.safe_dump(config_dict(out, **patch)))
    return path


def cli_env() -> dict[str, str]:
    env = {**os.environ, "AUTOPRUNE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("AUTOPRUNE_DATA", None)
    return env


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """``python -m autoprune.cli -q ARGS`` in a subprocess."""
    return subprocess.Popen([sys.executable, "-m", "autoprune.cli", "-q", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> tuple[int, str, str]:
    p = start(*args, cwd=cwd)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def sqlite_integrity(db: Path) -> str:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def check_study(db: Path, study_name: str, n_trials: int | None = None, *, killed: bool = False
                ) -> list[optuna.trial.FrozenTrial]:
    """Open the store with Optuna and check it: SQLite integrity, unique trial numbers, nothing left running
    (except, right after a kill, the killed process's own trial), every counted trial with its record, and
    (if given) exactly ``n_trials`` counted trials.

    Returns:
        The counted trials in trial order.
    """
    assert sqlite_integrity(db) == "ok"
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{db}")
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), "duplicate trial numbers"
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    assert len(running) <= int(killed), f"trials left running: {running}"
    counted = [t for t in trials if t.state.is_finished() and t.user_attrs.get("state") in COUNTED_STATES]
    for t in counted:
        assert t.user_attrs.get("key") and t.user_attrs.get("macs") is not None, t.number
    for t in trials:
        if t.state.is_finished() and t not in counted:
            assert t.user_attrs.get("state") == "interrupted", (t.number, t.user_attrs.get("state"))
    if n_trials is not None:
        assert len(counted) == n_trials, (len(counted), n_trials)
    return counted
