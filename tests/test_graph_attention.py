"""Attention in the engine (issue #22): heads and hidden width through ``nn.MultiheadAttention``, explicit attention
heads, the class token, and exact attention MACs (ENGINE.md §2.7, §6).

The models are inline replicas of the structures of torchvision's ViT (``EncoderBlock``, class token, positional
embedding) and Swin (the fx-wrapped ``shifted_window_attention``), and timm/MaxViT-style explicit attention; no
torchvision is needed.

**Masked reference with heads.** Pruning heads must equal the original model with the removed heads' channels
zeroed. Zeroing a head's q and k rows alone does not remove it: its scores become 0, its softmax uniform, and it
still adds the mean of its values. The reference here (:func:`masked`) therefore zeroes, for every removed
channel of a group, every slice of every member that produces it (role ``out``: the head's q, k *and* v rows and
in-projection biases; ``param``: ``bias_k``/``bias_v``; ``norm``) and also the consumers' columns (role ``in``:
the output projection's columns of the head). With its v rows and bias zero the head's output is exactly zero
whatever its (uniform) attention weights, and the zero columns of the output projection make that explicit, so
the masked original equals a model without the head. It is written independently of :func:`autoprune.pruning.mask`
and, unlike ``engine_cases.masked_reference``, honours member strides (a head owns ``head_dim`` rows).
"""

from __future__ import annotations

import copy
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from engine_cases import Block, EinsumNet, HeadAttention, HeadNet, MHANet, SDPABlock, ViTLike, randomize
from torch import nn

