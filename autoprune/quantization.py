"""Mixed-precision quantization: fake quantization with STE, BN folding, packed export, exact sizes (ENGINE.md §5).

This module owns everything about bit-widths:

* **Quantizers.** q = clamp(round(x/s) + z, q_min, q_max), x̂ = (q − z)·s through the core ATen ops
  ``torch.fake_quantize_per_channel_affine`` / ``torch.fake_quantize_per_tensor_affine``, whose backward is
  the straight-through estimator (gradient 1 inside the clipping range, 0 outside).

  - *Weights*, per output channel. For ``b >= asym_below`` (default 4) the grid is **symmetric restricted**:
    z = 0, q ∈ [−(2^(b−1) − 1), 2^(b−1) − 1], s = α/(2^(b−1) − 1) with α = max|W_c|, so 0 is exact and the
    grid is a subset of int8. Below that (2 and 3 bits) the restricted grid wastes a level (only **3 levels at
    2 bits**), so the grid is **asymmetric**: q ∈ [0, 2^b − 1] over [min(W_c, 0), max(W_c, 0)] with a
    per-channel zero point — all 2^b levels are used. The clip (α, or the min/max pair) is either the
    maximum (``"max"``) or searched to minimise the per-channel MSE (``"mse"``); ``w_clip="auto"`` searches
    for the asymmetric low-bit grids only. Weight scales follow the current weights (recomputed whenever they
    change, so quantization-aware fine-tuning works; cached per weight version — in-place edits through
    ``.data`` bypass the version counter and are not seen) unless the layer is *frozen* (loaded artifacts).
  - *Activations* (the layer's input), per tensor, asymmetric over [min(lo, 0), max(hi, 0)] with
    q ∈ [0, 2^b − 1]. Inputs known to be non-negative — from the graph (after ReLU/ReLU6/sigmoid, through
    pooling/flatten/slicing/cat/add) or from calibration (observed min ≥ 0) — get z = 0, i.e. the unsigned
    range [0, 2^b − 1]. Ranges come from :func:`calibrate` (``minmax``, ``percentile`` or ``mse``) and stay
    fixed during fine-tuning.
  - All scales are rounded **up** to fp16 values, so nothing is clipped by the rounding and the exported
    fp16 scales reproduce search-time numerics exactly.

* **BN folding** (:func:`fold_batchnorm`): W′ = W·γ/√(σ²+ε), b′ = β + (b − μ)·γ/√(σ²+ε) for every
  Conv → BatchNorm pair whose conv output feeds only that BN — exact in eval mode, done before quantizing.
* **Layers and floors.** Quantizable layers are ``Conv1d``/``Conv2d``/``Linear`` call sites in graph order.
  The first and last of them have a floor (``first_last_min_bits``, 8 as in HAQ) for both weight and input
  bits; requests below it raise :class:`~autoprune.errors.ConfigError` — :func:`enforce_floors` raises them
  explicitly. ``None`` (float) is always allowed.
* **Export** (:func:`export`, :func:`save_quantized`, :func:`load`, :func:`load_quantized`): LSB-first packed
  unsigned codes (q + 2^(b−1) for symmetric grids, q for asymmetric), fp16 scales, uint8 zero points for
  asymmetric grids, everything else as stored float tensors; activation (scale, zero point) pairs live in
  ``arch.json`` (its ``"quant"`` section, whose loader this module registers with :mod:`autoprune.serialize`
  together with the Q-layer types, so ``serialize.load_module`` rebuilds quantized artifacts too).
  ``size_bytes`` is the byte sum of the stored tensors and ``payload_bits`` (HAQ's metric) = Σ b·n over
  conv/linear weights (32 for float ones); :func:`autoprune.cost.closed_form` gives both (and BitOps) in closed
  form without building anything.
* **HAQ budget legalizer** (:func:`legalize_bits`) and an optional real-int8 CPU path (:func:`to_int8`,
  ``torch.ao.quantization`` FX backend behind a guarded import).
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from autoprune import serialize
from autoprune.errors import AutoPruneError, CheckpointError, ConfigError
from autoprune.types import QuantSpec

__all__ = [
    "SECTION",
    "QConv1d",
    "QConv2d",
    "QLinear",
    "QuantArtifact",
    "QuantSpec",
    "QuantizedTensorInfo",
    "activation_qparams",
    "apply",
    "build_quantized",
    "calibrate",
    "default_floors",
    "dequantize",
    "enforce_floors",
    "export",
    "fake_quant_activation",
    "fake_quant_weight",
    "fold_batchnorm",
    "fp16_ceil",
    "freeze",
    "legalize_bits",
    "load",
    "load_quantized",
    "pack_bits",
    "quantizable_layers",
    "save_quantized",
    "to_int8",
    "unpack_bits",
    "weight_qparams",
    "weight_scheme",
]

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)
_MSE_RATIOS = tuple(1.0 - 0.025 * i for i in range(25))  # clip ratios 1.0 … 0.4
_QUANT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
#: Name of the ``arch.json`` section that marks (and describes) a quantized artifact.
SECTION = "quant"

# ---------------------------------------------------------------------------------------------------------------
# Quantizer primitives
# ---------------------------------------------------------------------------------------------------------------


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Round positive values **up** to the next fp16-representable value (clamped to [2^-24, 65504]).

    Returns a float32 tensor whose values are exactly representable in fp16.
    """
    x = x.detach().float().clamp(min=FP16_TINY, max=FP16_MAX)
    h = x.half()
    up = h.float() < x
    h = torch.where(up, torch.nextafter(h, torch.full_like(h, math.inf)), h)
    return h.float()


def weight_scheme(bits: int, asym_below: int = 4) -> str:
    """``"asym"`` for ``bits < asym_below`` (all 2^b levels), else ``"sym"`` (restricted, z = 0)."""
    return "asym" if bits < asym_below else "sym"


def _weight_range(bits: int, scheme: str) -> tuple[int, int, int]:
    """(q_min, q_max, code offset) of a weight grid; stored codes are q + offset ∈ [0, 2^b − 1]."""
    if scheme == "sym":
        half = 2 ** (bits - 1)
        return -(half - 1), half - 1, half
    return 0, 2**bits - 1, 0


