"""The model passed in stays as it was; tensor constants and channels-last tensors (issue #22).

* ``analyze`` / ``plan`` / ``apply`` / ``mask`` never change the model they are given: its tensor values,
  attributes (``__dict__`` keys and values of every submodule, including the containers of parameters, buffers,
  submodules and hooks), training flags and outputs are identical afterwards, on every engine case.
* A tensor constant fx stows on the traced module (``_tensor_constant0``: a buffer computation such as MaxViT's
  ``relative_position_index.view(-1)``, or a tensor made in ``forward``) is not a tensor of the model: apply works
  on the analysed model and on copies of it, and the channels a constant meets are frozen with a reason.
* Channels-last (NHWC) activations: a tensor whose channels no rule knows takes its channel dim from its inputs,
  so no group is sized by a spatial dim, and every group has a member.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from engine_cases import CASES, batch_of, flat_outputs, half_widths, masked_reference, randomize, run
from torch import nn

from autoprune import cost, graph, pruning


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------
# Snapshots of a model
# ----------------------------------------------------------------------------------------------------------------


def _container(v: Any) -> Any:
    if isinstance(v, set):
        return sorted(map(repr, v))
    if isinstance(v, dict):
        return [(repr(k), id(x)) for k, x in v.items()]
    return [id(x) for x in v]


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything analysis and apply must leave alone (tensor values are cloned)."""
    mods = {}
    for name, m in model.named_modules(remove_duplicate=False):
        mods[name] = {
            "id": id(m),
            "attrs": {k: id(v) for k, v in m.__dict__.items()},
            "containers": {k: _container(v) for k, v in m.__dict__.items() if isinstance(v, (dict, list, set))},
            "training": m.training,
        }
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    tensors.update({f"{n}.{k}": v.detach().clone() for n, m in model.named_modules()
                    for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)})  # plain tensor attributes
    return {"modules": mods, "tensors": tensors}


def _assert_same(before: dict[str, Any], after: dict[str, Any], when: str) -> None:
    assert before["modules"].keys() == after["modules"].keys(), when
    for name, b in before["modules"].items():
        a = after["modules"][name]
        assert sorted(a["attrs"]) == sorted(b["attrs"]), f"{when}: attributes of {name or 'the model'} changed"
        assert a == b, f"{when}: {name or 'the model'} changed"
    assert before["tensors"].keys() == after["tensors"].keys(), when
    for k, t in before["tensors"].items():
        assert torch.equal(t, after["tensors"][k]), f"{when}: {k} changed"


def _outputs(model: nn.Module, x: Any) -> list[torch.Tensor]:
    """Eval-mode outputs of a copy (the model's own flags stay as they are)."""
    return flat_outputs(run(copy.deepcopy(model), x))


def _mixed_flags(model: nn.Module) -> None:
    """Every other module in training mode, so that flags flipped by analysis or apply show."""
    for i, m in enumerate(model.modules()):
        m.training = i % 2 == 1


def _same_outputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------------
# analyze / plan / apply / mask leave the model alone
# ----------------------------------------------------------------------------------------------------------------


