"""The results file of the search benchmarks (``search_quality``, ``search_budget``): cells as published and as run.

On disk ``cells`` is a list of records, each headed by the fields a reader compares searchers by
(:data:`PUBLISHED`: ``model``, ``target``, ``searcher``, ``seed``, ``candidates``, ``val_best``, ``macs_ratio``,
``test_after_ft``; ``None`` where a cell failed), followed by the rest of what the cell measured. In memory the
benchmarks keep a mapping from :func:`cell_key` to record, which is what resuming, merging and superseding need.
:func:`to_file` and :func:`from_file` convert between the two; :func:`from_file` also reads files written before the
list form (a mapping, and the older field names of :data:`LEGACY_NAMES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The leading fields of every published cell record.
PUBLISHED = ("model", "target", "searcher", "seed", "candidates", "val_best", "macs_ratio", "test_after_ft")
#: Field names of files written before the published form → today's names.
LEGACY_NAMES = {"best_val": "val_best", "macs_fraction": "macs_ratio", "evaluated": "candidates"}
#: Top-level entries that hold cell records inside ``{"record": …}`` entries (superseded and rebuilt cells).
_ENTRY_LISTS = ("superseded", "rebuilt")


def cell_key(model: str, target: float, searcher: str, seed: int) -> str:
    """The key of one grid cell in memory (and in ``superseded``/``rebuilt`` of the file)."""
    return f"{model}|{target:g}|{searcher}|{seed}"


def _renamed(rec: Mapping[str, Any]) -> dict[str, Any]:
    """Today's field names; the measured fields :func:`published` filled with ``None`` are left out again."""
    out = {LEGACY_NAMES.get(k, k): v for k, v in rec.items()}
    return {k: v for k, v in out.items() if v is not None or k not in PUBLISHED[4:]}


def published(rec: Mapping[str, Any]) -> dict[str, Any]:
    """One cell record in its published order: :data:`PUBLISHED` first (``None`` if missing), then the rest."""
    return {**{k: rec.get(k) for k in PUBLISHED}, **{k: v for k, v in rec.items() if k not in PUBLISHED}}


def to_file(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with its cells as the published list, in the order they were finished (the tables' order)."""
    return {**raw, "cells": [published(rec) for rec in (raw.get("cells") or {}).values()]}


def _entry(value: Any) -> Any:
    if isinstance(value, Mapping) and isinstance(value.get("record"), Mapping):
        return {**value, "record": _renamed(value["record"])}
    if isinstance(value, Mapping):  # an older file kept a bare record
        return _renamed(value)
    return value


def from_file(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A results file as the benchmarks use it: cells keyed by :func:`cell_key`, today's field names.

    Accepts the published list and the older mapping; records that lack a grid coordinate are dropped from a
    list (they cannot be resumed or compared).
    """
    raw = dict(obj)
    cells = raw.get("cells") or {}
    if isinstance(cells, Mapping):
        raw["cells"] = {str(k): _renamed(v) for k, v in cells.items() if isinstance(v, Mapping)}
    else:
        out: dict[str, dict[str, Any]] = {}
        for rec in cells:
            if isinstance(rec, Mapping) and all(rec.get(k) is not None for k in ("model", "target", "searcher",
                                                                                  "seed")):
                rec = _renamed(rec)
                out[cell_key(str(rec["model"]), float(rec["target"]), str(rec["searcher"]), int(rec["seed"]))] = rec
        raw["cells"] = out
    for name in _ENTRY_LISTS:
        if isinstance(raw.get(name), Mapping):
            raw[name] = {k: [_entry(e) for e in v] if isinstance(v, list) else _entry(v)
                         for k, v in raw[name].items()}
    return raw
