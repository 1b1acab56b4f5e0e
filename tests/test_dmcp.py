"""DMCP: Markov chains, expected cost, budget loss, supernet masking, legalisation and the searcher."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn

from autoprune.agents import dmcp
from autoprune.agents.dmcp import DMCPConfig, MarkovChain, budget_loss, legalize
from autoprune.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# Markov chains (no engine needed)
# ----------------------------------------------------------------------------------------------------------


def test_chain_reproduces_reference_grid() -> None:
    chain = MarkovChain.build("g", 64)
    assert chain.states == (10, 16, 22, 28, 34, 40, 46, 52, 58, 64)  # g = 6, K = 9, c_min = 10 (§5.1)
    assert chain.num_blocks == 9
    small = MarkovChain.build("g", 16)
    assert small.states == tuple(range(7, 17))  # g = 1


def test_chain_respects_legal_widths() -> None:
    legal = (8, 16, 24, 32, 40, 48, 56, 64)
    chain = MarkovChain.build("g", 64, legal)
    assert set(chain.states) <= set(legal) and chain.states[-1] == 64
    assert list(chain.states) == sorted(set(chain.states))
    # a minimum width above c_min raises the first state
    floor = MarkovChain.build("g", 64, range(20, 65))
    assert floor.states[0] == 20 and floor.states[-1] == 64
    with pytest.raises(ConfigError):
        MarkovChain.build("g", 64, grid=(0.0, 1.0, 0.1))


def test_chain_over_conv_blocks_keeps_the_same_prefix_of_every_block() -> None:
    """A grouped-conv group (divisor 4, blocks of 12): widths are multiples of 4, masks cut every block alike."""
    chain = MarkovChain.build("g", 48, range(1, 49), conv_blocks=4)
    assert chain.conv_blocks == 4 and all(s % 4 == 0 for s in chain.states) and chain.states[-1] == 48
    assert chain.states == tuple(range(12, 49, 4))  # g = 4: the reference grid 48 − (9 − k)·4
    # g = 2 gives 6, 8, …, 24; odd multiples of 2 snap to multiples of 4 (ties upwards) and merge
    assert MarkovChain.build("g", 24, conv_blocks=4).states == (8, 12, 16, 20, 24)
    mask = chain.hard_mask(20).reshape(4, 12)
    assert torch.equal(mask, torch.tensor([[1.0] * 5 + [0.0] * 7] * 4))
    alpha = torch.randn(chain.num_blocks)
    soft = chain.soft_mask(alpha).reshape(4, 12)
    assert torch.equal(soft, soft[:1].expand(4, 12))  # the same keep probabilities in every conv block
    m, _ = chain.moments(alpha)
    assert float(soft.sum()) == pytest.approx(float(m), rel=1e-5)  # Σ_c P(c kept) = E[width]
    for w in chain.states[1:]:  # P(width > w − 1) is the marginal of the block that width w completes
        k = chain.states.index(w)
        assert chain.keep_probability(alpha, w - 1) == pytest.approx(float(chain.marginals(alpha)[k - 1]))
    rng = random.Random(0)
    assert {chain.sample(alpha, rng) for _ in range(200)} <= set(chain.states)
    with pytest.raises(ConfigError, match="equal conv blocks"):
        MarkovChain.build("g", 10, conv_blocks=4)


def _enumerate(chain: MarkovChain, alpha: torch.Tensor) -> list[float]:
    p = torch.sigmoid(alpha.double()).tolist()
    probs = []
    for k in range(chain.num_blocks + 1):
        kept = math.prod(p[:k])
        stop = 1.0 - p[k] if k < len(p) else 1.0
        probs.append(kept * stop)
    return probs


def test_moments_and_soft_mask_match_enumeration() -> None:
    chain = MarkovChain.build("g", 40)
    alpha = torch.randn(chain.num_blocks)
    probs = _enumerate(chain, alpha)
    assert sum(probs) == pytest.approx(1.0)
    mean = sum(p * s for p, s in zip(probs, chain.states))
    second = sum(p * s * s for p, s in zip(probs, chain.states))
    m, s = chain.moments(alpha)
    assert float(m) == pytest.approx(mean, rel=1e-5)
    assert float(s) == pytest.approx(second, rel=1e-5)
    mask = chain.soft_mask(alpha)
    assert mask.shape == (40,)
    assert float(mask.sum()) == pytest.approx(mean, rel=1e-5)  # Σ_c P(c kept) = E[width]
    assert torch.all(mask[: chain.states[0]] == 1) and torch.all(mask[1:] <= mask[:-1] + 1e-7)


def test_direct_sampling_is_legal_and_follows_the_chain() -> None:
    legal = tuple(range(4, 33, 4))
    chain = MarkovChain.build("g", 32, legal)
    alpha = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 3.0, -2.0][: chain.num_blocks])
    rng = random.Random(0)
    draws = [chain.sample(alpha, rng) for _ in range(4000)]
    assert set(draws) <= set(chain.states) <= set(legal)
    probs = _enumerate(chain, alpha)
    for k, s in enumerate(chain.states):
        assert draws.count(s) / len(draws) == pytest.approx(probs[k], abs=0.03)
    assert {chain.uniform(rng) for _ in range(500)} == set(chain.states)


# ----------------------------------------------------------------------------------------------------------
# Budget loss (§5.2)
# ----------------------------------------------------------------------------------------------------------


def _loss_and_grad(e: float, t: float) -> tuple[float, float]:
    x = torch.tensor(e, dtype=torch.float64, requires_grad=True)
    loss = budget_loss(x, t)
    loss.backward()
    return float(loss.detach()), float(x.grad)


def test_budget_loss_piecewise() -> None:
    t = 100.0
    loss, grad = _loss_and_grad(50.0, t)  # below 0.95T: log|E - T|, pushes E up
    assert loss == pytest.approx(math.log(50.0)) and grad < 0
    for e in (95.0, 97.0, 99.99):  # dead zone [0.95T, T)
        loss, grad = _loss_and_grad(e, t)
        assert loss == 0.0 and grad == 0.0
    loss, grad = _loss_and_grad(100.0, t)  # at T: log|E - 0.95T|
    assert loss == pytest.approx(math.log(5.0)) and grad > 0
    loss, grad = _loss_and_grad(150.0, t)
    assert loss == pytest.approx(math.log(55.0)) and grad == pytest.approx(1 / 55.0)


def test_budget_loss_far_branch_scales_by_r() -> None:
    t = 1000.0
    loss, _ = _loss_and_grad(1500.0, t)  # |E - T| = 500 > 200 -> r = 0.1
    assert loss == pytest.approx(math.log(0.1 * 550.0))
    loss, _ = _loss_and_grad(500.0, t)
    assert loss == pytest.approx(math.log(0.1 * 500.0))
    loss, _ = _loss_and_grad(1150.0, t)  # |E - T| = 150 <= 200 -> r = 1
    assert loss == pytest.approx(math.log(200.0))
    loss, _ = _loss_and_grad(1500.0, t)
    assert budget_loss(torch.tensor(1500.0), t, far=1e9).item() == pytest.approx(math.log(550.0))


# ----------------------------------------------------------------------------------------------------------
# Expected MACs (engine cost model)
# ----------------------------------------------------------------------------------------------------------


class SelfLoopNet(nn.Module):
    """A residual conv whose input and output channels are the same group (a κ_ii·w² MAC term)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def selfloop() -> tuple[nn.Module, object]:
    from autoprune import graph

    torch.manual_seed(0)
    model = SelfLoopNet().eval()
    return model, graph.analyze(model, torch.randn(1, 3, 4, 4))


