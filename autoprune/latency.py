"""Measured CPU latency: single-model timing, interleaved comparisons and a per-layer lookup table (ENGINE.md §6.3).

Timings use ``torch.utils.benchmark.Timer(...).blocked_autorange`` with a fixed intra-op thread count (one by
default: two-thread timings on small shared machines are erratic, ENGINE.md §7.4), the model in eval mode
under ``torch.inference_mode()``, a fixed input shape and warm-up calls that absorb lazy initialisation
(oneDNN primitive caches). The caller's thread count and the model's training flag are restored.

Latency is not monotonic in width, so MACs stay the search proxy; measured latency is for final candidates
(:func:`measure_latency`, :func:`compare_latency`, which interleaves models A B A B to spread background
load evenly) and for a lazily filled per-layer table (:class:`LatencyTable`) keyed by
(op, C_in, C_out, k, stride, H, W, groups, bits).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Timer

from autoprune.errors import AutoPruneError, ConfigError
from autoprune.types import QuantSpec
from autoprune.utils import atomic_write

__all__ = ["LatencyResult", "LatencyTable", "LayerKey", "compare_latency", "measure_latency"]


@dataclass(frozen=True)
class LatencyResult:
    """One latency measurement.

    Attributes:
        median_ms: Median time per call in milliseconds.
        iqr_ms: Inter-quartile range of the per-run times in milliseconds.
        runs: Number of timed runs (each run averages ``number_per_run`` calls).
        threads: Intra-op threads used.
        batch: Batch size of the input (first dimension).
        rounds_ms: Per-round medians for :func:`compare_latency` (empty for a single measurement).
        low_ms: The 10th percentile of the per-run times in milliseconds (the smallest with fewer than ten
            runs). Other processes only ever add time, so on a shared machine the median follows their load
            while a low quantile stays close to what the model costs when it has the core: it is the statistic
            the per-layer table, the latency predictor and its calibration use.
    """

    median_ms: float
    iqr_ms: float
    runs: int
    threads: int
    batch: int
    rounds_ms: tuple[float, ...] = ()
    low_ms: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        d = asdict(self)
        d["rounds_ms"] = list(self.rounds_ms)
        return d


def _check(threads: int, min_run_time: float) -> None:
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}", hint="use threads=1")
    if not min_run_time > 0:
        raise ConfigError(f"min_run_time must be > 0 seconds, got {min_run_time!r}", hint="e.g. min_run_time=0.5")


def _batch(example_input: torch.Tensor) -> int:
    return int(example_input.shape[0]) if isinstance(example_input, torch.Tensor) and example_input.dim() else 1


def _times(model: nn.Module, example_input: torch.Tensor, threads: int, min_run_time: float,
           warmup: int) -> list[float]:
    """Per-run times in seconds (model already in eval mode, threads already set)."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(example_input)
        timer = Timer(stmt="model(x)", globals={"model": model, "x": example_input}, num_threads=threads)
        return list(timer.blocked_autorange(min_run_time=min_run_time).times)


def _summary(times_s: list[float]) -> tuple[float, float, float]:
    """Median, inter-quartile range and 10th percentile (:attr:`LatencyResult.low_ms`) in milliseconds."""
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) < 2:
        return ms[0], 0.0, ms[0]
    q = statistics.quantiles(ms, n=4, method="inclusive")
    low = statistics.quantiles(ms, n=10, method="inclusive")[0] if len(ms) >= 10 else ms[0]
    return statistics.median(ms), q[2] - q[0], low


def measure_latency(model: nn.Module, example_input: torch.Tensor, *, threads: int = 1, min_run_time: float = 0.5,
                    warmup: int = 3) -> LatencyResult:
    """Median and IQR of ``model(example_input)`` on the CPU.

    Args:
        model: Any callable module (float, fake-quantized or int8).
        example_input: Input tensor (its first dimension is reported as the batch size).
        threads: Intra-op threads during the measurement (restored afterwards).
        min_run_time: Seconds of timed runs (``blocked_autorange``).
        warmup: Untimed calls before timing.

    Raises:
        ConfigError: Non-positive ``threads`` or ``min_run_time``.
        AutoPruneError: If the model fails on ``example_input``.
    """
    _check(threads, min_run_time)
    prev_threads, was_training = torch.get_num_threads(), model.training
    try:
        model.eval()
        torch.set_num_threads(threads)
        times = _times(model, example_input, threads, min_run_time, warmup)
    except RuntimeError as exc:
        raise AutoPruneError(f"the model failed on the example input while timing: {exc}",
                             hint="check the input shape and dtype") from exc
    finally:
        torch.set_num_threads(prev_threads)
        model.train(was_training)
    median, iqr, low = _summary(times)
    return LatencyResult(median_ms=median, iqr_ms=iqr, runs=len(times), threads=threads, batch=_batch(example_input),
                         low_ms=low)


