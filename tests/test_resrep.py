"""ResRep: compactor sites, gradient resetting, global mask selection, exact conversion and the searcher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune import cost, graph
from autoprune.agents import resrep
from autoprune.agents.dmcp import legal_widths_of
from autoprune.agents.resrep import CompactorNet, ResRepConfig, find_sites, reset_gradients, select_masks
from autoprune.errors import ConfigError
from autoprune.models import build_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models gain nothing from threads, and on a shared 2-core machine two threads thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mobilenet() -> tuple[nn.Module, graph.GroupSet]:
    torch.manual_seed(0)
    model = _randomize_bn(build_model("mobilenetv2"))
    return model, graph.analyze(model, torch.randn(1, 3, 16, 16))

# ----------------------------------------------------------------------------------------------------------
# Gradient resetting
# ----------------------------------------------------------------------------------------------------------


def test_reset_gradients_formula() -> None:
    q = nn.Parameter(torch.randn(4, 4))
    task = torch.randn(4, 4)
    q.grad = task.clone()
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    lam, eps = 1e-2, 1e-8
    reset_gradients([q], [mask], lam, eps)
    norms = q.detach().norm(dim=1, keepdim=True)
    lasso = lam * q.detach() / norms
    kept = mask.bool()
    assert torch.allclose(q.grad[kept], task[kept] + lasso[kept])
    assert torch.allclose(q.grad[~kept], lasso[~kept])  # masked rows: only the lasso term


def test_reset_gradients_with_a_separate_lasso_on_kept_rows() -> None:
    q = nn.Parameter(torch.randn(4, 4))
    task = torch.randn(4, 4)
    q.grad = task.clone()
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    reset_gradients([q], [mask], 1e-2, 1e-8, lam_kept=1e-4)
    unit = q.detach() / q.detach().norm(dim=1, keepdim=True)
    kept = mask.bool()
    assert torch.allclose(q.grad[kept], task[kept] + 1e-4 * unit[kept])
    assert torch.allclose(q.grad[~kept], 1e-2 * unit[~kept])
    q.grad = task.clone()
    reset_gradients([q], [mask], 1e-2, 1e-8, lam_kept=0.0)  # kept rows: the task gradient alone
    assert torch.equal(q.grad[kept], task[kept])


def test_reset_gradients_is_nan_safe() -> None:
    q = nn.Parameter(torch.eye(3))
    with torch.no_grad():
        q[1].zero_()
    grad = torch.randn(3, 3)
    grad[2, 0] = float("nan")  # a non-finite task gradient in a masked row is dropped
    q.grad = grad
    reset_gradients([q], [torch.tensor([1.0, 1.0, 0.0])], 1e-4, 1e-8)
    assert torch.isfinite(q.grad).all()
    assert torch.allclose(q.grad[1], grad[1])  # zero row: lasso term 0, not NaN
    unused = nn.Parameter(torch.eye(2))  # no task gradient at all (e.g. an unused branch)
    reset_gradients([unused], [torch.tensor([1.0, 0.0])], 0.5)
    assert torch.allclose(unused.grad, 0.5 * torch.eye(2))


# ----------------------------------------------------------------------------------------------------------
# Mask selection
# ----------------------------------------------------------------------------------------------------------


def _linear_cost(widths: dict[str, int]) -> float:
    return 10.0 * widths["a"] + 1.0 * widths["b"] + 100.0


def test_select_masks_meets_the_target_from_the_global_ranking() -> None:
    norms = [torch.linspace(0.1, 1.0, 8), torch.linspace(0.05, 2.0, 16)]
    legal = {"a": tuple(range(1, 9)), "b": tuple(range(1, 17))}
    target = 150.0
    masks = select_masks(norms, ["a", "b"], legal, _linear_cost, target, step_cap=None)
    widths = {"a": int(masks[0].sum()), "b": int(masks[1].sum())}
    assert _linear_cost(widths) <= target
    # the masked rows are a prefix of the global ranking: every masked row is weaker than every kept row
    masked = torch.cat([n[m == 0] for n, m in zip(norms, masks)])
    kept = torch.cat([n[m == 1] for n, m in zip(norms, masks)])
    assert masked.max() <= kept.min()
    # and the walk stopped as soon as the target was met: un-masking the strongest masked row misses it
    strongest = max(((float(n[r]), i) for i, (n, m) in enumerate(zip(norms, masks)) for r in range(len(n))
                     if m[r] == 0))
    back = dict(widths)
    back["ab"[strongest[1]]] += 1
    assert _linear_cost(back) > target


def test_select_masks_step_cap_and_minimum_width() -> None:
    norms = [torch.rand(8), torch.rand(16)]
    legal = {"a": tuple(range(3, 9)), "b": tuple(range(1, 17))}
    current = [torch.ones(8), torch.ones(16)]
    total_masked = 0
    for _ in range(50):
        new = select_masks(norms, ["a", "b"], legal, _linear_cost, 80.0, current=current, step_cap=4)
        masked = sum(int((m == 0).sum()) for m in new)
        assert masked <= total_masked + 4  # at most `step_cap` more rows while the target is missed
        total_masked, current = masked, new
    widths = {"a": int(current[0].sum()), "b": int(current[1].sum())}
    assert widths["a"] >= 3  # never below the group's minimum legal width
    assert widths == {"a": 3, "b": 1}  # the target (80) is unreachable: both groups end at their minimum


def test_automatic_step_cap_makes_the_target_reachable_by_mid_schedule() -> None:
    sizes = {"a": 8, "b": 16}
    legal = {"a": tuple(range(1, 9)), "b": tuple(range(1, 17))}
    # cost 10a + b + 100 <= 120 under one keep ratio r: a = ceil(8r) = 1, b = ceil(16r) = 2, so 7 + 14 rows
    rows = resrep.rows_to_target(sizes, legal, _linear_cost, 120.0)
    assert rows == 21
    assert resrep.rows_to_target(sizes, legal, _linear_cost, 1e9) == 0  # met already: nothing to mask
    assert resrep.rows_to_target(sizes, {"a": (4, 8), "b": (8, 16)}, _linear_cost, 0.0) == 12  # down to minima
    # 600 iterations, 100 warm-up, every 10: 50 updates; half of them must suffice
    cfg = ResRepConfig(step_cap=8)
    assert resrep.effective_step_cap(cfg, 177) == 8  # ResNet-20's need: the CPU default is enough
    assert resrep.effective_step_cap(cfg, 513) == 21  # ResNet-56's: raised (8 x 50 updates < 513 rows)
    assert resrep.effective_step_cap(ResRepConfig(step_cap=8, step_cap_auto=False), 513) == 8
    # with the raised cap the capped updates alone reach the target within half of the updates
    norms = [torch.rand(8), torch.rand(16)]
    current = [torch.ones(8), torch.ones(16)]
    cap = resrep.effective_step_cap(ResRepConfig(iters=10, warmup_iters=0, mask_interval=1, step_cap=1), rows)
    for _ in range(5):
        current = select_masks(norms, ["a", "b"], legal, _linear_cost, 120.0, current=current, step_cap=cap)
    assert _linear_cost({"a": int(current[0].sum()), "b": int(current[1].sum())}) <= 120.0


def test_select_masks_keeps_widths_legal() -> None:
    norms = [torch.rand(32)]
    legal = {"a": (8, 16, 24, 32)}
    for target in (10.0 * 30 + 100, 10.0 * 20 + 100, 10.0 * 9 + 100):
        (mask,) = select_masks(norms, ["a"], legal, lambda w: 10.0 * w["a"] + 100, target, step_cap=None)
        assert int(mask.sum()) in legal["a"]
        assert 10.0 * int(mask.sum()) + 100 <= target


# ----------------------------------------------------------------------------------------------------------
# Sites and exact conversion
# ----------------------------------------------------------------------------------------------------------


class MLPNet(nn.Module):
    """Conv with bias and BN, a conv without norm, flatten into a hidden Linear without norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=True)
        self.fc1 = nn.Linear(6 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
    return model.eval()


def _convert_and_compare(model: nn.Module, size: int) -> tuple[float, CompactorNet, nn.Module, dict[str, int]]:
    gs = graph.analyze(model, torch.randn(1, 3, size, size))
    sites, _ = find_sites(model, gs, legal_widths_of(None, gs))
    net = CompactorNet(model, sites).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for q in net.compactors:
            q.add_(0.05 * torch.randn(q.shape, generator=g))
        masks = []
        for s in sites:
            if s.blocks > 1:  # a grouped conv's group: the same number of random rows in every conv block
                per = s.size // s.blocks
                kept = int(torch.randint(1, per + 1, (1,), generator=g))
                m = torch.cat([(torch.rand(per, generator=g).argsort() < kept).float() for _ in range(s.blocks)])
            else:
                m = (torch.rand(s.size, generator=g) > 0.4).float()
                m[0] = 1.0
            masks.append(m)
        net.set_masks(masks)
        net.zero_masked = True
        x = torch.rand(3, 3, size, size, generator=g)
        ref = net(x)
        small, widths = resrep.convert(net, gs)
        out = small(x)
    assert widths == {s.group_id: int(m.sum()) for s, m in zip(sites, masks)}
    assert sum(p.numel() for p in small.parameters()) == cost.closed_form(gs, widths).params
    assert cost.closed_form(gs, widths).macs < cost.closed_form(gs).macs
    assert float(ref.abs().max()) > 0.1  # a meaningful output scale for the 1e-5 comparison
    return float((ref - out).abs().max()), net, small, widths


@pytest.mark.parametrize("name", ["resnet20", "resnet20_b", "mobilenetv2", "vgg11_bn"])
def test_conversion_is_exact_on_zoo_models(name: str) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(build_model(name))
    diff, _, small, _ = _convert_and_compare(model, 16 if name == "mobilenetv2" else 32)
    assert diff <= 1e-5
    # the result is the engine's standard module: original state-dict names, physically fewer parameters
    assert set(small.state_dict()) == set(model.state_dict())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["grouped_chain", "grouped_resnext", "grouped_conv"])
