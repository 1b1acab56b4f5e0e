"""Fake quantization, BN folding, packing, exact sizes, floors, legalizer, export/load (ENGINE.md §5, §9 case 24)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autoprune import cost, graph, serialize
from autoprune import quantization as Q
from autoprune._imports import is_available
from autoprune.errors import AutoPruneError, CheckpointError, ConfigError
from autoprune.types import CostReport, QuantSpec


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.2
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.2
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    return model


class Net(nn.Module):
    """Normalize-like start, conv-BN-ReLU, residual, conv without BN, Conv1d-BN1d branch, flatten → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn_after_add = nn.BatchNorm2d(8)  # follows an add: must not be folded
        self.conv1d = nn.Conv1d(8, 4, 1, bias=False)
        self.bn1d = nn.BatchNorm1d(4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * 16 + 8 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.25
        y = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(y)) + y)
        z = self.bn_after_add(self.conv2(y) + 1.0)
        seq = self.bn1d(self.conv1d(z.flatten(2)))  # (N, 4, 16)
        return self.fc(torch.cat([seq.flatten(1), self.pool(F.relu(z)).flatten(1)], 1))


LAYERS = ["stem", "conv1", "conv2", "conv1d", "fc"]


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(Net()).eval()


def _loader(n: int = 3, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.rand(batch, 3, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def _priced(model: nn.Module, bits: dict[str, QuantSpec], x: torch.Tensor | None = None, **kw: Any) -> CostReport:
    """The closed-form cost model (autoprune.cost) of ``model`` quantized with ``bits`` (widths unchanged)."""
    return cost.closed_form(graph.analyze(model, torch.rand(1, 3, 8, 8) if x is None else x), None, bits, **kw)


def _mixed_bits() -> dict[str, QuantSpec]:
    return {"stem": QuantSpec(8, None), "conv1": QuantSpec(4, 8), "conv2": QuantSpec(2, 6),
            "conv1d": QuantSpec(3, 4), "fc": QuantSpec(8, 8)}


# --------------------------------------------------------------------------- quantizer primitives


def test_fp16_ceil_rounds_up_to_fp16() -> None:
    x = torch.rand(1000) * 10 + 1e-7
    s = Q.fp16_ceil(x)
    assert torch.all(s >= x.clamp(min=Q.FP16_TINY)) and torch.equal(s, s.half().float())
    assert torch.all(s <= x * (1 + 2**-10) + 2**-24)


@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_weight_error_bound_and_monotone(scheme: str) -> None:
    w = torch.randn(16, 8, 3, 3)
    errors = []
    for bits in range(2, 9):
        scale, zp = Q.weight_qparams(w, bits, scheme=scheme, clip="max")
        assert scale.shape == (16,) and zp.shape == (16,) and zp.dtype == torch.int32
        w_hat = Q.fake_quant_weight(w, bits, scale, zp, scheme)
        bound = scale.reshape(-1, 1, 1, 1) / 2 * (1 + 1e-5)
        assert torch.all((w - w_hat).abs() <= bound), bits  # max clip: every weight is inside the range
        errors.append(float(((w - w_hat) ** 2).mean()))
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-4 * float((w**2).mean())  # 8 bits ≈ fp32


def test_default_scheme_error_monotone_across_switch() -> None:
    w = torch.randn(32, 16)
    errs = []
    for bits in range(2, 9):
        scheme = Q.weight_scheme(bits)
        s, z = Q.weight_qparams(w, bits, scheme=scheme, clip="mse" if scheme == "asym" else "max")
        errs.append(float(((Q.fake_quant_weight(w, bits, s, z, scheme) - w) ** 2).mean()))
    assert all(a > b for a, b in itertools.pairwise(errs))


def test_mse_clip_never_worse_than_max() -> None:
    w = torch.randn(8, 64) * torch.linspace(0.1, 2, 8).unsqueeze(1)
    for bits, scheme in ((2, "asym"), (3, "asym"), (4, "sym")):
        per = {}
        for clip in ("max", "mse"):
            s, z = Q.weight_qparams(w, bits, scheme=scheme, clip=clip)
            per[clip] = ((Q.fake_quant_weight(w, bits, s, z, scheme) - w) ** 2).sum(1)
        assert torch.all(per["mse"] <= per["max"] + 1e-6) and per["mse"].sum() < per["max"].sum()


def test_two_bit_levels() -> None:
    w = torch.randn(4, 256)
    s, z = Q.weight_qparams(w, 2, scheme="sym")
    sym = Q.fake_quant_weight(w, 2, s, z, "sym")
    assert max(len(torch.unique(row)) for row in sym) == 3  # restricted symmetric: {-s, 0, s}
    s, z = Q.weight_qparams(w, 2, scheme="asym")
    asym = Q.fake_quant_weight(w, 2, s, z, "asym")
    assert all(len(torch.unique(row)) == 4 for row in asym)
    assert Q.weight_scheme(2) == "asym" and Q.weight_scheme(3) == "asym" and Q.weight_scheme(4) == "sym"
    assert Q.weight_scheme(4, asym_below=5) == "asym"


def test_sym_four_bit_at_most_15_levels_and_zero_exact() -> None:
    w = torch.randn(8, 500)
    w[:, 0] = 0.0
    s, z = Q.weight_qparams(w, 4)
    w_hat = Q.fake_quant_weight(w, 4, s, z)
    assert max(len(torch.unique(r)) for r in w_hat) <= 15 and torch.all(w_hat[:, 0] == 0)


def test_ste_gradients() -> None:
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    scale, zp = Q.activation_qparams(-1.0, 2.0, 4)
    y = Q.fake_quant_activation(x, torch.tensor(scale), torch.tensor(zp), 4)
    y.sum().backward()
    q = torch.round(x.detach() / scale) + zp  # the clipping test is on the rounded code
    inside = (q >= 0) & (q <= 15)
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[~inside] == 0)
    assert inside.any() and (~inside).any()
    w = torch.randn(4, 10, requires_grad=True)
    s, z = Q.weight_qparams(w, 3, scheme="asym")
    Q.fake_quant_weight(w, 3, s, z, "asym").sum().backward()
    assert torch.all(w.grad == 1)  # max clip: all inside, gradient passes straight through


def test_activation_unsigned_zero_point() -> None:
    assert Q.activation_qparams(0.0, 6.0, 8)[1] == 0
    assert Q.activation_qparams(-1.0, 6.0, 8, unsigned=True)[1] == 0
    scale, zp = Q.activation_qparams(-1.0, 3.0, 8)
    assert 0 < zp < 255 and scale == float(torch.tensor(scale).half())


# --------------------------------------------------------------------------- packing


def test_pack_known_value() -> None:
    payload = Q.pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 2)
    assert payload.tolist() == [0b00111001]
    assert Q.pack_bits(torch.tensor([5, 7, 1], dtype=torch.uint8), 3).tolist() == [0b01_111_101, 0]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), data=st.data())
