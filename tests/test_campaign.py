"""Campaign wiring, in process: config → campaign, determinism, interrupt/resume, workers, budgets, provenance.

Everything runs on ``small_cnn`` (width 8) on the offline digits with a 2-batch adaptive-BN evaluator, so a
trial takes a few milliseconds of compute; the CLI (subprocesses, signals) is tested in test_cli_campaign.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from autoprune import campaign, provenance
from autoprune.agents.base import NoSlotLeft
from autoprune.config import config_from_dict, load_config
from autoprune.errors import AutoPruneError, CheckpointError, ConfigError
from autoprune.store import COUNTED_STATES, TrialStore
from autoprune.utils import prepare_out_dir
from autoprune.workers import HEARTBEAT_ATTR, WORKER_ATTR, WorkerIdentity, is_stale

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def tiny(out: Path, **patch: Any) -> dict[str, Any]:
    """A tiny campaign: small_cnn/8 on digits, 2 calibration batches, half the MACs."""
    data: dict[str, Any] = {
        "name": "tiny",
        "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "dataset": {"name": "digits", "batch_size": 64},
        "evaluator": {"name": "adaptive_bn", "kwargs": {"batches": 2}},
        "objective": {"budget": {"macs": 0.5}},
        "searcher": {"name": "random", "agent_kwargs": {"tpe": {"n_startup_trials": 2}}},
        "n_trials": 5,
        "output_dir": str(out),
        "workers": {"heartbeat_seconds": 0.2, "stale_seconds": 5},
    }
    for key, value in patch.items():
        data[key] = value
    return data


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny models: more threads only add contention on a shared 2-core machine


@pytest.fixture(scope="module")
def camp(tmp_path_factory: pytest.TempPathFactory) -> campaign.Campaign:
    out = tmp_path_factory.mktemp("camp") / "tiny"
    return campaign.build_campaign(config_from_dict(tiny(out)))


def store_at(path: Path) -> TrialStore:
    return TrialStore(path, campaign="tiny")


def keys(store: TrialStore, searcher: str = "random", seed: int = 0) -> list[str]:
    df = store.to_dataframe(searcher, seed)
    return df[df["state"].isin(COUNTED_STATES)].sort_values("number")["key"].tolist()


class Interrupting:
    """An evaluator that raises KeyboardInterrupt (like Ctrl-C) on its ``at``-th call."""

    def __init__(self, inner: Any, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0
        self.name = inner.name

    def evaluate(self, model: Any, *, key: str | None = None, report: Any = None) -> Any:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner.evaluate(model, key=key, report=report)


# ---------------------------------------------------------------------------------------------------------


def test_example_configs_validate_and_name_existing_searchers() -> None:
    from autoprune.agents.base import SEARCHERS, load_builtin_searchers
    from autoprune.evaluate import EVALUATORS
    from autoprune.search_spaces import SEARCH_SPACES

    load_builtin_searchers()
    files = sorted((REPO / "configs").glob("*.yaml"))
    families = set()
    for f in files:
        cfg = load_config(f)
        SEARCHERS.get(cfg.searcher.name)
        EVALUATORS.get(cfg.evaluator.name)
        families.add(cfg.search_space.family or "generic")
        if cfg.model.checkpoint and cfg.model.checkpoint.startswith("../shared/"):
            assert (REPO / cfg.model.checkpoint).name.endswith(".th"), f
    assert {"cifar_resnet", "vgg", "mobilenetv2", "generic"} <= families
    for fam in families:
        SEARCH_SPACES.get(fam)
    models = {load_config(f).model.name for f in files}
    assert {"resnet20", "resnet56", "vgg16_bn", "mobilenetv2", "small_cnn"} <= models


def test_campaign_is_built_from_the_config(camp: campaign.Campaign) -> None:
    assert len(camp.space.groups) == 4 and not camp.space.layers
    assert camp.model_kwargs["in_channels"] == 1 and camp.model_kwargs["width"] == 8
    assert tuple(camp.example_input.shape) == (1, 1, 8, 8)
    assert 0.0 <= camp.dense_accuracy <= 1.0
    assert camp.budget().macs == 0.5
    # Every evaluation is a function of the candidate: the same module scores the same twice.
    cand = camp.space.minimal()
    a = camp.evaluator.evaluate(camp.problem.build(cand)).accuracy
    b = camp.evaluator.evaluate(camp.problem.build(cand)).accuracy
    assert a == b


@pytest.mark.parametrize("searcher", ["random", "tpe"])
def test_same_config_and_seed_give_the_same_trial_sequence(camp: campaign.Campaign, tmp_path: Path,
                                                           searcher: str) -> None:
    s1, s2, s3 = store_at(tmp_path / "a.db"), store_at(tmp_path / "b.db"), store_at(tmp_path / "c.db")
    campaign.run_search(camp, s1, searcher=searcher, n_trials=4, quiet=True)
    campaign.run_search(camp, s2, searcher=searcher, n_trials=4, quiet=True, fresh_problem=True)
    campaign.run_search(camp, s3, searcher=searcher, seed=1, n_trials=4, quiet=True)
    assert len(keys(s1, searcher)) == 4
    assert keys(s1, searcher) == keys(s2, searcher)
    assert keys(s1, searcher) != keys(s3, searcher, seed=1)


def test_interrupt_then_resume_equals_an_uninterrupted_search(camp: campaign.Campaign, tmp_path: Path) -> None:
    ref = store_at(tmp_path / "ref.db")
    campaign.run_search(camp, ref, n_trials=6, quiet=True, fresh_problem=True)
    store = store_at(tmp_path / "int.db")
    broken = dataclasses.replace(camp, evaluator=Interrupting(camp.evaluator, at=3), _problem=None)
    res = campaign.run_search(broken, store, n_trials=6, quiet=True)
    assert res.stop_reason == "interrupted"
    df = store.to_dataframe()
    assert sorted(df["state"]) == ["complete", "complete", "interrupted"]
    res = campaign.run_search(camp, store, n_trials=6, quiet=True, fresh_problem=True)
    assert res.stop_reason == "n_trials" and len(res.trials) == 6
    assert keys(store) == keys(ref)
    assert len(set(keys(store))) == len(keys(store))
    study = optuna.load_study(study_name="tiny/random/seed0", storage=store.storage)
    assert not study.get_trials(states=(TrialState.RUNNING,))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_trial_of_a_killed_process_is_marked_interrupted_and_redone(camp: campaign.Campaign, tmp_path: Path) -> None:
    ref = store_at(tmp_path / "ref.db")
    campaign.run_search(camp, ref, n_trials=4, quiet=True, fresh_problem=True)
    store = store_at(tmp_path / "kill.db")
    campaign.run_search(camp, store, n_trials=2, quiet=True)
    study = store.study("random", 0)
    orphan = study.ask()  # what SIGKILL leaves behind: a RUNNING trial of a process that is gone
    orphan.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": _dead_pid(), "id": "x"})
    orphan.set_user_attr(HEARTBEAT_ATTR, time.time())
    res = campaign.run_search(camp, store, n_trials=4, quiet=True)
    assert len(res.trials) == 4
    states = store.to_dataframe().set_index("number")["state"]
    assert states[orphan.number] == "interrupted"
    assert keys(store) == keys(ref)


def _frozen(attrs: dict[str, Any], started: float | None = None) -> optuna.trial.FrozenTrial:
    from datetime import datetime

    return optuna.trial.FrozenTrial(
        number=0, state=TrialState.RUNNING, value=None, values=None,
        datetime_start=datetime.fromtimestamp(started if started is not None else time.time()),
        datetime_complete=None, params={}, distributions={}, user_attrs=attrs, system_attrs={},
        intermediate_values={}, trial_id=0)


def test_staleness_rules() -> None:
    me = WorkerIdentity.current()
    now = time.time()
    host = me.host
    live = {"host": host, "pid": os.getppid(), "id": "p"}
    assert not is_stale(_frozen({WORKER_ATTR: live, HEARTBEAT_ATTR: now}), me=me, stale_seconds=60)
    dead = {"host": host, "pid": _dead_pid(), "id": "d"}
    assert is_stale(_frozen({WORKER_ATTR: dead, HEARTBEAT_ATTR: now}), me=me, stale_seconds=60)
    mine = {"host": host, "pid": os.getpid(), "id": "m"}
    assert is_stale(_frozen({WORKER_ATTR: mine, HEARTBEAT_ATTR: now}), me=me, stale_seconds=60)
    far = {"host": host + "-elsewhere", "pid": 1, "id": "f"}
    assert not is_stale(_frozen({WORKER_ATTR: far, HEARTBEAT_ATTR: now - 30}), me=me,
                        stale_seconds=60)
    assert is_stale(_frozen({WORKER_ATTR: far, HEARTBEAT_ATTR: now - 90}), me=me, stale_seconds=60)
    # A trial that has no owner yet (just asked by another process) is live until its start is stale.
    assert not is_stale(_frozen({}, started=now - 1), me=me, stale_seconds=60)
    assert is_stale(_frozen({}, started=now - 120), me=me, stale_seconds=60)


def _foreign_running(study: optuna.Study) -> optuna.Trial:
    t = study.ask()
    t.set_user_attr(WORKER_ATTR, {"host": "another-host", "pid": 4242, "id": "w2"})
    t.set_user_attr(HEARTBEAT_ATTR, time.time())
    return t


def test_live_trials_of_other_workers_count_towards_n_trials(camp: campaign.Campaign, tmp_path: Path) -> None:
    store = store_at(tmp_path / "w.db")
    campaign.run_search(camp, store, n_trials=2, quiet=True)
    other = _foreign_running(store.study("random", 0))
    res = campaign.run_search(camp, store, n_trials=3, quiet=True)  # 2 done + 1 running elsewhere = 3
    assert res.stop_reason == "n_trials"
    df = store.to_dataframe()
    assert len(df) == 3 and (df["state"] == "complete").sum() == 2
    study = optuna.load_study(study_name="tiny/random/seed0", storage=store.storage)
    assert [t.number for t in study.get_trials(states=(TrialState.RUNNING,))] == [other.number]


def test_a_trial_beyond_n_trials_is_given_back(camp: campaign.Campaign, tmp_path: Path) -> None:
    """The race of two workers asking for the last slot: the later trial number yields."""
    store = store_at(tmp_path / "race.db")
    campaign.run_search(camp, store, n_trials=2, quiet=True)
    s = campaign.make_campaign_searcher(camp, store, "random", seed=0, n_trials=3)
    s.study = store.study("random", 0)
    _foreign_running(s.study)  # trial 2 (the last slot) was just taken by another worker
    with pytest.raises(NoSlotLeft):
        s.new_trial()  # asked concurrently: trial 3, beyond n_trials
    df = store.to_dataframe().set_index("number")
    assert df.loc[3, "state"] == "interrupted" and "other workers" in df.loc[3, "reason"]
    assert (df["state"].isin(COUNTED_STATES)).sum() == 2


def test_joint_pruning_and_quantization_campaign(tmp_path: Path) -> None:
    space = {"quantize": True, "w_bits": [4, 6, 8], "a_bits": [None, 8]}
    cfg = config_from_dict(tiny(tmp_path / "q", n_trials=3, search_space=space,
                                objective={"budget": {"size_bytes": 0.4}}))
    qcamp = campaign.build_campaign(cfg)
    assert len(qcamp.space.layers) == 5
    store = store_at(tmp_path / "q.db")
    res = campaign.run_search(qcamp, store, quiet=True)
    assert len(res.trials) == 3 and all(t.state == "complete" for t in res.trials)
    assert all(t.candidate.bits and t.cost.bytes <= 0.4 * qcamp.problem.dense_cost.bytes for t in res.trials)
    assert any(spec.a_bits == 8 for t in res.trials for spec in t.candidate.bits.values())


def test_impossible_budget_names_the_minimum_and_keeps_stored_trials(tmp_path: Path) -> None:
    out = tmp_path / "c"
    cfg = config_from_dict(tiny(out, n_trials=2))
    camp_, store = campaign.open_campaign(cfg, argv=["search", "c.yaml"])
    campaign.run_search(camp_, store, quiet=True)
    bad = config_from_dict(tiny(out), ["objective.budget.macs=0.001"])
    with pytest.raises(ConfigError) as err:
        campaign.open_campaign(bad)
    msg = str(err.value)
    assert "smallest achievable" in msg and "objective.budget.macs=0.001" in msg
    floor = camp_.problem.cost(camp_.space.minimal()).macs
    assert f"{floor:,}" in msg and "hint" in msg
    assert len(provenance.open_store(cfg).to_dataframe()) == 2


def test_changed_problem_is_refused_but_n_trials_may_grow(tmp_path: Path) -> None:
    out = tmp_path / "c"
    cfg = config_from_dict(tiny(out, n_trials=2))
    camp, store = campaign.open_campaign(cfg)
    campaign.run_search(camp, store, quiet=True)  # the first trial fixes the problem of the directory
    with pytest.raises(ConfigError, match=r"evaluator\.kwargs.*another problem|another problem.*evaluator"):
        campaign.open_campaign(config_from_dict(tiny(out), ["evaluator.kwargs.batches=3"]))
    campaign.open_campaign(config_from_dict(tiny(out), ["n_trials=9", "searcher.name=tpe"]))
    assert yaml.safe_load((out / provenance.CONFIG_FILE).read_text())["n_trials"] == 9


def test_provenance_is_written_beside_the_results(tmp_path: Path) -> None:
    out = tmp_path / "c"
    cfg = config_from_dict(tiny(out))
    campaign.open_campaign(cfg, argv=["search", "my campaign.yaml", "n_trials=5"])
    assert load_config(out / provenance.CONFIG_FILE) == cfg
    assert "autoprune search 'my campaign.yaml' n_trials=5" in (out / provenance.COMMAND_FILE).read_text()
    env = json.loads((out / provenance.ENVIRONMENT_FILE).read_text())
    assert env["packages"]["torch"] and env["packages"]["optuna"] and "git" in env
    if env["git"] is not None:
        assert len(env["git"]["commit"]) == 40
    space = json.loads((out / provenance.SPACE_FILE).read_text())
    assert [g["size"] for g in space["groups"]] == [8, 8, 16, 16] and space["dense"]["macs"] > 0
    campaign.open_campaign(cfg, argv=["worker", "x.yaml"], role="worker")
    log = (out / provenance.HISTORY_FILE).read_text().splitlines()
    assert len(log) == 2 and "\tworker\t" in log[1]
    assert "autoprune search" in (out / provenance.COMMAND_FILE).read_text()  # a worker keeps the first command


def test_compare_runs_every_agent_and_seed_on_the_same_problem(camp: campaign.Campaign, tmp_path: Path) -> None:
    store = store_at(tmp_path / "cmp.db")
    c = dataclasses.replace(camp, config=dataclasses.replace(camp.config, n_trials=2), _problem=None)
    board = campaign.compare(c, store, ["random", "tpe"], [0, 1], quiet=True)
    assert set(board["agent"]) == {"random", "tpe", "uniform"}
    row = board.set_index("agent").loc["tpe"]
    assert row["seeds"] == 2 and row["trials_mean"] == 2
    assert store.study_names() == ["tiny/random/seed0", "tiny/random/seed1", "tiny/tpe/seed0", "tiny/tpe/seed1",
                                   "tiny/uniform/seed0"]
    with pytest.raises(ConfigError, match="unknown searcher"):
        campaign.compare(c, store, ["random", "nosuchagent"], [0])


def test_bad_locations_fail_with_clear_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(AutoPruneError, match="cannot create the output directory"):
        prepare_out_dir(blocker / "sub")
    cfg = config_from_dict(tiny(tmp_path / "c"), ["storage=postgresql://nobody@127.0.0.1:1/none"])
    with pytest.raises(AutoPruneError, match="cannot open the trial store"):
        provenance.open_store(cfg)
    cfg = config_from_dict(tiny(tmp_path / "c"), ["model.checkpoint=missing/checkpoint.pt"])
    with pytest.raises(CheckpointError, match="does not exist"):
        campaign.check_checkpoint(cfg)


@pytest.mark.parametrize("score", ["soft_accuracy", "kl"])
def test_a_campaign_ranks_by_the_evaluators_score_and_stores_it(tmp_path: Path, score: str) -> None:
    cfg = config_from_dict(tiny(tmp_path / "out", evaluator={"name": "adaptive_bn",
                                                              "kwargs": {"batches": 2, "score": score}}))
    camp = campaign.build_campaign(cfg, measure_dense=False)
    inner = camp.evaluator.inner
    assert inner.score == score
    assert (inner.reference_model is camp.model) == (score == "kl")  # the dense model, passed in
    store = store_at(tmp_path / "s.db")
    campaign.run_search(camp, store, n_trials=3, quiet=True)
    recs = [r for r in store.trials("random", 0) if r.result is not None]
    assert len(recs) == 3
    for r in recs:  # the reward reads the score, the stored accuracy stays top-1
        assert r.result.score is not None and 0.0 <= r.result.score <= 1.0
        reward = camp.objective().make_reward()
        assert r.reward == pytest.approx(reward(r.result, r.cost, camp.problem.dense_cost, camp.budget()))
        top1 = dataclasses.replace(r.result, score=None)
        assert r.reward != pytest.approx(reward(top1, r.cost, camp.problem.dense_cost, camp.budget()))