def compare_latency(models: Mapping[str, nn.Module], example_input: torch.Tensor, *, rounds: int = 3, threads: int = 1,
                    min_run_time: float = 0.2, warmup: int = 3) -> dict[str, LatencyResult]:
    """Time several models in interleaved rounds (A B A B …) so background load hits all of them alike.

    Every model is warmed up first; each round times each model for ``min_run_time`` seconds. The result per
    model pools the per-run times of all rounds (median, IQR) and lists the per-round medians.
    """
    _check(threads, min_run_time)
    if rounds < 1 or not models:
        raise ConfigError("compare_latency needs at least one model and one round", hint="rounds=3")
    prev_threads = torch.get_num_threads()
    flags = {name: m.training for name, m in models.items()}
    pooled: dict[str, list[float]] = {name: [] for name in models}
    per_round: dict[str, list[float]] = {name: [] for name in models}
    try:
        torch.set_num_threads(threads)
        for m in models.values():
            m.eval()
            with torch.inference_mode():
                for _ in range(warmup):
                    m(example_input)
        for _ in range(rounds):
            for name, m in models.items():
                times = _times(m, example_input, threads, min_run_time, 0)
                pooled[name].extend(times)
                per_round[name].append(_summary(times)[0])
    finally:
        torch.set_num_threads(prev_threads)
        for name, m in models.items():
            m.train(flags[name])
    out: dict[str, LatencyResult] = {}
    for name, times in pooled.items():
        median, iqr, low = _summary(times)
        out[name] = LatencyResult(median, iqr, len(times), threads, _batch(example_input), tuple(per_round[name]),
                                  low)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Per-layer lookup table
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerKey:
    """Lookup-table key of one layer. ``bits`` is 32 (fp32) or 8 (int8 kernels; stock PyTorch has no sub-8-bit
    CPU kernels, so every b ≤ 8 is timed as int8). For ``linear``, ``h·w`` is the number of tokens per sample."""

    op: str
    c_in: int
    c_out: int
    k: int = 1
    stride: int = 1
    h: int = 1
    w: int = 1
    groups: int = 1
    bits: int = 32

    def __str__(self) -> str:
        return "|".join(str(v) for v in (self.op, self.c_in, self.c_out, self.k, self.stride, self.h, self.w,
                                           self.groups, self.bits))

    @classmethod
    def parse(cls, text: str) -> LayerKey:
        """Inverse of ``str(key)``."""
        parts = text.split("|")
        if len(parts) != 9:
            raise ConfigError(f"malformed latency-table key {text!r}")
        return cls(parts[0], *(int(p) for p in parts[1:]))


def _norm_bits(bits: int | None) -> int:
    if bits is None or bits == 32:
        return 32
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"bits must be None/32 (fp32) or 1..8 (int8 kernels), got {bits!r}")
    return 8


