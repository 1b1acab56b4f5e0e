"""Channel-dependency analysis (autoprune.graph): group structure on the ENGINE.md §9 cases and the zoo."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from engine_cases import CASES, BasicBlock, TinyResNet, randomize
from torch import nn

from autoprune import graph, pruning
from autoprune.errors import AutoPruneError, ConfigError


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _analyze(name: str) -> graph.GroupSet:
    c = CASES[name]()
    return graph.analyze(c.model, c.x)


def _members(gs: graph.GroupSet, gid: str) -> set[tuple[str, str]]:
    return {(m.module, m.role) for m in gs[gid].members}


def _member(gs: graph.GroupSet, gid: str, module: str, role: str) -> list[graph.Member]:
    return [m for m in gs[gid].members if m.module == module and m.role == role]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_case_analyses_with_prunable_groups(name: str) -> None:
    c = CASES[name]()
    gs = graph.analyze(c.model, c.x)
    assert len(gs.prunable()) >= c.min_prunable
    for g in gs:
        assert g.frozen == bool(g.reason)
        assert g.size > 0
    # ids are unique and the table names every frozen group's reason
    assert len(set(gs.ids())) == len(gs)
    table = gs.describe()
    for g in gs.frozen():
        if g.reason:
            assert g.reason.split(";")[0][:40] in table


def test_plain_chain_flatten_stride() -> None:
    gs = _analyze("plain_chain")
    assert gs.prunable_ids == ["c1:out", "c2:out"]
    assert _members(gs, "c1:out") == {("c1", "out"), ("b1", "norm"), ("c2", "in")}
    (fc,) = _member(gs, "c2:out", "fc", "in")
    assert (fc.offset, fc.stride) == (0, 16)  # flatten of 12×4×4: channel c owns columns 16c … 16c+15
    assert gs["fc:out"].reason == "model output"
    assert gs["input:x"].reason == "model input x"


def test_pool_heads_strides_and_literal() -> None:
    gs = _analyze("pool_heads")
    strides = {m.module: m.stride for m in gs["c2:out"].members if m.role == "in"}
    assert strides == {"fc1": 1, "fc2": 1, "fc3": 1, "fc4": 4}
    assert len(gs.literals) == 1 and gs.literals[0].base == 64 and gs.literals[0].terms == (("c2:out", 4),)


def test_identity_and_conv_shortcuts_form_stage_groups() -> None:
    gs = _analyze("resnet_identity_b")
    stage1 = _members(gs, "conv1:out")
    assert {("layer1.0.conv2", "out"), ("layer1.1.conv2", "out"), ("layer1.1.bn2", "norm"),
            ("layer2.0.conv1", "in"), ("layer2.0.shortcut.0", "in")} <= stage1
    stage2 = gs.group_of("layer2.0.shortcut.0")
    assert stage2 is gs.group_of("layer2.1.conv2") is gs.group_of("layer2.0.bn2")
    assert ("linear", "in") in _members(gs, stage2.id)
    assert len(gs.prunable()) == 6 and all(g.prunable for g in (gs["conv1:out"], stage2))


def test_zero_pad_shortcut_rule_splits_the_stream() -> None:
    gs = _analyze("resnet_pad_a")
    stream1 = gs["conv1:out"]  # stage-1 stream: also the middle channels of the stage-2 stream
    assert stream1.prunable
    assert {("layer2.0.conv2", "out"), ("layer2.1.conv2", "out"), ("layer2.1.conv1", "in")} <= \
        _members(gs, stream1.id)
    (mid,) = _member(gs, stream1.id, "layer2.0.conv2", "out")
    assert mid.offset == 4  # conv2 (16 channels) = [pad 4 | stage-1 stream 8 | pad 4]
    lo, hi = gs["layer2.0.conv2:out[0:4]"], gs["layer2.0.conv2:out[12:16]"]
    assert lo.prunable and hi.prunable and lo.size == hi.size == 4
    assert [(s.node, s.path, s.base, s.terms) for s in gs.literals] == [
        ("pad", ("args", 1, 4), 4, ((lo.id, 1),)), ("pad", ("args", 1, 5), 4, ((hi.id, 1),))]
    internal = [gs.group_of(f"layer{s}.{b}.conv1") for s in (1, 2) for b in (0, 1)]
    assert all(g.prunable for g in internal) and len(gs.prunable()) == 7


def test_channel_pad_that_is_not_a_zero_pad_is_frozen() -> None:
    class ReplicatePad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.nn.functional.pad(self.a(x), (0, 0, 0, 0, 1, 1), value=1.0))

    gs = graph.analyze(ReplicatePad(), torch.randn(1, 3, 6, 6))
    assert "channel pad (F.pad mode=constant, value=1.0)" in gs["a:out"].reason


def test_bottleneck_down_conv_joins_the_residual_group() -> None:
    gs = _analyze("bottleneck")
    g = gs.group_of("b1.c")
    assert {("b1.down.0", "out"), ("b1.down.1", "norm"), ("b2.c", "out"), ("b2.a.0", "in"), ("fc", "in")} <= \
        _members(gs, g.id)
    assert g.prunable


def test_depthwise_and_inverted_residual() -> None:
    gs = _analyze("mobilenet")
    stem = gs["stem.0:out"]
    assert ("blocks.0.conv.0", "dw") in _members(gs, stem.id)  # expand ratio 1: depthwise on the stem
    expand = gs.group_of("blocks.1.conv.0")
    assert {("blocks.1.conv.3", "dw"), ("blocks.1.conv.4", "norm"), ("blocks.1.conv.6", "in")} <= \
        _members(gs, expand.id)
    proj = gs.group_of("blocks.1.conv.6")
    assert proj is gs.group_of("blocks.2.conv.6") is gs.group_of("blocks.3.conv.6")
    assert proj.prunable


def test_grouped_convs_get_divisors_and_single_output_conv_is_not_depthwise() -> None:
    gs = _analyze("grouped_conv")
    # g (8 -> 8, groups=2): its input and output groups are pruned in steps of 2 (equal count per conv group)
    assert gs["c1:out"].prunable and gs["c1:out"].divisor == 2 and ("g", "in") in _members(gs, "c1:out")
    assert gs["g:out"].prunable and gs["g:out"].divisor == 2 and ("g", "out") in _members(gs, "g:out")
    assert ("g", "dw") not in _members(gs, "c1:out")
    # mult (4 -> 8, groups == in != out): a depth multiplier, pruned with its input (two outputs per input channel)
    assert "mult:out" not in gs and gs["c2:out"].prunable and gs["c2:out"].divisor == 1
    assert {("mult", "in"), ("mult", "out"), ("c3", "in")} <= _members(gs, "c2:out")
    assert ("one", "out") in _members(gs, "one:out") and gs["one:out"].prunable  # out_channels == 1: a plain conv
    assert gs["c3:out"].prunable and gs["c3:out"].divisor == 1
    assert "prunable (step 2)" in gs.describe() and gs.to_dict()["groups"][1]["divisor"] == 2


def test_grouped_conv_slices_follow_the_virtual_input_axis() -> None:
    gs = _analyze("grouped_chain")
    assert (gs["c1:out"].divisor, gs["g:out"].divisor, gs["c2:out"].divisor) == (4, 4, 1)
    assert gs.grouped_dims == {"g.weight": {1: 4}}
    (sl,) = [s for s in gs["c1:out"].slices if s.module == "g"]
    assert (sl.tensor, sl.dim, sl.offset, sl.stride, sl.groups) == ("g.weight", 1, 0, 1, 4)
    assert gs.tensor_dims["g.weight"] == {1: [("c1:out", 0, 1)], 0: [("g:out", 0, 1)]}


def test_resnext_block_groups() -> None:
    gs = _analyze("grouped_resnext")
    for layer in ("layer1", "layer2"):
        red, grp = gs.group_of(f"{layer}.reduce.0"), gs.group_of(f"{layer}.grouped")
        assert red.prunable and grp.prunable and red.divisor == grp.divisor == 4
        assert ({(f"{layer}.grouped", "in")} <= _members(gs, red.id)
                and {(f"{layer}.bn", "norm"), (f"{layer}.expand", "in")} <= _members(gs, grp.id))
    stream = gs["stem.0:out"]  # the identity shortcut couples the stem and layer1's expand conv
    assert stream.prunable and stream.divisor == 1 and ("layer1.expand", "out") in _members(gs, stream.id)


def test_groups_equal_out_channels_is_not_depthwise() -> None:
    gs = _analyze("grouped_eq_out")
    assert gs["c1:out"].prunable and gs["c1:out"].divisor == 4  # red: 8 -> 4, blocks of two input channels
    assert ("red", "dw") not in _members(gs, "c1:out") and ("red", "in") in _members(gs, "c1:out")
    assert "grouped conv red (groups=4, in=8, out=4) output" in gs["red:out"].reason
    assert pruning.legal_widths(gs["c1:out"]) == [4, 8]


def test_grouped_conv_couplings() -> None:
    gs = _analyze("grouped_mix")
    # cat(a: 8, b: 4) into g1 (blocks of 6): block 0 = a[0:6], block 1 = a[6:8] + b -> frozen with a reason
    for gid in ("a:out", "b:out"):
        assert "grouped conv g1 (groups=2, in=12, out=8): its input channel blocks mix channel groups unevenly" \
            in gs[gid].reason
    assert gs["g1:out"].divisor == 4  # lcm of g1's output (2 blocks) and g2's input (4 blocks)
    # g2 + c on a stream chunked in two tied halves: each half holds two of g2's four blocks
    half = gs.group_of("c")
    assert half.id == "g2:out[0:4]" and half.prunable and half.divisor == 2 and half.size == 4
    assert sorted(m.offset for m in _member(gs, half.id, "g2", "out")) == [0, 4]
    # cat(u, u) into gcat (2 blocks): each block is the whole half group, no extra divisor
    assert ("gcat", "in") in _members(gs, half.id) and gs["gcat:out"].divisor == 2


def test_concat_offsets() -> None:
    gs = _analyze("concat")
    assert gs["a:out"].prunable and gs["b:out"].prunable and gs["a:out"] is not gs["b:out"]
    (bn_a,) = _member(gs, "a:out", "bn", "norm")
    (bn_b,) = _member(gs, "b:out", "bn", "norm")
    assert (bn_a.offset, bn_b.offset) == (0, 6)
    d_in = sorted(m.offset for m in _member(gs, "c:out", "d", "in"))
    assert d_in == [0, 8]  # the same tensor concatenated twice
    fc = {g: [(m.offset, m.stride) for m in _member(gs, g, "fc", "in")] for g in ("d:out", "e:out", "c:out")}
    assert fc == {"d:out": [(0, 4)], "e:out": [(24, 4)], "c:out": [(44, 4)]}  # nested cat → flatten


def test_cat_on_other_dims_unions_inputs() -> None:
    gs = _analyze("cat_other_dim")
    assert gs.group_of("a") is gs.group_of("b")


def test_split_chunk_and_tensor_split_on_channels() -> None:
    gs = _analyze("split_chunk")
    a, b = gs["c1:out[0:6]"], gs["c1:out[6:16]"]  # split((6, 10)): two independent groups
    assert a.prunable and b.prunable and ("c2", "in") in _members(gs, a.id) and ("c7", "in") in _members(gs, b.id)
    assert [(s.path, s.base) for s in gs.literals] == [(("args", 1, 0), 6), (("args", 1, 1), 10)]
    halves = gs["c2:out[0:4]"]  # chunk(2): the halves are tied
    assert halves.prunable and sorted(m.offset for m in _member(gs, halves.id, "c2", "out")) == [0, 4]
    assert "tensor_split on the channel dim" in gs["c5:out"].reason
    assert gs["c3:out"].prunable  # chunk along the height keeps channels


def test_shared_module_unions_its_inputs() -> None:
    gs = _analyze("shared_module")
    assert gs.group_of("a") is gs.group_of("b")
    shared = gs.group_of("shared")
    assert {("shared", "out"), ("bn", "norm"), ("head", "in")} <= _members(gs, shared.id)
    assert len(gs.prunable()) == 2


def test_tied_embedding_and_output_layer() -> None:
    gs = _analyze("tied_embedding")
    stream = gs["emb:out"]
    assert {("emb", "out"), ("out", "in"), ("fc2", "out"), ("fc1", "in")} <= _members(gs, stream.id)
    assert stream.prunable and gs["fc1:out"].prunable
    assert not gs["emb:vocab"].prunable and ("out", "out") in _members(gs, "emb:vocab")


def test_se_gate_and_layer_scale() -> None:
    gs = _analyze("se_block")
    trunk = gs["c1.0:out"]
    assert {("fc2", "out"), ("fc4", "out"), ("fc1", "in"), ("fc3", "in"), ("c2", "in")} <= _members(gs, trunk.id)
    assert gs["fc1:out"].prunable and gs["fc3:out"].prunable
    assert ("gamma", "param") in _members(gs, "c2:out") and gs["c2:out"].prunable


def test_in_place_ops() -> None:
    gs = _analyze("in_place")
    assert {("c2", "out"), ("c3", "out"), ("c4", "in")} <= _members(gs, "c1:out")
    assert gs["c1:out"].prunable and gs["c4:out"].prunable
    assert "untraceable module zero" in gs["c5:out"].reason  # slice assignment inside an opaque leaf


def test_multiple_inputs_and_dict_outputs() -> None:
    gs = _analyze("multi_io")
    assert gs.group_of("a") is gs.group_of("b") and gs.group_of("a").prunable
    assert not gs["c:out"].prunable  # returned as an output
    assert {g.reason for g in gs if g.id.startswith("input:")} >= {"model input img"}


def test_untraceable_submodule_becomes_opaque_leaf() -> None:
    gs = _analyze("untraceable")
    assert "untraceable module gate" in gs["c1:out"].reason and "TraceError" in gs["c1:out"].reason
    assert gs["c2:out"].prunable


def _structure(gs: graph.GroupSet) -> list[tuple[object, ...]]:
    return [(g.id, g.size, g.prunable, g.divisor, g.members) for g in gs]


def test_chunk_list_goes_through_torch_export_and_matches_the_split_variant() -> None:
    c = CASES["c2f_chunk_list"]()
    before = {k: v.clone() for k, v in c.model.state_dict().items()}
    gs = graph.analyze(c.model, c.x)
    assert gs.exported_modules == ["c2f1", "c2f2"]
    split = _analyze("c2f_split")
    assert split.exported_modules == []  # a, b = x.split(c, 1): plain fx
    assert _structure(gs) == _structure(split)
    # chunk(2): tied halves; the residual bottlenecks keep the second half's layout: cv2 reads it four times
    halves = gs["c2f2.cv1.0:out[0:8]"]
    assert halves.prunable and sorted(m.offset for m in _member(gs, halves.id, "c2f2.cv2.0", "in")) == [0, 8, 16, 24]
    assert type(c.model.c2f1).__name__ == "C2f"  # the model itself is not rebuilt
    assert all(torch.equal(before[k], v) for k, v in c.model.state_dict().items())
    assert set(dict(gs.graph_module.named_parameters())) <= set(before)


def test_export_front_end_can_be_switched_off_and_reports_why_it_fails() -> None:
    c = CASES["c2f_chunk_list"]()
    gs = graph.analyze(c.model, c.x, use_export=False)
    assert gs.exported_modules == []
    assert "untraceable module c2f1 (C2f: TraceError" in gs["stem.0:out"].reason
    assert "torch.export front-end not tried" in gs["stem.0:out"].reason
    u = _analyze("untraceable")  # data-dependent `if`: torch.export cannot guard on it either
    assert "torch.export front-end: GuardOnDataDependentSymNode" in u["c1:out"].reason

    class Cumsum(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat(list(x.chunk(2, 1)), 1).cumsum(1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.odd = Cumsum()
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.odd(self.a(x)))

    gs2 = graph.analyze(Net(), torch.randn(1, 3, 4, 4))
    assert "torch.export front-end: no rule for aten.cumsum" in gs2["a:out"].reason


def test_untraceable_root_goes_through_torch_export() -> None:
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.b = nn.Conv2d(4, 6, 1)
            self.fc = nn.Linear(6 * 4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            u, v = list(F.relu(self.bn(self.a(x))).chunk(2, 1))
            y = F.max_pool2d(self.b(u * v)[:, :, 1:], 2)
            return self.fc(y.reshape(y.shape[0], -1))

    model = randomize(Root())
    gs = graph.analyze(model, torch.randn(1, 3, 5, 4))  # a batch of one: exported with a symbolic batch
    assert gs.exported_modules == [""]
    assert gs["a:out[0:4]"].prunable and ("bn", "norm") in _members(gs, "a:out[0:4]")
    assert gs["b:out"].prunable and [(m.offset, m.stride) for m in _member(gs, "b:out", "fc", "in")] == [(0, 4)]
    pruned = pruning.apply(model, gs, {"a:out[0:4]": 2, "b:out": 3})
    x = torch.randn(7, 3, 5, 4)
    assert pruned.get_submodule("fc").in_features == 12 and pruned.eval()(x).shape == (7, 5)
    masked = pruning.mask(model, gs, {"a:out[0:4]": 2, "b:out": 3})
    assert torch.allclose(pruned(x), masked.eval()(x), atol=1e-5)


def test_unknown_op_is_frozen_and_named() -> None:
    gs = _analyze("custom_op")
    assert "unknown op torch.cumsum" in gs["c2:out"].reason
    assert "unknown op torch.cumsum" in gs.group_of("c4", "in").reason  # b[:, :4]: a literal slice of it
    assert gs["c3:out"].prunable  # x[:, :, ::2, ::2] keeps channels
    assert "torch.cumsum" in gs.describe()


def test_transformer_mlp_prunable_attention_frozen() -> None:
    gs = _analyze("transformer")
    assert gs.prunable_ids == ["block.fc1:out"]
    assert "reshape" in gs["block.qkv:out"].reason
    assert "channel count read from the shape" in gs["patch:out"].reason


def test_mlp_and_layernorm_stream() -> None:
    assert _analyze("mlp").prunable_ids == ["fc1:out", "fc2:out"]
    gs = _analyze("layernorm_stream")
    assert {("ln1", "norm"), ("ln2", "norm"), ("gn", "norm"), ("fc2", "out"), ("head", "in")} <= \
        _members(gs, "embed:out")
    assert gs["embed:out"].prunable


def test_spatial_ops_keep_channels() -> None:
    gs = _analyze("spatial_ops")
    assert gs.prunable_ids == ["c1:out", "c2:out", "c3:out"]
    assert ("bn1d", "norm") in _members(gs, "c3:out")


# ----------------------------------------------------------------------------------------------------------------
# Options, errors, determinism, no mutation
# ----------------------------------------------------------------------------------------------------------------


def test_keep_widths_of_freezes_the_whole_group() -> None:
    c = CASES["resnet_identity_b"]()
    gs = graph.analyze(c.model, c.x, keep_widths_of=["layer1.0.conv2", "layer2.1.conv1:out"])
    assert gs["conv1:out"].frozen and "keep_widths_of layer1.0.conv2" in gs["conv1:out"].reason
    assert gs["layer2.1.conv1:out"].frozen
    assert gs["layer1.0.conv1:out"].prunable
    with pytest.raises(ConfigError, match="matches no layer"):
        graph.analyze(c.model, c.x, keep_widths_of=["layer9.conv"])


def test_opaque_by_class_and_name() -> None:
    c = CASES["resnet_identity_b"]()
    gs = graph.analyze(c.model, c.x, opaque=(BasicBlock,))
    assert len(gs.prunable()) == 0
    assert "opaque module layer1.0 (BasicBlock)" in gs["conv1:out"].reason
    gs2 = graph.analyze(c.model, c.x, opaque=["layer2.*"])
    assert gs2["layer1.0.conv1:out"].prunable and "layer2.0.conv1:out" not in gs2
    with pytest.raises(ConfigError, match="opaque module"):
        graph.analyze(c.model, c.x, opaque=["layer7"])


def test_lookup_errors_have_close_matches() -> None:
    gs = _analyze("plain_chain")
    with pytest.raises(ConfigError, match="did you mean 'c1:out'"):
        gs["c1:ou"]
    with pytest.raises(ConfigError, match="no out channel group"):
        gs.group_of("c9")
    assert gs.group_of("b1") is gs["c1:out"] and gs.group_of("fc", role="in") is gs["c2:out"]


def test_bad_inputs_are_user_errors() -> None:
    c = CASES["plain_chain"]()
    with pytest.raises(AutoPruneError, match="example input"):
        graph.analyze(c.model, torch.randn(1, 5, 8, 8))
    with pytest.raises(ConfigError):
        graph.analyze("not a model", c.x)  # type: ignore[arg-type]

    class Root(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(AutoPruneError, match="cannot trace"):
        graph.analyze(Root(), c.x)


def test_deterministic_ids_and_spec() -> None:
    a = _analyze("concat").to_dict()
    b = _analyze("concat").to_dict()
    assert a == b and a["groups"]


def test_analyze_does_not_touch_the_model() -> None:
    torch.manual_seed(0)
    model = TinyResNet("B").train()
    before = copy.deepcopy(model.state_dict())
    gs = graph.analyze(model, torch.randn(4, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics not updated
    assert gs.batch_size == 4 and gs.input_shape == (4, 3, 8, 8)


def test_group_cost_fields() -> None:
    gs = _analyze("plain_chain")
    g = gs["c1:out"]
    # c1: 8×3×3×3 weights (+8 bias) over 8×8 outputs, b1: 16 params, c2: 12×8×3×3 over 4×4 outputs
    assert g.macs == 8 * 27 * 64 + 12 * 8 * 9 * 16
    assert g.params == 8 * 27 + 8 + 16 + 12 * 8 * 9
    assert g.macs_linear == pytest.approx(27 * 64) and dict(g.macs_quadratic) == {"c2:out": 9 * 16}



def test_analysis_needs_neither_cost_nor_pruning_nor_importance() -> None:
    # the engine's bottom layer: the groups (with their cost fields) come from autoprune.graph alone
    code = ("import sys, torch; from torch import nn; import autoprune.graph as g; "
            "gs = g.analyze(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), torch.rand(1, 3, 6, 6)); "
            "assert gs['0:out'].macs > 0 and gs['0:out'].legal_widths(2) == [2, 4]; "
            "print(sorted(m for m in sys.modules if m in ('autoprune.cost', 'autoprune.pruning', "
            "'autoprune.importance')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"

@pytest.fixture(scope="module")
def zoo() -> object:
    return pytest.importorskip("autoprune.models")


def _zoo_input(name: str) -> torch.Tensor:
    return torch.rand(1, 1, 8, 8) if name == "small_cnn" else torch.rand(1, 3, 32, 32)


def test_zoo_group_structure(zoo: object) -> None:
    from autoprune.models import MODELS, build_model

    expected = {"resnet20": 14, "resnet20_b": 12, "vgg11_bn": 8}
    for name in MODELS.names():
        kw = {"in_channels": 1} if name == "small_cnn" else {}
        gs = graph.analyze(randomize(build_model(name, **kw)), _zoo_input(name))
        assert gs.prunable(), name
        assert "opaque module normalize" in gs["normalize:out"].reason
        if name in expected:
            assert len(gs.prunable()) == expected[name], name


def test_functional_conv_and_linear_with_parameters() -> None:
    gs = _analyze("functional")
    assert gs.prunable_ids == ["w1:out", "w2:out", "fc:out"]
    assert {("w1", "out"), ("bn", "norm"), ("w2", "in")} == _members(gs, "w1:out")
    assert {s.tensor for s in gs["w1:out"].slices if s.role == "out"} == {"w1", "b1"}
