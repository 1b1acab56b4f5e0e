"""Per-model-family search spaces (installed as ``autoprune.search_spaces``).

>>> from autoprune.search_spaces import build_space
>>> space = build_space(groups, model_name="resnet20", round_to=1, min_ratio=0.2, quantize=True)

Families (:data:`SEARCH_SPACES`): ``generic``, ``cifar_resnet``, ``vgg``, ``mobilenetv2``.
"""

from __future__ import annotations

from . import cifar_resnet, generic, mobilenetv2, vgg
from .base import (
    DEFAULT_W_BITS,
    SEARCH_SPACES,
    SpacePreset,
    build_space,
    infer_family,
    is_residual_stream,
    producers,
    quantizable_layers,
)

__all__ = [
    "DEFAULT_W_BITS",
    "SEARCH_SPACES",
    "SpacePreset",
    "build_space",
    "cifar_resnet",
    "generic",
    "infer_family",
    "is_residual_stream",
    "mobilenetv2",
    "producers",
    "quantizable_layers",
    "vgg",
]
