"""Gymnasium environments (installed as ``autoprune.envs``).

Importing this package registers the environments with Gymnasium:

=======================================  ==========================================================
``autoprune/LayerwiseCompression-v0``     :class:`LayerwiseCompressionEnv`; pass ``mode=`` (default prune)
``autoprune/LayerwisePruning-v0``         ``mode="prune"`` (AMC: one keep ratio per channel group)
``autoprune/LayerwiseQuantization-v0``    ``mode="quantize"`` (HAQ: bits per conv/linear layer)
``autoprune/JointCompression-v0``         ``mode="joint"`` (groups, then layers; 2-D action)
=======================================  ==========================================================

Example:
    >>> import gymnasium as gym
    >>> import autoprune.envs
    >>> env = gym.make("autoprune/LayerwisePruning-v0", problem=problem, budget={"macs": 0.5})
"""

from __future__ import annotations

import gymnasium

from .embedding import StateEmbedding, collect_layer_stats
from .layerwise import MODES, EnvFactory, LayerwiseCompressionEnv, legalize_bits, make_env

ENTRY_POINT = "autoprune.envs.layerwise:LayerwiseCompressionEnv"

#: Registered environment ids → default keyword arguments.
ENV_IDS: dict[str, dict[str, str]] = {
    "autoprune/LayerwiseCompression-v0": {},
    "autoprune/LayerwisePruning-v0": {"mode": "prune"},
    "autoprune/LayerwiseQuantization-v0": {"mode": "quantize"},
    "autoprune/JointCompression-v0": {"mode": "joint"},
}


def register_envs() -> None:
    """Register :data:`ENV_IDS` with Gymnasium (idempotent)."""
    for env_id, kwargs in ENV_IDS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point=ENTRY_POINT, kwargs=dict(kwargs))


register_envs()

__all__ = [
    "ENV_IDS",
    "MODES",
    "EnvFactory",
    "LayerwiseCompressionEnv",
    "StateEmbedding",
    "collect_layer_stats",
    "legalize_bits",
    "make_env",
    "register_envs",
]
