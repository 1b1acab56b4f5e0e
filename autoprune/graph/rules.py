"""Per-op channel rules and the tables that dispatch graph nodes to them (ENGINE.md §2.2).

A rule is a function ``rule(an, n, value)``: ``an`` is the running :class:`~autoprune.graph.state.Analysis`,
``n`` the fx node and ``value`` what the node computed on the example input. It returns the node's channel
layout (an :class:`~autoprune.graph.layout.Info`, a nested structure of them, a shape read, or None) and records
what pruning needs through the analysis' state API (atoms, unions, uses, literals, MAC terms, block constraints).
Anything without a rule goes to :func:`unknown`, which freezes the channels it touches.

Dispatch: :data:`MODULE_RULES` (first ``isinstance`` match, in order), :data:`FUNCTION_RULES` (by function
object), :data:`WRAPPED_FUNCTION_RULES` (other libraries' ``torch.fx.wrap`` functions, by qualified name) and
:data:`METHOD_RULES` (by tensor method name). Adding an op means writing its rule here and listing it
in one of these tables. The attention rules (heads, ``nn.MultiheadAttention``, ``expand``, ``einsum``, Swin's
wrapped window attention, MACs of parameter-free attention ops) live in :mod:`autoprune.graph.attention`; an op
without a rule falls back to :func:`autoprune.graph.fallback.unknown` (frozen, its MACs measured).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from autoprune.graph import attention
from autoprune.graph.common import node_args, norm_dim, prod, target_name
from autoprune.graph.fallback import unknown
from autoprune.graph.layout import Const, Info, Segments, SizeRef
from autoprune.graph.state import Analysis

__all__ = [
    "FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "WRAPPED_FUNCTION_RULES", "ChannelBlocks", "ChannelCount",
    "Rule", "apply_rule", "qualified_name", "unknown",
]

#: ``rule(analysis, node, value) -> layout``.
Rule = Callable[["Analysis", fx.Node, Any], Any]


# ----------------------------------------------------------------------------------------------------------------
# Op sets
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
_FUNC_BATCH_NORM = _funcs(("batch_norm", "instance_norm"), F)
_FUNC_GROUP_NORM = _funcs(("group_norm",), F)
_FUNC_LAYER_NORM = _funcs(("layer_norm",), F)

_UNARY_METHODS = frozenset(_UNARY_NAMES) | {"type", "cpu", "cuda", "requires_grad_"}
_BINARY_METHODS = frozenset(_BINARY_NAMES) | {"__add__", "__mul__", "__sub__", "__truediv__"}
_SPLIT_METHODS = frozenset({"split", "chunk", "tensor_split", "unbind", "split_with_sizes"})
_RESHAPE_METHODS = frozenset({"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"})
_REDUCE_METHODS = frozenset({"mean", "sum", "amax", "amin", "std", "var"})
_SIZE_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement", "get_device"})
_SHAPE_ATTRS = frozenset({"shape"})
_MATMUL_METHODS = frozenset({"matmul", "bmm", "mm"})
_TRANSPOSE_METHODS = frozenset({"transpose", "swapaxes", "swapdims", "t"})
_SOFTMAX_METHODS = frozenset({"softmax", "log_softmax"})

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
_PAD_TYPES = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)

# Parameters and buffers sliced per role, by module type: (attribute, dim).
_NORM_TENSORS = (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0))
_AFFINE_TENSORS = (("weight", 0), ("bias", 0))


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def apply_rule(an: Analysis, n: fx.Node, value: Any) -> Any:
    """The channel layout of node ``n`` (which computed ``value``), from the rule its op dispatches to."""
    if n.op == "placeholder":
        an.observe_input(value)
        return an.fresh(an.meta_of(n), f"input:{n.name}", f"model input {n.name}")
    if n.op == "get_attr":
        return Const(str(n.target)) if isinstance(value, torch.Tensor) else None
    _guard_special(an, n)  # channel counts and channel blocks freeze unless the node's rule understands them
    if n.op == "output":
        an.observe_output(an.meta_of(n))
        an.freeze([an.info_of(a) for a in node_args(n)], "model output")
        return None
    if n.target is not operator.getitem:
        for a in node_args(n):
            ref = an.info_of(a)
            if isinstance(ref, SizeRef):
                an.freeze(ref.info, f"shape of a tensor used by {target_name(n)} {an.where(n)}")
    if n.op == "call_module":
        return _call_module(an, n, value)
    if n.op == "call_function":
        return _call_function(an, n, value)
    if n.op == "call_method":
        return _call_method(an, n, value)
    return unknown(an, n, value, f"unknown node kind {n.op} {an.where(n)}")


def _call_module(an: Analysis, n: fx.Node, value: Any) -> Any:
    name = str(n.target)
    mod = an.mods[name]
    if name in an.leaf_reasons:
        return unknown(an, n, value, an.leaf_reasons[name])
    for types, rule in MODULE_RULES:
        if isinstance(mod, types):
            return rule(an, n, value)
    return unknown(an, n, value, f"unknown module {type(mod).__name__} {an.where(n)}")


def _call_function(an: Analysis, n: fx.Node, value: Any) -> Any:
    rule = FUNCTION_RULES.get(n.target)
    if rule is None:
        rule = WRAPPED_FUNCTION_RULES.get(qualified_name(n.target))
    if rule is not None:
        return rule(an, n, value)
    return unknown(an, n, value, f"unknown op {target_name(n)} {an.where(n)}")


def _call_method(an: Analysis, n: fx.Node, value: Any) -> Any:
    m = str(n.target)
    rule = METHOD_RULES.get(m)
    if rule is not None:
        return rule(an, n, value)
    return unknown(an, n, value, f"unknown op Tensor.{m} {an.where(n)}")


# ----------------------------------------------------------------------------------------------------------------
# Layers: producers and consumers
# ----------------------------------------------------------------------------------------------------------------


def _module(an: Analysis, n: fx.Node) -> tuple[str, Any]:
    name = str(n.target)
    return name, an.mods[name]


def conv(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``nn.Conv*d``: a consumer of its input and a producer (depthwise: pass-through; grouped: block rules).

    ``groups == 1``: input channels are weight columns, so a strided input layout (a channel owning ``s``
    consecutive input channels, e.g. after a channel shuffle or a depth-multiplier conv) slices ``s`` columns per
    channel. Depthwise (``groups == C_in == C_out``): per-position filters follow the input layout. Depth
    multiplier ``m`` (``groups == C_in``, ``C_out = m·C_in``): input channel ``i`` feeds output channels
    ``i·m … i·m + m − 1``, so the output layout is the input layout with every stride times ``m`` (members ``in``,
    without tensors, and ``out``, weight and bias rows) and pruning input channel ``i`` removes its ``m`` outputs;
    apply sets ``in_channels = groups`` to the kept input width and ``out_channels = m·`` that.
    """
    name, mod = _module(an, n)
    x = n.args[0]
    info, meta = an.tensor_info(x), an.meta_of(x)
    out_meta = an.meta_of(n)
    cin, cout, g = mod.in_channels, mod.out_channels, mod.groups
    an.add_mac_term(f"{name}.weight", float(prod(out_meta) / cout))
    where = an.where(n)
    if g == 1:
        entries = an.layout_for(info, meta, 1, cin, name, where, allow_stride=True)
        an.add_use(name, "in", entries, [("weight", 1)], cin)
        atom = an.new_atom(cout, f"{name}:out")
        an.add_use(name, "out", [(atom, 0, 1)], [("weight", 0), ("bias", 0)], cout)
        return Info(1, ((atom, 1),))
    if g == cin and cout % cin == 0:  # depthwise (m == 1) or depth multiplier m: one input channel per conv group
        m = cout // cin
        entries = an.layout_for(info, meta, 1, cin, name, where, allow_stride=True)
        if m == 1:
            an.add_use(name, "dw", entries, [("weight", 0), ("bias", 0)], cout)
            return Info(1, tuple((a, s) for a, _, s in entries))
        an.add_use(name, "in", entries, [], cin)
        an.add_use(name, "out", [(a, off * m, s * m) for a, off, s in entries], [("weight", 0), ("bias", 0)], cout)
        return Info(1, tuple((a, s * m) for a, _, s in entries))
    # Grouped conv (1 < g, not depthwise; a conv with out_channels == 1 has g == 1, and g == out != in is
    # grouped too): input block i (C_in/g channels) feeds only output block i (C_out/g channels). Both
    # layouts get an "equal kept count per block" constraint, resolved into group divisors at the end.
    entries = an.layout_for(info, meta, 1, cin, name, where, allow_stride=False)
    an.add_use(name, "in", entries, [("weight", 1)], cin, groups=g)
    atom = an.new_atom(cout, f"{name}:out")
    an.add_use(name, "out", [(atom, 0, 1)], [("weight", 0), ("bias", 0)], cout)
    label = f"grouped conv {name} (groups={g}, in={cin}, out={cout})"
    an.add_blocks(label, g, entries, cin, "input")
    an.add_blocks(label, g, [(atom, 0, 1)], cout, "output")
    return Info(1, ((atom, 1),))


