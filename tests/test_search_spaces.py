"""Tests of the per-family search spaces (autoprune.search_spaces) on the real engine and zoo models."""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from torch import nn

from autoprune import graph, pruning
from autoprune.errors import ConfigError
from autoprune.models import build_model
from autoprune.problem import SearchSpace
from autoprune.search_spaces import (
    SEARCH_SPACES,
    build_space,
    infer_family,
    is_residual_stream,
    producers,
    quantizable_layers,
)


@cache
def analysed(name: str):
    model = build_model(name).eval()
    return model, graph.analyze(model, torch.rand(1, 3, 32, 32))


def check_space(space: SearchSpace, gs, min_ratio: float, round_to: int) -> None:
    for gc in space.groups:
        g = gs[gc.group_id]
        assert g.prunable and gc.size == g.size
        assert list(gc.widths) == sorted(set(gc.widths)) and gc.widths[-1] == g.size
        assert gc.widths[0] >= math.ceil(min_ratio * g.size)
        legal = set(pruning.legal_widths(g, round_to))
        assert set(gc.widths) <= legal
        assert set(gc.widths) == {w for w in legal if w >= math.ceil(min_ratio * g.size)}
    space.validate(space.full())
    space.validate(space.minimal())


def test_infer_family() -> None:
    assert infer_family("resnet20") == "cifar_resnet"
    assert infer_family("resnet56_b") == "cifar_resnet"
    assert infer_family("vgg16_bn") == "vgg"
    assert infer_family("mobilenetv2") == "mobilenetv2"
    assert infer_family("small_cnn") == "generic"
    assert infer_family("torchvision:resnet18") == "generic"
    assert infer_family(None) == "generic"
    assert set(SEARCH_SPACES.names()) == {"generic", "cifar_resnet", "vgg", "mobilenetv2"}


def test_resnet20_option_a_block_internal_widths() -> None:
    _, gs = analysed("resnet20")
    space = build_space(gs, model_name="resnet20")
    ids = [g.group_id for g in space.groups]
    assert ids == [f"layer{s}.{b}.conv1:out" for s in (1, 2, 3) for b in (0, 1, 2)]
    assert space.layers == () and space.min_ratio == 0.2
    check_space(space, gs, 0.2, 1)
    assert space.groups[0].widths == tuple(range(4, 17))  # ceil(0.2·16) = 4 … 16


@pytest.mark.parametrize("round_to,min_ratio", [(8, 0.2), (4, 0.5), (1, 1.0)])
def test_round_to_and_min_ratio(round_to: int, min_ratio: float) -> None:
    _, gs = analysed("resnet20")
    space = build_space(gs, family="cifar_resnet", round_to=round_to, min_ratio=min_ratio)
    check_space(space, gs, min_ratio, round_to)
    for gc in space.groups:
        assert all(w % round_to == 0 or w == gc.size for w in gc.widths)
    if min_ratio == 1.0:
        assert all(gc.widths == (gc.size,) for gc in space.groups)


def test_option_b_residual_streams_by_option() -> None:
    _, gs = analysed("resnet20_b")
    streams = {g.id for g in gs.prunable() if is_residual_stream(g)}
    assert streams and all(len(producers(gs[s])) >= 2 for s in streams)
    default = build_space(gs, model_name="resnet20_b")
    with_streams = build_space(gs, model_name="resnet20_b", residual=True)
    assert not streams & {g.group_id for g in default.groups}
    assert streams <= {g.group_id for g in with_streams.groups}
    assert len(with_streams.groups) == len(gs.prunable())
    check_space(with_streams, gs, 0.2, 1)
    generic = build_space(gs, family="generic")  # the generic family searches everything
    assert len(generic.groups) == len(gs.prunable())


@pytest.mark.parametrize("family", SEARCH_SPACES.names())
def test_every_family_builds_on_a_small_model(family: str) -> None:
    _, gs = analysed("small_cnn")
    space = build_space(gs, family=family, quantize=True)
    assert len(space.groups) == len(gs.prunable())
    check_space(space, gs, 0.2, 1)


def test_vgg_and_mobilenetv2_families() -> None:
    _, gs = analysed("vgg11_bn")
    space = build_space(gs, model_name="vgg11_bn")
    assert len(space.groups) == len(gs.prunable()) == 8
    check_space(space, gs, 0.2, 1)
    _, gs = analysed("mobilenetv2")
    space = build_space(gs, model_name="mobilenetv2", round_to=8)
    chosen = {g.group_id for g in space.groups}
    streams = {g.id for g in gs.prunable() if is_residual_stream(g)}
    assert streams and not chosen & streams
    assert any(any(m.role == "dw" for m in gs[c].members) for c in chosen)  # expansion widths are searched
    check_space(space, gs, 0.2, 8)


def test_quantized_layers_with_first_last_floors() -> None:
    model, gs = analysed("resnet20")
    space = build_space(gs, model_name="resnet20", quantize=True, a_bits=(4, 6, 8, None))
    names = [lc.layer for lc in space.layers]
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(names) == sorted(convs) and names[0] == "conv1" and names[-1] == "linear"
    first, last, mid = space.layers[0], space.layers[-1], space.layers[5]
    assert first.w_bits == (8,) and first.a_bits == (None,)
    assert last.w_bits == (8,) and last.a_bits == (8,)
    assert mid.w_bits == (2, 3, 4, 5, 6, 7, 8) and mid.a_bits == (4, 6, 8, None)
    no_floor = build_space(gs, quantize=True, w_bits=(4, 8), first_last_min_bits=None)
    assert all(lc.w_bits == (4, 8) for lc in no_floor.layers)
    assert build_space(gs, quantize=True, first_last_min_bits=6).layers[0].w_bits == (6, 7, 8)
    only = build_space(gs, quantize=True, prune=False)
    assert only.groups == () and len(only.layers) == 20
    space.validate(space.minimal())


def test_exclude_patterns() -> None:
    _, gs = analysed("resnet20")
    space = build_space(gs, model_name="resnet20", quantize=True, exclude=("layer3.*",))
    assert all(not g.group_id.startswith("layer3.") for g in space.groups) and len(space.groups) == 6
    assert all(not lc.layer.startswith("layer3.") for lc in space.layers)


def test_layers_from_model_when_no_group_set() -> None:
    model, gs = analysed("small_cnn")
    assert quantizable_layers(gs) == quantizable_layers(model=model)
    with pytest.raises(ConfigError, match="model="):
        quantizable_layers()


def test_producers_are_the_distinct_out_members_in_order() -> None:
    def group(*members: tuple[str, str]) -> graph.ChannelGroup:
        return graph.ChannelGroup(id="g:out", size=8, members=tuple(graph.Member(m, r) for m, r in members),
                                  frozen=False)

    g = group(("a", "out"), ("b", "in"), ("c", "out"), ("a", "out"))
    assert producers(g) == ["a", "c"] and is_residual_stream(g)
    assert not is_residual_stream(group(("a", "out"), ("bn", "norm")))


def test_user_errors() -> None:
    _, gs = analysed("small_cnn")
    with pytest.raises(ConfigError, match="cifar_resnet"):
        build_space(gs, family="cifar_resnt")
    with pytest.raises(ConfigError, match="min_ratio"):
        build_space(gs, min_ratio=0.0)
    with pytest.raises(ConfigError, match="round_to"):
        build_space(gs, round_to=0)
    with pytest.raises(ConfigError, match="bit-width"):
        build_space(gs, quantize=True, w_bits=(1, 4))
    with pytest.raises(ConfigError, match="a_bits"):
        build_space(gs, quantize=True, a_bits=())
