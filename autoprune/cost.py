"""Closed-form cost of a pruned (and optionally quantized) network as a function of group widths.

This module owns the cost model of ENGINE.md §6: MACs (multiply-accumulates of conv, linear, matmul and
attention, per sample), parameter counts, storage bytes at fp32 or at per-layer bit-widths, and BitOps. Every
conv/linear term is bilinear in two group widths, so

    cost(w) = Σ κ_ij·w_i·w_j + Σ λ_i·w_i + c0

with coefficients built once by :func:`autoprune.graph.analyze` (:func:`build_terms`). Pricing a candidate
(:func:`closed_form`) builds no model and takes microseconds. :func:`count_macs` (``FlopCounterMode``) is the
test oracle; :func:`expected_cost` is the differentiable form for expected widths (DMCP).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from autoprune.errors import ConfigError
from autoprune.types import Candidate, CostReport, QuantSpec

if TYPE_CHECKING:
    from autoprune.graph import CostTerms, GroupSet

__all__ = [
    "build_terms",
    "closed_form",
    "count_macs",
    "count_params",
    "expected_cost",
    "min_cost",
    "width_vector",
]

FLOAT_BITS = 32


# ----------------------------------------------------------------------------------------------------------------
# Building the coefficients (called by graph.analyze)
# ----------------------------------------------------------------------------------------------------------------


def _affine(shape_d: int, entries: list[tuple[str, int, int]] | None, idx: Mapping[str, int],
            sizes: Mapping[str, int], p: int) -> tuple[float, np.ndarray]:
    const = float(shape_d)
    coef = np.zeros(p)
    for g, _off, s in entries or ():
        if g in idx:
            const -= sizes[g] * s
            coef[idx[g]] += s
    return const, coef


def build_terms(prunable: list[str], sizes: Mapping[str, int],
                tensor_dims: Mapping[str, Mapping[int, list[tuple[str, int, int]]]],
                tensor_shapes: Mapping[str, tuple[int, ...]], mac_terms: list[tuple[str, float]],
                macs_const: float, batch: int, param_names: set[str],
                module_roles: Mapping[tuple[str, str], Any], canon: Mapping[str, str]) -> CostTerms:
    """Build the per-tensor cost rows of a model (see :class:`autoprune.graph.CostTerms`).

    Args:
        prunable: Prunable group ids; their order defines the width vector.
        sizes: Full width of every group.
        tensor_dims: ``tensor -> {dim: [(group id, offset, stride)]}``.
        tensor_shapes: Full shape of every parameter and buffer.
        mac_terms: ``(weight tensor, multiplier)``: MACs of one call = multiplier × numel(weight).
        macs_const: Per-sample MACs of ops whose operands are frozen.
        batch: Batch size of the example input (multipliers are divided by it).
        param_names: Canonical names of the parameters (counted in ``params``).
        module_roles: ``(module, role) -> (full, entries)`` from the analysis (unused here, kept for layers).
        canon: Any tensor name -> canonical name.
    """
    from autoprune.graph import CostTerms

    idx = {g: i for i, g in enumerate(prunable)}
    p = len(prunable)
    rows: dict[str, int] = {}
    k_l: list[float] = []
    a_l: list[np.ndarray] = []
    a0_l: list[float] = []
    b_l: list[np.ndarray] = []
    b0_l: list[float] = []
    names: list[str] = []

    def add_row(name: str, k: float, a0: float, a: np.ndarray, b0: float, b: np.ndarray) -> int:
        rows[name] = len(k_l)
        names.append(name)
        k_l.append(k)
        a0_l.append(a0)
        a_l.append(a)
        b0_l.append(b0)
        b_l.append(b)
        return rows[name]

    def tensor_row(t: str) -> int:
        if t in rows:
            return rows[t]
        shape = tensor_shapes[t]
        dims = tensor_dims.get(t, {})
        k = 1.0
        factors: list[tuple[float, np.ndarray]] = []
        for d, n in enumerate(shape):
            const, coef = _affine(n, dims.get(d), idx, sizes, p)
            if coef.any():
                factors.append((const, coef))
            else:
                k *= const
        if len(factors) > 2:
            raise RuntimeError(f"tensor {t} depends on more than two channel groups; cannot price it")
        while len(factors) < 2:
            factors.append((1.0, np.zeros(p)))
        (a0, a), (b0, b) = factors
        return add_row(t, k, a0, a, b0, b)

    macs_coef: dict[int, float] = {}
    layers: dict[str, dict[str, Any]] = {}
    for wname, mult in mac_terms:
        t = canon.get(wname, wname)
        r = tensor_row(t)
        macs_coef[r] = macs_coef.get(r, 0.0) + mult / batch
        layer = wname.rsplit(".", 1)[0]
        info = layers.setdefault(layer, {"weight": r, "macs": 0.0})
        info["macs"] += mult / batch
    for t in sorted(param_names):
        tensor_row(t)
    for layer, info in layers.items():
        t = names[info["weight"]]
        bias = canon.get(f"{layer}.bias")
        info["bias"] = tensor_row(bias) if bias in tensor_shapes else None
        const, coef = _affine(tensor_shapes[t][0], tensor_dims.get(t, {}).get(0), idx, sizes, p)
        info["cout"] = add_row(f"{t}#cout", 1.0, const, coef, 1.0, np.zeros(p))
    n = len(k_l)
    mc = np.zeros(n)
    for r, c in macs_coef.items():
        mc[r] = c
    pc = np.zeros(n)
    for t in param_names:
        pc[rows[t]] = 1.0
    shape2 = (n, p)
    return CostTerms(
        k=np.asarray(k_l, dtype=np.float64),
        A=np.asarray(a_l, dtype=np.float64).reshape(shape2),
        a0=np.asarray(a0_l, dtype=np.float64),
        B=np.asarray(b_l, dtype=np.float64).reshape(shape2),
        b0=np.asarray(b0_l, dtype=np.float64),
        macs_coef=mc,
        params_coef=pc,
        macs_const=float(macs_const),
        layers=layers,
        row_names=names,
    )


def _quadratic(terms: CostTerms, coef: np.ndarray, const: float = 0.0) -> tuple[np.ndarray, np.ndarray, float]:
    """``Σ_r coef_r·row_r(w)`` as ``(K, λ, c0)`` with ``w·K·w + λ·w + c0`` (K symmetric)."""
    ck = coef * terms.k
    kmat = (terms.A * ck[:, None]).T @ terms.B
    kmat = 0.5 * (kmat + kmat.T)
    lam = (ck * terms.a0) @ terms.B + (ck * terms.b0) @ terms.A
    c0 = float(np.sum(ck * terms.a0 * terms.b0)) + const
    return kmat, lam, c0


def _forms(gs: GroupSet) -> dict[str, Any]:
    cache = gs._cost_cache
    if "macs" not in cache:
        t = gs.cost_terms
        assert t is not None
        cache["macs"] = _quadratic(t, t.macs_coef, t.macs_const)
        cache["params"] = _quadratic(t, t.params_coef)
        cache["index"] = {g: i for i, g in enumerate(gs.prunable_ids)}
        cache["full"] = np.asarray([gs[g].size for g in gs.prunable_ids], dtype=np.float64)
        names = list(t.layers)
        cache["layer_index"] = {name: i for i, name in enumerate(names)}
        cache["layer_weight"] = np.asarray([t.layers[n]["weight"] for n in names], dtype=np.int64)
        cache["layer_cout"] = np.asarray([t.layers[n]["cout"] for n in names], dtype=np.int64)
        cache["layer_macs"] = np.asarray([t.layers[n]["macs"] for n in names], dtype=np.float64)
    return cache


def annotate_groups(gs: GroupSet) -> None:
    """Fill each group's cost fields (MACs/params it controls, λ and κ coefficients)."""
    import dataclasses

    forms = _forms(gs)
    full = forms["full"]
    ids = gs.prunable_ids
    new = []
    for g in gs:
        if g.id not in forms["index"]:
            new.append(g)
            continue
        i = forms["index"][g.id]
        vals = {}
        for what in ("macs", "params"):
            kmat, lam, _c0 = forms[what]
            w0 = full.copy()
            w0[i] = 0.0
            total = full @ kmat @ full + lam @ full
            without = w0 @ kmat @ w0 + lam @ w0
            pairs = tuple((ids[j], float(kmat[i, j] if i == j else 2.0 * kmat[i, j]))
                          for j in range(len(ids)) if kmat[i, j] != 0.0)
            vals[what] = (round(total - without), float(lam[i]), pairs)
        new.append(dataclasses.replace(
            g, macs=int(vals["macs"][0]), params=int(vals["params"][0]), macs_linear=vals["macs"][1],
            macs_quadratic=vals["macs"][2], params_linear=vals["params"][1], params_quadratic=vals["params"][2]))
    gs._groups = new
    gs._by_id = {g.id: g for g in new}


