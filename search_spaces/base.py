"""Building a :class:`~autoprune.problem.SearchSpace` from the engine's channel groups.

:func:`build_space` maps the engine's prunable groups to :class:`~autoprune.problem.GroupChoice`\\ s (legal
widths from :meth:`autoprune.graph.ChannelGroup.legal_widths`, at least ``ceil(min_ratio · size)``) and, with
``quantize=True``, the model's conv/linear layers to :class:`~autoprune.problem.LayerChoice`\\ s (the first
layer keeps 8-bit weights and a float input, the last layer is w8a8 — HAQ's floors, configurable).

Which groups a model family searches is decided by a :class:`SpacePreset` registered in
:data:`SEARCH_SPACES` (``generic``, ``cifar_resnet``, ``vgg``, ``mobilenetv2``); the family is inferred from
the model name when not given (:func:`infer_family`).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from autoprune.errors import ConfigError
from autoprune.problem import GroupChoice, LayerChoice, SearchSpace
from autoprune.registry import Registry

if TYPE_CHECKING:
    from autoprune.graph import ChannelGroup, GroupSet

DEFAULT_W_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)


def producers(group: ChannelGroup) -> list[str]:
    """Module names of the group's ``out`` members (the layers that create its channels), in order."""
    return list(dict.fromkeys(m.module for m in group.members if m.role == "out"))


def is_residual_stream(group: ChannelGroup) -> bool:
    """True if two or more layers produce the group's channels (they are summed: a residual stream)."""
    return len(producers(group)) >= 2


class SpacePreset:
    """Which groups and layers a model family searches. The base class (``generic``) searches everything.

    Args:
        residual: Search residual-stream groups (groups with several producers, coupled by additions).
            ``None`` takes the family's default (:attr:`default_residual`).
    """

    name: ClassVar[str] = "generic"
    default_residual: ClassVar[bool] = True

    def __init__(self, residual: bool | None = None) -> None:
        self.residual = self.default_residual if residual is None else bool(residual)

    def select_group(self, group: ChannelGroup) -> bool:
        """Whether a prunable engine group becomes a search dimension."""
        return self.residual or not is_residual_stream(group)


SEARCH_SPACES: Registry[type[SpacePreset]] = Registry("search space")

_FAMILY_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"^resnet\d+(_[ab])?$", "cifar_resnet"),
    (r"^vgg\d+(_bn)?$", "vgg"),
    (r"mobilenet_?v2", "mobilenetv2"),
)


def infer_family(model_name: str | None) -> str:
    """The search-space family of a model name (``resnet20`` → ``cifar_resnet``, unknown → ``generic``)."""
    if not model_name:
        return "generic"
    name = model_name.strip().lower()
    for pattern, family in _FAMILY_PATTERNS:
        if re.search(pattern, name):
            return family
    return "generic"


def _excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _group_choices(groups: GroupSet, preset: SpacePreset, round_to: int, min_ratio: float,
                   exclude: Sequence[str]) -> tuple[GroupChoice, ...]:
    choices = []
    for g in groups.prunable():
        names = [g.id, *producers(g), g.id.split(":")[0]]
        if any(_excluded(n, exclude) for n in names) or not preset.select_group(g):
            continue
        floor = math.ceil(min_ratio * g.size - 1e-9)
        widths = tuple(w for w in g.legal_widths(round_to) if floor <= w <= g.size)  # ascending, distinct
        if not widths or widths[-1] != g.size:
            widths = (*widths, int(g.size))
        choices.append(GroupChoice(group_id=g.id, size=int(g.size), widths=widths))
    return tuple(choices)


def quantizable_layers(groups: GroupSet | None = None, model: nn.Module | None = None) -> list[str]:
    """Conv/linear layers that take bit-widths, in execution order: exactly the layers that
    :func:`autoprune.quantization.quantizable_layers` lists (and ``quantization.apply`` / ``cost.closed_form``
    accept) for the group set's traced graph, or for ``model`` when no group set is given.

    Raises:
        ConfigError: If neither a group set nor a model is given.
    """
    from autoprune import quantization

    if groups is not None:
        return quantization.quantizable_layers(groups.graph_module)
    if model is None:
        raise ConfigError("cannot list quantizable layers: neither a group set nor a model was given",
                          hint="pass groups= (the engine's analysis) or model=")
    return quantization.quantizable_layers(model)


