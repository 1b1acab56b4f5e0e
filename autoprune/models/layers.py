"""Small building blocks shared by the model zoo: the input :class:`Normalize` layer and init helpers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoprune.errors import ConfigError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _channel_stats(values: Sequence[float] | float | None, channels: int, default: float, what: str) -> list[float]:
    """Expand ``values`` to one float per channel, validating its length."""
    if values is None:
        return [default] * channels
    if isinstance(values, (int, float)):
        return [float(values)] * channels
    out = [float(v) for v in values]
    if len(out) == 1:
        return out * channels
    if len(out) != channels:
        raise ConfigError(
            f"{what} has {len(out)} values but the model has {channels} input channels",
            hint=f"give one {what} value per input channel (or a single value for all)",
        )
    return out


class Normalize(nn.Module):
    """Per-channel input normalisation ``(x - mean) / std``: the model carries its own preprocessing.

    Zoo models consume images scaled to ``[0, 1]`` and start with this layer. ``mean`` and ``std`` are
    *persistent* buffers of shape ``(C, 1, 1)``, so they travel in state dicts and checkpoints, move with
    ``.to(device)`` and are never trained. The module has no children and no parameters.

    Args:
        mean: One value per channel, a single value for all channels, or ``None`` for 0.5.
        std: Same for the standard deviation (must be > 0); ``None`` gives 0.5.
        channels: Number of input channels.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        channels: int = 3,
    ) -> None:
        super().__init__()
        m = _channel_stats(mean, channels, 0.5, "mean")
        s = _channel_stats(std, channels, 0.5, "std")
        if any(not v > 0 for v in s):
            raise ConfigError(f"std must be positive, got {s}", hint="pass the dataset's per-channel std")
        self.register_buffer("mean", torch.tensor(m, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(s, dtype=torch.float32).view(-1, 1, 1))

    def set_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Overwrite the statistics in place (keeps dtype and device)."""
        channels = self.mean.shape[0]
        m = _channel_stats(mean, channels, 0.5, "mean")
        s = _channel_stats(std, channels, 0.5, "std")
        with torch.no_grad():
            self.mean.copy_(torch.tensor(m).view(-1, 1, 1))
            self.std.copy_(torch.tensor(s).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = ", ".join(f"{v:.4g}" for v in self.mean.flatten().tolist())
        std = ", ".join(f"{v:.4g}" for v in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"


def find_normalize(model: nn.Module) -> Normalize | None:
    """The model's input :class:`Normalize` layer (``model.normalize`` or the first one found), if any."""
    direct = getattr(model, "normalize", None)
    if isinstance(direct, Normalize):
        return direct
    for module in model.modules():
        if isinstance(module, Normalize):
            return module
    return None


def init_weights(model: nn.Module) -> None:
    """He-normal (fan-out) convs, N(0, 0.01) linears, zero biases, BN to identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