# ----------------------------------------------------------------------------------------------------------------
# Pricing
# ----------------------------------------------------------------------------------------------------------------


def width_vector(groups: GroupSet, widths: Mapping[str, int] | Candidate | None) -> np.ndarray:
    """Widths of the prunable groups as a vector (groups not listed keep their full width).

    Raises:
        ConfigError: For an unknown group id, a width outside ``1..size``, or a changed frozen group.
    """
    forms = _forms(groups)
    w = forms["full"].copy()
    if widths is None:
        return w
    if isinstance(widths, Candidate):
        widths = widths.widths
    index = forms["index"]
    for gid, v in widths.items():
        i = index.get(gid)
        if i is None:
            g = groups[gid]  # raises ConfigError with close matches for unknown ids
            if int(v) != g.size:
                raise ConfigError(f"group {gid!r} is frozen ({g.reason}); it cannot be pruned to {v}",
                                  hint="leave frozen groups out of the widths")
            continue
        if not 1 <= v <= forms["full"][i]:
            raise ConfigError(f"width {v} for group {gid!r} is outside 1..{int(forms['full'][i])}",
                              hint="widths count kept channels; use a value between 1 and the group size")
        w[i] = v
    return w


def closed_form(groups: GroupSet, widths: Mapping[str, int] | Candidate | None = None,
                bits: Mapping[str, QuantSpec] | None = None) -> CostReport:
    """Price a candidate without building it.

    Args:
        groups: The analysed model.
        widths: Group id → kept channels (a :class:`~autoprune.types.Candidate` also works; its bits are used
            when ``bits`` is None). Groups not listed keep their full width.
        bits: Layer name → :class:`~autoprune.types.QuantSpec`. Quantized weights cost ``ceil(n·b/8)`` bytes
            plus ``2·C_out`` bytes of fp16 scales; float parameters 4 bytes each.

    Returns:
        :class:`~autoprune.types.CostReport` with per-sample MACs, params, bytes, bitops and payload bits.
    """
    if isinstance(widths, Candidate):
        if bits is None and widths.bits:
            bits = widths.bits
        widths = widths.widths
    forms = _forms(groups)
    w = width_vector(groups, widths)
    km, lm, cm = forms["macs"]
    kp, lp, cp = forms["params"]
    macs = float(w @ km @ w + lm @ w + cm)
    params = float(w @ kp @ w + lp @ w + cp)
    macs_i, params_i = round(macs), round(params)
    if not bits:
        return CostReport(macs=macs_i, params=params_i, bytes=4 * params_i,
                          bitops=macs_i * FLOAT_BITS * FLOAT_BITS, payload_bits=FLOAT_BITS * params_i)
    return _with_bits(groups, forms, w, macs, params_i, bits)