def test_expected_macs_at_one_hot_probabilities_is_the_closed_form(selfloop) -> None:
    from autoprune import cost

    _, gs = selfloop
    chains = dmcp.make_chains(gs, dmcp.legal_widths_of(None, gs), (0.25, 1.0, 0.25))
    assert {c.group_id for c in chains} == {"conv1:out", "conv3:out"}
    rng = random.Random(0)
    for _ in range(5):
        # α = ±40: every transition is (numerically) certain, so the chain sits on one state
        stops = [rng.randint(0, c.num_blocks) for c in chains]
        alphas = [torch.tensor([40.0 if k < stop else -40.0 for k in range(c.num_blocks)])
                  for c, stop in zip(chains, stops)]
        widths = {c.group_id: c.states[stop] for c, stop in zip(chains, stops)}
        got = float(dmcp.expected_macs(gs, chains, alphas))
        assert got == pytest.approx(cost.closed_form(gs, widths).macs, rel=1e-9)


def test_expected_macs_is_the_exact_expectation(selfloop) -> None:
    from autoprune import cost

    _, gs = selfloop
    chains = dmcp.make_chains(gs, dmcp.legal_widths_of(None, gs), (0.25, 1.0, 0.25))
    alphas = [torch.randn(c.num_blocks, requires_grad=True) for c in chains]
    dists = [_enumerate(c, a.detach()) for c, a in zip(chains, alphas)]
    exact = 0.0
    for combo in itertools.product(*(range(c.num_blocks + 1) for c in chains)):
        p = math.prod(d[k] for d, k in zip(dists, combo))
        exact += p * cost.closed_form(gs, {c.group_id: c.states[k] for c, k in zip(chains, combo)}).macs
    got = dmcp.expected_macs(gs, chains, alphas)
    assert float(got.detach()) == pytest.approx(exact, rel=1e-9)
    # E[w]² instead of E[w²] on the self-loop term would be wrong: the test can tell the difference
    naive = cost.expected_cost(gs, {c.group_id: c.moments(a.detach().double())[0] for c, a in zip(chains, alphas)})
    assert abs(float(naive) - exact) > 1e-6 * exact
    got.backward()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in alphas)