class LatencyTable:
    """Per-layer latency (ms) filled lazily by timing single layers; persisted as JSON.

    An entry is the layer's :attr:`LatencyResult.low_ms` (a low quantile: stable on a shared machine).

    Args:
        path: JSON file to load from (if it exists) and to :meth:`save` to.
        threads: Intra-op threads for the measurements (part of the file; a mismatch is refused).
        batch: Batch size of the single-layer inputs (part of the file).
        min_run_time: Seconds of timed runs per new entry.
        layout: Memory layout of the timed conv layers and their inputs, ``contiguous`` or ``channels_last``
            (:mod:`autoprune.deploy`; part of the file).
    """

    VERSION = 2  # 2: entries are low quantiles (version 1 held medians)

    def __init__(self, path: str | os.PathLike[str] | None = None, *, threads: int = 1, batch: int = 1,
                 min_run_time: float = 0.1, layout: str = "contiguous") -> None:
        _check(threads, min_run_time)
        if layout not in ("contiguous", "channels_last"):
            raise ConfigError(f"unknown memory layout {layout!r}", hint="use contiguous or channels_last")
        self.path = Path(path) if path is not None else None
        self.threads, self.batch, self.min_run_time, self.layout = threads, batch, min_run_time, layout
        self.entries: dict[str, float] = {}
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.is_file():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read latency table {path}: {exc}", hint="delete the file to rebuild it") from exc
        if not isinstance(doc, dict) or doc.get("version") != self.VERSION:
            raise ConfigError(f"{path} is not a version-{self.VERSION} latency table", hint="delete it to rebuild")
        have = (doc.get("threads"), doc.get("batch"), doc.get("layout", "contiguous"))
        if have != (self.threads, self.batch, self.layout):
            raise ConfigError(
                f"{path} was measured with threads={have[0]}, batch={have[1]}, layout {have[2]}; "
                f"this table uses threads={self.threads}, batch={self.batch}, layout {self.layout}",
                hint="use the same settings or another file")
        entries = doc.get("entries", {})
        for k, v in entries.items():
            LayerKey.parse(k)
            self.entries[k] = float(v)

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the table as JSON (to ``path`` or the constructor's path)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ConfigError("no path to save the latency table to", hint="pass path=...")
        target.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": self.VERSION, "threads": self.threads, "batch": self.batch, "layout": self.layout,
               "unit": "ms", "statistic": "p10",
               "torch": torch.__version__, "entries": dict(sorted(self.entries.items()))}
        return atomic_write(target, json.dumps(doc, indent=1))

    def key(self, op: str, c_in: int, c_out: int, k: int = 1, stride: int = 1, h: int = 1, w: int = 1,
            groups: int = 1, bits: int | None = None) -> LayerKey:
        """Normalised key (``op`` is ``conv`` or ``linear``; ``bits`` None/32 → fp32, ≤ 8 → int8)."""
        if op not in ("conv", "linear"):
            raise ConfigError(f"unknown layer op {op!r}", hint="use 'conv' or 'linear'")
        return LayerKey(op, int(c_in), int(c_out), int(k), int(stride), int(h), int(w), int(groups), _norm_bits(bits))

    def lookup(self, op: str, c_in: int, c_out: int, k: int = 1, stride: int = 1, h: int = 1, w: int = 1,
               groups: int = 1, bits: int | None = None) -> float:
        """Latency in ms of one layer, measured on first use and cached."""
        key = self.key(op, c_in, c_out, k, stride, h, w, groups, bits)
        text = str(key)
        if text in self.entries:
            self.hits += 1
            return self.entries[text]
        self.misses += 1
        ms = self._measure(key)
        self.entries[text] = ms
        return ms

    def _layer(self, key: LayerKey) -> tuple[nn.Module, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        if key.op == "conv":
            x = torch.rand(self.batch, key.c_in, key.h, key.w, generator=gen)
            if key.bits == 8:
                qnn = _ao_nn()
                layer = qnn.Conv2d(key.c_in, key.c_out, key.k, stride=key.stride, padding=key.k // 2,
                                   groups=key.groups)
                return layer, torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
            conv = nn.Conv2d(key.c_in, key.c_out, key.k, stride=key.stride, padding=key.k // 2, groups=key.groups)
            if self.layout == "channels_last":
                return conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            return conv, x
        x = torch.rand(self.batch * key.h * key.w, key.c_in, generator=gen)
        if key.bits == 8:
            return _ao_nn().Linear(key.c_in, key.c_out), torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
        return nn.Linear(key.c_in, key.c_out), x

    def _measure(self, key: LayerKey) -> float:
        try:
            layer, x = self._layer(key)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot build a layer for latency key {key}: {exc}",
                              hint="check channels / groups / kernel size") from exc
        return measure_latency(layer, x, threads=self.threads, min_run_time=self.min_run_time).low_ms

    def estimate(self, model: nn.Module, example_input: torch.Tensor,
                 bits: Mapping[str, int | QuantSpec | None] | None = None) -> float:
        """Σ of table latencies over the model's ``Conv2d``/``Linear`` layers (shapes from one forward pass).

        ``bits`` maps layer names to an int, a ``QuantSpec`` (its ``w_bits`` is used) or None; unlisted layers are
        fp32. Elementwise ops, pooling and BN are not included: compare with end-to-end timings before trusting it.
        """
        shapes: dict[str, tuple[nn.Module, torch.Size]] = {}

        def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
                shapes.setdefault(name, (mod, args[0].shape))

            return hook

        handles = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()
                   if isinstance(m, nn.Conv2d | nn.Linear)]
        was = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(example_input)
        finally:
            for h in handles:
                h.remove()
            model.train(was)
        total = 0.0
        batch = max(1, example_input.shape[0])
        for name, (m, shape) in shapes.items():
            spec = (bits or {}).get(name)
            b = spec.w_bits if isinstance(spec, QuantSpec) else spec
            if isinstance(m, nn.Conv2d):
                total += self.lookup("conv", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0],
                                     shape[2], shape[3], m.groups, b)
            else:
                tokens = max(1, int(torch.tensor(shape[:-1]).prod()) // batch)
                total += self.lookup("linear", m.in_features, m.out_features, 1, 1, tokens, 1, 1, b)
        return total


def _ao_nn() -> ModuleType:
    from autoprune._imports import optional_import

    qnn = optional_import("torch.ao.nn.quantized", "int8 latency-table entries")
    engines = torch.backends.quantized.supported_engines
    engine = "x86" if "x86" in engines else "fbgemm" if "fbgemm" in engines else None
    if engine is None:
        raise AutoPruneError("this torch build has no x86/fbgemm quantized engine", hint="time fp32 layers only")
    torch.backends.quantized.engine = engine
    return qnn
