"""Closed-form cost model (autoprune.cost): coefficients, bits accounting, oracles, expected widths, speed."""

from __future__ import annotations

import time

import pytest
import torch
from engine_cases import CASES, SDPABlock, TiedLM
from torch import nn

from autoprune import cost, graph, pruning
from autoprune.errors import ConfigError
from autoprune.types import Candidate, QuantSpec


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _tiny() -> tuple[nn.Module, graph.GroupSet]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    return model, graph.analyze(model, torch.randn(1, 3, 4, 4))


def test_float_report_fields() -> None:
    _, gs = _tiny()
    r = cost.closed_form(gs)
    assert (r.macs, r.params) == (16 * (216 + 32), 216 + 8 + 32 + 4)
    assert r.bytes == 4 * r.params and r.bitops == 1024 * r.macs and r.payload_bits == 32 * r.params
    assert r.flops == 2 * r.macs


def test_bits_accounting_by_hand() -> None:
    _, gs = _tiny()
    bits = {"0": QuantSpec(w_bits=4, a_bits=8)}
    r = cost.closed_form(gs, {"0:out": 5}, bits)
    # layer 0: 5·27 = 135 weights at 4 bits -> ceil(67.5) = 68 bytes + 2·5 fp16 scales + 4·5 bias bytes;
    # layer 2: 4·5 weights + 4 biases in fp32
    assert r.bytes == 68 + 10 + 20 + 4 * 24
    # payload bits count conv/linear weights only (HAQ's metric): the float weights of layer 2 at 32 bits
    assert r.payload_bits == 4 * 135 + 32 * 20
    assert r.macs == 16 * 135 + 16 * 20
    assert r.bitops == 16 * 135 * 4 * 8 + 16 * 20 * 32 * 32
    same = cost.closed_form(gs, Candidate(widths={"0:out": 5}, bits=bits))
    assert same == r
    with pytest.raises(ConfigError, match="not a conv/linear layer"):
        cost.closed_form(gs, None, {"1": QuantSpec(8, 8)})


def test_width_errors() -> None:
    c = CASES["resnet_pad_a"]()
    gs = graph.analyze(c.model, c.x)
    with pytest.raises(ConfigError, match="did you mean"):
        cost.closed_form(gs, {"conv1:ou": 3})
    with pytest.raises(ConfigError, match="frozen"):
        cost.closed_form(gs, {"linear:out": 3})
    with pytest.raises(ConfigError, match="outside"):
        cost.closed_form(gs, {"layer1.0.conv1:out": 0})
    assert cost.closed_form(gs, {"linear:out": 10}) == cost.closed_form(gs)


def _legal_random(gs: graph.GroupSet, g: torch.Generator) -> dict[str, int]:
    out = {}
    for grp in gs.prunable():
        legal = pruning.legal_widths(grp)
        out[grp.id] = legal[int(torch.randint(0, len(legal), (1,), generator=g))]
    return out


@pytest.mark.parametrize("name", ["concat", "mobilenet", "se_block", "pool_heads", "shared_module",
                                  "grouped_resnext", "grouped_mix"])
def test_bilinear_coefficients_reproduce_the_closed_form(name: str) -> None:
    c = CASES[name]()
    gs = graph.analyze(c.model, c.x)
    g = torch.Generator().manual_seed(0)
    full = cost.closed_form(gs)
    for _ in range(5):
        w = _legal_random(gs, g)
        # c0 from the full-width cost: c0 = cost(full) − Σκ·full·full − Σλ·full
        for what in ("macs", "params"):
            def poly(widths: dict[str, int], attr: str = what) -> float:
                total = 0.0
                for grp in gs.prunable():
                    total += getattr(grp, f"{attr}_linear") * widths[grp.id]
                    for other, k in getattr(grp, f"{attr}_quadratic"):
                        if gs[other].index >= grp.index:  # each unordered pair once
                            total += k * widths[grp.id] * widths[other]
                return total

            c0 = getattr(full, what) - poly(gs.full_widths())
            assert getattr(cost.closed_form(gs, w), what) == pytest.approx(poly(w) + c0, abs=1e-6)


