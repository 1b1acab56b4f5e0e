"""The trial store on Optuna storage: recording, DataFrame export, searcher state, errors, PostgreSQL."""

from __future__ import annotations

import os
import socket
import stat
import uuid
from pathlib import Path

import optuna
import pytest

from autoprune.errors import AutoPruneError, ConfigError
from autoprune.store import TrialStore
from autoprune.types import Candidate, CostReport, EvalResult, QuantSpec

PG_URL = os.environ.get("AUTOPRUNE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _record(store: TrialStore, searcher: str = "tpe", seed: int = 0, n: int = 3) -> optuna.Study:
    study = store.study(searcher, seed)
    for i in range(n):
        trial = study.ask()
        cand = Candidate(widths={"a": 4 + i, "b": 8}, bits={"conv": QuantSpec(4, None)})
        cost = CostReport(macs=1000 + i, params=100 + i, bytes=400 + i)
        res = EvalResult(accuracy=0.5 + 0.1 * i, loss=1.0 - 0.1 * i, seconds=0.01, evaluator="fake",
                         score=None if i == 0 else 0.4 + 0.1 * i)
        TrialStore.finish(study, trial, candidate=cand, cost=cost, result=res, reward=-(0.5 - 0.1 * i),
                          seconds=0.02, searcher=searcher, seed=seed, values=[-(0.5 - 0.1 * i)],
                          constraints={"macs": (1000 + i) / 1001 - 1.0})
    return study


def test_records_roundtrip_to_dataframe_and_records(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "c" / "trials.db", campaign="camp")
    _record(store)
    df = store.to_dataframe()
    assert list(df["number"]) == [0, 1, 2]
    assert df["accuracy"].tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert df["macs"].tolist() == [1000, 1001, 1002]
    assert df["feasible"].tolist() == [True, True, False]
    assert set(df["searcher"]) == {"tpe"} and set(df["seed"]) == {0} and set(df["state"]) == {"complete"}
    assert df["widths"][1] == {"a": 5, "b": 8}
    recs = store.trials("tpe", 0)
    assert recs[2].candidate == Candidate(widths={"a": 6, "b": 8}, bits={"conv": QuantSpec(4, None)})
    assert recs[2].cost.macs == 1002 and recs[2].result is not None and recs[2].result.accuracy == pytest.approx(0.7)
    assert recs[0].result.score is None and recs[2].result.score == pytest.approx(0.6)  # a ranking score, if any
    # a second store object on the same file sees the same trials (resume across processes)
    again = TrialStore(tmp_path / "c" / "trials.db", campaign="camp")
    assert len(again.to_dataframe()) == 3
    assert again.study_names() == ["camp/tpe/seed0"]
    # another campaign in the same file is separate
    assert TrialStore(tmp_path / "c" / "trials.db", campaign="other").to_dataframe().empty


def test_one_study_per_searcher_and_seed_and_delete(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "t.db", campaign="c")
    _record(store, "tpe", 0, 1)
    _record(store, "tpe", 1, 2)
    _record(store, "uniform", 0, 1)
    assert store.study_names() == ["c/tpe/seed0", "c/tpe/seed1", "c/uniform/seed0"]
    assert len(store.to_dataframe(searcher="tpe")) == 3
    assert len(store.to_dataframe(seed=0)) == 2
    assert store.delete(searcher="tpe", seed=1) == 1
    assert store.study_names() == ["c/tpe/seed0", "c/uniform/seed0"]


def test_state_blobs_and_artifact_dir(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "t.db", campaign="c")
    assert store.load_state("ddpg", 3, "agent", default="none") == "none"
    store.study("ddpg", 3)
    store.save_state("ddpg", 3, "agent", {"path": "x.zip", "episodes": 7})
    assert TrialStore(tmp_path / "t.db", campaign="c").load_state("ddpg", 3, "agent") == {"path": "x.zip",
                                                                                             "episodes": 7}
    d = store.artifact_dir("ddpg", 3)
    assert d.is_dir() and d == tmp_path / "artifacts" / "c" / "ddpg" / "seed3"
    # another campaign in the same database gets its own files (RL checkpoints, trained networks)
    other = TrialStore(tmp_path / "t.db", campaign="other").artifact_dir("ddpg", 3)
    assert other != d and other == tmp_path / "artifacts" / "other" / "ddpg" / "seed3"


def test_running_trials_of_a_killed_process_are_marked_interrupted(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "t.db", campaign="c")
    study = _record(store, n=2)
    study.ask()  # left running, as by a killed worker
    assert TrialStore.fail_running(study) == 1
    assert len(TrialStore.counted(study)) == 2
    df = store.to_dataframe()
    assert df["state"].tolist() == ["complete", "complete", "interrupted"]


def test_infeasible_and_failed_states(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "t.db", campaign="c")
    study = store.study("random", 0)
    cand = Candidate(widths={"a": 1})
    t = study.ask()
    TrialStore.finish(study, t, candidate=cand, cost=CostReport(10, 1, 4), result=None, reward=-1.0, seconds=0.0,
                      searcher="random", seed=0, state="infeasible", values=[-1.0], constraints={"macs": 0.5})
    t = study.ask()
    TrialStore.finish(study, t, candidate=cand, cost=None, result=None, reward=None, seconds=0.0,
                      searcher="random", seed=0, state="failed", reason="boom")
    trials = study.get_trials()
    assert trials[0].state == optuna.trial.TrialState.COMPLETE and trials[0].user_attrs["constraints"] == {"macs": 0.5}
    assert list(trials[0].constraints.values()) == [0.5]  # Optuna's own view, read by its samplers
    assert trials[1].state == optuna.trial.TrialState.FAIL and trials[1].user_attrs["reason"] == "boom"
    with pytest.raises(ValueError, match="unknown trial state"):
        TrialStore.finish(study, study.ask(), candidate=cand, cost=None, result=None, reward=None, seconds=0,
                          searcher="random", seed=0, state="weird")


def test_directions_mismatch_is_a_config_error(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "t.db", campaign="c")
    store.study("nsga2", 0, directions=["maximize", "minimize"])
    with pytest.raises(ConfigError, match="directions"):
        store.study("nsga2", 0, directions=["maximize"])


def test_bad_campaign_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="campaign name"):
        TrialStore(tmp_path / "t.db", campaign="a/b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_postgres_url_is_a_clear_error() -> None:
    url = f"postgresql://nobody:secret@127.0.0.1:{_free_port()}/nothing"
    with pytest.raises(AutoPruneError, match="cannot open the trial store") as info:
        TrialStore(url)
    assert "secret" not in str(info.value)  # the password is redacted
    assert "hint" in str(info.value)


def test_bogus_url_scheme_is_a_clear_error() -> None:
    with pytest.raises(AutoPruneError, match="trial store"):
        TrialStore("nosuchdb://x/y")


def _read_only_dir(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        (ro / "probe").touch()
    except OSError:
        return ro
    # root ignores permission bits: use a directory on a read-only mount instead (sysfs)
    (ro / "probe").unlink()
    sysfs = Path("/sys")
    try:
        (sysfs / f"autoprune-probe-{uuid.uuid4().hex}").touch()
    except OSError:
        return sysfs
    pytest.skip("no read-only directory available (running as root without a read-only mount)")


def test_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    ro = _read_only_dir(tmp_path)
    try:
        with pytest.raises(AutoPruneError, match="not writable"):
            TrialStore(ro / "trials.db")
    finally:
        if ro != Path("/sys"):
            ro.chmod(stat.S_IRWXU)


def test_path_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(AutoPruneError, match="not a directory"):
        TrialStore(f / "trials.db")


def _postgres_or_skip() -> str:
    pytest.importorskip("psycopg2", reason="psycopg2 is needed for the PostgreSQL store")
    import psycopg2

    try:
        psycopg2.connect(PG_URL, connect_timeout=3).close()
    except Exception as exc:
        pytest.skip(f"PostgreSQL at {PG_URL} does not answer ({str(exc).strip().splitlines()[0]})")
    return PG_URL


@pytest.mark.postgres
def test_postgres_store_roundtrip() -> None:
    url = _postgres_or_skip()
    campaign = f"pytest-{uuid.uuid4().hex[:12]}"
    store = TrialStore(url, campaign=campaign)
    try:
        _record(store, "tpe", 0, 3)
        _record(store, "tpe", 1, 1)
        other = TrialStore(url, campaign=campaign)  # a second worker
        df = other.to_dataframe()
        assert len(df) == 4 and sorted(set(df["study"])) == [f"{campaign}/tpe/seed0", f"{campaign}/tpe/seed1"]
        store.save_state("tpe", 0, "progress", {"k": 1})
        assert other.load_state("tpe", 0, "progress") == {"k": 1}
    finally:
        assert store.delete() == 2
    assert store.study_names() == []


def test_memory_store_keeps_trials_in_this_process() -> None:
    store = TrialStore(":memory:", campaign="m")
    _record(store, "tpe", 0, 2)
    assert len(store.to_dataframe()) == 2 and store.url == ":memory:"
    assert store.artifact_dir("tpe", 0).is_dir()
    assert TrialStore(":memory:", campaign="m").to_dataframe().empty  # another store: nothing shared
