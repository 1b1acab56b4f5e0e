"""Contract of every registered channel-importance criterion (:data:`autoprune.importance.IMPORTANCE`).

On the channel groups (:func:`autoprune.graph.analyze`) of a few small models — ``small_cnn`` and
``resnet20_b`` from the zoo (single- and multi-member groups, residual streams), and the inline depthwise
(``mobilenet``) and grouped-conv (``grouped_conv``, groups with a divisor) cases of ``tests/engine_cases.py`` —
with random BN statistics, every criterion, called with a :class:`~autoprune.importance.ScoreContext` that
carries a loader (criteria that need data, such as ``taylor``, get one; the others ignore it), must:

* have a non-empty help line;
* return one finite score per channel for every prunable group;
* be deterministic (fresh context, same scores) and leave the model alone (weights, buffers, ``.grad``);
* drive :func:`autoprune.pruning.apply` (``importance=name``) to a model that keeps exactly the top-``width``
  channels by its scores (:func:`autoprune.importance.select`, per block for grouped convs) and computes the
  same function as the original with the other channels zeroed (``masked_reference`` of
  ``tests/engine_cases.py``, written independently of the engine's slicing), at half widths and at random
  legal widths.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from engine_cases import CASES, flat_outputs, half_widths, masked_reference, randomize, run
from torch import nn

from autoprune import graph, pruning
from autoprune.importance import IMPORTANCE, ScoreContext, select
from autoprune.models import build_model

from . import digits_batches, product_entries, same_state, small_cnn, state

NAMES = product_entries(IMPORTANCE)
MODELS = ("small_cnn", "resnet20_b", "mobilenet", "grouped_conv")


@functools.cache
def analysed(which: str) -> tuple[nn.Module, Any, Any, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(model, example input, groups, loader of (x, y) batches) for one of :data:`MODELS`."""
    torch.manual_seed(0)
    if which == "small_cnn":
        model, loader = randomize(small_cnn()), digits_batches(0, 2, 8)
        x = loader[0][0][:4]
    else:
        if which == "resnet20_b":
            model, x = randomize(build_model("resnet20_b")), torch.rand(2, 3, 32, 32)
        else:
            case = CASES[which]()
            model, x = case.model, case.x
        out = run(model, x)  # labels fit the output: classes on dim 1, any further dims per position
        g = torch.Generator().manual_seed(2)
        loader = [(torch.rand(4, *x.shape[1:], generator=g),
                   torch.randint(0, out.shape[1], (4, *out.shape[2:]), generator=g)) for _ in range(2)]
    return model, x, graph.analyze(model, x), loader


def scores(name: str, which: str) -> dict[str, torch.Tensor]:
    """The criterion's scores of every prunable group, from a fresh context."""
    model, _, gs, loader = analysed(which)
    ctx = ScoreContext(groups=gs, tensors=gs.tensors_of(model), model=model, loader=loader)
    fn = IMPORTANCE.get(name)
    return {g.id: fn(g, ctx) for g in gs.prunable()}


def random_widths(gs: Any, seed: int) -> dict[str, int]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for grp in gs.prunable():
        legal = pruning.legal_widths(grp)[:-1] or pruning.legal_widths(grp)  # pruned where possible
        out[grp.id] = legal[int(torch.randint(0, len(legal), (1,), generator=g))]
    return out


def test_the_registry_has_the_builtin_criteria() -> None:
    assert {"l1", "l2", "bn_scale", "consumer_l1", "fpgm", "prefix", "random", "taylor"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_help_line(name: str) -> None:
    assert IMPORTANCE.help(name).strip(), f"importance criterion {name!r} has no help line (first docstring line)"


@pytest.mark.parametrize("which", MODELS)
@pytest.mark.parametrize("name", NAMES)
def test_one_finite_deterministic_score_per_channel(name: str, which: str) -> None:
    model, _, gs, _ = analysed(which)
    assert gs.prunable(), which
    before = state(model)
    first = scores(name, which)
    for g in gs.prunable():
        s = first[g.id]
        assert isinstance(s, torch.Tensor) and s.dtype.is_floating_point, (g.id, type(s))
        assert tuple(s.reshape(-1).shape) == (g.size,), f"group {g.id}: {s.numel()} scores for {g.size} channels"
        assert torch.isfinite(s).all(), f"group {g.id}: non-finite scores {s}"
    again = scores(name, which)
    assert all(torch.equal(first[k], again[k]) for k in first), "scores differ between two identical calls"
    assert same_state(before, state(model)), "scoring changed the model's weights or buffers"
    assert all(p.grad is None for p in model.parameters()), "scoring left gradients on the model"


@pytest.mark.parametrize("which", MODELS)
@pytest.mark.parametrize("name", NAMES)
def test_apply_keeps_the_top_channels_and_equals_the_masked_original(name: str, which: str) -> None:
    model, x, gs, loader = analysed(which)
    s = scores(name, which)
    ref_out = run(model, x)
    scale = max(1.0, max(float(t.abs().max()) for t in flat_outputs(ref_out)))
    for widths in (half_widths(gs), random_widths(gs, 1)):
        keep = {gid: select(s[gid].reshape(-1), w, blocks=gs[gid].divisor)
                for gid, w in widths.items() if w < gs[gid].size}
        assert keep, "the widths prune nothing"
        pruned = pruning.apply(model, gs, widths, importance=name, loader=loader)
        masked = masked_reference(model, gs, SimpleNamespace(pruned=lambda keep=keep: keep))
        out, want = flat_outputs(run(pruned, x)), flat_outputs(run(masked, x))
        assert [t.shape for t in out] == [t.shape for t in want]
        diff = max(float((a - b).abs().max()) for a, b in zip(out, want, strict=True))
        assert diff <= 1e-5 * scale, (f"pruned with {name!r} differs from the original with the other channels "
                                      f"zeroed by {diff:.3g} (widths {widths})")
