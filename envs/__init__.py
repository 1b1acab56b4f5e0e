"""Gymnasium environments (installed as ``autoprune.envs``)."""