# ----------------------------------------------------------------------------------------------------------
# Legalisation (§5.5.5)
# ----------------------------------------------------------------------------------------------------------


def _poly(w: dict[str, int]) -> float:
    a, b, c = w["a"], w["b"], w["c"]
    return 7.0 + 3 * a + 5 * c + 2 * a * b + 9 * b * c + 4 * b * b + 0.5 * a * a


def test_legalize_snaps_and_meets_the_target() -> None:
    sizes = {"a": 16, "b": 32, "c": 8}
    legal = {g: tuple(range(2, s + 1, 2)) for g, s in sizes.items()}
    dense = _poly(sizes)
    for frac in (0.3, 0.5, 0.8):
        target = frac * dense
        widths = legalize({"a": 9.7, "b": 30.2, "c": 7.9}, legal, _poly, target, tolerance=0.05)
        assert all(widths[g] in legal[g] for g in sizes)
        assert (1 - 0.05) * target <= _poly(widths) <= target
    with pytest.raises(ConfigError, match="below the smallest"):
        legalize({"a": 8, "b": 8, "c": 8}, legal, _poly, 1.0)


def test_legalize_steps_down_the_least_likely_channels_first() -> None:
    sizes = {"a": 16, "b": 32, "c": 8}
    legal = {g: tuple(range(1, s + 1)) for g, s in sizes.items()}
    full = {g: float(s) for g, s in sizes.items()}
    target = _poly({"a": 16, "b": 32, "c": 7}) + 0.5  # one channel must go: removing it from c is enough
    unsure_c = legalize(full, legal, _poly, target, keep_prob=lambda g, ch: 0.1 if g == "c" else 0.9,
                        tolerance=0.5)
    assert unsure_c == {"a": 16, "b": 32, "c": 7}
    unsure_b = legalize(full, legal, _poly, target, keep_prob=lambda g, ch: 0.1 if g == "b" else 0.9,
                        tolerance=0.5)
    assert unsure_b["b"] < 32 and unsure_b["a"] == 16 and unsure_b["c"] == 8


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        DMCPConfig.from_mapping({"iterz": 3})
    with pytest.raises(ConfigError):
        DMCPConfig(macs_target=0.0)
    cfg = DMCPConfig.from_mapping({"grid": [0.2, 1.0, 0.2], "iters": 10})
    assert cfg.grid == (0.2, 1.0, 0.2)


def test_channel_dim() -> None:
    assert dmcp.channel_dim(nn.Linear(3, 4), torch.zeros(2, 4)) == 1
    assert dmcp.channel_dim(nn.Linear(3, 4), torch.zeros(2, 5, 4)) == 2
    assert dmcp.channel_dim(nn.BatchNorm2d(4), torch.zeros(2, 4, 3, 3)) == 1


# ----------------------------------------------------------------------------------------------------------
# Supernet masking (engine equivalence)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models gain nothing from threads, and on a shared 2-core machine two threads thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


#: Engine test models with grouped convolutions (groups with a divisor: chains over conv blocks).
GROUPED = ["grouped_chain", "grouped_resnext", "grouped_mix", "grouped_conv"]


