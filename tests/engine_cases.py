"""Inline models for the engine test cases of ENGINE.md §9, and the checks every case goes through.

Each case is a small ``nn.Module`` with an example input. :data:`CASES` maps a name to a factory returning a
:class:`Case`. Other test files reuse :func:`randomize`, :func:`masked_reference` and :func:`half_widths`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoprune import graph, pruning

# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A model, its example input, and what the checks may assume about it.

    Attributes:
        model: The network (eval mode, random BN statistics).
        x: Example input (a tensor, or a tuple of positional inputs).
        exact: True when E (pruned == masked original) applies; False for layers whose statistics depend on
            all channels (LayerNorm / GroupNorm on a pruned stream).
        min_prunable: Lower bound on the number of prunable groups.
        conv_linear_only: True when FlopCounterMode sees every MAC the closed form counts.
    """

    model: nn.Module
    x: Any
    exact: bool = True
    min_prunable: int = 1
    conv_linear_only: bool = True


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN/LN statistics and affine parameters (so that E tests more than the identity), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


def half_widths(groups: graph.GroupSet, ratio: float = 0.5) -> dict[str, int]:
    """Every prunable group at ``ratio`` of its width (at least 1; rounded down to a multiple of its divisor)."""
    return {g.id: pruning.nearest_legal(g, max(1, int(g.size * ratio)), rounding="down") for g in groups.prunable()}


def masked_reference(model: nn.Module, groups: graph.GroupSet, plan: pruning.PruningPlan) -> nn.Module:
    """The original model with the removed channels zeroed at producers, depthwise convs, norms and params.

    Written independently of :func:`autoprune.pruning.mask`: it walks the group members and slices module
    tensors by role, so a bug in the engine's slice bookkeeping does not cancel out.
    """
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for gid, kept in plan.pruned().items():
            g = groups[gid]
            removed = torch.tensor(sorted(set(range(g.size)) - set(kept)), dtype=torch.long)
            for m in g.members:
                if m.role in ("out", "dw", "norm") and m.module in mods:
                    mod = mods[m.module]
                    dim = 1 if isinstance(mod, nn.Embedding) else 0
                    # a strided member (after a channel shuffle or a depth multiplier) owns `stride` rows a channel
                    rows = m.offset + (removed[:, None] * m.stride + torch.arange(m.stride)).flatten()
                    for name in ("weight", "bias"):
                        t = getattr(mod, name, None)
                        if isinstance(t, torch.Tensor):
                            t.index_fill_(dim, rows, 0.0)
            for sl in g.slices:
                if sl.role == "param" or (sl.role == "out" and sl.module not in mods):  # bare / functional
                    t = ref.get_parameter(sl.tensor) if sl.tensor in dict(ref.named_parameters()) else \
                        ref.get_buffer(sl.tensor)
                    pos = sl.offset + (removed[:, None] * sl.stride + torch.arange(sl.stride)).flatten()
                    t.index_fill_(sl.dim, pos, 0.0)
    return ref


def run(model: nn.Module, x: Any) -> Any:
    """Forward pass in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        return model(*x) if isinstance(x, tuple) else model(x)


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """All tensors of a (nested) output, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flat_outputs(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_outputs(o)]
    return []


def batch_of(x: Any) -> int:
    """Batch size of an example input."""
    first = x[0] if isinstance(x, tuple) else x
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return int(first.shape[0])


