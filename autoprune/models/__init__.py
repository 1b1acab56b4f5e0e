"""The model zoo: a registry of CIFAR-sized networks plus user and torchvision models by name.

Every zoo model starts with ``self.normalize`` (:class:`~autoprune.models.layers.Normalize`), consumes images
scaled to ``[0, 1]``, is deterministic for a given seed and traces with ``torch.fx.symbolic_trace``.

>>> model = build_model("resnet20", num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))

Names: see :data:`MODELS` (``autoprune list models``), ``"package.module:callable"`` for your own network, or
``"torchvision:<name>"`` when torchvision is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from torch import nn

from autoprune.errors import ConfigError
from autoprune.models.cifar_resnet import BasicBlock, CifarResNet
from autoprune.models.external import ExternalModel, build_external, is_external_name
from autoprune.models.layers import IMAGENET_MEAN, IMAGENET_STD, Normalize, find_normalize
from autoprune.models.mobilenetv2 import MobileNetV2
from autoprune.models.small_cnn import SmallCNN
from autoprune.models.vgg import VGG
from autoprune.registry import Registry

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODELS",
    "BasicBlock",
    "CifarResNet",
    "ExternalModel",
    "MobileNetV2",
    "Normalize",
    "SmallCNN",
    "build_model",
    "find_normalize",
]

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")

_RESNET_DEPTHS = (20, 32, 44, 56, 110)
_PARAMS = {20: "0.27M", 32: "0.46M", 44: "0.66M", 56: "0.85M", 110: "1.7M"}

for _depth in _RESNET_DEPTHS:
    MODELS.register(
        f"resnet{_depth}",
        partial(CifarResNet, _depth, option="A"),
        help=f"CIFAR ResNet-{_depth}, option-A (zero-pad) shortcuts, {_PARAMS[_depth]} params; loads akamaster weights",
    )
    MODELS.register(
        f"resnet{_depth}_b",
        partial(CifarResNet, _depth, option="B"),
        help=f"CIFAR ResNet-{_depth}, option-B (1x1 conv + BN) shortcuts",
    )
for _depth in (11, 16, 19):
    MODELS.register(
        f"vgg{_depth}_bn", partial(VGG, _depth), help=f"VGG-{_depth} with batch norm for 32x32 inputs, 512-d classifier"
    )
MODELS.register(
    "mobilenetv2", MobileNetV2, help="MobileNetV2 for 32x32 inputs (stride-1 stem and 24-ch stage), 2.2M params"
)
MODELS.register(
    "small_cnn", SmallCNN, help="4-conv CNN for tiny images (8x8 digits, 28x28 MNIST), any size, 1 or 3 channels"
)


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by registry name, import string or ``torchvision:<name>``.

    Args:
        name: A name from :data:`MODELS`, ``"package.module:callable"`` or ``"torchvision:<name>"``.
        num_classes: Output classes.
        in_channels: Input image channels.
        mean: Per-channel mean for the input :class:`Normalize` (default 0.5 per channel); the CLI passes the
            dataset's statistics.
        std: Per-channel std (default 0.5 per channel).
        **kwargs: Model-specific options (e.g. ``width_mult`` for MobileNetV2, ``width`` for small_cnn).

    Returns:
        The freshly initialised model (train mode, CPU).

    Raises:
        ConfigError: Unknown name (with the close match), bad option, or bad statistics.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer, got {in_channels!r}")
    common = {"num_classes": num_classes, "in_channels": in_channels, "mean": mean, "std": std}
    if is_external_name(name):
        return build_external(name, **common, **kwargs)
    factory = MODELS.get(name)
    try:
        return factory(**common, **kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"model {name!r} does not accept the options {sorted(kwargs)}: {exc}",
            hint="check the model's options in its docstring (`autoprune list models`)",
        ) from exc
    except ValueError as exc:  # e.g. a fractional width reaching a layer constructor
        raise ConfigError(
            f"model {name!r}: bad option values {kwargs}: {exc}",
            hint="check the model's options in its docstring (`autoprune list models`)",
        ) from exc
    except (RuntimeError, MemoryError, OverflowError) as exc:  # e.g. a width whose weights cannot be allocated
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"model {name!r} cannot be built with {kwargs}: {first[:300]}",
            hint="a width or depth this large does not fit in memory; use smaller model options",
        ) from exc
