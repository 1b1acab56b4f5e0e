"""Carrying a long benchmark's unfinished work to the next machine (``benchmarks._carry``) and its use by the
recovery benchmark: what is packed, that a restore fills only what is missing, and that a run on a machine
without the work directory continues from the carried state."""

from __future__ import annotations

import io
import json
import re
import shutil
import sqlite3
import tarfile
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _carry
from benchmarks import bench_recovery as br


def _db_in_wal_mode(path: Path, rows: int) -> sqlite3.Connection:
    """A SQLite database whose rows are still in its write-ahead log (the connection stays open)."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute("CREATE TABLE t (x INTEGER)")
    con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(rows)])
    con.commit()
    return con


def test_pack_and_restore_round_trip_with_a_live_sqlite_store(tmp_path: Path) -> None:
    work, archive = tmp_path / "work", tmp_path / "carry.tar.gz"
    (work / "a").mkdir(parents=True)
    (work / "a" / "keep.txt").write_text("kept")
    (work / "a" / "drop.txt").write_text("not selected")
    con = _db_in_wal_mode(work / "a" / "trials.db", 50)
    assert (work / "a" / "trials.db-wal").stat().st_size > 0  # the rows are in the log, not the main file
    names = _carry.pack(work, archive, lambda rel: not rel.endswith("drop.txt"))
    con.close()
    assert names == ["a/keep.txt", "a/trials.db"]  # companions (-wal, -shm) never carried
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == names
    fresh = tmp_path / "fresh"
    assert _carry.restore(fresh, archive) == names
    assert (fresh / "a" / "keep.txt").read_text() == "kept" and not (fresh / "a" / "drop.txt").exists()
    got = sqlite3.connect(fresh / "a" / "trials.db")
    assert got.execute("SELECT COUNT(*), SUM(x) FROM t").fetchone() == (50, sum(range(50)))
    got.close()


def test_restore_never_overwrites_and_honours_skip_and_stays_inside(tmp_path: Path) -> None:
    work, archive = tmp_path / "work", tmp_path / "carry.tar.gz"
    (work / "d").mkdir(parents=True)
    for name in ("old.txt", "skipped.txt", "new.txt"):
        (work / "d" / name).write_text("carried " + name)
    _carry.pack(work, archive, lambda rel: True)
    with tarfile.open(archive) as tar:
        assert len(tar.getmembers()) == 3
    # a hostile member (path traversal) is ignored
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(evil, "w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        dst.addfile(info, io.BytesIO(b"x"))
    target = tmp_path / "target"
    (target / "d").mkdir(parents=True)
    (target / "d" / "old.txt").write_text("local, newer")
    back = _carry.restore(target, evil, skip=lambda rel: rel.endswith("skipped.txt"))
    assert back == ["d/new.txt"]
    assert (target / "d" / "old.txt").read_text() == "local, newer"
    assert not (target / "d" / "skipped.txt").exists() and not (tmp_path / "outside.txt").exists()


def test_nothing_to_carry_removes_the_archive_and_a_missing_archive_restores_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "carry.tar.gz"
    archive.write_bytes(b"old")
    assert _carry.pack(tmp_path / "absent", archive, lambda rel: True) == [] and not archive.exists()
    assert _carry.restore(tmp_path / "w", archive) == []


def test_recovery_carries_search_campaigns_and_unfinished_fine_tune_checkpoints(tmp_path: Path) -> None:
    from autoprune.export import FINETUNE_CHECKPOINT

    assert br.carried("resnet20/search/trials.db") and br.carried("resnet20/search/config.resolved.yaml")
    assert br.carried(f"resnet56/export/kd-lr0.01-e30/{FINETUNE_CHECKPOINT}")
    assert br.carried(f"resnet20/sweep/lr0.1-e3/{FINETUNE_CHECKPOINT}")
    assert not br.carried("resnet20/export/kd-lr0.01-e30/model/weights.pt")  # a finished export's output
    assert not br.carried("resnet20/search/artifacts/x/agent.zip")
    d = tmp_path / "resnet20" / "export" / "kd"
    d.mkdir(parents=True)
    rel = f"resnet20/export/kd/{FINETUNE_CHECKPOINT}"
    assert not br.stale_checkpoint(tmp_path, rel)
    (d / "export.json").write_text("{}")  # the export finished here since: its old checkpoint must not come back
    assert br.stale_checkpoint(tmp_path, rel) and not br.stale_checkpoint(tmp_path, "resnet20/search/trials.db")


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The recovery benchmark with fake cells; a fine-tune cell writes its checkpoint and stays unfinished."""
    from benchmarks import _common

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setattr(br, "RESULTS", tmp_path)
    monkeypatch.setattr(br, "data_error", lambda models: None)
    monkeypatch.setattr(br, "git_commit", lambda: "abc")
    seen: dict[str, Any] = {"found": []}

    def cell(s: br.Settings, name: str, raw: dict, path: Path, deadline: float | None) -> dict[str, Any]:
        from autoprune.export import FINETUNE_CHECKPOINT

        search = br.search_dir(s, "resnet20")
        if name.startswith("search|resnet20"):  # the campaign's search and the baseline's, in one directory
            if not (search / "trials.db").exists():
                search.mkdir(parents=True, exist_ok=True)
                (search / "config.resolved.yaml").write_text("name: x\n")
                _db_in_wal_mode(search / "trials.db", 3).close()
            return {"status": "done", "params": {"trials": 1}, "trials_done": 1, "seconds": 1.0,
                    "best": {"trial": "tpe/seed0/1", "label": "t1", "macs_ratio": 0.5, "val_accuracy": 0.9}}
        ckpt = br.work_dir(s) / "resnet20" / "export" / "kd-lr0.01-e30" / FINETUNE_CHECKPOINT
        seen["found"].append((search / "trials.db").is_file() and ckpt.is_file() and ckpt.read_text())
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_text(f"epoch {len(seen['found'])}")
        return {"status": "partial", "epochs_log": [], "params": {"variant": "kd", "lr": 0.01, "epochs": 30,
                                                                  "distill": 0.9, "trial": "tpe/seed0/1"}}

    monkeypatch.setattr(br, "run_cell", cell)
    seen["work"] = br.work_dir(br.Settings())
    seen["archive"] = br.carry_path(br.Settings())
    return seen


