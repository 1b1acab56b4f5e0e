"""VGG with batch norm for CIFAR (Simonyan & Zisserman 2015; BN variant): conv stack → 512 features → linear.

``features`` holds Conv-BN-ReLU triples and max pools from the usual configurations; after the five pools a
32×32 input is 1×1×512. A global average pool (the identity at 32×32, and what lets other sizes ≥ 32 work)
and a flatten feed ``classifier``, a single ``Linear(512, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoprune.errors import ConfigError
from autoprune.models.layers import Normalize, init_weights

# "M" is a 2×2 max pool; numbers are conv output channels.
CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-BN for small images.

    Args:
        depth: 11, 16 or 19.
        num_classes: Output classes.
        in_channels: Input image channels.
        mean: Per-channel input mean for :class:`Normalize` (default 0.5).
        std: Per-channel input std (default 0.5).
    """

    def __init__(
        self,
        depth: int = 16,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if depth not in CONFIGS:
            raise ConfigError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
        self.normalize = Normalize(mean, std, channels=in_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = int(item)
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.features(x)
        return self.classifier(self.flatten(self.pool(x)))