def bn_block(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv → BN → ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class PlainChain(nn.Module):
    """§9.1: conv → BN → ReLU chain → flatten → Linear (spatial 4×4 > 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(torch.flatten(x, 1))


class PoolHeads(nn.Module):
    """§9.2: three pooled heads — avgpool → flatten, view(B, −1), mean((2, 3)); literal-size view."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(16, 5)
        self.fc2 = nn.Linear(16, 5)
        self.fc3 = nn.Linear(16, 5)
        self.fc4 = nn.Linear(16 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(F.relu(self.c1(x)))
        a = self.fc1(self.flat(self.pool(y)))
        b = self.fc2(F.adaptive_avg_pool2d(y, 1).view(y.size(0), -1))
        c = self.fc3(y.mean((2, 3)))
        d = self.fc4(F.adaptive_max_pool2d(y, 2).view(-1, 64))  # literal 64 = 16·2·2 is rewritten
        return a + b + c + d


class BasicBlock(nn.Module):
    """Residual block; ``shortcut`` = identity, 1×1 conv + BN (option B) or zero pad (option A)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, option: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.option = option
        self.shortcut: nn.Module = nn.Sequential()
        self.pad = (cout - cin) // 2
        if (stride != 1 or cin != cout) and option == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        if self.option == "A" and self.pad:
            out += F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        else:
            out += self.shortcut(x)
        return F.relu(out)


class TinyResNet(nn.Module):
    """§9.3–9.5: stem + identity block + down-sampling block (option A or B) + GAP + linear."""

    def __init__(self, option: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1, option), BasicBlock(8, 8, 1, option))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, option), BasicBlock(16, 16, 1, option))
        self.linear = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


class Bottleneck(nn.Module):
    """§9.4: ResNet-50-style bottleneck (1×1 → 3×3 → 1×1) with a 1×1 conv shortcut."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.a = bn_block(cin, mid, 1)
        self.b = bn_block(mid, mid, 3, stride)
        self.c = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.c(self.b(self.a(x)))) + self.down(x))


class BottleneckNet(nn.Module):
    """Two bottlenecks: the second one's identity shortcut couples the first one's projection and down conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = bn_block(3, 8)
        self.b1 = Bottleneck(8, 4, 16, 2)
        self.b2 = Bottleneck(16, 4, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1×1 → depthwise 3×3 → project 1×1, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class TinyMobileNet(nn.Module):
    """§9.6: depthwise convs and inverted residuals (the residual couples projections across blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = bn_block(3, 8)
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, 1), InvertedResidual(8, 12, 2, 4),
                                    InvertedResidual(12, 12, 1, 4), InvertedResidual(12, 12, 1, 4))
        self.head = bn_block(12, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(self.blocks(self.stem(x))), 1), 1))


class GroupedConvNet(nn.Module):
    """§9.7: grouped conv (g = 2), a 1-output conv, and groups == out_channels with in ≠ out."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.mult = nn.Conv2d(4, 8, 3, padding=1, groups=4)  # depth multiplier 2: groups == in ≠ out
        self.c3 = nn.Conv2d(8, 6, 1)
        self.one = nn.Conv2d(6, 1, 1)  # out_channels == 1 is not depthwise
        self.c4 = nn.Conv2d(1, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c2(F.relu(self.g(F.relu(self.c1(x))))))
        y = F.relu(self.c3(F.relu(self.mult(y))))
        return self.c4(self.one(y)).mean((2, 3))


class GroupedChain(nn.Module):
    """§9.7: a grouped conv (g = 4, in 8 → out 12) with BN between two normal convs, then flatten → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.g = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)
        self.bg = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 6, 1, bias=False)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.bg(self.g(y)))
        return self.fc(F.relu(self.c2(y)).flatten(1))


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck: 1×1 → grouped 3×3 (cardinality ``groups``) → 1×1, identity or 1×1-conv shortcut."""

    def __init__(self, cin: int, width: int, cout: int, groups: int, stride: int = 1) -> None:
        super().__init__()
        self.reduce = bn_block(cin, width, 1)
        self.grouped = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, cout, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.grouped(self.reduce(x))))
        return F.relu(self.bn_out(self.expand(y)) + self.shortcut(x))


class TinyResNeXt(nn.Module):
    """§9.7: ResNeXt-style blocks, the grouped 3×3 inside a residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = bn_block(3, 16)
        self.layer1 = ResNeXtBlock(16, 8, 16, groups=4)
        self.layer2 = ResNeXtBlock(16, 16, 24, groups=4, stride=2)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


class GroupsEqOut(nn.Module):
    """§9.7: ``groups == out_channels`` with ``in_channels != out_channels`` (8 → 4, two inputs per output)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.red = nn.Conv2d(8, 4, 3, padding=1, groups=4)
        self.c2 = nn.Conv2d(4, 6, 1)
        self.c3 = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(F.relu(self.c2(F.relu(self.red(F.relu(self.c1(x))))))).mean((2, 3))


class GroupedMix(nn.Module):
    """§9.7 couplings: an uneven concat into a grouped conv (frozen), two grouped convs in a row (divisors
    combine), a grouped conv on a residual stream (the stream takes its divisor), a channel chunk of that stream
    and the same tensor concatenated twice into a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.g1 = nn.Conv2d(12, 8, 3, padding=1, groups=2)  # blocks of 6: a[0:6] | a[6:8] + b → uneven
        self.g2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.c = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.gcat = nn.Conv2d(8, 4, 1, groups=2)  # input cat(u, u)
        self.head = nn.Conv2d(4, 3, 1)
        self.tail = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.g1(torch.cat([self.a(x), self.b(x)], 1)))
        s = F.relu(self.bn(self.g2(y) + self.c(x)))
        u, v = s.chunk(2, dim=1)
        z = F.relu(self.gcat(torch.cat([u, u], 1)))
        return (self.head(z) + self.tail(v)).mean((2, 3))