def test_pack_unpack_round_trip(bits: int, data: st.DataObject) -> None:
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=0, max_size=300))
    t = torch.tensor(codes, dtype=torch.uint8)
    payload = Q.pack_bits(t, bits)
    assert payload.dtype == torch.uint8 and payload.numel() == math.ceil(len(codes) * bits / 8)
    assert torch.equal(Q.unpack_bits(payload, bits, len(codes)), t)


def test_pack_rejects_out_of_range() -> None:
    with pytest.raises(ConfigError):
        Q.pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ConfigError):
        Q.unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 2)


# --------------------------------------------------------------------------- BN folding and apply


def test_bn_folding_exact(net: nn.Module) -> None:
    folded = Q.fold_batchnorm(net)
    kinds = {type(m) for m in folded.modules()}
    names = dict(folded.named_modules())
    assert "bn0" not in names and "bn1" not in names and "bn1d" not in names
    assert "bn_after_add" in names and nn.BatchNorm2d in kinds
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert (folded(x) - net(x)).abs().max() <= 1e-5
    assert names["stem"].bias is not None and net.stem.bias is None  # original untouched


def test_apply_replaces_layers_and_keeps_original(net: nn.Module) -> None:
    before = {k: v.clone() for k, v in net.state_dict().items()}
    qm = Q.apply(net, _mixed_bits())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(qm.get_submodule("conv1"), Q.QConv2d) and isinstance(qm.get_submodule("fc"), Q.QLinear)
    assert isinstance(qm.get_submodule("conv1d"), Q.QConv1d)
    assert qm.get_submodule("conv2").w_scheme == "asym" and qm.get_submodule("conv1").w_scheme == "sym"
    assert qm.get_submodule("conv1").a_unsigned  # input is relu(bn0(stem(x)))
    assert qm.get_submodule("fc").a_unsigned is False  # cat of a BN output and a pooled ReLU: signed
    assert Q.quantizable_layers(net) == LAYERS
    scale, zp = qm.get_submodule("conv1").weight_qparams()
    assert scale.shape == (8,) and zp.shape == (8,)


