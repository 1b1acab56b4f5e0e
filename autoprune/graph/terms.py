"""Closed-form cost rows of an analysed model (ENGINE.md §6.1), built once by :func:`~autoprune.graph.analyze`.

Every parameter and buffer numel is a product ``k·(A·w + a0)·(B·w + b0)`` of at most two affine functions of the
prunable group widths ``w`` (:func:`factors`), so MACs and parameter counts are quadratic forms of ``w``
(:func:`quadratic`). :func:`build_terms` collects the rows of a model into :class:`~autoprune.graph.CostTerms`
and :func:`annotate` fills each group's cost fields (the MACs and parameters it controls, its λ and κ
coefficients). Pricing candidates with these rows is :mod:`autoprune.cost`'s business.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from autoprune.graph.records import ChannelGroup, CostTerms, QuadraticForm

__all__ = ["MACS_PREFIX", "Factors", "Rows", "affine", "annotate", "build_terms", "factors", "quadratic"]

#: Name prefix of the virtual one-dimensional tensors that carry MAC terms of ops without parameters (attention
#: matmuls, ``einsum``, ``scaled_dot_product_attention``; :func:`autoprune.graph.attention.add_layout_macs`): a
#: use lays such a tensor out like the op's channel layout, so its "numel" is the layout's width as a function of
#: the group widths. It is not a parameter and nothing slices it.
MACS_PREFIX = "#macs:"

#: ``(k, a0, A, b0, B)`` of one row ``k·(A·w + a0)·(B·w + b0)``.
Factors = tuple[float, float, np.ndarray, float, np.ndarray]

#: ``tensor name -> {dim: [(group id, offset, stride), ...]}`` (see :attr:`GroupSet.tensor_dims`).
TensorDims = Mapping[str, Mapping[int, list[tuple[str, int, int]]]]


class Rows(Protocol):
    """Anything holding rows ``k·(A·w + a0)·(B·w + b0)`` as arrays (:class:`CostTerms` among others)."""

    k: np.ndarray
    A: np.ndarray
    a0: np.ndarray
    B: np.ndarray
    b0: np.ndarray


def affine(shape_d: int, entries: Sequence[tuple[str, int, int]] | None, idx: Mapping[str, int],
           sizes: Mapping[str, int], p: int) -> tuple[float, np.ndarray]:
    """A channel count as ``const + coef·w``: ``shape_d`` at full width, minus every prunable group's channels
    (``entries``: ``(group id, offset, stride)``), plus ``stride·w_g`` for each (frozen groups stay constant)."""
    const = float(shape_d)
    coef = np.zeros(p)
    for g, _off, s in entries or ():
        if g in idx:
            const -= sizes[g] * s
            coef[idx[g]] += s
    return const, coef


def factors(name: str, shape: tuple[int, ...], dims: Mapping[int, Sequence[tuple[str, int, int]]],
            idx: Mapping[str, int], sizes: Mapping[str, int], p: int, grouped: Mapping[int, int] | None = None,
            ) -> Factors:
    """``numel`` of a tensor as ``k·(a·w + a0)·(b·w + b0)`` (at most two width-dependent dims).

    A dim in ``grouped`` (``dim -> g``, the input dim of a grouped conv weight) holds ``C_in/g`` entries while its
    ``dims`` entries count along the virtual ``C_in`` axis: it enters as ``C_in(w) / g`` (the ``1/g`` goes to ``k``).

    Args:
        name: Tensor name (for the error message).
        shape: Its full shape.
        dims: ``dim -> [(group id, offset, stride)]`` of its width-dependent dims.
        idx: Prunable group id → position in the width vector.
        sizes: Full width of every group.
        p: Number of prunable groups.
        grouped: ``dim -> groups`` for the input dim of a grouped conv weight.

    Returns:
        ``(k, a0, A, b0, B)``.

    Raises:
        RuntimeError: If more than two dims depend on the widths.
    """
    k = 1.0
    found: list[tuple[float, np.ndarray]] = []
    for d, n in enumerate(shape):
        g = (grouped or {}).get(d, 1)
        const, coef = affine(n * g, dims.get(d), idx, sizes, p)
        k /= g
        if coef.any():
            found.append((const, coef))
        else:
            k *= const
    if len(found) > 2:
        raise RuntimeError(f"tensor {name} depends on more than two channel groups; cannot price it")
    while len(found) < 2:
        found.append((1.0, np.zeros(p)))
    (a0, a), (b0, b) = found
    return k, a0, a, b0, b


def quadratic(rows: Rows, coef: np.ndarray, const: float = 0.0) -> QuadraticForm:
    """``Σ_r coef_r·row_r(w)`` as ``(K, λ, c0)`` with ``w·K·w + λ·w + c0`` (K symmetric)."""
    ck = coef * rows.k
    kmat = (rows.A * ck[:, None]).T @ rows.B
    kmat = 0.5 * (kmat + kmat.T)
    lam = (ck * rows.a0) @ rows.B + (ck * rows.b0) @ rows.A
    c0 = float(np.sum(ck * rows.a0 * rows.b0)) + const
    return kmat, lam, c0


def build_terms(prunable: list[str], sizes: Mapping[str, int], tensor_dims: TensorDims,
                tensor_shapes: Mapping[str, tuple[int, ...]], mac_terms: list[tuple[str, float]],
                macs_const: float, batch: int, param_names: set[str], canon: Mapping[str, str], *,
                grouped: Mapping[str, Mapping[int, int]] | None = None) -> CostTerms:
    """Build the per-tensor cost rows of a model (see :class:`~autoprune.graph.CostTerms`).

    Args:
        prunable: Prunable group ids; their order defines the width vector.
        sizes: Full width of every group.
        tensor_dims: ``tensor -> {dim: [(group id, offset, stride)]}``.
        tensor_shapes: Full shape of every parameter and buffer.
        mac_terms: ``(weight tensor, multiplier)``: MACs of one call = multiplier × numel(weight). A name starting
            with :data:`MACS_PREFIX` is a virtual tensor whose numel is the width of its dim-0 layout.
        macs_const: Per-sample MACs of ops whose operands are frozen.
        batch: Batch size of the example input (multipliers are divided by it).
        param_names: Canonical names of the parameters (counted in ``params``).
        canon: Any tensor name -> canonical name.
        grouped: ``tensor -> {dim: groups}`` for the input dims of grouped conv weights (see :func:`factors`).
    """
    grouped = grouped or {}

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

    def shape_of(t: str) -> tuple[int, ...]:
        if t in tensor_shapes or not t.startswith(MACS_PREFIX):
            return tensor_shapes[t]
        return (sum(sizes[g] * s for g, _off, s in tensor_dims.get(t, {}).get(0, ())),)  # a layout's width

    def tensor_row(t: str) -> int:
        if t in rows:
            return rows[t]
        return add_row(t, *factors(t, shape_of(t), tensor_dims.get(t, {}), idx, sizes, p, grouped.get(t)))

    macs_coef: dict[int, float] = {}
    layers: dict[str, dict[str, Any]] = {}
    for wname, mult in mac_terms:
        t = canon.get(wname, wname)
        r = tensor_row(t)
        macs_coef[r] = macs_coef.get(r, 0.0) + mult / batch
        if t.startswith(MACS_PREFIX):  # an op without parameters: no layer
            continue
        layer = wname.rsplit(".", 1)[0]
        info = layers.setdefault(layer, {"weight": r, "macs": 0.0})
        info["macs"] += mult / batch
    for t in sorted(param_names):
        tensor_row(t)
    for layer, info in layers.items():
        t = names[info["weight"]]
        bias = canon.get(f"{layer}.bias")
        info["bias"] = tensor_row(bias) if bias in tensor_shapes else None
        const, coef = affine(tensor_shapes[t][0], tensor_dims.get(t, {}).get(0), idx, sizes, p)
        info["cout"] = add_row(f"{t}#cout", 1.0, const, coef, 1.0, np.zeros(p))
    n = len(k_l)
    mc = np.zeros(n)
    for r, c in macs_coef.items():
        mc[r] = c
    pc = np.zeros(n)
    for t in param_names:
        pc[rows[t]] = 1.0
    shape2 = (n, p)
    terms = CostTerms(
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
    terms.macs_form = quadratic(terms, terms.macs_coef, terms.macs_const)
    terms.params_form = quadratic(terms, terms.params_coef)
    return terms


def annotate(groups: Sequence[ChannelGroup], terms: CostTerms) -> list[ChannelGroup]:
    """The groups with their cost fields filled (MACs/params each prunable group controls, λ and κ).

    Args:
        groups: Every group, in order; the prunable ones define the width vector of ``terms``.
        terms: The model's cost rows.
    """
    ids = [g.id for g in groups if g.prunable]
    index = {gid: i for i, gid in enumerate(ids)}
    full = np.asarray([g.size for g in groups if g.prunable], dtype=np.float64)
    forms = {"macs": terms.macs_form, "params": terms.params_form}
    new = []
    for g in groups:
        if g.id not in index:
            new.append(g)
            continue
        i = index[g.id]
        vals = {}
        for what, (kmat, lam, _c0) in forms.items():
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
    return new
