"""Models from outside the zoo: ``"package.module:callable"`` import strings and ``"torchvision:<name>"``.

Both are wrapped in :class:`ExternalModel` (``normalize`` → ``net``) so that, like zoo models, they consume
images in ``[0, 1]`` and carry their own input normalisation. Their state-dict keys therefore start with
``net.``; :func:`autoprune.models.checkpoint.load_checkpoint` also accepts state dicts of the bare network.

Only modules the user names are imported (``importlib``; nothing is evaluated). The current working
directory is appended to ``sys.path`` so ``mymodels:Net`` finds ``./mymodels.py`` from the console script,
as it would with ``python -m``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from autoprune._imports import optional_import
from autoprune.errors import ConfigError
from autoprune.models.layers import Normalize
from autoprune.user_code import resolve_import_string

TORCHVISION_PREFIX = "torchvision:"


class ExternalModel(nn.Module):
    """An outside network behind the project's input :class:`Normalize` layer.

    Args:
        net: The network; it receives normalised images.
        normalize: The input normalisation layer.
    """

    def __init__(self, net: nn.Module, normalize: Normalize) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(self.normalize(x))


def is_external_name(name: str) -> bool:
    """True if ``name`` is an import string (``module:callable``) or a ``torchvision:`` name."""
    return ":" in name


def _accepted(fn: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``offered`` keyword arguments that ``fn``'s signature accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: offer nothing optional
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    return {k: v for k, v in offered.items() if k in params}


def _resolve_import_string(spec: str) -> Callable[..., Any]:
    return resolve_import_string(spec, "model", "mymodels:build_net", "point at a class or function")


def _call(fn: Callable[..., Any], spec: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        result = fn(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"calling {spec!r} with {sorted(kwargs)} failed: {exc}",
            hint="pass only keyword arguments its signature accepts",
        ) from exc
    if not isinstance(result, nn.Module):
        raise ConfigError(
            f"{spec!r} returned a {type(result).__name__}, not a torch.nn.Module",
            hint="the callable must build and return the network",
        )
    return result


def build_from_import_string(
    spec: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    **kwargs: Any,
) -> ExternalModel:
    """Import ``package.module:callable``, call it and wrap the result in :class:`ExternalModel`.

    ``num_classes`` and ``in_channels`` are passed only if the callable's signature accepts them; ``kwargs``
    are always passed.

    Raises:
        ConfigError: Malformed string, module or attribute missing, call failed, or result not a module.
    """
    fn = _resolve_import_string(spec)
    call_kwargs = _accepted(fn, {"num_classes": num_classes, "in_channels": in_channels})
    call_kwargs.update(kwargs)
    net = _call(fn, spec, call_kwargs)
    return ExternalModel(net, Normalize(mean, std, channels=in_channels))


def build_torchvision(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    **kwargs: Any,
) -> ExternalModel:
    """Build ``torchvision.models.get_model(name, num_classes=..., **kwargs)`` behind a :class:`Normalize`.

    Raises:
        AutoPruneError: torchvision cannot be imported (with the install hint).
        ConfigError: Unknown torchvision model, or ``in_channels`` other than 3.
    """
    tv = optional_import("torchvision", f"the torchvision model zoo (model 'torchvision:{name}')")
    if in_channels != 3:
        raise ConfigError(
            f"torchvision models take 3 input channels, the dataset has {in_channels}",
            hint="use a zoo model (`autoprune list models`) for grayscale data",
        )
    available = list(tv.models.list_models())
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=3)
        raise ConfigError(
            f"torchvision has no model {name!r}",
            hint=f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()",
        )

    def get(**kw: Any) -> Any:
        return tv.models.get_model(name, **kw)

    net = _call(get, f"torchvision:{name}", {"num_classes": num_classes, **kwargs})
    return ExternalModel(net, Normalize(mean, std, channels=in_channels))


def build_external(name: str, **kwargs: Any) -> ExternalModel:
    """Dispatch ``torchvision:<name>`` or ``module:callable`` (see the two builders for the arguments)."""
    if name.startswith(TORCHVISION_PREFIX):
        return build_torchvision(name[len(TORCHVISION_PREFIX) :], **kwargs)
    return build_from_import_string(name, **kwargs)