def test_unknown_layer_and_bad_values(net: nn.Module) -> None:
    with pytest.raises(ConfigError, match="did you mean 'conv1'"):
        Q.apply(net, {"conv_1": QuantSpec(4, 8)})
    with pytest.raises(ConfigError, match="not a quantizable"):
        Q.apply(net, {"bn1": QuantSpec(4, 8)})
    with pytest.raises(ConfigError, match=r"2\.\.8"):
        Q.apply(net, {"conv1": (9, 8)})


def test_floors_enforced(net: nn.Module) -> None:
    with pytest.raises(ConfigError, match=r"first layer 'stem'.*floor of 8"):
        Q.apply(net, {"stem": QuantSpec(4, None)})
    with pytest.raises(ConfigError, match=r"last layer 'fc'.*floor of 8"):
        Q.apply(net, {"fc": QuantSpec(8, 6)})
    Q.apply(net, {"stem": QuantSpec(4, None), "fc": QuantSpec(6, 6)}, first_last_min_bits=4)
    raised = Q.enforce_floors({"stem": QuantSpec(4, None), "conv1": QuantSpec(2, 2), "fc": QuantSpec(3, 5)}, net)
    assert raised == {"stem": QuantSpec(8, None), "conv1": QuantSpec(2, 2), "fc": QuantSpec(8, 8)}
    floors = Q.default_floors(net)
    assert floors["stem"] == QuantSpec(8, 8) and floors["conv1"] == QuantSpec(2, 2)


