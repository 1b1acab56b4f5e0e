"""Faults inside a trial: a diverging fine-tune, a forward that raises, an evaluation past its time limit.

Each is recorded as a ``failed`` trial with its reason, the campaign goes on to ``n_trials``, and the searcher is
told: Optuna gets a FAIL trial, baselines and RL agents the objective's failure reward. Faults are injected by an
evaluator registered for these tests (``adaptive_bn`` that, on chosen calls, poisons a weight before a real SGD
step, hooks a raising forward, or slows every forward down under a short ``timeout``): the product's own
divergence check, time-limit check and failure handling do the rest.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from torch import nn

from autoprune import campaign, provenance
from autoprune.config import config_from_dict
from autoprune.evaluate import EVALUATORS, AdaptiveBNEvaluator, SGDSettings, StepTrainer, TrialTimeout
from autoprune.types import EvalResult

from . import config_dict

pytestmark = pytest.mark.reliability

FAULTS = {1: "nan", 3: "raise", 4: "slow"}  # evaluation call index → fault
EXPECTED_REASON = {"nan": "DivergedError", "raise": "injected forward failure", "slow": "TrialTimeout"}


class FaultyEvaluator(AdaptiveBNEvaluator):
    """``adaptive_bn``, with a fault on chosen calls (see the module docstring)."""

    name = "test_faulty"

    def __init__(self, train_loader: Any = None, val_loader: Any = None, *, faults: dict[int, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(train_loader, val_loader, **kwargs)
        self.faults = {int(k): v for k, v in (faults or {}).items()}
        self.calls = 0
        self._fault: str | None = None

    def evaluate(self, model: nn.Module, *, key: str | None = None, report: Any = None) -> EvalResult:
        self._fault = self.faults.get(self.calls)
        self.calls += 1
        self.timeout = 0.3 if self._fault == "slow" else None
        return super().evaluate(model, key=key, report=report)

    def _run(self, model: nn.Module, report: Any) -> Any:
        if self._fault == "nan":
            with torch.no_grad():
                next(p for p in model.parameters() if p.dim() > 1).fill_(float("nan"))
            StepTrainer(model, self.train_loader or [], SGDSettings(lr=0.01), device=self.device).run(2)
        elif self._fault == "raise":
            def boom(module: nn.Module, args: Any, output: Any) -> None:
                raise RuntimeError("injected forward failure")
            model.register_forward_hook(boom)
        elif self._fault == "slow":
            model.register_forward_pre_hook(lambda module, args: time.sleep(0.2))
        return super()._run(model, report)


if "test_faulty" not in EVALUATORS.names():
    EVALUATORS.register("test_faulty")(FaultyEvaluator)

SEARCHER_KWARGS: dict[str, dict[str, Any]] = {
    "tpe": {"n_startup_trials": 2},
    "random": {},
    "ddpg": {"warmup_episodes": 2, "buffer_episodes": 20, "net_arch": [16, 16], "batch_size": 4,
             "reward_baseline": None},
}


@pytest.mark.parametrize("searcher", ["tpe", "random", "ddpg"])
def test_failed_candidates_are_recorded_and_the_campaign_goes_on(searcher: str, tmp_path: Path) -> None:
    n = 7
    cfg = config_from_dict(config_dict(tmp_path / "out", n_trials=n,
                                       evaluator={"name": "test_faulty", "kwargs": {"batches": 2, "faults": FAULTS}},
                                       searcher={"name": searcher, "kwargs": SEARCHER_KWARGS[searcher]}))
    camp = campaign.build_campaign(cfg, measure_dense=False)
    store = provenance.open_store(cfg)
    s = campaign.make_campaign_searcher(camp, store, searcher, seed=0, kwargs=SEARCHER_KWARGS[searcher])
    result = s.run()
    assert result.stop_reason == "n_trials" and len(result.trials) == n
    failed = [t for t in result.trials if t.state == "failed"]
    kinds = sorted(FAULTS.values())
    assert len(failed) == len(kinds), [(t.state, t.reason) for t in result.trials]
    for kind in kinds:
        assert any(EXPECTED_REASON[kind] in t.reason for t in failed), (kind, [t.reason for t in failed])
    penalty = s.failure_value()
    assert math.isfinite(penalty)
    for t in failed:
        assert t.result is None and t.reward == pytest.approx(penalty)
    study = optuna.load_study(study_name=store.study_name(searcher, 0), storage=store.storage)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for t in failed:  # Optuna is told FAIL: samplers exclude the candidate instead of learning a fake score
        assert by_number[t.number].state == optuna.trial.TrialState.FAIL
    assert all(t.result is not None for t in result.trials if t.state == "complete")
    if searcher == "ddpg":  # the agent learned the penalty for each failed episode (no reward baseline)
        rb = s.model.replay_buffer
        rewards = rb.rewards[: rb.size()].reshape(-1).tolist()
        assert sum(r == pytest.approx(penalty) for r in rewards) >= len(failed)


def test_time_limit_per_trial_reaches_the_evaluator(tmp_path: Path) -> None:
    cfg = config_from_dict(config_dict(tmp_path / "out", time_limit_per_trial=0.5))
    camp = campaign.build_campaign(cfg, measure_dense=False)
    assert camp.evaluator.inner.timeout == 0.5
    slow = nn.Sequential(camp.model, nn.Identity())
    slow.register_forward_pre_hook(lambda module, args: time.sleep(0.3))
    with pytest.raises(TrialTimeout, match=r"per-trial time limit of 0\.5 s"):
        camp.evaluator.evaluate(slow)
    with pytest.raises(Exception, match="time_limit_per_trial: must be > 0"):
        config_from_dict(config_dict(tmp_path / "out", time_limit_per_trial=0))
