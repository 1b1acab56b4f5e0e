"""Channel-dependency analysis: which channels of a network must be pruned together.

This module owns :func:`analyze`, which turns a model and an example input into a :class:`GroupSet` of
:class:`ChannelGroup` records (ENGINE.md §2). The front-end is ``torch.fx.symbolic_trace``; every node is then
executed once on the example input (an :class:`torch.fx.Interpreter`, which gives real shapes) and a rule per
canonical op kind maps the node's *channel layout* — a list of segments ``(atom, stride)`` along the tensor's
channel dimension — from its inputs to its output. Atoms that must be pruned identically are merged with a
union-find. An atom can be refined into sub-ranges when only part of it is coupled to something else: a
zero-pad on channels (option-A shortcuts: the pad amounts follow the widths of the padded ranges), ``split`` with
explicit sizes (rewritten on apply) and ``chunk`` (the equal pieces are tied). Anything without a rule freezes
the channels it touches, so a missing rule makes pruning less aggressive but never produces a broken model.

Grouped convolutions (``1 < groups``, not depthwise; ``groups == out_channels != in_channels`` is grouped, and a
conv with ``out_channels == 1`` has ``groups == 1``) require the same number of kept channels in each of their
``g`` input blocks and ``g`` output blocks. These constraints become group divisors (legal widths are multiples,
:func:`autoprune.pruning.plan` keeps the top ``width / divisor`` channels of every block, and each output block
of the conv keeps the columns of its own input block). When a conv's blocks mix channel groups unevenly (e.g. a
concat straddling the blocks) the channels are frozen with a reason, as is a group whose divisor leaves no
smaller width (one channel per block, e.g. the input of a depth-multiplier conv).

**torch.export front-end.** When ``torch.fx`` fails on the model or on a submodule (e.g. ``list(x.chunk(2, 1))``
in a YOLOv8 C2f block: "Proxy object cannot be iterated"), that module is exported with ``torch.export.export``
(on the inputs of its first call, batch repeated twice so that the batch size stays symbolic) and rebuilt as an
fx graph: each call of a ``torch.nn`` leaf (or opaque) module, found through ``node.meta["nn_module_stack"]``,
becomes a ``call_module`` of the same submodule, and the other ATen ops are mapped to torch functions the rules
know (activations, arithmetic, cat/chunk/split, reductions, reshape/view, permute, pooling, pad, slicing,
functional conv/linear, symbolic ``size``). The rebuilt module must reproduce the original outputs on every
captured call and on the doubled batch; the model is then traced again with it inlined, so it yields the same
groups as a traceable equivalent (``a, b = x.split(c, 1)``). Not supported, hence still opaque leaves with
frozen boundaries and the failure in the reason: data-dependent control flow (torch.export cannot guard on it
either), keyword or non-tensor inputs, ATen ops outside the table (``cumsum``, in-place writes such as
``fill_``/``copy_``, interpolation, ``batch_norm`` called functionally, …), modules that create tensor
constants, and leaf modules whose ATen ops are used outside the call. ``analyze(..., use_export=False)``
switches the front-end off.

The analysis also records, for every parameter and buffer, how each of its dimensions depends on the group
widths. :mod:`autoprune.pruning` slices tensors with it and :mod:`autoprune.cost` prices candidates with it
(the closed-form cost coefficients are computed here, once).
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import math
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from autoprune.errors import AutoPruneError, ConfigError

__all__ = [
    "ChannelGroup",
    "CostTerms",
    "GroupSet",
    "LiteralSite",
    "Member",
    "TensorSlice",
    "analyze",
]

_MAX_RETRACES = 64
_MAX_REASONS = 3


# ----------------------------------------------------------------------------------------------------------------
# Public records
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One place where a channel group appears.

    Attributes:
        module: Qualified name of the module (or of the attribute, for ``param``) in the traced graph.
        role: ``out`` (producer output channels), ``in`` (consumer input channels), ``dw`` (depthwise conv),
            ``norm`` (normalisation / per-channel layer) or ``param`` (a bare tensor attribute, e.g. a layer
            scale, broadcast against the channels).
        offset: First position of the group along the member's channel dimension (after concatenation).
        stride: Positions per channel (``H·W`` after flattening a ``C×H×W`` map into a linear layer).
    """

    module: str
    role: str
    offset: int = 0
    stride: int = 1


@dataclass(frozen=True)
class TensorSlice:
    """How one parameter or buffer is sliced when its group is pruned.

    Channel ``c`` of the group occupies positions ``offset + c·stride … offset + (c+1)·stride − 1`` of
    dimension ``dim`` of the tensor ``tensor`` (a qualified name in the traced graph module).

    ``groups > 1`` marks the input dim of a grouped conv weight ``[C_out, C_in/g, …]``: positions then count
    along the *virtual* input axis of ``C_in`` channels (block ``i`` of ``C_in/g`` input channels feeds only the
    output rows of block ``i``), not along the stored dim.
    """

    tensor: str
    dim: int
    offset: int
    stride: int
    role: str
    module: str
    groups: int = 1

    @property
    def param_name(self) -> str:
        """Last component of the tensor name (``weight``, ``bias``, ``running_mean`` …)."""
        return self.tensor.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ChannelGroup:
    """A set of channels that must keep the same width (one union-find class of channel atoms).

    Attributes:
        id: Stable name from the first producer in execution order, e.g. ``"layer1.0.conv1:out"``.
        size: Number of channels at full width.
        members: Every module (and role) the group appears in, in execution order.
        frozen: True when the group may not be pruned; ``reason`` says why.
        reason: Why the group is frozen (empty for prunable groups).
        divisor: Legal widths are multiples of this (1 unless a grouped conv requires otherwise): the channels
            form ``divisor`` equal consecutive blocks and every block keeps ``width / divisor`` channels.
        min_width: Smallest legal width.
        macs: MACs (per sample) whose value depends on this group's width, at full width.
        params: Parameters whose count depends on this group's width, at full width.
        macs_linear: λ_i, the coefficient of ``w_i`` in the closed-form MACs (others at their constant part).
        macs_quadratic: ``(other group id, κ_ij)`` pairs of the closed-form MACs (``κ_ii`` for itself).
        params_linear: As ``macs_linear`` for the parameter count.
        params_quadratic: As ``macs_quadratic`` for the parameter count.
        slices: Every tensor slice that changes when the group is pruned.
        index: Position of the group in execution order.
    """

    id: str
    size: int
    members: tuple[Member, ...]
    frozen: bool
    reason: str = ""
    divisor: int = 1
    min_width: int = 1
    macs: int = 0
    params: int = 0
    macs_linear: float = 0.0
    macs_quadratic: tuple[tuple[str, float], ...] = ()
    params_linear: float = 0.0
    params_quadratic: tuple[tuple[str, float], ...] = ()
    slices: tuple[TensorSlice, ...] = ()
    index: int = 0

    @property
    def prunable(self) -> bool:
        """True when the group has a producer and no frozen atom."""
        return not self.frozen and any(m.role == "out" for m in self.members)

    def check_width(self, width: int) -> None:
        """Raise unless ``width`` is a multiple of :attr:`divisor` (range checks are the caller's business).

        Raises:
            ConfigError: Naming the divisor and the legal multiples.
        """
        d = self.divisor
        if width % d == 0:
            return
        legal = list(range(d, self.size + 1, d))
        shown = ", ".join(map(str, legal[:8])) + (" …" if len(legal) > 8 else "")
        raise ConfigError(
            f"width {width} for group {self.id!r} is not a multiple of {d}: a grouped conv needs the same number "
            f"of kept channels in each of the group's {d} channel blocks",
            hint=f"use a multiple of {d} (legal widths: {shown}; pruning.legal_widths(group) lists them)")

    def layers(self, role: str | None = None) -> list[str]:
        """Module names of the members (optionally of one role), without duplicates, in order."""
        seen: dict[str, None] = {}
        for m in self.members:
            if role is None or m.role == role:
                seen.setdefault(m.module, None)
        return list(seen)


@dataclass(frozen=True)
class LiteralSite:
    """A Python integer in the graph (a ``view``/``reshape`` size) that depends on group widths.

    ``path`` locates the literal in the node's arguments, e.g. ``("args", 2)`` or ``("args", 1, 1)``.
    Its new value is ``base + Σ coef·(w_g − size_g)`` over ``terms`` ``(group id, coef)``.
    """

    node: str
    path: tuple[Any, ...]
    base: int
    terms: tuple[tuple[str, int], ...]


@dataclass
class CostTerms:
    """Per-tensor size factors used by the closed-form cost model (ENGINE.md §6.1).

    Every *row* r is a product ``k_r · (A_r·w + a0_r) · (B_r·w + b0_r)`` of at most two affine functions of the
    prunable group widths ``w`` (ordered as :attr:`GroupSet.prunable_ids`). Rows are parameter numels,
    weight numels used by MAC terms and weight output-channel counts (for quantization scales).
    """

    k: Any  # np.ndarray [R]
    A: Any  # np.ndarray [R, P]
    a0: Any  # np.ndarray [R]
    B: Any  # np.ndarray [R, P]
    b0: Any  # np.ndarray [R]
    macs_coef: Any  # np.ndarray [R]  (per-sample multiplier of each weight row)
    params_coef: Any  # np.ndarray [R]  (1 for parameter rows)
    macs_const: float  # MACs of ops whose operands are all frozen (matmul, attention, functional conv)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer -> rows and MAC multiplier
    row_names: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Op tables
# ----------------------------------------------------------------------------------------------------------------


def _funcs(names: Iterable[str], *mods: Any) -> set[Any]:
    out: set[Any] = set()
    for name in names:
        for mod in mods:
            f = getattr(mod, name, None)
            if f is not None and callable(f):
                out.add(f)
    return out


_UNARY_NAMES = (
    "relu", "relu_", "relu6", "gelu", "silu", "mish", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish",
    "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu",
    "softplus", "logsigmoid", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d",
    "max_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample", "abs",
    "neg", "clamp", "clamp_", "clip", "exp", "sqrt", "square", "contiguous", "clone", "detach", "float",
    "double", "half", "to", "type_as", "erf", "sin", "cos",
)
_BINARY_NAMES = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "multiply", "subtract",
    "maximum", "minimum", "pow", "pow_",
)
_UNARY_FUNCS = _funcs(_UNARY_NAMES, torch, F) | {operator.neg, operator.pos}
_BINARY_FUNCS = _funcs(_BINARY_NAMES, torch) | {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.pow,
}
_CAT_FUNCS = _funcs(("cat", "concat", "concatenate"), torch)
_SPLIT_FUNCS = _funcs(("split", "chunk", "tensor_split", "unbind", "split_with_sizes"), torch)
_RESHAPE_FUNCS = _funcs(("flatten", "reshape", "squeeze", "unsqueeze"), torch)
_REDUCE_FUNCS = _funcs(("mean", "sum", "amax", "amin", "std", "var"), torch)
_PERMUTE_FUNCS = _funcs(("permute",), torch)
_TRANSPOSE_FUNCS = _funcs(("transpose", "swapaxes", "swapdims"), torch)
_SOFTMAX_FUNCS = _funcs(("softmax", "log_softmax"), torch, F)
_PAD_FUNCS = _funcs(("pad",), F, torch._C._nn)
_MATMUL_FUNCS = _funcs(("matmul", "bmm", "mm"), torch) | {operator.matmul}
_SDPA_FUNCS = _funcs(("scaled_dot_product_attention",), F)
_FUNC_LINEAR = _funcs(("linear",), F)
_FUNC_CONV = _funcs(("conv1d", "conv2d", "conv3d"), F)