def test_uncalibrated_input_quantizer_raises(net: nn.Module) -> None:
    qm = Q.apply(net, _mixed_bits())
    with pytest.raises(AutoPruneError, match="calibrate"):
        qm(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_calibration_methods(net: nn.Module, method: str) -> None:
    qm = Q.apply(net, _mixed_bits())
    ranges = Q.calibrate(qm, _loader(), batches=2, method=method)
    assert set(ranges) == {"conv1", "conv2", "conv1d", "fc"}
    assert all(s > 0 for s, _ in ranges.values())
    assert ranges["conv1"][1] == 0  # unsigned input
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        rel = (qm(x) - net(x)).norm() / net(x).norm()
    assert rel < 0.5
    if method == "minmax":
        minmax = ranges
    else:
        qm2 = Q.apply(net, _mixed_bits())
        minmax = Q.calibrate(qm2, _loader(), batches=2)
        assert all(ranges[k][0] <= minmax[k][0] + 1e-9 for k in ranges)  # clipped ranges are never wider
    with pytest.raises(ConfigError, match="calibration method"):
        Q.calibrate(qm, _loader(), method="kl")


def test_eight_bit_close_to_float(net: nn.Module) -> None:
    qm = Q.apply(net, {n: QuantSpec(8, 8 if n != "stem" else None) for n in LAYERS})
    Q.calibrate(qm, _loader(), batches=3)
    x = _loader()[0][0]
    with torch.no_grad():
        ref, out = net(x), qm(x)
    assert (out - ref).norm() / ref.norm() < 0.02


def test_error_decreases_with_bits(net: nn.Module) -> None:
    x = _loader()[0][0]
    errs = []
    for b in (2, 4, 6, 8):
        bits = {n: QuantSpec(b, None) for n in LAYERS[1:-1]}
        qm = Q.apply(net, bits)
        with torch.no_grad():
            errs.append(float((qm(x) - net(x)).norm()))
    assert all(a > b for a, b in itertools.pairwise(errs))


def test_quantization_aware_finetuning(net: nn.Module) -> None:
    qm = Q.apply(net, _mixed_bits())
    Q.calibrate(qm, _loader(), batches=2)
    qm.train()
    conv = qm.get_submodule("conv2")
    scale_before = conv.weight_qparams()[0].clone()
    opt = torch.optim.SGD(qm.parameters(), lr=0.5)
    x, y = _loader()[0]
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(qm(x), y)
        loss.backward()
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert not torch.equal(conv.weight_qparams()[0], scale_before)  # scales follow the weights
    assert losses[-1] < losses[0]


def test_weight_qparams_cache_follows_weight_changes(net: nn.Module) -> None:
    qm = Q.apply(net, {"conv2": QuantSpec(2, None)})
    conv = qm.get_submodule("conv2")
    s1, _ = conv.weight_qparams()
    assert conv.weight_qparams()[0] is s1  # unchanged weight: cached
    with torch.no_grad():
        conv.weight.mul_(2.0)  # in-place edit bumps the version counter
    s2, _ = conv.weight_qparams()
    assert torch.allclose(s2, Q.weight_qparams(conv.weight, 2, scheme="asym", clip="mse")[0])
    assert not torch.equal(s1, s2)
    conv.load_state_dict({**conv.state_dict(), "weight": conv.weight.detach() / 2})
    assert torch.equal(conv.weight_qparams()[0], s1)
    with torch.inference_mode():
        conv.weight.data = torch.randn_like(conv.weight)  # new storage (cache keyed by data pointer)
        s3, _ = conv.weight_qparams()
    assert not s3.is_inference()  # usable later for training
    assert torch.allclose(s3, Q.weight_qparams(conv.weight, 2, scheme="asym", clip="mse")[0])


# --------------------------------------------------------------------------- export, sizes, load


def _independent_size(qm: nn.Module) -> int:
    """Σ⌈n·b/8⌉ + 2·C_out (+ C_out zero points) + float extras, computed without the exporter."""
    folded = Q.fold_batchnorm(qm)
    total = 0
    for name, t in folded.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        m = folded.get_submodule(owner) if owner else folded
        if isinstance(m, Q._QuantLayer):
            if leaf in ("a_scale", "a_zero_point"):
                continue
            if leaf == "weight" and m.w_bits is not None:
                c_out = t.shape[0]
                total += math.ceil(t.numel() * m.w_bits / 8) + 2 * c_out + (c_out if m.w_scheme == "asym" else 0)
                continue
        total += t.nbytes
    return total


def test_size_accounting_matches_stored_bytes(net: nn.Module, tmp_path: Path) -> None:
    bits = _mixed_bits()
    qm = Q.apply(net, bits)
    Q.calibrate(qm, _loader(), batches=1)
    art = Q.export(qm)
    assert art.size_bytes == sum(t.nbytes for t in art.tensors.values()) == _independent_size(qm)
    n = {k: v.numel() for k, v in Q.fold_batchnorm(net).state_dict().items()}
    assert art.payload_bits == sum(n[f"{k}.weight"] * s.w_bits for k, s in bits.items()) == _independent_payload(qm)
    r = _priced(net, bits)
    assert (r.bytes, r.payload_bits) == (art.size_bytes, art.payload_bits)
    bd = art.breakdown()
    assert bd["payload"] == sum(math.ceil(n[f"{k}.weight"] * s.w_bits / 8) for k, s in bits.items())
    assert bd["zero_points"] == 8 + 4  # conv2 (2 bit) and conv1d (3 bit) are asymmetric
    assert sum(bd.values()) == art.size_bytes
    Q.save_quantized(qm, tmp_path, torch.rand(1, 3, 8, 8))
    stored = torch.load(tmp_path / serialize.WEIGHTS_FILE, weights_only=True)
    assert sum(t.nbytes for t in stored.values()) == art.size_bytes
    assert stored["conv2.weight_codes"].dtype == torch.uint8 and stored["conv2.w_scale"].dtype == torch.float16
    assert "conv2.weight" not in stored and "conv2.a_scale" not in stored
    doc = serialize.read_metadata(tmp_path)
    assert doc["quant"]["activations"]["conv1"]["zero_point"] == 0 and doc["quant"]["size_bytes"] == art.size_bytes


def _independent_payload(qm: nn.Module) -> int:
    """Σ b·n over the conv/linear weights of the built model (32 bits for float ones), counted from its tensors."""
    return sum(m.weight.numel() * (getattr(m, "w_bits", None) or 32)
               for m in qm.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear))


