"""The worker protocol and the seams around it: process checks, the run loop's sharing hooks, the store functions
that hide Optuna's internals, and the campaign modules' layout.

No model is built: a one-group fake problem with a linear cost and a constant-ish evaluator drives the searcher,
so every test runs in well under a second.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from autoprune import campaign, provenance, utils, workers
from autoprune.agents.base import NoSlotLeft, StudySharing, make_searcher
from autoprune.problem import GroupChoice, Problem, SearchSpace
from autoprune.store import COUNTED_STATES, TrialStore, ask_with_attrs, interrupt_trial
from autoprune.types import Candidate, CostReport, EvalResult
from autoprune.workers import HEARTBEAT_ATTR, WORKER_ATTR, SharedStudy, WorkerIdentity, pid_alive

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


class _Evaluator:
    name = "fake"

    def evaluate(self, module: nn.Module, *, key: str | None = None, report: Any = None) -> EvalResult:
        width = module.candidate.widths["g0"]  # type: ignore[attr-defined]
        return EvalResult(0.5 + width / 64, 0.5, 0.0, 0, self.name, {})


class _Built(nn.Module):
    def __init__(self, candidate: Candidate) -> None:
        super().__init__()
        self.candidate = candidate


class _Problem(Problem):
    """One group of 16 channels; MACs proportional to its width."""

    def cost(self, candidate: Candidate) -> CostReport:
        w = candidate.widths.get("g0", 16)
        return CostReport(macs=100 * w, params=10 * w, bytes=40 * w)

    def build(self, candidate: Candidate) -> nn.Module:
        return _Built(candidate)


def problem() -> _Problem:
    space = SearchSpace(groups=(GroupChoice("g0", 16, tuple(range(1, 17))),), min_ratio=0.25)
    return _Problem(model=nn.Identity(), groups=None, space=space, evaluator=_Evaluator(),
                    example_input=torch.zeros(1, 1))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _study(tmp_path: Path) -> optuna.Study:
    return TrialStore(tmp_path / "t.db", campaign="w").study("random", 0)


def _finish(study: optuna.Study, state: str = "complete") -> None:
    t = study.ask()
    t.set_user_attr("state", state)
    if state == "complete":
        study.tell(t, 0.0)
    else:
        study.tell(t, state=TrialState.FAIL)


def _running(study: optuna.Study, *, host: str, pid: int, beat: float) -> optuna.Trial:
    return ask_with_attrs(study, {WORKER_ATTR: {"host": host, "pid": pid, "id": "x"}, HEARTBEAT_ATTR: beat})


# ---------------------------------------------------------------------------------------------------------
# Processes


def test_pid_alive_is_false_for_dead_zombie_and_non_pids() -> None:
    assert pid_alive(os.getpid()) and pid_alive(os.getppid())
    assert not pid_alive(_dead_pid())
    for bad in (None, 0, -1, "123", 1.5):
        assert not pid_alive(bad)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while pid_alive(zombie.pid) and time.monotonic() < deadline:  # exited but not reaped: a zombie
        time.sleep(0.02)
    assert not pid_alive(zombie.pid)
    zombie.wait()


def test_process_checks_have_one_implementation() -> None:
    """``os.kill(pid, 0)`` (is it alive?) appears in workers.py only; RL checkpoints use the same check."""
    from autoprune.agents import rl

    hits = [str(p.relative_to(REPO)) for d in ("autoprune", "agents", "envs", "search_spaces", "benchmarks")
            for p in (REPO / d).rglob("*.py") if re.search(r"os\.kill\([^)]*,\s*0\)", p.read_text())]
    assert hits == ["autoprune/workers.py"], hits
    assert rl.pid_alive is pid_alive


# ---------------------------------------------------------------------------------------------------------
# The store's named functions for Optuna internals


def test_ask_with_attrs_creates_an_owned_running_trial(tmp_path: Path) -> None:
    study = _study(tmp_path)
    _finish(study)
    trial = ask_with_attrs(study, {"owner": "me", "n": 3})
    assert trial.number == 1
    frozen = study.get_trials(deepcopy=False)[1]
    assert frozen.state == TrialState.RUNNING and frozen.user_attrs == {"owner": "me", "n": 3}
    assert trial.suggest_int("x", 0, 3) in range(4)  # a usable trial of the study


def test_interrupt_trial_fails_a_running_trial_once(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.ask()
    frozen = study.get_trials(deepcopy=False)[0]
    interrupt_trial(study, frozen, "its process stopped")
    t = study.get_trials(deepcopy=False)[0]
    assert t.state == TrialState.FAIL and t.user_attrs == {"state": "interrupted", "reason": "its process stopped"}
    with pytest.raises(RuntimeError):  # already finished (by its owner, in a race)
        interrupt_trial(study, frozen, "again")


def test_optuna_private_attributes_are_used_in_store_only() -> None:
    pattern = re.compile(r"\._(storage|study_id|trial_id|thread_local|cached_frozen_trial)\b|cached_all_trials")
    hits = [f"{p.relative_to(REPO)}:{i}" for d in ("autoprune", "agents", "envs", "search_spaces", "benchmarks")
            for p in (REPO / d).rglob("*.py") if p.name != "store.py" or p.parent.name != "autoprune"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


# ---------------------------------------------------------------------------------------------------------
# SharedStudy


def test_shared_study_counts_finished_and_live_running_trials_of_others(tmp_path: Path) -> None:
    study = _study(tmp_path)
    me = WorkerIdentity.current()
    sharing = SharedStudy(me, heartbeat_seconds=1, stale_seconds=60)
    _finish(study)
    _finish(study, "failed")  # counted
    _finish(study, "interrupted")  # not counted
    _running(study, host="elsewhere", pid=1, beat=time.time())  # live: counts
    _running(study, host="elsewhere", pid=1, beat=time.time() - 600)  # stale: does not count
    _running(study, host=me.host, pid=_dead_pid(), beat=time.time())  # its process is gone: does not count
    mine = sharing.ask(study)
    assert study.get_trials(deepcopy=False)[-1].user_attrs[WORKER_ATTR] == me.to_dict()
    assert sharing.occupied(study, counted=0, running=mine) == 3
    assert sharing.occupied(study, counted=0, running=None) == 3  # this very process's trial is abandoned
    assert sharing.admits(study, mine, 4) and not sharing.admits(study, mine, 3)
    assert sharing.admits(study, mine, None)
    sharing.open(study)  # the stale and the orphaned trial (and the one of this process) become interrupted
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert [n for n, s in states.items() if s == TrialState.RUNNING] == [3]


def test_shared_study_heartbeat_refreshes_the_running_trial(tmp_path: Path) -> None:
    study = _study(tmp_path)
    sharing = SharedStudy(heartbeat_seconds=0.05, stale_seconds=60)
    trial = sharing.ask(study)
    first = study.get_trials(deepcopy=False)[0].user_attrs[HEARTBEAT_ATTR]
    def beat() -> float:
        return study.get_trials(deepcopy=False)[0].user_attrs[HEARTBEAT_ATTR]

    with sharing.running(lambda: trial):
        deadline = time.monotonic() + 60  # a failure bound only: the verdict is the stored heartbeat moving
        while beat() <= first and time.monotonic() < deadline:
            time.sleep(0.02)
    assert beat() > first


# ---------------------------------------------------------------------------------------------------------
# The run loop's hooks


class _Recording(StudySharing):
    """The default behaviour, with every hook call logged; ``full_at`` makes the n-th ask find no slot."""

    def __init__(self, full_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.asks = 0
        self.full_at = full_at

    def open(self, study: optuna.Study) -> None:
        self.calls.append("open")
        super().open(study)

    def ask(self, study: optuna.Study) -> optuna.Trial:
        self.asks += 1
        self.calls.append("ask")
        return super().ask(study)

    def admits(self, study: optuna.Study, trial: optuna.Trial, n_trials: int | None) -> bool:
        return self.asks != self.full_at

    def writing(self) -> AbstractContextManager[None]:
        @contextmanager
        def log() -> Iterator[None]:
            self.calls.append("write")
            yield

        return log()

    def running(self, current: Callable[[], optuna.Trial | None]) -> AbstractContextManager[None]:
        @contextmanager
        def loop() -> Iterator[None]:
            self.calls.append("start")
            yield
            self.calls.append("end")

        return loop()


def test_searcher_run_goes_through_the_sharing_hooks() -> None:
    sharing = _Recording()
    s = make_searcher("random", problem(), store=TrialStore(":memory:", campaign="w"), budget={"macs": 0.5},
                      n_trials=2, seed=0, sharing=sharing)
    res = s.run()
    assert res.stop_reason == "n_trials" and len(res.trials) == 2
    assert sharing.calls == ["open", "start", "write", "ask", "write", "write", "ask", "write", "end"]


def test_default_sharing_proposes_what_a_shared_study_proposes() -> None:
    def keys(sharing: StudySharing | None) -> list[str]:
        s = make_searcher("random", problem(), store=TrialStore(":memory:", campaign="w"), budget={"macs": 0.5},
                          n_trials=4, seed=3, sharing=sharing)
        assert isinstance(s.sharing, StudySharing)
        return [r.candidate.key() for r in s.run().trials]

    assert keys(None) == keys(SharedStudy(heartbeat_seconds=1, stale_seconds=60))


def test_no_slot_left_gives_the_trial_back_and_stops_with_n_trials() -> None:
    store = TrialStore(":memory:", campaign="w")
    s = make_searcher("random", problem(), store=store, budget={"macs": 0.5}, n_trials=5, seed=0,
                      sharing=_Recording(full_at=3))
    res = s.run()
    assert res.stop_reason == "n_trials" and len(res.trials) == 2
    df = store.to_dataframe().set_index("number")
    assert df.loc[2, "state"] == "interrupted" and "other workers" in df.loc[2, "reason"]
    assert df["state"].isin(COUNTED_STATES).sum() == 2
    s.study, s.sharing = store.study("random", 0), _Recording(full_at=1)
    with pytest.raises(NoSlotLeft):
        s.new_trial()


# ---------------------------------------------------------------------------------------------------------
# Module layout


def test_campaign_re_exports_the_names_that_moved() -> None:
    for name in ("CONFIG_FILE", "COMMAND_FILE", "HISTORY_FILE", "ENVIRONMENT_FILE", "SPACE_FILE", "STORE_FILE",
                 "IDENTITY_KEYS", "storage_location", "open_store", "check_identity",
                 "git_commit", "environment_info", "command_line", "write_provenance", "load_resolved"):
        assert getattr(campaign, name) is getattr(provenance, name), name
    for name in ("WORKER_ATTR", "HEARTBEAT_ATTR", "WorkerIdentity", "pid_alive", "is_stale", "fail_stale",
                 "deferred_sigint"):
        assert getattr(campaign, name) is getattr(workers, name), name
    assert campaign.prepare_out_dir is utils.prepare_out_dir  # output directories of every command
    assert set(campaign.__all__) <= set(dir(campaign))


def test_report_reads_campaign_directories_without_the_campaign_module() -> None:
    code = ("import sys, autoprune.report; "
            "sys.exit(1 if 'autoprune.campaign' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0
    source = (REPO / "autoprune" / "report.py").read_text()
    assert not re.search(r"^\s*(from autoprune\.campaign import|import autoprune\.campaign)", source, re.M)
