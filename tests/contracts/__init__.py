"""Contract suites: behaviour every entry of a registry must have, parametrized over the registry itself.

One module per registry — evaluators (:data:`autoprune.evaluate.EVALUATORS`), rewards
(:data:`autoprune.objectives.REWARDS`), importance criteria (:data:`autoprune.importance.IMPORTANCE`) and
search-space presets (:data:`autoprune.search_spaces.SEARCH_SPACES`) — in the spirit of ``optuna.testing`` and of
the searcher contract in ``tests/test_searchers.py``: a new entry is tested as soon as it is registered, without
writing a test. Only a few per-entry *speed* settings (``SHORT`` tables) and constructor arguments without a
default (``REQUIRED`` tables) are named here; an entry missing from them runs with its defaults, or fails with a
message that says which table to extend.

Entries registered by tests or plugins (an object not defined in the ``autoprune`` package, e.g. the fault-
injecting evaluator of ``tests/reliability``) are left out: the contract is about what the product ships.

Shared here: :func:`product_entries` and the tiny data (offline digits) and model (``small_cnn`` width 4).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoprune.data.digits import digits_arrays
from autoprune.models import build_model
from autoprune.registry import Registry

Batch = tuple[torch.Tensor, torch.Tensor]


def product_entries(registry: Registry[Any]) -> list[str]:
    """Registered names whose object is defined in the ``autoprune`` package (sorted)."""
    return [n for n in registry.names() if registry.get(n).__module__.split(".")[0] == "autoprune"]


def digits_batches(start: int, n_batches: int, batch_size: int) -> list[Batch]:
    """``n_batches`` fixed batches of the offline digits (float in [0, 1], 1×8×8) from image ``start`` on."""
    images, labels = digits_arrays()
    end = start + n_batches * batch_size
    x = torch.from_numpy(images[start:end]).float().div(255.0)
    y = torch.from_numpy(labels[start:end])
    return [(x[i: i + batch_size], y[i: i + batch_size]) for i in range(0, len(x), batch_size)]


def small_cnn(width: int = 4) -> nn.Module:
    """``small_cnn`` for the digits (1 channel, 10 classes), freshly initialised (seeded by the caller)."""
    return build_model("small_cnn", num_classes=10, in_channels=1, mean=(0.3,), std=(0.35,), width=width)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