class SideEffects(nn.Module):
    """A forward with side effects on the module: a buffer updated in place (while fx traces and in the traced
    graph), an attribute and a list entry set in ``forward`` and an in-place op on a parameter in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 6, 1)
        self.w = nn.Parameter(torch.randn(4, 6, 1, 1))
        self.register_buffer("avg", torch.ones(()))
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.head(F.relu(self.conv(x))))
        self.avg.mul_(0.5)  # a real tensor while fx traces: runs on the buffer then
        self.avg.add_(y.mean() * 0.5)  # in the traced graph: runs during the analysis
        self.last = y  # a Proxy while tracing
        self.calls.append(1)
        return F.conv2d(y, self.w.clamp_(-0.5, 0.5)).mean((2, 3))  # in place on a parameter, in the graph


def _cases() -> list[str]:
    return [*sorted(CASES), "side_effects"]


def _case(name: str) -> tuple[nn.Module, Any]:
    if name == "side_effects":
        torch.manual_seed(0)
        return randomize(SideEffects()), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    c = CASES[name]()
    return c.model, c.x


@pytest.mark.parametrize("name", _cases())
def test_analyze_and_apply_leave_the_model_untouched(name: str, caplog: pytest.LogCaptureFixture) -> None:
    model, x = _case(name)
    _mixed_flags(model)
    x_before = copy.deepcopy(x)
    before, out = _snapshot(model), _outputs(model, x)
    with caplog.at_level(logging.WARNING, logger="autoprune.graph"):
        gs = graph.analyze(model, x)
    assert not [r for r in caplog.records if "in place while it was analysed" in r.getMessage()]
    _assert_same(before, _snapshot(model), "analyze")
    assert _same_outputs(out, _outputs(model, x))
    widths = half_widths(gs)
    p = pruning.plan(model, gs, widths)
    pruned = pruning.apply(model, gs, p)
    _assert_same(before, _snapshot(model), "apply")
    pruning.apply(model, gs, {})
    pruning.mask(model, gs, p)
    _assert_same(before, _snapshot(model), "mask")
    assert _same_outputs(out, _outputs(model, x))
    assert _same_outputs(flat_outputs(x), flat_outputs(x_before))  # the example input too
    assert set(pruned.state_dict()) <= set(model.state_dict())


def test_side_effects_happen_on_copies() -> None:
    model, x = _case("side_effects")
    w = model.w.detach().clone()
    gs = graph.analyze(model, x)
    assert torch.equal(model.avg, torch.ones(())) and model.calls == [] and "last" not in model.__dict__
    assert torch.equal(model.w, w)  # clamp_ ran on the analysis' copy of the parameter
    assert torch.equal(gs.graph_module.w, w)


# ----------------------------------------------------------------------------------------------------------------
# Tensor constants
# ----------------------------------------------------------------------------------------------------------------


def _equivalent(model: nn.Module, x: Any, gs: graph.GroupSet, widths: dict[str, int],
                source: nn.Module | None = None) -> nn.Module:
    """Apply ``widths`` to ``source`` (default: the model); the pruned model equals the masked original."""
    p = pruning.plan(model, gs, widths)
    pruned = pruning.apply(source if source is not None else model, gs, p)
    ref = run(masked_reference(model, gs, p), x)
    got = run(pruned, x)
    scale = max(1.0, max(float(t.abs().max()) for t in flat_outputs(ref)))
    assert max(float((a - b).abs().max()) for a, b in zip(flat_outputs(got), flat_outputs(ref))) <= 1e-5 * scale
    price = cost.closed_form(gs, p.widths)
    assert price.params == sum(t.numel() for t in pruned.parameters())
    assert price.macs * batch_of(x) == cost.count_macs(pruned, x)
    return pruned


def test_tensor_constants_are_not_tensors_of_the_model(tmp_path: Path) -> None:
    c = CASES["tensor_constant"]()
    copy_before = copy.deepcopy(c.model)
    gs = graph.analyze(c.model, c.x)
    # linspace(...) made in forward and index.view(-1) of a buffer: two constants of the traced module only
    assert sorted(gs.constants) == ["_tensor_constant0", "_tensor_constant1"]
    assert not [k for k in c.model.__dict__ if k.startswith("_tensor_constant")]
    assert not set(gs.constants) & set(gs.aliases)
    assert "_tensor_constant0" not in gs.graph_module.state_dict()  # non-persistent: state-dict names stay
    # the per-channel constant freezes the channels it multiplies; the rest prunes
    assert "tensor constant _tensor_constant0" in gs["c2:out"].reason
    assert gs.prunable_ids == ["c1:out", "fc1:out"]
    assert not any(s.tensor in gs.constants for g in gs for s in g.slices)
    widths = half_widths(gs)
    pruned = _equivalent(c.model, c.x, gs, widths)
    _equivalent(c.model, c.x, gs, widths, source=copy_before)  # a copy made before the analysis
    _equivalent(c.model, c.x, gs, widths, source=copy.deepcopy(c.model))  # and one made after it
    assert set(pruned.state_dict()) <= set(c.model.state_dict())
    assert {n for n, _ in pruned.named_buffers()} >= set(gs.constants)
    pruning.save_pruned(pruned, tmp_path / "m", c.x, pruning.plan(c.model, gs, widths))
    loaded = pruning.load_pruned(tmp_path / "m")
    assert _same_outputs(flat_outputs(run(loaded, c.x)), flat_outputs(run(pruned, c.x)))


class PlainAttribute(nn.Module):
    """A per-channel tensor kept as a plain attribute (not a registered buffer) and a scale made in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 4, 1)
        self.scale = torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x)) * self.scale
        z = F.relu(self.b(y)) * torch.full((1, 1, 1, 1), 2.0)  # broadcast over the channels: no coupling
        return self.c(z).mean((2, 3))