def _qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, scheme: str,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    qmin, qmax, _ = _weight_range(bits, scheme)
    if scheme == "sym":
        scale = fp16_ceil(torch.maximum(hi.abs(), lo.abs()) / qmax)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = fp16_ceil((hi - lo) / qmax)
    zp = torch.round(-lo / scale).clamp(qmin, qmax).to(torch.int32)
    return scale, zp


def _mse_search(flat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, scheme: str,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clip ratio (from :data:`_MSE_RATIOS`) minimising the squared fake-quantization error, vectorised
    over ratios in chunks of about 4M elements. Ties keep the larger ratio (1.0 = plain max clip)."""
    qmin, qmax, _ = _weight_range(bits, scheme)
    c, k = flat.shape
    chunk = max(1, (1 << 22) // max(1, c * k))
    scales, zps, errs = [], [], []
    for start in range(0, len(_MSE_RATIOS), chunk):
        r = torch.tensor(_MSE_RATIOS[start:start + chunk], dtype=flat.dtype).unsqueeze(1)  # (R, 1)
        s_r, z_r = _qparams_from_range(lo * r, hi * r, bits, scheme)  # (R, C)
        rep = flat.unsqueeze(0).expand(r.shape[0], c, k).reshape(-1, k)
        fq = torch.fake_quantize_per_channel_affine(rep, s_r.reshape(-1), z_r.reshape(-1), 0, qmin, qmax)
        errs.append(((fq - rep) ** 2).sum(1).reshape(r.shape[0], c))
        scales.append(s_r)
        zps.append(z_r)
    best = torch.cat(errs).argmin(0, keepdim=True)  # first minimum: the largest ratio among ties
    return torch.cat(scales).gather(0, best).squeeze(0), torch.cat(zps).gather(0, best).squeeze(0)


def weight_qparams(w: torch.Tensor, bits: int, *, scheme: str = "sym", clip: str = "max",
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (axis 0) scale (fp32 holding fp16 values) and int32 zero point of a weight tensor.

    Args:
        w: Weight, output channels first.
        bits: 2–8.
        scheme: ``"sym"`` (restricted, z = 0) or ``"asym"``.
        clip: ``"max"`` (clip at the extremes) or ``"mse"`` (per-channel grid search of the clip ratio).
    """
    if clip not in ("max", "mse"):
        raise ConfigError(f"unknown weight clip {clip!r}", hint="use 'max', 'mse' or 'auto'")
    with torch.no_grad():
        flat = w.detach().reshape(w.shape[0], -1).float()
        lo, hi = flat.amin(1), flat.amax(1)
        if clip == "max":
            return _qparams_from_range(lo, hi, bits, scheme)
        return _mse_search(flat, lo, hi, bits, scheme)


def fake_quant_weight(w: torch.Tensor, bits: int, scale: torch.Tensor, zero_point: torch.Tensor,
                      scheme: str = "sym") -> torch.Tensor:
    """Per-channel fake quantization of ``w`` (axis 0) with a straight-through gradient."""
    qmin, qmax, _ = _weight_range(bits, scheme)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zero_point.to(torch.int32), 0, qmin, qmax)


def activation_qparams(lo: float, hi: float, bits: int, *, unsigned: bool = False) -> tuple[float, int]:
    """Per-tensor (scale, zero point) for the range [lo, hi] on the grid [0, 2^b − 1] (z = 0 when unsigned)."""
    lo = 0.0 if unsigned else min(float(lo), 0.0)
    hi = max(float(hi), 0.0)
    qmax = 2**bits - 1
    scale = float(fp16_ceil(torch.tensor((hi - lo) / qmax)))
    zp = int(min(max(round(-lo / scale), 0), qmax))
    return scale, zp


def fake_quant_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                          ) -> torch.Tensor:
    """Per-tensor fake quantization on [0, 2^b − 1] with a straight-through gradient.

    While torch.export traces, the same arithmetic is written out in plain ops (the fused op has no kernel for a
    symbolic batch size), so an exported model takes any batch and gives the same numbers.
    """
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)
    if torch.jit.is_tracing() or (is_exporting is not None and is_exporting()):  # no training here: no gradient
        s, z = scale.float(), zero_point.float()
        return (torch.clamp(torch.round(x * (1.0 / s)) + z, 0, 2**bits - 1) - z) * s
    return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero_point.to(torch.int32), 0, 2**bits - 1)


