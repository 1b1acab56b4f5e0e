"""Process faults: SIGKILL at random points of a campaign, then resume; concurrent workers; store creation races;
atomic agent checkpoints.

Kills land during start-up (imports, store creation, provenance), during evaluations, during the ~20 store
writes of each trial and, for the RL searcher (a checkpoint after every episode), during agent checkpointing.
After every cycle the store must open with Optuna and pass SQLite's integrity check; at the end exactly
``n_trials`` trials count, their numbers are unique, nothing is left running, and for the ``random`` searcher the
counted candidates are exactly the uninterrupted sequence (no trial lost, none twice).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autoprune import campaign, provenance
from autoprune.config import load_config
from autoprune.store import TrialStore
from autoprune.workers import WORKER_ATTR

from . import check_study, run_cli, start, write_config

pytestmark = pytest.mark.reliability


def finished(db: Path) -> int:
    """Finished trials in the SQLite store (0 before the tables exist)."""
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state != 'RUNNING'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def kill_at_random_point(cmd: tuple[str, ...], cwd: Path, db: Path, rng: random.Random, *,
                         startup_share: float = 0.2, max_delay: float = 0.5) -> str:
    """Start ``autoprune CMD``, SIGKILL it at a random moment; return where (``startup``/``search``/``done``)."""
    before = finished(db)
    p = start(*cmd, cwd=cwd)
    try:
        if rng.random() < startup_share:
            where = "startup"
            time.sleep(rng.uniform(0.2, 4.0))
        else:
            where = "search"
            end = time.monotonic() + 120
            while finished(db) <= before and p.poll() is None and time.monotonic() < end:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, max_delay))
        if p.poll() is not None:
            out, err = p.communicate()
            assert p.returncode == 0, (out, err)
            return "done"
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
        return where
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_random_kill_resume_cycles_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    n, cycles = 120, 10
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", out, n_trials=n, searcher={"name": "random"})
    db = out / "trials.db"
    rng = random.Random(11)
    where = []
    for _ in range(cycles):
        where.append(kill_at_random_point(("search", "c.yaml"), tmp_path, db, rng))
        if db.exists() and finished(db):
            check_study(db, "rel/random/seed0", killed=True)  # consistent after every kill
    assert where.count("search") >= cycles // 2, where
    code, stdout, stderr = run_cli("search", "c.yaml", cwd=tmp_path)
    assert code == 0, (stdout, stderr)
    assert f"random seed0: {n} trials (n_trials)" in stdout
    counted = check_study(db, "rel/random/seed0", n)
    keys = [t.user_attrs["key"] for t in sorted(counted, key=lambda t: t.number)]
    # The uninterrupted sequence: trial k of `random` is a function of (seed, k) only.
    cfg = load_config(config)
    camp = campaign.build_campaign(cfg, measure_dense=False)
    ref = campaign.make_campaign_searcher(camp, TrialStore(":memory:", campaign="rel"), "random", seed=0)
    assert keys == [ref.propose(i)[0].key() for i in range(n)]
    store = TrialStore(db, campaign="rel")
    df = store.to_dataframe()
    assert (df["state"] == "interrupted").sum() <= cycles
    assert df["reason"][df["state"] == "interrupted"].str.contains("killed").all()


def test_rl_kill_resume_cycles_restore_or_rebuild_the_agent(tmp_path: Path) -> None:
    n, cycles = 30, 3
    out = tmp_path / "out"
    kwargs = {"warmup_episodes": 3, "buffer_episodes": 50, "net_arch": [16, 16], "batch_size": 4, "save_every": 1}
    config = write_config(tmp_path / "c.yaml", out, n_trials=n, searcher={"name": "ddpg", "kwargs": kwargs})
    db = out / "trials.db"
    rng = random.Random(5)
    for _ in range(cycles):
        kill_at_random_point(("search", "c.yaml"), tmp_path, db, rng, startup_share=0.0, max_delay=1.0)
        if finished(db):
            check_study(db, "rel/ddpg/seed0", killed=True)
    code, stdout, stderr = run_cli("search", "c.yaml", cwd=tmp_path)
    assert code == 0, (stdout, stderr)
    check_study(db, "rel/ddpg/seed0", n)
    # The checkpoint the store points at is complete (its checksum matches) and loads.
    cfg = load_config(config)
    camp = campaign.build_campaign(cfg, measure_dense=False)
    s = campaign.make_campaign_searcher(camp, provenance.open_store(cfg), "ddpg", seed=0, kwargs=kwargs)
    s.study = s.store.study("ddpg", 0)
    s._count = n
    s.make_agent(s.make_env())
    assert s.resumed_from.get("episodes") == n
    left = sorted(p.name for p in (out / "artifacts" / "ddpg" / "seed0").iterdir())
    assert len(left) == 2, left  # the current agent and replay buffer only; older and temporary files removed


def _check_workers(tmp_path: Path, workers: int, n: int) -> None:
    out = tmp_path / "out"
    write_config(tmp_path / "c.yaml", out, n_trials=n, searcher={"name": "random"})
    procs = [start("search" if i == 0 else "worker", "c.yaml", cwd=tmp_path) for i in range(workers)]
    results = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
    for pid, stdout, stderr, code in results:
        assert code == 0, (pid, stdout, stderr)
    counted = check_study(out / "trials.db", "rel/random/seed0", n)
    owners = {t.user_attrs[WORKER_ATTR]["pid"] for t in counted}
    assert owners <= {p.pid for p in procs} and len(owners) >= 2, owners


@pytest.mark.parametrize("workers,n", [(2, 30), (4, 40)])
def test_concurrent_workers_on_a_fresh_sqlite_store_count_exactly_n_trials(tmp_path: Path, workers: int,
                                                                           n: int) -> None:
    _check_workers(tmp_path, workers, n)


def _open_new_store(path: str, barrier: mp.synchronize.Barrier, queue: mp.Queue) -> None:
    try:
        barrier.wait(timeout=60)
        store = TrialStore(path, campaign="race")
        store.study("random", 0)
        queue.put("ok")
    except BaseException as exc:  # reported to the parent
        queue.put(f"{type(exc).__name__}: {exc}")


def test_processes_creating_one_new_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    for round_ in range(4):
        path = str(tmp_path / f"r{round_}" / "trials.db")
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_new_store, args=(path, barrier, queue)) for _ in range(4)]
        for p in procs:
            p.start()
        answers = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert answers == ["ok"] * 4, answers
        assert len(TrialStore(path, campaign="race").study_names()) == 1


def test_agent_checkpoints_are_written_atomically(tmp_path: Path) -> None:
    """A process killed while writing a checkpoint leaves the previous complete file, never half a new one."""
    target = tmp_path / "agent.zip"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from autoprune.agents.rl import _atomic_save

        def slow_save(path):
            with open(path, "wb") as fh:
                for _ in range(1000):
                    fh.write(b"x" * 1024)
                    fh.flush()
                    time.sleep(0.002)

        Path({str(target)!r}).write_bytes(b"complete previous checkpoint")
        print("writing", flush=True)
        _atomic_save(Path({str(target)!r}), slow_save)
    """)
    for delay in (0.1, 0.4, 0.9):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "writing"
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        assert target.read_bytes() == b"complete previous checkpoint"
        for tmp in tmp_path.glob(".agent.*.tmp.zip"):
            tmp.unlink()  # what a killed writer leaves: a temporary file under another name
