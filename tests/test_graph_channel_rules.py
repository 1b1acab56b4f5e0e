"""Channel shuffle, channel counts read from shapes, literal channel slices, depth multipliers (ENGINE.md §2.2, §2.4).

Each structure used to freeze whole; now each is pruned exactly: the pruned model equals the masked original, the
literal it depends on is rewritten (or, for a count read at run time, needs none), and the structure still freezes
where the pattern is not understood.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_cases import (
    CASES,
    bn_block,
    channel_shuffle,
    flat_outputs,
    half_widths,
    masked_reference,
    randomize,
    run,
)
from torch import fx, nn

from autoprune import cost, graph, pruning


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _img(b: int = 2, c: int = 3, s: int = 8) -> torch.Tensor:
    return torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(0))


def _check(model: nn.Module, x: torch.Tensor, gs: graph.GroupSet, widths: dict[str, int]) -> fx.GraphModule:
    """Pruned == masked original (1e-5 relative), output shapes, closed-form MACs and params == measured."""
    p = pruning.plan(model, gs, widths)
    pruned = pruning.apply(model, gs, p)
    out, ref = run(pruned, x), run(model, x)
    assert [t.shape for t in flat_outputs(out)] == [t.shape for t in flat_outputs(ref)]
    masked = run(masked_reference(model, gs, p), x)
    scale = max(1.0, max(float(t.abs().max()) for t in flat_outputs(ref)))
    assert max(float((a - b).abs().max()) for a, b in zip(flat_outputs(out), flat_outputs(masked))) <= 1e-5 * scale
    price = cost.closed_form(gs, p.widths)
    assert price.params == sum(t.numel() for t in pruned.parameters())
    assert price.macs * x.shape[0] == cost.count_macs(pruned, x)
    return pruned


def _members(gs: graph.GroupSet, gid: str) -> set[tuple[str, str, int, int]]:
    return {(m.module, m.role, m.offset, m.stride) for m in gs[gid].members}


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


# ----------------------------------------------------------------------------------------------------------------
# Channel shuffle
# ----------------------------------------------------------------------------------------------------------------


def test_shuffle_ties_the_blocks_and_strides_the_result() -> None:
    c = CASES["channel_shuffle"]()
    gs = graph.analyze(c.model, c.x)
    blk = gs["g1:out[0:4]"]  # the 3 blocks of g1's output are tied: a width counts channels per block
    assert blk.prunable and blk.size == 4 and blk.divisor == 1
    assert {("g1", "out", 0, 1), ("g1", "out", 4, 1), ("g1", "out", 8, 1)} <= _members(gs, blk.id)
    # after the shuffle channel b of the block owns positions 3b … 3b+2 (one per block)
    assert {("dw", "dw", 0, 3), ("b2", "norm", 0, 3), ("c2", "in", 0, 3)} <= _members(gs, blk.id)
    assert gs["stem.0:out"].divisor == 3 and gs["stem.0:out"].prunable  # g1's input blocks
    assert ("c3", "in", 0, 2) in _members(gs, "c2:out[0:4]")
    # torchvision's form reads C at run time: no literal; the literal form's 4 and 8 follow the block width
    assert sorted((s.base, s.terms) for s in gs.literals) == [(4, (("c2:out[0:4]", 1),)), (8, (("c2:out[0:4]", 2),))]


def test_shuffle_prunes_exactly_and_rewrites_the_literals() -> None:
    c = CASES["channel_shuffle"]()
    gs = graph.analyze(c.model, c.x)
    widths = {g.id: pruning.legal_widths(g)[0] for g in gs.prunable()}  # minimal widths
    widths.update({"g1:out[0:4]": 3, "c2:out[0:4]": 3})
    p = pruning.plan(c.model, gs, widths)
    pruned = _check(c.model, c.x, gs, widths)
    assert pruned.get_submodule("g1").out_channels == 9 and pruned.get_submodule("dw").groups == 9
    for s in gs.literals:  # view(n, 2, 4, h, w) -> view(n, 2, 3, h, w); reshape(n, 8, h, w) -> reshape(n, 6, h, w)
        assert _node(pruned, s.node).args[s.path[1]] == {4: 3, 8: 6}[s.base]
    # every block of g1's output keeps the same channels: rows 4a + b for the kept b, in all three blocks
    rows = [4 * a + b for a in range(3) for b in p.keep["g1:out[0:4]"]]
    assert torch.equal(pruned.get_submodule("b1").weight, c.model.get_submodule("b1").weight[rows])


def test_shuffle_permutation_is_the_torchvision_one() -> None:
    """Channel i = a·q + b lands at b·g + a: after pruning block-local channel sets, the pruned shuffle is the
    restriction of the full one (checked on a bare conv → shuffle → conv)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(6, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(channel_shuffle(self.a(x), 2))

    torch.manual_seed(0)
    model, x = Net().eval(), _img()
    gs = graph.analyze(model, x)
    assert gs.prunable_ids == ["a:out[0:3]"] and ("b", "in", 0, 2) in _members(gs, "a:out[0:3]")
    for w in (1, 2):
        _check(model, x, gs, {"a:out[0:3]": w})


def test_shuffle_with_a_literal_split_size_and_split_pieces() -> None:
    """A ShuffleNetV2 unit with ``split`` (explicit sizes): the identity piece is tied to the branch output by the
    shuffle, the branch input piece stays independent; both split sizes are rewritten."""

    class Unit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = bn_block(3, 8)
            self.branch = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
            self.head = nn.Conv2d(8, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x1, x2 = self.stem(x).split([4, 4], 1)
            y = torch.cat((x1, self.branch(x2)), 1)
            return self.head(y.view(y.size(0), 2, 4, 8, 8).transpose(1, 2).reshape(-1, 8, 8, 8)).mean((2, 3))

    model, x = randomize(Unit()), _img()
    gs = graph.analyze(model, x)
    ident, into = gs["stem.0:out[0:4]"], gs["stem.0:out[4:8]"]
    assert ident.prunable and into.prunable and ident.id != into.id
    assert ("branch.0", "out", 0, 1) in _members(gs, ident.id) and ("head", "in", 0, 2) in _members(gs, ident.id)
    pruned = _check(model, x, gs, {ident.id: 3, into.id: 2})
    assert _node(pruned, "split").args[1] == [3, 2]
    assert _node(pruned, "view").args[3] == 3 and _node(pruned, "reshape").args[2] == 6


def test_shufflenet_v2_unit_prunes_the_stream() -> None:
    c = CASES["shufflenet_v2_unit"]()
    gs = graph.analyze(c.model, c.x)
    stream = gs["stem.0:out[0:4]"]  # chunk halves and the branch output, tied by the shuffle
    assert stream.prunable
    assert {("stem.0", "out", 0, 1), ("stem.0", "out", 4, 1), ("branch.5", "out", 0, 1),
            ("head", "in", 0, 2)} <= _members(gs, stream.id)
    assert gs["branch.0:out"].prunable
    assert not gs.literals  # everything is read at run time
    for w in (1, 2, 3):
        pruned = _check(c.model, c.x, gs, {stream.id: w, "branch.0:out": 2})
        assert pruned.get_submodule("stem.0").out_channels == 2 * w


def test_two_shufflenet_v2_units_freeze_the_stream_with_a_reason() -> None:
    """Known limit: a shuffled (strided) identity half cannot be tied channel by channel to a new branch output,
    so the second unit's shuffle freezes the stream; the branches' inner channels stay prunable."""

    def branch() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = bn_block(3, 8)
            self.b1, self.b2 = branch(), branch()
            self.head = nn.Conv2d(8, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x1, x2 = self.stem(x).chunk(2, 1)
            y = channel_shuffle(torch.cat((x1, self.b1(x2)), 1), 2)
            x1, x2 = y.chunk(2, 1)
            y = channel_shuffle(torch.cat((x1, self.b2(x2)), 1), 2)
            return self.head(y).mean((2, 3))

    model, x = randomize(Two()), _img()
    gs = graph.analyze(model, x)
    assert "channel blocks with different channel layouts" in gs.group_of("stem.0").reason
    assert gs["b1.0:out"].prunable and gs["b2.0:out"].prunable
    _check(model, x, gs, half_widths(gs))


@pytest.mark.parametrize(("how", "reason"), [
    ("sum", "channel dim viewed as 2 blocks (node view) used by sum"),  # a reduction over the block dim
    ("index", "used by operator.getitem"),  # one block taken out
    ("nomerge", "reshape of channel blocks that does not merge them"),  # transposed, then not merged
])
def test_shuffle_followed_by_something_else_stays_frozen(how: str, reason: str) -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            v = y.view(y.size(0), 2, 3, 8, 8)
            if how == "sum":
                return self.b(v.sum(1))
            if how == "index":
                return self.b(v[:, 0])
            return self.b(v.transpose(1, 2).reshape(y.size(0), 3, 16, 8))

    gs = graph.analyze(Odd().eval(), _img())
    parts = [g for g in gs if g.id.startswith("a:out")]  # the view cut a's output at the block boundary
    assert parts and all(not g.prunable and reason in g.reason for g in parts), [g.reason for g in parts]


def test_shuffle_written_with_permute_is_understood() -> None:
    class Perm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(6, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            v = y.view(y.size(0), 2, 3, 8, 8).permute(0, 2, 1, 3, 4)
            return self.b(v.reshape(y.size(0), 6, 8, 8))

    model, x = Perm().eval(), _img()
    gs = graph.analyze(model, x)
    assert gs.prunable_ids == ["a:out[0:3]"]
    assert sorted(s.base for s in gs.literals) == [3, 6]
    _check(model, x, gs, {"a:out[0:3]": 2})


# ----------------------------------------------------------------------------------------------------------------
# Channel counts read with size() / shape
# ----------------------------------------------------------------------------------------------------------------


def test_size_reads_that_only_size_views_do_not_freeze() -> None:
    c = CASES["size_read"]()
    gs = graph.analyze(c.model, c.x)
    trunk = gs["c1.0:out"]
    assert trunk.prunable and ("fc2", "out", 0, 1) in _members(gs, trunk.id)  # view(b, c, 1, 1) couples the gate
    assert ("c2", "in", 0, 1) in _members(gs, trunk.id) and not gs.literals
    for widths in (half_widths(gs), {g.id: 1 for g in gs.prunable()}):
        _check(c.model, c.x, gs, widths)


@pytest.mark.parametrize(("use", "reason"), [
    ("zeros", "channel count read by size() at node size used by torch.zeros"),
    ("slice", "channel count read from the shape"),
    ("half", "channel count read by size()"),
    ("add", "used by operator.add"),
])
def test_a_count_used_elsewhere_still_freezes(use: str, reason: str) -> None:
    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            if use == "zeros":
                return self.b(y + torch.zeros(1, y.size(1), 1, 1))
            if use == "slice":
                return self.b(torch.cat([y[:, : y.shape[1] // 2], y[:, : y.shape[1] // 2]], 1))
            if use == "half":  # the count halves the view's channel dim: not the width of that dim
                return self.b(y.view(y.size(0), y.size(1) // 2, 2, 64).flatten(1, 2).view(-1, 8, 8, 8))
            return self.b(y.view(y.size(0), y.size(1) + 0, 8, 8))

    gs = graph.analyze(Reads().eval(), _img())
    parts = [g for g in gs if g.id.startswith("a:out")]  # (a view into blocks cuts a's output)
    assert parts and all(not g.prunable and reason in g.reason for g in parts), [g.reason for g in parts]


# ----------------------------------------------------------------------------------------------------------------
# Literal channel slices
# ----------------------------------------------------------------------------------------------------------------


def test_literal_slices_become_sub_atoms_and_bounds_are_rewritten() -> None:
    c = CASES["literal_slices"]()
    gs = graph.analyze(c.model, c.x)
    leaves = [g.id for g in gs if g.id.startswith("stem.0:out")]
    assert leaves == [f"stem.0:out[{a}:{b}]" for a, b in ((0, 1), (1, 2), (2, 4), (4, 6), (6, 9), (9, 10), (10, 12))]
    assert all(gs[g].prunable for g in leaves)
    by_path = {(s.node, s.path): (s.base, dict(s.terms)) for s in gs.literals}
    g = [f"stem.0:out[{a}:{b}]" for a, b in ((0, 1), (1, 2), (2, 4), (4, 6), (6, 9), (9, 10), (10, 12))]
    assert by_path[("getitem", ("args", 1, 1, "start"))] == (4, {g[0]: 1, g[1]: 1, g[2]: 1})  # [:, 4:]
    assert by_path[("getitem_1", ("args", 1, 1, "stop"))] == (4, {g[0]: 1, g[1]: 1, g[2]: 1})  # [:, :4]
    assert by_path[("getitem_2", ("args", 1, 1, "start"))] == (-3, {g[5]: -1, g[6]: -1})  # [:, -3:]
    assert by_path[("getitem_3", ("args", 1, 1, "start"))] == (2, {g[0]: 1, g[1]: 1})  # [:, 2:-2]
    assert by_path[("getitem_3", ("args", 1, 1, "stop"))] == (-2, {g[6]: -1})
    assert by_path[("narrow", ("args", 2))] == (1, {g[0]: 1})
    assert by_path[("narrow", ("args", 3))] == (5, {g[1]: 1, g[2]: 1, g[3]: 1})
    widths = {g: 1 for g in leaves} | {"a:out": 3, "c:out": 2}
    pruned = _check(c.model, c.x, gs, widths)
    assert _node(pruned, "getitem").args[1][1] == slice(3, None, None)  # 1 + 1 + 1 channels before it
    assert _node(pruned, "getitem_2").args[1][1] == slice(-2, None, None)  # [9:10] and [10:12] keep 1 each
    assert _node(pruned, "narrow").args[2:] == (1, 3)
    for widths in (half_widths(gs), {g.id: g.size for g in gs.prunable()}):
        _check(c.model, c.x, gs, widths)


@pytest.mark.parametrize(("index", "reason"), [
    ("step", "indexing along the channel dim"),
    ("int", "indexing along the channel dim"),
    ("tensor", "indexing along the channel dim"),
])
def test_slices_that_are_not_understood_freeze(index: str, reason: str) -> None:
    class Cut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            if index == "step":
                return self.b(y[:, ::2])
            if index == "int":
                return self.b(y[:, 3, None].expand(-1, 4, -1, -1))
            return self.b(y[:, torch.tensor([0, 2, 4, 6])])

    gs = graph.analyze(Cut().eval(), _img())
    assert not gs.group_of("a").prunable and reason in gs.group_of("a").reason


def test_slice_of_a_concat_keeps_the_branches_prunable() -> None:
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(3, 8, 1)
            self.head = nn.Conv2d(10, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.a(x), self.b(x)], 1)[:, 3:13])

    model, x = randomize(Cat()), _img()
    gs = graph.analyze(model, x)
    assert gs["a:out[3:8]"].prunable and gs["b:out[0:5]"].prunable and gs.frozen_share() == 0.0
    pruned = _check(model, x, gs, {"a:out[0:3]": 2, "a:out[3:8]": 2, "b:out[0:5]": 4, "b:out[5:8]": 1})
    assert _node(pruned, "getitem").args[1][1] == slice(2, 8, None)


# ----------------------------------------------------------------------------------------------------------------
# Depthwise convs with a channel multiplier
# ----------------------------------------------------------------------------------------------------------------


def test_depth_multiplier_prunes_input_channels_with_their_outputs() -> None:
    c = CASES["depth_multiplier"]()
    gs = graph.analyze(c.model, c.x)
    g = gs["stem.0:out"]
    assert g.prunable and g.divisor == 1 and [x.id for x in gs.prunable()] == ["stem.0:out", "pw:out"]
    assert {("m1", "in", 0, 1), ("m1", "out", 0, 2), ("b1", "norm", 0, 2), ("dw", "dw", 0, 2),
            ("m2", "in", 0, 2), ("m2", "out", 0, 6), ("b2", "norm", 0, 6), ("pw", "in", 0, 6)} <= _members(gs, g.id)
    assert gs.group_of("m1") is g
    for w in (1, 4):
        pruned = _check(c.model, c.x, gs, {g.id: w, "pw:out": 5})
        m1, dw, m2 = (pruned.get_submodule(k) for k in ("m1", "dw", "m2"))
        assert (m1.in_channels, m1.groups, m1.out_channels) == (w, w, 2 * w)
        assert (dw.in_channels, dw.groups, dw.out_channels) == (2 * w, 2 * w, 2 * w)
        assert (m2.in_channels, m2.groups, m2.out_channels) == (2 * w, 2 * w, 6 * w)


def test_depth_multiplier_in_the_grouped_case() -> None:
    gs = graph.analyze(CASES["grouped_conv"]().model, _img())
    g = gs["c2:out"]  # mult: 4 -> 8, groups=4 (used to freeze: one channel per block)
    assert g.prunable and g.divisor == 1 and "mult:out" not in gs
    assert {("mult", "in", 0, 1), ("mult", "out", 0, 2), ("c3", "in", 0, 2)} <= _members(gs, g.id)


def test_depth_multiplier_on_an_input_it_does_not_understand_freezes() -> None:
    class Swapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.m = nn.Conv2d(4, 8, 3, padding=1, groups=4)
            self.b = nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.m(self.a(x).transpose(1, 2)))  # the channels on dim 2: m convolves over the height

    gs = graph.analyze(Swapped().eval(), _img(s=4))
    assert not gs["a:out"].prunable and "channel layout not understood by consumer at m" in gs["a:out"].reason
    assert not gs.group_of("m").prunable


def test_functional_channel_shuffle_through_torch_export_front_end() -> None:
    """A shuffle inside a module fx cannot trace (``list(x.chunk(...))``) goes through torch.export: the exported
    graph reads the count with ``size`` too, so it gives the same groups as the fx-traceable unit."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branch = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x1, x2 = list(x.chunk(2, 1))
            return channel_shuffle(torch.cat((x1, self.branch(x2)), 1), 2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = bn_block(3, 8)
            self.block = Block()
            self.head = nn.Conv2d(8, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(self.stem(x))).mean((2, 3))

    model, x = randomize(Net()), _img()
    gs = graph.analyze(model, x)
    assert gs.exported_modules == ["block"]
    stream = gs.group_of("stem.0")
    assert stream.prunable, stream.reason
    _check(model, x, gs, {g.id: max(1, g.size // 2) for g in gs.prunable()})


def test_shuffle_pruned_model_round_trips(tmp_path: Path) -> None:
    for name in ("channel_shuffle", "literal_slices", "depth_multiplier"):
        c = CASES[name]()
        gs = graph.analyze(c.model, c.x)
        pruned = pruning.apply(c.model, gs, half_widths(gs))
        pruning.save_pruned(pruned, tmp_path / name, c.x)
        loaded = pruning.load_pruned(tmp_path / name)
        assert torch.equal(run(loaded, c.x), run(pruned, c.x))
