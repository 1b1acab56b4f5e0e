"""The torch.export front-end: rebuild a module torch.fx cannot trace from its exported ATen graph.

When ``torch.fx`` fails on the model or on a submodule (e.g. ``list(x.chunk(2, 1))`` in a YOLOv8 C2f block:
"Proxy object cannot be iterated"), that module is exported with ``torch.export.export`` (on the inputs of its
first call, batch repeated twice so that the batch size stays symbolic) and rebuilt as an fx graph: each call of
a ``torch.nn`` leaf (or opaque) module, found through ``node.meta["nn_module_stack"]``, becomes a
``call_module`` of the same submodule, and the other ATen ops are mapped to torch functions the rules know
(:data:`ATEN`). The rebuilt module must reproduce the original outputs on every captured call and on the doubled
batch (:func:`export_front_end`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from autoprune.graph.common import node_args, norm_dim

__all__ = ["ATEN", "ExportFailure", "export_front_end", "rebuild_from_export"]

#: ``is_leaf(path relative to the exported module, module)``: whether a submodule stays one ``call_module``.
LeafTest = Callable[[str, nn.Module], bool]


class ExportFailure(Exception):
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


#: ATen op name -> the torch callable (or ``"method:<name>"``) the fx rules understand.
ATEN: dict[str, Any] = _aten_table()

#: ATen norm ops whose argument order differs from their ``torch.nn.functional`` form: op name -> (function,
#: the function's positional arguments as ATen argument positions or constants, whether the ATen op returns a
#: tuple whose first item is the output). ``torch.export`` gives ``batch_norm`` & co. for eval-mode norms;
#: decomposed programs give ``_native_batch_norm_legit_no_training`` (``(out, mean, rstd)``).
ATEN_NORMS: dict[str, tuple[Callable[..., Any], tuple[Any, ...], bool]] = {
    # aten: (input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)
    "batch_norm": (F.batch_norm, (0, 3, 4, 1, 2, 5, 6, 7), False),
    # aten: (input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled)
    "instance_norm": (F.instance_norm, (0, 3, 4, 1, 2, 5, 6, 7), False),
    # aten: (input, num_groups, weight, bias, eps, cudnn_enabled)
    "group_norm": (F.group_norm, (0, 1, 2, 3, 4), False),
    # aten: (input, normalized_shape, weight, bias, eps, cudnn_enable)
    "layer_norm": (F.layer_norm, (0, 1, 2, 3, 4), False),
    # aten: (input, weight, bias, running_mean, running_var, momentum, eps) -> (out, save_mean, save_rstd)
    "_native_batch_norm_legit_no_training": (F.batch_norm, (0, 3, 4, 1, 2, ("const", False), 5, 6), True),
}


def _schema_args(n: fx.Node) -> list[Any]:
    """All positional arguments of an ATen call, defaults filled in from the op's schema."""
    out = list(n.args)
    schema = getattr(n.target, "_schema", None)
    if schema is not None:
        for arg in schema.arguments[len(out):]:
            if arg.kwarg_only:
                break
            out.append(n.kwargs.get(arg.name, arg.default_value))
    return out


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
        raise ExportFailure(f"running the model failed ({type(exc).__name__})") from exc
    finally:
        handle.remove()
        for m, t in flags.items():
            m.training = t
    return calls