class ConcatNet(nn.Module):
    """§9.8: concat on channels — two branches, the same tensor twice, nested concat, concat → flatten → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 3, stride=2, padding=1)
        self.d = nn.Conv2d(16, 6, 1)  # input: cat(c, c)
        self.e = nn.Conv2d(8, 5, 1)
        self.fc = nn.Linear((6 + 5 + 8) * 2 * 2, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        c = F.relu(self.c(y))
        d = F.relu(self.d(torch.cat((c, c), 1)))
        e = F.relu(self.e(c))
        z = torch.cat([torch.cat([d, e], 1), c], dim=1)
        z = F.max_pool2d(z, 2)
        return self.fc(z.flatten(1))


class CatOtherDim(nn.Module):
    """§9.9: concat along batch and width: the inputs' channels are unioned."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], dim=3)
        z = torch.cat([y, y], dim=0)
        return self.c(F.relu(z)).mean((2, 3))


class SplitNet(nn.Module):
    """§9.10: ``split`` with explicit sizes (independent pieces, sizes rewritten), ``chunk`` on channels (tied
    halves), ``tensor_split`` on channels (frozen) and a spatial ``chunk`` (channels untouched)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.c7 = nn.Conv2d(10, 4, 1)
        self.c3 = nn.Conv2d(3, 6, 3, padding=1)
        self.c4 = nn.Conv2d(6, 4, 1)
        self.c5 = nn.Conv2d(3, 9, 1)
        self.c6 = nn.Conv2d(4, 4, 1)
        self.c8 = nn.Conv2d(3, 12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.c1(x).split((6, 10), 1)
        u, v = self.c2(F.relu(a)).chunk(2, dim=1)
        w = self.c7(F.relu(b))
        top, bottom = F.relu(self.c3(x)).chunk(2, dim=2)  # spatial chunk keeps c3 prunable
        s = self.c4(top + bottom)
        p = torch.tensor_split(self.c5(x), 3, dim=1)[0]
        y = torch.cat([self.c6(F.relu(u) + v), w, s.repeat(1, 1, 2, 1)], 1)
        return y.mean((2, 3)) + self.c8(p).mean((2, 3))


class SharedNet(nn.Module):
    """§9.11: one conv called on two branches: its input groups are unioned and pruned once."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 5, padding=2)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.relu(self.bn(self.shared(F.relu(self.a(x)))))
        v = F.relu(self.bn(self.shared(F.relu(self.b(x)))))
        return self.head(torch.cat([u, v], dim=2)).mean((2, 3))


