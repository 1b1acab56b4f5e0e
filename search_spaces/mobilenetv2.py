"""The ``mobilenetv2`` search space: inverted-residual networks.

The searched widths are the expansion (hidden) widths of each inverted residual block — the group formed
by the 1×1 expansion conv, the depthwise conv and its BN — plus single-producer groups such as the stem and
the last 1×1 conv. Projection outputs of blocks joined by a residual addition form multi-producer stream
groups; they are left out by default (pruning them thins every block of a stage at once) and included with
``residual=True``.
"""

from __future__ import annotations

from .base import SEARCH_SPACES, SpacePreset


@SEARCH_SPACES.register("mobilenetv2")
class MobileNetV2Space(SpacePreset):
    """MobileNetV2: expansion widths and single-producer groups; residual streams with ``residual=True``."""

    name = "mobilenetv2"
    default_residual = False