def test_conversion_is_exact_with_grouped_convolutions(name: str) -> None:
    from engine_cases import CASES

    model = CASES[name]().model
    head = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)][-1]
    with torch.no_grad():  # outputs of order 1, so that the absolute 1e-5 comparison means something
        head.weight.mul_(10.0)
    diff, net, _, _ = _convert_and_compare(model, 8)
    assert any(s.blocks > 1 for s in net.sites)  # a compactor on a group that feeds a grouped conv
    assert diff <= 1e-5


def test_conversion_is_exact_with_biases_and_without_norms() -> None:
    torch.manual_seed(0)
    model = _randomize_bn(MLPNet())
    diff, net, _, _ = _convert_and_compare(model, 4)
    assert {s.producer: s.norm for s in net.sites} == {"conv1": "bn1", "conv2": None, "fc1": None}
    assert diff <= 1e-5


def test_sites_follow_the_engine_groups(mobilenet) -> None:
    model = build_model("resnet20_b")
    gs = graph.analyze(model, torch.randn(1, 3, 32, 32))
    sites, skipped = find_sites(model, gs, legal_widths_of(None, gs))
    assert {s.group_id for s in sites} == {f"layer{i}.{j}.conv1:out" for i in (1, 2, 3) for j in range(3)}
    assert all(s.norm == s.producer.replace("conv1", "bn1") for s in sites)
    assert len(skipped) == 3 and all("producers" in r for r in skipped.values())  # residual stage groups
    mb, gs = mobilenet
    with_dw, _ = find_sites(mb, gs, legal_widths_of(None, gs))
    without_dw, reasons = find_sites(mb, gs, legal_widths_of(None, gs), include_depthwise=False)
    assert len(without_dw) < len(with_dw)
    assert any(s.cuts for s in with_dw) and not any(s.cuts for s in without_dw)
    assert any("depthwise" in r for r in reasons.values())