class TiedLM(nn.Module):
    """§9.12: embedding ↔ output layer share a parameter (weight tying); the hidden MLP stays prunable."""

    def __init__(self, vocab: int = 20, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 24)
        self.fc2 = nn.Linear(24, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.out(h)


class SENet(nn.Module):
    """§9.13: squeeze-excitation gate multiplied into the trunk; fc1's hidden width stays prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = bn_block(3, 16)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.fc3 = nn.Linear(16, 6)
        self.fc4 = nn.Linear(6, 16)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)  # layer scale: a per-channel parameter
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        y = y * g
        h = torch.sigmoid(self.fc4(F.relu(self.fc3(y.mean((2, 3))))))
        y = y * h[:, :, None, None]
        return self.c3(self.c2(y) * self.gamma).mean((2, 3))


class ZeroFirst(nn.Module):
    """Slice assignment ``x[:, :2] = 0`` (fx cannot trace item assignment: analysed as an opaque leaf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[:, :2] = 0.0
        return x


class InPlaceNet(nn.Module):
    """§9.14: ``out += x``, ``ReLU(inplace=True)``, ``x.add_(y)`` (prunable) and slice assignment (frozen)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.c4 = nn.Conv2d(8, 6, 1)
        self.c5 = nn.Conv2d(6, 6, 1)
        self.c6 = nn.Conv2d(6, 4, 1)
        self.zero = ZeroFirst()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.c1(x))
        out = self.c2(a)
        out += a
        out = self.relu(out)
        b = self.c3(out)
        b.add_(out)
        c = self.c4(self.relu(b))
        d = self.zero(self.c5(c))
        return self.c6(d).mean((2, 3))


class MultiIO(nn.Module):
    """§9.15: two positional inputs (one a dict) and a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)
        self.aux = nn.Linear(4, 3)

    def forward(self, img: torch.Tensor, extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        y = F.relu(self.a(img) + self.b(extra["depth"]))
        z = F.relu(self.c(y))
        return {"logits": self.fc(z.mean((2, 3))), "aux": self.aux(extra["meta"]), "feat": z}


class Gate(nn.Module):
    """A block with data-dependent control flow (untraceable by fx)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return F.relu(self.conv(x))
        return x


class UntraceableNet(nn.Module):
    """§9.17: a data-dependent submodule becomes an opaque leaf; the rest stays prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate(8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.c3 = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(F.relu(self.c2(self.gate(self.c1(x))))).mean((2, 3))


class C2f(nn.Module):
    """YOLOv8-style C2f block: ``list(x.chunk(2, 1))`` (fx: "Proxy object cannot be iterated"), a growing list
    of bottleneck outputs, concat, 1×1 fusion. ``split=True`` is the fx-traceable ``a, b = x.split(c, 1)``
    variant of the same computation."""

    def __init__(self, cin: int, cout: int, n: int = 2, split: bool = False) -> None:
        super().__init__()
        self.c = cout // 2
        self.split = split
        self.cv1 = bn_block(cin, 2 * self.c, 1)
        self.m = nn.ModuleList(nn.Sequential(bn_block(self.c, self.c), bn_block(self.c, self.c)) for _ in range(n))
        self.cv2 = bn_block((2 + n) * self.c, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split:
            a, b = self.cv1(x).split(self.c, 1)
            y = [a, b]
        else:
            y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class TinyYolo(nn.Module):
    """§9.17: stem → C2f → strided conv → C2f → head; the C2f blocks need the torch.export front-end."""

    def __init__(self, split: bool = False) -> None:
        super().__init__()
        self.stem = bn_block(3, 8)
        self.c2f1 = C2f(8, 8, 1, split)
        self.down = bn_block(8, 16, 3, 2)
        self.c2f2 = C2f(16, 16, 2, split)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c2f2(self.down(self.c2f1(self.stem(x))))).mean((2, 3))


class CustomOpNet(nn.Module):
    """§9.18: an op without a rule (``torch.cumsum`` over channels) and channel slicing are frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 6, 3, padding=1)
        self.c4 = nn.Conv2d(4, 4, 1)
        self.c5 = nn.Conv2d(6 + 8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c1(x))
        b = torch.cumsum(self.c2(a), dim=1)
        c = F.relu(self.c3(a))[:, :, ::2, ::2]  # spatial slicing keeps c3 prunable
        d = self.c4(b[:, :4, ::2, ::2])  # channel slicing freezes
        return (self.c5(torch.cat([c, b[:, :, ::2, ::2]], 1)) + d).mean((2, 3))


class MLP(nn.Module):
    """§9.19: Linear → GELU → Linear → ReLU → Linear; hidden widths prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block with explicit attention (q·kᵀ → softmax → ·v) and an MLP."""

    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    """§9.19: patch embedding (conv → flatten(2) → transpose) + transformer block + head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.block = Block()
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.block(t)).mean(1))


class SDPABlock(nn.Module):
    """Attention through ``F.scaled_dot_product_attention`` (FlopCounterMode counts 0 for it on CPU)."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(y)


class MixerLN(nn.Module):
    """§9.20: LayerNorm on a prunable residual stream (normalized_shape and affine sliced)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.ln1 = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.ln2 = nn.LayerNorm(16)
        self.gn = nn.GroupNorm(1, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.ln1(h))))
        h = self.ln2(h)
        h = self.gn(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h.mean(1))


