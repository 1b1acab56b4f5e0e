"""Applying widths (autoprune.pruning): equivalence E, shapes S, cost C, round trip R, widths, importance."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from engine_cases import (
    CASES,
    PlainChain,
    TinyResNet,
    batch_of,
    flat_outputs,
    half_widths,
    masked_reference,
    randomize,
    run,
)
from torch import fx, nn

from autoprune import cost, graph, importance, pruning
from autoprune.errors import AutoPruneError, ConfigError
from autoprune.types import Candidate


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _max_diff(a: object, b: object) -> float:
    xs, ys = flat_outputs(a), flat_outputs(b)
    assert [x.shape for x in xs] == [y.shape for y in ys]
    return max(float((x - y).abs().max()) for x, y in zip(xs, ys))


def _random_widths(gs: graph.GroupSet, seed: int) -> dict[str, int]:
    """A random legal width per prunable group (any width, or a multiple of the divisor for grouped convs)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for grp in gs.prunable():
        legal = pruning.legal_widths(grp)
        out[grp.id] = legal[int(torch.randint(0, len(legal), (1,), generator=g))]
    return out


def _check(model: nn.Module, x: object, gs: graph.GroupSet, widths: dict[str, int], exact: bool = True,
           tol: float = 1e-5, **kw: object) -> fx.GraphModule:
    """E, S and C for one candidate; returns the pruned model."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = pruning.plan(model, gs, widths, **kw)
    pruned = pruning.apply(model, gs, p)
    out = run(pruned, x)
    ref_out = run(model, x)
    assert [t.shape for t in flat_outputs(out)] == [t.shape for t in flat_outputs(ref_out)]  # S
    if exact:  # E
        masked = masked_reference(model, gs, p)
        scale = max(1.0, max(float(t.abs().max()) for t in flat_outputs(ref_out)))
        assert _max_diff(out, run(masked, x)) <= tol * scale
    price = cost.closed_form(gs, p.widths)  # C
    assert price.params == sum(t.numel() for t in pruned.parameters())
    assert price.macs * batch_of(x) == cost.count_macs(pruned, x)
    after = model.state_dict()  # the original is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    return pruned


@pytest.mark.parametrize("name", sorted(CASES))
def test_cases_equivalence_shape_cost(name: str) -> None:
    c = CASES[name]()
    gs = graph.analyze(c.model, c.x)
    _check(c.model, c.x, gs, half_widths(gs), exact=c.exact)
    _check(c.model, c.x, gs, _random_widths(gs, 1), exact=c.exact)
    _check(c.model, c.x, gs, {g.id: pruning.legal_widths(g)[0] for g in gs.prunable()}, exact=c.exact)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cases_full_width_is_identical(name: str) -> None:
    c = CASES[name]()
    gs = graph.analyze(c.model, c.x)
    full = pruning.apply(c.model, gs, {})
    assert _max_diff(run(full, c.x), run(c.model, c.x)) == 0.0
    assert set(full.state_dict()) <= set(c.model.state_dict())


def test_literal_view_size_is_rewritten() -> None:
    c = CASES["pool_heads"]()
    gs = graph.analyze(c.model, c.x)
    pruned = pruning.apply(c.model, gs, {"c2:out": 5})
    assert "-1, 20)" in pruned.code  # view(-1, 64) became view(-1, 5·2·2)


@pytest.mark.parametrize("crit", importance.IMPORTANCE.names())
def test_every_criterion_gives_an_exact_model(crit: str) -> None:
    c = CASES["resnet_identity_b"]()
    gs = graph.analyze(c.model, c.x)
    loader = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))] * 2
    _check(c.model, c.x, gs, half_widths(gs), importance=crit, loader=loader)


def test_criteria_choose_the_expected_channels() -> None:
    torch.manual_seed(0)
    model = randomize(PlainChain())
    with torch.no_grad():
        model.c1.weight.mul_(0.01)
        model.c1.weight[[1, 6]] *= 10000.0  # the two largest producer rows
        model.b1.weight.copy_(torch.arange(8, 0, -1, dtype=torch.float32))  # |γ| largest for channels 0, 1
        model.c2.weight.mul_(0.01)
        model.c2.weight[:, [2, 3]] *= 1000.0  # the two largest consumer columns
    gs = graph.analyze(model, torch.randn(1, 3, 8, 8))
    keep = {crit: pruning.plan(model, gs, {"c1:out": 2}, importance=crit).keep["c1:out"]
            for crit in ("l1", "l2", "bn_scale", "consumer_l1", "prefix")}
    assert keep == {"l1": (1, 6), "l2": (1, 6), "bn_scale": (0, 1), "consumer_l1": (2, 3), "prefix": (0, 1)}
    r1 = pruning.plan(model, gs, {"c1:out": 4}, importance="random", seed=1).keep["c1:out"]
    assert r1 == pruning.plan(model, gs, {"c1:out": 4}, importance="random", seed=1).keep["c1:out"]
    assert any(pruning.plan(model, gs, {"c1:out": 4}, importance="random", seed=s).keep["c1:out"] != r1
               for s in range(2, 6))


class _NoEvaluator:
    """Stands in for a campaign's evaluator: building a candidate never evaluates it."""

    name = "none"

    def evaluate(self, model: nn.Module, *, key: str | None = None, report: object = None) -> object:
        raise AssertionError("not evaluated here")


