"""What the analysis knows about each value of the traced graph: channel layouts, shape reads, attributes, uses.

A tensor's *channel layout* (:class:`Info`) is its channel dim and the list of segments ``(atom, stride)`` along
it: ``stride > 1`` appears after flattening ``C×H×W`` into a linear layer's input. Atoms are integers owned by
the analysis state (:class:`~autoprune.graph.state.Analysis`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Const", "Entries", "Info", "Segments", "SizeRef", "Use", "iter_infos"]

#: ``(atom, stride)`` segments along a channel dim.
Segments = tuple[tuple[int, int], ...]
#: ``(atom, offset, stride)`` entries of a tensor dim (segments with their positions).
Entries = list[tuple[int, int, int]]


@dataclass(frozen=True)
class Info:
    """Channel layout of a tensor value: the channel dim and its segments ``(atom, stride)``."""

    cdim: int
    segs: Segments


@dataclass(frozen=True)
class SizeRef:
    """The ``size()`` / ``shape`` of a tracked tensor: reading its channel entry freezes the channels."""

    info: Info
    ndim: int


@dataclass(frozen=True)
class Const:
    """A tensor attribute read with ``get_attr`` (a parameter or buffer used in a function)."""

    target: str


@dataclass
class Use:
    """One call of a module (or one use of an attribute) that slices tensors along a group."""

    module: str
    role: str
    entries: Entries
    tensors: list[tuple[str, int]]  # (tensor name, dim)
    full: int
    groups: int = 1  # > 1: the dims are the virtual input axis of a grouped conv weight (see TensorSlice)


def iter_infos(obj: Any) -> Iterator[Info]:
    """Every channel layout inside a (nested) analysis value (shape reads yield their tensor's layout)."""
    if isinstance(obj, Info):
        yield obj
    elif isinstance(obj, SizeRef):
        yield obj.info
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from iter_infos(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_infos(o)