class SpatialOps(nn.Module):
    """Spatial-only ops keep channels: stride slicing, spatial pad, upsample, permute round trip, 1-D convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3)
        self.c3 = nn.Conv1d(6, 5, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.c1(x)))[:, :, ::2, ::2]
        y = F.pad(y, (1, 1, 1, 1))
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        y = y.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        z = F.relu(self.c2(y)).flatten(2)  # B, C, L
        z = F.relu(self.bn1d(self.c3(z)))
        return self.fc(z.amax(dim=2))


class FunctionalNet(nn.Module):
    """ENGINE.md §2.4: ``F.conv2d`` / ``F.linear`` with parameter attributes are producers and consumers."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.bn = nn.BatchNorm2d(8)
        self.w2 = nn.Parameter(torch.randn(6, 8, 1, 1) * 0.3)
        self.fc = nn.Linear(6, 12)
        self.w3 = nn.Parameter(torch.randn(5, 12) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(F.conv2d(x, self.w1, self.b1, padding=1)))
        y = F.relu(F.conv2d(y, self.w2)).mean((2, 3))
        return F.linear(F.relu(self.fc(y)), self.w3)


def _img(b: int = 2, c: int = 3, s: int = 8) -> torch.Tensor:
    return torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(1))


def _mk(model: nn.Module, x: Any, **kw: Any) -> Case:
    torch.manual_seed(0)
    return Case(randomize(model), x, **kw)


CASES: dict[str, Callable[[], Case]] = {
    "plain_chain": lambda: _mk(PlainChain(), _img()),
    "pool_heads": lambda: _mk(PoolHeads(), _img()),
    "resnet_identity_b": lambda: _mk(TinyResNet("B"), _img()),
    "resnet_pad_a": lambda: _mk(TinyResNet("A"), _img()),
    "bottleneck": lambda: _mk(BottleneckNet(), _img()),
    "mobilenet": lambda: _mk(TinyMobileNet(), _img()),
    "grouped_conv": lambda: _mk(GroupedConvNet(), _img()),
    "grouped_chain": lambda: _mk(GroupedChain(), _img()),
    "grouped_resnext": lambda: _mk(TinyResNeXt(), _img()),
    "grouped_eq_out": lambda: _mk(GroupsEqOut(), _img()),
    "grouped_mix": lambda: _mk(GroupedMix(), _img()),
    "concat": lambda: _mk(ConcatNet(), _img()),
    "cat_other_dim": lambda: _mk(CatOtherDim(), _img()),
    "split_chunk": lambda: _mk(SplitNet(), _img()),
    "shared_module": lambda: _mk(SharedNet(), _img()),
    "tied_embedding": lambda: _mk(TiedLM(), torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(1))),
    "se_block": lambda: _mk(SENet(), _img()),
    "in_place": lambda: _mk(InPlaceNet(), _img()),
    "multi_io": lambda: _mk(MultiIO(), (_img(), {"depth": _img(c=1), "meta": torch.randn(2, 4)})),
    "untraceable": lambda: _mk(UntraceableNet(), _img().abs()),
    "c2f_chunk_list": lambda: _mk(TinyYolo(), _img()),
    "c2f_split": lambda: _mk(TinyYolo(split=True), _img()),
    "custom_op": lambda: _mk(CustomOpNet(), _img()),
    "mlp": lambda: _mk(MLP(), torch.randn(3, 20)),
    "transformer": lambda: _mk(TinyViT(), _img(s=16), exact=False),
    "layernorm_stream": lambda: _mk(MixerLN(), torch.randn(2, 5, 12), exact=False),
    "spatial_ops": lambda: _mk(SpatialOps(), _img()),
    "functional": lambda: _mk(FunctionalNet(), _img()),
}


# ----------------------------------------------------------------------------------------------------------------
# Tensor constants and channels-last activations (issue #22: MaxViT's relative-position bias, Swin's NHWC blocks)
# ----------------------------------------------------------------------------------------------------------------


def relative_position_index(size: int) -> torch.Tensor:
    """Index into a relative-position bias table for every pair of tokens of a ``size × size`` window."""
    coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (size - 1)
    return rel[..., 0] * (2 * size - 1) + rel[..., 1]