def test_closed_form_size_many_assignments(net: nn.Module) -> None:
    groups = graph.analyze(net, torch.rand(1, 3, 8, 8))
    all_float = {n: QuantSpec(None, None) for n in LAYERS}  # an empty map would price the unfolded float model
    assert cost.closed_form(groups, None, all_float).bytes == sum(
        t.nbytes for t in Q.fold_batchnorm(net).state_dict().values())
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        bits = {n: QuantSpec(int(torch.randint(2, 9, (1,), generator=g)), 8) for n in LAYERS[1:-1]}
        qm = Q.apply(net, bits)
        Q.calibrate(qm, _loader(1), batches=1)
        r = cost.closed_form(groups, None, bits)
        assert Q.export(qm).size_bytes == r.bytes == _independent_size(qm)
        assert Q.export(qm).payload_bits == r.payload_bits == _independent_payload(qm)
    qm = Q.apply(net, {"conv1": QuantSpec(4, None)}, fold_bn=False)
    assert Q.export(qm).size_bytes == cost.closed_form(groups, None, {"conv1": QuantSpec(4, None)}, fold_bn=False).bytes


def test_export_load_identical(net: nn.Module, tmp_path: Path) -> None:
    qm = Q.apply(net, _mixed_bits())
    Q.calibrate(qm, _loader(), batches=2)
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        ref = qm(x)
        assert (Q.load(Q.export(qm))(x) - ref).abs().max() <= 1e-6
        Q.save_quantized(qm, tmp_path, x, metadata={"note": "mixed"})
        loaded = Q.load_quantized(tmp_path)
        assert (loaded(x) - ref).abs().max() <= 1e-6
        assert torch.equal(serialize.load_module(tmp_path)(x), loaded(x))  # load_module delegates
    assert loaded.get_submodule("conv2").frozen
    # re-exporting a loaded artifact is lossless
    again, first = Q.export(loaded), Q.export(qm)
    assert again.size_bytes == first.size_bytes and set(again.tensors) == set(first.tensors)
    assert all(torch.equal(again.tensors[k], first.tensors[k]) for k in first.tensors)


def test_quantized_deployment_export_pt2(net: nn.Module, tmp_path: Path) -> None:
    qm = Q.apply(net, _mixed_bits())
    Q.calibrate(qm, _loader(1), batches=1)
    x = torch.rand(2, 3, 8, 8)
    Q.save_quantized(qm, tmp_path / "q", x)
    loaded = Q.load_quantized(tmp_path / "q")
    for model, name in ((qm, "live"), (loaded, "frozen")):
        paths = serialize.export_deployment(model, x, tmp_path / name)
        program = torch.export.load(str(paths["pt2"])).module()
        for batch in (1, 2, 7):  # any batch, whatever the example's
            xb = torch.rand(batch, 3, 8, 8)
            with torch.no_grad():
                assert torch.equal(program(xb), model(xb))


def test_quantized_file_tamper_rejected(net: nn.Module, tmp_path: Path) -> None:
    qm = Q.apply(net, {"conv1": QuantSpec(4, None)})
    Q.save_quantized(qm, tmp_path, torch.rand(1, 3, 8, 8))
    blob = bytearray((tmp_path / serialize.WEIGHTS_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / serialize.WEIGHTS_FILE).write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="SHA-256"):
        Q.load_quantized(tmp_path)


def test_export_requires_calibration(net: nn.Module) -> None:
    qm = Q.apply(net, {"conv1": QuantSpec(4, 8)})
    with pytest.raises(AutoPruneError, match="not calibrated"):
        Q.export(qm)


def test_dequantize_matches_fake_quant_weights(net: nn.Module) -> None:
    qm = Q.apply(net, {"conv1": QuantSpec(3, None), "conv2": QuantSpec(5, None)})
    deq = Q.dequantize(qm)
    assert type(deq.get_submodule("conv1")) is nn.Conv2d
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert (deq(x) - qm(x)).abs().max() <= 1e-6


# --------------------------------------------------------------------------- legalizer and cost


