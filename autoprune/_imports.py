"""Lazy optional imports with an actionable message (torchvision, psycopg2, torchao, onnx, ...)."""

from __future__ import annotations

import importlib
from types import ModuleType

from autoprune.errors import AutoPruneError

_HINTS = {
    "torchvision": "install the `vision` extra (`pip install autoprune[vision]`) on a machine where a "
    "torchvision build matching your torch is available",
    "psycopg2": "install the `postgres` extra: `pip install autoprune[postgres]`",
    "onnx": "install the `onnx` extra: `pip install autoprune[onnx]` (onnx and onnxruntime)",
    "onnxruntime": "install the `onnx` extra: `pip install autoprune[onnx]` (onnx and onnxruntime)",
    "torchao": "install torchao matching your torch version: `pip install torchao`",
}


def optional_import(name: str, feature: str) -> ModuleType:
    """Import ``name`` or raise an :class:`AutoPruneError` that says which feature needs it and how to get it.

    Args:
        name: Module to import, e.g. ``"torchvision"``.
        feature: What the caller wanted to do, e.g. ``"the torchvision model zoo"``.
    """
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken build raising something else (CUDA-only wheels)
        top = name.split(".")[0]
        hint = _HINTS.get(top, f"install the `{top}` package")
        raise AutoPruneError(f"{feature} needs `{name}`, which cannot be imported here ({exc}).", hint) from exc


def is_available(name: str) -> bool:
    """True if ``name`` imports cleanly (optional features; serialize's known extension providers)."""
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True