class RelPosAttention(nn.Module):
    """MaxViT-style attention with a relative-position bias ``table[index.view(-1)]``.

    fx does not proxy buffers: ``self.index.view(-1)`` is computed while tracing and stowed as a tensor constant
    (``_tensor_constant…``) of the traced module, which indexes the bias table parameter.
    """

    def __init__(self, dim: int = 16, heads: int = 2, size: int = 3) -> None:
        super().__init__()
        self.heads, self.tokens = heads, size * size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * size - 1) ** 2, heads) * 0.5)
        self.register_buffer("index", relative_position_index(size))

    def bias(self) -> torch.Tensor:
        b = self.table[self.index.view(-1)].view(self.tokens, self.tokens, -1)
        return b.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5 + self.bias()
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(y)


class RelPosNet(nn.Module):
    """Tensor constants: a relative-position-bias attention block (a constant indexes a parameter table) between a
    conv stem and an MLP, and a per-channel tensor made in ``forward`` (a constant that freezes what it meets)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.c2 = nn.Conv2d(12, 8, 3, padding=1)
        self.patch = nn.Conv2d(8, 16, 4, 4)
        self.ln1 = nn.LayerNorm(16)
        self.attn = RelPosAttention(16, 2, 3)
        self.ln2 = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c2(F.relu(self.c1(x)))) * torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1)
        t = self.patch(y).flatten(2).transpose(1, 2)  # 12×12 → 3×3 tokens
        t = t + self.attn(self.ln1(t))
        t = t + self.fc2(F.gelu(self.fc1(self.ln2(t))))
        return self.head(t.mean(1))


def window_mix(x: torch.Tensor) -> torch.Tensor:
    """Stands in for torchvision's fx-wrapped ``shifted_window_attention``: an op on NHWC maps without a rule."""
    return x + 0.5 * torch.roll(x, shifts=(1, 1), dims=(1, 2))


torch.fx.wrap("window_mix")


class ChannelsLastBlock(nn.Module):
    """Swin-style NHWC block: patch-embed conv → permute to NHWC → LayerNorm → window op (fx-wrapped, no rule) and
    a Linear MLP on the last dim, residuals on the NHWC stream → permute back → conv. The 5×5 map's height is no
    channel group."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, 2)  # 10×10 → 5×5
        self.norm1 = nn.LayerNorm(8)
        self.norm2 = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.out = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.patch(x).permute(0, 2, 3, 1)  # N, H, W, C
        y = y + window_mix(self.norm1(y))
        y = y + self.fc2(F.gelu(self.fc1(self.norm2(y))))
        z = F.relu(self.out(y.permute(0, 3, 1, 2)))
        return self.fc(z.mean((2, 3)))


CASES.update({
    "tensor_constant": lambda: _mk(RelPosNet(), _img(s=12)),
    "channels_last": lambda: _mk(ChannelsLastBlock(), _img(s=10)),
})


# ----------------------------------------------------------------------------------------------------------------
# Channel shuffle, channel counts read from shapes, literal channel slices, depth multipliers (issue #22)
# ----------------------------------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ``channel_shuffle`` (ShuffleNetV2): the channel count is read with ``x.size()``."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


class ShuffleNet(nn.Module):
    """Channel shuffle, ShuffleNet-v1 style: grouped 1×1 conv (3 groups) → shuffle (torchvision's size-read form)
    → depthwise 3×3 + BN on the shuffled (strided) layout → 1×1 conv → a literal shuffle ``view(N, 2, 4, H, W)``
    … ``reshape(N, 8, H, W)`` whose sizes are rewritten → 1×1 conv → head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = bn_block(3, 12)
        self.g1 = nn.Conv2d(12, 12, 1, groups=3, bias=False)
        self.b1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.b2 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 8, 1)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.g1(self.stem(x))))
        y = channel_shuffle(y, 3)
        y = F.relu(self.b2(self.dw(y)))
        z = self.c2(y)
        n, _, h, w = z.shape
        z = z.view(n, 2, 4, h, w).transpose(1, 2).reshape(n, 8, h, w)  # literal shuffle: 4 and 8 rewritten
        return self.head(F.relu(self.c3(z))).mean((2, 3))


class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2 stride-1 unit on a stem: ``chunk`` → branch (1×1, depthwise 3×3, 1×1) → ``cat`` → shuffle →
    head. The shuffle ties the identity half to the branch output, so the whole stream stays prunable."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = bn_block(3, c)
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.head = nn.Conv2d(c, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.stem(x).chunk(2, dim=1)
        out = channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)
        return self.head(out).mean((2, 3))


