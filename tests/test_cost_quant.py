"""Closed-form cost of pruned *and quantized* candidates equals the exported artifact (autoprune.cost)."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import torch
from torch import nn

from autoprune import cost, graph, pruning, quantization
from autoprune.errors import ConfigError
from autoprune.types import Candidate, QuantSpec

MODELS = ("resnet20", "resnet20_b", "vgg11_bn", "mobilenetv2", "small_cnn")
WIDTHS = ("full", "half", "random")
BITS = ("uniform8", "uniform4", "mixed", "partial")
FLOAT = 32


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


_ANALYSED: dict[str, tuple[nn.Module, graph.GroupSet, torch.Tensor]] = {}
_PRUNED: dict[tuple[str, str], tuple[dict[str, int], nn.Module]] = {}


def _analysed(name: str) -> tuple[nn.Module, graph.GroupSet, torch.Tensor]:
    if name not in _ANALYSED:
        models = pytest.importorskip("autoprune.models")
        torch.manual_seed(0)
        model = models.build_model(name).eval()
        _randomize_bn(model)
        x = torch.rand(1, 3, 32, 32)
        _ANALYSED[name] = (model, graph.analyze(model, x), x)
    return _ANALYSED[name]


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics, so folding changes the weights (sizes must not depend on values anyway)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _widths(gs: graph.GroupSet, mode: str, seed: int) -> dict[str, int]:
    if mode == "full":
        return {}
    if mode == "half":
        return {g.id: pruning.nearest_legal(g, g.size / 2) for g in gs.prunable()}
    rng = random.Random(seed)
    return {g.id: rng.choice(pruning.legal_widths(g)) for g in gs.prunable()}


def _pruned(name: str, mode: str) -> tuple[dict[str, int], nn.Module]:
    if (name, mode) not in _PRUNED:
        model, gs, _ = _analysed(name)
        widths = _widths(gs, mode, seed=len(name))
        _PRUNED[(name, mode)] = (widths, pruning.apply(model, gs, widths))
    return _PRUNED[(name, mode)]


def _bits(layers: list[str], mode: str, seed: int) -> dict[str, QuantSpec]:
    """Bit maps that respect the default first/last floors of quantization.apply (8 bits or float)."""
    rng = random.Random(seed)
    ends = {layers[0], layers[-1]}
    if mode == "uniform8":
        return {n: QuantSpec(8, 8) for n in layers}
    if mode == "uniform4":
        return {n: QuantSpec(8, 8) if n in ends else QuantSpec(4, 4) for n in layers}
    if mode == "mixed":
        return {n: QuantSpec(8, rng.choice([None, 8])) if n in ends
                else QuantSpec(rng.randint(2, 8), rng.choice([None, 2, 3, 4, 5, 6, 7, 8])) for n in layers}
    # partial: some layers absent, some with float weights (maybe a quantized input), 2/3-bit (asymmetric) ones
    out: dict[str, QuantSpec] = {layers[2]: QuantSpec(2, None)}
    for n in layers:
        choice = rng.randrange(5)
        if n in ends:
            out[n] = QuantSpec(None, 8) if choice < 3 else QuantSpec(8, None)
        elif n in (layers[1], layers[2]):
            continue  # layers[1] stays absent (float)
        elif choice == 0:
            out[n] = QuantSpec(None, rng.randint(2, 8))
        elif choice == 1:
            out[n] = QuantSpec(None, None)
        elif choice == 2:
            out[n] = QuantSpec(rng.randint(2, 3), rng.choice([None, 4]))
        elif choice == 3:
            out[n] = QuantSpec(rng.randint(4, 8), None)
    return out


def _built(module: nn.Module, bits: dict[str, QuantSpec], x: torch.Tensor, **kw: Any) -> nn.Module:
    qm = quantization.apply(module, bits, **kw)
    if any(s.a_bits is not None for s in bits.values()):
        quantization.calibrate(qm, [x], batches=1)
    return qm


def _bitops_oracle(pruned: nn.Module, qm: nn.Module, x: torch.Tensor) -> int:
    """Σ MACs·b_w·b_a counted per conv/linear call on the built model (+ other MACs at 32×32)."""
    per_layer: list[tuple[int, int, int]] = []

    def hook(mod: nn.Module, _args: Any, out: torch.Tensor) -> None:
        macs = out.numel() // out.shape[0] * mod.weight[0].numel()
        per_layer.append((macs, getattr(mod, "w_bits", None) or FLOAT, getattr(mod, "a_bits", None) or FLOAT))

    handles = [m.register_forward_hook(hook) for m in qm.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            qm.eval()(x)
    finally:
        for h in handles:
            h.remove()
    layer_macs = sum(m for m, _, _ in per_layer)
    other = cost.count_macs(pruned, x) - layer_macs
    assert other >= 0
    return sum(m * bw * ba for m, bw, ba in per_layer) + other * FLOAT * FLOAT


@pytest.mark.parametrize("bits_mode", BITS)
@pytest.mark.parametrize("width_mode", WIDTHS)
@pytest.mark.parametrize("name", MODELS)
def test_closed_form_equals_export(name: str, width_mode: str, bits_mode: str) -> None:
    _, gs, x = _analysed(name)
    widths, pruned = _pruned(name, width_mode)
    layers = quantization.quantizable_layers(pruned)
    bits = _bits(layers, bits_mode, seed=len(name) * 7 + len(width_mode))
    # the clip only moves scales, never sizes; the MSE clip search on VGG's large 2/3-bit layers takes seconds
    qm = _built(pruned, bits, x, w_clip="max" if name.startswith("vgg") else "auto")
    art = quantization.export(qm)
    r = cost.closed_form(gs, widths, bits)
    assert (r.bytes, r.payload_bits) == (art.size_bytes, art.payload_bits)
    assert r.bitops == _bitops_oracle(pruned, qm, x)
    assert r.params == cost.count_params(pruned)
    assert r.macs == cost.count_macs(pruned, x)
    assert cost.closed_form(gs, Candidate(widths=widths, bits=bits)) == r


class _Leftovers(nn.Module):
    """BN that cannot fold (after ReLU, after Linear, conv output with two users), a biased conv, a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(12)  # folds into a conv that already has a bias
        self.bn_after_relu = nn.BatchNorm2d(12)  # stays
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)  # conv2 output also feeds the residual add: stays
        self.conv3 = nn.Conv2d(12, 10, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(10)  # folds: the conv gains a bias
        self.fc = nn.Linear(10, 16)
        self.bn_fc = nn.BatchNorm1d(16)  # BN after Linear: stays
        self.head = nn.Linear(16, 5)
        self.register_buffer("gain", torch.full((1,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_after_relu(torch.relu(self.bn1(self.conv1(x))))
        y = self.conv2(x)
        x = torch.relu(self.bn2(y) + y)
        x = torch.relu(self.bn3(self.conv3(x))) * self.gain
        x = x.mean((2, 3))
        return self.head(torch.relu(self.bn_fc(self.fc(x))))


@pytest.mark.parametrize("fold_bn", [True, False])
@pytest.mark.parametrize("asym_below", [4, 3])
def test_leftover_tensors_and_options(fold_bn: bool, asym_below: int) -> None:
    torch.manual_seed(0)
    model = _Leftovers().eval()
    _randomize_bn(model)
    x = torch.rand(1, 3, 8, 8)
    gs = graph.analyze(model, x)
    layers = quantization.quantizable_layers(model)
    assert layers == ["conv1", "conv2", "conv3", "fc", "head"]
    rng = random.Random(3)
    cases = [{}, _widths(gs, "half", 0)] + [_widths(gs, "random", s) for s in range(3)]
    bit_maps = [{"conv1": QuantSpec(8, None), "conv2": QuantSpec(2, 4), "conv3": QuantSpec(3, None),
                 "fc": QuantSpec(None, 5), "head": QuantSpec(8, 8)},
                {"conv2": QuantSpec(rng.randint(2, 8), None), "conv3": QuantSpec(2, 2)}]
    for widths in cases:
        pruned = pruning.apply(model, gs, widths)
        for bits in bit_maps:
            qm = _built(pruned, bits, x, fold_bn=fold_bn, asym_below=asym_below)
            art = quantization.export(qm)
            r = cost.closed_form(gs, widths, bits, fold_bn=fold_bn, asym_below=asym_below)
            assert (r.bytes, r.payload_bits) == (art.size_bytes, art.payload_bits), (widths, bits)
            assert r.bitops == _bitops_oracle(pruned, qm, x)
    if fold_bn:  # the unfoldable BNs (and num_batches_tracked) are stored; bn1 and bn3 are not
        stored = quantization.export(_built(model, bit_maps[1], x)).tensors
        assert {"bn_after_relu.num_batches_tracked", "bn2.running_var", "bn_fc.weight", "gain"} <= set(stored)
        assert not any(k.startswith(("bn1.", "bn3.")) for k in stored) and "conv3.bias" in stored


def test_float_path_is_unchanged_and_all_float_bits_price_the_folded_model() -> None:
    _, gs, _ = _analysed("resnet20")
    widths, pruned = _pruned("resnet20", "half")
    r = cost.closed_form(gs, widths)
    assert r.bytes == 4 * r.params and r.payload_bits == FLOAT * r.params and r.bitops == FLOAT**2 * r.macs
    assert cost.closed_form(gs, widths, {}) == r
    layers = quantization.quantizable_layers(pruned)
    all_float = {n: QuantSpec(None, None) for n in layers}
    art = quantization.export(quantization.apply(pruned, all_float))
    q = cost.closed_form(gs, widths, all_float)
    assert (q.bytes, q.payload_bits) == (art.size_bytes, art.payload_bits)
    assert q.bytes < r.bytes  # folded BN parameters and statistics are gone
    assert (q.macs, q.params, q.bitops) == (r.macs, r.params, r.bitops)


def test_bits_values_and_errors() -> None:
    _, gs, _ = _analysed("small_cnn")
    layers = quantization.quantizable_layers(gs.graph_module)
    spec = {n: QuantSpec(8, None) for n in layers}
    assert cost.closed_form(gs, None, {n: 8 for n in layers}) == cost.closed_form(gs, None, spec)
    assert cost.closed_form(gs, None, {n: (8, 6) for n in layers}) == cost.closed_form(
        gs, None, {n: QuantSpec(8, 6) for n in layers})
    with pytest.raises(ConfigError, match=r"did you mean 'block1\.0'"):
        cost.closed_form(gs, None, {"block1.00": QuantSpec(8, 8)})
    with pytest.raises(ConfigError, match="not a conv/linear layer"):
        cost.closed_form(gs, None, {"block1.1": QuantSpec(8, 8)})  # a BatchNorm
    with pytest.raises(ConfigError, match=r"2\.\.8"):
        cost.closed_form(gs, None, {layers[1]: 9})
    with pytest.raises(ConfigError, match="must be a QuantSpec"):
        cost.closed_form(gs, None, {layers[1]: "eight"})


def test_lower_bits_never_cost_more() -> None:
    _, gs, _ = _analysed("resnet20_b")
    layers = quantization.quantizable_layers(gs.graph_module)
    widths = _widths(gs, "random", 11)
    prev = None
    for b in range(8, 1, -1):
        r = cost.closed_form(gs, widths, {n: QuantSpec(b, b) for n in layers})
        if prev is not None:
            # 3 bits adds a uint8 zero point per channel (asymmetric grid) but still saves more than it costs
            assert r.payload_bits < prev.payload_bits and r.bitops < prev.bitops and r.bytes < prev.bytes
        prev = r


def test_quantized_pricing_is_fast() -> None:
    _, gs, _ = _analysed("resnet20")
    layers = quantization.quantizable_layers(gs.graph_module)
    ws = [_widths(gs, "random", s) for s in range(100)]
    bs = [_bits(layers, "mixed", s) for s in range(100)]
    cost.closed_form(gs, ws[0], bs[0])  # builds the per-GroupSet coefficients once
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for w, b in zip(ws, bs, strict=True):
            cost.closed_form(gs, w, b)
        best = min(best, (time.perf_counter() - t) / len(ws))
    assert best < 1e-3, f"{best * 1e6:.0f} µs per call"


class _SharedAndMatmul(nn.Module):
    """A conv called twice and MACs outside conv/linear modules (matmul): every call and every MAC is priced."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c2(torch.relu(self.c1(x))))))
        t = self.fc(x.flatten(2).transpose(1, 2))  # (N, HW, 8)
        return self.head((torch.matmul(t, t.transpose(1, 2)) @ t).mean(1))


def test_shared_modules_and_matmul_macs_count_every_call() -> None:
    """The closed form equals counts taken from the built quantized model (MACs by FlopCounterMode, BitOps per
    conv/linear call, bytes and payload bits from the exported tensors) — also where a layer runs twice."""
    torch.manual_seed(0)
    model = _SharedAndMatmul().eval()
    x = torch.rand(1, 3, 8, 8)
    gs = graph.analyze(model, x)
    layers = quantization.quantizable_layers(model)
    assert layers == ["c1", "c2", "fc", "head"]
    bits = {"c1": QuantSpec(8, None), "c2": QuantSpec(3, 4), "fc": QuantSpec(5, 8), "head": QuantSpec(8, 8)}
    qm = _built(model, bits, x)
    art = quantization.export(qm)
    r = cost.closed_form(gs, None, bits)
    assert r.macs == cost.count_macs(model, x)
    assert r.bitops == _bitops_oracle(model, qm, x)
    assert (r.bytes, r.payload_bits) == (art.size_bytes, art.payload_bits)
    assert r.payload_bits == sum(m.weight.numel() * m.w_bits for m in qm.modules() if hasattr(m, "w_bits"))