def _quiet_export(mod: nn.Module, args: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """``torch.export.export`` with torch's logging silenced (failures print whole graphs otherwise)."""
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


def _leaf_calls(sub: nn.Module, ep: torch.export.ExportedProgram, is_leaf: LeafTest,
                ) -> dict[fx.Node, tuple[str, list[fx.Node]]]:
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


def rebuild_from_export(sub: nn.Module, ep: torch.export.ExportedProgram, is_leaf: LeafTest) -> fx.GraphModule:
    """An fx graph module equivalent to ``sub`` built from its exported ATen graph.

    Each call of a leaf module (torch.nn layers, opaque modules; found through ``nn_module_stack``) becomes one
    ``call_module`` node of the same submodule, so parameter names and the per-module rules stay as in an fx
    trace; the remaining ATen ops are mapped to the torch functions the analysis rules know.

    Args:
        sub: The exported module.
        ep: Its exported program.
        is_leaf: Which submodules stay one ``call_module`` node.

    Raises:
        ExportFailure: For an op outside :data:`ATEN`, tensor constants, or a leaf whose internals are used
            outside its call.
    """
    sig = ep.graph_signature
    tensors = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    if getattr(sig, "inputs_to_lifted_tensor_constants", None):
        raise ExportFailure("the module creates tensor constants")
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    attrs: dict[str, fx.Node] = {}
    leaf_of = _leaf_calls(sub, ep, is_leaf)
    firsts: set[fx.Node] = set()  # rebuilt nodes standing for the first item of an ATen op's tuple output

    def one(n: fx.Node) -> Any:
        if n.name in tensors:
            name = tensors[n.name]
            if name not in attrs:
                attrs[name] = graph.get_attr(name)
            return attrs[name]
        if n not in env:
            raise ExportFailure(f"an intermediate value of module {leaf_of[n][0]} is used outside it"
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
            found = [a for m in nodes for a in node_args(m)]
            inputs = list(dict.fromkeys(a for a in found if a not in inside and a.name not in tensors))
            if len(inputs) != 1:
                raise ExportFailure(f"module {path} is called with {len(inputs)} tensor inputs")
            env[n] = graph.call_module(path, (value(inputs[0]),))
        elif n.target is operator.getitem and not n.users:
            continue  # an unused item (e.g. the saved statistics of a decomposed batch norm)
        else:
            env[n] = _aten_node(graph, n, value, firsts)
    return fx.GraphModule(sub, graph, type(sub).__name__)


def _aten_node(graph: fx.Graph, n: fx.Node, value: Callable[[Any], Any], firsts: set[fx.Node]) -> fx.Node:
    """The fx node (torch function, tensor method or indexing) for one exported ATen node.

    ``firsts`` holds the rebuilt nodes that stand for item 0 of a tuple-returning ATen norm (:data:`ATEN_NORMS`):
    indexing them with 0 is the node itself; any other item is refused.
    """
    if n.target is operator.getitem and n.args and value(n.args[0]) in firsts:
        if n.args[1] != 0:
            raise ExportFailure(f"item {n.args[1]} of a normalisation's outputs is used")
        return value(n.args[0])
    if n.target in (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv):
        return graph.call_function(n.target, value(n.args))  # tuple items and symbolic size arithmetic
    aten = _aten_name(n.target)
    if aten == "sym_size":
        return graph.call_method("size", value(n.args))
    if aten == "slice":
        x, dim, start, end, step = (*n.args, *(0, None, None, 1)[len(n.args) - 1:])[:5]
        end = None if isinstance(end, int) and end >= 2 ** 62 else end
        idx = (slice(None),) * norm_dim(dim, n.meta["val"].dim()) + (slice(start, end, step),)
        return graph.call_function(operator.getitem, (value(x), idx))
    if aten in ATEN_NORMS:
        func, order, tuple_out = ATEN_NORMS[aten]
        args = _schema_args(n)
        call_args = tuple(p[1] if isinstance(p, tuple) else args[p] for p in order)
        new = graph.call_function(func, value(call_args))
        if tuple_out:
            firsts.add(new)
        return new
    fn = ATEN.get(aten) if aten else None
    if fn is None:
        raise ExportFailure(f"no rule for {n.target}")
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


def export_front_end(model: nn.Module, path: str, args: tuple[Any, ...], leaf_types: tuple[type, ...],
                     leaf_names: set[str]) -> fx.GraphModule:
    """Rebuild submodule ``path`` (``""``: the model) as an fx graph module through ``torch.export``.

    The module is exported on the inputs of its first call; the rebuilt module must reproduce the original
    outputs on the inputs of *every* call (eval mode).

    Args:
        model: The whole model (run once on ``args`` to capture the submodule's calls).
        path: Qualified name of the submodule (``""``: the model itself).
        args: Positional example inputs of ``model``.
        leaf_types: Module classes kept as leaves (opaque modules).
        leaf_names: Qualified module names kept as leaves.

    Raises:
        ExportFailure: With the reason when the module cannot be rebuilt faithfully.
    """
    sub = model.get_submodule(path) if path else model
    calls = _capture_calls(model, path, args)
    if not calls:
        raise ExportFailure("the module is never called")
    if any(kw or not all(isinstance(a, torch.Tensor) for a in a_) for a_, kw in calls):
        raise ExportFailure("only positional tensor inputs are supported")
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
            raise ExportFailure(f"{type(exc).__name__}: {first[:60]}") from exc
        prefix = f"{path}." if path else ""

        def is_leaf(rel: str, mod: nn.Module) -> bool:
            if prefix + rel in leaf_names or (leaf_types and isinstance(mod, leaf_types)):
                return True
            name = type(mod).__module__
            return (name.startswith("torch.nn") or name.startswith("torch.ao.nn")) and not isinstance(
                mod, (nn.Sequential, nn.ModuleList, nn.ModuleDict))

        try:
            rebuilt = rebuild_from_export(sub, ep, is_leaf)
        except ExportFailure:
            raise
        except Exception as exc:
            raise ExportFailure(f"rebuilding the graph failed ({type(exc).__name__}: {exc})") from exc
        rebuilt.eval()
        with torch.no_grad():
            for a in [double] + [a for a, _ in calls]:
                try:
                    same = _same_outputs(rebuilt(*a), sub(*a))
                except Exception:
                    same = False
                if not same:
                    raise ExportFailure("the rebuilt graph does not reproduce the module's outputs (batch size "
                                        "specialised?)")
    finally:
        for m, t in flags.items():
            m.training = t
    return rebuilt