class SizeReadNet(nn.Module):
    """Channel counts read with ``x.size()`` / ``x.shape[1]`` that only size views: ``x.view(b, c, h * w)`` and an
    SE gate ``pool(x).view(b, c)`` → fc → ``view(b, c, 1, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = bn_block(3, 8)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.c2 = nn.Conv1d(8, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        b, c, h, w = y.size()
        s = F.adaptive_avg_pool2d(y, 1).view(b, c)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s)))).view(b, y.shape[1], 1, 1)
        z = (y * s).view(b, c, h * w)
        return self.fc(F.relu(self.c2(z)).mean(2))


class SliceNetLiteral(nn.Module):
    """Literal channel slices: ``[:, :4]`` / ``[:, 4:]`` (then ``cat``), negative bounds ``[:, -3:]`` and
    ``[:, 2:-2]``, and ``narrow(x, 1, 1, 5)``; the bounds are rewritten on apply."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = bn_block(3, 12)
        self.a = nn.Conv2d(12, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)
        self.c = nn.Conv2d(8, 4, 1)
        self.d = nn.Conv2d(5, 4, 1)
        self.e = nn.Conv2d(6 + 4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        u = torch.cat([F.relu(y[:, 4:]), y[:, :4]], 1)  # 8 + 4: the two pieces swapped
        v = self.b(y[:, -3:])
        w = self.c(y[:, 2:-2]) + self.d(torch.narrow(y, 1, 1, 5))
        z = self.e(torch.cat([F.relu(self.a(u)), w], 1))
        return z.mean((2, 3)) + v.mean((2, 3)).sum(1, keepdim=True)


class DepthMultiplierNet(nn.Module):
    """Depthwise convs with a channel multiplier (``groups = C_in``, ``out = m·C_in``): 6 → 12 (m = 2) → BN →
    a plain depthwise conv on the strided layout → 12 → 36 (m = 3) → BN → 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = bn_block(3, 6)
        self.m1 = nn.Conv2d(6, 12, 3, padding=1, groups=6)
        self.b1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.m2 = nn.Conv2d(12, 36, 1, groups=12, bias=False)
        self.b2 = nn.BatchNorm2d(36)
        self.pw = nn.Conv2d(36, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.m1(self.stem(x))))
        y = F.relu(self.b2(self.m2(self.dw(y))))
        return self.fc(F.relu(self.pw(y)).mean((2, 3)))


CASES.update({
    "channel_shuffle": lambda: _mk(ShuffleNet(), _img()),
    "shufflenet_v2_unit": lambda: _mk(ShuffleV2Unit(), _img()),
    "size_read": lambda: _mk(SizeReadNet(), _img()),
    "literal_slices": lambda: _mk(SliceNetLiteral(), _img()),
    "depth_multiplier": lambda: _mk(DepthMultiplierNet(), _img()),
})


# ----------------------------------------------------------------------------------------------------------------
# Attention (issue #22): nn.MultiheadAttention, a torchvision-style ViT, explicit attention heads, einsum
# ----------------------------------------------------------------------------------------------------------------


class MHANet(nn.Module):
    """``nn.MultiheadAttention`` between two linear layers (sequence first, attention weights computed, so
    ``FlopCounterMode`` sees every MAC): the input embedding width, the 4 heads and the output width are prunable,
    and the pruned model equals the masked original (the removed heads' q, k and v rows are zero)."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (L, N, 12)
        h = self.embed(x)
        a, _ = self.attn(h, h, h)
        return self.head(F.relu(a)).mean(0)


class ViTEncoderBlock(nn.Module):
    """torchvision's ``EncoderBlock`` structure: LayerNorm → ``nn.MultiheadAttention`` → residual, LayerNorm →
    MLP → residual. ``batch_first=False`` runs the attention sequence first with its weights computed (every MAC
    visible to ``FlopCounterMode``); torchvision's own call is ``batch_first=True, need_weights=False``."""

    def __init__(self, heads: int, hidden: int, mlp: int, batch_first: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden, heads, dropout=0.0, batch_first=batch_first)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, hidden),
                                 nn.Dropout(0.0))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        if self.self_attention.batch_first:
            x, _ = self.self_attention(x, x, x, need_weights=False)
        else:
            x = x.transpose(0, 1)
            x, _ = self.self_attention(x, x, x)
            x = x.transpose(0, 1)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class ViTLike(nn.Module):
    """torchvision's ``VisionTransformer`` structure at toy size: conv patch embedding, ``reshape(n, hidden_dim,
    n_h·n_w)``, class token ``expand`` + ``cat`` on the token dim, positional embedding added, encoder blocks, final
    LayerNorm, ``x[:, 0]``, linear head. The hidden width (class token, positional embedding, LayerNorms, the
    attention's inputs and output projections, the MLPs) is one prunable group; every block's heads and MLP
    hidden width are groups of their own."""

    def __init__(self, image: int = 16, patch: int = 4, layers: int = 2, heads: int = 4, hidden: int = 16,
                 mlp: int = 32, classes: int = 10, batch_first: bool = True) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.hidden_dim = image, patch, hidden
        self.conv_proj = nn.Conv2d(3, hidden, kernel_size=patch, stride=patch)
        seq = (image // patch) ** 2 + 1
        self.class_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.5)
        self.pos_embedding = nn.Parameter(torch.randn(1, seq, hidden) * 0.5)
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(*(ViTEncoderBlock(heads, hidden, mlp, batch_first) for _ in range(layers)))
        self.ln = nn.LayerNorm(hidden, eps=1e-6)
        self.heads = nn.Sequential(nn.Linear(hidden, classes))

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        n_h, n_w = h // p, w // p
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, n_h * n_w)
        return x.permute(0, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        torch._assert(x.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {x.shape}")
        x = x + self.pos_embedding
        x = self.ln(self.layers(self.dropout(x)))
        return self.heads(x[:, 0])


class HeadAttention(nn.Module):
    """Explicit multi-head attention whose head count and head width are literals (``self.heads``,
    ``self.head_dim`` are ints baked into the traced graph) and whose merge uses ``-1``: the heads are prunable.
    ``sdpa=True`` uses ``F.scaled_dot_product_attention`` instead of ``q @ kᵀ → softmax → @ v``."""

    def __init__(self, dim: int = 16, heads: int = 4, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.sdpa = heads, dim // heads, sdpa
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            q, k, v = qkv.unbind(0)
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            q, k, v = qkv[0], qkv[1], qkv[2]
            att = (q @ k.transpose(-2, -1)) * self.scale
            y = att.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class HeadNet(nn.Module):
    """Token embedding → residual :class:`HeadAttention` → mean over tokens → linear head."""

    def __init__(self, sdpa: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.attn = HeadAttention(16, 4, sdpa)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(F.gelu(h))
        return self.head(h.mean(1))


class EinsumAttention(nn.Module):
    """MaxViT-style attention: ``chunk`` of one qkv projection, per-part ``reshape(B, N, H, d)``, ``torch.einsum``
    for ``q·kᵀ`` and ``attn·v``, merge with ``reshape(B, N, -1)``: the heads are prunable, einsum MACs exact."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.merge = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3)
        k = k.reshape(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3) * self.scale
        v = v.reshape(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3)
        att = F.softmax(torch.einsum("b h i d, b h j d -> b h i j", q, k), dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", att, v)
        return self.merge(out.permute(0, 2, 1, 3).reshape(b, n, -1))


class EinsumNet(nn.Module):
    """Token embedding → :class:`EinsumAttention` → mean over tokens → linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.attn = EinsumAttention(16, 4)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.attn(self.embed(x))).mean(1))


def _tokens(b: int = 2, n: int = 6, c: int = 12) -> torch.Tensor:
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(1))


# The explicit-attention cases are exact, but masked_reference above zeroes ``out`` members' rows without their
# stride (one row per channel), and a head owns head_dim rows of its projection: E for them is checked in
# tests/test_graph_attention.py with a stride-aware reference. LayerNorm on ViTLike's pruned stream is not exact.
CASES.update({
    "mha": lambda: _mk(MHANet(), torch.randn(6, 2, 12, generator=torch.Generator().manual_seed(1))),
    "vit_like": lambda: _mk(ViTLike(batch_first=False), _img(s=16), exact=False, min_prunable=4),
    "attention_heads": lambda: _mk(HeadNet(), _tokens(), exact=False, min_prunable=2),
    "einsum_attention": lambda: _mk(EinsumNet(), _tokens(), exact=False, min_prunable=3),
})
