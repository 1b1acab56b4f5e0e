"""InfCoP flow measures: against slow reference computations, layer sets, hooks, distances, stopping rule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from autoprune.errors import ConfigError, DataError
from autoprune.evaluate import InfCoPEvaluator, was_pruned
from autoprune.infcop import (
    FlowMeasure,
    FlowReference,
    flow_distance,
    flow_layers,
    gradient_flow,
    gradient_layers,
    information_flow,
    is_consistent,
    take_batches,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny models: one intra-op thread (two threads on a shared, loaded 2-core machine are ~40x slower)."""
    torch.set_num_threads(1)



class TinyNet(nn.Module):
    """Registration order differs from execution order; has a 'shortcut' conv excluded from IF."""

    def __init__(self, widths: tuple[int, int, int] = (6, 5, 4)) -> None:
        super().__init__()
        a, b, c = widths
        self.head = nn.Linear(c, 3)  # registered first, runs last
        self.conv2 = nn.Conv2d(a, b, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(3, a, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(a)
        self.bn2 = nn.BatchNorm2d(b)
        self.conv3 = nn.Conv2d(b, c, 3, padding=1)
        self.shortcut = nn.Conv2d(a, c, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(h)))
        y = self.conv3(y) + self.shortcut(h)
        return self.head(F.relu(y).mean(dim=(2, 3)))


def _data(n_batches: int = 4, bs: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 6, 6, generator=g), torch.randint(0, 3, (bs,), generator=g))
            for _ in range(n_batches)]


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def _slow_if(model: nn.Module, data, layers: list[str], reduce: str) -> list[float]:
    """Reference IF: explicit loops, numpy corrcoef on the pooled activations of every sample."""
    mods = dict(model.named_modules())
    acts: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    model.eval()
    for x, _ in data:
        for i in range(x.shape[0]):
            outs: dict[str, np.ndarray] = {}
            hs = [mods[n].register_forward_hook(
                lambda m, a, o, n=n, outs=outs: outs.__setitem__(n, o.detach().numpy())) for n in layers]
            with torch.no_grad():
                model(x[i:i + 1])
            for h in hs:
                h.remove()
            for n in layers:
                o = outs[n][0]
                acts[n].append(o.reshape(o.shape[0], -1).mean(axis=1) if o.ndim > 1 else o)
    phis = []
    for a, b in itertools.pairwise(layers):
        A, B = np.array(acts[a], dtype=np.float64), np.array(acts[b], dtype=np.float64)
        full = np.corrcoef(np.concatenate([A, B], axis=1), rowvar=False)
        block = full[: A.shape[1], A.shape[1]:]
        phis.append(float(np.abs(block).mean() if reduce == "abs" else block.mean()))
    return phis


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


# ---------------------------------------------------------------------------------------------------------


def test_flow_layers_execution_order_and_exclusions() -> None:
    model = TinyNet()
    layers = flow_layers(model, torch.randn(2, 3, 6, 6))
    assert layers == ["conv1", "conv2", "conv3", "head"]  # not registration order; shortcut excluded
    assert _no_hooks(model)
    assert gradient_layers(model) == ["head.weight", "conv2.weight", "conv1.weight", "conv3.weight",
                                      "shortcut.weight"]


@pytest.mark.parametrize("reduce", ["mean", "abs"])
@pytest.mark.parametrize("cache", [True, False])
def test_information_flow_matches_slow_reference(reduce: str, cache: bool) -> None:
    model = TinyNet()
    _randomize_bn(model)
    data = _data()
    m = information_flow(model, data, reduce=reduce, max_cache_floats=2**25 if cache else 0)
    assert m.kind == "IF" and m.names == ("conv1", "conv2", "conv3", "head") and not m.nan
    expected = _slow_if(model, data, list(m.names), reduce)
    assert m.values.shape == (3,)
    np.testing.assert_allclose(m.values.numpy(), expected, atol=1e-5)
    assert m.samples == 64 * (1 if cache else 2)  # two forward passes when activations are not cached
    assert _no_hooks(model)
    assert m.labels == ("conv1->conv2", "conv2->conv3", "conv3->head")


def test_information_flow_restores_mode_and_leaves_model_untouched() -> None:
    model = TinyNet()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    information_flow(model, _data(2))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats untouched (eval mode inside)


def test_information_flow_constant_channel_is_not_nan_but_nan_input_is() -> None:
    model = TinyNet()
    with torch.no_grad():
        model.conv2.weight[0].zero_()  # output channel 0 of conv2 is constant -> sigma floor, correlation 0
    m = information_flow(model, _data(2))
    assert not m.nan and torch.isfinite(m.values).all()
    bad = [(torch.full((4, 3, 6, 6), float("nan")), torch.zeros(4, dtype=torch.long))]
    m_bad = information_flow(model, bad)
    assert m_bad.nan
    assert math.isnan(flow_distance(m_bad, m))
    assert not is_consistent(m_bad, m, eps=1e9)