def test_library_default_criterion_keeps_the_channels_a_campaign_keeps() -> None:
    from autoprune.config import SearchSpaceConfig
    from autoprune.problem import Problem
    from autoprune.search_spaces import build_space

    torch.manual_seed(3)
    c = CASES["resnet_identity_b"]()
    gs = graph.analyze(c.model, c.x)
    cfg = SearchSpaceConfig()  # a campaign's defaults, wired as Campaign.new_problem does
    space = build_space(gs, model=c.model, round_to=cfg.round_to, min_ratio=cfg.min_ratio)
    problem = Problem(c.model, gs, space, _NoEvaluator(), c.x, importance=cfg.importance,  # type: ignore[arg-type]
                      round_to=cfg.round_to)
    assert cfg.importance == problem.importance == importance.DEFAULT_CRITERION == "l1"
    assert pruning.PruningPlan(widths={}, keep={}).importance == importance.DEFAULT_CRITERION
    widths = {g.group_id: g.widths[len(g.widths) // 2] for g in space.groups}
    library = pruning.apply(c.model, gs, widths)  # no importance argument: the library default
    campaign = problem.build(Candidate(widths=widths))
    kept = {gid: v["kept"] for gid, v in library.meta[pruning.META_KEY]["groups"].items()}
    assert kept == {gid: v["kept"] for gid, v in campaign.meta[pruning.META_KEY]["groups"].items()}
    assert library.meta[pruning.META_KEY]["importance"] == "l1"
    lib_state, camp_state = library.state_dict(), campaign.state_dict()
    assert lib_state.keys() == camp_state.keys()
    assert all(torch.equal(lib_state[k], camp_state[k]) for k in lib_state)
    # the comparison has teeth: another criterion keeps other channels for these widths
    assert pruning.plan(c.model, gs, widths, importance="l2").keep != pruning.plan(c.model, gs, widths).keep
    scores, l1 = importance.group_scores(c.model, gs), importance.group_scores(c.model, gs, importance="l1")
    assert scores.keys() == l1.keys() and all(torch.equal(scores[gid], l1[gid]) for gid in scores)


def test_fpgm_drops_the_filter_nearest_the_median() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.ReLU(), nn.Conv2d(3, 2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.0, 1.0, 10.0]).reshape(3, 1, 1, 1))
    gs = graph.analyze(model, torch.randn(1, 1, 4, 4))
    assert pruning.plan(model, gs, {"0:out": 2}, importance="fpgm").keep["0:out"] == (0, 2)


def test_taylor_needs_a_loader_and_uses_gradients() -> None:
    c = CASES["plain_chain"]()
    gs = graph.analyze(c.model, c.x)
    with pytest.raises(ConfigError, match="needs a loader"):
        pruning.plan(c.model, gs, {"c1:out": 4}, importance="taylor")
    loader = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))] * 3
    scores = importance.group_scores(c.model, gs, ["c1:out"], "taylor", loader=loader)["c1:out"]
    assert scores.shape == (8,) and bool((scores > 0).all())
    assert all(p.grad is None for p in c.model.parameters())  # gradients were taken on a copy