def _with_bits(groups: GroupSet, forms: dict[str, Any], w: np.ndarray, macs: float, params: int,
               bits: Mapping[str, QuantSpec]) -> CostReport:
    t = groups.cost_terms
    assert t is not None
    index = forms["layer_index"]
    n_layers = len(index)
    wb = np.full(n_layers, float(FLOAT_BITS))
    ab = np.full(n_layers, float(FLOAT_BITS))
    for layer, spec in bits.items():
        i = index.get(layer)
        if i is None:
            close = ", ".join(sorted(index)[:8])
            raise ConfigError(f"bits given for {layer!r}, which is not a conv/linear layer of the model",
                              hint=f"quantizable layers include: {close}")
        if spec.w_bits is not None:
            wb[i] = spec.w_bits
        if spec.a_bits is not None:
            ab[i] = spec.a_bits
    rows = t.k * (t.A @ w + t.a0) * (t.B @ w + t.b0)
    n = np.rint(rows[forms["layer_weight"]])
    cout = np.rint(rows[forms["layer_cout"]])
    quant = wb < FLOAT_BITS
    layer_macs = forms["layer_macs"] * rows[forms["layer_weight"]]
    bitops = macs * FLOAT_BITS * FLOAT_BITS + float(layer_macs @ (wb * ab - FLOAT_BITS * FLOAT_BITS))
    nbytes = 4 * params + int(np.sum(np.where(quant, np.ceil(n * wb / 8) + 2 * cout - 4 * n, 0.0)))
    payload = FLOAT_BITS * params + int(np.sum((wb - FLOAT_BITS) * n))
    return CostReport(macs=round(macs), params=params, bytes=nbytes, bitops=round(bitops), payload_bits=payload)