from autoprune import cost, graph, pruning, serialize
from autoprune.graph.attention import PrunedMultiheadAttention


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def run(model: nn.Module, x: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(x)
    return out[0] if isinstance(out, tuple) else out


def masked(model: nn.Module, gs: graph.GroupSet, plan: pruning.PruningPlan) -> nn.Module:
    """The original with the removed channels zeroed in every producer, norm, parameter and consumer slice.

    See the module docstring for why the v rows and the output projection's columns of a removed head are zeroed.
    """
    ref = copy.deepcopy(model)
    named = dict(ref.named_parameters())
    named.update(ref.named_buffers())
    with torch.no_grad():
        for gid, kept in plan.pruned().items():
            g = gs[gid]
            removed = torch.tensor(sorted(set(range(g.size)) - set(kept)), dtype=torch.long)
            for sl in g.slices:
                if sl.role not in ("out", "norm", "param", "in", "dw") or "running" in sl.tensor:
                    continue
                t = named[sl.tensor]
                pos = sl.offset + (removed[:, None] * sl.stride + torch.arange(sl.stride)).flatten()
                t.index_fill_(sl.dim, pos, 0.0)
    return ref


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    scale = max(1.0, float(b.abs().max()))
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * scale


def prune(model: nn.Module, gs: graph.GroupSet, widths: dict[str, int]) -> tuple[nn.Module, pruning.PruningPlan]:
    p = pruning.plan(model, gs, widths)
    return pruning.apply(model, gs, p), p


def heads_of(gs: graph.GroupSet) -> list[graph.ChannelGroup]:
    """The head groups: an ``out`` member of stride > 1 (a head owns head_dim rows of its projection)."""
    return [g for g in gs.prunable() if any(m.role == "out" and m.stride > 1 for m in g.members)]


def half(g: graph.ChannelGroup) -> int:
    return max(1, g.size // 2)


# ----------------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------------------------


class MHAModel(nn.Module):
    """embed → ``nn.MultiheadAttention`` (self- or cross-attention) → head, with the call's options as parameters."""

    def __init__(self, batch_first: bool, need_weights: bool = False, kdim: int | None = None,
                 bias_kv: bool = False, zero_attn: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.embed = nn.Linear(12, 16)
        self.kv = nn.Linear(12, kdim) if kdim else None
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias,
                                          add_bias_kv=bias_kv, add_zero_attn=zero_attn)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        kv = self.kv(x) if self.kv is not None else h
        a, _ = self.attn(h, kv, kv, need_weights=self.need_weights)
        return self.head(F.gelu(a))


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return randomize(model)


def _mha_macs(tokens_q: int, tokens_k: int, src: int, e: int, ek: int, attn: int, heads: int, out: int) -> int:
    """Per-batch MACs of one ``nn.MultiheadAttention`` call by hand (projections + two attention matmuls)."""
    hd = attn // heads
    return tokens_q * attn * e + 2 * tokens_k * attn * ek + 2 * tokens_q * src * hd * heads + tokens_q * attn * out


def test_mha_groups() -> None:
    torch.manual_seed(0)
    model = _perturbed(MHANet())
    gs = graph.analyze(model, torch.randn(6, 2, 12))
    heads = gs["attn:heads"]
    assert heads.prunable and heads.size == 4
    rows = sorted((m.offset, m.stride) for m in heads.members if m.module == "attn.in_proj")
    assert rows == [(0, 4), (16, 4), (32, 4)]  # q, k and v rows of each head
    assert [(m.module, m.role, m.stride) for m in heads.members if m.role == "in"] == [("attn.out_proj", "in", 4)]
    assert ("attn", "in") in {(m.module, m.role) for m in gs["embed:out"].members}
    assert gs["attn.out_proj:out"].prunable
    assert gs.group_of("attn.in_proj") is heads


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_heads_pruned_equal_the_masked_original(batch_first: bool, need_weights: bool) -> None:
    torch.manual_seed(0)
    model = _perturbed(MHAModel(batch_first, need_weights))
    x = torch.randn(2, 7, 12) if batch_first else torch.randn(7, 2, 12)
    gs = graph.analyze(model, x)
    (heads,) = heads_of(gs)
    small, p = prune(model, gs, {heads.id: 2})
    mha = small.get_submodule("attn")
    assert isinstance(mha, PrunedMultiheadAttention)  # 2·4 attention channels, query width 16: not torch's forward
    assert (mha.num_heads, mha.head_dim, mha.embed_dim, mha.attn_dim) == (2, 4, 16, 8)
    assert close(run(small, x), run(masked(model, gs, p), x))
    assert close(run(small, x), run(pruning.mask(model, gs, p), x))
    # every group at half width (embedding width, heads, output width): still exact (no LayerNorm)
    small, p = prune(model, gs, {g.id: half(g) for g in gs.prunable()})
    assert close(run(small, x), run(masked(model, gs, p), x))
    # MACs: closed form == counter (attention counted) == by hand, before and after
    for m, w in ((model, {}), (small, p.widths)):
        r = cost.closed_form(gs, w)
        assert r.macs * gs.batch_size == cost.count_macs(m, x, attention=True)  # batch = dim 0 (7 when seq first)
        assert r.params == cost.count_params(m)


def test_mha_cross_attention_bias_kv_zero_attn() -> None:
    torch.manual_seed(0)
    model = _perturbed(MHAModel(True, kdim=8, bias_kv=True, zero_attn=True))
    x = torch.randn(2, 5, 12)
    gs = graph.analyze(model, x)
    heads = gs["attn:heads"]
    assert {m.module for m in heads.members} >= {"attn.in_proj", "attn.out_proj", "attn.bias_k", "attn.bias_v"}
    assert gs.group_of("kv").id != gs.group_of("embed").id  # separate q and k/v weights: their own groups
    r0 = cost.closed_form(gs)
    assert r0.macs * 2 == _mha_macs(10, 10, 5 + 2, 16, 8, 16, 4, 16) + 10 * 12 * 16 + 10 * 12 * 8 + 10 * 16 * 5
    for widths in ({heads.id: 1}, {g.id: half(g) for g in gs.prunable()}):
        small, p = prune(model, gs, widths)
        assert close(run(small, x), run(masked(model, gs, p), x))
        assert cost.closed_form(gs, p.widths).macs * 2 == cost.count_macs(small, x, attention=True)


def test_mha_that_still_fits_keeps_its_class_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _perturbed(MHANet())
    x = torch.randn(6, 2, 12)
    gs = graph.analyze(model, x)
    widths = {"attn:heads": 2, "embed:out": 8, "attn.out_proj:out": 8}  # 2 heads × 4 = 8 = query = output width
    small, p = prune(model, gs, widths)
    mha = small.get_submodule("attn")
    assert type(mha) is nn.MultiheadAttention
    assert (mha.embed_dim, mha.num_heads, mha.head_dim, mha.kdim, mha.vdim) == (8, 2, 4, 8, 8)
    assert close(run(small, x), run(masked(model, gs, p), x))
    assert cost.closed_form(gs, p.widths).macs * 6 == cost.count_macs(small, x)  # seq first: dim 0 is the "batch"
    pruning.save_pruned(small, tmp_path / "m", x)
    loaded = pruning.load_pruned(tmp_path / "m")
    assert type(loaded.get_submodule("attn")) is nn.MultiheadAttention
    assert loaded.get_submodule("attn").num_heads == 2
    assert torch.equal(run(loaded, x), run(small, x))


_FRESH = """
import sys, torch
from autoprune import serialize
x, want = torch.load(sys.argv[1] + "/io.pt", weights_only=True)
m = serialize.load_module(sys.argv[1] + "/m")
with torch.no_grad():
    got = m(x)
assert torch.equal(got, want)
a = m.get_submodule("layers.0.self_attention")
print(type(a).__name__, a.num_heads, a.head_dim, a.embed_dim)
"""


def test_pruned_vit_reloads_without_model_code(tmp_path: Path) -> None:
    """The pruned architecture (PrunedMultiheadAttention inside) loads in a process that imported only serialize."""
    torch.manual_seed(0)
    model = _perturbed(ViTLike())
    x = torch.rand(2, 3, 16, 16)
    gs = graph.analyze(model, x)
    small, _ = prune(model, gs, {g.id: 3 for g in heads_of(gs)} | {gs.group_of("conv_proj").id: 8})
    pruning.save_pruned(small, tmp_path / "m", x)
    arch = serialize.read_metadata(tmp_path / "m")
    assert arch["modules"]["layers.0.self_attention"]["type"] == "autoprune.graph.attention.PrunedMultiheadAttention"
    torch.save((x, run(small, x)), tmp_path / "io.pt")
    done = subprocess.run([sys.executable, "-c", _FRESH, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["PrunedMultiheadAttention", "3", "4", "8"]


_MASKS = ["none", "key_padding", "attn_bool", "attn_float", "attn_3d", "both", "causal"]


@pytest.mark.parametrize("mask", _MASKS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_mha_forward_is_torch_forward(mask: str, batch_first: bool) -> None:
    """At full widths, the decoupled forward equals nn.MultiheadAttention's for every option it supports."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    for kdim, bias_kv, zero_attn, need, avg in ((None, False, False, True, True), (8, True, True, True, False),
                                                 (None, True, False, False, True), (6, False, True, False, True)):
        ref = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, add_bias_kv=bias_kv,
                                    add_zero_attn=zero_attn).eval()
        _perturbed(ref)
        mine = PrunedMultiheadAttention.from_module(copy.deepcopy(ref), embed_dim=16, kdim=kdim or 16,
                                                    vdim=kdim or 16, num_heads=4)
        n, length, src = 2, 5, 4
        q = torch.randn(n, length, 16, generator=g)
        k = torch.randn(n, src, kdim or 16, generator=g)
        if kdim is None:
            k = q
            src = length
        kw: dict[str, Any] = {"need_weights": need, "average_attn_weights": avg}
        if mask in ("key_padding", "both"):
            kpm = torch.zeros(n, src, dtype=torch.bool)
            kpm[0, -1] = True
            kw["key_padding_mask"] = kpm
        if mask in ("attn_bool", "both"):
            kw["attn_mask"] = torch.rand(length, src, generator=g) > 0.7
        if mask == "attn_float":
            kw["attn_mask"] = torch.randn(length, src, generator=g)
        if mask == "attn_3d":
            kw["attn_mask"] = torch.randn(n * 4, length, src, generator=g)
        if mask == "causal":
            if kdim is not None:
                continue
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
            kw["is_causal"] = True
        if not batch_first:
            q, k = q.transpose(0, 1), k.transpose(0, 1)
        with torch.no_grad():
            want = ref(q, k, k, **kw)
            got = mine._decoupled_forward(q, k, k, kw.get("key_padding_mask"), need, kw.get("attn_mask"), avg,
                                          kw.get("is_causal", False))
        assert close(got[0], want[0]), (kdim, bias_kv, zero_attn, need, avg)
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            assert close(got[1], want[1])
        if kdim is None and not bias_kv and not zero_attn and mask == "none":  # unbatched input
            with torch.no_grad():
                u = q[0] if batch_first else q[:, 0]
                assert close(mine._decoupled_forward(u, u, u, None, need, None, avg, False)[0], ref(u, u, u)[0])


def test_mha_weights_used_or_per_head_mask_freeze_the_heads() -> None:
    class UsesWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(12, 16)
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            a, w = self.attn(h, h, h)
            b, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
            return a.mean(-1) + w.sum(-1) + b.mean(-1)

    model = UsesWeights().eval()
    gs = graph.analyze(model, (torch.randn(2, 5, 12), torch.zeros(8, 5, 5)))
    heads = gs["attn:heads"]
    assert heads.frozen
    assert "attention weights" in heads.reason and "one mask per head" in heads.reason


# ----------------------------------------------------------------------------------------------------------------
# ViT-like: class token, positional embedding, encoder blocks
# ----------------------------------------------------------------------------------------------------------------


def _vit_macs(heads: list[int], mlp: list[int], hidden: int = 16, tokens: int = 17, patches: int = 16) -> int:
    """Per-sample MACs of ViTLike by hand (head widths and MLP widths per block; head_dim 4)."""
    total = patches * hidden * 3 * 4 * 4 + hidden * 10
    for h, m in zip(heads, mlp):
        attn = 4 * h
        total += tokens * 3 * attn * hidden + 2 * tokens * tokens * attn + tokens * attn * hidden
        total += 2 * tokens * hidden * m
    return total


@pytest.mark.parametrize("batch_first", [True, False])
def test_vit_like_structure_heads_and_mlp(batch_first: bool) -> None:
    torch.manual_seed(0)
    model = _perturbed(ViTLike(batch_first=batch_first))
    x = torch.rand(2, 3, 16, 16)
    gs = graph.analyze(model, x)
    stream = gs.group_of("conv_proj")
    assert stream.prunable
    members = {(m.module, m.role) for m in stream.members}
    assert {("class_token", "param"), ("pos_embedding", "param"), ("layers.0.ln_1", "norm"),
            ("layers.0.self_attention", "in"), ("layers.1.self_attention.out_proj", "out"), ("ln", "norm"),
            ("heads.0", "in")} <= members
    heads = heads_of(gs)
    assert [g.id for g in heads] == ["layers.0.self_attention:heads", "layers.1.self_attention:heads"]
    mlp = [gs.group_of(f"layers.{i}.mlp.0") for i in range(2)]
    assert cost.closed_form(gs).macs == _vit_macs([4, 4], [32, 32])
    assert cost.closed_form(gs).macs * 2 == cost.count_macs(model, x, attention=True)
    # heads and MLP pruned (the stream with its LayerNorms kept): exact
    widths = {heads[0].id: 1, heads[1].id: 3, mlp[0].id: 10, mlp[1].id: 20}
    small, p = prune(model, gs, widths)
    assert close(run(small, x), run(masked(model, gs, p), x))
    r = cost.closed_form(gs, p.widths)
    assert r.macs == _vit_macs([1, 3], [10, 20])
    assert r.macs * 2 == cost.count_macs(small, x, attention=True)
    assert r.params == cost.count_params(small)
    # the hidden width too (LayerNorm statistics change: shapes and MACs checked, not equality)
    small, p = prune(model, gs, {g.id: half(g) for g in gs.prunable()})
    out = run(small, x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert "reshape(getitem, 8, " in small.code  # the literal hidden_dim of the patch embedding follows the width
    assert tuple(small.get_parameter("class_token").shape) == (1, 1, 8)
    assert cost.closed_form(gs, p.widths).macs * 2 == cost.count_macs(small, x, attention=True)


def test_vit_like_analysis_leaves_the_model_unchanged() -> None:
    torch.manual_seed(0)
    model = _perturbed(ViTLike())
    x = torch.rand(1, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = run(model, x)
    gs = graph.analyze(model, x)
    prune(model, gs, {g.id: half(g) for g in gs.prunable()})
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert type(model.layers[0].self_attention) is nn.MultiheadAttention
    assert model.layers[0].self_attention.num_heads == 4
    assert torch.equal(run(model, x), out)


# ----------------------------------------------------------------------------------------------------------------
# Explicit attention: q·kᵀ → softmax → ·v, scaled_dot_product_attention, einsum
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sdpa", [False, True])
def test_explicit_attention_heads(sdpa: bool) -> None:
    torch.manual_seed(0)
    model = _perturbed(HeadNet(sdpa))
    x = torch.randn(2, 6, 12)
    gs = graph.analyze(model, x)
    heads = gs["attn.qkv:out"]
    assert heads.prunable and heads.size == 4
    assert sorted((m.offset, m.stride) for m in heads.members if m.role == "out") == [(0, 4), (16, 4), (32, 4)]
    assert [(m.module, m.stride) for m in heads.members if m.role == "in"] == [("attn.proj", 4)]
    small, p = prune(model, gs, {heads.id: 2})
    assert close(run(small, x), run(masked(model, gs, p), x))
    assert "reshape(getitem, getitem_1, 3, 2, 4)" in small.code  # the literal head count, rewritten
    small2, p2 = prune(model, gs, {g.id: half(g) for g in gs.prunable()})
    assert close(run(small2, x), run(masked(model, gs, p2), x))
    explicit = HeadNet(sdpa=False)  # the same module with explicit matmuls, pruned alike
    explicit.load_state_dict(model.state_dict())
    gs_e = graph.analyze(explicit, x)
    for m, plan in ((model, None), (small, p), (small2, p2)):
        macs = cost.closed_form(gs, plan.widths if plan else {}).macs * 2
        assert macs == cost.count_macs(m, x, attention=True)
        if sdpa:  # FlopCounterMode counts the CPU kernel as 0: compare with the explicit matmul formulation
            twin = explicit if plan is None else pruning.apply(explicit, gs_e, pruning.PruningPlan(
                widths=plan.widths, keep=plan.keep, groups=gs_e))
            assert macs == cost.count_macs(twin, x)
            assert close(run(twin, x), run(m, x))
        else:
            assert macs == cost.count_macs(m, x)


def test_computed_head_sizes_freeze_the_heads() -> None:
    """engine_cases.Block / SDPABlock read the width from x.shape: the merge reshape(b, n, c) cannot follow pruned
    heads, so the heads freeze (and the stream, whose count sizes head_dim); MACs are still counted exactly."""
    for model in (Block(), SDPABlock()):
        gs = graph.analyze(model.eval(), torch.randn(1, 10, 16))
        qkv = gs["qkv:out"]
        assert qkv.frozen and "reshape" in qkv.reason, qkv.reason
    torch.manual_seed(0)
    sdpa_block = SDPABlock(dim=16, heads=2).eval()
    twin = HeadAttention(16, 2, sdpa=False).eval()  # the same module with explicit matmuls
    twin.load_state_dict(sdpa_block.state_dict())
    x = torch.randn(1, 10, 16)
    gs = graph.analyze(sdpa_block, x)
    assert close(run(twin, x), run(sdpa_block, x))
    assert cost.closed_form(gs).macs == cost.count_macs(twin, x) == 10 * 16 * 48 + 10 * 16 * 16 + 2 * 2 * 10 * 10 * 8


def test_einsum_attention_heads_and_macs() -> None:
    torch.manual_seed(0)
    model = _perturbed(EinsumNet())
    x = torch.randn(2, 6, 12)
    gs = graph.analyze(model, x)
    (heads,) = heads_of(gs)
    assert heads.size == 4
    assert cost.closed_form(gs).macs * 2 == cost.count_macs(model, x)
    small, p = prune(model, gs, {heads.id: 1})
    assert close(run(small, x), run(masked(model, gs, p), x))
    assert cost.closed_form(gs, p.widths).macs * 2 == cost.count_macs(small, x)


class EinsumOps(nn.Module):
    """einsum that contracts the channel dim (frozen, counted), with three operands (measured), one operand."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        y = torch.einsum("bnc,bmc->bnm", a, b)  # contracts the channels
        z = torch.einsum("bnm,bmc,cd->bnd", y, b, self.w)  # three operands
        return z + torch.einsum("bnc->bn", a)[..., None]


def test_einsum_macs_exact_when_channels_are_contracted_or_three_operands(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = EinsumOps().eval()
    x = torch.randn(2, 4, 6)
    with caplog.at_level(logging.WARNING, logger="autoprune.graph"):
        gs = graph.analyze(model, x)
    assert cost.closed_form(gs).macs * 2 == cost.count_macs(model, x)
    assert any("measured" in g.reason for g in gs)
    assert "measured on the example input" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Swin: the fx-wrapped shifted_window_attention (a replica under torchvision's qualified name)
# ----------------------------------------------------------------------------------------------------------------


def shifted_window_attention(input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                             relative_position_bias: torch.Tensor, window_size: list[int], num_heads: int,
                             shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0,
                             qkv_bias: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
                             logit_scale: torch.Tensor | None = None, training: bool = True) -> torch.Tensor:
    """Window attention as torchvision's Swin computes it: pad, cyclic shift, windows, multi-head attention with a
    relative position bias (and the shift mask), windows back, shift back, unpad."""
    b, h, w, c = input.shape
    pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, _ = x.shape
    shift = list(shift_size)
    if window_size[0] >= ph:
        shift[0] = 0
    if window_size[1] >= pw:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw = ph // window_size[0], pw // window_size[1]
    x = x.view(b, nh, window_size[0], nw, window_size[1], c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b * nh * nw, window_size[0] * window_size[1], c)
    if logit_scale is not None and qkv_bias is not None:  # V2: no key bias
        qkv_bias = qkv_bias.clone()
        qkv_bias[qkv_bias.numel() // 3:2 * (qkv_bias.numel() // 3)].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(x.size(0), x.size(1), 3, num_heads, c // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (c // num_heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = x.new_zeros((ph, pw))
        slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
        cols = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
        count = 0
        for hs in slices:
            for ws in cols:
                mask[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        mask = mask.view(nh, window_size[0], nw, window_size[1]).permute(0, 2, 1, 3).reshape(nh * nw, -1)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0)
        attn = attn.view(x.size(0) // (nh * nw), nh * nw, num_heads, x.size(1), x.size(1))
        attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, x.size(1), x.size(1))
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    x = x.view(b, nh, nw, window_size[0], window_size[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


shifted_window_attention.__module__ = "torchvision.models.swin_transformer"  # the qualified name the table lists
torch.fx.wrap("shifted_window_attention")


class SwinBlock(nn.Module):
    """torchvision's ``SwinTransformerBlock`` structure (NHWC): LayerNorm → window attention → residual, LayerNorm →
    MLP → residual; the attention module passes its linear layers' weights to the wrapped function."""

    def __init__(self, dim: int = 16, heads: int = 2, window: int = 4, shift: int = 2, v2: bool = False) -> None:
        super().__init__()
        self.window, self.shift, self.heads = [window, window], [shift, shift], heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.1)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten())
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1))) if v2 else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.window[0] * self.window[1]
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        y = shifted_window_attention(self.norm1(x), self.qkv.weight, self.proj.weight, bias, self.window, self.heads,
                                     shift_size=self.shift, qkv_bias=self.qkv.bias, proj_bias=self.proj.bias,
                                     logit_scale=self.logit_scale, training=self.training)
        x = x + y
        return x + self.mlp(self.norm2(x))


class SwinLike(nn.Module):
    """Conv patch embedding → NHWC → two Swin blocks (shifted and not) → pooled linear head."""

    def __init__(self, v2: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 2, 2)
        self.blocks = nn.Sequential(SwinBlock(shift=0, v2=v2), SwinBlock(shift=2, v2=v2))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(self.patch(x).permute(0, 2, 3, 1))
        return self.head(y.mean((1, 2)))


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("side", [12, 16])  # 6×6 tokens need padding to 8×8 windows; 8×8 do not
def test_swin_window_attention_counted_exactly(v2: bool, side: int) -> None:
    torch.manual_seed(0)
    model = _perturbed(SwinLike(v2))
    x = torch.rand(1, 3, side, side)
    gs = graph.analyze(model, x)
    assert cost.closed_form(gs).macs == cost.count_macs(model, x)
    # the hidden width passes the attention (qkv columns, proj rows: tests/test_graph_attention_swin.py); the heads
    # freeze here because this replica indexes its bias table inline, not through _get_relative_position_bias
    assert gs.group_of("patch").prunable
    assert not any(g.id.endswith(":heads") for g in gs.prunable())
    hidden = [gs.group_of(f"blocks.{i}.mlp.0") for i in range(2)]
    assert all(g.prunable for g in hidden)
    small, p = prune(model, gs, {g.id: 5 for g in hidden})
    assert close(run(small, x), run(masked(model, gs, p), x))
    assert cost.closed_form(gs, p.widths).macs == cost.count_macs(small, x)


# ----------------------------------------------------------------------------------------------------------------
# Uncounted ops: measured, priced as a constant, and said so
# ----------------------------------------------------------------------------------------------------------------


class Opaque(nn.Module):
    """A block analysed as an opaque leaf: its conv and its attention are invisible to the rules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        t = y.flatten(2).transpose(1, 2)
        a, _ = self.attn(t, t, t, need_weights=False)
        return y + a.transpose(1, 2).reshape(y.shape)


class WithOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Opaque()
        self.w = nn.Parameter(torch.randn(1, 8, 8))
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(F.relu(self.c1(x)))
        t = y.flatten(2).transpose(1, 2)
        z = torch.baddbmm(t, t, self.w.expand(t.shape[0], -1, -1))  # an op without a MAC formula
        return self.c2(y).mean((2, 3)) + z.mean((1, 2))[:, None]


def test_uncounted_ops_are_measured_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = WithOpaque().eval()
    x = torch.rand(2, 3, 6, 6)
    with caplog.at_level(logging.WARNING, logger="autoprune.graph"):
        gs = graph.analyze(model, x, opaque=[Opaque])
    measured = [g for g in gs if "measured on the example input" in g.reason]
    assert measured and any("block" in g.reason for g in measured)
    assert "measured on the example input" in caplog.text
    counted = cost.count_macs(model, x, attention=True)
    assert cost.closed_form(gs).macs * 2 == counted  # the opaque block's attention included
    assert cost.count_macs(model, x) < counted  # plain FlopCounterMode misses the fast-path attention
    small, p = prune(model, gs, {g.id: half(g) for g in gs.prunable()})
    assert cost.closed_form(gs, p.widths).macs * 2 == cost.count_macs(small, x, attention=True)


def test_head_importance_reads_the_in_projection_rows() -> None:
    """L1 importance of a head covers its q, k and v rows of ``in_proj_weight``, not only ``out_proj``'s columns:
    a head whose in-projection rows are shrunk ranks last even though its output columns are untouched."""
    from autoprune import importance

    torch.manual_seed(0)
    model = MHANet().eval()
    x = torch.randn(6, 2, 12)
    gs = graph.analyze(model, x)
    heads = gs["attn:heads"]
    hd = model.attn.head_dim
    with torch.no_grad():
        for part in range(3):  # q, k and v rows of head 2
            model.attn.in_proj_weight[part * 16 + 2 * hd: part * 16 + 3 * hd] *= 1e-3
    scores = importance.group_scores(model, gs, [heads.id], importance="l1")[heads.id]
    assert int(scores.argmin()) == 2
    kept = pruning.plan(model, gs, {heads.id: 3}, importance="l1").keep[heads.id]
    assert 2 not in kept