def test_custom_criterion_and_reductions() -> None:
    c = CASES["plain_chain"]()
    gs = graph.analyze(c.model, c.x)
    p = pruning.plan(c.model, gs, {"c1:out": 3}, importance=lambda g, ctx: torch.arange(g.size, dtype=torch.float))
    assert p.keep["c1:out"] == (5, 6, 7) and p.importance == "<lambda>"
    s = {r: importance.group_scores(c.model, gs, ["c1:out"], reduce=r)["c1:out"] for r in ("mean", "sum", "max")}
    assert torch.allclose(s["sum"], 3 * s["mean"]) and bool((s["max"] <= s["sum"]).all())
    with pytest.raises(ConfigError, match="unknown reduction"):
        importance.group_scores(c.model, gs, reduce="median")
    with pytest.raises(ConfigError, match="unknown importance criterion"):
        pruning.plan(c.model, gs, {"c1:out": 3}, importance="l3")


# ----------------------------------------------------------------------------------------------------------------
# Widths
# ----------------------------------------------------------------------------------------------------------------


def _group(size: int, divisor: int = 1, min_width: int = 1) -> graph.ChannelGroup:
    return graph.ChannelGroup(id="g", size=size, members=(graph.Member("m", "out"),), frozen=False,
                              divisor=divisor, min_width=min_width)


def test_legal_widths() -> None:
    assert _group(20).legal_widths(8) == pruning.legal_widths(_group(20), 8) == [8, 16, 20]  # alias of the method
    assert pruning.legal_widths(_group(16), 8) == [8, 16]
    assert pruning.legal_widths(_group(6), 8) == [1, 2, 3, 4, 5, 6]  # C ≤ r: round_to ignored
    assert pruning.legal_widths(_group(24, divisor=3), 4) == [12, 24]
    assert pruning.legal_widths(_group(6, divisor=3), 8) == [3, 6]
    assert pruning.legal_widths(_group(10, min_width=4)) == [4, 5, 6, 7, 8, 9, 10]
    with pytest.raises(ConfigError):
        pruning.legal_widths(_group(8), 0)


def test_nearest_legal_and_ratios() -> None:
    g = _group(64)
    assert pruning.nearest_legal(g, 20, 8) == 24  # tie between 16 and 24 goes up
    assert pruning.nearest_legal(g, 17.3, 8, "up") == 24  # AMC: round(17.3) = 17 → next multiple of 8
    assert pruning.nearest_legal(g, 23.9, 8, "down") == 16
    c = CASES["resnet_identity_b"]()
    gs = graph.analyze(c.model, c.x)
    w = pruning.widths_from_ratios(gs, 0.5, round_to=4)
    assert w == {g.id: 4 if g.size == 8 else 8 for g in gs.prunable()}
    assert pruning.widths_from_ratios(gs, {"conv1:out": 0.35}, rounding="up") == {"conv1:out": 3}
    assert pruning.widths_from_ratios(gs, {"conv1:out": 0.35}, rounding="down") == {"conv1:out": 2}
    with pytest.raises(ConfigError, match="outside"):
        pruning.widths_from_ratios(gs, 0.0)
    with pytest.raises(ConfigError, match="frozen"):
        pruning.widths_from_ratios(gs, {"linear:out": 0.5})


def test_widths_from_layers_conflicts() -> None:
    c = CASES["resnet_identity_b"]()
    gs = graph.analyze(c.model, c.x)
    req = {"layer1.0.conv2": 6, "conv1": 4, "layer1.0.conv1": 5}
    with pytest.raises(ConfigError, match="share channel group 'conv1:out'"):
        pruning.widths_from_layers(gs, req)
    assert pruning.widths_from_layers(gs, req, on_conflict="min") == {"conv1:out": 4, "layer1.0.conv1:out": 5}
    assert pruning.widths_from_layers(gs, req, on_conflict="max")["conv1:out"] == 6
    with pytest.raises(ConfigError, match="frozen"):
        pruning.widths_from_layers(gs, {"linear": 5})