def min_cost(groups: GroupSet, *, round_to: int = 1, bits: Mapping[str, QuantSpec] | None = None) -> CostReport:
    """Cost with every prunable group at its smallest legal width (the floor of any budget)."""
    from autoprune.pruning import legal_widths

    widths = {g.id: legal_widths(g, round_to)[0] for g in groups.prunable()}
    return closed_form(groups, widths, bits)


def expected_cost(groups: GroupSet, widths: Mapping[str, torch.Tensor],
                  second_moments: Mapping[str, torch.Tensor] | None = None, what: str = "macs") -> torch.Tensor:
    """Differentiable cost for (expected) widths given as tensors (DMCP's expected FLOPs).

    A term with the same group on both sides needs ``E[w²]``, not ``E[w]²``: pass ``second_moments`` for that;
    without it ``E[w]²`` is used (exact for deterministic widths).

    Args:
        groups: The analysed model.
        widths: Group id → scalar tensor (expected width); missing prunable groups keep full width.
        second_moments: Group id → ``E[w²]``.
        what: ``"macs"`` or ``"params"``.
    """
    if what not in ("macs", "params"):
        raise ConfigError(f"expected_cost(what={what!r}) must be 'macs' or 'params'")
    forms = _forms(groups)
    kmat, lam, c0 = forms[what]
    index = forms["index"]
    full = forms["full"]
    for gid in widths:
        if gid not in index:
            groups[gid]
            raise ConfigError(f"group {gid!r} is frozen; it has no width to optimise")
    ref = next(iter(widths.values()), None)
    dtype = ref.dtype if isinstance(ref, torch.Tensor) and ref.is_floating_point() else torch.float64
    vec = [widths[g].reshape(()).to(dtype) if g in widths else torch.tensor(full[i], dtype=dtype)
           for i, g in enumerate(groups.prunable_ids)]
    if not vec:
        return torch.tensor(c0, dtype=dtype)
    w = torch.stack(vec)
    km = torch.as_tensor(kmat, dtype=dtype)
    total = w @ km @ w + torch.as_tensor(lam, dtype=dtype) @ w + c0
    if second_moments:
        for gid, m2 in second_moments.items():
            i = index[gid]
            total = total + km[i, i] * (m2.reshape(()).to(dtype) - w[i] * w[i])
    return total


# ----------------------------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------------------------


def count_macs(module: nn.Module, example_input: Any) -> int:
    """MACs of one forward pass on ``example_input`` counted by ``torch.utils.flop_counter`` (FLOPs / 2).

    This is the test oracle for :func:`closed_form` (pass a batch-1 input to compare with its per-sample
    MACs). The module runs in eval mode under ``no_grad``; its training flags are restored.
    """
    from torch.utils.flop_counter import FlopCounterMode

    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    flags = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*args)
    finally:
        for m, t in flags.items():
            m.training = t
    return int(counter.get_total_flops()) // 2


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
