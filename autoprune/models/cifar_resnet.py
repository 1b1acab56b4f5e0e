"""CIFAR ResNets (He et al. 2016, §4.2): depth 6n+2 with BasicBlocks at widths 16/32/64.

Two shortcut flavours where a block changes shape:

* **option A** (``resnet20`` … ``resnet110``): parameter-free — subsample with step 2 and zero-pad the channel
  dimension. Module names and tensor shapes match github.com/akamaster/pytorch_resnet_cifar10, so its
  pretrained checkpoints load without missing or unexpected keys (see :mod:`autoprune.models.checkpoint`).
  The shortcut is written as plain ops inside :meth:`BasicBlock.forward` (``x[:, :, ::2, ::2]`` then
  ``F.pad`` on dim 1), so the model is ``torch.fx``-traceable.
* **option B** (``resnet20_b`` …): a 1×1 conv (stride s, no bias) + BN projection, as ``shortcut.0`` and
  ``shortcut.1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.errors import ConfigError
from autoprune.models.layers import Normalize, init_weights

Shortcut = Literal["A", "B"]


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut; ReLU after the sum.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv (and of the shortcut).
        option: ``"A"`` (subsample + zero-pad channels, no parameters) or ``"B"`` (1×1 conv + BN) for the
            shortcut when the shape changes; identity otherwise.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: Shortcut = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        # Option-A channel padding (left, right); (0, 0) means no padding. Plain ints: fx bakes them in.
        self.pad_left = 0
        self.pad_right = 0
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            if option == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            elif option == "A":
                if planes < in_planes:
                    raise ConfigError(f"option-A shortcut cannot shrink channels ({in_planes} → {planes})")
                self.pad_left = (planes - in_planes) // 2
                self.pad_right = planes - in_planes - self.pad_left
            else:
                raise ConfigError(f"unknown shortcut option {option!r}", hint="use 'A' or 'B'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            identity = self.shortcut(x)
        else:
            identity = x
            if self.stride != 1:
                identity = identity[:, :, :: self.stride, :: self.stride]
            if self.pad_left or self.pad_right:
                identity = F.pad(identity, (0, 0, 0, 0, self.pad_left, self.pad_right), "constant", 0.0)
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs: ``normalize`` → ``conv1``/``bn1`` → ``layer1..3`` → global pool → ``linear``.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, ...).
        num_classes: Output classes.
        in_channels: Input image channels.
        mean: Per-channel input mean for :class:`Normalize` (default 0.5).
        std: Per-channel input std (default 0.5).
        option: Shortcut flavour, ``"A"`` or ``"B"``.
        widths: Channels of the three stages.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        option: Shortcut = "A",
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(
                f"CIFAR ResNet depth must be 6n+2 with n ≥ 1, got {depth}", hint="use 20, 32, 44, 56 or 110"
            )
        if len(widths) != 3:
            raise ConfigError(f"widths must list 3 stage widths, got {list(widths)}")
        n = (depth - 2) // 6
        self.depth = depth
        self.normalize = Normalize(mean, std, channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, option))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