def test_group_macs_are_the_terms_that_involve_the_group() -> None:
    c = CASES["resnet_identity_b"]()
    gs = graph.analyze(c.model, c.x)
    for grp in gs.prunable():
        s = grp.size
        terms = grp.macs_linear * s + sum(k * s * gs[o].size for o, k in grp.macs_quadratic)
        assert grp.macs == pytest.approx(terms)
        assert grp.macs > 0 and grp.params > 0


def test_min_cost() -> None:
    c = CASES["resnet_identity_b"]()
    gs = graph.analyze(c.model, c.x)
    floor = cost.min_cost(gs)
    assert floor == cost.closed_form(gs, {g.id: 1 for g in gs.prunable()})
    floor4 = cost.min_cost(gs, round_to=4)
    assert floor4 == cost.closed_form(gs, {g.id: 4 for g in gs.prunable()})
    assert floor.macs < floor4.macs < cost.closed_form(gs).macs


def test_oracle_agrees_on_random_widths() -> None:
    c = CASES["concat"]()
    gs = graph.analyze(c.model, c.x)
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        w = {grp.id: int(torch.randint(1, grp.size + 1, (1,), generator=g)) for grp in gs.prunable()}
        pruned = pruning.apply(c.model, gs, w)
        r = cost.closed_form(gs, w)
        assert r.macs * 2 == cost.count_macs(pruned, c.x)  # example batch is 2
        assert r.params == cost.count_params(pruned)


@pytest.mark.parametrize("name", ["grouped_conv", "grouped_chain", "grouped_resnext", "grouped_eq_out"])
def test_grouped_conv_cost_matches_the_oracle(name: str) -> None:
    c = CASES[name]()
    x = c.x[:1]
    gs = graph.analyze(c.model, x)
    assert cost.closed_form(gs).macs == cost.count_macs(c.model, x)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        w = _legal_random(gs, g)
        pruned = pruning.apply(c.model, gs, w)
        r = cost.closed_form(gs, w)
        assert (r.macs, r.params) == (cost.count_macs(pruned, x), cost.count_params(pruned))


@pytest.mark.parametrize("name", ["grouped_resnext", "groups3"])
def test_grouped_conv_quantized_bytes_equal_the_export(name: str) -> None:
    quantization = pytest.importorskip("autoprune.quantization")
    if name == "groups3":  # 1×1 conv with 3 groups: the weight numel carries a factor 1/3 in the closed form
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 9, 3, padding=1), nn.BatchNorm2d(9), nn.ReLU(),
                              nn.Conv2d(9, 6, 1, groups=3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 1)).eval()
        x = torch.rand(1, 3, 6, 6)
    else:
        c = CASES[name]()
        model, x = c.model, c.x[:1]
    gs = graph.analyze(model, x)
    for pick in (0, -1):
        w = {gid: pruning.legal_widths(gs[gid])[pick] for gid in gs.prunable_ids}
        pruned = pruning.apply(model, gs, w)
        layers = quantization.quantizable_layers(pruned)
        for a_bits in (None, 4):
            bits = {n: QuantSpec(8, 8) if n in (layers[0], layers[-1]) else QuantSpec(3 + k % 4, a_bits)
                    for k, n in enumerate(layers)}
            qm = quantization.apply(pruned, bits)
            quantization.calibrate(qm, [x], batches=1)
            art = quantization.export(qm)
            r = cost.closed_form(gs, w, bits)
            assert (r.bytes, r.payload_bits) == (art.size_bytes, art.payload_bits)
            assert r.macs == cost.count_macs(pruned, x)


def test_attention_macs_formula() -> None:
    torch.manual_seed(0)
    model = SDPABlock(dim=16, heads=2)
    x = torch.randn(1, 10, 16)
    gs = graph.analyze(model, x)
    counted = cost.count_macs(model, x)  # FlopCounterMode sees only the two linear layers on CPU SDPA
    heads, n, d_h = 2, 10, 8
    assert cost.closed_form(gs).macs == counted + 2 * heads * n * n * d_h
    assert counted == 10 * 16 * 48 + 10 * 16 * 16