# ---------------------------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------------------------


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2^bits) LSB-first into a uint8 tensor of ⌈n·bits/8⌉ bytes (vectorised).

    Code ``i`` occupies stream bits ``[i·bits, (i+1)·bits)``; stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``.
    """
    if not 1 <= bits <= 8:
        raise ConfigError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ConfigError(f"codes out of range for {bits}-bit packing")
    flat = flat.to(torch.uint8)
    stream = ((flat.unsqueeze(1) >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(1, dtype=torch.int16).to(torch.uint8)


def unpack_bits(payload: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as uint8."""
    if payload.dtype != torch.uint8 or payload.numel() != math.ceil(n * bits / 8):
        raise ConfigError(f"payload must be {math.ceil(n * bits / 8)} uint8 bytes for {n} {bits}-bit codes")
    stream = ((payload.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: n * bits]
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int16)
    return (stream.reshape(n, bits).to(torch.int16) * weights).sum(1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Quantized layers
# ---------------------------------------------------------------------------------------------------------------


def _tracing() -> bool:
    """True while torch.export / torch.compile trace the model (data-dependent checks must be skipped)."""
    compiler = getattr(torch, "compiler", None)
    checks = (getattr(compiler, "is_exporting", None), getattr(compiler, "is_compiling", None))
    return torch.jit.is_tracing() or any(f is not None and f() for f in checks)


class _QuantLayer(nn.Module):
    """State and behaviour shared by :class:`QConv1d`, :class:`QConv2d` and :class:`QLinear` (placed before the
    float layer class in their bases, so that class provides ``__init__`` and the layer arithmetic).

    Buffers: ``a_scale`` / ``a_zero_point`` (0-d, when ``a_bits`` is set; scale 0 = not calibrated) and, for
    frozen layers, ``w_scale`` (fp16 [C_out]) and ``w_zero_point`` (uint8 [C_out], asymmetric grids).
    """

    weight: nn.Parameter
    bias: torch.Tensor | None
    a_scale: torch.Tensor
    a_zero_point: torch.Tensor
    w_scale: torch.Tensor
    w_zero_point: torch.Tensor
    _float_kwargs: tuple[str, ...] = ()

    def _setup_quant(self, w_bits: int | None, a_bits: int | None, w_scheme: str, w_clip: str, a_unsigned: bool,
                     frozen: bool) -> None:
        QuantSpec(w_bits, a_bits)  # validates the ranges
        if w_scheme not in ("sym", "asym") or w_clip not in ("max", "mse"):
            raise ConfigError(f"bad weight scheme/clip {w_scheme!r}/{w_clip!r}",
                              hint="scheme: 'sym' | 'asym'; clip: 'max' | 'mse'")
        self.w_bits, self.a_bits, self.w_scheme, self.w_clip = w_bits, a_bits, w_scheme, w_clip
        self.a_unsigned, self.frozen = bool(a_unsigned), bool(frozen) and w_bits is not None
        self.act_quant_enabled = True  # runtime switch (calibration observes float inputs)
        if a_bits is not None:
            self.register_buffer("a_scale", torch.zeros(()))
            self.register_buffer("a_zero_point", torch.zeros((), dtype=torch.int32))
        if self.frozen:
            c_out = self.weight.shape[0]
            self.register_buffer("w_scale", torch.ones(c_out, dtype=torch.float16))
            if w_scheme == "asym":
                self.register_buffer("w_zero_point", torch.zeros(c_out, dtype=torch.uint8))

    @property
    def spec(self) -> QuantSpec:
        """The layer's bit-widths."""
        return QuantSpec(self.w_bits, self.a_bits)

    @property
    def calibrated(self) -> bool:
        """True when the input range is set (or the input is not quantized)."""
        return self.a_bits is None or bool(self.a_scale > 0)

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current per-channel (scale fp32, zero point int32) — stored ones when frozen."""
        assert self.w_bits is not None
        if self.frozen:
            zp = self.w_zero_point.to(torch.int32) if self.w_scheme == "asym" else torch.zeros_like(
                self.w_scale, dtype=torch.int32)
            return self.w_scale.float(), zp
        # Cached while the weight is unchanged: same storage (kept alive by the cached alias, so the address
        # cannot be reused) and same version counter (bumped by optimizer steps, copy_, load_state_dict).
        w = self.weight
        if _tracing():  # torch.export / compile: plain computation, no Python-side cache
            return weight_qparams(w, self.w_bits, scheme=self.w_scheme, clip=self.w_clip)
        key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype, self.w_bits, self.w_scheme, self.w_clip)
        cached = self.__dict__.get("_qparams_cache")
        if cached is not None and cached[0] == key:
            return cached[2], cached[3]
        with torch.inference_mode(False), torch.no_grad():
            scale, zp = weight_qparams(w, self.w_bits, scheme=self.w_scheme, clip=self.w_clip)
            self.__dict__["_qparams_cache"] = (key, w.detach(), scale, zp)
        return scale, zp

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight used in ``forward`` (the float weight when ``w_bits`` is None)."""
        if self.w_bits is None:
            return self.weight
        scale, zp = self.weight_qparams()
        return fake_quant_weight(self.weight, self.w_bits, scale, zp, self.w_scheme)

    def set_activation_range(self, lo: float, hi: float) -> None:
        """Set the input quantizer from a range (z = 0 if the input is known to be non-negative)."""
        if self.a_bits is None:
            return
        scale, zp = activation_qparams(lo, hi, self.a_bits, unsigned=self.a_unsigned or lo >= 0)
        self.a_scale.fill_(scale)
        self.a_zero_point.fill_(zp)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the input (no-op if ``a_bits`` is None or during calibration)."""
        if self.a_bits is None or not self.act_quant_enabled:
            return x
        if not _tracing() and not self.calibrated:
            raise AutoPruneError(
                f"the {self.a_bits}-bit input quantizer of a {type(self).__name__} has no range yet",
                hint="call autoprune.quantization.calibrate(qm, loader) after apply() and before running the model",
            )
        return fake_quant_activation(x, self.a_scale, self.a_zero_point, self.a_bits)

    def autoprune_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able) — used by :mod:`autoprune.serialize`."""
        kw = serialize.encode_kwargs(self, self._float_qualname)
        return {**kw, "w_bits": self.w_bits, "a_bits": self.a_bits, "w_scheme": self.w_scheme,
                "w_clip": self.w_clip, "a_unsigned": self.a_unsigned, "frozen": self.frozen}

    def _quant_repr(self) -> str:
        return (f"w_bits={self.w_bits}, a_bits={self.a_bits}, w_scheme={self.w_scheme}, "
                f"a_unsigned={self.a_unsigned}, frozen={self.frozen}")

    _float_qualname = ""


class QConv2d(_QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` with per-channel fake-quantized weights and a per-tensor fake-quantized input."""

    _float_qualname = "torch.nn.Conv2d"

    def __init__(self, *args: Any, w_bits: int | None = 8, a_bits: int | None = None, w_scheme: str = "sym",
                 w_clip: str = "max", a_unsigned: bool = False, frozen: bool = False, **kwargs: Any) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._setup_quant(w_bits, a_bits, w_scheme, w_clip, a_unsigned, frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._quant_repr()}"


class QConv1d(_QuantLayer, nn.Conv1d):
    """``nn.Conv1d`` with per-channel fake-quantized weights and a per-tensor fake-quantized input."""

    _float_qualname = "torch.nn.Conv1d"

    def __init__(self, *args: Any, w_bits: int | None = 8, a_bits: int | None = None, w_scheme: str = "sym",
                 w_clip: str = "max", a_unsigned: bool = False, frozen: bool = False, **kwargs: Any) -> None:
        nn.Conv1d.__init__(self, *args, **kwargs)
        self._setup_quant(w_bits, a_bits, w_scheme, w_clip, a_unsigned, frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Conv1d.extra_repr(self)}, {self._quant_repr()}"


class QLinear(_QuantLayer, nn.Linear):
    """``nn.Linear`` with per-channel fake-quantized weights and a per-tensor fake-quantized input."""

    _float_qualname = "torch.nn.Linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, w_bits: int | None = 8,
                 a_bits: int | None = None, w_scheme: str = "sym", w_clip: str = "max", a_unsigned: bool = False,
                 frozen: bool = False) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._setup_quant(w_bits, a_bits, w_scheme, w_clip, a_unsigned, frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._quant_repr()}"


_Q_FOR: dict[type[nn.Module], type[_QuantLayer]] = {nn.Conv1d: QConv1d, nn.Conv2d: QConv2d, nn.Linear: QLinear}


def _to_quant(module: nn.Module, spec: QuantSpec, scheme: str, clip: str, unsigned: bool) -> nn.Module:
    qcls = _Q_FOR[type(module)]
    q = qcls(**serialize.decode_kwargs(serialize.encode_kwargs(module)), w_bits=spec.w_bits, a_bits=spec.a_bits,
             w_scheme=scheme, w_clip=clip, a_unsigned=unsigned)
    q.weight = module.weight
    if module.bias is not None:
        q.bias = module.bias
    q.train(module.training)
    return q.to(module.weight.device)


# ---------------------------------------------------------------------------------------------------------------
# Graph preparation: trace, fold BN, find layers
# ---------------------------------------------------------------------------------------------------------------

_BN_FOR_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d}


def _set_module(gm: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """Return a traced copy of ``model`` with every foldable Conv → BatchNorm pair folded into the conv.

    A pair folds when the BN directly consumes a ``Conv1d``/``Conv2d`` output that has no other user, the
    conv is called once, and the BN tracks running statistics. The result equals the original in eval mode.
    """
    gm = _trace_copy(model)
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        bn = gm.get_submodule(node.target)
        src = node.args[0]
        if src.op != "call_module" or len(src.users) != 1 or uses.get(src.target, 0) != 1:
            continue
        conv = gm.get_submodule(src.target)
        if type(conv) not in _BN_FOR_CONV or type(bn) is not _BN_FOR_CONV[type(conv)]:
            continue
        if bn.running_mean is None or bn.running_var is None or uses.get(node.target, 0) != 1:
            continue
        _set_module(gm, src.target, _fold_pair(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _fold_pair(conv: nn.Module, bn: nn.Module) -> nn.Module:
    with torch.no_grad():
        w = conv.weight.detach()
        inv_std = torch.rsqrt(bn.running_var.to(w) + bn.eps)
        gamma = bn.weight.detach().to(w) if bn.weight is not None else torch.ones_like(inv_std)
        beta = bn.bias.detach().to(w) if bn.bias is not None else torch.zeros_like(inv_std)
        b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(inv_std)
        factor = gamma * inv_std
        kwargs = serialize.decode_kwargs(serialize.encode_kwargs(conv))
        kwargs["bias"] = True
        folded = type(conv)(**kwargs).to(w.device, w.dtype)
        folded.weight.copy_(w * factor.reshape(-1, *([1] * (w.dim() - 1))))
        folded.bias.copy_(beta + (b - bn.running_mean.to(w)) * factor)
    folded.train(conv.training)
    return folded


def _trace_copy(model: nn.Module) -> fx.GraphModule:
    return serialize.trace(copy.deepcopy(model))


def _prepare(model: nn.Module, fold_bn: bool) -> fx.GraphModule:
    return fold_batchnorm(model) if fold_bn else _trace_copy(model)


def _layer_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Quantizable call sites (first call of each conv/linear module) in graph order."""
    out: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in out:
            m = gm.get_submodule(node.target)
            if type(m) in _QUANT_TYPES or isinstance(m, _QuantLayer):
                out[node.target] = node
    return out


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the conv/linear layers that take bit-widths, in graph (execution) order."""
    return list(_layer_nodes(serialize.trace(model) if not isinstance(model, fx.GraphModule) else model))


_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity)
_NONNEG_FUNCS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax, torch.softmax}
_PASS_FUNCS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
               torch.flatten, F.dropout, torch.mean, operator.getitem, torch.cat, torch.reshape, F.interpolate,
               operator.add, operator.iadd, torch.add}
_NONNEG_METHODS = {"relu", "relu_", "sigmoid", "softmax"}
_PASS_METHODS = {"view", "reshape", "flatten", "mean", "contiguous", "permute", "transpose", "squeeze", "unsqueeze",
                 "add", "add_", "chunk", "split"}


def _nonnegative(gm: fx.GraphModule, node: fx.node.Argument, depth: int = 0) -> bool:
    """Whether ``node``'s value is provably ≥ 0 (ReLU-like producer, through shape/pool/concat/add ops)."""
    if not isinstance(node, fx.Node) or depth > 64:
        return False
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, _NONNEG_MODULES):
            return True
        return isinstance(m, _PASS_MODULES) and _nonnegative(gm, node.args[0], depth + 1)
    if node.op == "call_function" and node.target in _NONNEG_FUNCS:
        return True
    if node.op == "call_method" and node.target in _NONNEG_METHODS:
        return True
    if (node.op == "call_function" and node.target in _PASS_FUNCS) or (
            node.op == "call_method" and node.target in _PASS_METHODS):
        tensors = [a for a in _flat_args(node.args) if isinstance(a, fx.Node)]
        if node.target in (torch.cat,):
            tensors = [a for a in _flat_args(node.args[0]) if isinstance(a, fx.Node)]
        elif node.target not in (operator.add, operator.iadd, torch.add, "add", "add_"):
            tensors = tensors[:1]
        else:  # add: every tensor operand non-negative, scalars must be ≥ 0
            if any(not isinstance(a, fx.Node) and not (isinstance(a, int | float) and a >= 0)
                   for a in _flat_args(node.args)):
                return False
        return bool(tensors) and all(_nonnegative(gm, a, depth + 1) for a in tensors)
    return False


def _flat_args(args: Any) -> list[Any]:
    if isinstance(args, list | tuple):
        return [x for a in args for x in _flat_args(a)]
    return [args]


# ---------------------------------------------------------------------------------------------------------------
# apply / floors / calibrate
# ---------------------------------------------------------------------------------------------------------------


def _normalize_bits(bits: Mapping[str, Any], layers: Sequence[str]) -> dict[str, QuantSpec]:
    import difflib

    out: dict[str, QuantSpec] = {}
    for name, value in bits.items():
        if name not in layers:
            close = difflib.get_close_matches(str(name), layers, n=3)
            raise ConfigError(
                f"{name!r} is not a quantizable (conv/linear) layer of this model"
                + (f"; did you mean {close[0]!r}?" if close else ""),
                hint=f"quantizable layers: {', '.join(layers[:8])}{' ...' if len(layers) > 8 else ''}",
            )
        out[name] = QuantSpec.parse(value, name)
    return out


def default_floors(model: nn.Module, first_last_min_bits: int = 8, min_bits: int = 2) -> dict[str, QuantSpec]:
    """Per-layer minimum bits: ``first_last_min_bits`` for the first and last layer, ``min_bits`` elsewhere."""
    layers = quantizable_layers(model)
    floors = {n: QuantSpec(min_bits, min_bits) for n in layers}
    for n in {layers[0], layers[-1]} if layers else set():
        floors[n] = QuantSpec(first_last_min_bits, first_last_min_bits)
    return floors


def _check_floors(specs: Mapping[str, QuantSpec], layers: Sequence[str], floor: int) -> None:
    if not layers:
        return
    for name, role in ((layers[0], "first"), (layers[-1], "last")):
        spec = specs.get(name)
        if spec is None:
            continue
        for kind, b in (("weight", spec.w_bits), ("input", spec.a_bits)):
            if b is not None and b < floor:
                raise ConfigError(
                    f"{b}-bit {kind} requested for the {role} layer {name!r}, below its floor of {floor} bits",
                    hint=f"use >= {floor} bits (or None = float) there, call quantization.enforce_floors(bits, "
                         "model), or lower first_last_min_bits",
                )


def enforce_floors(bits: Mapping[str, QuantSpec], model: nn.Module, first_last_min_bits: int = 8,
                   ) -> dict[str, QuantSpec]:
    """Return ``bits`` with the first and last layer raised to at least ``first_last_min_bits`` (None stays float)."""
    layers = quantizable_layers(model)
    out = {k: QuantSpec.parse(v, k) for k, v in bits.items()}
    for name in {layers[0], layers[-1]} if layers else set():
        if name in out:
            s = out[name]
            out[name] = QuantSpec(None if s.w_bits is None else max(s.w_bits, first_last_min_bits),
                                  None if s.a_bits is None else max(s.a_bits, first_last_min_bits))
    return out


def apply(model: nn.Module, bits: Mapping[str, QuantSpec], *, fold_bn: bool = True, first_last_min_bits: int = 8,
          asym_below: int = 4, w_clip: str = "auto") -> fx.GraphModule:
    """Return a fake-quantized copy of ``model`` (the original is untouched).

    The model is traced with ``torch.fx``, Conv → BN pairs are folded (``fold_bn``), and every layer named in
    ``bits`` is replaced by :class:`QConv2d` / :class:`QConv1d` / :class:`QLinear`. Layers not named stay float.
    Input quantizers need :func:`calibrate` before the model runs.

    Args:
        model: Float model or ``GraphModule`` (e.g. a pruned one).
        bits: Layer name → :class:`~autoprune.types.QuantSpec` (``a_bits`` quantizes the layer's input).
        fold_bn: Fold BatchNorm into the preceding conv first (as deployment does).
        first_last_min_bits: Floor for the first and last quantizable layer (weights and input).
        asym_below: Weight bit-widths below this use the asymmetric grid (see module docstring).
        w_clip: ``"max"``, ``"mse"`` or ``"auto"`` (MSE search for asymmetric grids only).

    Raises:
        ConfigError: Unknown layer names, bad bit-widths, or requests below a floor.
    """
    if w_clip not in ("auto", "max", "mse"):
        raise ConfigError(f"unknown w_clip {w_clip!r}", hint="use 'auto', 'max' or 'mse'")
    gm = _prepare(model, fold_bn)
    nodes = _layer_nodes(gm)
    if any(isinstance(gm.get_submodule(n), _QuantLayer) for n in nodes):
        raise ConfigError("the model is already quantized", hint="apply quantization to the float model")
    layers = list(nodes)
    specs = _normalize_bits(bits, layers)
    _check_floors(specs, layers, first_last_min_bits)
    for name, spec in specs.items():
        if spec.w_bits is None and spec.a_bits is None:
            continue
        scheme = weight_scheme(spec.w_bits or 8, asym_below)
        clip = w_clip if w_clip != "auto" else ("mse" if scheme == "asym" else "max")
        node = nodes[name]
        unsigned = bool(node.args) and _nonnegative(gm, node.args[0])
        _set_module(gm, name, _to_quant(gm.get_submodule(name), spec, scheme, clip, unsigned))
    gm.recompile()
    gm.train(model.training)
    return gm


def _quant_layers(model: nn.Module) -> dict[str, _QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantLayer)}


class _RangeObserver:
    """Collects an input range by min/max, averaged per-batch percentiles, or an MSE-searched clip."""

    def __init__(self, method: str, percentile: float, sample_size: int = 1 << 16) -> None:
        self.method, self.percentile, self.sample_size = method, percentile, sample_size
        self.lo, self.hi = math.inf, -math.inf
        self.p_lo: list[float] = []
        self.p_hi: list[float] = []
        self.samples: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        if flat.numel() == 0:
            return
        self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        if self.method == "minmax":
            return
        step = max(1, flat.numel() // self.sample_size)
        sub = flat[::step]
        if self.method == "percentile":
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
            lo, hi = torch.quantile(sub, q).tolist()
            self.p_lo.append(lo)
            self.p_hi.append(hi)
        else:
            self.samples.append(sub)

    def range(self, bits: int, unsigned: bool) -> tuple[float, float]:
        lo = 0.0 if unsigned else min(self.lo, 0.0)
        if self.method == "minmax":
            return lo, self.hi
        if self.method == "percentile":
            plo = 0.0 if unsigned else min(sum(self.p_lo) / len(self.p_lo), 0.0)
            return plo, sum(self.p_hi) / len(self.p_hi)
        sample = torch.cat(self.samples)
        best, best_range = math.inf, (lo, self.hi)
        for r in _MSE_RATIOS:
            scale, zp = activation_qparams(lo * r, self.hi * r, bits, unsigned=unsigned)
            err = float(((fake_quant_activation(sample, torch.tensor(scale), torch.tensor(zp), bits) - sample) ** 2)
                        .mean())
            if err < best:
                best, best_range = err, (lo * r, self.hi * r)
        return best_range


def _batches(loader: Iterable[Any], n: int) -> Iterable[torch.Tensor]:
    for i, batch in enumerate(loader):
        if i >= n:
            break
        yield batch[0] if isinstance(batch, list | tuple) else batch


def calibrate(qm: nn.Module, loader: Iterable[Any], batches: int = 8, method: str = "minmax", *,
              percentile: float = 99.99, device: torch.device | str | None = None) -> dict[str, tuple[float, int]]:
    """Set the input ranges of every quantized input from ``batches`` batches of (training) data.

    Inputs are observed in float (input quantizers off, weights quantized), in eval mode, without gradients.

    Args:
        qm: Output of :func:`apply` (modified in place).
        loader: Iterable of ``(x, y)`` batches or of input tensors.
        batches: Number of batches to observe.
        method: ``"minmax"``, ``"percentile"`` (per-batch percentiles averaged) or ``"mse"`` (clip ratio
            minimising the quantization MSE on a sample).
        percentile: Upper percentile for ``"percentile"`` (the lower one is ``100 - percentile``).
        device: Where to run (default: the model's device).

    Returns:
        Layer name → (scale, zero point).
    """
    if method not in ("minmax", "percentile", "mse"):
        raise ConfigError(f"unknown calibration method {method!r}", hint="use 'minmax', 'percentile' or 'mse'")
    layers = {n: m for n, m in _quant_layers(qm).items() if m.a_bits is not None}
    if not layers:
        return {}
    dev = torch.device(device) if device is not None else next(qm.parameters()).device
    observers = {n: _RangeObserver(method, percentile) for n in layers}
    hooks = [m.register_forward_pre_hook(
        lambda _mod, args, obs=observers[n]: obs.update(args[0])) for n, m in layers.items()]
    was_training = qm.training
    for m in layers.values():
        m.act_quant_enabled = False
    seen = 0
    try:
        qm.eval()
        with torch.no_grad():
            for x in _batches(loader, batches):
                qm(x.to(dev))
                seen += 1
    finally:
        for h in hooks:
            h.remove()
        for m in layers.values():
            m.act_quant_enabled = True
        qm.train(was_training)
    if seen == 0:
        raise ConfigError("the calibration loader yielded no batches", hint="pass a non-empty training loader")
    out: dict[str, tuple[float, int]] = {}
    for n, m in layers.items():
        lo, hi = observers[n].range(m.a_bits, m.a_unsigned)  # type: ignore[arg-type]
        m.set_activation_range(lo, hi)
        out[n] = (float(m.a_scale), int(m.a_zero_point))
    return out


def freeze(qm: nn.Module) -> nn.Module:
    """Freeze the weight scales/zero points of every quantized layer at their current values (in place)."""
    for m in _quant_layers(qm).values():
        if m.w_bits is None or m.frozen:
            continue
        scale, zp = m.weight_qparams()
        m.frozen = True
        m.register_buffer("w_scale", scale.half())
        if m.w_scheme == "asym":
            m.register_buffer("w_zero_point", zp.to(torch.uint8))
    return qm


def dequantize(qm: nn.Module) -> fx.GraphModule:
    """A float copy of ``qm`` whose conv/linear layers hold the fake-quantized weights (input quantizers dropped)."""
    gm = _trace_copy(qm)
    for name, m in _quant_layers(gm).items():
        plain = _Q_FOR_INV[type(m)](**serialize.decode_kwargs(serialize.encode_kwargs(m, m._float_qualname)))
        with torch.no_grad():
            plain.weight.copy_(m.quantized_weight())
            if m.bias is not None:
                plain.bias.copy_(m.bias)
        _set_module(gm, name, plain.train(m.training))
    gm.recompile()
    return gm


_Q_FOR_INV = {QConv1d: nn.Conv1d, QConv2d: nn.Conv2d, QLinear: nn.Linear}

# ---------------------------------------------------------------------------------------------------------------
# Export, exact size and loading
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedTensorInfo:
    """Where and how one quantized weight is stored (ENGINE.md §5.3)."""

    name: str
    module: str
    shape: tuple[int, ...]
    bits: int
    axis: int
    scheme: str
    offset: int
    codes: str
    scale: str
    zero_point: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (stored in ``arch.json``)."""
        return {"name": self.name, "module": self.module, "shape": list(self.shape), "bits": self.bits,
                "axis": self.axis, "scheme": self.scheme, "offset": self.offset, "codes": self.codes,
                "scale": self.scale, "zero_point": self.zero_point}


@dataclass
class QuantArtifact:
    """A quantized model as data: the arch description (with a ``"quant"`` section) and the stored tensors.

    Attributes:
        arch: JSON-able architecture (see :mod:`autoprune.serialize`) plus ``arch["quant"]``.
        tensors: Everything that is stored: packed codes (uint8), fp16 scales, uint8 zero points, and the
            float tensors of the rest of the model.
        entries: The quantized weights.
        size_bytes: Σ nbytes of ``tensors`` = Σ⌈n·b/8⌉ + 2·C_out per scale + zero-point bytes + float extras.
        payload_bits: Σ b·n over conv/linear weights (32 for float weights) — HAQ's size metric.
    """

    arch: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    entries: list[QuantizedTensorInfo] = field(default_factory=list)
    size_bytes: int = 0
    payload_bits: int = 0

    def breakdown(self) -> dict[str, int]:
        """Bytes by kind: ``payload``, ``scales``, ``zero_points``, ``float``."""
        kinds = {"payload": 0, "scales": 0, "zero_points": 0}
        roles = {}
        for e in self.entries:
            roles[e.codes], roles[e.scale] = "payload", "scales"
            if e.zero_point:
                roles[e.zero_point] = "zero_points"
        other = 0
        for name, t in self.tensors.items():
            if name in roles:
                kinds[roles[name]] += t.nbytes
            else:
                other += t.nbytes
        return {**kinds, "float": other}

    @property
    def json_bytes(self) -> int:
        """Size of the compact JSON description (reported separately from ``size_bytes``)."""
        import json

        return len(json.dumps(self.arch, separators=(",", ":")))


def _codes(m: _QuantLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unsigned codes uint8, scale fp16, zero point int32) of a quantized layer's weight."""
    assert m.w_bits is not None
    scale, zp = m.weight_qparams()
    with torch.no_grad():
        w_hat = fake_quant_weight(m.weight.detach(), m.w_bits, scale, zp, m.w_scheme)
        shape = (-1,) + (1,) * (w_hat.dim() - 1)
        q = torch.round(w_hat * (1.0 / scale).reshape(shape)) + zp.reshape(shape)
        qmin, qmax, offset = _weight_range(m.w_bits, m.w_scheme)
        q = q.clamp(qmin, qmax)
    return (q + offset).to(torch.uint8), scale.half(), zp


def export(qm: nn.Module) -> QuantArtifact:
    """Pack a fake-quantized model into a :class:`QuantArtifact` (codes, fp16 scales, zero points, floats).

    Raises:
        AutoPruneError: If an input quantizer is not calibrated.
    """
    gm = serialize.trace(qm)
    arch, tensors = serialize.encode_module(gm)
    arch = copy.deepcopy(arch)
    entries: list[QuantizedTensorInfo] = []
    acts: dict[str, Any] = {}
    payload_bits = 0
    qlayers = {n: m for n in arch["modules"] if isinstance(m := gm.get_submodule(n), _QuantLayer)}
    for name, spec in arch["modules"].items():
        if name not in qlayers and spec["type"] in ("torch.nn.Conv1d", "torch.nn.Conv2d", "torch.nn.Linear"):
            payload_bits += 32 * tensors[f"{name}.weight"].numel()
    for name, m in qlayers.items():
        if m.a_bits is not None:
            if not m.calibrated:
                raise AutoPruneError(f"input quantizer of {name!r} is not calibrated",
                                     hint="call quantization.calibrate(qm, loader) before export")
            acts[name] = {"bits": m.a_bits, "scale": float(m.a_scale), "zero_point": int(m.a_zero_point),
                          "unsigned": m.a_unsigned}
            tensors.pop(f"{name}.a_scale")
            tensors.pop(f"{name}.a_zero_point")
        if m.w_bits is None:
            payload_bits += 32 * m.weight.numel()
            continue
        codes, scale16, zp = _codes(m)
        info = QuantizedTensorInfo(
            name=f"{name}.weight", module=name, shape=tuple(m.weight.shape), bits=m.w_bits, axis=0,
            scheme=m.w_scheme, offset=_weight_range(m.w_bits, m.w_scheme)[2], codes=f"{name}.weight_codes",
            scale=f"{name}.w_scale", zero_point=f"{name}.w_zero_point" if m.w_scheme == "asym" else None)
        entries.append(info)
        payload_bits += m.w_bits * m.weight.numel()
        tensors.pop(info.name)
        tensors[info.codes] = pack_bits(codes, m.w_bits)
        tensors[info.scale] = scale16
        arch["tensors"][info.scale] = {"kind": "buffer", "shape": [scale16.numel()], "dtype": "float16"}
        if info.zero_point:
            tensors[info.zero_point] = zp.to(torch.uint8)
            arch["tensors"][info.zero_point] = {"kind": "buffer", "shape": [zp.numel()], "dtype": "uint8"}
        arch["modules"][name]["kwargs"]["frozen"] = True
    size = sum(t.nbytes for t in tensors.values())
    arch[SECTION] = {"version": 1, "weights": [e.to_dict() for e in entries], "activations": acts,
                     "size_bytes": size, "payload_bits": payload_bits}
    return QuantArtifact(arch=arch, tensors=tensors, entries=entries, size_bytes=size, payload_bits=payload_bits)


def build_quantized(arch: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild a fake-quantized ``GraphModule`` from an exported description (decoding the packed codes).

    Raises:
        CheckpointError: Malformed quantization metadata or tensors.
    """
    quant = arch.get(SECTION)
    if not isinstance(quant, dict) or quant.get("version") != 1:
        raise CheckpointError("unsupported or missing quantization section in arch.json", hint="re-export the model")
    tensors = dict(tensors)
    try:
        for e in quant["weights"]:
            n = math.prod(e["shape"])
            bits, offset = int(e["bits"]), int(e["offset"])
            codes = unpack_bits(tensors.pop(e["codes"]), bits, n).to(torch.int32)
            scale = tensors[e["scale"]].float()
            zp = (tensors[e["zero_point"]].to(torch.int32) if e["zero_point"]
                  else torch.zeros_like(scale, dtype=torch.int32))
            shape = (-1,) + (1,) * (len(e["shape"]) - 1)
            q = codes.reshape(e["shape"]) - offset
            tensors[e["name"]] = ((q - zp.reshape(shape)).float() * scale.reshape(shape)).contiguous()
        for name, a in quant["activations"].items():
            tensors[f"{name}.a_scale"] = torch.tensor(float(a["scale"]))
            tensors[f"{name}.a_zero_point"] = torch.tensor(int(a["zero_point"]), dtype=torch.int32)
    except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as exc:
        raise CheckpointError(f"malformed quantized tensors: {exc}", hint="re-export the model") from exc
    gm = serialize.build_module(arch, tensors)
    gm.meta["autoprune"] = {k: arch.get(k) for k in ("example_input", "metadata", "autoprune_version", "quant")}
    return gm


def load(artifact: QuantArtifact) -> fx.GraphModule:
    """Fake-quantized module from an in-memory :class:`QuantArtifact` (same outputs as the exported model)."""
    return build_quantized(artifact.arch, artifact.tensors)


def save_quantized(qm: nn.Module, out_dir: str | Path, example_input: serialize.ExampleInput,
                   metadata: Mapping[str, Any] | None = None) -> Path:
    """Export ``qm`` and write it in the :mod:`autoprune.serialize` format (``arch.json`` + ``weights.pt``)."""
    art = export(qm)
    return serialize.write_artifact(out_dir, art.arch, art.tensors, example_input, metadata)


def load_quantized(out_dir: str | Path) -> fx.GraphModule:
    """Load a model written by :func:`save_quantized` (checksummed, ``weights_only=True``, no user code)."""
    arch, tensors = serialize.read_artifact(out_dir)
    return build_quantized(arch, tensors)


# ---------------------------------------------------------------------------------------------------------------
# The HAQ legalizer
# ---------------------------------------------------------------------------------------------------------------


def legalize_bits(bits: Mapping[str, Any], size_fn: Callable[[dict[str, QuantSpec]], float], budget: float,
                  floors: Mapping[str, Any] | None = None, *, order: Sequence[str] | None = None,
                  kinds: Sequence[str] = ("a", "w"), min_bits: int = 2,
                  choices: Mapping[str, Sequence[int | None]] | None = None) -> tuple[dict[str, QuantSpec], bool]:
    """HAQ's post-episode legalizer (ALGORITHMS.md §2.2): lower bits until ``size_fn(bits) <= budget``.

    Sweeps layers from the last to the first; within a layer, activation bits before weight bits (``kinds``);
    each step lowers one bit-width by one step and re-checks the budget: by one bit, or, for a layer in
    ``choices``, to the next lower allowed bit-width. Float (``None``) entries are never touched, except that a
    layer in ``choices`` may go from float to its highest allowed bit-width (float ranks above every integer).
    This is the one implementation: the layer-wise environment's legalizer calls it with its layers' choices.

    Args:
        bits: Layer → :class:`QuantSpec` (not modified).
        size_fn: Cost of an assignment (e.g. ``lambda b: cost.closed_form(groups, widths, b).bytes``).
        budget: Target cost.
        floors: Layer → minimum :class:`QuantSpec` (see :func:`default_floors`); unlisted layers use ``min_bits``.
        order: Layer order (default: the order of ``bits``); only these layers are lowered.
        kinds: Which bit-widths may be lowered, in order (``("w",)`` for a pure size budget).
        min_bits: Floor for layers not in ``floors``.
        choices: Layer → allowed bit-widths (e.g. a search space's ``LayerChoice.w_bits``); the lowest is the
            layer's floor unless ``floors`` / ``min_bits`` is higher.

    Returns:
        ``(bits, feasible)``; ``feasible`` is False when even the floors exceed the budget (the most-reduced
        assignment is returned) — the reference implementation would end over budget without saying so.
    """
    if any(k not in ("a", "w") for k in kinds):
        raise ConfigError(f"kinds must be 'a' and/or 'w', got {kinds!r}")
    cur = {k: QuantSpec.parse(v, k) for k, v in bits.items()}
    names = list(order) if order is not None else list(cur)
    fl = {k: QuantSpec.parse(v, k) for k, v in (floors or {}).items()}
    allowed = {k: [b for b in v if b is not None] for k, v in (choices or {}).items()}

    def floor_of(name: str, kind: str) -> int:
        f = fl.get(name)
        b = (f.w_bits if kind == "w" else f.a_bits) if f is not None else None
        return b if b is not None else min_bits

    def lower(name: str, kind: str, b: int | None) -> int | None:
        """The next bit-width below ``b`` (None: none left above the floor)."""
        if name in allowed:
            nxt = max((c for c in allowed[name] if b is None or c < b), default=None)
        else:
            nxt = None if b is None else b - 1
        return nxt if nxt is not None and nxt >= floor_of(name, kind) else None

    if size_fn(cur) <= budget:
        return cur, True
    while True:
        progressed = False
        for name in reversed(names):
            for kind in kinds:
                spec = cur.get(name)
                if spec is None:
                    continue
                b = lower(name, kind, spec.w_bits if kind == "w" else spec.a_bits)
                if b is None:
                    continue
                cur[name] = QuantSpec(b, spec.a_bits) if kind == "w" else QuantSpec(spec.w_bits, b)
                progressed = True
                if size_fn(cur) <= budget:
                    return cur, True
        if not progressed:
            return cur, False


# ---------------------------------------------------------------------------------------------------------------
# Optional real int8 execution
# ---------------------------------------------------------------------------------------------------------------


def to_int8(model: nn.Module, calib_loader: Iterable[Any], *, backend: str = "ao_fx", batches: int = 8,
            example_input: torch.Tensor | None = None) -> nn.Module:
    """Convert a float (or fake-quantized, via :func:`dequantize`) model to real int8 CPU kernels.

    ``backend="ao_fx"`` uses the legacy ``torch.ao.quantization`` FX flow (x86 engine, per-channel weights,
    BN folded by the flow); it is calibrated on ``batches`` batches of ``calib_loader``.

    Raises:
        AutoPruneError: If the backend is unknown or cannot be imported / run here.
    """
    if backend != "ao_fx":
        raise ConfigError(f"unknown int8 backend {backend!r}", hint="use backend='ao_fx'")
    from autoprune._imports import optional_import

    qfx = optional_import("torch.ao.quantization.quantize_fx", "int8 execution (backend='ao_fx')")
    aoq = optional_import("torch.ao.quantization", "int8 execution (backend='ao_fx')")
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    if engine not in torch.backends.quantized.supported_engines:
        raise AutoPruneError("no x86/fbgemm quantized engine in this torch build", hint="use the fake-quant model")
    torch.backends.quantized.engine = engine
    float_model = dequantize(model) if _quant_layers(model) else copy.deepcopy(model)
    float_model.eval()
    batches_list = list(_batches(calib_loader, batches))
    if not batches_list:
        raise ConfigError("the calibration loader yielded no batches", hint="pass a non-empty training loader")
    x0 = example_input if example_input is not None else batches_list[0][:1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = qfx.prepare_fx(float_model, aoq.get_default_qconfig_mapping(engine), example_inputs=(x0,))
            with torch.no_grad():
                for x in batches_list:
                    prepared(x)
            return qfx.convert_fx(prepared)
    except Exception as exc:
        raise AutoPruneError(f"ao_fx int8 conversion failed: {exc}",
                             hint="use the fake-quant model (quantization.apply) instead") from exc


# ---------------------------------------------------------------------------------------------------------------
# Registration with the serialization format (serialize never imports this module; see its extension hooks)
# ---------------------------------------------------------------------------------------------------------------

for _qcls in (QConv1d, QConv2d, QLinear):
    serialize.register_module_type(_qcls, _qcls.autoprune_kwargs)
serialize.register_section(SECTION, build_quantized)
del _qcls
