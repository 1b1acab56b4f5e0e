"""Functional norms, ATen norms of the torch.export front-end and fx-wrapped functions (ENGINE.md §2.2, §2.4).

Norm layers that subclass ``torch.nn`` norms but call ``F.batch_norm`` & co. in their own ``forward`` are traced
into by fx; their functional calls must give the same groups as the ``torch.nn`` layer, prune exactly (pruned ==
masked original) where the maths allows, and freeze with a reason otherwise.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from engine_cases import flat_outputs, half_widths, masked_reference, randomize, run
from torch import nn

from autoprune import cost, graph, pruning
from autoprune.graph.export_trace import rebuild_from_export
from autoprune.graph.rules import WRAPPED_FUNCTION_RULES, qualified_name


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------
# Norm subclasses that call the functional op
# ----------------------------------------------------------------------------------------------------------------


class FusedBNAct(nn.BatchNorm2d):
    """BatchNorm fused with its activation (a common model-zoo pattern)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                   self.eps))


class FunctionalInstanceNorm(nn.InstanceNorm2d):
    """Affine instance norm through ``F.instance_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.1, self.eps)


class FunctionalGroupNorm(nn.GroupNorm):
    """GroupNorm through ``F.group_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: permute, ``F.layer_norm`` over the channels, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ScaledWeightBN(nn.BatchNorm2d):
    """A norm whose weight is computed in ``forward``: cannot be sliced, so it must freeze."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight * 2.0, self.bias, False, 0.0,
                            self.eps)


class Chain(nn.Module):
    """conv → norm → conv → norm → conv, with a pluggable norm (and a residual around the second stage)."""

    def __init__(self, norm: type[nn.Module] | Any, width: int = 8, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.norm1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = norm(width)
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(self.conv1(x))
        z = self.norm2(self.conv2(y))
        return self.head(z + y if self.residual else z)


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """:func:`engine_cases.randomize` plus random affine parameters for instance norms."""
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.InstanceNorm2d) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


def _img() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _widths(gs: graph.GroupSet) -> list[dict[str, int]]:
    """Half widths, minimal widths and an uneven mix."""
    minimal = {g.id: pruning.legal_widths(g)[0] for g in gs.prunable()}
    mixed = {g.id: pruning.legal_widths(g)[(k * 3) % len(pruning.legal_widths(g))]
             for k, g in enumerate(gs.prunable())}
    return [half_widths(gs), minimal, mixed]


def _check(model: nn.Module, x: torch.Tensor, gs: graph.GroupSet, widths: dict[str, int], exact: bool) -> None:
    """S (shapes), E (pruned == masked original, when ``exact``) and C (closed-form cost == measured)."""
    p = pruning.plan(model, gs, widths)
    pruned = pruning.apply(model, gs, p)
    out, ref = run(pruned, x), run(model, x)
    assert [t.shape for t in flat_outputs(out)] == [t.shape for t in flat_outputs(ref)]
    if exact:
        masked = run(masked_reference(model, gs, p), x)
        scale = max(1.0, float(ref.abs().max()))
        assert float((out - masked).abs().max()) <= 1e-5 * scale
    price = cost.closed_form(gs, p.widths)
    assert price.params == sum(t.numel() for t in pruned.parameters())
    assert price.macs * x.shape[0] == cost.count_macs(pruned, x)


def _norm_ids(gs: graph.GroupSet) -> dict[str, tuple[int, bool, tuple[str, ...]]]:
    return {g.id: (g.size, g.frozen, tuple(sorted(f"{m.module}:{m.role}" for m in g.members))) for g in gs}


# ----------------------------------------------------------------------------------------------------------------
# fx front-end
# ----------------------------------------------------------------------------------------------------------------


EXACT = {
    "batch_norm": FusedBNAct,
    "instance_norm": lambda c: FunctionalInstanceNorm(c, affine=True),
    "group_norm_per_channel": lambda c: FunctionalGroupNorm(c, c),
}


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_functional_norm_is_a_follower_and_prunes_exactly(name: str, residual: bool) -> None:
    model = _randomize_norms(Chain(EXACT[name], residual=residual))
    x = _img()
    gs = graph.analyze(model, x)
    assert len(gs.prunable()) == (1 if residual else 2)
    g = gs.group_of("conv1")
    assert g.prunable and "norm1" in {m.module for m in g.members if m.role == "norm"}
    assert {s.tensor for s in g.slices if s.role == "norm"} >= {"norm1.weight", "norm1.bias"}
    for widths in _widths(gs):
        _check(model, x, gs, widths, exact=True)


def test_fused_bn_gives_the_groups_of_torch_nn_batch_norm() -> None:
    def bn_relu(c: int) -> nn.Module:
        return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())

    fused = graph.analyze(_randomize_norms(Chain(FusedBNAct)), _img())
    plain = graph.analyze(_randomize_norms(Chain(bn_relu)), _img())
    assert [(g.id, g.size, g.frozen, g.macs, g.params) for g in fused] == \
        [(g.id, g.size, g.frozen, g.macs, g.params) for g in plain]
    slices = {s.tensor for g in fused for s in g.slices}
    assert {"norm1.running_mean", "norm1.running_var", "norm2.weight"} <= slices


def test_group_norm_num_groups_follows_the_width() -> None:
    model = _randomize_norms(Chain(lambda c: FunctionalGroupNorm(c, c)))
    gs = graph.analyze(model, _img())
    pruned = pruning.apply(model, gs, {g.id: 3 for g in gs.prunable()})
    calls = [n for n in pruned.graph.nodes if n.target is F.group_norm]
    assert [n.args[1] for n in calls] == [3, 3]


@pytest.mark.parametrize("make", [lambda c: FunctionalGroupNorm(1, c), lambda c: LayerNorm2d(c)],
                         ids=["group_norm_one_group", "layer_norm_2d"])
def test_norms_over_all_channels_prune_like_their_torch_nn_layer(make: Any) -> None:
    """One group / ConvNeXt's LayerNorm2d normalise over the channels: as nn.GroupNorm(1, C) and nn.LayerNorm,
    they are followers whose pruned model keeps shapes and costs (not equal to the masked original, §2.4)."""
    model = _randomize_norms(Chain(make))
    x = _img()
    gs = graph.analyze(model, x)
    assert len(gs.prunable()) == 2
    for widths in _widths(gs):
        _check(model, x, gs, widths, exact=False)
    pruned = pruning.apply(model, gs, {g.id: 5 for g in gs.prunable()})
    shapes = [n.args[1] for n in pruned.graph.nodes if n.target is F.layer_norm]
    assert shapes in ([], [(5,), (5,)])


def test_group_norm_with_some_groups_is_frozen() -> None:
    gs = graph.analyze(_randomize_norms(Chain(lambda c: FunctionalGroupNorm(2, c))), _img())
    g = gs.group_of("conv1")
    assert g.frozen and "GroupNorm with 2 groups" in g.reason


class SpatialLayerNorm(nn.Module):
    """``F.layer_norm`` of a channels-first map over its width only (per channel), without a bias."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, None, 1e-5)