_UNARY_METHODS = frozenset(_UNARY_NAMES) | {"type", "cpu", "cuda", "requires_grad_"}
_BINARY_METHODS = frozenset(_BINARY_NAMES) | {"__add__", "__mul__", "__sub__", "__truediv__"}
_SPLIT_METHODS = frozenset({"split", "chunk", "tensor_split", "unbind", "split_with_sizes"})
_RESHAPE_METHODS = frozenset({"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"})
_REDUCE_METHODS = frozenset({"mean", "sum", "amax", "amin", "std", "var"})
_SIZE_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement", "get_device"})
_SHAPE_ATTRS = frozenset({"shape"})
_MATMUL_METHODS = frozenset({"matmul", "bmm", "mm"})

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_PASS_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
)

# Parameters and buffers sliced per role, by module type: (attribute, dim).
_NORM_TENSORS = (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0))


# ----------------------------------------------------------------------------------------------------------------
# Tracing front-end
# ----------------------------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """``symbolic_trace`` with extra leaves, remembering which submodule a trace failure came from."""

    def __init__(self, leaf_names: set[str], leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_names = leaf_names
        self.leaf_types = leaf_types
        self.failed: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                try:
                    self.failed = self.path_of_module(m)
                except NameError:
                    self.failed = None
            raise


def _normalize_type() -> tuple[type, ...]:
    try:
        from autoprune.models.layers import Normalize
    except Exception:  # the model zoo is optional for the engine
        return ()
    return (Normalize,)


# ----------------------------------------------------------------------------------------------------------------
# torch.export front-end (for modules torch.fx cannot trace)
# ----------------------------------------------------------------------------------------------------------------


class _ExportFailure(Exception):
    """The torch.export front-end cannot rebuild a module (the reason is the message)."""


def _aten_table() -> dict[str, Any]:
    """ATen op name -> the torch callable (or ``"method:<name>"``) the fx rules understand."""
    funcs: dict[str, Any] = {
        "relu": torch.relu, "relu_": torch.relu_, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
        "silu": F.silu, "gelu": F.gelu, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
        "leaky_relu": F.leaky_relu, "hardtanh": F.hardtanh, "abs": torch.abs, "neg": torch.neg, "exp": torch.exp,
        "sqrt": torch.sqrt, "clamp": torch.clamp, "clone": torch.clone, "dropout": torch.dropout,
        "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "cat": torch.cat,
        "chunk": torch.chunk, "split": torch.split, "split_with_sizes": torch.split, "mean": torch.mean,
        "sum": torch.sum, "amax": torch.amax, "flatten": torch.flatten, "permute": torch.permute,
        "transpose": torch.transpose, "unsqueeze": torch.unsqueeze, "squeeze": torch.squeeze,
        "softmax": torch.softmax, "log_softmax": torch.log_softmax, "max_pool2d": torch.max_pool2d,
        "avg_pool2d": F.avg_pool2d, "adaptive_avg_pool2d": F.adaptive_avg_pool2d, "pad": F.pad,
        "matmul": torch.matmul, "conv1d": F.conv1d, "conv2d": F.conv2d, "linear": F.linear,
    }
    funcs.update({"view": "method:view", "reshape": "method:reshape", "_unsafe_view": "method:reshape",
                  "contiguous": "method:contiguous", "add_": "method:add_", "mul_": "method:mul_"})
    return funcs


_ATEN: dict[str, Any] = _aten_table()


def _aten_name(target: Any) -> str | None:
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return target.overloadpacket.__name__
    return None


def _capture_calls(model: nn.Module, path: str, args: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], dict]]:
    """Inputs of every call of submodule ``path`` during one eval forward of ``model`` on ``args``."""
    if not path:
        return [(args, {})]
    sub = model.get_submodule(path)
    calls: list[tuple[tuple[Any, ...], dict]] = []

    def hook(_m: nn.Module, a: tuple[Any, ...], kw: dict) -> None:
        calls.append((tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in a), dict(kw)))

    flags = {m: m.training for m in model.modules()}
    handle = sub.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.eval()
        with torch.no_grad():
            model(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    except Exception as exc:
        raise _ExportFailure(f"running the model failed ({type(exc).__name__})") from exc
    finally:
        handle.remove()
        for m, t in flags.items():
            m.training = t
    return calls


def _quiet_export(mod: nn.Module, args: tuple[Any, ...]) -> Any:
    """``torch.export.export`` with torch's logging silenced (failures print whole graphs otherwise)."""
    import contextlib
    import io
    import logging
    import warnings

    logger = logging.getLogger("torch")
    level = logger.level
    saved = {n: lg.level for n, lg in logging.root.manager.loggerDict.items()
             if n.startswith("torch") and isinstance(lg, logging.Logger)}
    try:
        for n in saved:
            logging.getLogger(n).setLevel(logging.CRITICAL)
        logger.setLevel(logging.CRITICAL)
        dynamic = tuple({0: torch.export.Dim.AUTO} if a.dim() > 0 else None for a in args)  # batch stays symbolic
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return torch.export.export(mod, args, dynamic_shapes=dynamic)
    finally:
        logger.setLevel(level)
        for n, lv in saved.items():
            logging.getLogger(n).setLevel(lv)


def _leaf_calls(sub: nn.Module, ep: Any, is_leaf: Any) -> dict[fx.Node, tuple[str, list[fx.Node]]]:
    """Exported nodes that belong to one call of a leaf module: node -> (module path, nodes of that call)."""
    calls: dict[str, tuple[str, list[fx.Node]]] = {}
    for n in ep.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if n.op != "call_function" or not stack:
            continue
        # the outermost leaf on the stack owns the op (a leaf's internals are not analysed)
        for key, (path, _) in stack.items():
            try:
                mod = sub.get_submodule(path) if path else None
            except AttributeError:  # e.g. bookkeeping entries of symbolic-shape nodes
                continue
            if mod is not None and is_leaf(path, mod):
                calls.setdefault(key, (path, []))[1].append(n)
                break
    return {n: call for call in calls.values() for n in call[1]}


def _rebuild_from_export(sub: nn.Module, ep: Any, is_leaf: Any) -> fx.GraphModule:
    """An fx graph module equivalent to ``sub`` built from its exported ATen graph.

    Each call of a leaf module (torch.nn layers, opaque modules; found through ``nn_module_stack``) becomes one
    ``call_module`` node of the same submodule, so parameter names and the per-module rules stay as in an fx
    trace; the remaining ATen ops are mapped to the torch functions the analysis rules know. Anything else
    raises :class:`_ExportFailure`.
    """
    from torch.utils import _pytree as pytree

    sig = ep.graph_signature
    tensors = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    if getattr(sig, "inputs_to_lifted_tensor_constants", None):
        raise _ExportFailure("the module creates tensor constants")
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    attrs: dict[str, fx.Node] = {}
    leaf_of = _leaf_calls(sub, ep, is_leaf)

    def one(n: fx.Node) -> Any:
        if n.name in tensors:
            name = tensors[n.name]
            if name not in attrs:
                attrs[name] = graph.get_attr(name)
            return attrs[name]
        if n not in env:
            raise _ExportFailure(f"an intermediate value of module {leaf_of[n][0]} is used outside it"
                                 if n in leaf_of else f"node {n.name} is used before it is defined")
        return env[n]

    def value(a: Any) -> Any:
        return fx.node.map_arg(a, one)

    for n in ep.graph.nodes:
        if n.op == "placeholder":
            if n.name not in tensors:
                env[n] = graph.placeholder(n.name)
        elif n.op == "output":
            spec = ep.call_spec.out_spec
            flat = [value(o) for o in n.args[0]]
            graph.output(pytree.tree_unflatten(flat, spec) if spec is not None else tuple(flat))
        elif n in leaf_of:
            path, nodes = leaf_of[n]
            if n is not nodes[-1]:
                continue
            inside = set(nodes)
            found = [a for m in nodes for a in _node_args(m)]
            inputs = list(dict.fromkeys(a for a in found if a not in inside and a.name not in tensors))
            if len(inputs) != 1:
                raise _ExportFailure(f"module {path} is called with {len(inputs)} tensor inputs")
            env[n] = graph.call_module(path, (value(inputs[0]),))
        else:
            env[n] = _aten_node(graph, n, value)
    return fx.GraphModule(sub, graph, type(sub).__name__)


def _aten_node(graph: fx.Graph, n: fx.Node, value: Any) -> fx.Node:
    """The fx node (torch function, tensor method or indexing) for one exported ATen node."""
    if n.target in (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv):
        return graph.call_function(n.target, value(n.args))  # tuple items and symbolic size arithmetic
    aten = _aten_name(n.target)
    if aten == "sym_size":
        return graph.call_method("size", value(n.args))
    if aten == "slice":
        x, dim, start, end, step = (*n.args, *(0, None, None, 1)[len(n.args) - 1:])[:5]
        end = None if isinstance(end, int) and end >= 2 ** 62 else end
        idx = (slice(None),) * _norm_dim(dim, n.meta["val"].dim()) + (slice(start, end, step),)
        return graph.call_function(operator.getitem, (value(x), idx))
    fn = _ATEN.get(aten) if aten else None
    if fn is None:
        raise _ExportFailure(f"no rule for {n.target}")
    if isinstance(fn, str):
        return graph.call_method(fn.split(":", 1)[1], value(n.args), value(n.kwargs))
    return graph.call_function(fn, value(n.args), value(n.kwargs))


def _same_outputs(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_outputs(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_outputs(a[k], b[k]) for k in a)
    return a == b


def _export_front_end(model: nn.Module, path: str, args: tuple[Any, ...], leaf_types: tuple[type, ...],
                      leaf_names: set[str]) -> fx.GraphModule:
    """Rebuild submodule ``path`` (``""``: the model) as an fx graph module through ``torch.export``.

    The module is exported on the inputs of its first call; the rebuilt module must reproduce the original
    outputs on the inputs of *every* call (eval mode), otherwise :class:`_ExportFailure` is raised.
    """
    sub = model.get_submodule(path) if path else model
    calls = _capture_calls(model, path, args)
    if not calls:
        raise _ExportFailure("the module is never called")
    if any(kw or not all(isinstance(a, torch.Tensor) for a in a_) for a_, kw in calls):
        raise _ExportFailure("only positional tensor inputs are supported")
    flags = {m: m.training for m in sub.modules()}
    # exported on the first call's inputs repeated twice along the batch dim (a batch of one would be
    # specialised); checked on every original call, so a graph that hard-codes the batch size is refused
    double = tuple(torch.cat([t, t]) if t.dim() > 0 else t for t in calls[0][0])
    try:
        sub.eval()
        try:
            ep = _quiet_export(sub, double)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise _ExportFailure(f"{type(exc).__name__}: {first[:60]}") from exc
        prefix = f"{path}." if path else ""

        def is_leaf(rel: str, mod: nn.Module) -> bool:
            if prefix + rel in leaf_names or (leaf_types and isinstance(mod, leaf_types)):
                return True
            name = type(mod).__module__
            return (name.startswith("torch.nn") or name.startswith("torch.ao.nn")) and not isinstance(
                mod, (nn.Sequential, nn.ModuleList, nn.ModuleDict))

        try:
            rebuilt = _rebuild_from_export(sub, ep, is_leaf)
        except _ExportFailure:
            raise
        except Exception as exc:
            raise _ExportFailure(f"rebuilding the graph failed ({type(exc).__name__}: {exc})") from exc
        rebuilt.eval()
        with torch.no_grad():
            for a in [double] + [a for a, _ in calls]:
                try:
                    same = _same_outputs(rebuilt(*a), sub(*a))
                except Exception:
                    same = False
                if not same:
                    raise _ExportFailure("the rebuilt graph does not reproduce the module's outputs (batch size "
                                         "specialised?)")
    finally:
        for m, t in flags.items():
            m.training = t
    return rebuilt


def _with_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """A shallow copy of ``root`` whose submodule ``path`` is ``new`` (``root`` itself is not modified)."""
    head, _, rest = path.partition(".")
    out = copy.copy(root)
    out._modules = dict(root._modules)
    out._modules[head] = _with_submodule(root._modules[head], rest, new) if rest else new
    return out


def _trace(model: nn.Module, opaque: Sequence[Any], args: tuple[Any, ...] | None = None,
           exported: list[str] | None = None) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace ``model``; untraceable submodules go through torch.export or become leaves.

    Returns the graph module and the leaf reasons; the names of the modules rebuilt through ``torch.export``
    are appended to ``exported``. Without ``args`` the torch.export front-end is not tried.
    """
    names = dict(model.named_modules())
    leaf_types = tuple(o for o in opaque if isinstance(o, type)) + _normalize_type()
    patterns = [o for o in opaque if isinstance(o, str)]
    leaf_names: set[str] = set()
    reasons: dict[str, str] = {}
    for pat in patterns:
        hits = [n for n in names if n and fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(f"opaque module {pat!r} matches no submodule of {type(model).__name__}",
                              hint=_close_hint(pat, [n for n in names if n]))
        for n in hits:
            leaf_names.add(n)
            reasons[n] = f"opaque module {n} ({type(names[n]).__name__})"
    for n, m in names.items():
        if n and leaf_types and isinstance(m, leaf_types):
            reasons.setdefault(n, f"opaque module {n} ({type(m).__name__})")
    if isinstance(model, fx.GraphModule):
        return model, reasons
    exported = exported if exported is not None else []
    work = model
    last_error: Exception | None = None
    for _ in range(_MAX_RETRACES):
        tracer = _Tracer(leaf_names, leaf_types)
        try:
            graph = tracer.trace(work)
        except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError … depending on the construct
            last_error = exc
            bad = tracer.failed
            if bad in leaf_names:
                bad = None
            why = "torch.export front-end not tried"
            if args is not None and bad not in exported:
                try:
                    rebuilt = _export_front_end(model, bad or "", args, leaf_types, leaf_names)
                except _ExportFailure as fail:
                    why = f"torch.export front-end: {fail}"
                else:
                    exported.append(bad or "")
                    if not bad:
                        return rebuilt, reasons
                    work = _with_submodule(work, bad, rebuilt)
                    continue
            if not bad:
                raise AutoPruneError(
                    f"torch.fx cannot trace {type(model).__name__}.forward: {type(exc).__name__}: {exc}\n({why})",
                    hint="move the data-dependent code into a submodule (it is then analysed as an opaque "
                    "leaf), or pass opaque=(...) with the offending module class or name",
                ) from exc
            leaf_names.add(bad)
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reasons[bad] = f"untraceable module {bad} ({type(names[bad]).__name__}: {type(exc).__name__}: " \
                           f"{first_line[:80]}; {why}) analysed as an opaque leaf"
            continue
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        return gm, reasons
    raise AutoPruneError(f"tracing {type(model).__name__} failed after {_MAX_RETRACES} attempts: {last_error}")


def _close_hint(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(repr(c) for c in close) + "?"
    shown = ", ".join(list(choices)[:12])
    return f"choices include: {shown}" + (" …" if len(choices) > 12 else "")


# ----------------------------------------------------------------------------------------------------------------
# Channel layouts
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Info:
    """Channel layout of a tensor value: the channel dim and its segments ``(atom, stride)``."""

    cdim: int
    segs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _SizeRef:
    """The ``size()`` / ``shape`` of a tracked tensor: reading its channel entry freezes the channels."""

    info: _Info
    ndim: int


@dataclass(frozen=True)
class _Const:
    """A tensor attribute read with ``get_attr`` (a parameter or buffer used in a function)."""

    target: str


@dataclass
class _Use:
    """One call of a module (or one use of an attribute) that slices tensors along a group."""

    module: str
    role: str
    entries: list[tuple[int, int, int]]  # (atom, offset, stride)
    tensors: list[tuple[str, int]]  # (tensor name, dim)
    full: int
    groups: int = 1  # > 1: the dims are the virtual input axis of a grouped conv weight (see TensorSlice)


def _shape_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, torch.Size):
        return None
    if isinstance(value, list):
        return [_shape_meta(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_shape_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _shape_meta(v) for k, v in value.items()}
    return None


def _default_cdim(ndim: int) -> int | None:
    if ndim == 0:
        return None
    if ndim == 1:
        return 0
    if ndim == 3:
        return 2
    return 1


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _prod(xs: Iterable[int]) -> int:
    return math.prod(int(x) for x in xs)


class _Analysis(fx.Interpreter):
    """Runs the traced graph once and applies a channel rule per node."""

    def __init__(self, gm: fx.GraphModule, leaf_reasons: Mapping[str, str]) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # fx's structured-trace logging imports inductor (seconds) on errors
        self.gm = gm
        self.mods = dict(gm.named_modules())
        self.leaf_reasons = dict(leaf_reasons)
        self.parent: list[int] = []
        self.size: list[int] = []
        self.label: list[str] = []
        self.order: list[tuple[int, ...]] = []
        self.base: list[tuple[str, int]] = []  # (label of the original atom, start inside it)
        self.members: dict[int, list[int]] = {}  # union-find root -> leaf atoms of the class
        self.children: dict[int, list[int]] = {}  # split atom -> consecutive sub-atoms
        self.ancestor: dict[int, int] = {}
        self.reasons: dict[int, list[str]] = {}
        self.labels_used: dict[str, int] = {}
        self.infos: dict[fx.Node, Any] = {}
        self.meta: dict[fx.Node, Any] = {}
        self.uses: list[_Use] = []
        self.mac_terms: list[tuple[str, float]] = []  # (weight tensor name, multiplier over the batch)
        self.macs_const = 0.0
        self.literals: list[tuple[str, tuple[Any, ...], int, tuple[tuple[int, int], ...]]] = []
        self.output_meta: Any = None
        # grouped convs: (module, groups, layout entries, full width, where) for their input and output layouts
        self.blocks: list[tuple[str, int, list[tuple[int, int, int]], int, str]] = []
        self.batch = 1
        self.batch_found = False

    # -- atoms: union-find over leaf atoms, with refinement (an atom may be split into sub-ranges) ----------

    def _add(self, size: int, label: str, order: tuple[int, ...], base: tuple[str, int]) -> int:
        a = len(self.parent)
        self.parent.append(a)
        self.size.append(int(size))
        self.label.append(label)
        self.order.append(order)
        self.base.append(base)
        self.members[a] = [a]
        return a

    def new_atom(self, size: int, label: str, reason: str | None = None) -> int:
        k = self.labels_used.get(label, 0)
        self.labels_used[label] = k + 1
        name = label if k == 0 else f"{label}#{k + 1}"
        a = self._add(size, name, (len(self.parent),), (name, 0))
        if reason:
            self.reasons.setdefault(a, []).append(reason)
        return a

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union_leaves(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo
            self.members[lo].extend(self.members.pop(hi))

    def leaves(self, atom: int, start: int = 0) -> list[tuple[int, int]]:
        """Leaf atoms of ``atom`` with their first channel inside it."""
        kids = self.children.get(atom)
        if not kids:
            return [(atom, start)]
        out: list[tuple[int, int]] = []
        for k in kids:
            out.extend(self.leaves(k, start))
            start += self.size[k]
        return out

    def ensure_cut(self, atom: int, c: int) -> None:
        """Make channel ``c`` of ``atom`` start a sub-atom (splitting its whole class of leaves if needed)."""
        if c <= 0 or c >= self.size[atom]:
            return
        kids = self.children.get(atom)
        if kids:
            start = 0
            for k in kids:
                if start < c < start + self.size[k]:
                    self.ensure_cut(k, c - start)
                    return
                start += self.size[k]
            return
        firsts, seconds = [], []
        for x in list(self.members[self.find(atom)]):
            label, b0 = self.base[x]
            parts = []
            for lo, hi in ((0, c), (c, self.size[x])):
                name = f"{label}[{b0 + lo}:{b0 + hi}]"
                child = self._add(hi - lo, name, (*self.order[x], lo), (label, b0 + lo))
                self.ancestor[child] = x
                parts.append(child)
            self.children[x] = parts
            firsts.append(parts[0])
            seconds.append(parts[1])
        for group in (firsts, seconds):
            for other in group[1:]:
                self.union_leaves(group[0], other)

    def leaf_segs(self, segs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(leaf, s) for a, s in segs for leaf, _ in self.leaves(a)]

    def boundaries(self, segs: Sequence[tuple[int, int]]) -> set[int]:
        out, pos = set(), 0
        for leaf, s in self.leaf_segs(segs):
            out.add(pos)
            pos += self.size[leaf] * s
        return out

    def cut_at(self, segs: Sequence[tuple[int, int]], positions: Iterable[int]) -> bool:
        """Split the atoms of a layout at element positions; False if one falls inside a strided channel."""
        spans, pos = [], 0
        for a, s in segs:
            spans.append((pos, pos + self.size[a] * s, a, s))
            pos += self.size[a] * s
        for p in positions:
            for lo, hi, a, s in spans:
                if lo < p < hi:
                    if (p - lo) % s:
                        return False
                    self.ensure_cut(a, (p - lo) // s)
        return True

    def align(self, x: Sequence[tuple[int, int]], y: Sequence[tuple[int, int]]) -> bool:
        """Union two layouts of equal length channel by channel, refining atoms as needed."""
        for _ in range(64):
            bx, by = self.boundaries(x), self.boundaries(y)
            if bx == by:
                break
            if not (self.cut_at(x, by - bx) and self.cut_at(y, bx - by)):
                return False
        lx, ly = self.leaf_segs(x), self.leaf_segs(y)
        if len(lx) != len(ly) or any(sa != sb or self.size[a] != self.size[b] for (a, sa), (b, sb) in zip(lx, ly)):
            return False
        for (a, _), (b, _) in zip(lx, ly):
            self.union_leaves(a, b)
        return True

    def sub_layout(self, info: _Info, lo: int, hi: int) -> tuple[tuple[int, int], ...] | None:
        """The segments covering element positions ``lo … hi`` of a layout (refining atoms at the ends)."""
        if not self.cut_at(info.segs, (lo, hi)):
            return None
        out, pos = [], 0
        for leaf, s in self.leaf_segs(info.segs):
            end = pos + self.size[leaf] * s
            if lo <= pos and end <= hi:
                out.append((leaf, s))
            pos = end
        return tuple(out)

    def freeze_atoms(self, atoms: Iterable[int], reason: str) -> None:
        for a in atoms:
            self.reasons.setdefault(a, []).append(reason)

    def freeze(self, obj: Any, reason: str) -> None:
        self.freeze_atoms((a for info in _iter_infos(obj) for a, _ in info.segs), reason)

    def union_infos(self, infos: Sequence[_Info], where: str) -> bool:
        """Union layouts channel by channel; on a layout mismatch freeze them all and return False."""
        first = infos[0]
        for other in infos[1:]:
            if self.width(other) != self.width(first) or not self.align(first.segs, other.segs):
                self.freeze(list(infos), f"tensors with different channel layouts meet {where}")
                return False
        return True

    def entries(self, info: _Info) -> list[tuple[int, int, int]]:
        out, off = [], 0
        for a, s in info.segs:
            out.append((a, off, s))
            off += self.size[a] * s
        return out

    def width(self, info: _Info) -> int:
        return sum(self.size[a] * s for a, s in info.segs)

    # -- helpers ---------------------------------------------------------------------------------------------

    def where(self, n: fx.Node) -> str:
        stack = n.meta.get("nn_module_stack")
        if n.op == "call_module":
            return f"at {n.target}"
        if stack:
            path = list(stack.values())[-1][0]
            return f"at {path} (node {n.name})"
        return f"at node {n.name}"

    def fresh(self, meta: Any, label: str, reason: str) -> Any:
        """New frozen atoms for every tensor in an output structure."""
        if isinstance(meta, tuple) and all(isinstance(x, int) for x in meta):
            cd = _default_cdim(len(meta))
            if cd is None:
                return None
            return _Info(cd, ((self.new_atom(meta[cd], label, reason), 1),))
        if isinstance(meta, (tuple, list)):
            return type(meta)(self.fresh(m, label, reason) for m in meta)
        if isinstance(meta, dict):
            return {k: self.fresh(m, label, reason) for k, m in meta.items()}
        return None

    def info_of(self, a: Any) -> Any:
        return self.infos.get(a) if isinstance(a, fx.Node) else None

    def meta_of(self, a: Any) -> Any:
        return self.meta.get(a) if isinstance(a, fx.Node) else None

    def tensor_info(self, a: Any) -> _Info | None:
        i = self.info_of(a)
        return i if isinstance(i, _Info) else None

    def layout_for(self, info: _Info | None, meta: Any, cdim: int, size: int, label: str, where: str,
                   allow_stride: bool) -> list[tuple[int, int, int]]:
        """Entries of a consumer's input along ``cdim``; an unusable layout is frozen and replaced."""
        ok = (info is not None and isinstance(meta, tuple) and _norm_dim(info.cdim, len(meta)) == cdim
              and self.width(info) == size and (allow_stride or all(s == 1 for _, s in info.segs)))
        if ok:
            assert info is not None
            return self.entries(info)
        if info is not None:
            self.freeze(info, f"channel layout not understood by consumer {where}")
        return [(self.new_atom(size, f"{label}:in", f"input layout not understood {where}"), 0, 1)]

    def add_use(self, module: str, role: str, entries: list[tuple[int, int, int]],
                tensors: Sequence[tuple[str, int]], full: int, groups: int = 1) -> None:
        mod = self.mods.get(module)
        present = []
        for tname, dim in tensors:
            if mod is not None and "." not in tname:
                if getattr(mod, tname, None) is None or not isinstance(getattr(mod, tname), torch.Tensor):
                    continue
                present.append((f"{module}.{tname}", dim))
            else:
                present.append((tname, dim))
        self.uses.append(_Use(module, role, list(entries), present, int(full), groups))

    # -- interpreter hook ------------------------------------------------------------------------------------

    def run_node(self, n: fx.Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as exc:
            raise AutoPruneError(
                f"running the model on the example input failed at node {n.name} ({_target_name(n)}): "
                f"{type(exc).__name__}: {exc}",
                hint="pass an example input of the shape and dtype the model expects") from exc
        self.meta[n] = _shape_meta(value)
        try:
            self.infos[n] = self.rule(n, value)
        except AutoPruneError:
            raise
        except Exception as exc:  # a rule bug must not break analysis: freeze conservatively instead
            reason = f"analysis rule failed {self.where(n)} ({type(exc).__name__}: {exc})"
            self.freeze([self.info_of(a) for a in _node_args(n)], reason)
            self.infos[n] = self.fresh(self.meta[n], f"{n.name}:out", reason)
        return value

    def rule(self, n: fx.Node, value: Any) -> Any:
        if n.op == "placeholder":
            if isinstance(value, torch.Tensor) and value.dim() > 0 and not self.batch_found:
                self.batch, self.batch_found = int(value.shape[0]), True
            return self.fresh(self.meta[n], f"input:{n.name}", f"model input {n.name}")
        if n.op == "get_attr":
            return _Const(str(n.target)) if isinstance(value, torch.Tensor) else None
        if n.op == "output":
            self.output_meta = self.meta[n]
            self.freeze([self.info_of(a) for a in _node_args(n)], "model output")
            return None
        if n.target is not operator.getitem:
            for a in _node_args(n):
                ref = self.infos.get(a)
                if isinstance(ref, _SizeRef):
                    self.freeze(ref.info, f"shape of a tensor used by {_target_name(n)} {self.where(n)}")
        if n.op == "call_module":
            return self.call_module_rule(n, value)
        if n.op == "call_function":
            return self.call_function_rule(n, value)
        if n.op == "call_method":
            return self.call_method_rule(n, value)
        return self.unknown(n, value, f"unknown node kind {n.op} {self.where(n)}")

    def unknown(self, n: fx.Node, value: Any, reason: str) -> Any:
        self.freeze([self.info_of(a) for a in _node_args(n)], reason)
        label = f"{n.target}:out" if n.op == "call_module" else f"{n.name}:out"
        return self.fresh(self.meta[n], label, reason)

    # -- modules ---------------------------------------------------------------------------------------------

    def call_module_rule(self, n: fx.Node, value: Any) -> Any:
        name = str(n.target)
        mod = self.mods[name]
        if name in self.leaf_reasons:
            return self.unknown(n, value, self.leaf_reasons[name])
        if isinstance(mod, _CONV_TYPES):
            return self.conv(n, name, mod)
        if isinstance(mod, nn.Linear):
            return self.linear(n, name, mod)
        if isinstance(mod, _BN_TYPES):
            return self.norm(n, name, 1, _NORM_TENSORS, value)
        if isinstance(mod, nn.LayerNorm):
            if len(mod.normalized_shape) != 1:
                return self.unknown(n, value, f"LayerNorm over {len(mod.normalized_shape)} dims {self.where(n)}")
            return self.norm(n, name, -1, (("weight", 0), ("bias", 0)), value)
        if isinstance(mod, nn.GroupNorm):
            if mod.num_groups not in (1, mod.num_channels):
                return self.unknown(n, value, f"GroupNorm with {mod.num_groups} groups {self.where(n)}")
            return self.norm(n, name, 1, (("weight", 0), ("bias", 0)), value)
        if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
            return self.norm(n, name, 1, (("weight", 0),), value)
        if isinstance(mod, nn.Embedding):
            return self.embedding(n, name, mod)
        if isinstance(mod, nn.Flatten):
            return self.reshape(n, value)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            return self.softmax(n, value, mod.dim)
        if isinstance(mod, nn.PReLU) or type(mod) in _PASS_TYPES or isinstance(mod, _PASS_TYPES):
            return self.unary(n, value)
        if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)):
            return self.unary(n, value)
        return self.unknown(n, value, f"unknown module {type(mod).__name__} {self.where(n)}")

    def conv(self, n: fx.Node, name: str, mod: nn.Module) -> Any:
        x = n.args[0]
        info, meta = self.tensor_info(x), self.meta_of(x)
        out_meta = self.meta[n]
        cin, cout, g = mod.in_channels, mod.out_channels, mod.groups
        self.mac_terms.append((f"{name}.weight", float(_prod(out_meta) / cout)))
        where = self.where(n)
        if g == 1:
            entries = self.layout_for(info, meta, 1, cin, name, where, allow_stride=False)
            self.add_use(name, "in", entries, [("weight", 1)], cin)
            atom = self.new_atom(cout, f"{name}:out")
            self.add_use(name, "out", [(atom, 0, 1)], [("weight", 0), ("bias", 0)], cout)
            return _Info(1, ((atom, 1),))
        if g == cin == cout and info is not None and isinstance(meta, tuple) \
                and _norm_dim(info.cdim, len(meta)) == 1 and all(s == 1 for _, s in info.segs):
            self.add_use(name, "dw", self.entries(info), [("weight", 0), ("bias", 0)], cout)
            return _Info(1, info.segs)
        # Grouped conv (1 < g, not depthwise; a conv with out_channels == 1 has g == 1, and g == out != in is
        # grouped too): input block i (C_in/g channels) feeds only output block i (C_out/g channels). Both
        # layouts get an "equal kept count per block" constraint, resolved into group divisors by _finalize.
        entries = self.layout_for(info, meta, 1, cin, name, where, allow_stride=False)
        self.add_use(name, "in", entries, [("weight", 1)], cin, groups=g)
        atom = self.new_atom(cout, f"{name}:out")
        self.add_use(name, "out", [(atom, 0, 1)], [("weight", 0), ("bias", 0)], cout)
        label = f"grouped conv {name} (groups={g}, in={cin}, out={cout})"
        self.blocks.append((label, g, list(entries), cin, "input"))
        self.blocks.append((label, g, [(atom, 0, 1)], cout, "output"))
        return _Info(1, ((atom, 1),))

    def linear(self, n: fx.Node, name: str, mod: nn.Linear) -> Any:
        x = n.args[0]
        info, meta = self.tensor_info(x), self.meta_of(x)
        out_meta = self.meta[n]
        nd = len(out_meta)
        self.mac_terms.append((f"{name}.weight", float(_prod(out_meta) / mod.out_features)))
        entries = self.layout_for(info, meta, nd - 1, mod.in_features, name, self.where(n), allow_stride=True)
        self.add_use(name, "in", entries, [("weight", 1)], mod.in_features)
        atom = self.new_atom(mod.out_features, f"{name}:out")
        self.add_use(name, "out", [(atom, 0, 1)], [("weight", 0), ("bias", 0)], mod.out_features)
        return _Info(nd - 1, ((atom, 1),))

    def functional_layer(self, n: fx.Node, value: Any, conv: bool) -> Any:
        """``F.linear`` / ``F.conv*d`` with parameter attributes (``get_attr``): a producer and a consumer.

        Returns None (the caller then freezes) for anything else: computed weights, grouped convs.
        """
        w_arg = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        b_arg = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        groups = n.args[6] if conv and len(n.args) > 6 else n.kwargs.get("groups", 1)
        w, b = self.info_of(w_arg), self.info_of(b_arg) if b_arg is not None else None
        w_meta = self.meta_of(w_arg)
        if not isinstance(w, _Const) or (b_arg is not None and not isinstance(b, _Const)) or groups != 1 \
                or not isinstance(value, torch.Tensor) or not isinstance(w_meta, tuple):
            return None
        x = n.args[0]
        info, meta = self.tensor_info(x), self.meta_of(x)
        cout, cin = w_meta[0], w_meta[1]
        name = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target
        cdim = 1 if conv else value.dim() - 1
        self.mac_terms.append((w.target, float(value.numel() / cout)))
        entries = self.layout_for(info, meta, cdim, cin, name, self.where(n), allow_stride=not conv)
        self.uses.append(_Use(name, "in", entries, [(w.target, 1)], cin))
        atom = self.new_atom(cout, f"{name}:out")
        tensors = [(w.target, 0)] + ([(b.target, 0)] if isinstance(b, _Const) else [])
        self.uses.append(_Use(name, "out", [(atom, 0, 1)], tensors, cout))
        return _Info(cdim, ((atom, 1),))

    def norm(self, n: fx.Node, name: str, cdim: int, tensors: Sequence[tuple[str, int]], value: Any) -> Any:
        x = n.args[0]
        info, meta = self.tensor_info(x), self.meta_of(x)
        if info is None or not isinstance(meta, tuple) or _norm_dim(info.cdim, len(meta)) != _norm_dim(
                cdim, len(meta)) or (cdim == 1 and any(s != 1 for _, s in info.segs)):
            return self.unknown(n, value, f"normalisation over a dimension that is not the channel dim "
                                          f"{self.where(n)}")
        self.add_use(name, "norm", self.entries(info), tensors, self.width(info))
        return _Info(info.cdim, info.segs)

    def embedding(self, n: fx.Node, name: str, mod: nn.Embedding) -> Any:
        out_meta = self.meta[n]
        vocab = self.new_atom(mod.num_embeddings, f"{name}:vocab", f"embedding vocabulary {self.where(n)}")
        self.add_use(name, "param", [(vocab, 0, 1)], [("weight", 0)], mod.num_embeddings)
        atom = self.new_atom(mod.embedding_dim, f"{name}:out")
        self.add_use(name, "out", [(atom, 0, 1)], [("weight", 1)], mod.embedding_dim)
        return _Info(len(out_meta) - 1, ((atom, 1),))

    # -- generic rules ---------------------------------------------------------------------------------------

    def first_tensor(self, n: fx.Node) -> tuple[Any, _Info | None, Any]:
        x = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
        return x, self.tensor_info(x), self.meta_of(x)

    def unary(self, n: fx.Node, value: Any) -> Any:
        _, info, meta = self.first_tensor(n)
        out = self.meta[n]
        if info is None or not isinstance(value, torch.Tensor) or not isinstance(meta, tuple):
            return self.unknown(n, value, f"unknown use of {_target_name(n)} {self.where(n)}")
        c = _norm_dim(info.cdim, len(meta))
        if len(out) != len(meta) or out[c] != meta[c]:
            return self.unknown(n, value, f"{_target_name(n)} changes the channel dim {self.where(n)}")
        return info

    def binary(self, n: fx.Node, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return self.unknown(n, value, f"unknown use of {_target_name(n)} {self.where(n)}")
        out = tuple(value.shape)
        nd = len(out)
        full: list[_Info] = []
        consts: list[tuple[str, tuple[int, ...]]] = []
        od: int | None = None
        for a in list(n.args) + list(n.kwargs.values()):
            i, m = self.info_of(a), self.meta_of(a)
            if isinstance(i, _Const) and isinstance(m, tuple):
                consts.append((i.target, m))
                continue
            if not isinstance(i, _Info) or not isinstance(m, tuple):
                continue
            c = _norm_dim(i.cdim, len(m))
            aligned = c + nd - len(m)
            if m[c] == 1 and out[aligned] != 1:
                continue  # broadcast along the channel dim: no channel coupling
            if m[c] != out[aligned] or (od is not None and aligned != od):
                return self.unknown(n, value, f"broadcast across the channel dim {self.where(n)}")
            od = aligned
            full.append(_Info(aligned, i.segs))
        if od is None:
            return self.unknown(n, value, f"{_target_name(n)} creates a channel dim {self.where(n)}")
        if len(full) > 1 and not self.union_infos(full, self.where(n)):
            return _Info(od, full[0].segs)
        info = _Info(od, full[0].segs)
        for target, m in consts:
            k = od - (nd - len(m))
            if k >= 0 and m[k] != 1:
                if m[k] != out[od]:
                    self.freeze(info, f"constant {target} of another size {self.where(n)}")
                    continue
                self.uses.append(_Use(target, "param", self.entries(info), [(target, k)], m[k]))
        return info

    def cat(self, n: fx.Node, value: Any) -> Any:
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", n.kwargs.get("axis", 0))
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or not isinstance(value, torch.Tensor):
            return self.unknown(n, value, f"unknown use of cat {self.where(n)}")
        infos = [self.tensor_info(t) for t in tensors]
        metas = [self.meta_of(t) for t in tensors]
        nd = value.dim()
        if any(i is None for i in infos) or any(not isinstance(m, tuple) or len(m) != nd for m in metas):
            return self.unknown(n, value, f"cat of untracked tensors {self.where(n)}")
        cds = {_norm_dim(i.cdim, nd) for i in infos if i is not None}
        if len(cds) != 1:
            return self.unknown(n, value, f"cat of tensors with different channel dims {self.where(n)}")
        cd = cds.pop()
        valid = [i for i in infos if i is not None]
        if _norm_dim(dim, nd) == cd:
            return _Info(cd, tuple(s for i in valid for s in i.segs))
        self.union_infos([_Info(cd, i.segs) for i in valid], self.where(n))
        return _Info(cd, valid[0].segs)

    def split(self, n: fx.Node, value: Any, method: str) -> Any:
        _, info, meta = self.first_tensor(n)
        if method in ("unbind",):
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        else:
            dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
        if info is None or not isinstance(meta, tuple) or not isinstance(dim, int) \
                or not isinstance(value, (tuple, list)):
            return self.unknown(n, value, f"unknown use of {method} {self.where(n)}")
        nd = len(meta)
        c = _norm_dim(info.cdim, nd)
        d = _norm_dim(dim, nd)
        if d == c:
            return self.channel_split(n, value, method, info)
        new_c = c - 1 if method == "unbind" and d < c else c
        return tuple(_Info(new_c, info.segs) for _ in value)

    def channel_split(self, n: fx.Node, value: Any, method: str, info: _Info) -> Any:
        """``split``/``chunk`` on channels: each piece is a sub-layout; equal pieces of ``chunk`` are tied."""
        sizes = [int(v.shape[info.cdim]) for v in value]
        arg = n.args[1] if len(n.args) > 1 else n.kwargs.get("split_size_or_sections", n.kwargs.get("chunks"))
        explicit = method in ("split", "split_with_sizes") and isinstance(arg, (list, tuple)) and all(
            isinstance(v, int) for v in arg)
        equal = (method == "chunk" and isinstance(arg, int)) or (method == "split" and isinstance(arg, int))
        if not (explicit or (equal and len(set(sizes)) == 1)):
            return self.unknown(n, value, f"{method} on the channel dim {self.where(n)}")
        pieces, pos = [], 0
        for size in sizes:
            segs = self.sub_layout(info, pos, pos + size)
            if segs is None:
                return self.unknown(n, value, f"{method} inside a flattened channel {self.where(n)}")
            pieces.append(segs)
            pos += size
        if equal:
            for other in pieces[1:]:
                self.align(pieces[0], other)
            if method == "split":  # split(x, size): the size itself follows the (tied) pieces' width
                self.literals.append((n.name, ("args", 1), sizes[0], pieces[0]))
        else:
            path = ("args", 1) if len(n.args) > 1 else ("kwargs", "split_size_or_sections")
            for i, segs in enumerate(pieces):
                self.literals.append((n.name, (*path, i), sizes[i], segs))
        return tuple(_Info(info.cdim, segs) for segs in pieces)

    def reshape(self, n: fx.Node, value: Any) -> Any:
        _, info, meta = self.first_tensor(n)
        if info is None or not isinstance(value, torch.Tensor) or not isinstance(meta, tuple):
            return self.unknown(n, value, f"unknown use of {_target_name(n)} {self.where(n)}")
        src, dst = list(meta), list(value.shape)
        c = _norm_dim(info.cdim, len(src))
        pre, chan, post = _prod(src[:c]), src[c], _prod(src[c + 1:])
        for k in range(len(dst)):
            if _prod(dst[:k]) != pre:
                continue
            if dst[k] == chan and _prod(dst[k + 1:]) == post:
                self.record_literal(n, k, info)
                return _Info(k, info.segs)
            if k == len(dst) - 1 and dst[k] == chan * post and post > 1:
                new = _Info(k, tuple((a, s * post) for a, s in info.segs))
                self.record_literal(n, k, new)
                return new
        return self.unknown(n, value, f"reshape that mixes the channel dim {tuple(src)} -> {tuple(dst)} "
                                      f"{self.where(n)}")

    def record_literal(self, n: fx.Node, k: int, info: _Info) -> None:
        """Remember a literal channel size in a view/reshape call so that apply can rewrite it."""
        if n.op == "call_module" or _target_name(n) not in ("view", "reshape"):
            return
        args = n.args[1:]
        if len(args) == 1 and isinstance(args[0], (tuple, list)):
            shape, path = list(args[0]), ("args", 1)
        elif "shape" in n.kwargs and isinstance(n.kwargs["shape"], (tuple, list)):
            shape, path = list(n.kwargs["shape"]), ("kwargs", "shape")
        else:
            shape, path = list(args), ("args",)
        if k < len(shape) and isinstance(shape[k], int) and shape[k] != -1:
            full_path = (*path, k) if path != ("args",) else ("args", k + 1)
            self.literals.append((n.name, full_path, shape[k], info.segs))

    def reduce(self, n: fx.Node, value: Any) -> Any:
        _, info, meta = self.first_tensor(n)
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if info is None or dims is None or not isinstance(value, torch.Tensor) or not isinstance(meta, tuple):
            return self.unknown(n, value, f"reduction over all dims {self.where(n)}")
        dl = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dl):
            return self.unknown(n, value, f"reduction over dynamic dims {self.where(n)}")
        nd = len(meta)
        c = _norm_dim(info.cdim, nd)
        ds = {_norm_dim(d, nd) for d in dl}
        if c in ds:
            return self.unknown(n, value, f"reduction over the channel dim {self.where(n)}")
        new_c = c if keep else c - sum(1 for d in ds if d < c)
        if value.dim() <= new_c or value.shape[new_c] != meta[c]:
            return self.unknown(n, value, f"reduction with unexpected shape {self.where(n)}")
        return _Info(new_c, info.segs)

    def permute(self, n: fx.Node, value: Any, transpose: bool) -> Any:
        _, info, meta = self.first_tensor(n)
        if info is None or not isinstance(meta, tuple) or not isinstance(value, torch.Tensor):
            return self.unknown(n, value, f"unknown use of {_target_name(n)} {self.where(n)}")
        nd = len(meta)
        c = _norm_dim(info.cdim, nd)
        rest = list(n.args[1:])
        if transpose:
            if _target_name(n) == "t":
                d0, d1 = 0, 1
            else:
                d0 = rest[0] if rest else n.kwargs.get("dim0")
                d1 = rest[1] if len(rest) > 1 else n.kwargs.get("dim1")
            if not isinstance(d0, int) or not isinstance(d1, int):
                return self.unknown(n, value, f"dynamic transpose {self.where(n)}")
            d0, d1 = _norm_dim(d0, nd), _norm_dim(d1, nd)
            new_c = d1 if c == d0 else d0 if c == d1 else c
        else:
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest or n.kwargs.get("dims")
            if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
                return self.unknown(n, value, f"dynamic permute {self.where(n)}")
            new_c = [_norm_dim(d, nd) for d in dims].index(c)
        return _Info(new_c, info.segs)

    def softmax(self, n: fx.Node, value: Any, dim: Any) -> Any:
        _, info, meta = self.first_tensor(n)
        if info is None or not isinstance(meta, tuple) or not isinstance(dim, int):
            return self.unknown(n, value, f"unknown use of softmax {self.where(n)}")
        if _norm_dim(dim, len(meta)) == _norm_dim(info.cdim, len(meta)):
            return self.unknown(n, value, f"softmax over the channel dim {self.where(n)}")
        return self.unary(n, value)

    def getitem(self, n: fx.Node, value: Any) -> Any:
        base, idx = n.args[0], n.args[1]
        binfo = self.info_of(base)
        if isinstance(binfo, (tuple, list)):
            return binfo[idx] if isinstance(idx, int) and -len(binfo) <= idx < len(binfo) else self.unknown(
                n, value, f"dynamic index into a tuple {self.where(n)}")
        if isinstance(binfo, dict):
            return binfo.get(idx)
        if isinstance(binfo, _SizeRef):
            return self.size_item(n, binfo, idx)
        if not isinstance(binfo, _Info):
            if isinstance(binfo, _Const) or isinstance(value, torch.Tensor):
                return self.unknown(n, value, f"indexing an untracked tensor {self.where(n)}")
            return None
        meta = self.meta_of(base)
        new_c = _index_channel_dim(idx, len(meta), _norm_dim(binfo.cdim, len(meta)))
        if new_c is None or not isinstance(value, torch.Tensor) or value.shape[new_c] != meta[binfo.cdim]:
            return self.unknown(n, value, f"indexing along the channel dim {self.where(n)}")
        return _Info(new_c, binfo.segs)

    def pad(self, n: fx.Node, value: Any) -> Any:
        _, info, meta = self.first_tensor(n)
        pads = n.args[1] if len(n.args) > 1 else n.kwargs.get("pad")
        if info is None or not isinstance(meta, tuple) or not isinstance(pads, (tuple, list)) \
                or not all(isinstance(p, int) for p in pads):
            return self.unknown(n, value, f"unknown use of pad {self.where(n)}")
        c = _norm_dim(info.cdim, len(meta))
        k = len(meta) - 1 - c  # pads[2k:2k+2] apply to the channel dim
        if 2 * k + 1 >= len(pads) or (pads[2 * k] == 0 and pads[2 * k + 1] == 0):
            return self.unary(n, value)
        mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
        fill = n.args[3] if len(n.args) > 3 else n.kwargs.get("value")
        if mode != "constant" or fill not in (None, 0, 0.0) or min(pads[2 * k], pads[2 * k + 1]) < 0 \
                or any(s != 1 for _, s in info.segs):
            return self.unknown(n, value, f"channel pad (F.pad mode={mode}, value={fill}) {self.where(n)}")
        # Zero channels padded on the channel dim are new atoms (no producer); the pad amounts follow their
        # widths, so a residual add can couple them with a producer's channels (option-A shortcuts).
        path = ("args", 1) if len(n.args) > 1 else ("kwargs", "pad")
        segs: list[tuple[int, int]] = []
        for side, idx in (("lo", 2 * k), ("hi", 2 * k + 1)):
            if pads[idx] == 0:
                continue
            atom = self.new_atom(pads[idx], f"{n.name}:pad_{side}")
            self.literals.append((n.name, (*path, idx), pads[idx], ((atom, 1),)))
            segs.append((atom, 1))
        lo_part = segs[:1] if pads[2 * k] else []
        hi_part = segs[-1:] if pads[2 * k + 1] else []
        return _Info(c, (*lo_part, *info.segs, *hi_part))

    def count_macs(self, n: fx.Node, value: Any, kind: str) -> None:
        args = [self.meta_of(a) for a in n.args]
        if not isinstance(value, torch.Tensor):
            return
        numel = value.numel()
        if kind == "matmul" and isinstance(args[0], tuple) and len(args[0]) >= 1:
            self.macs_const += numel * args[0][-1]
        elif kind == "sdpa" and all(isinstance(a, tuple) for a in args[:3]):
            q, k, v = args[:3]
            rows = _prod(q[:-1])
            self.macs_const += rows * k[-2] * q[-1] + rows * k[-2] * v[-1]
        elif kind == "linear" and len(args) > 1 and isinstance(args[1], tuple):
            self.macs_const += numel * args[1][-1]
        elif kind == "conv" and len(args) > 1 and isinstance(args[1], tuple):
            self.macs_const += numel * _prod(args[1][1:])

    # -- dispatch --------------------------------------------------------------------------------------------

    def call_function_rule(self, n: fx.Node, value: Any) -> Any:
        t = n.target
        if t is operator.getitem:
            return self.getitem(n, value)
        if t is getattr:
            return self.attribute(n, value)
        if t is operator.setitem:
            return self.unknown(n, value, f"slice assignment (setitem) {self.where(n)}")
        for funcs, handler in self.function_rules():
            if t in funcs:
                return handler(n, value)
        if t in _FUNC_LINEAR or t in _FUNC_CONV:
            out = self.functional_layer(n, value, conv=t in _FUNC_CONV)
            if out is not None:
                return out
        for funcs, kind in ((_MATMUL_FUNCS, "matmul"), (_SDPA_FUNCS, "sdpa"), (_FUNC_LINEAR, "linear"),
                            (_FUNC_CONV, "conv")):
            if t in funcs:
                self.count_macs(n, value, kind)
                return self.unknown(n, value, f"{_target_name(n)} {self.where(n)}")
        return self.unknown(n, value, f"unknown op {_target_name(n)} {self.where(n)}")

    def function_rules(self) -> list[tuple[set[Any], Any]]:
        """Function targets and the rule that handles them (first match wins)."""
        def softmax(n: fx.Node, value: Any) -> Any:
            return self.softmax(n, value, n.args[1] if len(n.args) > 1 else n.kwargs.get("dim"))

        return [
            (_BINARY_FUNCS, self.binary),
            (_UNARY_FUNCS, self.unary),
            (_CAT_FUNCS, self.cat),
            (_SPLIT_FUNCS, lambda n, v: self.split(n, v, getattr(n.target, "__name__", "split"))),
            (_RESHAPE_FUNCS, self.reshape),
            (_REDUCE_FUNCS, self.reduce),
            (_PERMUTE_FUNCS, lambda n, v: self.permute(n, v, transpose=False)),
            (_TRANSPOSE_FUNCS, lambda n, v: self.permute(n, v, transpose=True)),
            (_SOFTMAX_FUNCS, softmax),
            (_PAD_FUNCS, self.pad),
        ]

    def call_method_rule(self, n: fx.Node, value: Any) -> Any:
        m = str(n.target)
        if m in _SIZE_METHODS:
            return self.size_query(n, m)
        if m in _BINARY_METHODS:
            return self.binary(n, value)
        if m in _UNARY_METHODS:
            return self.unary(n, value)
        if m in _SPLIT_METHODS:
            return self.split(n, value, m)
        if m in _RESHAPE_METHODS:
            return self.reshape(n, value)
        if m in _REDUCE_METHODS:
            return self.reduce(n, value)
        if m == "permute":
            return self.permute(n, value, transpose=False)
        if m in ("transpose", "swapaxes", "swapdims", "t"):
            return self.permute(n, value, transpose=True)
        if m in ("softmax", "log_softmax"):
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            return self.softmax(n, value, dim)
        if m in _MATMUL_METHODS:
            self.count_macs(n, value, "matmul")
        return self.unknown(n, value, f"unknown op Tensor.{m} {self.where(n)}")

    def size_query(self, n: fx.Node, method: str) -> Any:
        """``x.size()``, ``x.size(d)``, ``x.numel()`` …: channel counts must not leak into other ops."""
        info, meta = self.tensor_info(n.args[0]), self.meta_of(n.args[0])
        if info is None or not isinstance(meta, tuple):
            return None
        c = _norm_dim(info.cdim, len(meta))
        if method in ("numel", "nelement"):
            self.freeze(info, f"element count read {self.where(n)}")
            return None
        if method != "size":
            return None
        d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if d is None:
            return _SizeRef(info, len(meta))
        if not isinstance(d, int) or _norm_dim(d, len(meta)) == c:
            self.freeze(info, f"channel count read by size() {self.where(n)}")
        return None

    def size_item(self, n: fx.Node, ref: _SizeRef, idx: Any) -> Any:
        c = _norm_dim(ref.info.cdim, ref.ndim)
        dims = range(ref.ndim)
        hit = (_norm_dim(idx, ref.ndim) == c) if isinstance(idx, int) else (
            c in dims[idx] if isinstance(idx, slice) and all(
                isinstance(v, (int, type(None))) for v in (idx.start, idx.stop, idx.step)) else True)
        if hit:
            self.freeze(ref.info, f"channel count read from the shape {self.where(n)}")
        return None

    def attribute(self, n: fx.Node, value: Any) -> Any:
        attr = n.args[1] if len(n.args) > 1 else None
        if attr in _SHAPE_ATTRS:
            info, meta = self.tensor_info(n.args[0]), self.meta_of(n.args[0])
            return _SizeRef(info, len(meta)) if info is not None and isinstance(meta, tuple) else None
        if not isinstance(value, torch.Tensor):
            return None
        info = self.tensor_info(n.args[0])
        if attr == "data" and info is not None:
            return info
        return self.unknown(n, value, f"tensor attribute {attr} {self.where(n)}")


def _index_channel_dim(idx: Any, ndim: int, cdim: int) -> int | None:
    """Where the channel dim goes after ``x[idx]``; None when the index touches the channels."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(not isinstance(i, (slice, int, type(None), type(Ellipsis))) for i in items):
        return None  # advanced indexing (tensors, lists) or a dynamic integer index
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (ndim - consumed))
        else:
            expanded.append(i)
    in_dim = out_dim = 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if in_dim == cdim:
            full = isinstance(i, slice) and i.start in (None, 0) and i.stop is None and i.step in (None, 1)
            return out_dim if full else None
        if isinstance(i, slice):
            out_dim += 1
        in_dim += 1
    return out_dim + (cdim - in_dim)


def _node_args(n: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) or a)
    return found


def _iter_infos(obj: Any) -> Iterator[_Info]:
    if isinstance(obj, _Info):
        yield obj
    elif isinstance(obj, _SizeRef):
        yield obj.info
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _iter_infos(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _iter_infos(o)


def _target_name(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", repr(t))
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    return f"torch.{name}" if mod.startswith("torch") or mod == "" else f"{mod}.{name}"


def _resolve_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _clone_module(mod: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """Copy a module, taking tensors from ``memo``; plain torch.nn leaves get a fast shallow copy."""
    if mod._modules or not type(mod).__module__.startswith("torch.nn.modules"):
        return copy.deepcopy(mod, memo)
    new = copy.copy(mod)
    for key, val in list(new.__dict__.items()):
        if isinstance(val, dict):
            new.__dict__[key] = type(val)(val)
    new._parameters = {k: (memo.get(id(v), v) if v is not None else None) for k, v in mod._parameters.items()}
    new._buffers = {k: (memo.get(id(v), v) if v is not None else None) for k, v in mod._buffers.items()}
    return new


# ----------------------------------------------------------------------------------------------------------------
# GroupSet
# ----------------------------------------------------------------------------------------------------------------


class GroupSet:
    """The channel groups of one model, in execution order, plus everything needed to slice and price them.

    Iterating yields every :class:`ChannelGroup` (frozen ones included) in execution order. ``gs[id]`` looks a
    group up (unknown ids raise :class:`~autoprune.errors.ConfigError` with close matches).

    Attributes:
        graph_module: The traced ``torch.fx.GraphModule`` (it shares its submodules with the analysed model).
        example_input: The example input the analysis ran on.
        output_shapes: Shapes of the model outputs (nested like the outputs).
        tensor_dims: ``tensor name -> {dim: [(group id, offset, stride), ...]}`` for every sliced tensor.
        grouped_dims: ``tensor name -> {dim: groups}`` for the input dim of grouped conv weights, whose
            ``tensor_dims`` entries count along the virtual ``C_in`` axis (see :class:`TensorSlice`).
        exported_modules: Modules rebuilt through the ``torch.export`` front-end (``""`` = the whole model).
        module_roles: ``(module, role) -> [(group id, offset, stride), ...]`` and the full size, per role.
        literals: Literal sizes in ``view``/``reshape`` calls that depend on widths.
        cost_terms: Closed-form cost rows (see :class:`CostTerms`).
        batch_size: Batch size of the example input (MACs are reported per sample).
    """

    def __init__(self, groups: Sequence[ChannelGroup], graph_module: fx.GraphModule, example_input: Any, *,
                 output_shapes: Any, tensor_dims: dict[str, dict[int, list[tuple[str, int, int]]]],
                 tensor_shapes: dict[str, tuple[int, ...]],
                 module_roles: dict[tuple[str, str], tuple[int, list[tuple[str, int, int]]]],
                 literals: Sequence[LiteralSite], cost_terms: CostTerms | None, batch_size: int,
                 aliases: dict[str, list[str]], grouped_dims: dict[str, dict[int, int]] | None = None) -> None:
        self._groups = list(groups)
        self._by_id = {g.id: g for g in self._groups}
        self.graph_module = graph_module
        self.example_input = example_input
        self.output_shapes = output_shapes
        self.tensor_dims = tensor_dims
        self.tensor_shapes = tensor_shapes
        self.module_roles = module_roles
        self.literals = list(literals)
        self.cost_terms = cost_terms
        self.batch_size = batch_size
        self.aliases = aliases
        self.grouped_dims = dict(grouped_dims or {})
        self.exported_modules: list[str] = []  # modules rebuilt through torch.export ("" = the whole model)
        self._canon = {n: c for c, names in aliases.items() for n in names}
        self.prunable_ids = [g.id for g in self._groups if g.prunable]
        self._cost_cache: dict[str, Any] = {}

    # -- mapping interface -------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, gid: object) -> bool:
        return gid in self._by_id

    def __getitem__(self, gid: str) -> ChannelGroup:
        try:
            return self._by_id[gid]
        except KeyError:
            raise ConfigError(f"unknown channel group {gid!r}", hint=_close_hint(gid, list(self._by_id))) from None

    def __repr__(self) -> str:
        return f"GroupSet({len(self)} groups, {len(self.prunable_ids)} prunable)"

    def ids(self) -> list[str]:
        """All group ids in execution order."""
        return [g.id for g in self._groups]

    def prunable(self) -> list[ChannelGroup]:
        """Groups that may be pruned, in execution order."""
        return [g for g in self._groups if g.prunable]

    def frozen(self) -> list[ChannelGroup]:
        """Groups that may not be pruned."""
        return [g for g in self._groups if not g.prunable]

    @property
    def input_shape(self) -> Any:
        """Shape(s) of the example input."""
        return _shape_meta(self.example_input)

    def full_widths(self) -> dict[str, int]:
        """Every prunable group at its full width."""
        return {g.id: g.size for g in self.prunable()}

    def layers(self) -> list[str]:
        """Every module that appears in a group, in execution order."""
        seen: dict[str, None] = {}
        for g in sorted(self._groups, key=lambda g: g.index):
            for m in g.members:
                seen.setdefault(m.module, None)
        return list(seen)

    def group_of(self, layer: str, role: str = "out") -> ChannelGroup:
        """The group of a layer's output channels (``role="out"``) or input channels (``role="in"``).

        For ``role="out"``, normalisation and depthwise layers answer the group they pass through.

        Raises:
            ConfigError: If the layer is unknown, or its input channels span several groups (after a concat).
        """
        roles = ("out", "dw", "norm") if role == "out" else (role,)
        found = [g for g in self._groups for m in g.members if m.module == layer and m.role in roles]
        uniq = list(dict.fromkeys(g.id for g in found))
        if not uniq:
            known = self.layers()
            raise ConfigError(f"layer {layer!r} has no {role} channel group", hint=_close_hint(layer, known))
        if len(uniq) > 1:
            raise ConfigError(f"the {role} channels of layer {layer!r} span several groups: {uniq}",
                              hint="address the groups by id instead")
        return self._by_id[uniq[0]]

    # -- tensors ---------------------------------------------------------------------------------------------

    def canonical(self, name: str) -> str:
        """Canonical name of a parameter or buffer (tied tensors have several names)."""
        return self._canon.get(name, name)

    def tensors_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The current parameters and buffers of ``model`` under the analysis' canonical names.

        ``model`` is the analysed model, its traced graph module, or any module with the same architecture
        (same names and shapes), e.g. a fine-tuned copy.

        Raises:
            AutoPruneError: If a tensor is missing or has another shape (a different architecture).
        """
        if model is self.graph_module:
            named = dict(model.named_parameters(remove_duplicate=False))
            named.update(model.named_buffers(remove_duplicate=False))
        else:
            named = dict(model.state_dict(keep_vars=True))
            named.update(model.named_parameters(remove_duplicate=False))
            named.update(model.named_buffers(remove_duplicate=False))
        out: dict[str, torch.Tensor] = {}
        for canon, names in self.aliases.items():
            t = next((named[a] for a in names if a in named), None)
            if t is None:
                raise AutoPruneError(f"{type(model).__name__} has no tensor {canon!r}, which the analysed model has",
                                     hint="apply widths to the model that was analysed (or a copy of it)")
            if tuple(t.shape) != self.tensor_shapes[canon]:
                raise AutoPruneError(
                    f"{canon} has shape {tuple(t.shape)} but the analysed model had {self.tensor_shapes[canon]}",
                    hint="analyse the model again after changing its architecture")
            out[canon] = t
        return out

    def instantiate(self, model: nn.Module, transform: Any = None) -> fx.GraphModule:
        """A new graph module with the traced structure and (transformed) copies of ``model``'s tensors.

        Args:
            model: Source of the tensor values (see :meth:`tensors_of`).
            transform: ``f(canonical name, tensor) -> tensor`` applied to every parameter and buffer; the
                default clones. Tied tensors stay tied; nothing is shared with ``model``.
        """
        src = self.tensors_of(model)
        gm = self.graph_module
        memo: dict[int, Any] = {}
        made: dict[str, Any] = {}
        with torch.no_grad():
            for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(
                    gm.named_buffers(remove_duplicate=False)):
                if id(t) in memo:
                    continue
                c = self._canon[name]
                if c not in made:
                    v = src[c].detach()
                    v = transform(c, v) if transform is not None else v
                    if v.data_ptr() == src[c].data_ptr():
                        v = v.clone()
                    if isinstance(t, nn.Parameter):
                        v = nn.Parameter(v, requires_grad=t.requires_grad)
                    made[c] = v
                memo[id(t)] = made[c]
        root: dict[str, Any] = {}
        for node in gm.graph.nodes:
            if node.op not in ("call_module", "get_attr") or node.target in root:
                continue
            obj = _resolve_attr(gm, str(node.target))
            if isinstance(obj, nn.Module):
                root[node.target] = _clone_module(obj, memo)
            elif isinstance(obj, torch.Tensor):
                root[node.target] = memo.get(id(obj), obj)
            else:
                root[node.target] = copy.deepcopy(obj)
        new = fx.GraphModule(root, copy.deepcopy(gm.graph), type(gm).__name__)
        flags = {n: m.training for n, m in gm.named_modules()}
        for n, m in new.named_modules():
            m.training = flags.get(n, gm.training)
        return new

    # -- reports ---------------------------------------------------------------------------------------------

    def describe(self) -> str:
        """A readable table: one row per group (id, size, prunable, members, MACs, params, reason)."""
        rows = [("id", "size", "state", "members", "MACs", "params", "reason")]
        for g in self._groups:
            state = ("prunable" + (f" (step {g.divisor})" if g.divisor > 1 else "")) if g.prunable else "frozen"
            mem = ", ".join(f"{m.module}:{m.role}" for m in g.members[:4]) + (
                f" (+{len(g.members) - 4})" if len(g.members) > 4 else "")
            rows.append((g.id, str(g.size), state, mem, f"{g.macs:,}", f"{g.params:,}", g.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = []
        for k, r in enumerate(rows):
            lines.append("  ".join(r[i].ljust(widths[i]) for i in range(6)) + "  " + r[6])
            if k == 0:
                lines.append("-" * (sum(widths) + 12 + 6))
        n_p = len(self.prunable_ids)
        lines.append(f"{len(self)} groups, {n_p} prunable, {len(self) - n_p} frozen")
        return "\n".join(lines)

    explain = describe

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description of the groups (deterministic for a given model)."""
        return {
            "input_shape": self.input_shape,
            "groups": [
                {
                    "id": g.id, "size": g.size, "prunable": g.prunable, "frozen": g.frozen, "reason": g.reason,
                    "divisor": g.divisor, "min_width": g.min_width, "macs": g.macs, "params": g.params,
                    "members": [[m.module, m.role, m.offset, m.stride] for m in g.members],
                }
                for g in self._groups
            ],
        }


# ----------------------------------------------------------------------------------------------------------------
# analyze
# ----------------------------------------------------------------------------------------------------------------


def analyze(model: nn.Module, example_input: Any, *, keep_widths_of: Iterable[str] = (),
            opaque: Iterable[Any] = (), use_export: bool = True) -> GroupSet:
    """Find the channel groups of ``model``.

    Args:
        model: The network. It is traced with ``torch.fx`` (submodules that cannot be traced become opaque
            leaves with frozen boundaries) and run once on ``example_input`` in eval mode under ``no_grad``;
            its parameters, buffers and training flags are left as they were.
        example_input: A tensor, a tuple of positional inputs, or any single structure (e.g. a dict).
        keep_widths_of: Module names (``fnmatch`` patterns) or group ids whose channel group must keep its
            width, e.g. ``["linear"]`` for a classifier.
        opaque: Module classes or names (patterns) analysed as leaves whose boundary channels are frozen.
        use_export: When ``torch.fx`` cannot trace the model or a submodule, try rebuilding it from
            ``torch.export`` (see the module docstring) before falling back to an opaque leaf.

    Returns:
        The :class:`GroupSet`.

    Raises:
        AutoPruneError: If the model cannot be traced at all, or a name in ``keep_widths_of`` / ``opaque``
            matches nothing.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"analyze() needs an nn.Module, got {type(model).__name__}")
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    exported: list[str] = []
    gm, leaf_reasons = _trace(model, list(opaque), args if use_export else None, exported)
    flags = {m: m.training for m in gm.modules()}
    flags.update({m: m.training for m in model.modules()})
    run_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    an = _Analysis(gm, leaf_reasons)
    try:
        gm.eval()
        with torch.no_grad():
            an.run(*run_args)
    except AutoPruneError:
        raise
    except Exception as exc:
        raise AutoPruneError(
            f"running {type(model).__name__} on the example input failed: {type(exc).__name__}: {exc}",
            hint="pass an example input of the shape and dtype the model expects",
        ) from exc
    finally:
        for m, t in flags.items():
            m.training = t
    _apply_keep(an, list(keep_widths_of))
    gs = _finalize(an, gm, example_input)
    gs.exported_modules = exported
    return gs


def _apply_keep(an: _Analysis, keep: list[str]) -> None:
    if not keep:
        return
    producers: dict[str, list[int]] = {}
    for u in an.uses:
        if u.role in ("out", "dw", "norm"):
            producers.setdefault(u.module, []).extend(a for a, _, _ in u.entries)
    labels = {an.label[a]: a for a in range(len(an.label))}
    for pat in keep:
        hits = [m for m in producers if fnmatch.fnmatchcase(m, pat)]
        if hits:
            for m in hits:
                an.freeze_atoms(producers[m], f"keep_widths_of {m}")
        elif pat in labels:
            an.freeze_atoms([labels[pat]], f"keep_widths_of {pat}")
        else:
            raise ConfigError(f"keep_widths_of entry {pat!r} matches no layer or group",
                              hint=_close_hint(pat, list(producers) + list(labels)))


def _canonical_names(gm: fx.GraphModule) -> tuple[dict[int, str], dict[str, str], dict[str, list[str]]]:
    """Map tensor identity -> canonical name, every name -> canonical name, canonical -> aliases."""
    by_id: dict[int, str] = {}
    canon: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        c = by_id.setdefault(id(t), name)
        canon[name] = c
        aliases.setdefault(c, []).append(name)
    return by_id, canon, aliases


def _tied_unions(an: _Analysis, canon: dict[str, str]) -> None:
    """Union the layouts of every tensor dim used by several calls (shared modules, tied parameters)."""
    per_dim: dict[tuple[str, int], list[_Use]] = {}
    for u in an.uses:
        for tname, dim in u.tensors:
            c = canon.get(tname)
            if c is not None:
                per_dim.setdefault((c, dim), []).append(u)
    for (tname, _dim), uses in per_dim.items():
        first = uses[0]
        for other in uses[1:]:
            if other is first or other.entries == first.entries:
                continue
            x = [(a, s) for a, _, s in first.entries]
            y = [(a, s) for a, _, s in other.entries]
            if first.full != other.full or not an.align(x, y):
                atoms = [a for u in (first, other) for a, _, _ in u.entries]
                an.freeze_atoms(atoms, f"{tname} is used with different channel layouts")


def _effective_reasons(an: _Analysis, leaf: int) -> list[str]:
    out: list[str] = []
    a: int | None = leaf
    while a is not None:
        out.extend(an.reasons.get(a, []))
        a = an.ancestor.get(a)
    return out


def _leaf_entries(an: _Analysis, entries: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    return [(leaf, off + start * s, s) for a, off, s in entries for leaf, start in an.leaves(a)]


def _resolve_blocks(an: _Analysis) -> dict[int, int]:
    """Turn the grouped convs' "equal kept count per block" constraints into group divisors (by class root).

    A layout of ``full`` channels split into ``g`` blocks is a list of (group, range of the group's channels)
    pieces. If every group's pieces have the same total length in every block and every piece is a union of the
    group's own equal blocks (divisor ``d``: blocks of ``size / d`` channels, each keeping ``width / d``), every
    block keeps the same number of channels whatever the widths: the group's divisor becomes ``lcm`` of what its
    pieces need. Otherwise (e.g. a concat whose parts straddle the conv's blocks unevenly) the channels of the
    layout are frozen with a reason, and so is a group whose divisor leaves no width below its size.
    """
    divisors: dict[int, int] = {}
    why: dict[int, str] = {}
    for label, g, entries, full, side in an.blocks:
        q = full // g
        leaves = _leaf_entries(an, entries)
        lens: dict[int, list[int]] = {}
        cuts: dict[int, set[int]] = {}
        for leaf, off, _s in leaves:
            r, size = an.find(leaf), an.size[leaf]
            per, cut = lens.setdefault(r, [0] * g), cuts.setdefault(r, {size})
            pos = off
            while pos < off + size:
                i = pos // q
                end = min(off + size, (i + 1) * q)
                per[i] += end - pos
                cut.add(pos - off)
                pos = end
        if any(s != 1 for _, _, s in leaves) or any(len(set(v)) > 1 for v in lens.values()):
            an.freeze_atoms([leaf for leaf, _, _ in leaves],
                            f"{label}: its {side} channel blocks mix channel groups unevenly, so equal per-group "
                            f"pruning cannot be expressed")
            continue
        for r, cut in cuts.items():
            d = an.size[r] // math.gcd(*cut)
            if d > 1 and math.lcm(divisors.get(r, 1), d) != divisors.get(r, 1):
                divisors[r] = math.lcm(divisors.get(r, 1), d)
                why[r] = f"{label} {side}"
    for r, d in divisors.items():
        if d == an.size[r]:
            an.freeze_atoms([r], f"{why[r]}: equal per-group pruning leaves no width below {d} (one channel per "
                                 f"block)")
    return divisors


def _finalize(an: _Analysis, gm: fx.GraphModule, example_input: Any) -> GroupSet:
    _, canon, aliases = _canonical_names(gm)
    _tied_unions(an, canon)
    divisors = _resolve_blocks(an)
    leaves = [a for a in range(len(an.parent)) if a not in an.children]
    classes: dict[int, list[int]] = {}
    for leaf in leaves:
        classes.setdefault(an.find(leaf), []).append(leaf)
    first = {r: min(m, key=lambda a: an.order[a]) for r, m in classes.items()}
    order = sorted(classes, key=lambda r: an.order[first[r]])  # execution order of the first producer
    gid = {r: an.label[first[r]] for r in order}
    frozen_reasons: dict[int, list[str]] = {r: [] for r in order}
    for r in order:
        for leaf in sorted(classes[r], key=lambda a: an.order[a]):
            for reason in _effective_reasons(an, leaf):
                if reason not in frozen_reasons[r]:
                    frozen_reasons[r].append(reason)
    members: dict[int, dict[Member, None]] = {r: {} for r in order}
    slices: dict[int, dict[TensorSlice, None]] = {r: {} for r in order}
    tensor_dims: dict[str, dict[int, dict[tuple[str, int, int], None]]] = {}
    grouped_dims: dict[str, dict[int, int]] = {}
    module_roles: dict[tuple[str, str], tuple[int, list[tuple[str, int, int]]]] = {}
    for u in an.uses:
        ents = _leaf_entries(an, u.entries)
        module_roles.setdefault((u.module, u.role), (u.full, [(gid[an.find(a)], off, s) for a, off, s in ents]))
        if u.groups > 1:
            for tname, dim in u.tensors:
                grouped_dims.setdefault(canon.get(tname, tname), {})[dim] = u.groups
        for a, off, s in ents:
            r = an.find(a)
            members[r].setdefault(Member(u.module, u.role, off, s), None)
            for tname, dim in u.tensors:
                c = canon.get(tname, tname)
                slices[r].setdefault(TensorSlice(c, dim, off, s, u.role, u.module, u.groups), None)
                tensor_dims.setdefault(c, {}).setdefault(dim, {}).setdefault((gid[r], off, s), None)
    tshapes = {c: tuple(t.shape) for c, t in ((canon[n], t) for n, t in list(gm.named_parameters())
                                                + list(gm.named_buffers()))}
    tdims = {t: {d: list(e) for d, e in dims.items()} for t, dims in tensor_dims.items()}
    sizes = {gid[r]: an.size[first[r]] for r in order}
    groups = []
    for k, r in enumerate(order):
        reasons = frozen_reasons[r]
        reason = "; ".join(reasons[:_MAX_REASONS]) + (f" (+{len(reasons) - _MAX_REASONS} more)"
                                                      if len(reasons) > _MAX_REASONS else "")
        groups.append(ChannelGroup(id=gid[r], size=sizes[gid[r]], members=tuple(members[r]), frozen=bool(reasons),
                                   reason=reason, divisor=divisors.get(r, 1), slices=tuple(slices[r]), index=k))
    prunable = {g.id for g in groups if g.prunable}
    literals = []
    for node, path, base, segs in an.literals:
        terms: dict[str, int] = {}
        for leaf, s in an.leaf_segs(segs):
            g = gid[an.find(leaf)]
            if g in prunable:
                terms[g] = terms.get(g, 0) + s
        literals.append(LiteralSite(node, path, base, tuple(sorted(terms.items()))))
    from autoprune import cost as _cost

    prunable_ids = [g.id for g in groups if g.prunable]
    terms_obj = _cost.build_terms(prunable_ids, sizes, tdims, tshapes, an.mac_terms, an.macs_const / an.batch,
                                  an.batch, {canon[n] for n, _ in gm.named_parameters()}, module_roles, canon,
                                  grouped=grouped_dims)
    gs = GroupSet(groups, gm, example_input, output_shapes=an.output_meta, tensor_dims=tdims,
                  tensor_shapes=tshapes, module_roles=module_roles, literals=literals, cost_terms=terms_obj,
                  batch_size=an.batch, aliases=aliases, grouped_dims=grouped_dims)
    _cost.annotate_groups(gs)
    return gs