def test_width_errors() -> None:
    c = CASES["resnet_identity_b"]()
    gs = graph.analyze(c.model, c.x)
    with pytest.raises(ConfigError, match="remove the whole group"):
        pruning.apply(c.model, gs, {"conv1:out": 0})
    with pytest.raises(ConfigError, match="frozen"):
        pruning.apply(c.model, gs, {"linear:out": 5})
    with pytest.raises(ConfigError, match="did you mean 'conv1:out'"):
        pruning.apply(c.model, gs, {"conv1:ou": 4})
    with pytest.raises(ConfigError, match="exceeds"):
        pruning.apply(c.model, gs, {"conv1:out": 9})
    with pytest.raises(ConfigError, match="integer"):
        pruning.apply(c.model, gs, {"conv1:out": 2.5})
    pruning.apply(c.model, gs, {"linear:out": 10})  # a frozen group at full width is fine


def test_round_to_and_candidate_and_plan_forms() -> None:
    c = CASES["resnet_identity_b"]()
    gs = graph.analyze(c.model, c.x)
    p = pruning.plan(gs, {"layer2.0.conv1:out": 9}, round_to=4)
    assert p.widths["layer2.0.conv1:out"] == 8
    pruned = pruning.apply(c.model, gs, Candidate(widths={"layer2.0.conv1:out": 9}), round_to=4)
    assert pruned.get_submodule("layer2.0.conv1").out_channels == 8
    again = pruning.apply(c.model, p)
    assert _max_diff(run(again, c.x), run(pruned, c.x)) == 0.0
    with pytest.raises(ConfigError, match="takes no widths"):
        pruning.apply(c.model, p, {"conv1:out": 2})


def test_determinism_of_plans_and_models() -> None:
    c = CASES["mobilenet"]()
    gs1, gs2 = graph.analyze(c.model, c.x), graph.analyze(c.model, c.x)
    assert gs1.ids() == gs2.ids()
    w = _random_widths(gs1, 3)
    p1, p2 = pruning.plan(c.model, gs1, w), pruning.plan(c.model, gs2, w)
    assert p1.keep == p2.keep and p1.provenance() == p2.provenance()
    assert _max_diff(run(pruning.apply(c.model, p1), c.x), run(pruning.apply(c.model, p2), c.x)) == 0.0


