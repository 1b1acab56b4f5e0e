"""Contract of every registered evaluator (:data:`autoprune.evaluate.EVALUATORS`).

Each evaluator is built through the public factory :func:`autoprune.evaluate.make_evaluator` with tiny loaders
(a few batches of the offline digits), ``small_cnn`` width 4 and short settings, and must:

* have a non-empty help line, and stamp its registered name on its results;
* return an :class:`~autoprune.types.EvalResult` with accuracy in [0, 1], a finite loss ≥ 0, ``samples`` ≥ 0,
  ``seconds`` ≥ 0, ``extra["pruned"] is False`` and ``extra["key"]`` = the key passed in, for a dense
  ``nn.Module`` and for a pruned ``fx.GraphModule`` candidate;
* give the same result twice for the same seed and inputs (same evaluator called again, and a fresh one);
* never modify the caller's model (parameters, buffers, train/eval modes, ``.grad``);
* respect ``timeout``: a tiny limit raises :class:`~autoprune.evaluate.TrialTimeout` promptly (a searcher records a
  failed trial), it does not run to the end or hang;
* raise :class:`~autoprune.evaluate.DivergedError` for a candidate with non-finite outputs, never return NaN;
* refuse unknown settings and a missing validation loader with :class:`~autoprune.errors.ConfigError`;
* tell the truth in its class attributes (what a campaign reads to build it): ``needs_train`` — works without a
  training loader iff it says it needs none (and then counts no training ``samples``); ``trains`` — needs a
  training loader and counts training samples; ``needs_dense`` — refuses to be built without ``dense=`` iff set;
  ``needs_flow_loader`` — accepts ``flow_loader=`` iff set; ``reports_intermediate`` — calls ``report`` iff set;
* follow the ``report`` protocol: reported steps increase and values are accuracies; when the callback returns
  True the evaluation stops at once with a *pruned* result carrying the reported value.

The suite builds each evaluator from those attributes alone (``dense=`` and ``flow_loader=`` only where declared),
so an evaluator whose declaration is wrong fails here rather than in a campaign.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch
from engine_cases import randomize
from torch import fx, nn

from autoprune import graph, pruning
from autoprune.errors import ConfigError
from autoprune.evaluate import EVALUATORS, PRUNED, DivergedError, Evaluator, TrialTimeout, make_evaluator, was_pruned
from autoprune.types import EvalResult

from . import digits_batches, product_entries, same_state, small_cnn, state

NAMES = product_entries(EVALUATORS)

#: Settings that keep each built-in evaluator to a few steps (an entry not listed runs with its defaults).
SHORT: dict[str, dict[str, Any]] = {
    "adaptive_bn": {"batches": 2},
    "finetune": {"steps": 2, "report_every": 1},
    "full": {"epochs": 2, "steps_per_epoch": 1},
    "infcop": {"check_every": 1, "max_steps": 2, "flow_samples": 32},
}

TRAIN = digits_batches(0, 3, 16)
VAL = digits_batches(600, 2, 32)


@pytest.fixture
def dense() -> nn.Module:
    """A fresh model per test (an evaluator that wrongly mutates it cannot hide that from a later test), with
    random BN statistics (so BN recalibration on the caller's model would show)."""
    torch.manual_seed(0)
    return randomize(small_cnn())


@pytest.fixture
def pruned(dense: nn.Module) -> fx.GraphModule:
    gs = graph.analyze(dense, VAL[0][0][:1])
    return pruning.apply(dense, gs, {g.id: pruning.legal_widths(g)[len(pruning.legal_widths(g)) // 2]
                                     for g in gs.prunable()})


def build(name: str, dense_model: nn.Module | None, /, *, train: Any = TRAIN, val: Any = VAL,
          **settings: Any) -> Evaluator:
    """The evaluator ``name`` from the public factory, with the tiny loaders, its short settings, and what its
    class says it needs (``dense=`` and ``flow_loader=``; ``dense_model=None`` leaves the dense network out)."""
    cls = EVALUATORS.get(name)
    kw: dict[str, Any] = {"device": "cpu", "val_batches": 2, **SHORT.get(name, {}), **settings}
    if cls.needs_dense and dense_model is not None:
        kw.setdefault("dense", dense_model)
    if cls.needs_flow_loader:
        kw.setdefault("flow_loader", TRAIN)
    return make_evaluator(name, train, val, **kw)


def run(ev: Evaluator, model: nn.Module, seed: int = 0, **kw: Any) -> EvalResult:
    torch.manual_seed(seed)
    return ev.evaluate(model, **kw)


def test_the_registry_has_the_builtin_evaluators() -> None:
    assert {"plain", "adaptive_bn", "finetune", "full", "infcop"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_help_line_and_name(name: str) -> None:
    assert EVALUATORS.help(name).strip(), f"evaluator {name!r} has no help line (first docstring line)"
    assert EVALUATORS.get(name).name == name, "the class's `name` is stamped on every EvalResult"


@pytest.mark.parametrize("name", NAMES)
def test_result_is_a_well_formed_eval_result(name: str, dense: nn.Module, pruned: fx.GraphModule) -> None:
    ev = build(name, dense)
    for candidate in (dense, pruned):
        r = run(ev, candidate, key="abc123")
        assert isinstance(r, EvalResult)
        assert 0.0 <= r.accuracy <= 1.0
        assert math.isfinite(r.loss) and r.loss >= 0.0
        assert isinstance(r.samples, int) and r.samples >= 0
        assert r.seconds >= 0.0
        assert r.evaluator == name
        assert r.extra.get("pruned") is False and not was_pruned(r)
        assert r.extra.get("key") == "abc123"


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result(name: str, dense: nn.Module, pruned: fx.GraphModule) -> None:
    ev = build(name, dense)
    first = run(ev, pruned, seed=3)
    again = run(ev, pruned, seed=3)
    fresh = run(build(name, dense), pruned, seed=3)
    for r in (again, fresh):
        assert (r.accuracy, r.loss, r.samples) == (first.accuracy, first.loss, first.samples)


@pytest.mark.parametrize("name", NAMES)
def test_the_callers_model_is_not_modified(name: str, dense: nn.Module, pruned: fx.GraphModule) -> None:
    ev = build(name, dense)
    for model, mode in ((pruned, True), (pruned, False), (dense, False)):
        model.train(mode)
        before = state(model)
        modes = [m.training for m in model.modules()]
        run(ev, model)
        assert same_state(before, state(model)), "evaluate() changed the caller's weights or buffers"
        assert [m.training for m in model.modules()] == modes, "evaluate() changed the caller's train/eval mode"
        assert all(p.grad is None for p in model.parameters()), "evaluate() left gradients on the caller's model"


@pytest.mark.parametrize("name", NAMES)
def test_a_tiny_timeout_stops_the_evaluation(name: str, dense: nn.Module, pruned: fx.GraphModule) -> None:
    ev = build(name, dense, timeout=1e-6)
    start = time.perf_counter()
    with pytest.raises(TrialTimeout):
        run(ev, pruned)
    assert time.perf_counter() - start < 30
    assert issubclass(TrialTimeout, TimeoutError)


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_outputs_raise_diverged(name: str, dense: nn.Module, pruned: fx.GraphModule) -> None:
    broken = small_cnn()
    broken.load_state_dict(dense.state_dict())
    with torch.no_grad():
        broken.classifier.weight.fill_(float("nan"))
    with pytest.raises(DivergedError):
        run(build(name, dense), broken.eval())


@pytest.mark.parametrize("name", NAMES)
def test_bad_settings_and_missing_loaders_are_config_errors(name: str, dense: nn.Module,
                                                            pruned: fx.GraphModule) -> None:
    with pytest.raises(ConfigError, match="no_such_setting"):
        build(name, dense, no_such_setting=1)
    with pytest.raises(ConfigError):
        build(name, dense, val=None)


@pytest.mark.parametrize("name", NAMES)
def test_class_attributes_tell_the_truth(name: str, dense: nn.Module, pruned: fx.GraphModule) -> None:
    cls = EVALUATORS.get(name)
    if cls.needs_train:
        with pytest.raises(ConfigError):
            build(name, dense, train=None)
    else:  # it says it needs no training data: it must work without any, and see none
        r = run(build(name, dense, train=None), pruned)
        assert 0.0 <= r.accuracy <= 1.0 and r.samples == 0
    if cls.trains:
        assert cls.needs_train, "an evaluator that trains needs a training loader"
        assert run(build(name, dense), pruned).samples > 0, "trains=True but no training samples were counted"
    if cls.needs_dense:
        with pytest.raises(ConfigError):
            build(name, None)
    else:
        with pytest.raises(ConfigError, match="dense"):
            build(name, dense, dense=dense)
    if not cls.needs_flow_loader:
        with pytest.raises(ConfigError, match="flow_loader"):
            build(name, dense, flow_loader=TRAIN)


@pytest.mark.parametrize("name", NAMES)
def test_report_protocol(name: str, dense: nn.Module, pruned: fx.GraphModule) -> None:
    calls: list[tuple[int, float]] = []

    def listen(step: int, value: float) -> bool:
        calls.append((step, value))
        return False

    r = run(build(name, dense), pruned, report=listen)
    assert not was_pruned(r)
    assert bool(calls) == EVALUATORS.get(name).reports_intermediate, (
        f"reports_intermediate={EVALUATORS.get(name).reports_intermediate} but report was called {len(calls)} times")
    steps = [s for s, _ in calls]
    assert steps == sorted(set(steps)) and all(isinstance(s, int) and s >= 1 for s in steps)
    assert all(0.0 <= v <= 1.0 for _, v in calls)

    stops: list[tuple[int, float]] = []

    def stop(step: int, value: float) -> bool:
        stops.append((step, value))
        return True

    r = run(build(name, dense), pruned, report=stop)
    if not calls:  # an evaluator that never reports cannot be stopped
        assert not stops and not was_pruned(r)
        return
    assert len(stops) == 1, "the evaluation must stop at the first report that returns True"
    assert was_pruned(r) and r.extra.get("stop_reason") == PRUNED
    assert r.accuracy == stops[0][1]
