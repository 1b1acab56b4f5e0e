"""Closed-form cost of a pruned (and optionally quantized) network as a function of group widths.

This module owns the cost model of ENGINE.md §6: MACs (multiply-accumulates of conv, linear, matmul and
attention, per sample), parameter counts, storage bytes at fp32 or at per-layer bit-widths, and BitOps. Every
conv/linear term is bilinear in two group widths, so

    cost(w) = Σ κ_ij·w_i·w_j + Σ λ_i·w_i + c0

with coefficients built once by :func:`autoprune.graph.analyze` (:func:`autoprune.graph.terms.build_terms`, also
importable from here); a grouped conv's weight numel is ``k_h·k_w/g · C_out(w) · C_in(w)`` (widths not divisible
by a group's divisor are refused). The pricing forms derived from them are cached with the
:class:`~autoprune.graph.GroupSet` on first use. Pricing a candidate (:func:`closed_form`) builds no model and
takes microseconds. With per-layer bits, ``bytes`` and ``payload_bits`` equal what
:func:`autoprune.quantization.export` stores for the pruned, BN-folded, quantized candidate, to the byte: the rows
of every stored tensor (and of each layer's output channels) are derived once per GroupSet from the folded graph
(cached), and a call combines them with the bit-widths. :func:`count_macs` (``FlopCounterMode``) is the test
oracle; :func:`expected_cost` is the differentiable form for expected widths (DMCP).

Attention is priced analytically as a function of the pruned head counts (``q·kᵀ`` and ``attn·v``, ``einsum``,
``scaled_dot_product_attention``, ``nn.MultiheadAttention``; ENGINE.md §2.4). Ops the closed form has no formula
for (opaque leaves, unknown ops) are measured once by :func:`~autoprune.graph.analyze` on the example input and
priced as a constant — the frozen group's reason says so — so budgets never silently leave MACs out.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from autoprune.errors import ConfigError
from autoprune.graph import GroupSet
from autoprune.graph.records import QuadraticForm
from autoprune.graph.terms import Factors, build_terms, factors, quadratic
from autoprune.types import Candidate, CostReport, QuantSpec

__all__ = [
    "annotate_groups",  # deprecated
    "build_terms",  # re-exported from autoprune.graph.terms (the analysis builds the rows)
    "closed_form",
    "count_macs",
    "count_params",
    "expected_cost",
    "min_cost",
    "width_vector",
]

FLOAT_BITS = 32


def annotate_groups(gs: GroupSet) -> None:
    """Deprecated, does nothing: :func:`autoprune.graph.analyze` builds every :class:`GroupSet` with its
    groups' cost fields filled (:func:`autoprune.graph.terms.annotate`). Kept for one release.
    """
    warnings.warn("autoprune.cost.annotate_groups is deprecated and does nothing: analyze() fills the groups' "
                  "cost fields (autoprune.graph.terms.annotate); it will be removed in the next release",
                  DeprecationWarning, stacklevel=2)


# ----------------------------------------------------------------------------------------------------------------
# The pricing forms of a GroupSet (cached with it)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pricing:
    """What pricing a candidate needs, derived once per GroupSet from its cost rows."""

    macs: QuadraticForm
    params: QuadraticForm
    index: dict[str, int]  # prunable group id -> position in the width vector
    full: np.ndarray  # full widths
    divisor: list[int]


def _forms(gs: GroupSet) -> _Pricing:
    """The pricing forms of ``gs`` (cached with it on first use)."""
    forms = gs.cache.get("pricing")
    if forms is None:
        t = gs.cost_terms
        forms = _Pricing(macs=t.macs_form, params=t.params_form,
                         index={g: i for i, g in enumerate(gs.prunable_ids)},
                         full=np.asarray([gs[g].size for g in gs.prunable_ids], dtype=np.float64),
                         divisor=[gs[g].divisor for g in gs.prunable_ids])
        gs.cache["pricing"] = forms
    return forms


# ----------------------------------------------------------------------------------------------------------------
# Pricing
# ----------------------------------------------------------------------------------------------------------------


def width_vector(groups: GroupSet, widths: Mapping[str, int] | Candidate | None) -> np.ndarray:
    """Widths of the prunable groups as a vector (groups not listed keep their full width).

    Raises:
        ConfigError: For an unknown group id, a width outside ``1..size``, or a changed frozen group.
    """
    forms = _forms(groups)
    w = forms.full.copy()
    if widths is None:
        return w
    if isinstance(widths, Candidate):
        widths = widths.widths
    index = forms.index
    for gid, v in widths.items():
        i = index.get(gid)
        if i is None:
            g = groups[gid]  # raises ConfigError with close matches for unknown ids
            if int(v) != g.size:
                raise ConfigError(f"group {gid!r} is frozen ({g.reason}); it cannot be pruned to {v}",
                                  hint="leave frozen groups out of the widths")
            continue
        if not 1 <= v <= forms.full[i]:
            raise ConfigError(f"width {v} for group {gid!r} is outside 1..{int(forms.full[i])}",
                              hint="widths count kept channels; use a value between 1 and the group size")
        if v % forms.divisor[i]:
            groups[gid].check_width(int(v))
        w[i] = v
    return w


def closed_form(groups: GroupSet, widths: Mapping[str, int] | Candidate | None = None,
                bits: Mapping[str, QuantSpec] | None = None, *, fold_bn: bool = True,
                asym_below: int = 4) -> CostReport:
    """Price a candidate without building it.

    Without ``bits`` (or with an empty map) the candidate is the float model as built by
    :func:`autoprune.pruning.apply`: ``bytes = 4·params`` and ``payload_bits = 32·params``.

    With ``bits`` the candidate is ``quantization.apply(pruning.apply(model, groups, widths), bits,
    fold_bn=fold_bn, asym_below=asym_below)`` and ``bytes`` / ``payload_bits`` equal ``size_bytes`` /
    ``payload_bits`` of its :func:`autoprune.quantization.export` exactly (ENGINE.md §5.3):

    * a quantized weight (``w_bits`` set) costs ``⌈n·b/8⌉`` packed bytes + ``2·C_out`` fp16 scales
      (+ ``C_out`` uint8 zero points when ``b < asym_below``);
    * every other stored tensor costs its numel × element size: float conv/linear weights (layers missing from
      ``bits`` or with ``w_bits=None``), biases (folded convs gain a ``C_out`` bias), BatchNorm parameters and
      buffers that were *not* folded (``num_batches_tracked`` is 8 bytes), ``Normalize`` buffers, constants;
      BatchNorms folded into their conv store nothing; input quantizer ranges live in the JSON, not in bytes;
    * ``payload_bits = Σ b·n`` over conv/linear weights, 32 bits for float ones (HAQ's metric);
    * ``params`` stays the parameter count of the pruned float model (BatchNorm included).

    ``bitops = Σ MACs·b_w·b_a`` per conv/linear layer with 32 for a float operand; MACs outside conv/linear
    modules (matmul, attention, functional conv) count as 32×32. First/last-layer floors are the search space's
    business (:func:`autoprune.quantization.apply` raises on them; this function prices any map).

    Args:
        groups: The analysed model.
        widths: Group id → kept channels (a :class:`~autoprune.types.Candidate` also works; its bits are used
            when ``bits`` is None). Groups not listed keep their full width.
        bits: Layer name → :class:`~autoprune.types.QuantSpec` (an int or ``(w_bits, a_bits)`` pair also works).
            Layers not listed stay float.
        fold_bn: As in :func:`autoprune.quantization.apply`.
        asym_below: As in :func:`autoprune.quantization.apply`.

    Returns:
        :class:`~autoprune.types.CostReport` with per-sample MACs, params, bytes, bitops and payload bits.

    Raises:
        ConfigError: Unknown groups or layers, illegal widths or bit-widths.
    """
    if isinstance(widths, Candidate):
        if bits is None and widths.bits:
            bits = widths.bits
        widths = widths.widths
    forms = _forms(groups)
    w = width_vector(groups, widths)
    km, lm, cm = forms.macs
    kp, lp, cp = forms.params
    macs = float(w @ km @ w + lm @ w + cm)
    params = float(w @ kp @ w + lp @ w + cp)
    macs_i, params_i = round(macs), round(params)
    if not bits:
        return CostReport(macs=macs_i, params=params_i, bytes=4 * params_i,
                          bitops=macs_i * FLOAT_BITS * FLOAT_BITS, payload_bits=FLOAT_BITS * params_i)
    qf = _quant_forms(groups, fold_bn)
    wq, ab = qf.bit_vectors(bits)
    kf, lf, cf = qf.float_bytes
    rows = np.rint(qf.k * (qf.A @ w + qf.a0) * (qf.B @ w + qf.b0))  # integers (k = k_h·k_w/g for grouped convs)
    n, cout = rows[:qf.n_layers], rows[qf.n_layers:]
    quant = wq > 0
    wbits = np.where(quant, wq, float(FLOAT_BITS))
    # quantized weight: packed codes + fp16 scale (+ uint8 zero point below asym_below) instead of its float bytes
    packed = np.ceil(n * wq / 8) + quant * (cout * (2.0 + (wq < asym_below)) - qf.weight_size * n)
    nbytes = float(w @ kf @ w + lf @ w + cf) + float(packed.sum())
    bitops = macs * FLOAT_BITS * FLOAT_BITS + float((qf.layer_macs * n) @ (wbits * ab - FLOAT_BITS * FLOAT_BITS))
    return CostReport(macs=macs_i, params=params_i, bytes=round(nbytes), bitops=round(bitops),
                      payload_bits=round(float(n @ wbits)))


# ----------------------------------------------------------------------------------------------------------------
# Exact size of the exported quantized artifact
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Rows ``k·(A·w + a0)·(B·w + b0)`` (numel of a tensor, or a channel count, as a function of the widths)."""

    k: np.ndarray
    A: np.ndarray
    a0: np.ndarray
    B: np.ndarray
    b0: np.ndarray

    @classmethod
    def stack(cls, rows: list[Factors], p: int) -> _Rows:
        """Rows from :func:`~autoprune.graph.terms.factors` tuples."""
        k, a0, a, b0, b = zip(*rows, strict=True) if rows else ((), (), (), (), ())
        return cls(k=np.asarray(k, dtype=np.float64), A=np.asarray(a, dtype=np.float64).reshape(len(rows), p),
                   a0=np.asarray(a0, dtype=np.float64), B=np.asarray(b, dtype=np.float64).reshape(len(rows), p),
                   b0=np.asarray(b0, dtype=np.float64))


@dataclass
class _QuantForms(_Rows):
    """What the quantized export stores, as functions of the widths (built once per GroupSet and ``fold_bn``).

    ``float_bytes`` is the quadratic form ``(K, λ, c0)`` of the bytes of every stored tensor kept in float (all of
    them, weights included). The rows are the weight numels of the quantizable layers (in
    :func:`autoprune.quantization.quantizable_layers` order) followed by their output-channel counts.
    """

    float_bytes: tuple[np.ndarray, np.ndarray, float] = (np.zeros((0, 0)), np.zeros(0), 0.0)
    names: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    weight_size: np.ndarray = field(default_factory=lambda: np.zeros(0))  # element size of each float weight
    layer_macs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-sample MACs per weight element

    @property
    def n_layers(self) -> int:
        """Number of quantizable layers."""
        return len(self.names)

    def bit_vectors(self, bits: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer weight bits (0 = float) and input bits (32 = float) of a bit assignment."""
        index = self.index
        if not index.keys() >= bits.keys():
            raise _unknown_layer(next(k for k in bits if k not in index), self.names)
        specs = [QuantSpec.parse(v, k) for k, v in bits.items()]
        cols = np.array([index[k] for k in bits], dtype=np.intp)
        wq = np.zeros(len(index))
        ab = np.full(len(index), float(FLOAT_BITS))
        wq[cols] = np.array([s.w_bits or 0 for s in specs], dtype=np.float64)
        ab[cols] = np.array([s.a_bits or FLOAT_BITS for s in specs], dtype=np.float64)
        return wq, ab


def _unknown_layer(layer: str, names: list[str]) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(str(layer), names, n=1)
    return ConfigError(
        f"bits given for {layer!r}, which is not a conv/linear layer of the model"
        + (f"; did you mean {close[0]!r}?" if close else ""),
        hint=f"quantizable layers: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")


def _stored_tensors(gm: fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """What :func:`autoprune.serialize.encode_module` stores: parameters and buffers of every called module and
    every ``get_attr`` tensor, tied tensors once (under their first name)."""
    seen: set[int] = set()
    out: list[tuple[str, torch.Tensor]] = []

    def add(name: str, t: Any) -> None:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))

    done: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in done:
            done.add(node.target)
            sub = gm.get_submodule(node.target)
            for n, t in [*sub.named_parameters(remove_duplicate=False), *sub.named_buffers(remove_duplicate=False)]:
                add(f"{node.target}.{n}", t)
        elif node.op == "get_attr":
            obj: Any = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            add(str(node.target), obj)
    return out


def _quant_forms(groups: GroupSet, fold_bn: bool) -> _QuantForms:
    """Build (once per GroupSet and ``fold_bn``) the rows of the exported quantized artifact."""
    key = f"quant:{fold_bn}"
    cache = groups.cache
    if key in cache:
        return cache[key]
    import copy

    from autoprune import quantization

    forms = _forms(groups)
    terms = groups.cost_terms
    idx, p = forms.index, len(groups.prunable_ids)
    sizes = {g.id: g.size for g in groups}
    gm = groups.graph_module
    prepared = quantization.fold_batchnorm(gm) if fold_bn else copy.deepcopy(gm)
    dims_of = groups.tensor_dims

    def dims_for(name: str, t: torch.Tensor) -> dict[int, list[tuple[str, int, int]]]:
        canon = groups.canonical(name)
        if canon in groups.tensor_shapes and groups.tensor_shapes[canon] == tuple(t.shape):
            return dims_of.get(canon, {})
        module, _, leaf = name.rpartition(".")
        if leaf == "bias" and t.dim() == 1:  # bias created by BN folding: follows the conv's output channels
            wcanon = groups.canonical(f"{module}.weight")
            if groups.tensor_shapes.get(wcanon, (None,))[0] == t.shape[0]:
                return {0: dims_of.get(wcanon, {}).get(0, [])}
        return {}  # not sliced by pruning: constant size

    def grouped_for(name: str, t: torch.Tensor) -> Mapping[int, int] | None:
        canon = groups.canonical(name)
        if groups.tensor_shapes.get(canon) == tuple(t.shape):
            return groups.grouped_dims.get(canon)
        return None

    stored: list[Factors] = []
    esize: list[float] = []
    for name, t in _stored_tensors(prepared):
        stored.append(factors(name, tuple(t.shape), dims_for(name, t), idx, sizes, p, grouped_for(name, t)))
        esize.append(float(t.element_size()))
    names = quantization.quantizable_layers(prepared)
    weights: list[Factors] = []
    couts: list[Factors] = []
    wsize, lmacs = [], []
    for layer in names:
        weight = prepared.get_submodule(layer).weight
        wdims = dims_for(f"{layer}.weight", weight)
        weights.append(factors(f"{layer}.weight", tuple(weight.shape), wdims, idx, sizes, p,
                                grouped_for(f"{layer}.weight", weight)))
        couts.append(factors(f"{layer}.weight#cout", (weight.shape[0],), {0: wdims.get(0, [])}, idx, sizes, p))
        wsize.append(float(weight.element_size()))
        info = terms.layers.get(layer)
        lmacs.append(float(info["macs"]) if info is not None else 0.0)
    rows = _Rows.stack(weights + couts, p)
    qf = _QuantForms(
        k=rows.k, A=rows.A, a0=rows.a0, B=rows.B, b0=rows.b0,
        float_bytes=quadratic(_Rows.stack(stored, p), np.asarray(esize, dtype=np.float64)),
        names=names, index={n: i for i, n in enumerate(names)}, weight_size=np.asarray(wsize, dtype=np.float64),
        layer_macs=np.asarray(lmacs, dtype=np.float64))
    cache[key] = qf
    return qf


def min_cost(groups: GroupSet, *, round_to: int = 1, bits: Mapping[str, QuantSpec] | None = None) -> CostReport:
    """Cost with every prunable group at its smallest legal width (the floor of any budget)."""
    widths = {g.id: g.legal_widths(round_to)[0] for g in groups.prunable()}
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
    kmat, lam, c0 = forms.macs if what == "macs" else forms.params
    index = forms.index
    full = forms.full
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


def count_macs(module: nn.Module, example_input: Any, *, attention: bool = False) -> int:
    """MACs of one forward pass on ``example_input`` counted by ``torch.utils.flop_counter`` (FLOPs / 2).

    This is the test oracle for :func:`closed_form` (pass a batch-1 input to compare with its per-sample
    MACs). The module runs in eval mode under ``no_grad``; its training flags are restored.

    ``FlopCounterMode`` counts ``F.scaled_dot_product_attention`` on the CPU as 0, and ``nn.MultiheadAttention``'s
    inference fast path as 0 altogether. With ``attention=True`` the CPU kernel is counted with the counter's own
    formula (two matmuls) and the fast path is off (:func:`autoprune.graph.fallback.counting_flops`), so
    attention is counted as the closed form prices it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from autoprune.graph.fallback import counting_flops

    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    flags = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad(), (counting_flops() if attention else FlopCounterMode(display=False)) as counter:
            module(*args)
    finally:
        for m, t in flags.items():
            m.training = t
    return int(counter.get_total_flops()) // 2


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
