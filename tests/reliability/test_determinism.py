"""Determinism: the same config and seed give the identical trial sequence (candidates, states, rewards) for
every Optuna and baseline searcher, in short runs; RL searchers within their documented limits (same seed, one
uninterrupted run on the same machine and thread count: identical; across a resume: not guaranteed).
"""

from __future__ import annotations

from typing import Any

import pytest

from autoprune import campaign
from autoprune.agents.base import SEARCHERS, load_builtin_searchers
from autoprune.config import config_from_dict
from autoprune.store import TrialStore

from . import config_dict

pytestmark = pytest.mark.reliability

load_builtin_searchers()
OPTUNA = ["tpe", "cmaes", "optuna_random", "qmc", "gp", "nsga2"]
BASELINES = ["uniform", "random", "global_magnitude", "sensitivity"]
KWARGS: dict[str, dict[str, Any]] = {"tpe": {"n_startup_trials": 2}, "gp": {"n_startup_trials": 2},
                                     "ddpg": {"warmup_episodes": 2, "buffer_episodes": 20, "net_arch": [16, 16],
                                              "batch_size": 4}}


@pytest.fixture(scope="module")
def camp(tmp_path_factory: pytest.TempPathFactory) -> campaign.Campaign:
    cfg = config_from_dict(config_dict(tmp_path_factory.mktemp("det") / "out"))
    return campaign.build_campaign(cfg, measure_dense=False)


def sequence(camp: campaign.Campaign, name: str, n: int, seed: int = 3) -> list[tuple[Any, ...]]:
    store = TrialStore(":memory:", campaign="det")
    s = campaign.make_campaign_searcher(camp, store, name, seed=seed, kwargs=KWARGS.get(name, {}), n_trials=n,
                                        problem=camp.new_problem())
    result = s.run()
    return [(t.candidate.key(), t.state, None if t.reward is None else round(float(t.reward), 9))
            for t in result.trials]


@pytest.mark.parametrize("name", [n for n in OPTUNA + BASELINES if n in SEARCHERS.names()])
def test_same_config_and_seed_give_the_same_trial_sequence(camp: campaign.Campaign, name: str) -> None:
    first = sequence(camp, name, 4)
    assert first, name
    assert sequence(camp, name, 4) == first


def test_rl_is_reproducible_within_one_uninterrupted_run(camp: campaign.Campaign) -> None:
    first = sequence(camp, "ddpg", 5)
    assert len(first) == 5
    assert sequence(camp, "ddpg", 5) == first
