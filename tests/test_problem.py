"""The Problem seam: pricing, building (prune + quantize + calibrate) and cached evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune import graph
from autoprune.errors import ConfigError
from autoprune.evaluate import CandidateEvaluator, ReportFn, make_evaluator
from autoprune.models import build_model
from autoprune.problem import Problem
from autoprune.search_spaces import build_space
from autoprune.types import Candidate, EvalResult, QuantSpec


def _problem(calib: bool, evaluator: CandidateEvaluator | None = None) -> Problem:
    model = build_model("small_cnn", num_classes=10, in_channels=1).eval()
    x = torch.rand(1, 1, 8, 8)
    groups = graph.analyze(model, x)
    space = build_space(groups, model=model, model_name="small_cnn", quantize=True, a_bits=(None, 8))
    batches = [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(3)]
    evaluator = evaluator or make_evaluator("plain", None, batches)
    return Problem(model, groups, space, evaluator, x, calib_loader=batches if calib else None, calib_batches=2)


class CountingEvaluator:
    """A :class:`~autoprune.evaluate.CandidateEvaluator`: counts its calls; stops when ``report`` says so."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def evaluate(self, model: nn.Module, *, key: str | None = None, report: ReportFn | None = None) -> EvalResult:
        self.calls += 1
        if report is not None and report(1, 0.25):
            return EvalResult(0.25, 1.0, evaluator=self.name, extra={"pruned": True, "key": key})
        return EvalResult(0.5, 1.0, evaluator=self.name, extra={"pruned": False, "key": key})


def test_evaluate_is_cached_and_cost_matches_built_model() -> None:
    p = _problem(calib=False)
    cand = Candidate(widths={g.group_id: g.widths[len(g.widths) // 2] for g in p.space.groups})
    r1, c1 = p.evaluate(cand)
    r2, c2 = p.evaluate(cand)
    assert r1 is r2 and c1 == c2
    built = p.build(cand)
    assert c1.params == sum(t.numel() for t in built.parameters())
    assert c1.macs < p.dense_cost.macs
    assert sum(t.numel() for t in p.model.parameters()) == p.dense_cost.params  # original untouched


def test_the_problem_is_the_one_evaluation_cache() -> None:
    """Each candidate is built and scored once (by key); a result cut short by ``report`` is not kept."""
    ev = CountingEvaluator()
    p = _problem(calib=False, evaluator=ev)
    a = Candidate(widths={g.group_id: g.widths[0] for g in p.space.groups})
    pruned, _ = p.evaluate(a, report=lambda step, value: True)
    assert pruned.extra["pruned"] and ev.calls == 1
    r1, c1 = p.evaluate(a)
    r2, c2 = p.evaluate(Candidate(widths=dict(a.widths)))  # an equal candidate has the same key
    assert r1 is r2 and c1 is c2 and ev.calls == 2
    assert r1.extra["key"] == a.key() and r1.extra["build_seconds"] >= 0 and not r1.extra["pruned"]
    p.evaluate(p.space.full())
    assert ev.calls == 3


def test_activation_bits_need_and_use_calibration() -> None:
    layer = _problem(calib=False).space.layers[1].layer
    cand = Candidate(bits={layer: QuantSpec(w_bits=8, a_bits=8)})
    with pytest.raises(ConfigError, match="calibration data"):
        _problem(calib=False).build(cand)
    p = _problem(calib=True)
    out = p.build(cand)(p.example_input)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
