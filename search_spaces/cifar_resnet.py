"""The ``cifar_resnet`` search space: CIFAR ResNets (option A zero-pad and option B 1×1-conv shortcuts).

By default only the widths inside the residual blocks are searched (each block's first conv): the residual
streams couple the stem, every block's second conv and the shortcuts of a stage into one group. The streams
are prunable with both shortcut kinds (the engine's pad rule follows option A's zero-padding, option B's
1×1 convs are ordinary members), and ``residual=True`` adds them to the search.
"""

from __future__ import annotations

from .base import SEARCH_SPACES, SpacePreset


@SEARCH_SPACES.register("cifar_resnet")
class CifarResNetSpace(SpacePreset):
    """CIFAR ResNet-20/32/44/56/110: block-internal widths; residual streams only with ``residual=True``."""

    name = "cifar_resnet"
    default_residual = False