def _floor_bits(bits: Iterable[int | None], floor: int) -> tuple[int | None, ...]:
    numeric = sorted(b for b in bits if b is not None)
    if not numeric:
        return (None,)
    kept = tuple(b for b in numeric if b >= floor)
    return kept or (floor,)


def _layer_choices(layers: Sequence[str], w_bits: tuple[int, ...], a_bits: tuple[int | None, ...],
                   first_last_min_bits: int | None, exclude: Sequence[str]) -> tuple[LayerChoice, ...]:
    out = []
    last = len(layers) - 1
    for i, name in enumerate(layers):
        if _excluded(name, exclude):
            continue
        w, a = w_bits, a_bits
        if first_last_min_bits is not None and i in (0, last):
            w = _floor_bits(w_bits, first_last_min_bits)  # type: ignore[assignment]
            a = (None,) if i == 0 else _floor_bits(a_bits, first_last_min_bits)
        out.append(LayerChoice(layer=name, w_bits=tuple(w), a_bits=tuple(a)))
    return tuple(out)


def _check_bits(w_bits: Sequence[int], a_bits: Sequence[int | None], floor: int | None) -> None:
    if not w_bits:
        raise ConfigError("w_bits is empty", hint="e.g. w_bits=(2, 3, 4, 5, 6, 7, 8)")
    if not a_bits:
        raise ConfigError("a_bits is empty", hint="use a_bits=(None,) to keep activations float")
    for b in (*w_bits, *a_bits, *(() if floor is None else (floor,))):
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8):
            raise ConfigError(f"bit-width {b!r} is not an integer in 2..8", hint="bits are chosen from 2..8 (or None)")


def build_space(groups: GroupSet, *, family: str | None = None, model_name: str | None = None,
                model: nn.Module | None = None, round_to: int = 1, min_ratio: float = 0.2, prune: bool = True,
                quantize: bool = False, w_bits: Sequence[int] = DEFAULT_W_BITS,
                a_bits: Sequence[int | None] = (None,), first_last_min_bits: int | None = 8,
                exclude: Sequence[str] = (), residual: bool | None = None) -> SearchSpace:
    """Map the engine's groups (and layers) to a search space.

    Args:
        groups: The :class:`autoprune.graph.GroupSet` of the model.
        family: A name in :data:`SEARCH_SPACES`; inferred from ``model_name`` when ``None``.
        model_name: Model name used to infer the family (e.g. ``"resnet20"``).
        model: Not needed: the layers are listed from the group set's traced graph (kept for callers that pass it).
        round_to: Channel rounding step passed to each group's ``legal_widths``.
        min_ratio: Smallest keep ratio; widths below ``ceil(min_ratio · size)`` are dropped.
        prune: Include the prunable groups.
        quantize: Include the conv/linear layers as bit-width decisions.
        w_bits: Allowed weight bits.
        a_bits: Allowed input-activation bits (``None`` = float).
        first_last_min_bits: Bit floor of the first layer's weights and the last layer's weights and
            activations (the first layer's input stays float); ``None`` disables the floors.
        exclude: Glob patterns over group ids, producer module names and layer names to leave out.
        residual: Search residual-stream groups (``None``: the family's default).

    Raises:
        ConfigError: Unknown family, ``min_ratio`` outside (0, 1], ``round_to < 1``, or bad bit choices.
    """
    if not 0.0 < min_ratio <= 1.0:
        raise ConfigError(f"min_ratio must be in (0, 1], got {min_ratio}", hint="AMC uses 0.2")
    if int(round_to) < 1:
        raise ConfigError(f"round_to must be a positive integer, got {round_to}", hint="use 1, 8 or 16")
    family = family or infer_family(model_name)
    preset = SEARCH_SPACES.get(family)(residual=residual)
    group_choices = _group_choices(groups, preset, int(round_to), float(min_ratio), exclude) if prune else ()
    layer_choices: tuple[LayerChoice, ...] = ()
    if quantize:
        w = tuple(sorted(set(w_bits)))
        a = tuple(sorted(set(a_bits), key=lambda b: (b is None, b or 0)))
        _check_bits(w, a, first_last_min_bits)
        layer_choices = _layer_choices(quantizable_layers(groups, model), w, a, first_last_min_bits, exclude)
    return SearchSpace(groups=group_choices, layers=layer_choices, min_ratio=float(min_ratio))
