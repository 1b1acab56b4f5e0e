"""torchvision models with fx-wrapped functions and pruned Swin heads, saved as architecture data (issue #22).

* Swin-T and Swin-V2-T with attention heads pruned (half the heads of every block; Swin-V2-T all but the last
  stage): the pruned model equals the masked original (``engine_cases.masked_reference``: a removed head's q, k, v
  rows, bias-table columns / ``cpb_mlp`` rows and ``logit_scale`` zeroed) within ``1e-5 · max(1, max|output|)``,
  the closed-form MACs equal the counter's (``bench_engine_zoo.reference_macs``) before and after, and the saved
  architecture loads in a fresh process that imports only ``autoprune.serialize`` with identical output — its
  graph calls torchvision's wrapped functions (``_get_relative_position_bias``, ``_patch_merging_pad``,
  ``stochastic_depth``, and ``shifted_window_attention`` where the widths still fit it) and autoprune's
  ``pruned_shifted_window_attention`` through serialize's allow-list.
* EfficientNet-B0 and a reduced MaxViT-T (the zoo test's configuration) at 50 % of every prunable group (L1):
  saved and reloaded the same way (``stochastic_depth``).
* autoprune's decoupled window attention computes exactly torchvision's at full width.

Runs in the vision environment (``make test-vision``); skipped where torchvision cannot be imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn

try:
    from torchvision import models as tvm
    from torchvision.models import swin_transformer as tv_swin
except Exception as exc:  # a torchvision built for another torch raises more than ImportError
    pytest.skip(f"torchvision cannot be imported here ({type(exc).__name__}: {exc}); this test runs in the vision "
                "environment: make test-vision", allow_module_level=True)

from engine_cases import half_widths, masked_reference

from autoprune import cost, graph, pruning
from autoprune.graph.attention import pruned_shifted_window_attention
from benchmarks import bench_engine_zoo as bz

pytestmark = pytest.mark.vision


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


def _maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(64, 64), stem_channels=64, partition_size=2, block_channels=[64, 128, 256, 512],
                  block_layers=[1, 1, 1, 1], head_dim=32, stochastic_depth_prob=0.2)


#: name → (builder, input side).
MODELS = {
    "swin_t": (tvm.swin_t, 64),
    "swin_v2_t": (tvm.swin_v2_t, 64),
    "efficientnet_b0": (tvm.efficientnet_b0, 32),
    "maxvit_t": (_maxvit, 64),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    make, side = MODELS[name]
    return bz.perturb(make()), torch.rand(1, 3, side, side)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def heads_of(gs: graph.GroupSet) -> list[graph.ChannelGroup]:
    """The head groups: an ``out`` member of stride > 1 (a head owns head_dim rows of the qkv projection)."""
    return [g for g in gs.prunable() if any(m.role == "out" and m.stride > 1 for m in g.members)]


_FRESH = """
import sys, torch
from autoprune import serialize
x, want = torch.load(sys.argv[1] + ".pt", weights_only=True)
m = serialize.load_module(sys.argv[1])
with torch.no_grad():
    same = torch.equal(m(x), want)
print(same, *sorted({serialize._qualified(n.target) for n in m.graph.nodes
                     if n.op == "call_function" and serialize._qualified(n.target) in serialize._WRAPPED_FUNCTIONS}))
