"""Ctrl-C is never lost: a ``KeyboardInterrupt`` swallowed somewhere (a ``__del__``, a library's cleanup) still
stops the search, the evaluation and the fine-tune at their next safe point (:mod:`autoprune.interrupts`).

The swallowing is real: the signal is raised with :func:`signal.raise_signal` under the CLI's handler and the
resulting ``KeyboardInterrupt`` is caught and dropped, as Python does for an exception raised in ``__del__``.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_searchers import BUDGET, FakeEvaluator, make_problem, new_store
from torch import nn

from autoprune import interrupts
from autoprune.agents.base import make_searcher
from autoprune.data import load_dataset, make_loader
from autoprune.evaluate import make_evaluator
from autoprune.models import build_model
from autoprune.types import EvalResult


@pytest.fixture(autouse=True)
def cli_handler() -> Iterator[None]:
    """The CLI's SIGINT handler for the test; the previous handler and a clear flag afterwards."""
    previous = signal.getsignal(signal.SIGINT)
    interrupts.install()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupts.clear()


def swallowed_ctrl_c() -> None:
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        pass  # dropped, as "Exception ignored in ..." drops it in a __del__
    else:  # pragma: no cover - the handler always raises
        raise AssertionError("the SIGINT handler did not raise")


def test_a_swallowed_ctrl_c_is_remembered_until_cleared() -> None:
    assert not interrupts.requested()
    interrupts.check()  # nothing requested: no-op
    swallowed_ctrl_c()
    assert interrupts.requested()
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()
    with pytest.raises(KeyboardInterrupt):  # until it is handled
        interrupts.check()
    interrupts.clear()
    interrupts.check()


def test_deferred_sigint_hands_the_held_signal_to_the_cli_handler() -> None:
    with pytest.raises(KeyboardInterrupt), interrupts.deferred_sigint():
        signal.raise_signal(signal.SIGINT)  # held: the block goes on
        assert not interrupts.requested()
    assert interrupts.requested()


class SwallowingEvaluator(FakeEvaluator):
    """Swallows a Ctrl-C during its second evaluation and finishes it normally."""

    def evaluate(self, module: nn.Module, *, key: str | None = None, report: Any = None) -> EvalResult:
        if self.calls == 1:
            swallowed_ctrl_c()
        return super().evaluate(module, key=key, report=report)


def test_search_stops_after_a_swallowed_ctrl_c() -> None:
    problem = make_problem(SwallowingEvaluator())
    s = make_searcher("random", problem, store=new_store(), n_trials=6, budget=BUDGET)
    res = s.run()
    assert res.stop_reason == "interrupted"
    assert [t.state for t in res.trials] == ["complete", "complete"]  # not the 6 a lost Ctrl-C would give


class SwallowOnce(nn.Module):
    """Swallows a Ctrl-C in its first forward pass (as a hook or a library's cleanup could)."""

    def __init__(self) -> None:
        super().__init__()
        self.done = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.done:
            self.done = True
            swallowed_ctrl_c()
        return x


@pytest.mark.parametrize("name", ["plain", "finetune"])
def test_evaluation_stops_at_the_next_forward_pass(name: str) -> None:
    splits = load_dataset("digits")
    info = splits.info
    net = build_model("small_cnn", num_classes=info.num_classes, in_channels=info.input_shape[0], width=4)
    model = nn.Sequential(SwallowOnce(), net)
    train = make_loader(splits.train, 32, shuffle=True)
    val = make_loader(splits.val, 32)
    settings = {"steps": 5} if name == "finetune" else {}
    ev = make_evaluator(name, train, val, device="cpu", **settings)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model)
