"""Read-only salvage of a damaged SQLite trial store (``autoprune/salvage.py``, ``report``/``export --salvage``).

The stores and their damage are those of ``tests/test_store_damage.py``. Where trials can still be read, the
salvage recovers them with exactly the record the intact store held, writes a new store that passes SQLite's
integrity check, and leaves the damaged file's bytes (and its directory) as they were; where nothing can be read it
says why. On the command line, ``report``/``export`` offer ``--salvage`` in the hint of a damaged store and work
from the recovered copy with it.
"""

from __future__ import annotations

import functools
import json
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import test_store_damage as damage

from autoprune import provenance
from autoprune.errors import AutoPruneError
from autoprune.salvage import Salvage, SalvageError, salvage_offer, salvage_sqlite
from autoprune.store import RECORD_ATTRS, TrialStore
from autoprune.types import TrialRecord

finished = damage.finished  # the campaign store with 3 finished trials (a module-scoped fixture)
RECOVERABLE = ["overwritten pages", "truncated"]
REFUSED = {
    "not a database": r"not a SQLite database",
    "another program's database": r"another program's database \(tables: invoices\)",
    "newer schema": r"newer Optuna schema \(v99\.0\.0\.a\)",
}


def intact_store(finished: Path) -> TrialStore:
    return TrialStore(finished / "results" / provenance.STORE_FILE, campaign="damage")


@functools.cache
def originals(finished: Path) -> tuple[pd.DataFrame, dict[tuple[str, int, int], TrialRecord]]:
    """The intact store's trial table (by study and number) and records (by searcher, seed and number)."""
    store = intact_store(finished)
    return (store.to_dataframe().set_index(["study", "number"]),
            {(r.searcher, r.seed, r.number): r for r in store.trials()})


def assert_same_records(salvaged: Salvage, finished: Path) -> None:
    """Every recovered trial is the original's: candidate key, widths, bits, costs, scores, state, times."""
    original, by_number = originals(finished)
    copy = TrialStore(salvaged.path, campaign="damage")
    got = copy.to_dataframe().set_index(["study", "number"])
    assert len(got) == salvaged.recovered >= 1
    assert set(got.index) <= set(original.index)
    for idx, row in got.iterrows():
        want = original.loc[idx]
        for column in got.columns:
            a, b = row[column], want[column]
            if column == "values" and a is None:
                continue  # Optuna's objective values lost with their page (report and export do not read them)
            if isinstance(a, dict | list) or isinstance(b, dict | list) or not (pd.isna(a) and pd.isna(b)):
                assert a == b, (idx, column, a, b)
    for record in copy.trials():
        assert record == by_number[(record.searcher, record.seed, record.number)]


def integrity(path: Path) -> list[str]:
    con = sqlite3.connect(path)
    try:
        return [r[0] for r in con.execute("PRAGMA integrity_check").fetchall()]
    finally:
        con.close()


@pytest.mark.parametrize("case", RECOVERABLE)
def test_salvage_recovers_the_readable_trials_and_leaves_the_file_alone(finished: Path, tmp_path: Path,
                                                                          case: str) -> None:
    db = damage.damaged_copy(finished, tmp_path, case)
    before, listing = damage.digest(db), sorted(p.name for p in db.parent.iterdir())
    salvaged = salvage_sqlite(db, tmp_path / "salvage")
    assert salvaged.damage and salvaged.recovered >= 1
    assert salvaged.recovered + salvaged.lost <= 3
    assert_same_records(salvaged, finished)
    assert integrity(salvaged.path) == ["ok"]
    assert salvaged.path.parent == tmp_path / "salvage"
    assert "damaged" in salvaged.summary and f"{salvaged.recovered} trials recovered" in salvaged.summary
    assert [line.split(":")[0] for line in salvaged.trial_lines()] == ["damage/random/seed0"]
    assert damage.digest(db) == before
    assert sorted(p.name for p in db.parent.iterdir()) == listing  # nothing written next to it


@pytest.mark.parametrize("case", list(REFUSED))
def test_salvage_says_why_it_is_not_possible(finished: Path, tmp_path: Path, case: str) -> None:
    db = damage.damaged_copy(finished, tmp_path, case)
    before = damage.digest(db)
    with pytest.raises(SalvageError, match=REFUSED[case]) as info:
        salvage_sqlite(db, tmp_path / "salvage")
    assert str(db) in info.value.message and info.value.hint
    assert list((tmp_path / "salvage").iterdir()) == []  # no half-written copy is left
    assert damage.digest(db) == before
    offer = salvage_offer(db, "autoprune report results --salvage")
    assert offer is not None and "not possible" in offer and info.value.reason in offer


def test_salvage_of_an_intact_store_reads_everything(finished: Path, tmp_path: Path) -> None:
    db = finished / "results" / provenance.STORE_FILE
    salvaged = salvage_sqlite(db, tmp_path)
    assert salvaged.damage == "" and salvaged.lost == 0 and salvaged.recovered == 3
    assert salvaged.studies == ("damage/random/seed0",)
    assert_same_records(salvaged, finished)
    assert salvage_offer(db, "autoprune report results --salvage") is None  # an intact file: no offer
    with pytest.raises(AutoPruneError, match="next to it"):
        salvage_sqlite(db, db.parent)