def test_information_flow_errors_and_hooks_removed_on_error() -> None:
    model = TinyNet()
    with pytest.raises(ConfigError, match="unknown information-flow reduction"):
        information_flow(model, _data(1), reduce="median")
    with pytest.raises(ConfigError, match="not found"):
        information_flow(model, _data(1), layers=["conv1", "nope"])
    with pytest.raises(DataError):
        information_flow(model, [])
    with pytest.raises(DataError):
        information_flow(model, _data(1), max_batches=0)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(self.a(x)))

    twice = Twice()
    with pytest.raises(ConfigError, match="more than once"):
        information_flow(twice, [(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))])
    assert _no_hooks(twice)


def test_information_flow_unused_layer_is_reported() -> None:
    class Unused(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Conv2d(3, 3, 1)

    model = Unused()
    with pytest.raises(ConfigError, match="did not run"):
        information_flow(model, _data(1), layers=["conv1", "spare", "conv2"])
    # the automatic layer set simply leaves out modules that never run
    assert information_flow(model, _data(1)).names == ("conv1", "conv2", "conv3", "head")


def _slow_gf(model: nn.Module, data, masks, stat: str) -> dict[str, float]:
    out: dict[str, float] = {}
    model.eval()
    for x, y in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            if p.dim() > 1:
                g = p.grad.double() * (masks[n].double() if masks and n in masks else 1.0)
                val = float(g.abs().mean()) if stat == "mean" else float(torch.sqrt((g * g).sum()))
                out[n] = out.get(n, 0.0) + val / len(data)
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("stat", ["mean", "fro"])
def test_gradient_flow_matches_slow_reference_with_masks(stat: str) -> None:
    model = TinyNet()
    _randomize_bn(model)
    data = _data(3)
    masks = {"conv2.weight": (torch.rand_like(model.conv2.weight) > 0.5).float()}
    g = gradient_flow(model, data, masks=masks, stat=stat)
    ref = _slow_gf(model, data, masks, stat)
    assert g.kind == "GF" and list(g.names) == list(ref)
    np.testing.assert_allclose(g.values.numpy(), [ref[n] for n in g.names], rtol=1e-6, atol=1e-9)
    assert g.samples == 48


def test_gradient_flow_uses_real_gradients_and_leaves_nothing_behind() -> None:
    model = TinyNet()
    model.train()
    data = _data(2)
    bn_before = model.bn1.running_mean.clone()
    g1 = gradient_flow(model, data)
    assert (g1.values > 0).all()  # real gradients, not zeros
    assert all(p.grad is None for p in model.parameters())  # no .grad left behind
    assert model.training and torch.equal(model.bn1.running_mean, bn_before) and _no_hooks(model)
    with torch.no_grad():
        model.conv1.weight.mul_(3.0)
    g2 = gradient_flow(model, data)
    assert not torch.allclose(g1.values, g2.values)  # changes when the weights change
    # a mask of zeros zeroes the statistic of that layer only
    g3 = gradient_flow(model, data, masks={"conv1.weight": torch.zeros_like(model.conv1.weight)})
    i = g3.names.index("conv1.weight")
    assert g3.values[i] == 0 and g3.values[i - 1] == g2.values[i - 1]
    with torch.no_grad():  # callers inside no_grad still get gradients
        assert torch.allclose(gradient_flow(model, data).values, g2.values)
    with pytest.raises(ConfigError, match="statistic"):
        gradient_flow(model, data, stat="max")
    with pytest.raises(DataError):
        gradient_flow(model, [])


def test_flow_distance_forms_and_validation() -> None:
    names = ("a", "b", "c", "d", "e")
    ref = FlowMeasure("IF", torch.tensor([1.0, 2.0, 2.0, 0.0], dtype=torch.float64), names)
    cur = FlowMeasure("IF", torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=torch.float64), names)
    assert flow_distance(cur, ref) == pytest.approx(2.0)
    assert flow_distance(cur, ref, "rms") == pytest.approx(1.0)
    assert flow_distance(cur, ref, "relative") == pytest.approx(2.0 / 3.0)
    assert is_consistent(cur, ref, eps=2.5) and not is_consistent(cur, ref, eps=2.0)
    assert not is_consistent(cur, ref)  # default eps 1.0 for IF
    with pytest.raises(ConfigError, match="form"):
        flow_distance(cur, ref, "l1")
    with pytest.raises(ConfigError, match="layer sets differ"):
        flow_distance(FlowMeasure("IF", torch.zeros(3), names[:4]), ref)
    with pytest.raises(ConfigError, match="cannot compare"):
        flow_distance(FlowMeasure("GF", torch.zeros(4), names[:4]), ref)
    nan = FlowMeasure("IF", torch.tensor([1.0, float("nan"), 2.0, 0.0]), names, nan=True)
    assert math.isnan(flow_distance(nan, ref)) and not is_consistent(nan, ref, eps=1e9)


