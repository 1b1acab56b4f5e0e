"""Checking a campaign's names before anything heavy: every name of a config against its registry.

A typo (``searcher.name=tpee``) must fail in a second, not after the model, the data and the dense evaluation
were loaded: :func:`check_names` runs first in :func:`autoprune.campaign.open_campaign` (and in ``export``). It
imports the registries (torch among them) but loads no model, checkpoint or data.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from autoprune.errors import ConfigError

if TYPE_CHECKING:
    from autoprune.config import CampaignConfig
    from autoprune.registry import Registry

__all__ = ["check_name", "check_names"]


def check_name(registry: Registry[Any], name: str, where: str, listed: str, hint: str = "") -> None:
    """Raise a :class:`ConfigError` naming ``where`` and the closest choice if ``registry`` lacks ``name``.

    Args:
        registry: The registry.
        name: The name the user gave.
        where: The config key (``searcher.name``) or command-line option (``--agents``) that holds it.
        listed: What ``autoprune list`` calls the registry (``searchers``), for the hint.
        hint: More advice, appended to the hint.
    """
    if name in registry:
        return
    close = difflib.get_close_matches(str(name), registry.names(), n=1, cutoff=0.5)
    fix = [f"use {close[0]} in {where}" if where.startswith("-") else f"use {where}={close[0]}"] if close else []
    advice = [*fix, f"`autoprune list {listed}` describes each", *([hint] if hint else [])]
    raise ConfigError(f"{where}: {registry.unknown_message(name)}", hint="; ".join(advice))


def _check_model_name(name: str) -> None:
    """A zoo name, ``torchvision:NAME`` or ``package.module:callable`` whose module can be found (not imported)."""
    from autoprune.models import MODELS
    from autoprune.models.external import TORCHVISION_PREFIX, is_external_name
    from autoprune.user_code import find_import_string

    if not is_external_name(name):
        check_name(MODELS, name, "model.name", "models", "your own network is model.name=package.module:callable")
        return
    if name.startswith(TORCHVISION_PREFIX):
        if not name.partition(":")[2]:
            raise ConfigError(f"model.name: {name!r} names no torchvision model", hint="e.g. torchvision:resnet18")
        return
    try:
        find_import_string(name, "model", "mymodels:build_net")
    except ConfigError as exc:
        raise ConfigError(f"model.name: {exc.message}", hint=exc.hint) from None


def check_names(cfg: CampaignConfig, searchers: Sequence[tuple[str, str]] | None = None) -> None:
    """Check every name of ``cfg`` against its registry, before anything is loaded or evaluated.

    Checked: the model (zoo name, ``torchvision:NAME`` or ``package.module:callable`` whose module exists),
    the dataset, the search-space family and importance criterion, the evaluator, the reward (and its
    parameters) and the multi-objective metrics, and the searchers. Registries are imported (torch among
    them); no model, checkpoint or data is loaded.

    Args:
        cfg: The validated config.
        searchers: ``(where, name)`` of each searcher that will run, ``where`` being what the user set (for
            the message), e.g. ``("--agents", "tpe")``; default: ``[("searcher.name", cfg.searcher.name)]``.

    Raises:
        ConfigError: The first unknown name, with the key that holds it, the closest choice and the choices.
    """
    from autoprune.agents.base import OBJECTIVE_METRICS, SEARCHERS, Objective, load_builtin_searchers
    from autoprune.data import check_dataset_name
    from autoprune.evaluate import EVALUATORS
    from autoprune.importance import IMPORTANCE
    from autoprune.objectives import REWARDS
    from autoprune.search_spaces import SEARCH_SPACES

    _check_model_name(cfg.model.name)
    check_dataset_name(cfg.dataset.name, cfg.dataset.kwargs, "dataset.name")
    s = cfg.search_space
    if s.family is not None:
        check_name(SEARCH_SPACES, s.family, "search_space.family", "spaces",
                    "or leave search_space.family unset (null) to infer it from the model name")
    check_name(IMPORTANCE, s.importance, "search_space.importance", "importance")
    check_name(EVALUATORS, cfg.evaluator.name, "evaluator.name", "evaluators")
    o = cfg.objective
    check_name(REWARDS, o.reward, "objective.reward", "rewards")
    bad = [m for m in o.objectives if m not in OBJECTIVE_METRICS]
    if bad or not o.objectives:
        raise ConfigError(f"objective.objectives: unknown metric(s) {bad}" if bad else
                          "objective.objectives: no metric given",
                          hint=f"choose from {', '.join(OBJECTIVE_METRICS)}")
    try:
        Objective.from_spec(o)  # the reward's parameters
    except ConfigError as exc:
        raise ConfigError(f"objective.kwargs: {exc.message}", hint=exc.hint) from None
    load_builtin_searchers()
    for where, name in searchers if searchers is not None else [("searcher.name", cfg.searcher.name)]:
        check_name(SEARCHERS, name, where, "searchers")