def linear(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``nn.Linear``: a consumer of the last dim of its input (strided after a flatten) and a producer."""
    name, mod = _module(an, n)
    x = n.args[0]
    info, meta = an.tensor_info(x), an.meta_of(x)
    out_meta = an.meta_of(n)
    nd = len(out_meta)
    an.add_mac_term(f"{name}.weight", float(prod(out_meta) / mod.out_features))
    entries = an.layout_for(info, meta, nd - 1, mod.in_features, name, an.where(n), allow_stride=True)
    an.add_use(name, "in", entries, [("weight", 1)], mod.in_features)
    atom = an.new_atom(mod.out_features, f"{name}:out")
    an.add_use(name, "out", [(atom, 0, 1)], [("weight", 0), ("bias", 0)], mod.out_features)
    return Info(nd - 1, ((atom, 1),))


def _functional_layer(an: Analysis, n: fx.Node, value: Any, is_conv: bool) -> Any:
    """``F.linear`` / ``F.conv*d`` with parameter attributes (``get_attr``): a producer and a consumer.

    Returns None (the caller then freezes) for anything else: computed weights, grouped convs.
    """
    w_arg = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    b_arg = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    groups = n.args[6] if is_conv and len(n.args) > 6 else n.kwargs.get("groups", 1)
    w, b = an.info_of(w_arg), an.info_of(b_arg) if b_arg is not None else None
    w_meta = an.meta_of(w_arg)
    if not isinstance(w, Const) or (b_arg is not None and not isinstance(b, Const)) or groups != 1 \
            or not isinstance(value, torch.Tensor) or not isinstance(w_meta, tuple):
        return None
    x = n.args[0]
    info, meta = an.tensor_info(x), an.meta_of(x)
    cout, cin = w_meta[0], w_meta[1]
    name = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target
    cdim = 1 if is_conv else value.dim() - 1
    an.add_mac_term(w.target, float(value.numel() / cout))
    entries = an.layout_for(info, meta, cdim, cin, name, an.where(n), allow_stride=not is_conv)
    an.add_tensor_use(name, "in", entries, [(w.target, 1)], cin)
    atom = an.new_atom(cout, f"{name}:out")
    tensors = [(w.target, 0)] + ([(b.target, 0)] if isinstance(b, Const) else [])
    an.add_tensor_use(name, "out", [(atom, 0, 1)], tensors, cout)
    return Info(cdim, ((atom, 1),))


def functional_linear(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``F.linear`` on parameter attributes; otherwise its MACs are counted and its channels frozen."""
    out = _functional_layer(an, n, value, is_conv=False)
    return out if out is not None else _frozen_with_macs(an, n, value, "linear")


def functional_conv(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``F.conv*d`` on parameter attributes (groups = 1); otherwise MACs counted, channels frozen."""
    out = _functional_layer(an, n, value, is_conv=True)
    return out if out is not None else _frozen_with_macs(an, n, value, "conv")


def matmul(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``matmul`` / ``bmm`` / ``mm`` / ``@``: heads among the batch dims pass (:func:`attention.matmul`, MACs
    follow them); otherwise MACs counted as constant, channels frozen."""
    out = attention.matmul(an, n, value)
    return out if out is not None else _frozen_with_macs(an, n, value, "matmul")


def matmul_method(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``x.matmul(y)`` / ``x.bmm(y)`` / ``x.mm(y)``: as :func:`matmul`."""
    out = attention.matmul(an, n, value)
    if out is not None:
        return out
    _count_macs(an, n, value, "matmul")
    return unknown(an, n, value, f"unknown op Tensor.{n.target} {an.where(n)}", counted=True)


def sdpa(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``F.scaled_dot_product_attention``: heads pass (:func:`attention.sdpa`, MACs ``QKᵀ`` and ``AV`` follow
    them); otherwise MACs counted as constant, channels frozen."""
    out = attention.sdpa(an, n, value)
    return out if out is not None else _frozen_with_macs(an, n, value, "sdpa")


def _frozen_with_macs(an: Analysis, n: fx.Node, value: Any, kind: str) -> Any:
    _count_macs(an, n, value, kind)
    return unknown(an, n, value, f"{target_name(n)} {an.where(n)}", counted=True)


def _count_macs(an: Analysis, n: fx.Node, value: Any, kind: str) -> None:
    args = [an.meta_of(a) for a in n.args]
    if not isinstance(value, torch.Tensor):
        return
    numel = value.numel()
    if kind == "matmul" and isinstance(args[0], tuple) and len(args[0]) >= 1:
        an.add_const_macs(numel * args[0][-1])
    elif kind == "sdpa" and all(isinstance(a, tuple) for a in args[:3]):
        q, k, v = args[:3]
        rows = prod(q[:-1])
        an.add_const_macs(rows * k[-2] * q[-1] + rows * k[-2] * v[-1])
    elif kind == "linear" and len(args) > 1 and isinstance(args[1], tuple):
        an.add_const_macs(numel * args[1][-1])
    elif kind == "conv" and len(args) > 1 and isinstance(args[1], tuple):
        an.add_const_macs(numel * prod(args[1][1:]))


def _norm(an: Analysis, n: fx.Node, name: str, cdim: int, tensors: Sequence[tuple[str, int]], value: Any) -> Any:
    # A strided layout (a channel owning s consecutive positions: after a channel shuffle or a depth-multiplier
    # conv) slices s per-position parameters per channel.
    x = n.args[0]
    info, meta = an.tensor_info(x), an.meta_of(x)
    if info is None or not isinstance(meta, tuple) or norm_dim(info.cdim, len(meta)) != norm_dim(cdim, len(meta)):
        return unknown(an, n, value, f"normalisation over a dimension that is not the channel dim {an.where(n)}")
    an.add_use(name, "norm", an.entries(info), tensors, an.width(info))
    return Info(info.cdim, info.segs)


def batch_norm(an: Analysis, n: fx.Node, value: Any) -> Any:
    """BatchNorm / InstanceNorm over dim 1: a per-channel follower."""
    name, _ = _module(an, n)
    return _norm(an, n, name, 1, _NORM_TENSORS, value)


def layer_norm(an: Analysis, n: fx.Node, value: Any) -> Any:
    """LayerNorm over the last dim (the channels): a follower; over several dims: frozen."""
    name, mod = _module(an, n)
    if len(mod.normalized_shape) != 1:
        return unknown(an, n, value, f"LayerNorm over {len(mod.normalized_shape)} dims {an.where(n)}")
    return _norm(an, n, name, -1, _AFFINE_TENSORS, value)


def group_norm(an: Analysis, n: fx.Node, value: Any) -> Any:
    """GroupNorm with one group or one group per channel: a follower; otherwise frozen."""
    name, mod = _module(an, n)
    if mod.num_groups not in (1, mod.num_channels):
        return unknown(an, n, value, f"GroupNorm with {mod.num_groups} groups {an.where(n)}")
    return _norm(an, n, name, 1, _AFFINE_TENSORS, value)


# Functional norms (``F.batch_norm`` & co., e.g. in a norm subclass whose ``forward`` calls the functional op):
# ``(argument name, position)`` of each per-channel tensor; they must be parameter attributes (``get_attr``).
_FUNC_BN_TENSORS = (("running_mean", 1), ("running_var", 2), ("weight", 3), ("bias", 4))
_FUNC_AFFINE_TENSORS = (("weight", 2), ("bias", 3))


def _arg(n: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given positionally at ``pos`` or by keyword."""
    return n.args[pos] if len(n.args) > pos else n.kwargs.get(name, default)


def _attr_tensors(an: Analysis, n: fx.Node, spec: Sequence[tuple[str, int]]) -> list[tuple[str, Any]] | None:
    """``(target, shape)`` of the per-channel tensor arguments of a functional norm (absent ones skipped).

    None when one of them is not a parameter attribute (a computed tensor cannot be sliced).
    """
    out = []
    for name, pos in spec:
        a = _arg(n, pos, name)
        if a is None:
            continue
        ref = an.info_of(a)
        if not isinstance(ref, Const):
            return None
        out.append((ref.target, an.meta_of(a)))
    return out


def _functional_norm(an: Analysis, n: fx.Node, value: Any, cdim: int, tensors: Sequence[tuple[str, Any]],
                     what: str) -> Any:
    """A functional per-channel norm over ``cdim``: a follower whose attribute tensors are sliced on dim 0.

    The member is named after the attributes' owner (``bn`` for ``bn.weight``; the node name if they differ), so
    a norm subclass that calls the functional op is a ``norm`` member of its group like a ``torch.nn`` norm.
    """
    x = n.args[0] if n.args else n.kwargs.get("input")
    info, meta = an.tensor_info(x), an.meta_of(x)
    if info is None or not isinstance(meta, tuple) or not isinstance(value, torch.Tensor) or norm_dim(
            info.cdim, len(meta)) != norm_dim(cdim, len(meta)) or (cdim == 1 and any(s != 1 for _, s in info.segs)):
        return unknown(an, n, value, f"{what} over a dimension that is not the channel dim {an.where(n)}")
    width = an.width(info)
    if any(shape != (width,) for _, shape in tensors):
        return unknown(an, n, value, f"{what} with parameters of another size {an.where(n)}")
    if tensors:
        owners = {t.rsplit(".", 1)[0] if "." in t else "" for t, _ in tensors}
        name = owners.pop() if len(owners) == 1 and "" not in owners else n.name
        an.add_tensor_use(name, "norm", an.entries(info), [(t, 0) for t, _ in tensors], width)
    return Info(info.cdim, info.segs)


def functional_batch_norm(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``F.batch_norm`` / ``F.instance_norm`` over dim 1: a per-channel follower, as ``nn.BatchNorm*``.

    The running statistics, weight and bias must be parameter attributes (they are sliced with the channels);
    a computed one freezes the channels.
    """
    what = target_name(n)
    tensors = _attr_tensors(an, n, _FUNC_BN_TENSORS)
    if tensors is None:
        return unknown(an, n, value, f"{what} with computed per-channel tensors {an.where(n)}")
    return _functional_norm(an, n, value, 1, tensors, what)


def functional_group_norm(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``F.group_norm`` with one group or one group per channel: a follower, as ``nn.GroupNorm``; else frozen.

    One group per channel is exact (an instance norm; ``num_groups`` is rewritten to the kept width); one group
    normalises over all channels, so, as for ``nn.GroupNorm(1, C)``, the pruned model keeps shapes and costs but
    is not equal to the masked original (ENGINE.md §2.4).
    """
    x = n.args[0] if n.args else n.kwargs.get("input")
    info, meta = an.tensor_info(x), an.meta_of(x)
    groups = _arg(n, 1, "num_groups")
    tensors = _attr_tensors(an, n, _FUNC_AFFINE_TENSORS)
    if info is None or not isinstance(meta, tuple) or len(meta) < 2 or not isinstance(groups, int):
        return unknown(an, n, value, f"unknown use of group_norm {an.where(n)}")
    channels = meta[1]
    if groups not in (1, channels):
        return unknown(an, n, value, f"GroupNorm with {groups} groups {an.where(n)}")
    if tensors is None:
        return unknown(an, n, value, f"group_norm with computed per-channel tensors {an.where(n)}")
    out = _functional_norm(an, n, value, 1, tensors, "group_norm")
    if isinstance(out, Info) and groups == channels > 1 and out.cdim == info.cdim:
        path = ("args", 1) if len(n.args) > 1 else ("kwargs", "num_groups")
        an.add_literal(n.name, path, groups, info.segs)
    return out


def functional_layer_norm(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``F.layer_norm``: over the channel dim alone, a follower as ``nn.LayerNorm`` (``normalized_shape`` rewritten).

    Over trailing dims that exclude the channel dim (e.g. the width of a channels-first map) every channel is
    normalised on its own: the layout passes through (its parameters are not per channel). Over several dims
    including the channel dim: frozen, as ``nn.LayerNorm``.
    """
    x = n.args[0] if n.args else n.kwargs.get("input")
    info, meta = an.tensor_info(x), an.meta_of(x)
    shape = _arg(n, 1, "normalized_shape")
    if isinstance(shape, int):
        shape = (shape,)
    if info is None or not isinstance(meta, tuple) or not isinstance(shape, (tuple, list)) \
            or not 0 < len(shape) <= len(meta):
        return unknown(an, n, value, f"unknown use of layer_norm {an.where(n)}")
    nd, k = len(meta), len(shape)
    c = norm_dim(info.cdim, nd)
    if c < nd - k:
        return unary(an, n, value)
    if k == 1 and not isinstance(shape[0], int):
        return unknown(an, n, value, f"layer_norm over the channel dim with a computed shape {an.where(n)}")
    if k != 1:
        return unknown(an, n, value, f"LayerNorm over {k} dims {an.where(n)}")
    tensors = _attr_tensors(an, n, _FUNC_AFFINE_TENSORS)
    if tensors is None:
        return unknown(an, n, value, f"layer_norm with computed per-channel tensors {an.where(n)}")
    out = _functional_norm(an, n, value, -1, tensors, "layer_norm")
    if isinstance(out, Info):
        path = ("args", 1) if len(n.args) > 1 else ("kwargs", "normalized_shape")
        if isinstance(_arg(n, 1, "normalized_shape"), (tuple, list)):
            path = (*path, 0)
        an.add_literal(n.name, path, shape[0], info.segs)
    return out


def prelu(an: Analysis, n: fx.Node, value: Any) -> Any:
    """PReLU: per-channel slopes follow the channels; a single slope is element-wise."""
    name, mod = _module(an, n)
    if mod.num_parameters > 1:
        return _norm(an, n, name, 1, (("weight", 0),), value)
    return unary(an, n, value)


def embedding(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``nn.Embedding``: a producer of its embedding dim (the vocabulary is frozen)."""
    name, mod = _module(an, n)
    out_meta = an.meta_of(n)
    vocab = an.new_atom(mod.num_embeddings, f"{name}:vocab", f"embedding vocabulary {an.where(n)}")
    an.add_use(name, "param", [(vocab, 0, 1)], [("weight", 0)], mod.num_embeddings)
    atom = an.new_atom(mod.embedding_dim, f"{name}:out")
    an.add_use(name, "out", [(atom, 0, 1)], [("weight", 1)], mod.embedding_dim)
    return Info(len(out_meta) - 1, ((atom, 1),))


# ----------------------------------------------------------------------------------------------------------------
# Element-wise, concat, split, reshape, reductions, permutations
# ----------------------------------------------------------------------------------------------------------------


def _first_tensor(an: Analysis, n: fx.Node) -> tuple[Any, Info | None, Any]:
    x = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
    return x, an.tensor_info(x), an.meta_of(x)


def unary(an: Analysis, n: fx.Node, value: Any) -> Any:
    """Element-wise ops, pooling, dropout, casts: the layout passes through unless the channel dim changes.

    Channel blocks (:class:`ChannelBlocks`) pass through copies (``contiguous``, ``clone``, casts) only.
    """
    x, info, meta = _first_tensor(an, n)
    blocks = an.info_of(x)
    if isinstance(blocks, ChannelBlocks):
        if _op_name(n) in _BLOCK_COPIES and isinstance(value, torch.Tensor) and tuple(value.shape) == meta:
            return _blocks_out(an, n, value, blocks)
        return _fail(an, n, value, f"{target_name(n)} on channel blocks {an.where(n)}")
    out = an.meta_of(n)
    if info is None or not isinstance(value, torch.Tensor) or not isinstance(meta, tuple):
        return unknown(an, n, value, f"unknown use of {target_name(n)} {an.where(n)}")
    c = norm_dim(info.cdim, len(meta))
    if len(out) != len(meta) or out[c] != meta[c]:
        return unknown(an, n, value, f"{target_name(n)} changes the channel dim {an.where(n)}")
    return info


def binary(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``add``/``mul``/…: same-shape operands are unioned channel by channel (residuals).

    A constant attribute broadcast along the channels becomes a ``param`` member of the group. Arithmetic on a
    channel count read from a shape goes to :func:`count_arith`.
    """
    if any(isinstance(an.info_of(a), ChannelCount) for a in node_args(n)):
        return count_arith(an, n, value)
    if not isinstance(value, torch.Tensor):
        return unknown(an, n, value, f"unknown use of {target_name(n)} {an.where(n)}")
    out = tuple(value.shape)
    nd = len(out)
    full: list[Info] = []
    consts: list[tuple[str, tuple[int, ...]]] = []
    od: int | None = None
    for a in list(n.args) + list(n.kwargs.values()):
        i, m = an.info_of(a), an.meta_of(a)
        if isinstance(i, Const) and isinstance(m, tuple):
            consts.append((i.target, m))
            continue
        if not isinstance(i, Info) or not isinstance(m, tuple):
            continue
        c = norm_dim(i.cdim, len(m))
        aligned = c + nd - len(m)
        if m[c] == 1 and out[aligned] != 1:
            continue  # broadcast along the channel dim: no channel coupling
        if m[c] != out[aligned] or (od is not None and aligned != od):
            return unknown(an, n, value, f"broadcast across the channel dim {an.where(n)}")
        od = aligned
        full.append(Info(aligned, i.segs))
    if od is None:
        return unknown(an, n, value, f"{target_name(n)} creates a channel dim {an.where(n)}")
    if len(full) > 1 and not an.union_infos(full, an.where(n)):
        return Info(od, full[0].segs)
    info = Info(od, full[0].segs)
    for target, m in consts:
        k = od - (nd - len(m))
        if k >= 0 and m[k] != 1:
            if m[k] != out[od]:
                an.freeze(info, f"constant {target} of another size {an.where(n)}")
                continue
            an.add_tensor_use(target, "param", an.entries(info), [(target, k)], m[k])
    return info


def cat(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``cat`` on the channel dim concatenates the layouts; on another dim it unions them."""
    tensors = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", n.kwargs.get("axis", 0))
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or not isinstance(value, torch.Tensor):
        return unknown(an, n, value, f"unknown use of cat {an.where(n)}")
    infos = [an.tensor_info(t) for t in tensors]
    metas = [an.meta_of(t) for t in tensors]
    nd = value.dim()
    if any(i is None for i in infos) or any(not isinstance(m, tuple) or len(m) != nd for m in metas):
        return unknown(an, n, value, f"cat of untracked tensors {an.where(n)}")
    cds = {norm_dim(i.cdim, nd) for i in infos if i is not None}
    if len(cds) != 1:
        return unknown(an, n, value, f"cat of tensors with different channel dims {an.where(n)}")
    cd = cds.pop()
    valid = [i for i in infos if i is not None]
    if norm_dim(dim, nd) == cd:
        return Info(cd, tuple(s for i in valid for s in i.segs))
    an.union_infos([Info(cd, i.segs) for i in valid], an.where(n))
    return Info(cd, valid[0].segs)


def split(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``split``/``chunk``/``tensor_split``/``unbind`` (function or method); see :func:`_channel_split`."""
    method = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "split")
    _, info, meta = _first_tensor(an, n)
    if method in ("unbind",):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    else:
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    if info is None or not isinstance(meta, tuple) or not isinstance(dim, int) \
            or not isinstance(value, (tuple, list)):
        return unknown(an, n, value, f"unknown use of {method} {an.where(n)}")
    nd = len(meta)
    c = norm_dim(info.cdim, nd)
    d = norm_dim(dim, nd)
    if d == c:
        return _channel_split(an, n, value, method, info)
    new_c = c - 1 if method == "unbind" and d < c else c
    return tuple(Info(new_c, info.segs) for _ in value)


def _channel_split(an: Analysis, n: fx.Node, value: Any, method: str, info: Info) -> Any:
    """``split``/``chunk`` on channels: each piece is a sub-layout; equal pieces of ``chunk`` are tied."""
    sizes = [int(v.shape[info.cdim]) for v in value]
    arg = n.args[1] if len(n.args) > 1 else n.kwargs.get("split_size_or_sections", n.kwargs.get("chunks"))
    explicit = method in ("split", "split_with_sizes") and isinstance(arg, (list, tuple)) and all(
        isinstance(v, int) for v in arg)
    equal = (method == "chunk" and isinstance(arg, int)) or (method == "split" and isinstance(arg, int))
    if not (explicit or (equal and len(set(sizes)) == 1)):
        return unknown(an, n, value, f"{method} on the channel dim {an.where(n)}")
    pieces, pos = [], 0
    for size in sizes:
        segs = an.sub_layout(info, pos, pos + size)
        if segs is None:
            return unknown(an, n, value, f"{method} inside a flattened channel {an.where(n)}")
        pieces.append(segs)
        pos += size
    if equal:
        for other in pieces[1:]:
            an.align(pieces[0], other)
        if method == "split":  # split(x, size): the size itself follows the (tied) pieces' width
            an.add_literal(n.name, ("args", 1), sizes[0], pieces[0])
    else:
        path = ("args", 1) if len(n.args) > 1 else ("kwargs", "split_size_or_sections")
        for i, segs in enumerate(pieces):
            an.add_literal(n.name, (*path, i), sizes[i], segs)
    return tuple(Info(info.cdim, segs) for segs in pieces)


def reshape(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``view``/``reshape``/``flatten``/``(un)squeeze``: the channel dim moves or is flattened.

    Flattened with the dims after it, each channel spans their product (the stride); a literal channel size in
    the call is recorded for rewriting. A ``view``/``reshape`` that splits the channel dim into two dims ``(g, q)``
    gives :class:`ChannelBlocks` (the first step of a channel shuffle), and one that merges such blocks again
    gives a layout (:func:`_merge_blocks`). Channel counts among the sizes are checked (:func:`_check_counts`).
    """
    x = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
    blocks = an.info_of(x)
    out = _merge_blocks(an, n, value, blocks) if isinstance(blocks, ChannelBlocks) else _reshape(an, n, value)
    _check_counts(an, n, value, out)
    return out


def _reshape(an: Analysis, n: fx.Node, value: Any) -> Any:
    _, info, meta = _first_tensor(an, n)
    if info is None or not isinstance(value, torch.Tensor) or not isinstance(meta, tuple):
        return unknown(an, n, value, f"unknown use of {target_name(n)} {an.where(n)}")
    src, dst = list(meta), list(value.shape)
    c = norm_dim(info.cdim, len(src))
    pre, chan, post = prod(src[:c]), src[c], prod(src[c + 1:])
    for k in range(len(dst)):
        if prod(dst[:k]) != pre:
            continue
        if dst[k] == chan and prod(dst[k + 1:]) == post:
            _record_literal(an, n, k, info)
            return Info(k, info.segs)
        if k == len(dst) - 1 and dst[k] == chan * post and post > 1:
            new = Info(k, tuple((a, s * post) for a, s in info.segs))
            _record_literal(an, n, k, new)
            return new
    heads = attention.split_heads(an, n, info, src, dst)  # a token tensor's channels into (…, heads, head_dim)
    if heads is not None:
        _record_literal(an, n, *heads)
        return heads[1]
    for k in range(len(dst) - 1):  # the channel dim split into (g, q): channel blocks
        if prod(dst[:k]) == pre and dst[k] > 1 and dst[k + 1] > 1 and dst[k] * dst[k + 1] == chan \
                and prod(dst[k + 2:]) == post:
            return _view_blocks(an, n, value, info, k)
    return unknown(an, n, value, f"reshape that mixes the channel dim {tuple(src)} -> {tuple(dst)} {an.where(n)}")


def _shape_spec(n: fx.Node) -> tuple[list[Any], Callable[[int], tuple[Any, ...]]] | None:
    """The sizes given to a ``view``/``reshape`` call and the path of size ``k`` in the node (None for other ops)."""
    if n.op == "call_module" or target_name(n) not in ("view", "reshape", "torch.reshape"):
        return None
    args = n.args[1:]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return list(args[0]), lambda k: ("args", 1, k)
    key = "shape" if "shape" in n.kwargs else "size"
    if not args and isinstance(n.kwargs.get(key), (tuple, list)):
        return list(n.kwargs[key]), lambda k: ("kwargs", key, k)
    return list(args), lambda k: ("args", k + 1)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _record_literal(an: Analysis, n: fx.Node, k: int, info: Info) -> None:
    """Remember a literal channel size in a view/reshape call so that apply can rewrite it."""
    spec = _shape_spec(n)
    if spec is None:
        return
    shape, path = spec
    if k < len(shape) and _is_int(shape[k]) and shape[k] != -1:
        an.add_literal(n.name, path(k), shape[k], info.segs)


def _view_blocks(an: Analysis, n: fx.Node, value: Any, info: Info, k: int) -> Any:
    """A ``view``/``reshape`` of the channel dim into ``(g, q)`` at dims ``k, k + 1``: :class:`ChannelBlocks`.

    The block size ``q`` must be a literal (rewritten to the kept width of a block), ``-1`` or a channel count
    equal to ``C / g`` (checked when the blocks are merged, after tying them); the blocks themselves are tied only
    when a merge (:func:`_merge_blocks`) shows the pattern, so a split that leads elsewhere just freezes.
    """
    g, q = int(value.shape[k]), int(value.shape[k + 1])
    blocks = []
    for a in range(g):
        segs = an.sub_layout(info, a * q, (a + 1) * q)
        if segs is None:
            return unknown(an, n, value, f"reshape into channel blocks inside a flattened channel {an.where(n)}")
        blocks.append(segs)
    spec = _shape_spec(n)
    size = spec[0][k + 1] if spec is not None and k + 1 < len(spec[0]) else None
    ref = an.info_of(size) if isinstance(size, fx.Node) else None
    pending: tuple[ChannelCount, ...] = ()
    if isinstance(ref, ChannelCount):
        pending = (ref,)
    elif spec is not None and _is_int(size):
        if size != -1:
            an.add_literal(n.name, spec[1](k + 1), size, blocks[0])
    else:  # computed elsewhere (or view_as): it would not follow the block width
        return unknown(an, n, value, f"reshape into channel blocks with a block size that is not understood "
                                     f"{an.where(n)}")
    out = ChannelBlocks(info, tuple(blocks), k, k + 1, n.name, pending)
    return _blocks_out(an, n, value, out)


def _merge_blocks(an: Analysis, n: fx.Node, value: Any, blocks: ChannelBlocks) -> Any:
    """A ``view``/``reshape``/``flatten`` that merges the two block dims again: a channel shuffle or its inverse.

    Merged in block order (``(g, q)``) the channels are as before the split; transposed (``(q, g)``, the channel
    shuffle) channel ``a·q + b`` goes to position ``b·g + a``. Either way the ``g`` blocks are tied channel by
    channel (each keeps the same channels, so every block keeps the same count and the kept positions after the
    shuffle come in runs of ``g``): the result's layout is block 0's with every stride times ``g``. Dims after the
    merged pair may be flattened into it too (strides times their product).
    """
    meta = an.meta_of(n.args[0] if n.args else None)
    use = f"{target_name(n)} {an.where(n)}"
    if not isinstance(meta, tuple) or not isinstance(value, torch.Tensor) or abs(blocks.outer - blocks.inner) != 1:
        return _fail(an, n, value, f"reshape of channel blocks that does not merge them {an.where(n)}")
    lo = min(blocks.outer, blocks.inner)
    src, dst = list(meta), list(value.shape)
    g, pre, post = len(blocks.blocks), prod(src[:lo]), prod(src[lo + 2:])
    width = src[lo] * src[lo + 1]
    for k in range(len(dst)):
        if prod(dst[:k]) != pre:
            continue
        if dst[k] == width and prod(dst[k + 1:]) == post:
            extra = 1
        elif k == len(dst) - 1 and dst[k] == width * post and post > 1:
            extra = post
        else:
            continue
        if not all(an.align(blocks.blocks[0], other) for other in blocks.blocks[1:]):
            return _fail(an, n, value, f"channel blocks with different channel layouts {an.where(n)}")
        for cc in blocks.pending:
            if not _same_width(an, cc, blocks.blocks[0]):
                an.freeze(cc.info, f"{cc.origin} used by {use}")
                return _fail(an, n, value, f"channel blocks sized by a channel count that does not follow them "
                                           f"{an.where(n)}")
        if blocks.outer < blocks.inner:
            segs = blocks.info.segs
        else:
            segs = tuple((leaf, s * g) for leaf, s in an.leaf_segs(blocks.blocks[0]))
        out = Info(k, tuple((a, s * extra) for a, s in segs))
        _record_literal(an, n, k, out)
        return out
    return _fail(an, n, value, f"reshape of channel blocks that does not merge them {an.where(n)}")


def reduce(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``mean``/``sum``/… over other dims: the layout follows; over the channel dim or all dims: frozen."""
    _, info, meta = _first_tensor(an, n)
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    if info is None or dims is None or not isinstance(value, torch.Tensor) or not isinstance(meta, tuple):
        return unknown(an, n, value, f"reduction over all dims {an.where(n)}")
    dl = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dl):
        return unknown(an, n, value, f"reduction over dynamic dims {an.where(n)}")
    nd = len(meta)
    c = norm_dim(info.cdim, nd)
    ds = {norm_dim(d, nd) for d in dl}
    if c in ds:
        return unknown(an, n, value, f"reduction over the channel dim {an.where(n)}")
    new_c = c if keep else c - sum(1 for d in ds if d < c)
    if value.dim() <= new_c or value.shape[new_c] != meta[c]:
        return unknown(an, n, value, f"reduction with unexpected shape {an.where(n)}")
    return Info(new_c, info.segs)


def _permute(an: Analysis, n: fx.Node, value: Any, transpose: bool) -> Any:
    x, info, meta = _first_tensor(an, n)
    blocks = an.info_of(x)
    if not isinstance(blocks, ChannelBlocks):
        blocks = None
    if (info is None and blocks is None) or not isinstance(meta, tuple) or not isinstance(value, torch.Tensor):
        return _fail(an, n, value, f"unknown use of {target_name(n)} {an.where(n)}")
    nd = len(meta)
    rest = list(n.args[1:])
    if transpose:
        if target_name(n) == "t":
            d0, d1 = 0, 1
        else:
            d0 = rest[0] if rest else n.kwargs.get("dim0")
            d1 = rest[1] if len(rest) > 1 else n.kwargs.get("dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return _fail(an, n, value, f"dynamic transpose {an.where(n)}")
        d0, d1 = norm_dim(d0, nd), norm_dim(d1, nd)

        def moved(d: int) -> int:
            return d1 if d == d0 else d0 if d == d1 else d
    else:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest or n.kwargs.get("dims")
        if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
            return _fail(an, n, value, f"dynamic permute {an.where(n)}")
        order = [norm_dim(d, nd) for d in dims]

        def moved(d: int) -> int:
            return order.index(d)
    if blocks is not None:  # both block dims move
        return _blocks_out(an, n, value, dataclasses.replace(blocks, outer=moved(blocks.outer),
                                                             inner=moved(blocks.inner)))
    assert info is not None
    return Info(moved(norm_dim(info.cdim, nd)), info.segs)


def permute(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``permute``: the channel dim moves with the permutation."""
    return _permute(an, n, value, transpose=False)


def transpose(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``transpose``/``swapaxes``/``swapdims``/``t``: the channel dim moves if it is one of the two."""
    return _permute(an, n, value, transpose=True)


def _softmax(an: Analysis, n: fx.Node, value: Any, dim: Any) -> Any:
    _, info, meta = _first_tensor(an, n)
    if info is None or not isinstance(meta, tuple) or not isinstance(dim, int):
        return unknown(an, n, value, f"unknown use of softmax {an.where(n)}")
    if norm_dim(dim, len(meta)) == norm_dim(info.cdim, len(meta)):
        return unknown(an, n, value, f"softmax over the channel dim {an.where(n)}")
    return unary(an, n, value)


def softmax(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``softmax``/``log_softmax`` (function or method) over another dim: pass-through; over channels: frozen."""
    return _softmax(an, n, value, n.args[1] if len(n.args) > 1 else n.kwargs.get("dim"))


def softmax_module(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``nn.Softmax``/``nn.LogSoftmax``: as :func:`softmax` with the module's ``dim``."""
    _, mod = _module(an, n)
    return _softmax(an, n, value, mod.dim)


def pad(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``F.pad``: spatial pads pass through; channel pads become atoms whose widths the pad amounts follow.

    Zero channels padded on the channel dim (option-A shortcuts) can then be coupled with a producer's channels by
    a residual add.
    """
    _, info, meta = _first_tensor(an, n)
    pads = n.args[1] if len(n.args) > 1 else n.kwargs.get("pad")
    if info is None or not isinstance(meta, tuple) or not isinstance(pads, (tuple, list)) \
            or not all(isinstance(p, int) for p in pads):
        return unknown(an, n, value, f"unknown use of pad {an.where(n)}")
    c = norm_dim(info.cdim, len(meta))
    k = len(meta) - 1 - c  # pads[2k:2k+2] apply to the channel dim
    if 2 * k + 1 >= len(pads) or (pads[2 * k] == 0 and pads[2 * k + 1] == 0):
        return unary(an, n, value)
    mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
    fill = n.args[3] if len(n.args) > 3 else n.kwargs.get("value")
    if mode != "constant" or fill not in (None, 0, 0.0) or min(pads[2 * k], pads[2 * k + 1]) < 0 \
            or any(s != 1 for _, s in info.segs):
        return unknown(an, n, value, f"channel pad (F.pad mode={mode}, value={fill}) {an.where(n)}")
    # Zero channels padded on the channel dim are new atoms (no producer); the pad amounts follow their
    # widths, so a residual add can couple them with a producer's channels (option-A shortcuts).
    path = ("args", 1) if len(n.args) > 1 else ("kwargs", "pad")
    segs: list[tuple[int, int]] = []
    for side, idx in (("lo", 2 * k), ("hi", 2 * k + 1)):
        if pads[idx] == 0:
            continue
        atom = an.new_atom(pads[idx], f"{n.name}:pad_{side}")
        an.add_literal(n.name, (*path, idx), pads[idx], ((atom, 1),))
        segs.append((atom, 1))
    lo_part = segs[:1] if pads[2 * k] else []
    hi_part = segs[-1:] if pads[2 * k + 1] else []
    return Info(c, (*lo_part, *info.segs, *hi_part))


# ----------------------------------------------------------------------------------------------------------------
# Indexing, shape queries, attributes
# ----------------------------------------------------------------------------------------------------------------


def getitem(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``x[idx]``: an item of a tuple/dict, an entry of a shape, or indexing a tensor (see :func:`_channel_slice`)."""
    base, idx = n.args[0], n.args[1]
    binfo = an.info_of(base)
    if isinstance(binfo, (tuple, list)):
        return binfo[idx] if isinstance(idx, int) and -len(binfo) <= idx < len(binfo) else unknown(
            an, n, value, f"dynamic index into a tuple {an.where(n)}")
    if isinstance(binfo, dict):
        return binfo.get(idx)
    if isinstance(binfo, SizeRef):
        return _size_item(an, n, binfo, idx)
    if not isinstance(binfo, Info):
        if isinstance(binfo, Const) or isinstance(value, torch.Tensor):
            return unknown(an, n, value, f"indexing an untracked tensor {an.where(n)}")
        return None
    meta = an.meta_of(base)
    new_c = _index_channel_dim(idx, len(meta), norm_dim(binfo.cdim, len(meta)))
    if new_c is not None and isinstance(value, torch.Tensor) and value.shape[new_c] == meta[binfo.cdim]:
        return Info(new_c, binfo.segs)
    return _channel_slice(an, n, value, binfo, meta)


def _channel_item(idx: Any, ndim: int, cdim: int) -> tuple[int | None, Any, tuple[int, ...]] | None:
    """The index item that ``x[idx]`` applies to the channel dim: ``(dim after indexing, item, its path in idx)``.

    The dim is None when an int removes it; the path is ``(i,)`` for item ``i`` of a tuple index, ``()`` for a
    single index. None for advanced indexing, or when the channel dim is not indexed by an item of its own.
    """
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(not isinstance(i, (slice, int, type(None), type(Ellipsis))) for i in items):
        return None
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    in_dim = out_dim = 0
    for pos, i in enumerate(items):
        if i is Ellipsis:
            span = ndim - consumed
            if in_dim <= cdim < in_dim + span:
                return None
            in_dim, out_dim = in_dim + span, out_dim + span
        elif i is None:
            out_dim += 1
        elif in_dim == cdim:
            return (out_dim if isinstance(i, slice) else None), i, ((pos,) if isinstance(idx, tuple) else ())
        else:
            out_dim += isinstance(i, slice)
            in_dim += 1
    return None


def _channel_slice(an: Analysis, n: fx.Node, value: Any, info: Info, meta: tuple[int, ...]) -> Any:
    """``x[:, a:b]`` with int (or no) bounds and step 1 on the channel dim: like ``split`` with explicit sizes.

    The range ``[a, b)`` becomes sub-atoms (:meth:`~Analysis.sub_layout`) and the result's layout; a bound is a
    literal rewritten on apply to the kept width before it (``a > 0``) or, negative, minus the kept width after it.
    Bounds at or beyond the ends need no rewrite. Other steps, int indices and dynamic bounds on the channel dim
    freeze (``indexing along the channel dim``).
    """
    reason = f"indexing along the channel dim {an.where(n)}"
    found = _channel_item(n.args[1], len(meta), norm_dim(info.cdim, len(meta)))
    if found is None or found[0] is None or not isinstance(found[1], slice) or not isinstance(value, torch.Tensor):
        return unknown(an, n, value, reason)
    out_c, item, pos = found
    if item.step not in (None, 1) or not all(b is None or _is_int(b) for b in (item.start, item.stop)):
        return unknown(an, n, value, reason)
    size = meta[norm_dim(info.cdim, len(meta))]
    lo, hi, _ = item.indices(size)
    if hi <= lo or value.dim() <= out_c or value.shape[out_c] != hi - lo:
        return unknown(an, n, value, reason)
    segs = an.sub_layout(info, lo, hi)
    if segs is None:
        return unknown(an, n, value, f"channel slice inside a flattened channel {an.where(n)}")
    for key, bound, at in (("start", item.start, lo), ("stop", item.stop, hi)):
        if bound is None or bound == 0 or not -size < bound < size:
            continue  # an end of the dim: still an end after pruning
        _bound_literal(an, n, ("args", 1, *pos, key), bound, info, at, size)
    return Info(out_c, segs)


def _bound_literal(an: Analysis, n: fx.Node, path: tuple[Any, ...], bound: int, info: Info, at: int,
                   size: int) -> None:
    """Record a channel position ``bound`` (``at`` from the start) that must follow the widths.

    Positive: the kept width of positions ``[0, at)``; negative: minus the kept width of ``[at, size)`` (the
    literal's terms then carry negative coefficients). Both stay non-zero, as every group keeps a channel.
    """
    if bound > 0:
        part = an.sub_layout(info, 0, at)
        if part is not None:
            an.add_literal(n.name, path, bound, part)
    else:
        part = an.sub_layout(info, at, size)
        if part is not None:
            an.add_literal(n.name, path, bound, tuple((a, -s) for a, s in part))


def narrow(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``torch.narrow(x, dim, start, length)`` / ``x.narrow(...)``: on the channel dim as ``x[:, start:start+length]``.

    With int arguments the range becomes sub-atoms; ``start`` (non-zero) and ``length`` are literals rewritten to
    the kept widths before / inside the range. On another dim the layout passes through.
    """
    _, info, meta = _first_tensor(an, n)
    dim, start, length = _arg(n, 1, "dim"), _arg(n, 2, "start"), _arg(n, 3, "length")
    if info is None or not isinstance(meta, tuple) or not isinstance(value, torch.Tensor) \
            or not all(_is_int(v) for v in (dim, start, length)):
        return unknown(an, n, value, f"unknown use of narrow {an.where(n)}")
    c = norm_dim(info.cdim, len(meta))
    if norm_dim(dim, len(meta)) != c:
        return Info(info.cdim, info.segs)
    size = meta[c]
    lo = start + size if start < 0 else start
    if not 0 <= lo < lo + length <= size:
        return unknown(an, n, value, f"narrow along the channel dim {an.where(n)}")
    segs = an.sub_layout(info, lo, lo + length)
    if segs is None:
        return unknown(an, n, value, f"channel slice inside a flattened channel {an.where(n)}")
    if lo > 0:
        _bound_literal(an, n, _arg_path(n, 2, "start"), start, info, lo, size)
    an.add_literal(n.name, _arg_path(n, 3, "length"), length, segs)
    return Info(info.cdim, segs)


def _arg_path(n: fx.Node, pos: int, name: str) -> tuple[Any, ...]:
    """Path of argument ``name`` of a call: positional at ``pos`` or by keyword."""
    return ("args", pos) if len(n.args) > pos else ("kwargs", name)


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


def setitem(an: Analysis, n: fx.Node, value: Any) -> Any:
    """Slice assignment: frozen (fx does not model aliasing)."""
    return unknown(an, n, value, f"slice assignment (setitem) {an.where(n)}")


def size_query(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``x.size()``, ``x.size(d)``, ``x.numel()`` …: channel counts must not leak into other ops.

    ``x.size(c)`` of the channel dim is a :class:`ChannelCount` (free only where a rule understands it); the
    element count freezes the channels.
    """
    method = str(n.target)
    info, meta = an.tensor_info(n.args[0]), an.meta_of(n.args[0])
    if info is None or not isinstance(meta, tuple):
        return None
    c = norm_dim(info.cdim, len(meta))
    if method in ("numel", "nelement"):
        an.freeze(info, f"element count read {an.where(n)}")
        return None
    if method != "size":
        return None
    d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    if d is None:
        return SizeRef(info, len(meta))
    if not isinstance(d, int):
        an.freeze(info, f"channel count read by size() {an.where(n)}")
    elif norm_dim(d, len(meta)) == c:
        return ChannelCount(info, 1, 1, f"channel count read by size() {an.where(n)}")
    return None


def _size_item(an: Analysis, n: fx.Node, ref: SizeRef, idx: Any) -> Any:
    c = norm_dim(ref.info.cdim, ref.ndim)
    if isinstance(idx, int) and norm_dim(idx, ref.ndim) == c:
        return ChannelCount(ref.info, 1, 1, f"channel count read from the shape {an.where(n)}")
    dims = range(ref.ndim)
    hit = (norm_dim(idx, ref.ndim) == c) if isinstance(idx, int) else (
        c in dims[idx] if isinstance(idx, slice) and all(
            isinstance(v, (int, type(None))) for v in (idx.start, idx.stop, idx.step)) else True)
    if hit:
        an.freeze(ref.info, f"channel count read from the shape {an.where(n)}")
    return None


def patch_merging_pad(an: Analysis, n: fx.Node, value: Any) -> Any:
    """torchvision Swin's wrapped ``_patch_merging_pad(x)``: pads H and W of a channels-last tensor to even sizes
    and concatenates its four 2×2 sub-grids on the channel (last) dim, so the output's channels are the input's
    four times over (no MACs; a pruned input channel is removed from each copy)."""
    x = n.args[0] if len(n.args) == 1 and not n.kwargs else None
    info = an.tensor_info(x) if isinstance(x, fx.Node) else None
    if (info is None or not isinstance(value, torch.Tensor)
            or norm_dim(info.cdim, value.dim()) != value.dim() - 1):
        return unknown(an, n, value, f"unknown use of _patch_merging_pad {an.where(n)}")
    return Info(info.cdim, tuple(info.segs) * 4)


def attribute(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``getattr(x, name)``: ``x.shape`` is a shape read, ``x.data`` the same layout; other tensors frozen."""
    attr = n.args[1] if len(n.args) > 1 else None
    if attr in _SHAPE_ATTRS:
        info, meta = an.tensor_info(n.args[0]), an.meta_of(n.args[0])
        return SizeRef(info, len(meta)) if info is not None and isinstance(meta, tuple) else None
    if not isinstance(value, torch.Tensor):
        return None
    info = an.tensor_info(n.args[0])
    if attr == "data" and info is not None:
        return info
    return unknown(an, n, value, f"tensor attribute {attr} {an.where(n)}")


# ----------------------------------------------------------------------------------------------------------------
# Channel counts read from shapes; channel blocks (channel shuffle)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelCount:
    """An int computed from a tensor's channel count (``x.size(1)``, ``x.shape[1]``): ``width(info) · num / den``.

    Reading a channel count does not freeze by itself: the count is free where a rule understands it, namely
    ``c // k`` and ``c * k`` with an int ``k`` (:func:`count_arith`, again a count) and a ``view``/``reshape`` size
    that equals the width of the dim it sizes at every group width (:func:`_check_counts`). There it needs no
    rewrite: the pruned model reads the pruned count at run time. Any other use freezes ``info``
    (:func:`_guard_special`), with ``origin`` in the reason.

    Attributes:
        info: Layout of the tensor whose channel count was read.
        num: Numerator of the factor applied to the count.
        den: Denominator of the factor.
        origin: Where the count was read (``channel count read by size() at ...``).
    """

    info: Info
    num: int
    den: int
    origin: str


@dataclass(frozen=True)
class ChannelBlocks:
    """A channel dim viewed as two dims ``(g, q)`` (the first ``view`` of a channel shuffle).

    Block ``a`` (its index along dim ``outer``) holds channels ``a·q … a·q + q − 1`` of ``info`` (their index along
    dim ``inner``). Only ``transpose``/``permute``, copies (``contiguous``, ``clone``, casts) and a
    ``view``/``reshape`` that merges the two dims again (:func:`_merge_blocks`) understand it; any other use
    freezes ``info`` and the counts in ``pending`` (:func:`_guard_special`).

    Attributes:
        info: Layout of the channel dim before the view.
        blocks: Segments of each of the ``g`` blocks.
        outer: Dim holding the block index.
        inner: Dim holding the position inside a block.
        node: Name of the view that made the blocks.
        pending: A channel count given as that view's block size, checked when the blocks are merged.
    """

    info: Info
    blocks: tuple[Segments, ...]
    outer: int
    inner: int
    node: str
    pending: tuple[ChannelCount, ...] = ()


#: Ops through which channel blocks pass unchanged (:func:`unary`).
_BLOCK_COPIES = frozenset({"contiguous", "clone", "detach", "float", "double", "half", "to", "type", "type_as", "cpu",
                           "cuda", "requires_grad_"})
_COUNT_OPS = {operator.mul: "mul", operator.floordiv: "floordiv"}


def _op_name(n: fx.Node) -> str:
    """The bare name of a node's function or method (``contiguous``, ``clone``, ``transpose`` …)."""
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")


def _freeze_ref(an: Analysis, ref: Any, use: str) -> None:
    """Freeze what a channel count or channel blocks depend on, naming the use that is not understood."""
    if isinstance(ref, ChannelCount):
        an.freeze(ref.info, f"{ref.origin} used by {use}")
    elif isinstance(ref, ChannelBlocks):
        an.freeze(ref.info, f"channel dim viewed as {len(ref.blocks)} blocks (node {ref.node}) used by {use}")
        for cc in ref.pending:
            an.freeze(cc.info, f"{cc.origin} used by {use}")


def _fail(an: Analysis, n: fx.Node, value: Any, reason: str) -> Any:
    """:func:`unknown`, also freezing (with ``reason``) the channel counts and channel blocks among the arguments."""
    for a in node_args(n):
        ref = an.info_of(a)
        if isinstance(ref, (ChannelCount, ChannelBlocks)):
            an.freeze(ref.info, reason)
        if isinstance(ref, ChannelBlocks):
            for cc in ref.pending:
                an.freeze(cc.info, reason)
    return unknown(an, n, value, reason)


def _blocks_out(an: Analysis, n: fx.Node, value: Any, blocks: ChannelBlocks) -> Any:
    """``blocks`` as the node's value, unless nothing uses it (then nothing would ever check it: freeze)."""
    if not n.users:
        return _fail(an, n, value, f"channel blocks not merged again {an.where(n)}")
    return blocks


def _rule_of(an: Analysis, n: fx.Node) -> Rule | None:
    """The rule a node dispatches to (None: :func:`unknown`)."""
    if n.op == "call_function":
        return FUNCTION_RULES.get(n.target) or WRAPPED_FUNCTION_RULES.get(qualified_name(n.target))
    if n.op == "call_method":
        return METHOD_RULES.get(str(n.target))
    if n.op == "call_module" and str(n.target) not in an.leaf_reasons:
        mod = an.mods[str(n.target)]
        return next((rule for types, rule in MODULE_RULES if isinstance(mod, types)), None)
    return None


def _guard_special(an: Analysis, n: fx.Node) -> None:
    """Freeze the channel counts and channel blocks among ``n``'s arguments unless its rule understands them.

    Counts: :func:`reshape`, :func:`binary` and :func:`count_arith` (which check or freeze every count they get).
    Blocks: as the first argument of :func:`reshape`, :func:`permute`, :func:`transpose` and :func:`unary` (the
    rules that carry, merge or freeze them). Everything else (the model output included) freezes them.
    """
    refs = [(k, an.info_of(a)) for k, a in enumerate(node_args(n))]
    if not any(isinstance(r, (ChannelCount, ChannelBlocks)) for _, r in refs):
        return
    rule = _rule_of(an, n)
    first = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
    use = f"{target_name(n)} {an.where(n)}"
    for k, r in refs:
        if not isinstance(r, (ChannelCount, ChannelBlocks)):
            continue
        if isinstance(r, ChannelCount):
            understood = rule in _COUNT_RULES
        else:  # channel blocks: only as the tensor the rule works on
            understood = rule in _BLOCK_RULES and k == 0 and isinstance(first, fx.Node) and an.info_of(first) is r
        if not understood:
            _freeze_ref(an, r, use)


def count_arith(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``c // k``, ``c * k``, ``k * c`` on a :class:`ChannelCount` ``c`` with an int ``k > 0``: again a count.

    ``c // k`` must divide exactly on the example input. Other arithmetic on a count freezes its channels; ``//``
    on tensors is an unknown op.
    """
    counts = [an.info_of(a) for a in node_args(n) if isinstance(an.info_of(a), ChannelCount)]
    use = f"{target_name(n)} {an.where(n)}"
    if not counts:
        return unknown(an, n, value, f"unknown op {use}")
    op = _COUNT_OPS.get(n.target) if callable(n.target) else None
    if op is not None and len(n.args) == 2 and not n.kwargs and _is_int(value):
        a, b = (an.info_of(x) for x in n.args)
        cc, k = (a, n.args[1]) if isinstance(a, ChannelCount) else (b, n.args[0]) if op == "mul" else (None, None)
        if isinstance(cc, ChannelCount) and _is_int(k) and k > 0:
            full = Fraction(an.width(cc.info) * cc.num, cc.den)
            f = Fraction(cc.num * k, cc.den) if op == "mul" else Fraction(cc.num, cc.den * k)
            if (full * k if op == "mul" else full / k) == value:
                return ChannelCount(cc.info, f.numerator, f.denominator, cc.origin)
    for cc in counts:
        _freeze_ref(an, cc, use)
    return None


def _width_terms(an: Analysis, segs: Segments, scale: Fraction = Fraction(1)) -> dict[int, Fraction]:
    """A layout's width as a linear function of its channel classes: ``{union-find root: positions per channel}``."""
    out: dict[int, Fraction] = {}
    for leaf, s in an.leaf_segs(segs):
        r = an.find(leaf)
        out[r] = out.get(r, Fraction(0)) + s * scale
    return out


def _same_width(an: Analysis, cc: ChannelCount, segs: Segments) -> bool:
    """True when the count equals the width of ``segs`` at every group width.

    Either the two width functions agree already, or (a count of a whole tensor, the same full width) the two
    layouts are unioned channel by channel, which makes them agree (e.g. ``y.view(b, c, 1, 1)`` with ``c`` read
    from another tensor ``x``: ``y`` then keeps ``x``'s channels). False otherwise.
    """
    if _width_terms(an, cc.info.segs, Fraction(cc.num, cc.den)) == _width_terms(an, segs):
        return True
    return cc.num == cc.den and an.width(cc.info) == sum(an.size[a] * s for a, s in segs) \
        and an.align(cc.info.segs, segs)


def _check_counts(an: Analysis, n: fx.Node, value: Any, out: Any) -> None:
    """Channel counts among a ``view``/``reshape``'s sizes must size the channel dim of the result.

    A count at the result's channel dim must equal its width at every group width (:func:`_same_width`); one given
    as the block size of new channel blocks is checked when they are merged (:func:`_merge_blocks`). Any other
    count (another dim, another argument, another op) freezes.
    """
    spec = _shape_spec(n)
    shape = spec[0] if spec is not None else []
    use = f"{target_name(n)} {an.where(n)}"
    sized: set[fx.Node] = set()
    # the result's channel dim: a size there that does not follow its width would break the pruned model
    cdim = norm_dim(out.cdim, value.dim()) if isinstance(out, Info) and isinstance(value, torch.Tensor) else None
    for k, s in enumerate(shape):
        cc = an.info_of(s) if isinstance(s, fx.Node) else None
        if not isinstance(cc, ChannelCount):
            if k == cdim and isinstance(s, fx.Node):
                an.freeze(out, f"reshape to a computed channel size {use}")
            continue
        sized.add(s)
        if isinstance(out, ChannelBlocks):
            ok = out.node == n.name and k == out.inner and cc in out.pending
        else:
            ok = isinstance(out, Info) and isinstance(value, torch.Tensor) \
                and k == norm_dim(out.cdim, value.dim()) and _same_width(an, cc, out.segs)
        if not ok:
            _freeze_ref(an, cc, use)
            if k == cdim:
                an.freeze(out, f"reshape to a channel size that does not follow the channels ({cc.origin}) {use}")
    for a in node_args(n):
        if a not in sized and isinstance(an.info_of(a), ChannelCount):
            _freeze_ref(an, an.info_of(a), use)


#: Rules that check (or freeze) every channel count they get, and rules that handle channel blocks.
_COUNT_RULES: frozenset[Rule] = frozenset({reshape, binary, count_arith})
_BLOCK_RULES: frozenset[Rule] = frozenset({reshape, permute, transpose, unary})


# ----------------------------------------------------------------------------------------------------------------
# Dispatch tables
# ----------------------------------------------------------------------------------------------------------------


#: Module types and their rules; the first ``isinstance`` match wins (leaf reasons are checked before).
MODULE_RULES: tuple[tuple[type | tuple[type, ...], Rule], ...] = (
    (_CONV_TYPES, conv),
    (nn.Linear, linear),
    (_BN_TYPES, batch_norm),
    (nn.LayerNorm, layer_norm),
    (nn.GroupNorm, group_norm),
    (nn.PReLU, prelu),
    (nn.Embedding, embedding),
    (nn.MultiheadAttention, attention.multihead_attention),
    (nn.Flatten, reshape),
    ((nn.Softmax, nn.LogSoftmax), softmax_module),
    (_PASS_TYPES, unary),
    (_PAD_TYPES, unary),
)


def _table(entries: Iterable[tuple[Iterable[Any], Rule]]) -> dict[Any, Rule]:
    """Key → rule; a key listed twice keeps its first rule."""
    out: dict[Any, Rule] = {}
    for keys, rule in entries:
        for key in keys:
            out.setdefault(key, rule)
    return out


#: Function targets (``call_function``) and their rules.
FUNCTION_RULES: dict[Any, Rule] = _table([
    ((operator.getitem,), getitem),
    ((getattr,), attribute),
    ((operator.setitem,), setitem),
    (_BINARY_FUNCS, binary),
    (_UNARY_FUNCS, unary),
    (_CAT_FUNCS, cat),
    (_SPLIT_FUNCS, split),
    (_RESHAPE_FUNCS, reshape),
    (_REDUCE_FUNCS, reduce),
    (_PERMUTE_FUNCS, permute),
    (_TRANSPOSE_FUNCS, transpose),
    (_SOFTMAX_FUNCS, softmax),
    (_PAD_FUNCS, pad),
    (_FUNC_LINEAR, functional_linear),
    (_FUNC_CONV, functional_conv),
    (_FUNC_BATCH_NORM, functional_batch_norm),
    (_FUNC_GROUP_NORM, functional_group_norm),
    (_FUNC_LAYER_NORM, functional_layer_norm),
    (_MATMUL_FUNCS, matmul),
    (_SDPA_FUNCS, sdpa),
    (_funcs(("einsum",), torch), attention.einsum),
    ((operator.floordiv,), count_arith),
    (_funcs(("narrow",), torch), narrow),
])

#: Functions of other libraries that ``torch.fx.wrap`` keeps as ``call_function`` nodes, by qualified name
#: (:func:`qualified_name`, so the library need not be importable here): the known channel-preserving ones.
#: A wrapped function not listed here is an unknown op (its channels freeze).
WRAPPED_FUNCTION_RULES: dict[str, Rule] = {
    # identity in eval mode; in training a per-sample (or per-batch) 0/1 scale: channel-preserving either way
    "torchvision.ops.stochastic_depth.stochastic_depth": unary,
    # Swin V1/V2 attention: hidden width, heads (num_heads rewritten) and output width; exact MACs. The pruned
    # form that apply puts in its place where the widths no longer fit torchvision's (head_dim explicit).
    "torchvision.models.swin_transformer.shifted_window_attention": attention.shifted_window_attention,
    "autoprune.graph.attention.pruned_shifted_window_attention": attention.shifted_window_attention,
    # Swin's per-head relative position bias [1, heads, N, N] from the table's columns
    # Swin's patch merging: the channel-last input's channels four times (the 2×2 sub-grids concatenated)
    "torchvision.models.swin_transformer._patch_merging_pad": patch_merging_pad,
    "torchvision.models.swin_transformer._get_relative_position_bias": attention.relative_position_bias,
}


def qualified_name(fn: Any) -> str:
    """``module.qualname`` of a function (the key of :data:`WRAPPED_FUNCTION_RULES`); ``""`` if it has none."""
    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{qual}" if isinstance(module, str) and isinstance(qual, str) else ""


#: Tensor method names (``call_method``) and their rules.
METHOD_RULES: dict[str, Rule] = _table([
    (_SIZE_METHODS, size_query),
    (_BINARY_METHODS, binary),
    (_UNARY_METHODS, unary),
    (_SPLIT_METHODS, split),
    (_RESHAPE_METHODS, reshape),
    (_REDUCE_METHODS, reduce),
    (("permute",), permute),
    (_TRANSPOSE_METHODS, transpose),
    (_SOFTMAX_METHODS, softmax),
    (_MATMUL_METHODS, matmul_method),
    (("narrow",), narrow),
    (("expand", "expand_as"), attention.expand),
])