class FullLayerNorm(nn.Module):
    """``F.layer_norm`` over ``(C, H, W)``: mixes the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (8, 8, 8))


def test_layer_norm_over_a_spatial_dim_passes_through() -> None:
    model = _randomize_norms(Chain(lambda c: SpatialLayerNorm(8)))
    x = _img()
    gs = graph.analyze(model, x)
    assert len(gs.prunable()) == 2
    for widths in _widths(gs):
        _check(model, x, gs, widths, exact=True)


def test_layer_norm_over_the_channels_and_more_is_frozen() -> None:
    gs = graph.analyze(_randomize_norms(Chain(lambda c: FullLayerNorm())), _img())
    assert not gs.prunable()
    assert "LayerNorm over 3 dims" in gs.group_of("conv1").reason


def test_computed_norm_tensors_freeze_with_a_reason() -> None:
    gs = graph.analyze(_randomize_norms(Chain(ScaledWeightBN)), _img())
    g = gs.group_of("conv1")
    assert g.frozen and "batch_norm with computed per-channel tensors" in g.reason


# ----------------------------------------------------------------------------------------------------------------
# torch.export front-end
# ----------------------------------------------------------------------------------------------------------------


class ChunkBlock(nn.Module):
    """Untraceable by fx (``list(x.chunk(2, 1))``), with fused / functional norms inside."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn1 = FusedBNAct(2 * c)
        self.cv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.gn = FunctionalGroupNorm(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.bn1(self.cv1(x)).chunk(2, 1))
        return torch.cat([y[0], self.gn(self.cv2(y[1]))], 1)


class ExportNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block = ChunkBlock(8)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def test_export_front_end_maps_aten_norms() -> None:
    model = _randomize_norms(ExportNet())
    x = _img()
    gs = graph.analyze(model, x)
    assert gs.exported_modules == ["block"]
    assert {g.id for g in gs.prunable()} >= {"stem:out", "block.cv2:out"}
    assert any(s.tensor.endswith("bn1.running_var") for g in gs.prunable() for s in g.slices)
    for widths in _widths(gs):
        _check(model, x, gs, widths, exact=True)


def test_decomposed_batch_norm_is_rebuilt_from_its_first_output() -> None:
    """``_native_batch_norm_legit_no_training`` returns (out, mean, rstd); only ``out`` is used."""
    model = _randomize_norms(Chain(FusedBNAct))
    x = _img()
    ep = torch.export.export(model, (x,)).run_decompositions()
    assert any("_native_batch_norm_legit_no_training" in str(n.target) for n in ep.graph.nodes)
    rebuilt = rebuild_from_export(model, ep, lambda _path, m: isinstance(m, nn.Conv2d))
    assert sum(n.target is F.batch_norm for n in rebuilt.graph.nodes) == 2
    assert torch.allclose(run(rebuilt, x), run(model, x), rtol=1e-5, atol=1e-6)
    gs = graph.analyze(rebuilt, x)
    assert len(gs.prunable()) == 2
    for widths in _widths(gs):
        _check(rebuilt, x, gs, widths, exact=True)