def test_masked_channels_are_cut_after_depthwise_followers(mobilenet) -> None:
    mb, gs = mobilenet
    sites, _ = find_sites(mb, gs, legal_widths_of(None, gs))
    net = CompactorNet(mb, sites).eval()
    i = next(k for k, s in enumerate(sites) if s.cuts)
    seen = {}
    dw_norm = sites[i].cuts[-1][0]
    dict(net.model.named_modules())[dw_norm].register_forward_hook(lambda m, a, o: seen.setdefault("o", o))
    masks = [torch.ones(s.size) for s in sites]
    masks[i][:5] = 0.0
    net.set_masks(masks)
    with torch.no_grad():
        net(torch.rand(2, 3, 16, 16))
    assert float(seen["o"][:, :5].abs().max()) == 0.0 and float(seen["o"][:, 5:].abs().max()) > 0.0


# ----------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _data(n: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def test_search_meets_the_target_and_returns_the_converted_network() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    gs = graph.analyze(model, torch.randn(1, 3, 8, 8))
    cfg = ResRepConfig(macs_target=0.5, iters=40, warmup_iters=5, mask_interval=2, step_cap=4, bn_batches=2)
    res = resrep.search(model, gs, _data(), cfg, val_loader=_data(2, 1))
    assert res.cost.macs <= 0.5 * res.dense_cost.macs
    assert res.cost.macs == cost.count_macs(res.module, torch.randn(1, 3, 8, 8))
    assert set(res.candidate.widths) == {"conv1:out", "conv2:out"}
    assert res.accuracy is not None and 0.0 <= res.accuracy <= 1.0
    assert res.history and res.history[-1]["masked_macs"] <= 0.5 * res.dense_cost.macs
    assert not res.forced  # the capped updates reached the target within the run
    with pytest.raises(ConfigError, match="unknown setting"):
        ResRepConfig.from_mapping({"lassoo": 1.0})


