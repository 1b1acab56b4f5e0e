"""Contract of every registered search-space preset (:data:`autoprune.search_spaces.SEARCH_SPACES`).

A preset applies to the zoo models whose name :func:`~autoprune.search_spaces.infer_family` maps to it (the same
rule the campaign uses), and the fallback family (``infer_family(None)``, ``generic``: "every prunable group of any
model") to every zoo model. Of those, the suite takes the smallest model of each architecture variant (names equal
up to their digits: ``resnet20`` and ``resnet20_b``, ``vgg11_bn``, ``mobilenetv2``, ``small_cnn``), analyses it
(:func:`autoprune.graph.analyze`, 32×32 input) and builds spaces with :func:`~autoprune.search_spaces.build_space`
(``family=`` the preset) for ``round_to`` 1 and 4 and ``min_ratio`` 0.2 and 0.5. Every preset must, on every model
it applies to:

* have a non-empty help line, carry its registered name, and apply to at least one zoo model;
* build a non-empty space whose groups are prunable groups of the analysis, with ascending widths that are
  legal for the engine (:func:`autoprune.pruning.legal_widths` with ``round_to``), not below
  ``ceil(min_ratio · size)``, ending at the full size;
* have ``full()`` and ``minimal()`` candidates that the space validates and the engine applies (the pruned model
  runs and gives the original output shape), with cost(minimal) ≤ cost(any sample) ≤ cost(full);
* produce legal candidates when sampled (uniformly over each group's widths, and from random keep ratios
  through :meth:`~autoprune.problem.SearchSpace.widths_for_ratios`);
* round-trip candidates through the encodings the space offers: ``Candidate.to_dict`` / JSON / ``from_dict``
  (same candidate, same key) and keep ratios ``width / size`` → :meth:`SearchSpace.widths_for_ratios`;
* honour ``residual``: ``residual=False`` searches no residual-stream group, ``residual=True`` searches a
  superset of it; with ``quantize=True`` add one :class:`~autoprune.problem.LayerChoice` per conv/linear layer
  whose ``minimal()`` bits validate.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from typing import Any

import pytest
import torch
from torch import nn

from autoprune import cost, graph, pruning
from autoprune.models import MODELS, build_model
from autoprune.problem import SearchSpace
from autoprune.search_spaces import SEARCH_SPACES, SpacePreset, build_space, infer_family, is_residual_stream
from autoprune.types import Candidate

from . import product_entries

NAMES = product_entries(SEARCH_SPACES)
SETTINGS = [(1, 0.2), (4, 0.5)]  # (round_to, min_ratio)


def models_for(family: str) -> list[str]:
    """Zoo models the preset ``family`` applies to (all of them for the fallback family)."""
    return [m for m in MODELS.names() if family in (infer_family(m), infer_family(None))]


def smallest_per_variant(models: list[str]) -> list[str]:
    """The shortest name (then the first) of each group of names equal up to their digits."""
    best: dict[str, str] = {}
    for m in sorted(models, key=lambda m: (len(m), m)):
        best.setdefault(re.sub(r"\d+", "#", m), m)
    return sorted(best.values())


CASES = [(name, model) for name in NAMES for model in smallest_per_variant(models_for(name))]


@functools.cache
def analysed(model_name: str) -> tuple[nn.Module, torch.Tensor, Any]:
    torch.manual_seed(0)
    model = build_model(model_name).eval()
    x = torch.rand(2, 3, 32, 32)
    return model, x, graph.analyze(model, x)


def space(family: str, model_name: str, round_to: int = 1, min_ratio: float = 0.2, **kw: Any) -> SearchSpace:
    model, _, gs = analysed(model_name)
    return build_space(gs, family=family, model_name=model_name, model=model, round_to=round_to,
                       min_ratio=min_ratio, **kw)


def samples(sp: SearchSpace, n: int, seed: int) -> list[Candidate]:
    rng = random.Random(seed)
    return [Candidate(widths={g.group_id: rng.choice(g.widths) for g in sp.groups}) for _ in range(n)]


def test_the_registry_has_the_builtin_presets() -> None:
    assert {"generic", "cifar_resnet", "vgg", "mobilenetv2"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_help_name_and_a_model_it_applies_to(name: str) -> None:
    cls = SEARCH_SPACES.get(name)
    assert issubclass(cls, SpacePreset) and cls.name == name
    assert SEARCH_SPACES.help(name).strip(), f"search space {name!r} has no help line (first docstring line)"
    assert models_for(name), (f"no zoo model infers to the search space {name!r}: add its name pattern to "
                              "autoprune.search_spaces.base._FAMILY_PATTERNS")


@pytest.mark.parametrize(("round_to", "min_ratio"), SETTINGS)
@pytest.mark.parametrize(("name", "model_name"), CASES)
def test_groups_are_legal_engine_groups(name: str, model_name: str, round_to: int, min_ratio: float) -> None:
    _, _, gs = analysed(model_name)
    sp = space(name, model_name, round_to, min_ratio)
    assert sp.groups, f"{name}: empty search space"
    assert len({g.group_id for g in sp.groups}) == len(sp.groups)
    prunable = {g.id: g for g in gs.prunable()}
    for gc in sp.groups:
        assert gc.group_id in prunable, f"{gc.group_id} is not a prunable group of the analysis"
        g = prunable[gc.group_id]
        assert gc.size == g.size and gc.widths[-1] == g.size
        assert list(gc.widths) == sorted(set(gc.widths))
        assert set(gc.widths) <= set(pruning.legal_widths(g, round_to)), (gc.group_id, gc.widths)
        assert all(w >= math.ceil(min_ratio * g.size) or w == g.size for w in gc.widths), (gc.group_id, gc.widths)


@pytest.mark.parametrize(("round_to", "min_ratio"), SETTINGS)
@pytest.mark.parametrize(("name", "model_name"), CASES)
def test_full_minimal_and_samples_are_legal_and_build(name: str, model_name: str, round_to: int,
                                                      min_ratio: float) -> None:
    model, x, gs = analysed(model_name)
    sp = space(name, model_name, round_to, min_ratio)
    full, low = sp.full(), sp.minimal()
    drawn = samples(sp, 5, seed=round_to)
    rng = random.Random(7)
    ratios = [[rng.uniform(min_ratio, 1.0) for _ in sp.groups] for _ in range(5)]
    drawn += [Candidate(widths=sp.widths_for_ratios(r)) for r in ratios]
    for cand in (full, low, *drawn):
        sp.validate(cand)
        for g in sp.groups:  # every group is decided, with a width the engine accepts
            assert cand.widths[g.group_id] in pruning.legal_widths(gs[g.group_id], round_to)
    with torch.no_grad():
        want = model(x).shape
        for cand in (low, drawn[0]):
            assert pruning.apply(model, gs, dict(cand.widths), round_to=round_to)(x).shape == want
    macs = {c.key(): cost.closed_form(gs, dict(c.widths)).macs for c in (full, low, *drawn)}
    assert all(macs[low.key()] <= macs[c.key()] <= macs[full.key()] for c in drawn)


@pytest.mark.parametrize(("name", "model_name"), CASES)
def test_candidates_round_trip(name: str, model_name: str) -> None:
    sp = space(name, model_name, 1, 0.2, quantize=True)
    for cand in (sp.full(), sp.minimal(), *samples(sp, 5, seed=3)):
        back = Candidate.from_dict(json.loads(json.dumps(cand.to_dict())))
        assert back == cand and back.key() == cand.key()
        assert sp.widths_for_ratios([cand.widths[g.group_id] / g.size for g in sp.groups]) == dict(cand.widths)


@pytest.mark.parametrize(("name", "model_name"), CASES)
def test_residual_flag_and_quantized_layers(name: str, model_name: str) -> None:
    model, _, gs = analysed(model_name)
    narrow, wide = space(name, model_name, residual=False), space(name, model_name, residual=True)
    assert {g.group_id for g in narrow.groups} <= {g.group_id for g in wide.groups}
    assert not [g.group_id for g in narrow.groups if is_residual_stream(gs[g.group_id])]
    default = space(name, model_name)
    assert default.groups == (wide if SEARCH_SPACES.get(name).default_residual else narrow).groups

    q = space(name, model_name, quantize=True, a_bits=(None, 8))
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert q.layers and {lc.layer for lc in q.layers} == layers
    assert q.layers[0].a_bits == (None,)  # the first layer's input stays float
    q.validate(q.minimal())
    q.validate(q.full())