def test_pruned_model_trains_and_keeps_names() -> None:
    torch.manual_seed(0)
    model = TinyResNet("B")
    x = torch.randn(4, 3, 8, 8)
    gs = graph.analyze(model, x)
    pruned = pruning.apply(model, gs, half_widths(gs))
    assert set(pruned.state_dict()) == set(model.state_dict())
    assert pruned.get_submodule("layer1.0.bn1").running_mean.shape == (4,)
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    before = pruned.get_submodule("layer1.0.bn1").running_mean.clone()
    for _ in range(2):
        loss = F.cross_entropy(pruned(x), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(before, pruned.get_submodule("layer1.0.bn1").running_mean)
    assert all(p.grad is not None for p in pruned.parameters())
    assert float(model.get_submodule("layer1.0.bn1").running_mean.abs().sum()) == 0.0  # original untouched


def test_apply_uses_the_weights_of_the_model_passed() -> None:
    c = CASES["plain_chain"]()
    gs = graph.analyze(c.model, c.x)
    other = copy.deepcopy(c.model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(2.0)
    pruned = pruning.apply(other, gs, {"c1:out": 4}, importance="prefix")
    assert torch.equal(pruned.get_submodule("c1").weight, other.c1.weight[:4])
    with pytest.raises(AutoPruneError, match=r"has no tensor 'c1\.weight'"):
        pruning.apply(TinyResNet("B"), gs, {"c1:out": 4})
    other.c1 = nn.Conv2d(3, 8, 5, padding=2)
    with pytest.raises(AutoPruneError, match=r"c1.weight has shape \(8, 3, 5, 5\)"):
        pruning.apply(other, gs, {"c1:out": 4})


def test_mask_matches_apply() -> None:
    c = CASES["concat"]()
    gs = graph.analyze(c.model, c.x)
    p = pruning.plan(c.model, gs, _random_widths(gs, 5))
    assert _max_diff(run(pruning.mask(c.model, p), c.x), run(pruning.apply(c.model, p), c.x)) < 1e-5


def _block_perms(gs: graph.GroupSet, seed: int) -> dict[str, torch.Tensor]:
    """A random permutation of every prunable group, within each block of a grouped-conv group."""
    g = torch.Generator().manual_seed(seed)
    perms = {}
    for grp in gs.prunable():
        block = grp.size // grp.divisor
        perms[grp.id] = torch.cat([torch.randperm(block, generator=g) + i * block for i in range(grp.divisor)])
    return perms


@pytest.mark.parametrize("name", sorted(CASES))
def test_permute_reorders_channels_without_changing_the_function(name: str) -> None:
    case = CASES[name]()
    gs = graph.analyze(case.model, case.x)
    perms = _block_perms(gs, 0)
    before = importance.group_scores(case.model, gs, list(perms), "l2")
    permuted = pruning.permute(case.model, gs, perms)
    assert _max_diff(run(permuted, case.x), run(case.model, case.x)) <= 1e-4
    after = importance.group_scores(permuted, gs, list(perms), "l2")
    for gid, p in perms.items():  # new channel i is old channel p[i]
        assert torch.allclose(after[gid], before[gid][p], rtol=1e-5, atol=1e-6), gid
    # the permuted model prunes like the original: keeping the same (renumbered) channels gives the same net
    widths = half_widths(gs)
    p0 = pruning.plan(case.model, gs, widths)
    inverse = {gid: torch.argsort(p) for gid, p in perms.items()}
    keep = {gid: tuple(sorted(int(inverse[gid][k]) for k in kept)) for gid, kept in p0.keep.items()}
    p1 = pruning.PruningPlan(widths=p0.widths, keep=keep, groups=gs)
    small0, small1 = pruning.apply(case.model, gs, p0), pruning.apply(permuted, gs, p1)
    assert _max_diff(run(small1, case.x), run(small0, case.x)) <= 1e-4


def test_permute_rejects_bad_orders() -> None:
    from engine_cases import GroupedChain

    model = randomize(GroupedChain())
    gs = graph.analyze(model, torch.randn(1, 3, 8, 8))
    grouped = next(g for g in gs.prunable() if g.divisor > 1)
    with pytest.raises(ConfigError, match="not a prunable group"):
        pruning.permute(model, gs, {"nope": [0]})
    with pytest.raises(ConfigError, match="not a permutation"):
        pruning.permute(model, gs, {grouped.id: [0] * grouped.size})
    across = torch.arange(grouped.size).roll(1)  # channel 0 moves into the last block
    with pytest.raises(ConfigError, match=r"between the \d+ blocks"):
        pruning.permute(model, gs, {grouped.id: across})


def test_least_squares_reconstruction_reduces_consumer_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 12), nn.ReLU(), nn.Linear(12, 5)).eval()
    calib = [(torch.randn(16, 3, 8, 8), torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    held = torch.randn(32, 3, 8, 8)
    gs = graph.analyze(model, held[:1])
    widths = {"0:out": 6, "5:out": 5}
    plain = pruning.apply(model, gs, widths)
    rec = pruning.apply(model, gs, widths, reconstruct=True, loader=calib, calib_batches=4, points_per_sample=20)

    def consumer_error(m: nn.Module, name: str, x: torch.Tensor) -> float:
        dense_out, out = {}, {}
        h1 = model.get_submodule(name).register_forward_hook(lambda _m, _i, o: dense_out.setdefault("y", o))
        h2 = m.get_submodule(name).register_forward_hook(lambda _m, _i, o: out.setdefault("y", o))
        with torch.no_grad():
            model(x)
            m(x)
        h1.remove()
        h2.remove()
        return float((dense_out["y"] - out["y"]).pow(2).mean())

    for name in ("2", "7"):  # conv (3×3, via unfolded columns) and linear consumers
        for x in (calib[0][0], held):
            assert consumer_error(rec, name, x) < 0.8 * consumer_error(plain, name, x)
    with pytest.raises(ConfigError, match="calibration loader"):
        pruning.apply(model, gs, widths, reconstruct=True)


def test_save_and_load_round_trip(tmp_path: object) -> None:
    pytest.importorskip("autoprune.serialize")
    for name in ("resnet_identity_b", "concat", "mobilenet", "pool_heads", "c2f_chunk_list"):
        c = CASES[name]()
        gs = graph.analyze(c.model, c.x)
        pruned = pruning.apply(c.model, gs, _random_widths(gs, 2))
        out_dir = tmp_path / name  # type: ignore[operator]
        pruning.save_pruned(pruned, out_dir, c.x, metadata={"note": name})
        loaded = pruning.load_pruned(out_dir)
        assert _max_diff(run(loaded, c.x), run(pruned, c.x)) == 0.0
        from autoprune import serialize

        meta = serialize.read_metadata(out_dir)["metadata"]
        prov = meta["pruning"]["groups"]
        assert meta["note"] == name
        assert prov == pruned.meta[pruning.META_KEY]["groups"]
        assert all(len(v["kept"]) == v["width"] <= v["size"] for v in prov.values())
        assert {k for k, v in prov.items() if v["width"] < v["size"]}
    with pytest.raises(AutoPruneError, match="no saved model"):
        pruning.load_pruned(tmp_path / "missing")  # type: ignore[operator]


# ----------------------------------------------------------------------------------------------------------------
# Zoo
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def _zoo(name: str) -> tuple[nn.Module, torch.Tensor, graph.GroupSet]:
    from autoprune.models import build_model

    kw = {"in_channels": 1} if name == "small_cnn" else {}
    model = randomize(build_model(name, **kw), seed=3).double()
    x = (torch.rand(1, 1, 8, 8) if name == "small_cnn" else torch.rand(1, 3, 32, 32)).double()
    return model, x, graph.analyze(model, x)


def _zoo_names() -> list[str]:
    try:
        from autoprune.models import MODELS
    except ImportError:
        return []
    return MODELS.names()


# Same structure as a smaller sibling in the default run (resnet20/56, vgg11_bn): only in the slow run.
_LARGE = ("resnet32", "resnet32_b", "resnet44", "resnet44_b", "resnet110", "resnet110_b", "vgg16_bn", "vgg19_bn")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _LARGE else n
                                  for n in _zoo_names()])
