"""Searchers: RL agents, Optuna samplers, differentiable searchers and baselines (installed as ``autoprune.agents``)."""
