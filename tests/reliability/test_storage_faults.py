"""Storage faults: an unwritable output directory, a full disk, a SQLite database locked by another connection,
an unreachable PostgreSQL server. Each ends with a clear error (exit 2 from the CLI, no traceback) within a
bounded time, and every trial written before stays in the store.

The full disk and the read-only directory are real tmpfs mounts when the tests run as root and ``mount`` works
(skipped otherwise); the full-disk path is also exercised without privileges by making the store's writes fail
with SQLite's "database or disk is full".
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc

from autoprune import cli, provenance
from autoprune.config import load_config
from autoprune.errors import EXIT_USER_ERROR, AutoPruneError

from . import check_study, write_config

pytestmark = pytest.mark.reliability


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, readonly: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (skips the test if it cannot be mounted)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["-q", *args])
    return code, capsys.readouterr().err


def assert_clear(code: int, err: str, *needles: str) -> None:
    assert code == EXIT_USER_ERROR, err
    assert "error:" in err and "hint:" in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_unwritable_output_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        config = write_config(tmp_path / "c.yaml", ro / "out")
        code, err = run(["search", str(config)], capsys)
        assert_clear(code, err, "output directory")


def test_full_disk_keeps_the_stored_trials_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tmpfs(tmp_path / "small", "3m") as disk:
        out = disk / "out"
        config = write_config(tmp_path / "c.yaml", out, n_trials=3)
        assert run(["search", str(config)], capsys)[0] == 0
        filler = disk / "filler"
        with open(filler, "wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        code, err = run(["search", str(config), "n_trials=40"], capsys)
        assert_clear(code, err)
        assert "disk" in err or "space" in err, err
        filler.unlink()
        assert len(check_study(out / "trials.db", "rel/random/seed0", killed=True)) >= 3
        assert run(["search", str(config), "n_trials=6"], capsys)[0] == 0
        check_study(out / "trials.db", "rel/random/seed0", 6)


def test_store_write_failure_is_a_clear_error_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import optuna

    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", out, n_trials=3)
    assert run(["search", str(config)], capsys)[0] == 0
    real = optuna.storages.RDBStorage.set_trial_user_attr
    calls = {"n": 0}

    def failing(self: object, trial_id: int, key: str, value: object) -> None:
        calls["n"] += 1
        if calls["n"] > 25:  # a trial and a bit: the second trial's record fails half-way
            raise sa_exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
        real(self, trial_id, key, value)  # type: ignore[arg-type]

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_user_attr", failing)
    code, err = run(["search", str(config), "n_trials=10"], capsys)
    assert_clear(code, err, "database or disk is full", "finished trials are kept")
    monkeypatch.undo()
    assert len(check_study(out / "trials.db", "rel/random/seed0", killed=True)) == 4
    assert run(["search", str(config), "n_trials=6"], capsys)[0] == 0
    check_study(out / "trials.db", "rel/random/seed0", 6)


def test_locked_sqlite_database_fails_after_the_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", out, n_trials=2)
    assert run(["search", str(config)], capsys)[0] == 0
    holder = sqlite3.connect(out / "trials.db", isolation_level=None, timeout=1)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        code, err = run(["search", str(config), "n_trials=5", "storage_timeout=1.5"], capsys)
        seconds = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_clear(code, err, "locked")
    assert seconds < 30, seconds
    check_study(out / "trials.db", "rel/random/seed0", 2)


def test_unreachable_postgresql_is_a_clear_bounded_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "out", storage="postgresql://nobody@127.0.0.1:9/none",
                          storage_timeout=3)
    started = time.monotonic()
    code, err = run(["search", str(config)], capsys)
    assert_clear(code, err)
    assert "cannot open the trial store" in err or "PostgreSQL driver" in err, err
    assert time.monotonic() - started < 30
    with pytest.raises(AutoPruneError):
        provenance.open_store(load_config(config))


def test_a_server_lost_mid_query_is_a_storage_error_not_a_traceback() -> None:
    """What Optuna raises when the server dies during a query in a worker: a pending rollback whose context is the
    driver's error, wrapped in StorageInternalError (seen in the reliability soak)."""
    import optuna

    from autoprune.store import storage_error

    try:
        try:
            try:
                raise sa_exc.OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))
            except sa_exc.OperationalError:
                raise sa_exc.PendingRollbackError("Can't reconnect until invalid transaction is rolled back.") from None
        except sa_exc.PendingRollbackError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e
    except optuna.exceptions.StorageInternalError as exc:
        err = storage_error(exc, "postgresql://db")
    assert isinstance(err, AutoPruneError) and "finished trials are kept" in (err.hint or "")
    assert storage_error(sa_exc.PendingRollbackError("rollback first"), "db") is not None
