"""What the analysis does with an op it has no rule for: freeze its channels, and measure its MACs.

A missing rule never produces a broken pruned model (the op's input channels freeze and its outputs get new frozen
atoms), and never a silent under-count of the closed-form MACs: the op is run again on its inputs from the analysis
run under :func:`counting_flops` and its MACs are priced as a constant (ENGINE.md §2.5, §6.1). Both
:mod:`autoprune.graph.rules` and :mod:`autoprune.graph.attention` fall back to :func:`unknown`.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

from autoprune.graph.common import node_args, prod, target_name
from autoprune.graph.state import Analysis

__all__ = ["count_uncounted", "counting_flops", "unknown"]

log = logging.getLogger("autoprune.graph")


def _sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (which ``FlopCounterMode`` counts as 0)."""
    *batch, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * prod(batch) * s_q * s_k * (d_q + d_v)


@contextlib.contextmanager
def counting_flops() -> Iterator[Any]:
    """A ``FlopCounterMode`` that also counts attention on the CPU.

    ``FlopCounterMode`` has formulas for the CUDA kernels of ``scaled_dot_product_attention`` only, and
    ``nn.MultiheadAttention``'s inference fast path is one fused op it does not know; inside this context the CPU
    kernel gets the same formula (two matmuls, ``2·b·h·s_q·s_k·d`` FLOPs each) and the fast path is off, so the
    projections run as counted linear layers. Yields the counter (``get_total_flops()``).
    """
    from torch.utils.flop_counter import FlopCounterMode

    custom: dict[Any, Any] = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = _sdpa_cpu_flops
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with FlopCounterMode(display=False, custom_mapping=custom) as counter:
            yield counter
    finally:
        if mha is not None and fast is not None:
            mha.set_fastpath_enabled(fast)


def _writes_in_place(n: fx.Node) -> bool:
    if n.op == "call_method":
        return str(n.target).endswith("_")
    if n.op == "call_function":
        return n.target is operator.setitem or getattr(n.target, "__name__", "").endswith("_")
    return False


def count_uncounted(an: Analysis, n: fx.Node) -> str:
    """Measure the MACs of a node the closed form has no rule for and price them as a constant.

    The node is run again on (copies of) its inputs from the analysis run under :func:`counting_flops`. Nodes
    without tensor inputs and in-place ops (running them again would write again; they have no MACs) are
    skipped. Returns a note for the freeze reason (empty when the node has no MACs); a log warning says the same.
    """
    if n.op not in ("call_module", "call_function", "call_method") or _writes_in_place(n):
        return ""
    try:
        args, kwargs = an.fetch_args_kwargs_from_env(n)
    except Exception:
        return ""
    if not any(isinstance(t, Tensor) for t in pytree.tree_leaves((args, kwargs))):
        return ""
    args, kwargs = pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, (args, kwargs))
    try:
        with torch.no_grad(), counting_flops() as counter:
            getattr(an, n.op)(n.target, args, kwargs)
    except Exception as exc:  # the op cannot run again: say so rather than under-count silently
        log.warning("the MACs of %s %s cannot be measured (%s: %s); the closed form leaves them out",
                    target_name(n), an.where(n), type(exc).__name__, exc)
        return "; its MACs could not be measured and are not in the closed form"
    macs = int(counter.get_total_flops()) // 2
    if macs <= 0:
        return ""
    an.add_const_macs(macs)
    per_sample = macs // max(an.batch, 1)
    log.warning("no MAC formula for %s %s: its %s MACs per sample were measured on the example input and are "
                "priced as a constant", target_name(n), an.where(n), f"{per_sample:,}")
    return f"; its {per_sample:,} MACs per sample are measured on the example input and priced as a constant"


def unknown(an: Analysis, n: fx.Node, value: Any, reason: str, *, counted: bool = False) -> Any:
    """No rule applies: freeze the input channels; the outputs get new frozen atoms.

    Unless the caller ``counted`` the node's MACs, they are measured on the example input and priced as a
    constant (:func:`count_uncounted`); the reason then says so.
    """
    if not counted:
        reason += count_uncounted(an, n)
    an.freeze([an.info_of(a) for a in node_args(n)], reason)
    label = f"{n.target}:out" if n.op == "call_module" else f"{n.name}:out"
    return an.fresh(an.meta_of(n), label, reason)