# ----------------------------------------------------------------------------------------------------------------
# fx-wrapped functions of other libraries, by qualified name
# ----------------------------------------------------------------------------------------------------------------


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """Stand-in for ``torchvision.ops.stochastic_depth`` (torchvision is not installed here)."""
    if not training or p == 0.0:
        return input
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    keep = torch.empty(size, dtype=input.dtype).bernoulli_(1.0 - p)
    return input * keep / (1.0 - p)


def mystery_op(input: torch.Tensor) -> torch.Tensor:
    """A wrapped function autoprune knows nothing about."""
    return input.flip(1)


# keyed like torchvision's function, and kept as one call_function node by fx, as torchvision does
stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")
torch.fx.wrap("mystery_op")


class DropPathNet(nn.Module):
    def __init__(self, known: bool) -> None:
        super().__init__()
        self.known = known
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.stem(x))
        z = self.conv(y)
        z = stochastic_depth(z, 0.2, "row", self.training) if self.known else mystery_op(z)
        return self.head(y + z)


def test_known_wrapped_function_keeps_the_residual_stream_prunable() -> None:
    assert qualified_name(stochastic_depth) in WRAPPED_FUNCTION_RULES
    model = randomize(DropPathNet(known=True))
    x = _img()
    gs = graph.analyze(model, x)
    traced = gs.graph_module.graph
    assert any(n.op == "call_function" and n.target is stochastic_depth for n in traced.nodes)
    g = gs.group_of("stem")
    assert g.prunable and {"stem:out", "conv:out", "bn:norm"} <= {f"{m.module}:{m.role}" for m in g.members}
    for widths in _widths(gs):
        _check(model, x, gs, widths, exact=True)


def test_unknown_wrapped_function_freezes() -> None:
    gs = graph.analyze(randomize(DropPathNet(known=False)), _img())
    assert not gs.prunable()
    assert "unknown op" in gs.group_of("stem").reason and "mystery_op" in gs.group_of("stem").reason


def test_qualified_name_of_objects_without_one() -> None:
    assert qualified_name(object()) == ""
    assert qualified_name(F.relu) == "torch.nn.functional.relu"


# ----------------------------------------------------------------------------------------------------------------
# A mostly frozen model is reported loudly
# ----------------------------------------------------------------------------------------------------------------


class SliceNet(nn.Module):
    """``cat(...)[:, ::2]`` (a strided channel slice) freezes the channels of both branches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        return self.head(torch.cat([self.a(y), self.b(y)], 1)[:, ::2])


def test_mostly_frozen_model_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="autoprune.graph"):
        gs = graph.analyze(SliceNet().eval(), _img())
    assert gs.producer_channels == 48 and gs.frozen_producer_channels == 32  # a, b frozen; stem prunable
    warning = gs.frozen_warning()
    assert warning is not None and "67 % of 48 producer channels" in warning
    assert "indexing along the channel dim" in warning
    assert any(r.levelname == "WARNING" and "SliceNet: mostly frozen" in r.getMessage() for r in caplog.records)
    assert f"WARNING: {warning}" in gs.describe()


def test_norm_subclass_without_a_rule_is_reported() -> None:
    class OddNorm(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(x, 1) * self.weight.view(1, -1, 1, 1)

    gs = graph.analyze(Chain(OddNorm), _img())
    warning = gs.frozen_warning()
    assert warning is not None and "unknown op" in warning and "cumsum" in warning


def test_a_normal_network_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    from engine_cases import TinyResNet

    with caplog.at_level("WARNING", logger="autoprune.graph"):
        gs = graph.analyze(randomize(TinyResNet()), torch.randn(2, 3, 16, 16))
    assert gs.frozen_warning() is None and gs.frozen_share() < 0.5
    assert not [r for r in caplog.records if "mostly frozen" in r.getMessage()]
    assert "WARNING" not in gs.describe()
    fused = graph.analyze(_randomize_norms(Chain(FusedBNAct)), _img())
    assert fused.frozen_share() == 0.0 and fused.frozen_warning() is None


def test_campaign_start_line_carries_the_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from autoprune import campaign

    monkeypatch.setattr(campaign, "val_caveat", lambda cfg: None)
    monkeypatch.setattr(campaign, "searched", lambda space: "2 groups")

    def camp(model: nn.Module) -> Any:
        cfg = SimpleNamespace(name="c", model=SimpleNamespace(name="m"), dataset=SimpleNamespace(name="d"))
        return SimpleNamespace(config=cfg, dense_accuracy=None, space=None, groups=graph.analyze(model, _img()),
                               problem=SimpleNamespace(dense_cost=SimpleNamespace(macs=1000)))

    line = campaign.campaign_summary(camp(SliceNet().eval()))
    assert "WARNING: mostly frozen: 67 % of 48 producer channels" in line
    assert "WARNING" not in campaign.campaign_summary(camp(_randomize_norms(Chain(FusedBNAct))))