"""


def reload_fresh(small: fx.GraphModule, x: torch.Tensor, path: Path) -> list[str]:
    """Save ``small`` and load it in a process that imports only serialize: ``["True", wrapped functions...]``."""
    pruning.save_pruned(small, path, x)
    torch.save((x, run(small, x)), f"{path}.pt")
    done = subprocess.run([sys.executable, "-c", _FRESH, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


_SWIN = "torchvision.models.swin_transformer"
_DEPTH = "torchvision.ops.stochastic_depth.stochastic_depth"
_PRUNED = "autoprune.graph.attention.pruned_shifted_window_attention"


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_heads_pruned_equal_the_masked_original_and_reload(name: str, tmp_path: Path) -> None:
    """Swin-T: every block at half its heads; Swin-V2-T: all but the last stage (whose calls keep torchvision's
    function, so the saved file has both)."""
    model, x = build(name)
    gs = graph.analyze(model, x)
    heads = heads_of(gs)
    assert len(heads) == 12 and sorted({g.size for g in heads}) == [3, 6, 12, 24]  # every block's heads
    assert cost.closed_form(gs).macs == bz.reference_macs(model, x)
    chosen = [g for g in heads if name == "swin_t" or g.size < 24]
    p = pruning.plan(model, gs, {g.id: g.size // 2 for g in chosen})
    small = pruning.apply(model, gs, p)
    got, want = run(small, x), run(masked_reference(model, gs, p), x)
    assert close(got, want) and not close(got, run(model, x))
    assert cost.closed_form(gs, p.widths).macs == bz.reference_macs(small, x)
    calls = [n for n in small.graph.nodes if n.op == "call_function" and n.target is pruned_shifted_window_attention]
    assert len(calls) == len(chosen) and {n.kwargs["head_dim"] for n in calls} == {32}
    attn = small.get_submodule("features.1.0.attn")
    assert attn.get_parameter("qkv.weight").shape == (3 * 32, 96)  # one of three heads kept
    assert attn.get_parameter("proj.weight").shape == (96, 32)
    kept = [f"{_SWIN}.shifted_window_attention"] if name == "swin_v2_t" else []
    assert reload_fresh(small, x, tmp_path / name) == sorted(
        ["True", _PRUNED, f"{_SWIN}._get_relative_position_bias", f"{_SWIN}._patch_merging_pad", _DEPTH, *kept])


def test_vit_b_16_heads_pruned_equal_the_masked_original_and_reload(tmp_path: Path) -> None:
    """ViT-B/16 (built for 32×32 inputs): half the heads of every encoder block and half of every MLP; the pruned
    model equals the masked original, its MACs are the closed form's, and it reloads without model code."""
    torch.manual_seed(0)
    model, x = bz.perturb(tvm.vit_b_16(image_size=32)), torch.rand(1, 3, 32, 32)
    gs = graph.analyze(model, x)
    heads = [g for g in gs.prunable() if g.id.endswith(":heads")]
    assert len(heads) == 12 and {g.size for g in heads} == {12}
    mlp = [g for g in gs.prunable() if g.id.endswith("mlp.0:out")]
    assert len(mlp) == 12
    p = pruning.plan(model, gs, {g.id: g.size // 2 for g in [*heads, *mlp]})
    small = pruning.apply(model, gs, p)
    got, want = run(small, x), run(masked_reference(model, gs, p), x)
    assert close(got, want) and not close(got, run(model, x))
    assert cost.closed_form(gs, p.widths).macs == bz.reference_macs(small, x)
    assert reload_fresh(small, x, tmp_path / "vit_b_16") == ["True"]


@pytest.mark.parametrize("name", ["efficientnet_b0", "maxvit_t"])
def test_pruned_models_with_stochastic_depth_reload_in_a_fresh_process(name: str, tmp_path: Path) -> None:
    model, x = build(name)
    gs = graph.analyze(model, x)
    small = pruning.apply(model, gs, pruning.plan(model, gs, half_widths(gs)))
    assert reload_fresh(small, x, tmp_path / name) == ["True", _DEPTH]


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("shift", [0, 3])
def test_decoupled_window_attention_is_torchvision_s(v2: bool, shift: int) -> None:
    torch.manual_seed(0)
    cls = tv_swin.ShiftedWindowAttentionV2 if v2 else tv_swin.ShiftedWindowAttention
    attn = bz.perturb(cls(48, [7, 7], [shift, shift], 3))
    x = torch.randn(2, 10, 9, 48)  # padded to 14×14
    with torch.no_grad():
        want = attn(x)
        args = (x, attn.qkv.weight, attn.proj.weight, attn.get_relative_position_bias(), attn.window_size, 3)
        kw = {"shift_size": attn.shift_size, "qkv_bias": attn.qkv.bias, "proj_bias": attn.proj.bias,
              "logit_scale": attn.logit_scale if v2 else None, "training": False}
        assert torch.equal(pruned_shifted_window_attention(*args, **kw), want)
        assert torch.equal(pruned_shifted_window_attention(*args, **kw, head_dim=16), want)