def _model(name: str, selfloop) -> tuple[nn.Module, object, torch.Tensor]:
    """A model with random BN statistics, its analysis and an input batch."""
    from engine_cases import CASES

    from autoprune import graph
    from autoprune.models import build_model

    if name == "selfloop":
        (model, gs), size = selfloop, 4
    elif name in GROUPED:
        model, size = CASES[name]().model, 8
        gs = graph.analyze(model, torch.randn(1, 3, size, size))
    else:
        torch.manual_seed(0)
        model, size = build_model(name), 16
        gs = graph.analyze(model, torch.randn(1, 3, size, size))
    return _random_bn(model), gs, torch.rand(2, 3, size, size)


@pytest.mark.parametrize("name", ["selfloop", "resnet20", "resnet20_b", "mobilenetv2", *GROUPED])
def test_masked_supernet_equals_prefix_pruning(name: str, selfloop) -> None:
    from autoprune import pruning

    model, gs, x = _model(name, selfloop)
    legal = dmcp.legal_widths_of(None, gs)
    chains = dmcp.make_chains(gs, legal)
    assert {c.group_id for c in chains} == {g.id for g in gs.prunable() if len(legal[g.id]) > 1}
    assert all(c.conv_blocks == gs[c.group_id].divisor for c in chains)
    assert (name in GROUPED) == any(c.conv_blocks > 1 for c in chains)
    net = dmcp.MaskedSupernet(model, gs, chains).eval()
    rng = random.Random(0)
    for _ in range(2):
        widths = net.markov_widths(rng) if _ else net.uniform_widths(rng)
        net.use_widths(widths)
        with torch.no_grad():
            masked = net(x)
            small = pruning.apply(net.export_model(), gs, widths, importance="prefix")
            assert float((masked - small(x)).abs().max()) <= 1e-5
    # the architecture forward at one-hot probabilities is the same sub-network
    stops = [rng.randint(0, c.num_blocks) for c in chains]
    with torch.no_grad():
        for c, a, stop in zip(chains, net.alphas, stops):
            a.copy_(torch.tensor([40.0 if k < stop else -40.0 for k in range(c.num_blocks)]))
        net.use_alpha()
        soft = net(x)
        net.use_widths({c.group_id: c.states[s] for c, s in zip(chains, stops)})
        hard = net(x)
        net.use_max()
        full = net(x)
        dense = model(x)
    assert float((soft - hard).abs().max()) <= 1e-5
    assert float((full - dense).abs().max()) <= 1e-6  # max width is the dense model


