"""The ``generic`` search space: every prunable channel group of any model the engine can analyse."""

from __future__ import annotations

from .base import SEARCH_SPACES, SpacePreset


@SEARCH_SPACES.register("generic")
class GenericSpace(SpacePreset):
    """Every prunable group, residual streams included (override with ``residual=False``)."""

    name = "generic"
    default_residual = True