def test_dense_weights_cut_the_found_widths_from_the_dense_model() -> None:
    """``weights="dense"``: same search, but the output is the dense model pruned to the final widths by magnitude."""
    from autoprune import pruning

    torch.manual_seed(0)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gs = graph.analyze(model, torch.randn(1, 3, 8, 8))
    common = {"macs_target": 0.5, "iters": 30, "warmup_iters": 5, "mask_interval": 2, "step_cap": 4,
              "bn_batches": 0}
    trained = resrep.search(model, gs, _data(), ResRepConfig(**common, weights="trained"))
    dense = resrep.search(model, gs, _data(), ResRepConfig(**common, weights="dense", importance="l1"))
    assert dense.weights == "dense" and trained.weights == "trained"
    assert dense.candidate == trained.candidate  # the search itself is unchanged (same seed)
    expected = pruning.apply(model, gs, dict(dense.candidate.widths), importance="l1")
    got = dense.module.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in expected.state_dict().items())
    assert any(not torch.equal(v, trained.module.state_dict()[k]) for k, v in expected.state_dict().items()
               if v.is_floating_point())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is never modified
    with pytest.raises(ConfigError, match="unknown weights"):
        ResRepConfig(weights="pretrained")
    with pytest.raises(ConfigError, match="lasso_kept"):
        ResRepConfig(lasso_kept=-1.0)


