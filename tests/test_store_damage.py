"""Damaged or foreign SQLite trial stores are refused with a clear error, and never written into.

Each case starts from a real campaign store with finished trials, damages a copy of it, and checks that opening
it (what ``search``, ``worker``, ``report`` and ``export`` do first) raises an :class:`AutoPruneError` that
names the file and what is wrong, with a hint for a local file (not a database server), and leaves the file's
bytes as they were. The command-line path is checked once per command in a subprocess: exit 2, ``error:`` and
``hint:``, no traceback.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from autoprune import provenance
from autoprune.errors import AutoPruneError
from autoprune.store import TrialStore

ROOT = Path(__file__).resolve().parents[1]


def campaign_yaml(path: Path) -> Path:
    data = {
        "name": "damage",
        "model": {"name": "small_cnn", "kwargs": {"width": 4}},
        "dataset": {"name": "digits", "batch_size": 64},
        "evaluator": {"name": "plain"},
        "objective": {"budget": {"macs": 0.6}},
        "searcher": {"name": "random"},
        "n_trials": 3,
        "output_dir": str(path.parent / "results"),
    }
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTOPRUNE_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "autoprune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A campaign directory whose store holds 3 finished trials (the search ran to its end)."""
    root = tmp_path_factory.mktemp("store")
    r = cli("search", str(campaign_yaml(root / "c.yaml")), cwd=root)
    assert r.returncode == 0, r.stderr
    db = root / "results" / provenance.STORE_FILE
    con = sqlite3.connect(db)  # fold the WAL into the main file so that the damage below hits real pages
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return root


def overwrite_4k(db: Path) -> None:
    size = db.stat().st_size
    with open(db, "r+b") as fh:
        fh.seek(min(4096, size // 2))
        fh.write(bytes(range(256)) * 16)


def truncate_half(db: Path) -> None:
    with open(db, "r+b") as fh:
        fh.truncate(db.stat().st_size // 2 + 100)


def not_a_database(db: Path) -> None:
    db.write_text("name,accuracy\nresnet20,0.9\n" * 50)


def foreign_database(db: Path) -> None:
    db.unlink()
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    con.execute("INSERT INTO invoices (total) VALUES (12.5)")
    con.commit()
    con.close()


def newer_schema(db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("UPDATE alembic_version SET version_num = 'v99.0.0.a'")
    con.commit()
    con.close()


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "overwritten pages": (overwrite_4k, r"damaged|malformed|not a database"),
    "truncated": (truncate_half, r"damaged|malformed"),
    "not a database": (not_a_database, r"not a SQLite database"),
    "another program's database": (foreign_database, r"another program's database \(tables: invoices\)"),
    "newer schema": (newer_schema, r"no longer compatible|newer|schema"),
}


def damaged_copy(finished: Path, tmp_path: Path, case: str) -> Path:
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    db = work / "results" / provenance.STORE_FILE
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    if case in DAMAGE:
        DAMAGE[case][0](db)
    return db


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_store_is_refused_clearly_and_left_alone(finished: Path, tmp_path: Path, case: str) -> None:
    db = damaged_copy(finished, tmp_path, case)
    before = digest(db)
    with pytest.raises(AutoPruneError, match=DAMAGE[case][1]) as info:
        TrialStore(db, campaign="damage")
    assert str(db.name) in info.value.message
    hint = info.value.hint or ""
    assert hint and not re.search(r"\b(server|port)\b", hint)  # a hint for a local file ("autoprune export" is fine)
    assert digest(db) == before  # nothing was written into it


def test_the_intact_store_still_opens(finished: Path) -> None:
    store = TrialStore(finished / "results" / provenance.STORE_FILE, campaign="damage")
    assert len(store.to_dataframe()) == 3


@pytest.mark.parametrize("command", ["search", "worker", "report", "export"])
def test_every_command_ends_with_exit_2_on_a_damaged_store(finished: Path, tmp_path: Path, command: str) -> None:
    db = damaged_copy(finished, tmp_path, "overwritten pages")
    before = digest(db)
    work = db.parent.parent
    args = {"search": ["search", "c.yaml"], "worker": ["worker", "c.yaml"], "report": ["report", "results"],
            "export": ["export", "results", "--trial", "best"]}[command]
    campaign_yaml(work / "c.yaml")
    r = cli(*args, cwd=work)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "error:" in r.stderr and "hint:" in r.stderr and "Traceback" not in r.stderr
    assert provenance.STORE_FILE in r.stderr
    assert digest(db) == before


def _edit(db: Path, sql: str) -> None:
    con = sqlite3.connect(db)
    con.execute(sql)
    con.commit()
    con.close()


EDITS = {
    "a cost of the wrong type": "UPDATE trial_user_attributes SET value_json = '\"many\"' WHERE key = 'macs' "
                                "AND trial_id = (SELECT MIN(trial_id) FROM trials)",
    "a deleted record value": "DELETE FROM trial_user_attributes WHERE key = 'params' "
                              "AND trial_id = (SELECT MIN(trial_id) FROM trials)",
    "an unparsable date": "UPDATE trials SET datetime_start = 'x' WHERE trial_id = (SELECT MIN(trial_id) FROM trials)",
    "a study name of another program": "UPDATE studies SET study_name = 'someone else'",
}


@pytest.mark.parametrize("case", list(EDITS))
def test_a_store_edited_by_another_program_is_a_clear_error_from_report(finished: Path, tmp_path: Path,
                                                                      case: str) -> None:
    db = damaged_copy(finished, tmp_path, "not damaged")
    _edit(db, EDITS[case])
    r = cli("report", "results", cwd=db.parent.parent)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "error:" in r.stderr and "hint:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("sql", ["UPDATE trials SET state = 5", "UPDATE trial_params SET distribution_json = '1e999'"])
def test_search_on_a_store_edited_by_another_program_is_a_clear_error(finished: Path, tmp_path: Path, sql: str) -> None:
    db = damaged_copy(finished, tmp_path, "not damaged")
    _edit(db, sql)
    work = db.parent.parent
    campaign_yaml(work / "c.yaml")
    r = cli("search", "c.yaml", "n_trials=4", cwd=work)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "error:" in r.stderr and "hint:" in r.stderr and "Traceback" not in r.stderr
