"""Predicted latency of candidates, from per-layer timings measured on this machine (issue #21).

A campaign with a latency budget or a latency objective prices every candidate's latency in microseconds of
arithmetic, without building it:

* **Layer sites.** Every ``Conv2d``/``Linear`` of the analysed model, with its kernel, stride, input size, groups
  and its input/output channel counts as affine functions of the group widths (from the engine's
  ``module_roles``), so a candidate's widths give every layer's configuration directly.
* **Per-layer table.** Each site's latency over a grid of (C_in, C_out) (five levels per dimension, one for a
  depthwise conv) is timed once on this machine with :class:`~autoprune.latency.LatencyTable` (batch and thread
  count from the config) and interpolated bilinearly in between. The table lives in the campaign directory,
  so a resumed search or a second worker reuses it; a table timed with other threads, batch or torch is
  replaced.
* **Calibration.** Conv and linear layers are not the whole story (batch norm, activations, residual adds,
  pooling and the per-op dispatch cost of a small model on a CPU), so the prediction is
  ``α·Σ table + β·activation elements + γ`` (all ≥ 0, α within [0.5, 2]), fitted by least squares on relative
  errors to end-to-end timings of the dense model (weighted most: budgets are fractions of it) and a few random
  candidates of the search space (interleaved rounds), built in the form ``autoprune export`` ships
  (:mod:`autoprune.deploy`). Every timing is a low quantile (:attr:`autoprune.latency.LatencyResult.low_ms`).
  The fit and its error on those candidates are stored beside the table and reused while the model and the
  settings stay the same.

What it predicts is the float model as PyTorch runs it (``autoprune export``'s model); bits do not change the
prediction (the exported quantized artifacts run float kernels in PyTorch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.errors import ConfigError
from autoprune.graph import GroupSet
from autoprune.graph.terms import affine
from autoprune.latency import LatencyTable, compare_latency
from autoprune.utils import atomic_write

__all__ = ["LatencyPredictor", "LayerSite", "layer_sites"]

log = logging.getLogger("autoprune.latency_model")

TABLE_FILE = "latency_table.json"
MODEL_FILE = "latency_model.json"
#: Fractions of a dimension's full size timed for the per-layer grid.
LEVELS = (0.125, 0.25, 0.5, 0.75, 1.0)
#: Bounds of α, the weight of the per-layer table in the calibrated prediction.
ALPHA_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class LayerSite:
    """One conv/linear layer of the analysed model and how its channel counts follow the widths.

    Attributes:
        name: Module name in the traced graph.
        op: ``conv`` or ``linear``.
        k: Kernel size (square kernels; 1 for linear).
        stride: Stride (1 for linear).
        h: Input height (tokens per sample for linear).
        w: Input width (1 for linear).
        out_hw: Output positions per sample (``H_out·W_out``; tokens for linear).
        groups: Conv groups at full width (1 for linear).
        depthwise: A depthwise conv (groups = C_in = C_out, all following one width).
        full_in: Input channels at full width.
        full_out: Output channels at full width.
        c_in: ``(const, coef)``: input channels as ``const + coef·w``.
        c_out: ``(const, coef)``: output channels as ``const + coef·w``.
    """

    name: str
    op: str
    k: int
    stride: int
    h: int
    w: int
    out_hw: int
    groups: int
    depthwise: bool
    full_in: int
    full_out: int
    c_in: tuple[float, np.ndarray]
    c_out: tuple[float, np.ndarray]

    def signature(self) -> str:
        """The layer's configuration at full width (sites with equal signatures share their grid)."""
        return "|".join(map(str, (self.op, self.k, self.stride, self.h, self.w, self.groups, self.depthwise,
                                  self.full_in, self.full_out)))


