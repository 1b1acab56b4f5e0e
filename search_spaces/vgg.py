"""The ``vgg`` search space: plain conv stacks with BN (VGG-11/16/19-BN), every conv width searched.

VGG has no residual coupling, so every conv's output group is independent; the classifier's output is
frozen by the engine (model output) and never appears.
"""

from __future__ import annotations

from .base import SEARCH_SPACES, SpacePreset


@SEARCH_SPACES.register("vgg")
class VGGSpace(SpacePreset):
    """VGG-BN: every prunable conv/linear width."""

    name = "vgg"
    default_residual = True
