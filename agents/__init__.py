"""Searchers: RL agents, Optuna samplers, differentiable searchers and baselines (installed as ``autoprune.agents``)."""

from .base import SEARCHERS, Objective, Searcher, SearchResult, load_builtin_searchers, make_searcher

__all__ = ["SEARCHERS", "Objective", "SearchResult", "Searcher", "load_builtin_searchers", "make_searcher"]