def test_legalize_meets_budget_from_the_back(net: nn.Module) -> None:
    bits = {n: QuantSpec(8, 8) for n in LAYERS}
    floors = Q.default_floors(net)
    groups = graph.analyze(net, torch.rand(1, 3, 8, 8))

    def size_fn(b: dict[str, QuantSpec]) -> int:
        return cost.closed_form(groups, None, b).bytes

    budget = size_fn(bits) - 300

    out, ok = Q.legalize_bits(bits, size_fn, budget, floors, kinds=("w",))
    assert ok and size_fn(out) <= budget
    assert out["stem"] == QuantSpec(8, 8) and out["fc"] == QuantSpec(8, 8)  # floors kept
    assert out["conv1d"].w_bits < 8  # the last non-floored layer is lowered first
    assert bits["conv1"] == QuantSpec(8, 8)  # input not modified


def test_legalize_reports_infeasible(net: nn.Module) -> None:
    bits = {n: QuantSpec(8, 8) for n in LAYERS}
    floors = Q.default_floors(net)
    groups = graph.analyze(net, torch.rand(1, 3, 8, 8))
    out, ok = Q.legalize_bits(bits, lambda b: cost.closed_form(groups, None, b).bytes, 10, floors)
    assert not ok
    assert out["conv1"] == QuantSpec(2, 2) and out["stem"] == QuantSpec(8, 8)


def test_legalize_lowers_activations_before_weights() -> None:
    calls: list[dict[str, QuantSpec]] = []

    def cost(b: dict[str, QuantSpec]) -> int:
        calls.append(dict(b))
        return sum((s.w_bits or 0) + (s.a_bits or 0) for s in b.values())

    bits = {"a": QuantSpec(8, 8), "b": QuantSpec(8, 8)}
    out, ok = Q.legalize_bits(bits, cost, 31)
    assert ok and out == {"a": QuantSpec(8, 8), "b": QuantSpec(8, 7)}
    out, ok = Q.legalize_bits(bits, cost, 29)
    # sweep 1: b.a, b.w, a.a (each one step, re-checking the budget after every step)
    assert ok and out == {"a": QuantSpec(8, 7), "b": QuantSpec(7, 7)}
    out, ok = Q.legalize_bits({"a": QuantSpec(3, None)}, cost, 1)
    assert not ok and out == {"a": QuantSpec(2, None)}


def test_legalize_with_choices_steps_through_the_allowed_bits() -> None:
    def cost(b: dict[str, QuantSpec]) -> int:
        return sum(s.w_bits or 32 for s in b.values())

    bits = {"a": QuantSpec(8, None), "b": QuantSpec(None, None), "c": QuantSpec(8, 8)}
    choices = {"a": (4, 8), "b": (2, 6)}  # c has none: it steps by one bit
    # sweep 1, last layer first: c 8 → 7 (47), b float → 6, its highest choice (21)
    out, ok = Q.legalize_bits(bits, cost, 21, kinds=("w",), choices=choices)
    assert ok and out == {"a": QuantSpec(8, None), "b": QuantSpec(6, None), "c": QuantSpec(7, 8)}
    out, ok = Q.legalize_bits(bits, cost, 1, kinds=("w",), choices=choices)
    assert not ok and out == {"a": QuantSpec(4, None), "b": QuantSpec(2, None), "c": QuantSpec(2, 8)}
    out, ok = Q.legalize_bits(bits, cost, 1, kinds=("w",))  # without choices a float layer is never touched
    assert not ok and out["b"] == QuantSpec(None, None)


def test_closed_form_bitops_macs_and_bytes_match_the_built_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    x = torch.rand(2, 3, 8, 8)
    bits = {"0": QuantSpec(8, None), "3": QuantSpec(8, 4)}
    report = _priced(model, bits, x[:1])
    conv_macs, fc_macs = 8 * 8 * 3 * 9 * 4, 4 * 64 * 5
    assert report.macs == conv_macs + fc_macs
    assert report.bitops == conv_macs * 8 * 32 + fc_macs * 8 * 4
    assert report.params == sum(p.numel() for p in model.parameters())
    qm = Q.apply(model, bits, first_last_min_bits=4)  # the closed form prices any map; apply checks floors
    Q.calibrate(qm, [x], batches=1)
    art = Q.export(qm)
    assert (report.bytes, report.payload_bits) == (art.size_bytes, art.payload_bits)
    assert (report.bytes, report.payload_bits) == (_independent_size(qm), _independent_payload(qm))


# --------------------------------------------------------------------------- pruned + quantized, zoo, int8