@pytest.mark.parametrize("name", ["selfloop", "mobilenetv2", "grouped_chain", "grouped_resnext"])
def test_sort_channels_preserves_the_function_and_orders_importance(name: str, selfloop) -> None:
    from autoprune.importance import group_scores

    model, gs, x = _model(name, selfloop)
    ids = [g.id for g in gs.prunable()]
    before = group_scores(model, gs, ids, "l1")
    assert any(not torch.all(s[1:] <= s[:-1]) for s in before.values())  # not sorted to begin with
    ordered = dmcp.sort_channels(model, gs, ids, "l1").eval()
    with torch.no_grad():
        assert float((ordered(x) - model(x)).abs().max()) <= 1e-5
    after = group_scores(ordered, gs, ids, "l1")
    for gid in ids:
        d = gs[gid].divisor  # grouped-conv groups are sorted within each conv block
        a, b = after[gid].reshape(d, -1), before[gid].reshape(d, -1)
        assert torch.all(a[:, 1:] <= a[:, :-1] * (1 + 1e-5))  # float32 noise of the re-scoring
        assert torch.allclose(a.sort(dim=1).values, b.sort(dim=1).values, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Search and searcher
# ----------------------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 20, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(20)
        self.conv2 = nn.Conv2d(20, 20, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(20)
        self.fc = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _data(n: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def test_search_moves_the_expected_cost_to_the_target_and_meets_it() -> None:
    from autoprune import cost, graph

    torch.manual_seed(0)
    model = TinyNet()
    gs = graph.analyze(model, torch.randn(1, 3, 8, 8))
    legal = {g.id: tuple(range(4, g.size + 1, 2)) for g in gs.prunable()}
    cfg = DMCPConfig(macs_target=0.5, iters=24, warmup_fraction=0.25, arch_lr=2.0, arch_lr_min=2.0,
                     budget_weight=1.0, bn_batches=2, log_every=1)
    res = dmcp.search(model, gs, _data(), cfg, legal=legal, val_loader=_data(2, 1))
    target = 0.5 * res.dense_cost.macs
    assert res.target_macs == target
    widths = dict(res.candidate.widths)
    assert res.cost.macs <= target and all(w in legal[g] for g, w in widths.items())
    if res.cost.macs < (1 - cfg.tolerance) * target:  # short of the tolerance only if no legal step up fits
        for g, w in widths.items():
            if w < legal[g][-1]:
                assert cost.closed_form(gs, {**widths, g: w + 2}).macs > target
    arch = [h for h in res.history if "expected_macs" in h]
    assert len(arch) == 18 and all(h["iter"] >= 6 for h in arch)
    # σ(0) = 0.5 starts the chains near c_min (below the target): the budget loss pushes E[MACs] up
    assert arch[0]["expected_macs"] < 0.95 * target
    assert abs(arch[-1]["expected_macs"] - target) < abs(arch[0]["expected_macs"] - target)
    assert res.module(torch.rand(2, 3, 8, 8)).shape == (2, 4)
    assert cost.closed_form(gs, dict(res.candidate.widths)).macs == res.cost.macs
    assert res.accuracy is not None and res.samples > 0


@pytest.mark.parametrize("method", ["dmcp", "resrep"])
def test_differentiable_search_prunes_grouped_convolutions(method: str) -> None:
    """DMCP and ResRep (trained weights) on a ResNeXt-style model: the groups of its grouped 3×3 convs are
    searched too, and the result is a legal, exact network under the target."""
    from engine_cases import CASES

    from autoprune import cost, graph
    from autoprune.agents import resrep

    model = CASES["grouped_resnext"]().model.train()
    gs = graph.analyze(model, torch.randn(1, 3, 8, 8))
    blocked = {g.id: g.divisor for g in gs.prunable() if g.divisor > 1}
    assert blocked
    data = [(x, y * 2) for x, y in _data()]  # 10 classes
    target = 0.5 if method == "dmcp" else 0.8  # ResRep's sites (the reduce convs) alone reach 0.69 at most
    if method == "dmcp":
        res = dmcp.search(model, gs, data, DMCPConfig(macs_target=target, iters=12, warmup_fraction=0.25,
                                                      arch_lr=2.0, budget_weight=1.0, bn_batches=2))
    else:
        res = resrep.search(model, gs, data, resrep.ResRepConfig(macs_target=target, iters=12, warmup_iters=2,
                                                                 mask_interval=2, bn_batches=2, weights="trained"))
        assert set(res.sites) & set(blocked)  # compactors over conv blocks
    widths = dict(res.candidate.widths)
    assert all(widths.get(gid, gs[gid].size) % d == 0 for gid, d in blocked.items())
    assert any(widths.get(gid, gs[gid].size) < gs[gid].size for gid in blocked)  # grouped groups are pruned
    assert res.cost.macs <= target * res.dense_cost.macs
    assert cost.closed_form(gs, widths).params == sum(p.numel() for p in res.module.parameters())
    assert res.module(torch.rand(2, 3, 8, 8)).shape == (2, 10)


def _problem(model: nn.Module, gs, train, val):
    from autoprune import pruning
    from autoprune.evaluate import AdaptiveBNEvaluator
    from autoprune.problem import GroupChoice, Problem, SearchSpace

    space = SearchSpace(groups=tuple(GroupChoice(g.id, g.size, tuple(pruning.legal_widths(g)))
                                     for g in gs.prunable()), min_ratio=0.2)
    evaluator = AdaptiveBNEvaluator(train, val, batches=2, device="cpu")
    return Problem(model, gs, space, evaluator, torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("name", ["dmcp", "resrep"])
def test_searcher_records_one_trial_with_weights(name: str, tmp_path) -> None:
    from autoprune import graph, serialize
    from autoprune.agents import resrep  # noqa: F401 - registers `resrep`
    from autoprune.agents.base import SEARCHERS
    from autoprune.store import TrialStore

    torch.manual_seed(0)
    model = TinyNet()
    gs = graph.analyze(model, torch.randn(1, 3, 8, 8))
    problem = _problem(model, gs, _data(), _data(2, 1))
    store = TrialStore(tmp_path / "trials.db", campaign="t")
    options = ({"iters": 8, "bn_batches": 2} if name == "dmcp"
               else {"iters": 30, "warmup_iters": 2, "mask_interval": 2, "step_cap": 6})
    searcher = SEARCHERS.get(name)(problem, store=store, budget={"macs": 0.6}, n_trials=1, **options)
    assert searcher.config.macs_target == 0.6 and searcher.config.iters == options["iters"]
    result = searcher.run()
    assert len(result.trials) == 1 and result.best is not None
    rec = result.best
    assert rec.state == "complete" and rec.searcher == name
    assert rec.cost.macs <= 0.6 * problem.dense_cost.macs
    problem.space.validate(rec.candidate)
    # the CPU presets: DMCP keeps its trained weights, ResRep cuts its widths from the dense model
    assert rec.result.evaluator == {"dmcp": "dmcp:own_weights", "resrep": "resrep:dense_weights"}[name]
    assert rec.result.accuracy == pytest.approx(searcher.outcome.accuracy)
    attrs = store.study(name, 0).trials[0].user_attrs
    loaded = serialize.load_module(attrs["artifact"])
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), searcher.outcome.module.eval()(x), atol=1e-6)
    # resuming the same study does not train again
    again = SEARCHERS.get(name)(problem, store=store, budget={"macs": 0.6}, n_trials=1, **options).run()
    assert len(again.trials) == 1


def test_legal_widths_respect_round_to(tmp_path, monkeypatch) -> None:
    from autoprune import graph
    from autoprune.agents.base import SEARCHERS
    from autoprune.evaluate import AdaptiveBNEvaluator
    from autoprune.problem import Problem
    from autoprune.search_spaces import build_space

    model = TinyNet()
    gs = graph.analyze(model, torch.randn(1, 3, 8, 8))
    engine = {g.id: tuple(g.legal_widths(8)) for g in gs.prunable()}
    assert engine == {"conv1:out": (8, 16, 20), "conv2:out": (8, 16, 20)}
    # without a search space: the groups' own legal widths (every width for round_to=1)
    assert dmcp.legal_widths_of(None, gs, round_to=8) == engine
    assert dmcp.legal_widths_of(None, gs) == {g.id: tuple(range(1, g.size + 1)) for g in gs.prunable()}
    # with a space built for round_to=8 (as a campaign builds it): its widths, the same multiples
    space = build_space(gs, round_to=8, min_ratio=0.2)
    assert dmcp.legal_widths_of(space, gs) == engine
    chains = dmcp.make_chains(gs, engine)
    assert chains and all(set(c.states) <= set(engine[c.group_id]) for c in chains)
    # the searcher hands search() the problem's widths: from its space, or for its round_to without one
    seen = []

    def fake_search(*args, legal, **kwargs):
        seen.append(legal)
        raise RuntimeError("stop")

    monkeypatch.setattr(dmcp, "search", fake_search)
    evaluator = AdaptiveBNEvaluator(_data(2), _data(1, 1), batches=1, device="cpu")
    for sp in (space, build_space(gs, prune=False, quantize=True)):  # the second one has no groups
        problem = Problem(model, gs, sp, evaluator, torch.randn(1, 3, 8, 8), round_to=8)
        searcher = SEARCHERS.get("dmcp")(problem, store=tmp_path / "a.db", n_trials=1)
        with pytest.raises(RuntimeError, match="stop"):
            searcher.train()
    assert seen == [engine, engine]


def test_searcher_options_and_errors(tmp_path) -> None:
    from autoprune import graph
    from autoprune.agents.base import SEARCHERS

    model = TinyNet()
    gs = graph.analyze(model, torch.randn(1, 3, 8, 8))
    problem = _problem(model, gs, _data(2), _data(1, 1))
    cls = SEARCHERS.get("dmcp")
    with pytest.raises(ConfigError, match="unknown setting"):
        cls(problem, store=tmp_path / "a.db", n_trials=1, iterations=3)
    with pytest.raises(ConfigError, match="channel_order"):
        cls(problem, store=tmp_path / "a.db", n_trials=1, channel_order="size")
    with pytest.raises(ConfigError, match="unknown preset"):
        cls(problem, store=tmp_path / "a.db", n_trials=1, preset="fast")
    paper = cls(problem, store=tmp_path / "a.db", n_trials=1, preset="paper")
    assert paper.config.iters == 40 * 2 and paper.config.lr == 0.5  # 40 epochs of a 2-batch loader
    cpu = cls(problem, store=tmp_path / "a.db", n_trials=1)
    assert cpu.config.iters == 300 and cpu.config.macs_target == 0.5  # yaml defaults, no budget given
