"""Swin's window attention with its heads pruned (issue #22; ENGINE.md §2.4, attention).

torchvision's ``ShiftedWindowAttention.forward`` passes its linear layers' weights, the per-head relative position
bias and ``self.num_heads`` to the fx-wrapped ``shifted_window_attention``, which takes ``head_dim = C // num_heads``
from its input's width. The models here are inline replicas of that structure (V1: a bias table with one column
per head; V2: the bias from ``cpb_mlp`` and a per-head ``logit_scale``), calling replicas of torchvision's wrapped
functions under torchvision's qualified names, so no torchvision is needed (``tests/vision/
test_vision_serialize.py`` runs the same checks on torchvision's own Swin-T and Swin-V2-T).

Checked: the heads are groups (q, k, v rows of the qkv projection, the output projection's columns, the bias
table's columns or ``cpb_mlp``'s rows, ``logit_scale``), pruning them equals the masked original
(``test_graph_attention.masked``: a removed head's q, k and v rows zeroed, see its docstring), the closed-form MACs
equal the counter's before and after, the hidden width combines with the heads, ``pruning.apply`` calls
:func:`autoprune.graph.attention.pruned_shifted_window_attention` where torchvision's would derive a wrong
``head_dim``, and the pruned architecture reloads in a fresh process without model code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_graph_attention import _perturbed, close, heads_of, masked, prune, run, shifted_window_attention
from torch import fx, nn

from autoprune import cost, graph, pruning, serialize
from autoprune.graph.attention import pruned_shifted_window_attention

torch.fx.wrap("shifted_window_attention")  # the replica of torchvision's (its qualified name is torchvision's)


def _get_relative_position_bias(relative_position_bias_table: torch.Tensor, relative_position_index: torch.Tensor,
                                window_size: list[int]) -> torch.Tensor:
    """torchvision's ``_get_relative_position_bias``: table rows gathered, one ``[N, N]`` map per head."""
    n = window_size[0] * window_size[1]
    bias = relative_position_bias_table[relative_position_index].view(n, n, -1)
    return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


_get_relative_position_bias.__module__ = "torchvision.models.swin_transformer"
torch.fx.wrap("_get_relative_position_bias")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


DIM, HEADS, HEAD_DIM, WINDOW = 24, 3, 8, 4


class WindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` (``v2``: ``ShiftedWindowAttentionV2``).

    ``bias`` is where the relative position bias comes from: ``"table"`` (V1's table, gathered by
    ``_get_relative_position_bias``) or ``"whole"`` (a ``[1, heads, N, N]`` parameter passed as it is).
    ``computed_heads`` passes a head count computed from the input instead of the literal ``num_heads``.
    """

    def __init__(self, dim: int, heads: int, window: int, shift: int, v2: bool = False, bias: str = "table",
                 computed_heads: bool = False) -> None:
        super().__init__()
        self.window_size, self.shift_size, self.num_heads = [window, window], [shift, shift], heads
        self.v2, self.bias, self.computed_heads = v2, bias, computed_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("relative_position_index", (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten())
        side = torch.arange(-(window - 1), window, dtype=torch.float32) / (window - 1) * 8
        table = torch.stack(torch.meshgrid(side, side, indexing="ij")).permute(1, 2, 0).unsqueeze(0)
        if v2:
            self.register_buffer("relative_coords_table", torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0)
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(inplace=True), nn.Linear(32, heads, bias=False))
            self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1)))
        elif bias == "table":
            self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.1)
        else:
            self.relative_position_bias = nn.Parameter(torch.randn(1, heads, window ** 2, window ** 2) * 0.1)

    def get_relative_position_bias(self) -> torch.Tensor:
        if self.v2:
            bias = _get_relative_position_bias(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads),
                                               self.relative_position_index, self.window_size)
            return 16 * torch.sigmoid(bias)
        if self.bias == "table":
            return _get_relative_position_bias(self.relative_position_bias_table, self.relative_position_index,
                                               self.window_size)
        return self.relative_position_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.shape[-1] // HEAD_DIM if self.computed_heads else self.num_heads
        return shifted_window_attention(x, self.qkv.weight, self.proj.weight, self.get_relative_position_bias(),
                                        self.window_size, heads, shift_size=self.shift_size,
                                        qkv_bias=self.qkv.bias, proj_bias=self.proj.bias,
                                        logit_scale=self.logit_scale if self.v2 else None, training=self.training)


class SwinBlock(nn.Module):
    """torchvision's ``SwinTransformerBlock`` (NHWC): norm → window attention → residual, norm → MLP → residual."""

    def __init__(self, shift: int, norm: bool = True, **kw: object) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM) if norm else nn.Identity()
        self.attn = WindowAttention(DIM, HEADS, WINDOW, shift, **kw)  # type: ignore[arg-type]
        self.norm2 = nn.LayerNorm(DIM) if norm else nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SwinNet(nn.Module):
    """Conv patch embedding → NHWC → a plain and a shifted Swin block → pooled linear head."""

    def __init__(self, **kw: object) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, 2, 2)
        self.blocks = nn.Sequential(SwinBlock(0, **kw), SwinBlock(2, **kw))
        self.head = nn.Linear(DIM, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.patch(x).permute(0, 2, 3, 1)).mean((1, 2)))


def _model(seed: int = 0, **kw: object) -> SwinNet:
    torch.manual_seed(seed)
    return _perturbed(SwinNet(**kw), seed)


def _heads(gs: graph.GroupSet) -> list[graph.ChannelGroup]:
    groups = heads_of(gs)
    assert len(groups) == 2 and all(g.size == HEADS for g in groups), [g.id for g in groups]
    return groups


def _window_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (shifted_window_attention, pruned_shifted_window_attention)]


def _num_heads(n: fx.Node) -> int:
    return n.args[5] if len(n.args) > 5 else n.kwargs["num_heads"]


# ----------------------------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True])
def test_heads_are_groups_with_every_per_head_tensor(v2: bool) -> None:
    model = _model(v2=v2)
    x = torch.rand(1, 3, 16, 16)
    gs = graph.analyze(model, x)
    assert cost.closed_form(gs).macs == cost.count_macs(model, x)
    for i, g in enumerate(_heads(gs)):
        attn = f"blocks.{i}.attn"
        if not v2:
            assert g.id == f"{attn}:heads"
        slices = {(s.tensor, s.dim, s.offset, s.stride, s.role) for s in g.slices}
        for part in range(3):  # q, k and v rows of each head
            assert (f"{attn}.qkv.weight", 0, part * DIM, HEAD_DIM, "out") in slices
            assert (f"{attn}.qkv.bias", 0, part * DIM, HEAD_DIM, "out") in slices
        assert (f"{attn}.proj.weight", 1, 0, HEAD_DIM, "in") in slices
        if v2:
            assert (f"{attn}.cpb_mlp.2.weight", 0, 0, 1, "out") in slices
            assert (f"{attn}.logit_scale", 0, 0, 1, "param") in slices
        else:
            assert (f"{attn}.relative_position_bias_table", 1, 0, 1, "param") in slices
        call = _window_calls(gs.graph_module)[i]
        assert any(s.node == call.name and s.terms == ((g.id, 1),) for s in gs.literals)  # num_heads rewritten
    # the hidden width passes through: qkv columns consume it, proj rows produce it (tied by the residual)
    stream = gs.group_of("patch")
    assert {("blocks.0.attn.qkv", "in"), ("blocks.0.attn.proj", "out")} <= {(m.module, m.role) for m in stream.members}


# ----------------------------------------------------------------------------------------------------------------
# Pruned == masked original, MACs exact
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("side", [12, 16])  # 6×6 tokens are padded to 8×8 windows; 8×8 are not
def test_pruned_heads_equal_the_masked_original(v2: bool, side: int) -> None:
    model = _model(v2=v2)
    x = torch.rand(2, 3, side, side)
    gs = graph.analyze(model, x)
    first, second = _heads(gs)
    mlp = [gs.group_of(f"blocks.{i}.mlp.0") for i in range(2)]
    small, p = prune(model, gs, {first.id: 1, second.id: 2, mlp[0].id: 30, mlp[1].id: 40})
    ref = run(model, x)
    got, want = run(small, x), run(masked(model, gs, p), x)
    assert close(got, want) and not close(got, ref)  # heads really removed, and exactly
    assert close(run(pruning.mask(model, gs, p), x), want)
    assert cost.closed_form(gs, p.widths).macs * len(x) == cost.count_macs(small, x)
    calls = _window_calls(small)
    assert [n.target for n in calls] == [pruned_shifted_window_attention] * 2
    assert [_num_heads(n) for n in calls] == [1, 2] and [n.kwargs["head_dim"] for n in calls] == [HEAD_DIM] * 2
    assert small.get_parameter("blocks.1.attn.qkv.weight").shape == (3 * 2 * HEAD_DIM, DIM)
    assert small.get_parameter("blocks.1.attn.proj.weight").shape == (DIM, 2 * HEAD_DIM)
    if v2:
        assert small.get_parameter("blocks.0.attn.logit_scale").shape == (1, 1, 1)
        assert small.get_parameter("blocks.0.attn.cpb_mlp.2.weight").shape == (1, 32)
    else:
        assert small.get_parameter("blocks.0.attn.relative_position_bias_table").shape == ((2 * WINDOW - 1) ** 2, 1)


@pytest.mark.parametrize("v2", [False, True])
def test_hidden_width_and_heads_pruned_together(v2: bool) -> None:
    """Without LayerNorm on the stream (LayerNorm's statistics change when channels go, §2.4) the hidden width is
    exact too: the attention's input width (20), attention width (heads · 8) and output width then all differ."""
    model = _model(v2=v2, norm=False)
    x = torch.rand(2, 3, 12, 12)
    gs = graph.analyze(model, x)
    stream = gs.group_of("patch")
    assert stream.prunable
    widths = {stream.id: 20} | {g.id: 2 for g in _heads(gs)}
    small, p = prune(model, gs, widths)
    assert close(run(small, x), run(masked(model, gs, p), x))
    assert cost.closed_form(gs, p.widths).macs * len(x) == cost.count_macs(small, x)
    assert small.get_parameter("blocks.0.attn.qkv.weight").shape == (3 * 2 * HEAD_DIM, 20)
    assert all(n.target is pruned_shifted_window_attention for n in _window_calls(small))


def test_widths_that_still_fit_keep_torchvision_s_call() -> None:
    model = _model()
    x = torch.rand(1, 3, 16, 16)
    gs = graph.analyze(model, x)
    small, p = prune(model, gs, {gs.group_of("blocks.0.mlp.0").id: 20})
    assert [n.target for n in _window_calls(small)] == [shifted_window_attention] * 2
    assert close(run(small, x), run(masked(model, gs, p), x))


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("shift", [0, 2])
def test_pruned_function_is_torchvision_s_at_full_width(v2: bool, shift: int) -> None:
    attn = _perturbed(WindowAttention(DIM, HEADS, WINDOW, shift, v2=v2)).eval()
    x = torch.randn(2, 6, 7, DIM)  # padded to 8×8
    args = (x, attn.qkv.weight, attn.proj.weight, attn.get_relative_position_bias(), attn.window_size, HEADS)
    kw = {"shift_size": attn.shift_size, "qkv_bias": attn.qkv.bias, "proj_bias": attn.proj.bias,
          "logit_scale": attn.logit_scale if v2 else None, "training": False}
    with torch.no_grad():
        want = shifted_window_attention(*args, **kw)
        assert close(pruned_shifted_window_attention(*args, **kw), want, 1e-6)
        assert close(pruned_shifted_window_attention(*args, **kw, head_dim=HEAD_DIM), want, 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# What freezes
# ----------------------------------------------------------------------------------------------------------------


def test_computed_head_count_freezes_the_call_with_exact_macs() -> None:
    model = _model(computed_heads=True)
    x = torch.rand(1, 3, 12, 12)
    gs = graph.analyze(model, x)
    assert not heads_of(gs)
    stream = gs.group_of("patch")
    assert stream.frozen and "shifted_window_attention call not understood" in stream.reason
    assert cost.closed_form(gs).macs == cost.count_macs(model, x)
    hidden = gs.group_of("blocks.0.mlp.0")
    small, p = prune(model, gs, {hidden.id: 20})
    assert close(run(small, x), run(masked(model, gs, p), x))


# ----------------------------------------------------------------------------------------------------------------
# Save and reload without model code; analyse the pruned model again
# ----------------------------------------------------------------------------------------------------------------

_FRESH = """
import sys, torch
from autoprune import serialize
x, want = torch.load(sys.argv[1] + "/io.pt", weights_only=True)
m = serialize.load_module(sys.argv[1] + "/m")
with torch.no_grad():
    assert torch.equal(m(x), want)
calls = [n for n in m.graph.nodes if n.op == "call_function" and "window_attention" in str(n.target)]
print(len(calls), *[n.kwargs["head_dim"] for n in calls])
"""


def test_pruned_swin_reloads_without_model_code_and_prunes_again(tmp_path: Path) -> None:
    """The bias is passed whole here, so after pruning every call is autoprune's (no torchvision-named function is
    left for a fresh process to import); torchvision's own Swin is saved in tests/vision/test_vision_serialize.py."""
    model = _model(bias="whole")
    x = torch.rand(2, 3, 12, 12)
    gs = graph.analyze(model, x)
    heads = _heads(gs)
    assert {s.tensor for s in heads[0].slices if s.role == "param"} == {"blocks.0.attn.relative_position_bias"}
    small, p = prune(model, gs, {g.id: 2 for g in heads})
    assert close(run(small, x), run(masked(model, gs, p), x))
    pruning.save_pruned(small, tmp_path / "m", x)
    targets = {n["target"] for n in serialize.read_metadata(tmp_path / "m")["graph"] if n["op"] == "call_function"}
    assert "autoprune.graph.attention.pruned_shifted_window_attention" in targets
    torch.save((x, run(small, x)), tmp_path / "io.pt")
    done = subprocess.run([sys.executable, "-c", _FRESH, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["2", str(HEAD_DIM), str(HEAD_DIM)]
    # the loaded model is analysed again (the rule reads head_dim), pruned again, and still exact
    loaded = pruning.load_pruned(tmp_path / "m")
    gs2 = graph.analyze(loaded, x)
    assert [g.size for g in heads_of(gs2)] == [2, 2]
    assert cost.closed_form(gs2).macs * len(x) == cost.count_macs(loaded, x)
    smaller, p2 = prune(loaded, gs2, {g.id: 1 for g in heads_of(gs2)})
    assert close(run(smaller, x), run(masked(loaded, gs2, p2), x))
    assert cost.closed_form(gs2, p2.widths).macs * len(x) == cost.count_macs(smaller, x)


def test_attention_macs_follow_the_heads() -> None:
    """The closed form by hand: projections over the padded tokens plus 2·tokens·N per attention channel."""
    model = _model()
    x = torch.rand(1, 3, 12, 12)  # 6×6 tokens, padded to 8×8
    gs = graph.analyze(model, x)
    tokens, n = 64, WINDOW * WINDOW
    full = cost.closed_form(gs).macs
    small_widths = {g.id: 1 for g in _heads(gs)}
    pruned = cost.closed_form(gs, small_widths).macs
    per_head = 2 * tokens * n * HEAD_DIM + tokens * 3 * HEAD_DIM * DIM + tokens * HEAD_DIM * DIM
    assert full - pruned == 2 * (HEADS - 1) * per_head
    assert full == cost.count_macs(model, x)