def test_plain_tensor_attribute_and_broadcast_constant() -> None:
    torch.manual_seed(0)
    model, x = randomize(PlainAttribute()), torch.randn(2, 3, 8, 8)
    gs = graph.analyze(model, x)
    assert "scale" in gs.constants
    assert "tensor constant scale" in gs["a:out"].reason
    assert gs.prunable_ids == ["b:out"]  # a size-1 constant broadcast along the channels couples nothing
    _equivalent(model, x, gs, half_widths(gs))
    model.scale = model.scale * 2.0  # a changed attribute of a same-architecture model is what apply uses
    full = pruning.apply(model, gs, {})
    assert torch.allclose(run(full, x), run(model, x), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Channels-last activations
# ----------------------------------------------------------------------------------------------------------------


def test_channels_last_block_has_no_spatial_groups() -> None:
    c = CASES["channels_last"]()
    gs = graph.analyze(c.model, c.x)
    spatial = 5  # the 10×10 input patch-embedded to 5×5, NHWC afterwards
    assert all(g.size != spatial for g in gs), gs.describe()
    assert all(g.members for g in gs)
    # the stream meets the window op without a rule: frozen on its real 8 channels, with that op as reason
    stream = gs["patch:out"]
    assert stream.frozen and stream.size == 8 and "unknown op engine_cases.window_mix" in stream.reason
    assert {("norm1", "norm"), ("norm2", "norm"), ("fc1", "in"), ("fc2", "out"), ("out", "in")} <= \
        {(m.module, m.role) for m in stream.members}
    assert gs.prunable_ids == ["fc1:out", "out:out"]
    assert [g.id for g in gs.frozen()] == ["input:x", "patch:out", "fc:out"]
    assert gs.describe().splitlines()[-1] == "5 groups, 2 prunable, 3 frozen"
    _equivalent(c.model, c.x, gs, half_widths(gs))


def merge_patches(x: torch.Tensor) -> torch.Tensor:
    """Swin's patch merging on an NHWC map (2×2 neighbours onto the channels), fx-wrapped like torchvision's."""
    return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)


torch.fx.wrap("merge_patches")


class PatchMerging(nn.Module):
    """NHWC stem, then an op without a rule that changes both the map size and the channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 1)
        self.norm = nn.LayerNorm(16)
        self.red = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.red(self.norm(merge_patches(self.embed(x).permute(0, 2, 3, 1)))).mean((1, 2))


def test_unknown_op_on_a_channels_last_map_keeps_the_channel_dim() -> None:
    torch.manual_seed(0)
    gs = graph.analyze(randomize(PatchMerging()), torch.randn(2, 3, 10, 10))
    assert all(g.members for g in gs)
    assert sorted(g.size for g in gs) == [3, 4, 6, 16], gs.describe()  # none is the merged map's height (5)
    merged = gs.group_of("red", "in")
    assert merged.size == 16 and ("norm", "norm") in {(m.module, m.role) for m in merged.members}
    assert "unknown op test_graph_model_safety.merge_patches" in merged.reason
    assert gs.prunable_ids == []  # embed's channels meet the op without a rule, red's output is the model's