def test_an_unfinished_fine_tune_continues_on_a_machine_without_the_work_directory(machine: dict[str, Any]) -> None:
    args = ["--models", "resnet20", "--only", "search,finetune|resnet20|kd", "--resume", "--lr", "0.01"]
    assert br.main(args) == 0
    assert machine["found"] == [False]  # the first run starts from nothing
    with tarfile.open(machine["archive"]) as tar:
        assert {Path(n).name for n in tar.getnames()} == {"config.resolved.yaml", "trials.db", "finetune.ckpt"}
    shutil.rmtree(machine["work"])  # a new machine: only the versioned files are there
    assert br.main(args) == 0
    assert machine["found"][-1] == "epoch 1"  # the campaign and the checkpoint of epoch 1 came back
    raw = json.loads((machine["archive"].parent / "recovery.json").read_text())
    assert raw["cells"]["search|resnet20"]["status"] == "done"


def test_an_interrupted_run_still_carries_its_unfinished_work(machine: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in a fine-tune: exit 130, and the checkpoint it left is packed as after a finished run."""
    from autoprune.export import FINETUNE_CHECKPOINT

    real = br.run_cell

    def interrupted(s: br.Settings, name: str, raw: dict, path: Path, deadline: float | None) -> dict[str, Any]:
        rec = real(s, name, raw, path, deadline)
        if name.startswith("finetune"):  # it wrote its checkpoint, then the user pressed Ctrl-C
            raise KeyboardInterrupt
        return rec

    monkeypatch.setattr(br, "run_cell", interrupted)
    args = ["--models", "resnet20", "--only", "search,finetune|resnet20|kd", "--resume", "--lr", "0.01"]
    assert br.main(args) == 130
    with tarfile.open(machine["archive"]) as tar:
        assert FINETUNE_CHECKPOINT in {Path(n).name for n in tar.getnames()}
    assert (machine["archive"].parent / "recovery.md").is_file()


def test_a_cell_over_the_cell_limit_is_left_out_whole(tmp_path: Path) -> None:
    work, archive = tmp_path / "work", tmp_path / "carry.tar.gz"
    (work / "small").mkdir(parents=True)
    (work / "small" / "a.bin").write_bytes(b"x" * 10)
    (work / "big" / "artifacts").mkdir(parents=True)
    (work / "big" / "artifacts" / "agent.zip").write_bytes(b"y" * 600)
    (work / "big" / "b.bin").write_bytes(b"z" * 600)  # no file over 1000 bytes, but the cell in all is
    assert _carry.pack(work, archive, lambda rel: True, max_cell_bytes=1000) == ["small/a.bin"]
    assert sorted(_carry.pack(work, archive, lambda rel: True, max_cell_bytes=5000)) == [
        "big/artifacts/agent.zip", "big/b.bin", "small/a.bin"]


def _incompressible(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def test_an_archive_over_the_volume_size_is_split_and_joined_again(tmp_path: Path) -> None:
    work, archive = tmp_path / "work", tmp_path / "res" / "x_carry.tar.gz"
    (work / "cell").mkdir(parents=True)
    (work / "cell" / "finetune.ckpt").write_bytes(_incompressible(25_000, 1))  # one file bigger than a volume
    (work / "cell" / "small.txt").write_text("s")
    assert _carry.pack(work, archive, lambda rel: True, max_volume_bytes=10_000) == ["cell/finetune.ckpt",
                                                                                    "cell/small.txt"]
    parts = _carry.volumes(archive)
    assert not archive.exists() and [p.name for p in parts] == [f"x_carry.tar.gz.{i:03d}" for i in (1, 2, 3)]
    assert all(p.stat().st_size <= 10_000 for p in parts) and parts[0].stat().st_size == 10_000
    fresh = tmp_path / "fresh"
    assert _carry.restore(fresh, archive) == ["cell/finetune.ckpt", "cell/small.txt"]
    assert (fresh / "cell" / "finetune.ckpt").read_bytes() == _incompressible(25_000, 1)
    # smaller again: one archive, no stale volume left behind (a stale one would corrupt the join)
    (work / "cell" / "finetune.ckpt").write_bytes(b"0" * 100)
    assert _carry.pack(work, archive, lambda rel: True, max_volume_bytes=10_000)
    assert archive.is_file() and _carry.volumes(archive) == []
    # bigger again, then fewer volumes than before: the old fourth volume goes
    (work / "cell" / "finetune.ckpt").write_bytes(_incompressible(35_000, 2))
    _carry.pack(work, archive, lambda rel: True, max_volume_bytes=10_000)
    assert len(_carry.volumes(archive)) == 4 and not archive.exists()
    (work / "cell" / "finetune.ckpt").write_bytes(_incompressible(15_000, 3))
    _carry.pack(work, archive, lambda rel: True, max_volume_bytes=10_000)
    assert len(_carry.volumes(archive)) == 2
    shutil.rmtree(fresh)
    _carry.restore(fresh, archive)
    assert (fresh / "cell" / "finetune.ckpt").read_bytes() == _incompressible(15_000, 3)
    # a stale volume beside a whole archive goes with the next pack
    (work / "cell" / "finetune.ckpt").write_bytes(b"1" * 100)
    _carry.pack(work, archive, lambda rel: True, max_volume_bytes=10_000)
    stale = archive.with_name(archive.name + ".001")
    stale.write_bytes(b"left over")
    _carry.pack(work, archive, lambda rel: True, max_volume_bytes=10_000)
    assert archive.is_file() and not stale.exists()
    # nothing left to carry: every volume goes
    assert _carry.pack(work, archive, lambda rel: False) == [] and _carry.archive_files(archive) == []
    assert not [p for p in archive.parent.iterdir() if not p.name.startswith(".")]


def test_a_damaged_archive_or_a_missing_volume_is_a_carry_error_that_names_it(tmp_path: Path) -> None:
    work, archive = tmp_path / "work", tmp_path / "x_carry.tar.gz"
    (work / "cell").mkdir(parents=True)
    (work / "cell" / "ckpt").write_bytes(_incompressible(25_000, 4))
    _carry.pack(work, archive, lambda rel: True, max_volume_bytes=10_000)
    second = _carry.volumes(archive)[1]
    data = second.read_bytes()
    second.unlink()
    with pytest.raises(_carry.CarryError, match=r"\[1, 3\].*missing"):
        _carry.restore(tmp_path / "a", archive)
    second.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(_carry.CarryError, match=re.escape(", ".join(f"x_carry.tar.gz.00{i}" for i in (1, 2, 3)))):
        _carry.restore(tmp_path / "b", archive)
    for p in _carry.volumes(archive):
        p.unlink()
    archive.write_bytes(b"not a tarball")
    with pytest.raises(_carry.CarryError, match="not a readable carry archive") as err:
        _carry.restore(tmp_path / "c", archive)
    assert "git checkout" in err.value.hint and err.value.for_user().startswith("error: x_carry.tar.gz: not a")


def test_the_benchmarks_answer_a_damaged_carry_with_an_error_and_a_hint(machine: dict[str, Any],
                                                                          capsys: pytest.CaptureFixture[str]
                                                                          ) -> None:
    machine["archive"].parent.mkdir(parents=True, exist_ok=True)
    machine["archive"].write_bytes(b"damaged")
    assert br.main(["--models", "resnet20", "--only", "search", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recovery_carry.tar.gz: not a readable carry archive") and "hint: git checkout" in err
    assert machine["archive"].read_bytes() == b"damaged"  # nothing changed, nothing ran
    assert machine["found"] == []
