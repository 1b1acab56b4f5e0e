"""A small CNN for tiny images (8×8 digits, 28×28 MNIST / Fashion-MNIST, 32×32 CIFAR): fast on a CPU.

Layout: ``normalize`` → ``block1`` (two 3×3 Conv-BN-ReLU at ``width``) → ``pool1`` (2×2 max pool) →
``block2`` (two 3×3 Conv-BN-ReLU at ``2 * width``) → global average pool → ``classifier``. Global pooling
makes it work for any input of at least 2×2 pixels and any number of input channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoprune.errors import ConfigError
from autoprune.models.layers import Normalize, init_weights


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """Four-conv network for small inputs.

    Args:
        num_classes: Output classes.
        in_channels: Input image channels (1 for digits/MNIST, 3 for colour).
        mean: Per-channel input mean for :class:`Normalize` (default 0.5).
        std: Per-channel input std (default 0.5).
        width: Channels of the first block (the second block has twice as many).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        width: int = 32,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"width must be ≥ 1, got {width}")
        self.normalize = Normalize(mean, std, channels=in_channels)
        self.block1 = nn.Sequential(*_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, width))
        self.pool1 = nn.MaxPool2d(2, 2)
        self.block2 = nn.Sequential(*_conv_bn_relu(width, 2 * width), *_conv_bn_relu(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(2 * width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.block1(self.normalize(x)))
        x = self.block2(x)
        return self.classifier(self.flatten(self.pool(x)))