def test_zoo_half_width(name: str, tmp_path: object) -> None:
    model, x, gs = _zoo(name)
    w = half_widths(gs)
    pruned = _check(model, x, gs, w, tol=1e-9)
    predicted = cost.closed_form(gs, w).macs / cost.closed_form(gs).macs
    measured = cost.count_macs(pruned, x) / cost.count_macs(model, x)
    assert predicted == pytest.approx(measured, rel=1e-12)
    if name in ("resnet20", "mobilenetv2", "vgg11_bn"):
        pruning.save_pruned(pruned, tmp_path, x)
        assert _max_diff(run(pruning.load_pruned(tmp_path), x), run(pruned, x)) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Grouped convolutions (ENGINE.md §2.4, §9 case 7)
# ----------------------------------------------------------------------------------------------------------------

GROUPED = ("grouped_conv", "grouped_chain", "grouped_resnext", "grouped_eq_out", "grouped_mix")


@pytest.mark.parametrize("name", GROUPED)
def test_grouped_every_legal_width_combination_sample(name: str, tmp_path: object) -> None:
    """E, S, C on several random legal candidates, hyper-parameters consistent, and the R round trip."""
    c = CASES[name]()
    gs = graph.analyze(c.model, c.x)
    assert any(g.divisor > 1 for g in gs.prunable())
    for seed in range(4):
        pruned = _check(c.model, c.x, gs, _random_widths(gs, 10 + seed), importance="l1")
        for mod_name, mod in pruned.named_modules():
            if isinstance(mod, nn.Conv2d):
                orig = c.model.get_submodule(mod_name)
                # grouped convs keep groups; depthwise and depth-multiplier convs (groups == in) follow their input
                assert mod.groups == (mod.in_channels if orig.groups == orig.in_channels > 1 else orig.groups)
                assert mod.in_channels % mod.groups == 0 and mod.out_channels % mod.groups == 0
                assert tuple(mod.weight.shape[:2]) == (mod.out_channels, mod.in_channels // mod.groups)
    pytest.importorskip("autoprune.serialize")
    pruning.save_pruned(pruned, tmp_path, c.x)  # type: ignore[arg-type]
    loaded = pruning.load_pruned(tmp_path)  # type: ignore[arg-type]
    assert _max_diff(run(loaded, c.x), run(pruned, c.x)) == 0.0
    convs = {n: m for n, m in loaded.named_modules() if isinstance(m, nn.Conv2d)}
    assert {n: m.groups for n, m in convs.items()} == {n: m.groups for n, m in pruned.named_modules() if n in convs}


def test_grouped_selection_is_per_block() -> None:
    c = CASES["grouped_chain"]()  # c1:out (8 channels, 4 blocks of 2) feeds g (groups=4)
    gs = graph.analyze(c.model, c.x)
    assert pruning.plan(c.model, gs, {"c1:out": 4}, importance="prefix").keep["c1:out"] == (0, 2, 4, 6)
    with torch.no_grad():
        c.model.c1.weight.mul_(0.01)
        c.model.c1.weight[[0, 1, 2, 3]] *= 1000.0  # globally, the four best channels are blocks 0 and 1
    keep = pruning.plan(c.model, gs, {"c1:out": 4}, importance="l2").keep["c1:out"]
    assert [k // 2 for k in keep] == [0, 1, 2, 3]  # one channel from each block
    scores = torch.tensor([5.0, 1.0, 0.0, 2.0, 3.0, 4.0])
    assert importance.select(scores, 3, blocks=3) == (0, 3, 5)
    assert importance.select(scores, 2) == (0, 5)
    with pytest.raises(ConfigError, match="equally in 3 blocks"):
        importance.select(scores, 4, blocks=3)


def test_grouped_widths_not_divisible_are_rejected() -> None:
    c = CASES["grouped_chain"]()
    gs = graph.analyze(c.model, c.x)
    assert pruning.legal_widths(gs["g:out"]) == [4, 8, 12]
    assert pruning.legal_widths(gs["g:out"], round_to=8) == [8, 12]  # lcm(8, 4)
    for bad in ({"g:out": 6}, {"c1:out": 3}):
        with pytest.raises(ConfigError, match=r"not a multiple of 4: a grouped conv needs the same number"):
            pruning.apply(c.model, gs, bad)
        with pytest.raises(ConfigError, match="legal widths: 4, 8"):
            cost.closed_form(gs, bad)
    assert pruning.widths_from_ratios(gs, {"g:out": 0.4}) == {"g:out": 4}  # ratios snap to multiples
    assert pruning.apply(c.model, gs, {"g:out": 8}).get_submodule("g").out_channels == 8


def test_grouped_plan_with_uneven_blocks_is_refused() -> None:
    c = CASES["grouped_chain"]()
    gs = graph.analyze(c.model, c.x)
    full = gs.full_widths()
    keep = {gid: tuple(range(w)) for gid, w in full.items()}
    keep["c1:out"] = (0, 1, 2, 3)  # blocks 0 and 1 whole, blocks 2 and 3 empty
    bad = pruning.PruningPlan(widths={**full, "c1:out": 4}, keep=keep, groups=gs)
    with pytest.raises(ConfigError, match=r"spread unevenly over its 4 blocks .* \[2, 2, 0, 0\]"):
        pruning.apply(c.model, bad)


def test_grouped_importance_rows_follow_the_conv_blocks() -> None:
    c = CASES["grouped_chain"]()
    gs = graph.analyze(c.model, c.x)
    (sl,) = [s for s in gs["c1:out"].slices if s.module == "g"]
    w = c.model.g.weight  # [12, 2, 3, 3]: block i = rows 3i..3i+2, input channels 2i, 2i+1
    rows = importance.channel_rows(w, sl, 8)
    assert rows.shape == (8, 3 * 9)
    assert torch.equal(rows[5], w[6:9, 1].reshape(-1))  # input channel 5 = block 2, local column 1
    p = pruning.plan(c.model, gs, {"c1:out": 4, "g:out": 8})
    assert _max_diff(run(pruning.mask(c.model, p), c.x), run(pruning.apply(c.model, p), c.x)) < 1e-5