def _pruned(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    if is_available("autoprune.pruning") and is_available("autoprune.graph"):
        from autoprune import graph, pruning

        groups = graph.analyze(model, x)
        widths = {g.id: max(1, g.size // 2) for g in groups.prunable()}
        if widths:
            return pruning.apply(model, groups, widths)
    gm = fx.symbolic_trace(model)  # fallback: slice conv1's outputs and bn1 by hand (the engine's job)
    keep = torch.arange(0, 8, 2)
    conv, bn, nxt = gm.get_submodule("conv1"), gm.get_submodule("bn1"), gm.get_submodule("conv2")
    with torch.no_grad():
        new = nn.Conv2d(8, 4, 3, padding=1)
        new.weight.copy_(conv.weight[keep]), new.bias.copy_(conv.bias[keep])
        nbn = nn.BatchNorm2d(4).eval()
        for k in ("weight", "bias", "running_mean", "running_var"):
            getattr(nbn, k).copy_(getattr(bn, k)[keep])
        nconv = nn.Conv2d(4, 8, 3, padding=1)
        nconv.weight.copy_(nxt.weight[:, keep]), nconv.bias.copy_(nxt.bias)
    gm.conv1, gm.bn1, gm.conv2 = new, nbn, nconv
    gm.recompile()
    return gm


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv0(x))
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def test_pruned_then_quantized(tmp_path: Path) -> None:
    model = _randomize_bn(Plain()).eval()
    x = torch.rand(2, 3, 8, 8)
    small = _pruned(model, x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    layers = Q.quantizable_layers(small)
    bits = {n: QuantSpec(8 if n in (layers[0], layers[-1]) else 3, 8 if n != layers[0] else None) for n in layers}
    qm = Q.apply(small, bits)
    Q.calibrate(qm, _loader(2), batches=2)
    with torch.no_grad():
        out = qm(x)
        assert out.shape == (2, 10)
        Q.save_quantized(qm, tmp_path, x)
        assert (Q.load_quantized(tmp_path)(x) - out).abs().max() <= 1e-6
    assert Q.export(qm).size_bytes == _priced(small, bits, x[:1]).bytes == _independent_size(qm)


def test_zoo_resnet20_quantizes_and_sizes_match() -> None:
    if not is_available("autoprune.models"):
        pytest.skip("model zoo not available yet")
    from autoprune import models

    model = _randomize_bn(models.build_model("resnet20")).eval()
    layers = Q.quantizable_layers(model)
    assert len(layers) == 20 and layers[0] == "conv1" and layers[-1] == "linear"
    bits = Q.enforce_floors({n: QuantSpec(4, 8) for n in layers}, model)
    qm = Q.apply(model, bits)
    x = torch.rand(4, 3, 32, 32)
    Q.calibrate(qm, [x], batches=1)
    art = Q.export(qm)
    assert art.size_bytes == _priced(model, bits, x[:1]).bytes == _independent_size(qm)
    float_bytes = sum(p.nbytes for p in model.parameters())
    assert 6 < float_bytes / art.size_bytes < 8  # 4-bit weights + scales
    with torch.no_grad():
        assert (Q.load(art)(x) - qm(x)).abs().max() <= 1e-6


@pytest.mark.skipif(not is_available("torch.ao.quantization.quantize_fx"), reason="torch.ao FX quantization missing")
def test_int8_ao_fx_agrees_with_reference() -> None:
    model = _randomize_bn(Plain()).eval()
    loader = _loader(4)
    try:
        int8 = Q.to_int8(model, loader, batches=4)
    except AutoPruneError as exc:
        pytest.skip(f"ao_fx backend unusable here: {exc}")
    x = loader[0][0]
    with torch.no_grad():
        ref = model(x)
        out = int8(x)
    assert (out - ref).norm() / ref.norm() < 0.05
    qm = Q.apply(model, {n: QuantSpec(8, None) for n in Q.quantizable_layers(model)})
    int8_q = Q.to_int8(qm, loader, batches=4)  # fake-quant model goes through dequantize()
    with torch.no_grad():
        assert (int8_q(x) - qm(x)).norm() / qm(x).norm() < 0.05
    with pytest.raises(ConfigError, match="backend"):
        Q.to_int8(model, loader, backend="tensorrt")
