"""MobileNetV2 (Sandler et al. 2018) adapted to 32×32 inputs.

The CIFAR adaptation keeps the ImageNet block table but changes strides so a 32×32 input ends on a 4×4 map:
the stem conv has stride 1 and the second stage (24 channels) has stride 1; the remaining strided stages
(32, 64, 160 channels) halve the resolution 32 → 16 → 8 → 4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoprune.errors import ConfigError
from autoprune.models.layers import Normalize, init_weights

# (expansion t, output channels c, repeats n, stride of the first block s) — CIFAR strides.
CIFAR_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor`` without going below 90 % of it."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) → BN → ReLU6, as ``0``, ``1``, ``2``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """Expand 1×1 → depthwise 3×3 → project 1×1 (linear); residual when stride 1 and shapes match.

    Args:
        cin: Input channels.
        cout: Output channels.
        stride: Depthwise stride.
        expand: Expansion ratio (1 skips the expand conv).
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for CIFAR-sized inputs.

    Args:
        num_classes: Output classes.
        in_channels: Input image channels.
        mean: Per-channel input mean for :class:`Normalize` (default 0.5).
        std: Per-channel input std (default 0.5).
        width_mult: Channel multiplier (channels rounded to multiples of 8).
        dropout: Dropout before the classifier (0 disables it; the module is kept so names stay stable).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        width_mult: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not width_mult > 0:
            raise ConfigError(f"width_mult must be positive, got {width_mult}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.normalize = Normalize(mean, std, channels=in_channels)
        stem = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNReLU(in_channels, stem, stride=1)]
        cin = stem
        for t, c, n, s in CIFAR_BLOCKS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(ConvBNReLU(cin, last, kernel=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(self.dropout(self.flatten(self.pool(x))))