def test_a_finished_trial_carries_every_record_attribute(finished: Path) -> None:
    import optuna

    store = intact_store(finished)
    for name in store.study_names():
        for t in optuna.load_study(study_name=name, storage=store.storage).trials:
            assert set(RECORD_ATTRS) <= set(t.user_attrs), sorted(set(RECORD_ATTRS) - set(t.user_attrs))


def test_salvage_reads_the_committed_frames_of_the_write_ahead_log(finished: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    shutil.copyfile(finished / "results" / provenance.STORE_FILE, live / "trials.db")
    con = sqlite3.connect(live / "trials.db")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute("UPDATE trial_user_attributes SET value_json = '\"from the log\"' WHERE key = 'reason'")
    con.commit()
    copy = tmp_path / "copy"
    copy.mkdir()
    for suffix in ("", "-wal", "-shm"):  # as a killed process leaves them: the change is only in the log
        shutil.copyfile(f"{live / 'trials.db'}{suffix}", f"{copy / 'trials.db'}{suffix}")
    con.close()
    assert Path(f"{copy / 'trials.db'}-wal").stat().st_size > 0
    salvaged = salvage_sqlite(copy / "trials.db", tmp_path / "out")
    reasons = {r.reason for r in TrialStore(salvaged.path, campaign="damage").trials()}
    assert reasons == {"from the log"}


def test_any_single_bad_page_loses_at_most_its_trials(finished: Path, tmp_path: Path) -> None:
    """Zero each page in turn, and cut the file at each page: a salvage either says why not or recovers only
    records equal to the original's."""
    data = (finished / "results" / provenance.STORE_FILE).read_bytes()
    page = 4096
    variants = {f"page {n + 1} zeroed": data[:n * page] + bytes(page) + data[(n + 1) * page:]
                for n in range(len(data) // page)}
    variants |= {f"cut after page {n}": data[:n * page] for n in range(1, len(data) // page, 3)}
    outcomes = {}
    for i, (name, content) in enumerate(variants.items()):
        db = tmp_path / f"v{i}" / "trials.db"
        db.parent.mkdir()
        db.write_bytes(content)
        try:
            salvaged = salvage_sqlite(db, tmp_path / f"out{i}")
        except SalvageError as exc:
            outcomes[name] = exc.reason
            continue
        assert integrity(salvaged.path) == ["ok"], name
        assert_same_records(salvaged, finished)
        outcomes[name] = salvaged.recovered
    assert sum(isinstance(v, int) and v == 3 for v in outcomes.values()) >= len(data) // page // 2, outcomes


def test_report_offers_salvage_and_reports_from_the_salvaged_copy(finished: Path, tmp_path: Path) -> None:
    db = damage.damaged_copy(finished, tmp_path, "overwritten pages")
    before = damage.digest(db)
    work = db.parent.parent
    plain = damage.cli("report", "results", cwd=work)
    assert plain.returncode == 2, (plain.stdout, plain.stderr)
    assert "error:" in plain.stderr and "Traceback" not in plain.stderr
    hint = plain.stderr.split("hint:", 1)[1]
    assert "of 3 trials can still be read" in hint and "autoprune report results --salvage" in hint
    salvaged = damage.cli("report", "results", "--salvage", cwd=work)
    assert salvaged.returncode == 0, salvaged.stderr
    assert "warning: the trial store results/trials.db is damaged" in salvaged.stderr
    assert "trials recovered" in salvaged.stderr and "salvaged copy" in salvaged.stderr
    assert "damage/random/seed0: trials 0, 1, 2" in salvaged.stdout and "report of 3 trials" in salvaged.stdout
    assert len(pd.read_csv(work / "results" / "report" / "trials.csv")) == 3
    assert damage.digest(db) == before
    assert not any("salvaged" in p.name for p in db.parent.iterdir())


def test_export_from_a_salvaged_store(finished: Path, tmp_path: Path) -> None:
    from autoprune.serialize import load_module

    db = damage.damaged_copy(finished, tmp_path, "truncated")
    before = damage.digest(db)
    work = db.parent.parent
    args = ["export", "results", "--trial", "best", "--finetune", "none", "--formats", "none", "--no-latency"]
    plain = damage.cli(*args, cwd=work)
    assert plain.returncode == 2 and "--salvage" in plain.stderr.split("hint:", 1)[1], plain.stderr
    r = damage.cli(*args, "--salvage", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "warning: the trial store results/trials.db is damaged" in r.stderr
    out = next((work / "results" / "export").iterdir())
    model = load_module(out / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert "salvaged, read-only copy" in (out / "MODEL_CARD.md").read_text()
    assert "--salvage" in (out / "MODEL_CARD.md").read_text()  # the command that reproduces it
    assert json.loads((out / "export.json").read_text())["salvaged_store"]["recovered_trials"] >= 1
    assert damage.digest(db) == before


def test_salvage_that_is_not_possible_ends_with_exit_2(finished: Path, tmp_path: Path) -> None:
    db = damage.damaged_copy(finished, tmp_path, "not a database")
    r = damage.cli("report", "results", "--salvage", cwd=db.parent.parent)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "error: cannot salvage" in r.stderr and "not a SQLite database" in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr


def test_salvage_on_an_intact_store_just_works(finished: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    r = damage.cli("report", "results", "--salvage", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "intact" in r.stderr and "report of 3 trials" in r.stdout