def test_explicit_attention_matmuls_match_the_oracle() -> None:
    c = CASES["transformer"]()
    gs = graph.analyze(c.model, c.x)
    assert cost.closed_form(gs).macs * 2 == cost.count_macs(c.model, c.x)


def test_tied_parameters_counted_once() -> None:
    model = TiedLM()
    gs = graph.analyze(model, torch.randint(0, 20, (1, 5)))
    assert cost.closed_form(gs).params == cost.count_params(model) == 20 * 16 + 16 * 24 + 24 + 24 * 16 + 16
    w = {"emb:out": 8, "fc1:out": 10}
    assert cost.closed_form(gs, w).params == cost.count_params(pruning.apply(model, gs, w))


def test_expected_cost_matches_and_differentiates() -> None:
    c = CASES["mobilenet"]()
    gs = graph.analyze(c.model, c.x)
    w = {g.id: max(1, g.size // 3) for g in gs.prunable()}
    tw = {k: torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for k, v in w.items()}
    e = cost.expected_cost(gs, tw)
    assert float(e.detach()) == pytest.approx(cost.closed_form(gs, w).macs)
    e.backward()
    gid = gs.prunable_ids[1]
    bumped = cost.closed_form(gs, {**w, gid: w[gid] + 1}).macs - cost.closed_form(gs, w).macs
    kii = next((k for o, k in gs[gid].macs_quadratic if o == gid), 0.0)
    assert float(tw[gid].grad) == pytest.approx(bumped - kii, rel=1e-9)  # exact for a bilinear form
    m2 = {gid: torch.tensor(float(w[gid] ** 2 + 4), dtype=torch.float64)}  # variance 4
    assert float(cost.expected_cost(gs, tw, m2).detach()) == pytest.approx(float(e.detach()) + 4 * kii)
    assert float(cost.expected_cost(gs, {}, what="params")) == pytest.approx(cost.closed_form(gs).params)
    with pytest.raises(ConfigError):
        cost.expected_cost(gs, tw, what="latency")


def test_count_macs_restores_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    cost.count_macs(model, torch.randn(2, 3, 6, 6))
    assert model.training and float(model[1].running_mean.abs().sum()) == 0.0


def test_documented_zoo_macs() -> None:
    models = pytest.importorskip("autoprune.models")
    # ENGINE.md §7.3: ResNet-20 / ResNet-56 with option-B shortcuts, batch 1, 32×32
    for name, documented in (("resnet20_b", 40.813e6), ("resnet56_b", 125.748e6)):
        model = models.build_model(name)
        x = torch.rand(1, 3, 32, 32)
        gs = graph.analyze(model, x)
        macs = cost.closed_form(gs).macs
        assert macs == cost.count_macs(model, x)
        assert macs == pytest.approx(documented, abs=1e3)


def test_closed_form_speed() -> None:
    c = CASES["mobilenet"]()
    gs = graph.analyze(c.model, c.x)
    ws = [{g.id: max(1, g.size - k % g.size) for g in gs.prunable()} for k in range(200)]
    cost.closed_form(gs, ws[0])
    t = time.perf_counter()
    for w in ws:
        cost.closed_form(gs, w)
    per_call = (time.perf_counter() - t) / len(ws)
    assert per_call < 2e-3  # thousands of calls per second (measured ≈ 20 µs unloaded)


def test_annotate_groups_is_deprecated_and_leaves_the_annotated_groups_alone() -> None:
    from autoprune.models import build_model

    gs = graph.analyze(build_model("resnet20"), torch.rand(1, 3, 32, 32))
    before = [(g.id, g.macs, g.params) for g in gs]
    assert any(macs > 0 for _, macs, _ in before)  # analyze() filled them already
    with pytest.warns(DeprecationWarning, match="annotate_groups is deprecated"):
        cost.annotate_groups(gs)
    assert [(g.id, g.macs, g.params) for g in gs] == before
