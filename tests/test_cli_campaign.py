"""Campaign commands end to end, in subprocesses: bad input, SIGKILL/SIGINT and resume, workers sharing a study.

The campaign is ``small_cnn`` (width 8) on the offline digits; the evaluator fine-tunes for a few dozen steps so
that a trial lasts long enough to be interrupted in the middle.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml

from autoprune import campaign, cli, provenance
from autoprune.config import load_config
from autoprune.errors import EXIT_USER_ERROR
from autoprune.store import COUNTED_STATES, TrialStore
from autoprune.workers import WORKER_ATTR

REPO = Path(__file__).resolve().parents[1]
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def write_config(path: Path, **patch: Any) -> Path:
    data: dict[str, Any] = {
        "name": "clitest",
        "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "dataset": {"name": "digits", "batch_size": 32},
        "evaluator": {"name": "finetune", "kwargs": {"steps": 30, "report_every": 30, "lr": 0.01}},
        "objective": {"budget": {"macs": 0.5}},
        "searcher": {"name": "random"},
        "n_trials": 5,
        "output_dir": str(path.parent / "results"),
        "workers": {"heartbeat_seconds": 1, "stale_seconds": 30},
    }
    data.update(patch)
    path.write_text(yaml.safe_dump(data))
    return path


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "autoprune.cli", *args]


def cli_env() -> dict[str, str]:
    env = {**os.environ, "AUTOPRUNE_THREADS": "1"}
    env.pop("AUTOPRUNE_DATA", None)
    return env


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(cli_command(*args), cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str], timeout: float = 400) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def sqlite_states(db: Path) -> list[tuple[int, str, str | None]]:
    """(number, optuna state, autoprune state) of every trial, read directly from the SQLite file."""
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT t.number, t.state, (SELECT value_json FROM trial_user_attributes a "
                           "WHERE a.trial_id = t.trial_id AND a.key = 'state') FROM trials t ORDER BY t.number"
                           ).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        con.close()
    return [(n, s, None if v is None else v.strip('"')) for n, s, v in rows]


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the search")


def mid_trial(db: Path, complete: int) -> Callable[[], bool]:
    """True once ``complete`` trials are finished and the next one is running (its evaluation under way)."""
    def cond() -> bool:
        rows = sqlite_states(db)
        return sum(s == "COMPLETE" for _, s, _ in rows) >= complete and any(s == "RUNNING" for _, s, _ in rows)
    return cond


def counted_keys(store: TrialStore, searcher: str = "random", seed: int = 0) -> list[str]:
    df = store.to_dataframe(searcher, seed)
    return df[df["state"].isin(COUNTED_STATES)].sort_values("number")["key"].tolist()


def expected_keys(config: Path, n: int, tmp: Path) -> list[str]:
    """The uninterrupted sequence, computed in process (``random`` proposals do not depend on the scores, so the
    cheap ``plain`` evaluator gives the same candidates)."""
    cfg = load_config(config, ["evaluator.name=plain", "evaluator.kwargs={}", f"output_dir={tmp / 'ref'}"])
    camp = campaign.build_campaign(cfg, measure_dense=False)
    store = TrialStore(tmp / "ref.db", campaign=cfg.name)
    campaign.run_search(camp, store, n_trials=n, quiet=True)
    return counted_keys(store)


# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def existing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A campaign with 2 stored trials (what every bad-input command must leave alone)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("existing")
    config = write_config(root / "c.yaml", n_trials=2, evaluator={"name": "adaptive_bn", "kwargs": {"batches": 2}})
    camp, store = campaign.open_campaign(load_config(config), argv=["search", str(config)])
    campaign.run_search(camp, store, quiet=True)
    return config, root / "results"


def test_bad_input_exits_2_with_a_clear_message_and_keeps_the_stored_trials(
        existing: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    config, out = existing
    root = config.parent
    (root / "bad.yaml").write_text("name: x\nmodel: {name: [unclosed\n")
    (root / "blocker").write_text("a file, not a directory")
    resolved = (out / provenance.CONFIG_FILE).read_text()
    in_subprocess = {  # run in parallel: faster
        "malformed": (["search", "bad.yaml"], "bad.yaml: malformed YAML at line"),
        "budget": (["search", "c.yaml", "objective.budget.macs=0.001"], "the smallest achievable is"),
        "storage": (["worker", "c.yaml", "storage=postgresql://nobody@127.0.0.1:1/none"],
                    "cannot open the trial store"),
    }
    procs = {name: start(*args, cwd=root) for name, (args, _) in in_subprocess.items()}
    results = {name: finish(proc) for name, proc in procs.items()}
    in_process = {  # the same entry point (autoprune.cli.main), without paying for a fresh interpreter
        "unknown key": (["search", "c.yaml", "serchr.name=tpe"], "serchr: unknown key. Did you mean 'searcher'?"),
        "checkpoint": (["search", "c.yaml", "model.checkpoint=missing.pt"], "missing.pt' does not exist"),
        "output dir": (["search", "c.yaml", f"output_dir={root / 'blocker' / 'sub'}"],
                       "cannot create the output directory"),
    }
    monkeypatch.chdir(root)
    for name, (args, _) in in_process.items():
        code = cli.main(["-q", *args])
        captured = capsys.readouterr()
        results[name] = (code, captured.out, captured.err)
    for name, (code, stdout, stderr) in results.items():
        expected = {**in_subprocess, **in_process}[name][1]
        assert code == EXIT_USER_ERROR, (name, stdout, stderr)
        assert expected in stderr, (name, stderr)
        assert "error:" in stderr and "hint:" in stderr and "Traceback" not in stderr, (name, stderr)
    store = provenance.open_store(load_config(config))
    assert len(store.to_dataframe()) == 2 and set(store.to_dataframe()["state"]) == {"complete"}
    assert (out / provenance.CONFIG_FILE).read_text() == resolved


def test_sigkill_and_sigint_then_resume_give_the_uninterrupted_trials(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", n_trials=4)
    db = tmp_path / "results" / "trials.db"

    p = start("search", "c.yaml", cwd=tmp_path)
    wait_for(mid_trial(db, 1), p)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL

    p = start("search", "c.yaml", cwd=tmp_path)
    wait_for(mid_trial(db, 2), p)
    p.send_signal(signal.SIGINT)
    code, out, err = finish(p)
    assert code == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err

    code, out, err = finish(start("search", "c.yaml", cwd=tmp_path))
    assert code == 0, (out, err)
    assert "random seed0: 4 trials (n_trials)" in out

    store = TrialStore(db, campaign="clitest")
    df = store.to_dataframe()
    reasons = df.loc[df["state"] == "interrupted", "reason"].tolist()
    assert any("killed" in r for r in reasons) and any("KeyboardInterrupt" in r for r in reasons)
    assert not any(s == "RUNNING" for _, s, _ in sqlite_states(db))
    keys = counted_keys(store)
    assert len(keys) == 4 and len(set(keys)) == 4
    assert keys == expected_keys(config, 4, tmp_path)
    assert "autoprune search c.yaml" in (tmp_path / "results" / provenance.COMMAND_FILE).read_text()


def _check_shared_study(store: TrialStore, n: int, pids: set[int]) -> None:
    study = optuna.load_study(study_name=store.study_name("random", 0), storage=store.storage)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    counted = [t for t in trials if t.user_attrs.get("state") in COUNTED_STATES]
    assert len(counted) == n  # exactly n_trials: none lost, none beyond
    assert all(t.user_attrs.get("key") and t.user_attrs.get("accuracy") is not None for t in counted)
    owners = {t.user_attrs[WORKER_ATTR]["pid"] for t in counted}
    assert owners <= pids and len(owners) == 2, owners  # both processes contributed


def _owns_a_trial(store: TrialStore, pid: int) -> Callable[[], bool]:
    """True once a trial of the shared study carries ``pid`` as its worker (the process has claimed work)."""
    def cond() -> bool:
        try:
            study = optuna.load_study(study_name=store.study_name("random", 0), storage=store.storage)
        except KeyError:  # the study is not created yet
            return False
        return any((t.user_attrs.get(WORKER_ATTR) or {}).get("pid") == pid for t in study.get_trials(deepcopy=False))
    return cond


def _sqlite_unlocked(db: Path) -> bool:
    """True when no process holds a write lock on the SQLite file (a paused one must not block the others)."""
    con = sqlite3.connect(str(db), timeout=0)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.rollback()
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        con.close()


def _run_two_workers(tmp_path: Path, store: TrialStore, db: Path | None = None) -> tuple[int, int]:
    """``search`` and ``worker`` on one study, each made to claim a trial whatever the machine's load.

    The first process is paused (SIGSTOP) in the middle of its first trial, outside any write to the store, until
    the worker has claimed a trial of its own; both then run to the end. Without the pause a fast first process
    may finish every trial before the second one has imported torch.
    """
    a = start("search", "c.yaml", cwd=tmp_path)
    b: subprocess.Popen[str] | None = None
    try:
        wait_for(_owns_a_trial(store, a.pid), a)
        while True:
            a.send_signal(signal.SIGSTOP)
            if db is None or _sqlite_unlocked(db):
                break
            a.send_signal(signal.SIGCONT)  # stopped inside a write: let it finish, then pause again
            time.sleep(0.05)
        b = start("worker", "c.yaml", cwd=tmp_path)
        wait_for(_owns_a_trial(store, b.pid), b)
    except BaseException:
        for p in (a, b):
            if p is not None:
                p.kill()
        raise
    finally:
        a.send_signal(signal.SIGCONT)
    (ca, oa, ea), (cb, ob, eb) = finish(a), finish(b)
    assert ca == 0 and cb == 0, (oa, ea, ob, eb)
    assert "worker joined study" in ob, ob
    return a.pid, b.pid


def test_two_workers_share_one_sqlite_study(tmp_path: Path) -> None:
    # stale_seconds well above any pause: the paused process's trial must stay its own, not be proposed again
    write_config(tmp_path / "c.yaml", n_trials=8, workers={"heartbeat_seconds": 1, "stale_seconds": 900})
    db = tmp_path / "results" / "trials.db"
    store = TrialStore(db, campaign="clitest")
    pids = _run_two_workers(tmp_path, store, db)
    _check_shared_study(store, 8, set(pids))


@pytest.mark.postgres
@pytest.mark.slow  # the SQLite test above covers the same code path in the default suite
def test_two_workers_share_one_postgres_study(tmp_path: Path) -> None:
    try:
        import psycopg2

        psycopg2.connect(POSTGRES, connect_timeout=3).close()
    except Exception as exc:  # ImportError, OperationalError
        pytest.skip(f"PostgreSQL at {POSTGRES} does not answer ({type(exc).__name__}: {exc})".strip())
    name = f"clitest-{uuid.uuid4().hex[:8]}"
    write_config(tmp_path / "c.yaml", n_trials=6, name=name, storage=POSTGRES,
                 workers={"heartbeat_seconds": 1, "stale_seconds": 900})
    store = TrialStore(POSTGRES, campaign=name)
    try:
        pids = _run_two_workers(tmp_path, store)
        _check_shared_study(store, 6, set(pids))
    finally:
        store.delete()
    assert store.study_names() == []


def test_compare_command_saves_and_prints_the_leaderboard(existing: tuple[Path, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    config, out = existing
    code = cli.main(["-q", "compare", str(config), "--agents", "random,tpe", "--seeds", "2", "n_trials=2",
                     "searcher.agent_kwargs.tpe.n_startup_trials=1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    md = (out / "leaderboard.md").read_text()
    for agent in ("random", "tpe", "uniform"):
        assert f"| {agent} |" in md and f"| {agent} |" in printed
    assert "| tpe | 2 |" in md
    assert (out / "leaderboard.csv").is_file()


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path: Path) -> None:
    start_time = time.monotonic()
    code, out, err = finish(start("quickstart", "--out", str(tmp_path / "qs"), "--trials", "6", cwd=tmp_path),
                            timeout=600)
    seconds = time.monotonic() - start_time
    assert code == 0, (out, err)
    qs = tmp_path / "qs"
    for path in ("checkpoint.pt", "leaderboard.md", "report/pareto.png", "report/best_so_far.png",
                 "report/widths.png", "config.resolved.yaml"):
        assert (qs / path).is_file(), path
    cards = list(qs.glob("export/*/MODEL_CARD.md"))
    assert len(cards) == 1 and (cards[0].parent / "model" / "arch.json").is_file()
    assert "quickstart done in" in out and "model card:" in out and "report:" in out
    assert seconds < 600