def layer_sites(groups: GroupSet) -> list[LayerSite]:
    """The conv/linear layers of ``groups``' traced model, with shapes from one forward pass of its example input.

    Layers the engine does not track (no ``module_roles`` entry) keep their full channels.
    """
    gm = groups.graph_module
    mods = {n: m for n, m in gm.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if isinstance(out, torch.Tensor):
                shapes.setdefault(name, (args[0].shape, out.shape))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    flags = {m: m.training for m in gm.modules()}  # the submodules are the user's: restore each one's own flag
    try:
        gm.eval()
        with torch.no_grad():
            gm(groups.example_input)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    idx = {g: i for i, g in enumerate(groups.prunable_ids)}
    sizes = {g.id: g.size for g in groups}
    p = len(idx)
    batch = max(1, groups.batch_size)
    sites = []
    for name, m in mods.items():
        if name not in shapes:
            continue
        x, y = shapes[name]
        full_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        full_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        roles = {role: groups.module_roles.get((name, role)) for role in ("in", "out", "dw")}
        dw = roles["dw"]
        if dw is not None:
            c_out = c_in = affine(dw[0], dw[1], idx, sizes, p)
        else:
            c_in = affine(full_in, roles["in"][1], idx, sizes, p) if roles["in"] else (float(full_in), np.zeros(p))
            c_out = affine(full_out, roles["out"][1], idx, sizes, p) if roles["out"] else (float(full_out),
                                                                                           np.zeros(p))
        if isinstance(m, nn.Conv2d):
            sites.append(LayerSite(name, "conv", int(m.kernel_size[0]), int(m.stride[0]), int(x[2]), int(x[3]),
                                   int(y[2] * y[3]), int(m.groups), dw is not None or
                                   (m.groups > 1 and m.groups == full_in == full_out), full_in, full_out, c_in, c_out))
        else:
            tokens = max(1, int(np.prod(x[:-1])) // batch)
            sites.append(LayerSite(name, "linear", 1, 1, tokens, 1, tokens, 1, False, full_in, full_out, c_in,
                                   c_out))
    return sites


def _levels(full: int, step: int = 1) -> list[int]:
    """Grid levels of a dimension of ``full`` channels, multiples of ``step`` (a grouped conv's group count)."""
    step = max(1, step)
    return sorted({max(step, step * round(full * f / step)) for f in LEVELS})


def _interp_index(levels: Sequence[int], x: float) -> tuple[int, int, float]:
    """Neighbouring grid positions of ``x`` and the weight of the upper one (linear extrapolation outside)."""
    if len(levels) == 1:
        return 0, 0, 0.0
    j = int(np.searchsorted(levels, x))
    j = min(max(j, 1), len(levels) - 1)
    lo, hi = levels[j - 1], levels[j]
    return j - 1, j, (x - lo) / (hi - lo)


@dataclass
class _Grid:
    """One signature's timed grid: ``ms[i, j]`` at ``levels_in[i]``, ``levels_out[j]``."""

    levels_in: list[int]
    levels_out: list[int]
    ms: np.ndarray

    def at(self, c_in: float, c_out: float) -> float:
        i0, i1, a = _interp_index(self.levels_in, c_in)
        j0, j1, b = _interp_index(self.levels_out, c_out)
        m = self.ms
        v = (1 - a) * ((1 - b) * m[i0, j0] + b * m[i0, j1]) + a * ((1 - b) * m[i1, j0] + b * m[i1, j1])
        return float(max(v, 0.25 * float(m.min())))


class LatencyPredictor:
    """Predicts the latency (ms) of a candidate of an analysed model from its widths (see the module docstring).

    Args:
        groups: The analysed model.
        directory: Where the table and the calibration are kept (the campaign directory); None keeps them in
            memory only.
        threads: Intra-op threads of the timings.
        batch: Batch size of the timings (the prediction is for this batch).
        min_run_time: Seconds of timed runs per table entry.
        deploy: The settings of the form the predicted model runs in (``fold_bn``, ``memory_format``: see
            :mod:`autoprune.deploy`); part of the calibration's fingerprint.
        layout: The memory layout the model runs in (``contiguous`` or ``channels_last``): the table's layers
            are timed in it.

    Attributes:
        build: ``widths -> module`` building a candidate in the predicted form (set by the campaign; used to
            measure).
    """

    def __init__(self, groups: GroupSet, directory: str | os.PathLike[str] | None = None, *, threads: int = 1,
                 batch: int = 1, min_run_time: float = 0.05, deploy: Mapping[str, Any] | None = None,
                 layout: str = "contiguous") -> None:
        self.groups = groups
        self.deploy = dict(deploy or {})
        self.layout = layout
        self.build: Callable[[Mapping[str, int]], nn.Module] | None = None
        self.directory = Path(directory) if directory is not None else None
        self.threads, self.batch, self.min_run_time = int(threads), int(batch), float(min_run_time)
        self.sites = layer_sites(groups)
        self.table = self._open_table()
        self._grids: dict[str, _Grid] = {}
        self._memo: dict[tuple[str, float, float], float] = {}  # (site, C_in, C_out) -> interpolated ms
        self._mats: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.coef: tuple[float, float, float] | None = None  # α, β (per million activation elements), γ
        self.fit: dict[str, Any] = {}
        self._index = {g: i for i, g in enumerate(groups.prunable_ids)}
        self._full = np.asarray([groups[g].size for g in groups.prunable_ids], dtype=np.float64)

    # -- files ------------------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {"threads": self.threads, "batch": self.batch, "torch": torch.__version__, "layout": self.layout}

    @staticmethod
    def stored_layout(directory: str | os.PathLike[str] | None, deploy: Mapping[str, Any]) -> str | None:
        """The layout of a calibration stored in ``directory`` for these deploy settings (None if there is none):
        ``memory_format: auto`` is resolved once and kept."""
        path = Path(directory) / MODEL_FILE if directory is not None else None
        try:
            doc = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        except (OSError, ValueError):
            return None
        layout = doc.get("layout") if isinstance(doc, dict) and doc.get("deploy") == dict(deploy) else None
        return layout if layout in ("contiguous", "channels_last") else None

    def _open_table(self) -> LatencyTable:
        path = self.directory / TABLE_FILE if self.directory is not None else None
        if path is not None and path.is_file():
            try:
                doc = json.loads(path.read_text())
                same = {k: doc.get(k, "contiguous" if k == "layout" else None)
                        for k in ("threads", "batch", "torch", "layout")} == self._settings()
            except (OSError, ValueError):
                same = False
            if not same:
                log.info("latency table %s was timed with other settings (threads, batch or torch): timing it "
                         "again", path)
                path.unlink(missing_ok=True)
        try:
            return LatencyTable(path, threads=self.threads, batch=self.batch, min_run_time=self.min_run_time,
                                layout=self.layout)
        except ConfigError as exc:  # a damaged table: time it again
            log.info("latency table %s cannot be read (%s): timing it again", path, exc.message)
            if path is not None:
                path.unlink(missing_ok=True)
            return LatencyTable(path, threads=self.threads, batch=self.batch, min_run_time=self.min_run_time,
                                layout=self.layout)

    def fingerprint(self) -> str:
        """Identifies the model's layer sites and the timing settings (a stored calibration must match it)."""
        text = json.dumps([[s.name, s.signature()] for s in self.sites]
                          + [self._settings(), {"min_run_time": self.min_run_time}, self.deploy])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # -- the per-layer table ----------------------------------------------------------------------------
    def _grid(self, site: LayerSite) -> _Grid:
        sig = site.signature()
        grid = self._grids.get(sig)
        if grid is None:
            if site.depthwise:
                lv = _levels(site.full_out)
                ms = np.asarray([[self._time(site, c, c)] for c in lv])
                grid = _Grid(lv, [0], ms)
            else:
                lin, lout = _levels(site.full_in, site.groups), _levels(site.full_out, site.groups)
                ms = np.asarray([[self._time(site, a, b) for b in lout] for a in lin])
                grid = _Grid(lin, lout, ms)
            self._grids[sig] = grid
        return grid

    def _time(self, site: LayerSite, c_in: int, c_out: int) -> float:
        groups = c_out if site.depthwise else site.groups
        return self.table.lookup(site.op, c_in, c_out, site.k, site.stride, site.h, site.w, groups)

    def fill(self, progress: Callable[[str], None] | None = None) -> int:
        """Time every grid point not yet in the table (saved when a directory is set); returns how many."""
        before = self.table.misses
        signatures = {s.signature(): s for s in self.sites}
        for i, site in enumerate(signatures.values()):
            if progress is not None and site.signature() not in self._grids:
                progress(f"latency table: layer configuration {i + 1}/{len(signatures)} ({site.op} "
                         f"{site.full_in}→{site.full_out}, k{site.k}, {site.h}×{site.w})")
            self._grid(site)
        new = self.table.misses - before
        if new and self.table.path is not None:
            self.table.save()
        return new

    # -- prediction -------------------------------------------------------------------------------------
    def width_vector(self, widths: Mapping[str, int]) -> np.ndarray:
        """The prunable widths as a vector (groups not listed at full width)."""
        w = self._full.copy()
        for g, v in widths.items():
            i = self._index.get(g)
            if i is not None:
                w[i] = float(v)
        return w

    def _matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._mats is None:
            p = len(self._full)
            self._mats = (np.asarray([s.c_in[0] for s in self.sites]),
                          np.asarray([s.c_in[1] for s in self.sites]).reshape(len(self.sites), p),
                          np.asarray([s.c_out[0] for s in self.sites]),
                          np.asarray([s.c_out[1] for s in self.sites]).reshape(len(self.sites), p),
                          np.asarray([s.out_hw for s in self.sites], dtype=np.float64))
        return self._mats

    def features(self, widths: Mapping[str, int]) -> tuple[float, float]:
        """(Σ of the table's layer latencies in ms, activation elements of the conv/linear outputs in millions)."""
        w = self.width_vector(widths)
        a0, a, b0, b, hw = self._matrices()
        c_in, c_out = a0 + a @ w, b0 + b @ w
        table = 0.0
        for s, ci, co in zip(self.sites, c_in.tolist(), c_out.tolist(), strict=True):
            key = (s.name, ci, co)
            ms = self._memo.get(key)
            if ms is None:
                ms = self._memo[key] = self._grid(s).at(ci, co)
            table += ms
        return table, float(c_out @ hw) * self.batch / 1e6

    def predict(self, widths: Mapping[str, int]) -> float:
        """Predicted latency in ms of the candidate with these widths (the table sum until calibrated)."""
        table, act = self.features(widths)
        if self.coef is None:
            return table
        a, b, c = self.coef
        return max(a * table + b * act + c, 1e-6)

    # -- measurement ------------------------------------------------------------------------------------
    def measure(self, build: Callable[[Mapping[str, int]], nn.Module] | None,
                candidates: Mapping[str, Mapping[str, int]], example_input: torch.Tensor, *,
                rounds: int = 3) -> dict[str, dict[str, float]]:
        """Time the candidates (built with ``build``, default :attr:`build`) end to end, interleaved, at this
        predictor's batch and threads.

        Returns:
            ``{name: {"predicted_ms", "measured_ms", "median_ms", "iqr_ms"}}``; ``measured_ms`` is the low
            quantile (:attr:`autoprune.latency.LatencyResult.low_ms`), the statistic the prediction is fitted to.
        """
        build = build or self.build
        if build is None:
            raise ConfigError("the latency predictor has no model builder", hint="pass build=")
        x = example_input[:1].expand(self.batch, *example_input.shape[1:]).contiguous()
        models = {name: build(w).eval() for name, w in candidates.items()}
        measured = compare_latency(models, x, rounds=rounds, threads=self.threads, min_run_time=self.min_run_time)
        return {name: {"predicted_ms": self.predict(candidates[name]), "measured_ms": r.low_ms,
                       "median_ms": r.median_ms, "iqr_ms": r.iqr_ms} for name, r in measured.items()}

    # -- calibration ------------------------------------------------------------------------------------
    def load_calibration(self, candidates: int | None = None) -> bool:
        """Use the stored calibration if it was fitted for this model and these settings (and, when given, on
        this many candidates)."""
        if self.directory is None or not (self.directory / MODEL_FILE).is_file():
            return False
        try:
            doc = json.loads((self.directory / MODEL_FILE).read_text())
            if doc.get("fingerprint") != self.fingerprint():
                return False
            if candidates is not None and doc.get("fit", {}).get("candidates") != candidates:
                return False
            self.coef = tuple(float(x) for x in doc["coef"])  # type: ignore[assignment]
            self.fit = dict(doc.get("fit", {}))
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def calibrate(self, build: Callable[[Mapping[str, int]], nn.Module], candidates: Sequence[Mapping[str, int]],
                  example_input: torch.Tensor, *, rounds: int = 5, anchor: int | None = 0,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Fit ``α, β, γ`` to end-to-end timings of ``candidates`` (built with ``build``), timed interleaved.

        The fit minimises relative errors; ``anchor`` (default 0: the campaign puts the dense model first) is
        weighted as much as all other candidates together, so a budget given as a fraction of the dense latency
        reads a near-exact denominator.

        Returns:
            The fit: candidates, coefficients, largest and median relative error on the calibration set.
        """
        if len(candidates) < 3:
            raise ConfigError("latency calibration needs at least 3 candidates", hint="calibration: 8")
        if progress is not None:
            progress(f"latency calibration: timing {len(candidates)} candidates end to end ({rounds} interleaved "
                     "rounds)")
        measured = self.measure(build, {str(i): c for i, c in enumerate(candidates)}, example_input, rounds=rounds)
        self.fit_timings(candidates, [measured[str(i)]["measured_ms"] for i in range(len(candidates))],
                         anchor=anchor)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            doc = {"version": 1, "fingerprint": self.fingerprint(), **self._settings(), "deploy": self.deploy,
                   "coef": list(self.coef),
                   "coef_meaning": "ms = a * table_ms + b * activation_millions + c", "fit": self.fit}
            atomic_write(self.directory / MODEL_FILE, json.dumps(doc, indent=1))
        return self.fit


    def fit_timings(self, candidates: Sequence[Mapping[str, int]], measured_ms: Sequence[float], *,
                    anchor: int | None = 0) -> dict[str, Any]:
        """Fit ``α, β, γ`` to given end-to-end timings of ``candidates`` (see :meth:`calibrate`, which times
        them first); sets :attr:`coef` and :attr:`fit` without saving them."""
        y = np.asarray(measured_ms, dtype=np.float64)
        feats = np.asarray([[*self.features(c), 1.0] for c in candidates])
        # Relative errors are what matter (a budget is a fraction): every row is divided by its measurement; the
        # anchor (the dense model: fractional budgets are fractions of its latency) weighs as much as all others.
        weight = 1.0 / y
        if anchor is not None:
            weight[anchor] *= math.sqrt(len(candidates))
        coef = _nonnegative_lstsq(feats * weight[:, None], y * weight)
        # The table's share stays between half and twice its sum: a noisy fit on a tiny model (all constant) must
        # not make the prediction blind to the widths. β and γ are refitted on what the table leaves.
        alpha = float(np.clip(coef[0], *ALPHA_RANGE))
        if alpha != coef[0]:
            coef = np.concatenate([[alpha], _nonnegative_lstsq(feats[:, 1:] * weight[:, None],
                                                               (y - alpha * feats[:, 0]) * weight)])
        self.coef = (float(coef[0]), float(coef[1]), float(coef[2]))
        pred = np.asarray([self.predict(c) for c in candidates])
        rel = np.abs(pred / y - 1.0)
        self.fit = {"candidates": len(candidates), "measured_ms": y.round(5).tolist(),
                    "predicted_ms": pred.round(5).tolist(), "max_rel_error": float(rel.max()),
                    "median_rel_error": float(np.median(rel))}
        return self.fit

def _nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient ≥ 0 (an active-set loop over three features)."""
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0.0
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef
