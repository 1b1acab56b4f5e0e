"""Architecture as data: save a ``torch.fx.GraphModule`` as JSON + plain tensors and rebuild it without user code.

This module owns the on-disk format used by ``pruning.save_pruned`` / ``load_pruned`` and by
``quantization.save_quantized`` (ENGINE.md §4):

* ``arch.json`` — format name and version, autoprune/torch versions, the example input's shape and dtype,
  every leaf module as ``{"type": "torch.nn.Conv2d", "kwargs": {...}}`` (types from an allow-list), every
  tensor (parameters, buffers, ``get_attr`` constants) with shape/dtype, the fx nodes
  ``{name, op, target, args, kwargs}`` with tagged literals (``{"$node": ...}``, ``{"$slice": ...}``, ...),
  user metadata, and a manifest with the SHA-256 of ``weights.pt``;
* ``weights.pt`` — a flat ``dict[str, Tensor]`` saved with ``torch.save`` and read with ``weights_only=True``.

Loading never imports a string read from the file. ``call_function`` targets are looked up in a table built
from the functions that take part in ``__torch_function__`` (``torch.*``, ``torch.nn.functional.*``, ...) plus a
short list from ``operator`` and ``builtins.getattr``; ``call_method`` names must be public tensor methods;
module types come from an allow-list. Functions that other libraries keep as ``call_function`` nodes with
``torch.fx.wrap`` (torchvision's ``stochastic_depth``, Swin's window attention, ...) are allowed by qualified name
from a fixed table (:data:`_WRAPPED_FUNCTIONS`) whose modules are imported only when a file names exactly such a
function. Anything else is refused with :class:`~autoprune.errors.CheckpointError`.

Extension hooks: this module is the lowest layer of the format and imports no other format code. Modules that
add leaf types or an ``arch.json`` section register them when imported — :func:`register_module_type` (e.g.
``quantization.QConv2d``) and :func:`register_section` (e.g. the ``"quant"`` section, whose loader
:func:`load_module` calls). So that a fresh process that only imported this module can load such files, a small
table of *known* extensions maps a type or section name to the constant name of the autoprune module providing
it, imported on first need. Module types that are neither registered nor known are refused; top-level keys that
are neither are ignored.

:func:`export_deployment` writes secondary deployment artifacts (``torch.export`` ``.pt2``, optionally
TorchScript and ONNX).
"""

from __future__ import annotations

import builtins
import copy
import functools
import hashlib
import importlib
import io
import json
import logging
import math
import operator
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from autoprune._imports import is_available
from autoprune.errors import AutoPruneError, CheckpointError, ConfigError
from autoprune.utils import atomic_write

log = logging.getLogger("autoprune.serialize")

__all__ = [
    "ARCH_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "ExampleInput",
    "ModuleEncoder",
    "SectionLoader",
    "build_module",
    "decode_kwargs",
    "encode_kwargs",
    "encode_module",
    "export_deployment",
    "load_module",
    "memory_format_of",
    "read_artifact",
    "read_metadata",
    "register_module_type",
    "register_section",
    "save_module",
    "supported_module_types",
    "trace",
    "write_artifact",
]

FORMAT_NAME = "autoprune-arch"
FORMAT_VERSION = 1
ARCH_FILE = "arch.json"
WEIGHTS_FILE = "weights.pt"

#: Returns a module's constructor keyword arguments as JSON values (see :func:`register_module_type`).
ModuleEncoder = Callable[[nn.Module], dict[str, Any]]
#: Rebuilds a module from a verified ``arch.json`` document and its tensors (see :func:`register_section`).
SectionLoader = Callable[[Mapping[str, Any], Mapping[str, torch.Tensor]], fx.GraphModule]
#: The example input whose shape and dtype an artifact records: a tensor or a tuple/list of tensors.
ExampleInput = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]

# ---------------------------------------------------------------------------------------------------------------
# Allow-lists: functions, tensor methods, attributes
# ---------------------------------------------------------------------------------------------------------------

_OPERATOR_NAMES = (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
    "and_", "or_", "xor", "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge", "not_", "is_", "is_not",
    "contains", "getitem", "setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow",
    "imatmul", "iand", "ior", "ixor",
)  # fmt: skip

# Tensor methods that touch memory, storage, hooks or run Python callables are never loaded.
_DENIED_METHODS = frozenset({
    "apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook", "backward", "storage",
    "untyped_storage", "share_memory_", "set_", "data_ptr", "pin_memory", "numpy", "record_stream",
    "module_load", "retain_grad", "requires_grad_", "resize_", "resize_as_", "cuda", "ipu", "xpu", "mtia",
})  # fmt: skip

# Namespaces whose ``__torch_function__``-overridable callables may appear as call_function targets, in the
# order used to pick a canonical name for an object reachable under several names.
_TORCH_NAMESPACES: tuple[tuple[str, Any], ...] = (
    ("torch.nn.functional", torch.nn.functional),
    ("torch", torch),
    ("torch.functional", torch.functional),
    ("torch.linalg", torch.linalg),
    ("torch.fft", torch.fft),
    ("torch.special", torch.special),
)


@functools.lru_cache(maxsize=1)
def _tensor_methods() -> frozenset[str]:
    names = {n for n in dir(torch.Tensor) if not n.startswith("_") and callable(getattr(torch.Tensor, n, None))}
    return frozenset(names - _DENIED_METHODS)


@functools.lru_cache(maxsize=1)
def _tensor_attributes() -> frozenset[str]:
    names = {n for n in dir(torch.Tensor) if not n.startswith("_") and not callable(getattr(torch.Tensor, n))}
    return frozenset(names - {"grad_fn", "grad", "data"})


def _safe_getattr(obj: Any, name: str) -> Any:
    """``getattr`` restricted to public, non-callable tensor attributes (``shape``, ``dtype``, ...)."""
    if name not in _tensor_attributes():
        raise AttributeError(f"attribute {name!r} is not allowed in a loaded autoprune graph")
    return getattr(obj, name)


@functools.lru_cache(maxsize=1)
def _function_table() -> tuple[dict[str, Callable[..., Any]], dict[int, str]]:
    """Return ``(name -> function, id(function) -> canonical name)`` for every allowed call_function target."""
    from torch.overrides import get_overridable_functions

    overridable = get_overridable_functions()
    by_name: dict[str, Callable[..., Any]] = {}
    canonical: dict[int, str] = {}

    def add(name: str, fn: Callable[..., Any]) -> None:
        by_name[name] = fn
        canonical.setdefault(id(fn), name)

    for prefix, ns in _TORCH_NAMESPACES:
        allowed = {id(f) for f in overridable.get(ns, [])}
        if ns is torch:  # functions of torch.functional are re-exported from torch
            allowed |= {id(f) for f in overridable.get(torch.functional, [])}
        for attr in sorted(dir(ns)):
            obj = getattr(ns, attr, None)
            if obj is not None and id(obj) in allowed:
                add(f"{prefix}.{attr}", obj)
    for method in sorted(_tensor_methods()):
        add(f"torch.Tensor.{method}", getattr(torch.Tensor, method))
    for name in _OPERATOR_NAMES:
        add(f"operator.{name}", getattr(operator, name))
    add("torch._assert", torch._assert)
    # ``x.shape`` traces to ``getattr(x, "shape")``; loading maps it to a restricted getattr.
    by_name["builtins.getattr"] = _safe_getattr
    canonical[id(builtins.getattr)] = "builtins.getattr"
    return by_name, canonical


# Functions that other libraries keep as ``call_function`` nodes with ``torch.fx.wrap`` (torch.fx does not trace
# into them), by qualified name (``f"{fn.__module__}.{fn.__qualname__}"``) -> the module defining them. A file may
# name exactly these; the module (a constant of this table, never a string from the file) is imported on first
# need, and the function must be that module's attribute with that qualified name. torchvision's are every
# ``torch.fx.wrap`` of torchvision 0.29 whose arguments and results are tensors and plain values (not the
# detection poolers' helpers, which pass dicts and Python objects); autoprune's own is the window attention that
# ``pruning.apply`` puts in place of a pruned Swin attention (ENGINE.md §2.4).
_WRAPPED_FUNCTIONS: dict[str, str] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": "torchvision.ops.stochastic_depth",
    "torchvision.ops.drop_block.drop_block2d": "torchvision.ops.drop_block",
    "torchvision.ops.drop_block.drop_block3d": "torchvision.ops.drop_block",
    "torchvision.ops.roi_align.roi_align": "torchvision.ops.roi_align",
    "torchvision.ops.roi_pool.roi_pool": "torchvision.ops.roi_pool",
    "torchvision.ops.ps_roi_align.ps_roi_align": "torchvision.ops.ps_roi_align",
    "torchvision.ops.ps_roi_pool.ps_roi_pool": "torchvision.ops.ps_roi_pool",
    "torchvision.models.swin_transformer._patch_merging_pad": "torchvision.models.swin_transformer",
    "torchvision.models.swin_transformer._get_relative_position_bias": "torchvision.models.swin_transformer",
    "torchvision.models.swin_transformer.shifted_window_attention": "torchvision.models.swin_transformer",
    "torchvision.models.video.swin_transformer._get_window_and_shift_size": "torchvision.models.video.swin_transformer",
    "torchvision.models.video.swin_transformer._get_relative_position_bias":
        "torchvision.models.video.swin_transformer",
    "torchvision.models.video.swin_transformer._compute_pad_size_3d": "torchvision.models.video.swin_transformer",
    "torchvision.models.video.swin_transformer._compute_attention_mask_3d":
        "torchvision.models.video.swin_transformer",
    "torchvision.models.video.swin_transformer.shifted_window_attention_3d":
        "torchvision.models.video.swin_transformer",
    "torchvision.models.video.mvit._unsqueeze": "torchvision.models.video.mvit",
    "torchvision.models.video.mvit._squeeze": "torchvision.models.video.mvit",
    "torchvision.models.video.mvit._add_rel_pos": "torchvision.models.video.mvit",
    "torchvision.models.video.mvit._add_shortcut": "torchvision.models.video.mvit",
    "autoprune.graph.attention.pruned_shifted_window_attention": "autoprune.graph.attention",
}  # fmt: skip


def _qualified(fn: Any) -> str:
    """``module.qualname`` of a function (``""`` when it has none)."""
    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{qual}" if isinstance(module, str) and isinstance(qual, str) else ""


def _wrapped_function(name: str) -> Callable[..., Any]:
    """The allow-listed wrapped function ``name`` (a key of :data:`_WRAPPED_FUNCTIONS`), importing its module.

    Raises:
        CheckpointError: The module cannot be imported here (with the install hint of its package), or it has no
            function of that qualified name.
    """
    from autoprune._imports import optional_import

    provider = _WRAPPED_FUNCTIONS[name]
    try:
        module = optional_import(provider, f"calling {name}")
    except AutoPruneError as exc:
        raise CheckpointError(f"the saved graph calls {name}, but {provider} cannot be imported here",
                              hint=exc.hint) from exc
    fn = getattr(module, name.rsplit(".", 1)[1], None)
    if not callable(fn) or _qualified(fn) != name:
        raise CheckpointError(f"the saved graph calls {name}, which this version of {provider} does not define",
                              hint=f"install the {provider.split('.')[0]} version the model was saved with")
    return fn


def _wrapped_name(fn: Any) -> str | None:
    """The allow-list name of a wrapped-function target, or None when it is not exactly that listed function."""
    name = _qualified(fn)
    if name not in _WRAPPED_FUNCTIONS:
        return None
    try:
        return name if _wrapped_function(name) is fn else None
    except CheckpointError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Allow-list of leaf module types
# ---------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Module constructor argument → JSON value (tuples become lists)."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointError(f"non-finite module argument {value!r} cannot be stored")
        return value
    if isinstance(value, tuple | list | torch.Size):
        return [_plain(v) for v in value]
    raise CheckpointError(f"module argument of type {type(value).__name__} cannot be stored as JSON")


def _unplain(value: Any) -> Any:
    """Inverse of :func:`_plain`: JSON lists become tuples (torch constructors accept either)."""
    if isinstance(value, list):
        return tuple(_unplain(v) for v in value)
    return value


def _attrs(*names: str) -> ModuleEncoder:
    def encode(m: nn.Module) -> dict[str, Any]:
        return {n: _plain(getattr(m, n)) for n in names}

    return encode


def _with_bias(*names: str) -> ModuleEncoder:
    base = _attrs(*names)

    def encode(m: nn.Module) -> dict[str, Any]:
        return {**base(m), "bias": getattr(m, "bias", None) is not None}

    return encode


def _encode_mha(m: nn.Module) -> dict[str, Any]:
    assert isinstance(m, nn.MultiheadAttention)
    return {
        "embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": float(m.dropout),
        "bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None,
        "add_zero_attn": bool(m.add_zero_attn), "kdim": m.kdim, "vdim": m.vdim, "batch_first": bool(m.batch_first),
    }  # fmt: skip


def _encode_normalize(m: nn.Module) -> dict[str, Any]:
    mean = m.mean.detach().flatten().tolist()
    return {"mean": mean, "std": m.std.detach().flatten().tolist(), "channels": len(mean)}


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
_BN = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_INPLACE = _attrs("inplace")
_NOARGS = _attrs()


@dataclass(frozen=True)
class _ModuleType:
    """One allow-listed module type: its kwargs encoder and either the class (registered types) or the module
    and class name to import it from on first use (built-in types; the strings are constants of this file)."""

    encode: ModuleEncoder
    cls: type[nn.Module] | None = None
    module: str = ""
    name: str = ""


def _builtin(module: str, name: str, encode: ModuleEncoder) -> _ModuleType:
    return _ModuleType(encode=encode, module=module, name=name)


# Qualified type name -> entry. Built-in entries below; other autoprune modules add theirs with
# :func:`register_module_type` when they are imported. Nothing read from a file is ever imported.
_MODULE_TYPES: dict[str, _ModuleType] = {
    "torch.nn.Conv1d": _builtin("torch.nn", "Conv1d", _with_bias(*_CONV)),
    "torch.nn.Conv2d": _builtin("torch.nn", "Conv2d", _with_bias(*_CONV)),
    "torch.nn.Linear": _builtin("torch.nn", "Linear", _with_bias("in_features", "out_features")),
    "torch.nn.BatchNorm1d": _builtin("torch.nn", "BatchNorm1d", _attrs(*_BN)),
    "torch.nn.BatchNorm2d": _builtin("torch.nn", "BatchNorm2d", _attrs(*_BN)),
    "torch.nn.LayerNorm": _builtin("torch.nn", "LayerNorm", _with_bias("normalized_shape", "eps",
                                                                       "elementwise_affine")),
    "torch.nn.GroupNorm": _builtin("torch.nn", "GroupNorm", _attrs("num_groups", "num_channels", "eps", "affine")),
    "torch.nn.ReLU": _builtin("torch.nn", "ReLU", _INPLACE),
    "torch.nn.ReLU6": _builtin("torch.nn", "ReLU6", _INPLACE),
    "torch.nn.LeakyReLU": _builtin("torch.nn", "LeakyReLU", _attrs("negative_slope", "inplace")),
    "torch.nn.Hardtanh": _builtin("torch.nn", "Hardtanh", _attrs("min_val", "max_val", "inplace")),
    "torch.nn.GELU": _builtin("torch.nn", "GELU", _attrs("approximate")),
    "torch.nn.SiLU": _builtin("torch.nn", "SiLU", _INPLACE),
    "torch.nn.Mish": _builtin("torch.nn", "Mish", _INPLACE),
    "torch.nn.Sigmoid": _builtin("torch.nn", "Sigmoid", _NOARGS),
    "torch.nn.Hardswish": _builtin("torch.nn", "Hardswish", _INPLACE),
    "torch.nn.Hardsigmoid": _builtin("torch.nn", "Hardsigmoid", _INPLACE),
    "torch.nn.Tanh": _builtin("torch.nn", "Tanh", _NOARGS),
    "torch.nn.Identity": _builtin("torch.nn", "Identity", _NOARGS),
    "torch.nn.Dropout": _builtin("torch.nn", "Dropout", _attrs("p", "inplace")),
    "torch.nn.Dropout2d": _builtin("torch.nn", "Dropout2d", _attrs("p", "inplace")),
    "torch.nn.MaxPool1d": _builtin("torch.nn", "MaxPool1d", _attrs(
        "kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")),
    "torch.nn.MaxPool2d": _builtin("torch.nn", "MaxPool2d", _attrs(
        "kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")),
    "torch.nn.AvgPool1d": _builtin("torch.nn", "AvgPool1d", _attrs(
        "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "torch.nn.AvgPool2d": _builtin("torch.nn", "AvgPool2d", _attrs(
        "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")),
    "torch.nn.AdaptiveAvgPool1d": _builtin("torch.nn", "AdaptiveAvgPool1d", _attrs("output_size")),
    "torch.nn.AdaptiveAvgPool2d": _builtin("torch.nn", "AdaptiveAvgPool2d", _attrs("output_size")),
    "torch.nn.Flatten": _builtin("torch.nn", "Flatten", _attrs("start_dim", "end_dim")),
    "torch.nn.Softmax": _builtin("torch.nn", "Softmax", _attrs("dim")),
    "torch.nn.Embedding": _builtin("torch.nn", "Embedding", _attrs(
        "num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")),
    "torch.nn.MultiheadAttention": _builtin("torch.nn", "MultiheadAttention", _encode_mha),
    "torch.nn.Sequential": _builtin("torch.nn", "Sequential", _NOARGS),  # children stored recursively
    "autoprune.models.layers.Normalize": _builtin("autoprune.models.layers", "Normalize", _encode_normalize),
}  # fmt: skip

# Known extensions: a module type or artifact section that a file may need -> the autoprune module that registers
# it when imported. Loading imports such a module (by this constant name, never by a string from the file) the
# first time a file needs what it provides, so ``load_module`` works in a process that imported nothing else.
_TYPE_PROVIDERS: dict[str, str] = {
    "autoprune.quantization.QConv1d": "autoprune.quantization",
    "autoprune.quantization.QConv2d": "autoprune.quantization",
    "autoprune.quantization.QLinear": "autoprune.quantization",
    # a pruned nn.MultiheadAttention whose widths no longer fit PyTorch's forward (autoprune.pruning.apply)
    "autoprune.graph.attention.PrunedMultiheadAttention": "autoprune.graph.attention",
}
_SECTION_PROVIDERS: dict[str, str] = {"quant": "autoprune.quantization"}

# Top-level keys of arch.json written by this module; any other key is an extension section.
_CORE_KEYS = frozenset({"format", "format_version", "autoprune_version", "torch_version", "example_input",
                        "training", "modules", "tensors", "graph", "metadata", "manifest"})
_SECTIONS: dict[str, SectionLoader] = {}


def register_module_type(cls: type[nn.Module], encoder: ModuleEncoder) -> str:
    """Allow-list a module type for :func:`save_module` / :func:`load_module` (called by the module defining it).

    The type is stored under its qualified name (``f"{cls.__module__}.{cls.__qualname__}"``); only that exact
    class matches (not subclasses, which may override ``forward``). Loading rebuilds it as
    ``cls(**decode_kwargs(encoder(module)))``. Registering the same name again replaces the entry (module reload).

    Args:
        cls: The ``nn.Module`` subclass.
        encoder: Returns the module's constructor keyword arguments as JSON values (see :func:`encode_kwargs`).

    Returns:
        The name under which the type is stored in ``arch.json``.

    Raises:
        ConfigError: If ``cls`` is not an ``nn.Module`` subclass or its name is a built-in entry.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"register_module_type needs an nn.Module subclass, got {cls!r}")
    qualname = _type_name(cls)
    current = _MODULE_TYPES.get(qualname)
    if current is not None and current.cls is None:
        raise ConfigError(f"{qualname} is a built-in allow-list entry and cannot be registered again")
    _MODULE_TYPES[qualname] = _ModuleType(encode=encoder, cls=cls)
    return qualname


def register_section(name: str, loader: SectionLoader) -> None:
    """Make :func:`load_module` hand artifacts whose ``arch.json`` has a top-level ``name`` section to ``loader``.

    The loader receives the verified ``arch.json`` document and tensors (see :func:`read_artifact`) and returns
    the rebuilt module. Registering the same name again replaces the loader.

    Raises:
        ConfigError: If ``name`` is one of the keys this module writes itself.
    """
    if not name or name in _CORE_KEYS:
        raise ConfigError(f"{name!r} cannot be an extension section of {ARCH_FILE}",
                          hint=f"reserved keys: {sorted(_CORE_KEYS)}")
    _SECTIONS[name] = loader


def _resolve_type(qualname: str) -> type[nn.Module] | None:
    entry = _MODULE_TYPES.get(qualname)
    if entry is None and qualname in _TYPE_PROVIDERS and is_available(_TYPE_PROVIDERS[qualname]):
        entry = _MODULE_TYPES.get(qualname)
    if entry is None:
        return None
    if entry.cls is not None:
        return entry.cls
    try:
        mod = importlib.import_module(entry.module)
    except ImportError:
        return None
    cls = getattr(mod, entry.name, None)
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def _type_name(cls: type) -> str:
    """Allow-list spelling of a class name (``torch.nn.modules.conv.Conv2d`` → ``torch.nn.Conv2d``)."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    return f"torch.nn.{cls.__qualname__}" if name.startswith("torch.nn.modules.") else name


def _qualname_of(module: nn.Module) -> str | None:
    """Allow-list name of ``type(module)`` (exact type match: subclasses may override ``forward``)."""
    cls = type(module)
    name = _type_name(cls)
    if (name in _MODULE_TYPES or name in _TYPE_PROVIDERS) and _resolve_type(name) is cls:
        return name
    return None


def supported_module_types() -> list[str]:
    """Names of the leaf module types that :func:`save_module` can store (built-in, registered and known)."""
    return sorted(set(_MODULE_TYPES) | set(_TYPE_PROVIDERS))


def encode_kwargs(module: nn.Module, as_type: str | None = None) -> dict[str, Any]:
    """Constructor keyword arguments of ``module`` as JSON values, as :func:`save_module` stores them.

    Args:
        module: An instance of an allow-listed type.
        as_type: Allow-list name whose encoder to use instead of the module's own type, e.g.
            ``"torch.nn.Conv2d"`` for a registered subclass that adds arguments of its own (``module`` must be an
            instance of that type).

    Raises:
        CheckpointError: If the type is not allow-listed (or ``module`` is not an ``as_type``).
    """
    qual = _qualname_of(module) if as_type is None else as_type
    cls = _resolve_type(qual) if qual is not None else None
    if qual is None or cls is None or not isinstance(module, cls):
        kind = type(module)
        raise CheckpointError(
            f"{kind.__module__}.{kind.__qualname__} is not an allow-listed module type"
            + (f" (as {as_type!r})" if as_type is not None else ""),
            hint="supported types: " + ", ".join(t.rsplit(".", 1)[1] for t in supported_module_types()),
        )
    return _MODULE_TYPES[qual].encode(module)


def decode_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`encode_kwargs`: JSON values to constructor arguments (lists become tuples)."""
    return {k: _unplain(v) for k, v in kwargs.items()}


class _LeafTracer(fx.Tracer):
    """Tracer that keeps every allow-listed module type (incl. autoprune's own) as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.Sequential):
            return False
        return _qualname_of(m) is not None or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` keeping allow-listed modules (incl. autoprune's ``Normalize``, ``QConv2d``) as
    leaves. A ``GraphModule`` is returned as is.

    Raises:
        AutoPruneError: If the model cannot be traced by ``torch.fx``.
    """
    if isinstance(model, fx.GraphModule):
        return model
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, RuntimeError...
        raise AutoPruneError(
            f"cannot trace {type(model).__name__} with torch.fx: {exc}",
            hint="pass a torch.fx.GraphModule (e.g. from autoprune.pruning.apply) or make forward traceable",
        ) from exc
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


# ---------------------------------------------------------------------------------------------------------------
# Literal encoding
# ---------------------------------------------------------------------------------------------------------------

_TAGS = ("$node", "$tuple", "$list", "$dict", "$slice", "$ellipsis", "$size", "$dtype", "$device",
         "$memory_format", "$layout", "$float", "$complex")  # fmt: skip


def _encode_arg(a: Any) -> Any:  # noqa: C901 - one branch per literal kind
    if isinstance(a, fx.Node):
        return {"$node": a.name}
    if a is None or isinstance(a, bool | int | str):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"$float": repr(a)}
    if isinstance(a, complex):
        return {"$complex": [_encode_arg(a.real), _encode_arg(a.imag)]}
    if isinstance(a, torch.Size):
        return {"$size": [int(v) for v in a]}
    if isinstance(a, tuple):
        return {"$tuple": [_encode_arg(v) for v in a]}
    if isinstance(a, list):
        return {"$list": [_encode_arg(v) for v in a]}
    if isinstance(a, dict):
        if not all(isinstance(k, str | int) for k in a):
            raise CheckpointError("graph literal dict keys must be str or int")
        return {"$dict": [[k, _encode_arg(v)] for k, v in a.items()]}
    if isinstance(a, slice):
        return {"$slice": [_encode_arg(a.start), _encode_arg(a.stop), _encode_arg(a.step)]}
    if a is Ellipsis:
        return {"$ellipsis": None}
    if isinstance(a, torch.dtype):
        return {"$dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"$device": str(a)}
    if isinstance(a, torch.memory_format):
        return {"$memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, torch.layout):
        return {"$layout": str(a).removeprefix("torch.")}
    raise CheckpointError(
        f"graph literal of type {type(a).__name__} ({a!r:.60}) cannot be stored",
        hint="only node references, numbers, strings, None, containers, slices, dtypes and devices are supported",
    )


def _torch_enum(name: Any, kind: type) -> Any:
    obj = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(obj, kind):
        raise CheckpointError(f"arch.json names an unknown {kind.__name__} {name!r}")
    return obj


def _decode_arg(a: Any, nodes: Mapping[str, fx.Node]) -> Any:  # noqa: C901 - one branch per tag
    if a is None or isinstance(a, bool | int | float | str):
        return a
    if isinstance(a, list):  # never produced by the encoder
        raise CheckpointError("arch.json: untagged list in a graph literal")
    if not isinstance(a, dict) or len(a) != 1 or next(iter(a)) not in _TAGS:
        raise CheckpointError(f"arch.json: malformed graph literal {str(a)[:80]}")
    tag, v = next(iter(a.items()))
    if tag == "$node":
        if v not in nodes:
            raise CheckpointError(f"arch.json: reference to undefined node {v!r}")
        return nodes[v]
    if tag in ("$tuple", "$list", "$size", "$slice", "$complex") and not isinstance(v, list):
        raise CheckpointError(f"arch.json: {tag} needs a list")
    if tag == "$tuple":
        return tuple(_decode_arg(x, nodes) for x in v)
    if tag == "$list":
        return [_decode_arg(x, nodes) for x in v]
    if tag == "$dict":
        if not isinstance(v, list) or not all(isinstance(kv, list) and len(kv) == 2 for kv in v):
            raise CheckpointError("arch.json: $dict needs [key, value] pairs")
        return {k: _decode_arg(x, nodes) for k, x in v}
    if tag == "$slice":
        if len(v) != 3:
            raise CheckpointError("arch.json: $slice needs [start, stop, step]")
        return slice(*(_decode_arg(x, nodes) for x in v))
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$size":
        return torch.Size([int(x) for x in v])
    if tag == "$dtype":
        return _torch_enum(v, torch.dtype)
    if tag == "$device":
        try:
            return torch.device(str(v))
        except RuntimeError as exc:
            raise CheckpointError(f"arch.json: bad device {v!r}") from exc
    if tag == "$memory_format":
        return _torch_enum(v, torch.memory_format)
    if tag == "$layout":
        return _torch_enum(v, torch.layout)
    if tag == "$float":
        if v not in ("inf", "-inf", "nan"):
            raise CheckpointError(f"arch.json: bad $float {v!r}")
        return float(v)
    return complex(_decode_arg(v[0], nodes), _decode_arg(v[1], nodes))  # $complex


# ---------------------------------------------------------------------------------------------------------------
# Encoding a GraphModule
# ---------------------------------------------------------------------------------------------------------------


def _encode_leaf(name: str, module: nn.Module) -> dict[str, Any]:
    qual = _qualname_of(module)
    if qual is None:
        cls = type(module)
        raise CheckpointError(
            f"module {name!r} has type {cls.__module__}.{cls.__qualname__}, which is not in the allow-list of "
            "types that can be saved as data",
            hint="supported types: " + ", ".join(t.rsplit(".", 1)[1] for t in supported_module_types()),
        )
    spec: dict[str, Any] = {"type": qual, "kwargs": _MODULE_TYPES[qual].encode(module), "training": module.training}
    if qual == "torch.nn.Sequential":
        spec["children"] = [_encode_leaf(f"{name}.{i}", child) for i, child in enumerate(module)]
    return spec


def _owner_tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor, str]]:
    for n, p in module.named_parameters(recurse=True, remove_duplicate=False):
        yield n, p, "parameter"
    for n, b in module.named_buffers(recurse=True, remove_duplicate=False):
        if b is not None:
            yield n, b, "buffer"


def encode_module(gm: fx.GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Encode ``gm`` as ``(arch, tensors)``: the JSON-able description (modules, tensors, nodes) and the plain
    tensors to store. The arch has no header (see :func:`write_artifact`).

    Raises:
        CheckpointError: If a module type, call target or literal is outside the allow-lists.
    """
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise CheckpointError("graphs with pytree input/output flattening cannot be saved as data",
                              hint="trace the model with plain tensor inputs and outputs")
    modules: dict[str, Any] = {}
    tensor_specs: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}

    def add_tensor(name: str, t: torch.Tensor, kind: str) -> None:
        spec: dict[str, Any] = {"kind": kind, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if isinstance(t, nn.Parameter):
            spec["requires_grad"] = bool(t.requires_grad)
        if id(t) in seen:  # tied weights: stored once, restored as the same object
            spec["alias_of"] = seen[id(t)]
        else:
            seen[id(t)] = name
            tensors[name] = t.detach().clone().contiguous()
        tensor_specs[name] = spec

    _, canonical = _function_table()
    nodes: list[dict[str, Any]] = []
    for node in gm.graph.nodes:
        target: Any = node.target
        if node.op == "call_module":
            if target not in modules:
                sub = gm.get_submodule(target)
                modules[target] = _encode_leaf(target, sub)
                for n, t, kind in _owner_tensors(sub):
                    add_tensor(f"{target}.{n}", t, kind)
        elif node.op == "get_attr":
            obj = _fetch_attr(gm, target)
            if not isinstance(obj, torch.Tensor):
                raise CheckpointError(f"get_attr {target!r} refers to a {type(obj).__name__}, not a tensor")
            if target not in tensor_specs:
                is_buffer = target in dict(gm.named_buffers())
                add_tensor(target, obj, "parameter" if isinstance(obj, nn.Parameter) else
                           "buffer" if is_buffer else "constant")
        elif node.op == "call_function":
            name = canonical.get(id(target)) or _wrapped_name(target)
            if name is None:
                raise CheckpointError(
                    f"node {node.name!r} calls {getattr(target, '__module__', '?')}."
                    f"{getattr(target, '__qualname__', target)!s}, which is not in the allow-list of functions",
                    hint="use torch / torch.nn.functional / operator functions in forward, or keep the module opaque",
                )
            target = name
        elif node.op == "call_method" and target not in _tensor_methods():
            raise CheckpointError(f"node {node.name!r} calls method {target!r}, which is not an allowed tensor method")
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode_arg(tuple(node.args))["$tuple"],
                      "kwargs": {k: _encode_arg(v) for k, v in node.kwargs.items()}})
    arch = {"training": gm.training, "modules": modules, "tensors": tensor_specs, "graph": nodes}
    return arch, tensors


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, data)  # the permissions of a plain open() (umask), not mkstemp's 0600


def _example_spec(example_input: ExampleInput) -> dict[str, Any]:
    if isinstance(example_input, torch.Tensor):
        return {"shape": list(example_input.shape), "dtype": str(example_input.dtype).removeprefix("torch.")}
    if isinstance(example_input, tuple | list) and all(isinstance(t, torch.Tensor) for t in example_input):
        return {"inputs": [_example_spec(t) for t in example_input]}
    raise ConfigError("example_input must be a tensor or a tuple of tensors",
                      hint="pass e.g. torch.randn(1, 3, 32, 32)")


def write_artifact(out_dir: str | os.PathLike[str], arch: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                   example_input: ExampleInput, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``weights.pt`` and ``arch.json`` (header, ``arch``, metadata, manifest) to ``out_dir``.

    Args:
        out_dir: Directory (created if missing).
        arch: Output of :func:`encode_module`, possibly extended (e.g. with a ``"quant"`` section).
        tensors: Plain tensors to store.
        example_input: Tensor (or tuple of tensors) whose shape and dtype are recorded.
        metadata: JSON-able user metadata (e.g. pruning provenance).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().contiguous() for k, v in tensors.items()}, buf)
    blob = buf.getvalue()
    from autoprune import __version__

    doc = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "autoprune_version": __version__,
        "torch_version": torch.__version__, "example_input": _example_spec(example_input), **arch,
        "metadata": dict(metadata or {}),
        "manifest": {WEIGHTS_FILE: {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}},
    }  # fmt: skip
    try:
        text = json.dumps(doc, indent=1, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"metadata is not JSON-serialisable: {exc}", hint="use str/int/float/list/dict") from exc
    _atomic_write(out / WEIGHTS_FILE, blob)
    _atomic_write(out / ARCH_FILE, text.encode())
    return out


def _read_arch(out_dir: Path) -> dict[str, Any]:
    path = out_dir / ARCH_FILE
    if not path.is_file():
        raise CheckpointError(f"no {ARCH_FILE} in {out_dir}",
                              hint="point to a directory written by save_module / save_pruned / save_quantized")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt): {exc}",
                              hint="re-export the model") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an autoprune architecture file", hint="re-export the model")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {doc.get('format_version')!r}; this autoprune reads version {FORMAT_VERSION}",
            hint="load it with the autoprune version that wrote it, or re-export the model",
        )
    for key, kind in (("modules", dict), ("tensors", dict), ("graph", list), ("manifest", dict)):
        if not isinstance(doc.get(key), kind):
            raise CheckpointError(f"{path}: missing or malformed {key!r} section", hint="re-export the model")
    return doc


def read_metadata(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the parsed ``arch.json`` of a saved module (header, metadata, example input) without loading weights."""
    return _read_arch(Path(out_dir))


def read_artifact(out_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify ``arch.json`` + ``weights.pt``: checksum, ``weights_only=True`` load, plain tensors only.

    Raises:
        CheckpointError: Missing, truncated, tampered or unsafe files.
    """
    out = Path(out_dir)
    doc = _read_arch(out)
    wpath = out / WEIGHTS_FILE
    if not wpath.is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} in {out}", hint="copy the whole directory")
    blob = wpath.read_bytes()
    expected = doc["manifest"].get(WEIGHTS_FILE, {})
    if hashlib.sha256(blob).hexdigest() != expected.get("sha256"):
        raise CheckpointError(
            f"{wpath} does not match the SHA-256 recorded in {ARCH_FILE} "
            f"({len(blob)} bytes on disk, {expected.get('bytes')} expected): truncated or modified",
            hint="re-copy or re-export the model; never edit weights.pt by hand",
        )
    try:
        tensors = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError ...
        raise CheckpointError(f"{wpath} cannot be loaded safely (weights_only=True): {exc}",
                              hint="weights.pt must hold plain tensors only; re-export the model") from exc
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and type(v) is torch.Tensor for k, v in tensors.items()
    ):
        raise CheckpointError(f"{wpath} must hold a dict of plain tensors", hint="re-export the model")
    return doc, tensors


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------


def _build_leaf(name: str, spec: Any) -> nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs", {}), dict):
        raise CheckpointError(f"arch.json: malformed module entry for {name!r}")
    qual = spec.get("type")
    cls = _resolve_type(qual) if isinstance(qual, str) else None
    if cls is None:
        raise CheckpointError(
            f"module {name!r} has type {qual!r}, which is not in the allow-list of loadable module types",
            hint="this file was written by a newer autoprune or edited by hand; only listed torch.nn types load",
        )
    kwargs = {k: _unplain(v) for k, v in spec.get("kwargs", {}).items()}
    try:
        if qual == "torch.nn.Sequential":
            module = cls(*(_build_leaf(f"{name}.{i}", c) for i, c in enumerate(spec.get("children", []))))
        else:
            module = cls(**kwargs)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot build module {name!r} ({qual}) from arch.json: {exc}",
                              hint="the file is corrupt or from an incompatible version") from exc
    module.train(bool(spec.get("training", False)))
    return module


def _check_tensor(name: str, spec: Mapping[str, Any], t: torch.Tensor) -> None:
    if list(t.shape) != spec.get("shape") or str(t.dtype).removeprefix("torch.") != spec.get("dtype"):
        raise CheckpointError(
            f"tensor {name!r} in weights.pt has shape {list(t.shape)} / {t.dtype}, arch.json says "
            f"{spec.get('shape')} / {spec.get('dtype')}", hint="the files do not belong together; re-export")


def _assign(module: nn.Module, rel: str, value: torch.Tensor, kind: str) -> None:
    *path, leaf = rel.split(".")
    owner = module
    for p in path:
        owner = getattr(owner, p)
    if kind == "parameter":
        if leaf not in owner._parameters:
            raise CheckpointError(f"module has no parameter {rel!r}")
        current = owner._parameters[leaf]
        if current is not None and current.shape != value.shape:
            raise CheckpointError(f"parameter {rel!r}: stored shape {list(value.shape)} does not fit the module "
                                  f"({list(current.shape)})", hint="the arch.json kwargs and weights disagree")
        if not isinstance(value, nn.Parameter):
            raise CheckpointError(f"tensor {rel!r} is stored as a buffer but the module needs a parameter")
        owner._parameters[leaf] = value
    else:
        if leaf not in owner._buffers:
            raise CheckpointError(f"module has no buffer {rel!r}")
        owner._buffers[leaf] = value


def _lookup(tensor_specs: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], name: str,
            built: dict[str, torch.Tensor]) -> torch.Tensor:
    spec = tensor_specs[name]
    if not isinstance(spec, dict):
        raise CheckpointError(f"arch.json: malformed tensor entry {name!r}")
    if name in built:
        return built[name]
    if "alias_of" in spec:
        src = spec["alias_of"]
        if not isinstance(src, str) or src not in built:
            raise CheckpointError(f"tensor {name!r} aliases {src!r}, which is not a stored tensor")
        built[name] = built[src]
        return built[src]
    if name not in tensors:
        raise CheckpointError(f"weights.pt lacks tensor {name!r}", hint="the files do not belong together")
    t = tensors[name]
    _check_tensor(name, spec, t)
    if spec.get("kind") == "parameter":
        t = nn.Parameter(t, requires_grad=bool(spec.get("requires_grad", True)))
    built[name] = t
    return t


def build_module(arch: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the ``GraphModule`` described by ``arch`` (as produced by :func:`encode_module`) from ``tensors``.

    Raises:
        CheckpointError: Unknown module types or targets, malformed entries, missing or mis-shaped tensors.
    """
    specs = arch["tensors"]
    stored = {n for n, s in specs.items() if not (isinstance(s, dict) and "alias_of" in s)}
    if set(tensors) != stored:
        diff = sorted(set(tensors) ^ stored)[:5]
        raise CheckpointError(f"weights.pt and arch.json disagree on the stored tensors ({diff})",
                              hint="the files do not belong together; re-export the model")
    built: dict[str, torch.Tensor] = {}
    for name in sorted(specs, key=lambda n: isinstance(specs[n], dict) and "alias_of" in specs[n]):  # originals first
        _lookup(specs, tensors, name, built)
    root: dict[str, Any] = {}
    for mname, mspec in arch["modules"].items():
        module = _build_leaf(mname, mspec)
        prefix = f"{mname}."
        expected = {n for n in specs if n.startswith(prefix)}
        have = {f"{prefix}{n}" for n, _, _ in _owner_tensors(module)}
        if expected != have:
            diff = sorted(have ^ expected)[:5]
            raise CheckpointError(f"module {mname!r}: tensors in arch.json do not match the module ({diff})",
                                  hint="the file is corrupt or from an incompatible version")
        for full in sorted(expected):
            _assign(module, full[len(prefix):], built[full], specs[full].get("kind", "buffer"))
        root[mname] = module
    graph = _build_graph(arch["graph"], specs, built, root)
    holder = nn.Module()  # installed in node order, so state-dict keys keep the original order
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            _place(holder, node.target, root[node.target])
    try:
        gm = fx.GraphModule(holder, graph, class_name="GraphModule")
    except (RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"cannot assemble the loaded graph: {exc}", hint="the file is corrupt") from exc
    gm.train(bool(arch.get("training", False)))
    for mname, mspec in arch["modules"].items():  # GraphModule.train() recursed; restore per-module flags
        _restore_training(gm.get_submodule(mname), mspec)
    layout = arch.get("memory_format", "contiguous")
    if layout not in ("contiguous", "channels_last"):
        raise CheckpointError(f"arch.json: unknown memory_format {layout!r}",
                              hint="the file is corrupt or from a newer version; re-export the model")
    if layout == "channels_last":
        gm.to(memory_format=torch.channels_last)
    return gm


def _place(holder: nn.Module, target: str, obj: Any) -> None:
    *prefix, field = target.split(".")
    owner = holder
    for item in prefix:
        child = getattr(owner, item, None)
        if child is None:
            child = nn.Module()
            setattr(owner, item, child)
        elif not isinstance(child, nn.Module) or type(child) is not nn.Module:
            return  # inside an installed leaf module: the tensor is already there
        owner = child
    if getattr(owner, field, None) is not None:
        return
    if isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter):
        owner.register_buffer(field, obj)
    else:
        setattr(owner, field, obj)


def _restore_training(module: nn.Module, spec: Mapping[str, Any]) -> None:
    module.training = bool(spec.get("training", False))
    for child, cspec in zip(module.children(), spec.get("children", []) or []):
        _restore_training(child, cspec)


_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


def _function_target(node: str, target: str, by_name: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    """The function a loaded ``call_function`` node calls: from the torch table or the wrapped-function table."""
    if target in by_name:
        return by_name[target]
    if target in _WRAPPED_FUNCTIONS:  # an exact key of the table: only then is its (constant) module imported
        return _wrapped_function(target)
    raise CheckpointError(f"node {node!r} calls {target!r}, which is not in autoprune's allow-list of functions",
                          hint="the file was edited or written by an incompatible version; it is refused for safety")


def _build_graph(nodes: Sequence[Any], specs: Mapping[str, Any], built: Mapping[str, torch.Tensor],
                 root: dict[str, Any]) -> fx.Graph:
    by_name, _ = _function_table()
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in nodes:
        if not isinstance(entry, dict) or entry.get("op") not in _OPS or not isinstance(entry.get("name"), str):
            raise CheckpointError(f"arch.json: malformed node {str(entry)[:80]}")
        op, name, target = entry["op"], entry["name"], entry.get("target")
        if not isinstance(target, str):
            raise CheckpointError(f"arch.json: node {name!r} has a non-string target")
        if op == "call_function":
            fn_target: Any = _function_target(name, target, by_name)
        elif op == "call_method":
            if target not in _tensor_methods():
                raise CheckpointError(f"node {name!r} calls method {target!r}, which is not an allowed tensor method")
            fn_target = target
        elif op == "call_module":
            if target not in root:
                raise CheckpointError(f"node {name!r} calls module {target!r}, which arch.json does not define")
            fn_target = target
        elif op == "get_attr":
            if target not in specs:
                raise CheckpointError(f"node {name!r} reads {target!r}, which arch.json does not define")
            root.setdefault(target, built[target])
            fn_target = target
        else:
            fn_target = target
        args = _decode_arg({"$tuple": entry.get("args", [])}, env)
        kwargs_raw = entry.get("kwargs", {})
        if not isinstance(kwargs_raw, dict):
            raise CheckpointError(f"arch.json: node {name!r} has malformed kwargs")
        kwargs = {k: _decode_arg(v, env) for k, v in kwargs_raw.items()}
        node = graph.create_node(op, fn_target, args, kwargs, name=name)
        if op == "call_function" and target in _WRAPPED_FUNCTIONS:
            node.meta["is_wrapped"] = True  # the generated code wraps it again: tracing the module keeps the call
        env[name] = node
    try:
        graph.lint()
    except Exception as exc:
        raise CheckpointError(f"the loaded graph is inconsistent: {exc}", hint="the file is corrupt") from exc
    return graph


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------


def save_module(gm: nn.Module, out_dir: str | os.PathLike[str], example_input: ExampleInput,
                metadata: Mapping[str, Any] | None = None) -> Path:
    """Save a (pruned) module as ``arch.json`` + ``weights.pt`` so that :func:`load_module` rebuilds it without code.

    Args:
        gm: A ``torch.fx.GraphModule`` (any other module is traced with :func:`trace` first).
        out_dir: Target directory (created; existing files are replaced atomically).
        example_input: Example input tensor; its shape and dtype are recorded (it is not run).
        metadata: JSON-able extra information (e.g. pruning provenance: group sizes, widths, kept indices).

    Returns:
        The directory as a :class:`~pathlib.Path`.

    A module whose convolution weights are in channels-last layout (:mod:`autoprune.deploy`) is recorded as such
    (``arch.json``'s ``memory_format``) and loaded in that layout.

    Raises:
        CheckpointError: If a module type, call target or literal is outside the allow-lists.
    """
    arch, tensors = encode_module(trace(gm))
    if memory_format_of(gm) == "channels_last":
        arch = {**arch, "memory_format": "channels_last"}
    return write_artifact(out_dir, arch, tensors, example_input, metadata)


def memory_format_of(model: nn.Module) -> str:
    """``channels_last`` when the model's 4-D weights are stored in NHWC, else ``contiguous``."""
    # a tensor whose two layouts coincide (1×1 kernels of one input channel, …) says nothing either way
    telling = [p for p in model.parameters() if p.dim() == 4
               and p.is_contiguous() != p.is_contiguous(memory_format=torch.channels_last)]
    if telling and all(p.is_contiguous(memory_format=torch.channels_last) for p in telling):
        return "channels_last"
    return "contiguous"


def load_module(out_dir: str | os.PathLike[str]) -> fx.GraphModule:
    """Rebuild a module saved by :func:`save_module` (or ``quantization.save_quantized``) without user code.

    The returned ``GraphModule`` has the original module names, state-dict keys and training flags;
    ``gm.meta["autoprune"]`` holds the header (example input, metadata, versions).

    Raises:
        CheckpointError: Missing, truncated, tampered or unsafe files; unknown module types, functions, methods
            or format versions.
    """
    doc, tensors = read_artifact(out_dir)
    loader = _section_loader(doc)
    if loader is not None:
        return loader(doc, tensors)
    gm = build_module(doc, tensors)
    gm.meta["autoprune"] = {k: doc[k] for k in ("example_input", "metadata", "autoprune_version", "torch_version")}
    return gm


def _section_loader(doc: Mapping[str, Any]) -> SectionLoader | None:
    """The registered loader of the artifact's extension section (importing its known provider on first use)."""
    names = [k for k in doc if k in _SECTIONS or k in _SECTION_PROVIDERS]
    if not names:
        return None
    if len(names) > 1:
        raise CheckpointError(f"{ARCH_FILE} has several extension sections {names}; one artifact has at most one",
                              hint="the file is corrupt or was edited by hand; re-export the model")
    name = names[0]
    if name not in _SECTIONS and name in _SECTION_PROVIDERS:
        is_available(_SECTION_PROVIDERS[name])
    loader = _SECTIONS.get(name)
    if loader is None:
        raise CheckpointError(f"{ARCH_FILE} has a {name!r} section, but its loader cannot be imported here",
                              hint=f"{_SECTION_PROVIDERS[name]} failed to import; check the autoprune installation")
    return loader


_FORMATS = ("pt2", "torchscript", "onnx")


def _export_any_batch(model: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension (traced at batch 2: torch.export specialises a size of 1),
    or at the example's own batch when the model's code fixes it (logged)."""
    example = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # a batch size fixed in the model's code: constraint violation, guard on the size
        log.warning("pt2 export: the model fixes its batch size (%s); model.pt2 takes batch %d only",
                    (str(exc).strip().splitlines() or [type(exc).__name__])[0], example_input.shape[0])
        return torch.export.export(model, (example_input,))


class _OnnxRuntimeModule(nn.Module):
    """An ONNX Runtime session behind ``nn.Module``'s call (so the latency helpers time it like a torch model)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0])


def check_onnx(path: str | os.PathLike[str], model: nn.Module, example_input: torch.Tensor, *,
               batches: Sequence[int] = (1, 7), tolerance: float = 1e-4, measure: bool = True) -> dict[str, Any]:
    """Run an exported ``model.onnx`` with ONNX Runtime beside ``model``: the largest output difference at each
    batch size in ``batches``, and (``measure``) both latencies at batch 1, 1 thread, timed in interleaved rounds.

    Returns:
        ``{"onnxruntime": version, "batches": [...], "max_abs_diff": d, "passed": d <= tolerance,
        "tolerance": t, "latency_ms": {"torch": ..., "onnxruntime": ...}}`` (latency only when ``measure``).

    Raises:
        AutoPruneError: ``onnxruntime`` is not installed (the ``onnx`` extra), or the file does not run.
    """
    from autoprune._imports import optional_import

    ort = optional_import("onnxruntime", "checking an ONNX export")
    try:
        session = _OnnxRuntimeModule(Path(path))
    except Exception as exc:
        raise AutoPruneError(f"ONNX Runtime cannot load {path}: {exc}",
                             hint="export again with formats: [onnx]; check the onnx/onnxruntime versions") from exc
    model = model.eval()
    one = example_input[:1]
    diff = 0.0
    with torch.no_grad():
        for batch in batches:
            x = one.expand(batch, *one.shape[1:]).contiguous() + 0.01 * torch.randn(batch, *one.shape[1:])
            diff = max(diff, float((session(x) - model(x).float()).abs().max()))
    out: dict[str, Any] = {"onnxruntime": ort.__version__, "batches": list(batches), "max_abs_diff": diff,
                           "tolerance": tolerance, "passed": diff <= tolerance}
    if measure:
        from autoprune.latency import compare_latency

        lat = compare_latency({"torch": model, "onnxruntime": session}, one, rounds=3, threads=1, min_run_time=0.1)
        out["latency_ms"] = {k: v.median_ms for k, v in lat.items()}
    return out


def export_deployment(gm: nn.Module, example_input: torch.Tensor, out_dir: str | os.PathLike[str],
                      formats: Sequence[str] = ("pt2",)) -> dict[str, Path]:
    """Write deployment artifacts: ``model.pt2`` (``torch.export``), ``model.ts`` (TorchScript trace, frozen with
    ``torch.jit.freeze``: the fastest of the three on a CPU at batch 1, results/benchmarks/latency.md) and/or
    ``model.onnx`` (needs the ``onnx`` package).

    The model is exported in eval mode; its training flag is restored afterwards. ``model.pt2`` and ``model.onnx``
    take any batch size (the batch dimension is exported as dynamic, whatever the batch of ``example_input``); a
    model whose code fixes its batch size (e.g. ``x.view(1, -1)``) is exported at the example's batch instead,
    with a warning.

    Returns:
        Format → written path.

    Raises:
        ConfigError: Unknown format names.
        AutoPruneError: If the exporter fails or an optional dependency is missing.
    """
    unknown = [f for f in formats if f not in _FORMATS]
    if unknown:
        raise ConfigError(f"unknown export format(s) {unknown}", hint=f"choose from {list(_FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(gm).eval()
    written: dict[str, Path] = {}
    for fmt in formats:
        try:
            if fmt == "pt2":
                path = out / "model.pt2"
                torch.export.save(_export_any_batch(model, example_input), str(path))
            elif fmt == "torchscript":  # frozen: weights inlined, BN folded, no Python per op at run time
                path = out / "model.ts"
                with torch.no_grad():
                    torch.jit.save(torch.jit.freeze(torch.jit.trace(model, example_input)), str(path))
            else:
                from autoprune._imports import optional_import

                optional_import("onnx", "ONNX export")
                path = out / "model.onnx"
                torch.onnx.export(model, (example_input,), str(path), input_names=["input"],
                                  output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                                  dynamo=False)
        except AutoPruneError:
            raise
        except Exception as exc:
            raise AutoPruneError(f"{fmt} export failed: {exc}",
                                 hint="check that the model runs on example_input; try another format") from exc
        written[fmt] = path
    return written
