"""The form in which ``autoprune export`` ships a float model: batch norm folded, memory format chosen by timing.

Where the time of a pruned model goes on a CPU (results/benchmarks/latency.md, issue #21): batch norm costs an
op per conv until it is folded into the conv, and the memory layout decides how fast oneDNN's convolutions run
— channels-last (NHWC) is much faster at large batches on most conv nets, but can be slower at batch 1 for
narrow layers with odd channel counts (measured: a pruned ResNet-20 at batch 1 runs 1.4× *slower* in
channels-last, while ResNet-56 and MobileNetV2 gain at both batch 1 and batch 64). So the layout is not fixed:

* ``contiguous`` — the usual NCHW layout.
* ``channels_last`` — every 4-D weight in NHWC (the activations follow the first conv's output).
* ``auto`` (default) — both are timed on this machine, interleaved, at batch 1 and at :data:`LARGE_BATCH`;
  ``channels_last`` is chosen only when its geometric mean of the two latencies is lower by more than
  :data:`CHANNELS_LAST_MARGIN` (5 %). Otherwise the model stays ``contiguous``: the layout of the user's inputs,
  needing no conversion, and the one PyTorch's small-input convolution path (im2col, used at batch 1 for
  CIFAR-sized layers) runs without copying every activation. Measured on ResNet-56 at 50 % MACs
  (results/benchmarks/latency.md): the two layouts differ by 2–6 % there, less than this host's drift between
  two timing sessions, so a plain "lower wins" picked either layout by chance and the batch-1 speed-up with it.

The chosen layout is recorded in the artifact (``arch.json``'s ``memory_format``), so
:func:`autoprune.serialize.load_module` returns the model in it. The campaign's latency predictor times its
calibration candidates in the form defined here too, so its predictions are for what ``export`` writes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from autoprune.errors import ConfigError

__all__ = [
    "CHANNELS_LAST_MARGIN", "LARGE_BATCH", "MEMORY_FORMATS", "choose_memory_format", "deployable", "to_memory_format",
]

MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
#: The large batch at which ``auto`` times both layouts (beside batch 1).
LARGE_BATCH = 64

#: ``auto`` switches to channels-last only when it is faster than contiguous by more than this share (geometric
#: mean of the batch-1 and batch-:data:`LARGE_BATCH` latencies); within it the difference is timing noise.
CHANNELS_LAST_MARGIN = 0.05

MemoryFormat = Literal["auto", "contiguous", "channels_last"]


def _check(memory_format: str) -> None:
    if memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"unknown memory format {memory_format!r}",
                          hint=f"use one of {', '.join(MEMORY_FORMATS)}")


def has_4d_weights(model: nn.Module) -> bool:
    """Whether any parameter is 4-D (a 2-D convolution), i.e. whether the layout can matter at all."""
    return any(p.dim() == 4 for p in model.parameters())


def to_memory_format(model: nn.Module, memory_format: str) -> nn.Module:
    """``model`` with its 4-D tensors in ``memory_format`` (``contiguous`` or ``channels_last``), in place."""
    _check(memory_format)
    if memory_format == "auto":
        raise ConfigError("to_memory_format needs a concrete layout, got 'auto'",
                          hint="resolve it first with choose_memory_format()")
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    return model.to(memory_format=fmt)


def choose_memory_format(model: nn.Module, example_input: torch.Tensor, *, rounds: int = 5,
                         min_run_time: float = 0.05) -> tuple[str, dict[str, Any]]:
    """Time ``model`` in both layouts at batch 1 and :data:`LARGE_BATCH` (interleaved, 1 thread) and pick one.

    Returns:
        ``(layout, info)``: ``contiguous`` or ``channels_last``, and per layout and batch the low-quantile
        latency in ms (:attr:`autoprune.latency.LatencyResult.low_ms`) with the geometric means that decided.
        A model without 4-D weights is ``contiguous`` without timing.
    """
    from autoprune.latency import compare_latency

    if not has_4d_weights(model) or not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        return "contiguous", {"timed": False, "reason": "no 2-D convolution: the layout does not matter"}
    models = {fmt: to_memory_format(copy.deepcopy(model), fmt).eval() for fmt in ("contiguous", "channels_last")}
    one = example_input[:1]
    ms: dict[str, dict[str, float]] = {fmt: {} for fmt in models}
    for batch in (1, LARGE_BATCH):
        x = one.expand(batch, *one.shape[1:]).contiguous()
        res = compare_latency(models, x, rounds=rounds, threads=1, min_run_time=min_run_time * (1 + batch / 16))
        for fmt, r in res.items():
            ms[fmt][f"batch{batch}"] = r.low_ms
    geo = {fmt: math.sqrt(v["batch1"] * v[f"batch{LARGE_BATCH}"]) for fmt, v in ms.items()}
    best = "channels_last" if geo["channels_last"] < (1 - CHANNELS_LAST_MARGIN) * geo["contiguous"] else "contiguous"
    return best, {"timed": True, "ms": ms, "geometric_mean_ms": geo, "margin": CHANNELS_LAST_MARGIN, "chosen": best}


def deployable(model: nn.Module, example_input: torch.Tensor, *, fold_bn: bool = True,
               memory_format: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """The model as ``export`` ships it: batch norm folded (if ``fold_bn``), in the chosen memory layout.

    Args:
        model: A float model (e.g. ``pruning.apply``'s result); not modified.
        example_input: An input (batch 1 is enough); ``auto`` times the model on its first sample.
        fold_bn: Fold every Conv → BatchNorm pair (exact in eval mode).
        memory_format: ``auto``, ``contiguous`` or ``channels_last``.

    Returns:
        ``(module, info)`` with ``info["memory_format"]`` the layout used and, for ``auto``, the timings.
    """
    _check(memory_format)
    if fold_bn:
        from autoprune.quantization import fold_batchnorm

        out = fold_batchnorm(model).eval()
    else:
        out = copy.deepcopy(model).eval()
    info: dict[str, Any] = {"bn_folded": bool(fold_bn)}
    fmt = memory_format
    if fmt == "auto":
        fmt, info["memory_format_timing"] = choose_memory_format(out, example_input)
    info["memory_format"] = fmt
    return to_memory_format(out, fmt), info


def memory_format_summary(info: Mapping[str, Any]) -> str:
    """One plain sentence on the layout and why (for the model card)."""
    fmt = info.get("memory_format", "contiguous")
    timing = info.get("memory_format_timing") or {}
    if not timing.get("timed"):
        return f"Memory layout: {fmt}" + (f" ({timing['reason']})." if timing.get("reason") else ".")
    ms = timing["ms"]
    parts = [f"{f} {v['batch1']:.3f} ms at batch 1, {v[f'batch{LARGE_BATCH}']:.2f} ms at batch {LARGE_BATCH}"
             for f, v in ms.items()]
    margin = float(timing.get("margin", 0.0))
    return (f"Memory layout: {fmt}, chosen by timing both on this machine ({'; '.join(parts)}; channels_last only "
            f"when its geometric mean is more than {margin:.0%} lower).")