def test_searcher_presets(tmp_path) -> None:
    from autoprune import pruning
    from autoprune.agents.base import SEARCHERS
    from autoprune.evaluate import AdaptiveBNEvaluator
    from autoprune.problem import GroupChoice, Problem, SearchSpace

    model = TinyNet()
    gs = graph.analyze(model, torch.randn(1, 3, 8, 8))
    space = SearchSpace(groups=tuple(GroupChoice(g.id, g.size, tuple(pruning.legal_widths(g)))
                                     for g in gs.prunable()))
    problem = Problem(model, gs, space, AdaptiveBNEvaluator(_data(3), _data(1, 1), batches=1, device="cpu"),
                      torch.randn(1, 3, 8, 8))
    cls = SEARCHERS.get("resrep")
    paper = cls(problem, store=tmp_path / "a.db", n_trials=1, preset="paper", budget={"macs": 0.45})
    cfg = paper.config
    assert (cfg.iters, cfg.warmup_iters) == (480 * 3, 5 * 3)  # epochs of the 3-batch training loader
    assert (cfg.mask_interval, cfg.step_cap, cfg.lasso, cfg.macs_target) == (200, 4, 1e-4, 0.45)
    assert (cfg.lasso_kept, cfg.weights) == (None, "trained")  # the reference: one λ, trained weights
    cpu = cls(problem, store=tmp_path / "a.db", n_trials=1, iters=7)
    assert cpu.config.iters == 7 and cpu.config.macs_target == 0.5
    assert cpu.config.weights == "dense"  # the CPU preset: ResRep as an architecture search (see the yaml)
    with pytest.raises(ConfigError, match="unknown setting"):
        cls(problem, store=tmp_path / "a.db", n_trials=1, lassoo=1.0)


def test_grouped_conv_groups_get_block_compactors_and_dmcp_chains() -> None:
    """Groups pruned per grouped-conv block (divisor > 1): a compactor over the conv blocks where a dense conv
    produces the group, none where the grouped conv itself does (it cannot absorb a full matrix); DMCP chains
    over the conv blocks for both."""
    from engine_cases import GroupedChain

    from autoprune.agents.dmcp import make_chains

    model = GroupedChain().eval()
    gs = graph.analyze(model, torch.randn(1, 3, 8, 8))
    assert (gs["c1:out"].divisor, gs["g:out"].divisor) == (4, 4)
    legal = legal_widths_of(None, gs)
    assert legal["c1:out"] == (4, 8) and legal["g:out"] == (4, 8, 12)  # multiples of the divisor
    sites, skipped = find_sites(model, gs, legal)
    assert {s.group_id: s.blocks for s in sites} == {"c1:out": 4, "c2:out": 1}
    assert "cannot absorb a compactor" in skipped["g:out"]
    assert {c.group_id: c.conv_blocks for c in make_chains(gs, legal)} == {"c1:out": 4, "g:out": 4, "c2:out": 1}


def test_select_masks_drops_rows_equally_from_every_conv_block() -> None:
    """A grouped conv's group (12 rows in 4 blocks of 3) is walked in units of one row per block."""
    g = torch.Generator().manual_seed(0)
    norms = [torch.rand(12, generator=g), torch.rand(6, generator=g) + 0.5]
    legal = {"a": (4, 8, 12), "b": tuple(range(1, 7))}

    def cost_fn(w):
        return 10.0 * w["a"] + w["b"]

    for target in (110.0, 80.0, 45.0):
        ma, mb = select_masks(norms, ["a", "b"], legal, cost_fn, target, blocks=[4, 1], step_cap=None)
        kept = ma.reshape(4, 3).sum(1)
        assert torch.all(kept == kept[0]) and int(ma.sum()) in legal["a"]  # equal per block, legal width
        assert cost_fn({"a": int(ma.sum()), "b": int(mb.sum())}) <= target
        per = norms[0].reshape(4, 3)
        for blk in range(4):  # each block drops its weakest rows
            dropped, left = per[blk][ma.reshape(4, 3)[blk] == 0], per[blk][ma.reshape(4, 3)[blk] == 1]
            assert dropped.numel() == 0 or dropped.max() <= left.min()
    # a unit is ranked by the mean norm of its rows: the rows of "b" (all > 0.5) outlast the weakest unit of "a"
    ma, mb = select_masks(norms, ["a", "b"], legal, cost_fn, cost_fn({"a": 12, "b": 6}) - 1, blocks=[4, 1],
                          step_cap=None)
    weakest = float(norms[0].reshape(4, 3).sort(dim=1).values[:, 0].mean())
    assert (int(ma.sum()), int(mb.sum())) == ((8, 6) if weakest < float(norms[1].min()) else (12, 5))