def test_flow_reference_compares_dense_and_channel_pruned_model() -> None:
    dense, pruned = TinyNet(), TinyNet((3, 2, 4))  # same names, fewer channels
    data = _data(4, bs=8)
    ref = FlowReference.compute(dense, data, "IF", max_samples=20)
    assert ref.samples == 20 and [x.shape[0] for x, _ in ref.batches] == [8, 8, 4]
    assert ref.eps == 1.0
    same = ref.check(dense)
    assert same.consistent and same.distance == pytest.approx(0.0, abs=1e-12)
    other = ref.check(pruned)
    assert other.distance > 0 and math.isfinite(other.distance)
    gref = FlowReference.compute(dense, data, "GF", max_samples=16, form="rms")
    assert gref.eps == 0.5 and gref.form == "rms"
    assert gref.check(dense).distance == pytest.approx(0.0, abs=1e-12)
    assert gref.check(pruned).distance > 0
    traced = torch.fx.symbolic_trace(dense)  # same tensors, parameters listed in first-use order
    assert gradient_layers(traced) != gradient_layers(dense)
    assert gref.check(traced).distance == pytest.approx(0.0, abs=1e-12)
    assert ref.check(traced).distance == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="not found"):
        gradient_flow(dense, data, params=["conv1.weight", "nope.weight"])
    assert _no_hooks(dense) and _no_hooks(pruned)
    with pytest.raises(ConfigError, match="flow kind"):
        FlowReference.compute(dense, data, "XF")
    with pytest.raises(ConfigError, match="eps"):
        FlowReference.compute(dense, data, "IF", eps=0.0)
    with pytest.raises(DataError):
        take_batches([], 10)


# --------------------------------------------------------------- stopping rule (the infcop evaluator)


def _loaders():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 6, 6, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long()
    train = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    return train, train[:2]


def test_infcop_stops_on_consistency_immediately_for_the_dense_model() -> None:
    train, val = _loaders()
    dense = TinyNet()
    ev = InfCoPEvaluator(train, val, dense=dense, flow="IF", eps=10.0, check_every=2, max_steps=20, lr=1e-3)
    r = ev.evaluate(dense)
    assert r.extra["stop_reason"] == "consistent" and r.extra["steps"] == 2
    assert len(r.extra["trajectory"]) == 1 and r.extra["trajectory"][0]["consistent"]
    assert r.samples == 2 * 16 + r.extra["flow_samples"] and r.extra["flow_samples"] > 0
    assert _no_hooks(dense)


def test_infcop_stops_on_budget_when_never_consistent() -> None:
    train, val = _loaders()
    dense = TinyNet()
    ev = InfCoPEvaluator(train, val, dense=dense, flow="both", eps={"IF": 1e-12, "GF": 1e-12},
                         check_every=3, max_steps=7, lr=0.05)
    r = ev.evaluate(TinyNet((3, 2, 4)))
    assert r.extra["stop_reason"] == "budget" and r.extra["steps"] == 7
    steps = [t["step"] for t in r.extra["trajectory"]]
    assert steps == [3, 6, 7]
    assert all(set(t["distance"]) == {"IF", "GF"} for t in r.extra["trajectory"])
    refs = ev.references()
    assert [x.kind for x in refs] == ["IF", "GF"] and ev.references() is refs  # computed once


def test_infcop_nan_network_is_a_failed_candidate_not_a_consistent_one() -> None:
    """NaN flows never count as consistent (see the FlowMeasure test above); a NaN network's loss diverges, so
    the evaluator raises DivergedError (the searcher records a failed trial) instead of returning a score."""
    from autoprune.evaluate import DivergedError

    train, val = _loaders()
    dense = TinyNet()
    ev = InfCoPEvaluator(train, val, dense=dense, flow="IF", eps=1e9, check_every=2, max_steps=4, lr=1e-3)
    broken = TinyNet()
    with torch.no_grad():
        broken.conv1.bias.fill_(float("nan"))
    with pytest.raises(DivergedError, match="diverged"):
        ev.evaluate(broken)


def test_infcop_accuracy_stop_and_pruning_callback() -> None:
    train, val = _loaders()
    dense = TinyNet()
    ev = InfCoPEvaluator(train, val, dense=dense, eps=1e-12, check_every=2, max_steps=10, target_accuracy=0.0)
    r = ev.evaluate(TinyNet((3, 2, 4)))
    assert r.extra["stop_reason"] == "accuracy" and r.extra["steps"] == 2
    seen: list[tuple[int, float]] = []
    ev2 = InfCoPEvaluator(train, val, references=ev.references(), check_every=2, max_steps=10)
    r2 = ev2.evaluate(TinyNet((3, 2, 4)), report=lambda s, v: seen.append((s, v)) or s >= 4)
    assert was_pruned(r2) and r2.extra["stop_reason"] == "pruned" and [s for s, _ in seen] == [2, 4]
    assert r2.accuracy == seen[-1][1]
    with pytest.raises(ConfigError, match="dense network or pre-computed"):
        InfCoPEvaluator(train, val)
    with pytest.raises(ConfigError, match="unknown flow"):
        InfCoPEvaluator(train, val, dense=dense, flow="XF")
