"""Attention in the channel analysis: heads, ``nn.MultiheadAttention``, class tokens and the MACs of attention.

This module holds the rules of :mod:`autoprune.graph.rules` that concern attention (ENGINE.md §2.4, attention),
the MAC bookkeeping for ops without parameters, and :class:`PrunedMultiheadAttention`, the module a pruned
``nn.MultiheadAttention`` becomes when its widths no longer fit PyTorch's own forward.

**Heads as channels.** A head is a block of ``head_dim`` consecutive channels of a projection's output. When a
``view``/``reshape`` splits a token tensor's channel dim (the last dim) into ``(…, heads, head_dim)``
(:func:`split_heads`), the channel atoms of the projection are *coarsened* (:func:`coarsen`): every atom of the
projection's output (and every atom tied to it) is re-read in units of ``head_dim`` channels, so one channel of
the group is one head, and each use of those atoms takes a stride ``head_dim`` times larger (slicing then removes
whole heads from the projection's rows and from the output projection's columns). The head dim becomes the
tensor's channel dim; the ``head_dim`` dim is never pruned (the softmax scale ``1/sqrt(head_dim)`` of
``scaled_dot_product_attention`` and of ``nn.MultiheadAttention`` depends on it, so pruning inside a head would
not equal the masked original). A packed ``(…, 3, heads, head_dim)`` split (q, k and v from one linear layer)
cuts the projection into its q, k and v parts and ties them head by head. The literal head count in the call is
rewritten on apply; a computed one freezes the heads (its value cannot follow the width). Matmuls, ``einsum`` and
``scaled_dot_product_attention`` whose operands carry the head dim among their batch dims tie the heads of their
operands and pass them on, so ``q @ k.transpose(-2, -1)``, ``softmax`` and ``@ v`` keep the heads, and
``transpose(1, 2).reshape(B, N, heads·head_dim)`` merges them back into a strided channel layout for the output
projection.

**``nn.MultiheadAttention``** (:func:`multihead_attention`) has three channel groups: the embedding width of its
inputs (the columns of ``in_proj_weight``, or of ``q/k/v_proj_weight``), its heads (``head_dim`` rows each of the
q, k and v parts of the in-projection and of its bias, ``head_dim`` columns of ``out_proj.weight``, ``bias_k`` and
``bias_v``) and the rows of ``out_proj``. PyTorch's forward requires ``query width == num_heads·head_dim ==
embed_dim``, so a pruned module whose widths differ becomes a :class:`PrunedMultiheadAttention` (same parameters
and names; its forward decouples the three widths), while one whose widths still fit keeps its class with
``embed_dim``, ``num_heads``, ``kdim`` and ``vdim`` rewritten (:func:`autoprune.pruning.apply`).

**Swin** (:func:`shifted_window_attention`): torchvision's fx-wrapped ``shifted_window_attention`` gets the same
three groups as ``nn.MultiheadAttention`` (input width, heads, output width), the heads tied to the relative
position bias (:func:`relative_position_bias`) and its ``num_heads`` literal rewritten on apply. The function
derives ``head_dim`` from its input's width, so where the pruned widths no longer fit it, :func:`autoprune.pruning.
apply` calls :func:`pruned_shifted_window_attention` (``head_dim`` explicit) in its place
(:func:`retarget_window_attention`), which :mod:`autoprune.serialize` allow-lists.

**MACs.** A MAC term of an op without parameters (attention matmuls, ``einsum``, ``scaled_dot_product_attention``)
is priced as ``multiplier × width`` of a channel layout (:func:`add_layout_macs`), so it follows the pruned head
count. Ops the closed form has no formula for (opaque leaves, unknown ops, ``einsum`` with more than two operands)
are measured once on the example input with ``FlopCounterMode`` (:func:`autoprune.graph.fallback.count_uncounted`, with
``scaled_dot_product_attention``'s CPU kernel counted and ``nn.MultiheadAttention``'s fused fast path off) and
priced as a constant; the freeze reason and a log warning say so.
"""

from __future__ import annotations

import logging
import math
import operator
import string
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from autoprune.graph.common import default_cdim, node_args, norm_dim, prod, shape_meta, target_name
from autoprune.graph.fallback import unknown as _unknown
from autoprune.graph.layout import Const, Info, Segments, SizeRef
from autoprune.graph.state import Analysis
from autoprune.graph.terms import MACS_PREFIX

__all__ = [
    "PrunedMultiheadAttention",
    "add_layout_macs",
    "coarsen",
    "einsum",
    "expand",
    "matmul",
    "multihead_attention",
    "pruned_shifted_window_attention",
    "relative_position_bias",
    "retarget_window_attention",
    "sdpa",
    "shifted_window_attention",
    "split_heads",
]

log = logging.getLogger("autoprune.graph")


# ----------------------------------------------------------------------------------------------------------------
# MACs of ops without parameters
# ----------------------------------------------------------------------------------------------------------------


def add_layout_macs(an: Analysis, n: fx.Node, info: Info, macs: float, suffix: str = "") -> None:
    """Price ``macs`` (over the example batch, at full width) as proportional to the width of ``info``.

    The term is a MAC row over a virtual one-dimensional tensor ``#macs:<node>`` laid out like ``info``'s channel
    dim (:data:`autoprune.graph.terms.MACS_PREFIX`): ``macs / full width`` per channel, so pruning the group of
    the layout (e.g. heads) scales the term. It appears among the group's members with role ``macs``; nothing is
    sliced along it.
    """
    width = an.width(info)
    if width <= 0 or macs <= 0:
        return
    name = f"{MACS_PREFIX}{n.name}{suffix}"
    an.add_tensor_use(name, "macs", an.entries(info), [(name, 0)], width)
    an.add_mac_term(name, float(macs) / width)


def _frozen(an: Analysis, n: fx.Node, value: Any, reason: str) -> Any:
    """Freeze the node's input channels; its outputs get new frozen atoms (MACs already counted by the caller)."""
    an.freeze([an.info_of(a) for a in node_args(n)], reason)
    return an.fresh(an.meta_of(n), f"{n.name}:out", reason)


# ----------------------------------------------------------------------------------------------------------------
# Heads: coarsening channel atoms into blocks of head_dim channels
# ----------------------------------------------------------------------------------------------------------------


def _rescale(obj: Any, atoms: set[int], unit: int) -> Any:
    """A layout value with the stride of every segment on ``atoms`` multiplied by ``unit``."""
    if isinstance(obj, Info):
        return Info(obj.cdim, tuple((a, s * unit) if a in atoms else (a, s) for a, s in obj.segs))
    if isinstance(obj, SizeRef):
        return SizeRef(_rescale(obj.info, atoms, unit), obj.ndim)
    if isinstance(obj, tuple):
        return tuple(_rescale(o, atoms, unit) for o in obj)
    if isinstance(obj, list):
        return [_rescale(o, atoms, unit) for o in obj]
    if isinstance(obj, dict):
        return {k: _rescale(v, atoms, unit) for k, v in obj.items()}
    return obj


def coarsen(an: Analysis, atoms: Iterable[int], unit: int) -> set[int] | None:
    """Re-read ``atoms`` (and every atom tied to them) in units of ``unit`` channels; the rescaled atoms or None.

    The closure covers each atom's whole family (the atom it was cut from and all its pieces) and the union-find
    class of every leaf in it, so tied channels stay tied. Every atom of the closure must have a size divisible by
    ``unit`` (piece boundaries then fall on unit boundaries); otherwise nothing changes and None is returned.
    Sizes (and the start of pieces) are divided by ``unit`` and every reference to the atoms — the layouts of
    the nodes run so far, the uses, the literal sites and the grouped-conv block records — gets a stride ``unit``
    times larger, so positions are unchanged and one channel of a coarsened atom is a block of ``unit`` channels.
    """
    closure: set[int] = set()
    todo = list(atoms)
    while todo:
        a = todo.pop()
        if a in closure:
            continue
        root = a
        while root in an.ancestor:
            root = an.ancestor[root]
        stack = [root]
        while stack:
            x = stack.pop()
            if x in closure:
                continue
            closure.add(x)
            kids = an.children.get(x)
            if kids:
                stack.extend(kids)
            else:
                todo.extend(an.members[an.find(x)])
    if unit < 2 or any(an.size[x] % unit for x in closure):
        return None
    for x in closure:
        an.size[x] //= unit
        label, start = an.base[x]
        an.base[x] = (label, start // unit)
    for node in list(an.infos):
        an.infos[node] = _rescale(an.infos[node], closure, unit)
    for use in an.uses:
        use.entries = [(a, off, s * unit if a in closure else s) for a, off, s in use.entries]
    an.literals = [(node, path, base, _rescale(Info(0, segs), closure, unit).segs)
                   for node, path, base, segs in an.literals]
    an.blocks = [(label, g, [(a, off, s * unit if a in closure else s) for a, off, s in entries], full, side)
                 for label, g, entries, full, side in an.blocks]
    return closure


def _keep_label(an: Analysis, segs: Segments) -> None:
    """Give the group of a tied q/k/v split the producer's label (``qkv:out``, not ``qkv:out[0:4]``)."""
    leaves = an.leaf_segs(segs)
    if len(leaves) != 1:
        return
    x = leaves[0][0]
    parent = an.ancestor.get(x)
    if parent is None:
        return
    cls = an.find(x)
    if all(an.find(leaf) == cls for leaf, _ in an.leaves(parent)):
        an.label[x] = an.label[parent]


def split_heads(an: Analysis, n: fx.Node, info: Info, src: list[int], dst: list[int]) -> tuple[int, Info] | None:
    """A ``view``/``reshape`` that splits a token tensor's channel dim into ``(…, [parts,] heads, head_dim)``.

    ``src`` is the input shape (its channel dim must be the last dim) and ``dst`` the output shape, whose last two
    dims are the heads and ``head_dim`` (both > 1) and whose dims before them keep the input's leading dims, with
    at most one extra dim of ``parts`` (``3`` for a packed q/k/v projection). The projection's atoms are coarsened
    to heads (:func:`coarsen`), the parts are tied head by head, and the layout continues on the head dim.

    Returns:
        ``(head dim of the output, layout)``, or None when the call is not such a split (the caller freezes).
    """
    nd = len(src)
    if nd == 0 or norm_dim(info.cdim, nd) != nd - 1 or len(dst) < 3:
        return None
    pre, chan = prod(src[:-1]), src[-1]
    k = next((k for k in range(len(dst) - 2, -1, -1) if prod(dst[:k]) == pre and prod(dst[k:]) == chan), None)
    if k is None:
        return None
    outer, heads, unit = dst[k:-2], dst[-2], dst[-1]
    if len(outer) > 1 or heads < 2 or unit < 2:
        return None
    parts = outer[0] if outer else 1
    segs = info.segs
    if any(s != 1 and s % unit for _, s in segs):
        return None
    fine = [a for a, s in segs if s == 1]
    if fine:
        scaled = coarsen(an, fine, unit)
        if scaled is None:
            return None
        segs = tuple((a, s * unit) if a in scaled else (a, s) for a, s in segs)
    span = chan // parts
    pieces: list[Segments] = []
    for i in range(parts):
        sub = an.sub_layout(Info(nd - 1, segs), i * span, (i + 1) * span)
        if sub is None:
            return None
        pieces.append(sub)
    for other in pieces[1:]:
        if not an.align(pieces[0], other):
            return None
    if parts > 1:
        _keep_label(an, pieces[0])
    hdim = len(dst) - 2
    return hdim, Info(hdim, tuple((a, s // unit) for a, s in an.leaf_segs(pieces[0])))


# ----------------------------------------------------------------------------------------------------------------
# matmul, scaled_dot_product_attention, einsum, expand
# ----------------------------------------------------------------------------------------------------------------


def _operands(n: fx.Node) -> tuple[Any, Any]:
    if n.op == "call_method":
        return n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("mat2", n.kwargs.get("other"))
    a = n.args[0] if n.args else n.kwargs.get("input")
    b = n.args[1] if len(n.args) > 1 else n.kwargs.get("mat2", n.kwargs.get("other"))
    return a, b


def _batch_channel(info: Info | None, meta: Any, out_nd: int) -> int | None:
    """The output dim of an operand's channel dim when it is one of the operand's batch dims (not the last two)."""
    if info is None or not isinstance(meta, tuple) or len(meta) < 3:
        return None
    c = norm_dim(info.cdim, len(meta))
    if c >= len(meta) - 2:
        return None
    return c + out_nd - len(meta)


def matmul(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``a @ b`` (``matmul``/``bmm``, function or method) with the channel dim of both among the batch dims.

    The two operands' channels (e.g. heads of ``q`` and ``kᵀ``) are tied and the output keeps them; the MACs
    (``numel(out)·K``) follow their width. Returns None for any other matmul (the caller freezes its channels
    and counts its MACs as a constant).
    """
    a, b = _operands(n)
    ia, ib = an.tensor_info(a), an.tensor_info(b)
    ma, mb = an.meta_of(a), an.meta_of(b)
    if not isinstance(value, Tensor) or value.dim() < 3:
        return None
    nd = value.dim()
    oa, ob = _batch_channel(ia, ma, nd), _batch_channel(ib, mb, nd)
    if oa is None or oa != ob or ia is None or ib is None:
        return None
    if ma[norm_dim(ia.cdim, len(ma))] != mb[norm_dim(ib.cdim, len(mb))] or value.shape[oa] != an.width(ia):
        return None
    out = Info(oa, ia.segs)
    an.union_infos([out, Info(ob, ib.segs)], an.where(n))
    add_layout_macs(an, n, out, value.numel() * ma[-1])
    return out


def sdpa(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``F.scaled_dot_product_attention`` with the heads (channel dim of q, k and v) among the batch dims.

    q, k and v are tied head by head and the output keeps the heads; the MACs (``q·kᵀ`` and ``attn·v``:
    ``b·h·L·S·(E + Ev)``) follow the head count. A mask with one slice per head, or grouped-query attention
    (fewer k/v heads), is not understood: None (the caller freezes and counts the MACs as a constant). A mask that
    broadcasts over the heads has its own channels frozen.
    """
    def arg(i: int, key: str) -> Any:
        return n.args[i] if len(n.args) > i else n.kwargs.get(key)

    q, k, v, mask = arg(0, "query"), arg(1, "key"), arg(2, "value"), arg(3, "attn_mask")
    infos = [an.tensor_info(t) for t in (q, k, v)]
    metas = [an.meta_of(t) for t in (q, k, v)]
    if not isinstance(value, Tensor) or n.kwargs.get("enable_gqa", False):
        return None
    nd = value.dim()
    dims = [_batch_channel(i, m, nd) for i, m in zip(infos, metas)]
    if dims[0] is None or any(d != dims[0] for d in dims) or any(i is None for i in infos):
        return None
    heads = value.shape[dims[0]]
    if any(m[norm_dim(i.cdim, len(m))] != heads for i, m in zip(infos, metas) if i is not None):
        return None
    mmeta = an.meta_of(mask)
    if isinstance(mmeta, tuple):
        d = dims[0] - (nd - len(mmeta))
        if 0 <= d < len(mmeta) and mmeta[d] != 1:
            return None
        an.freeze(an.info_of(mask), f"attention mask of {target_name(n)} {an.where(n)}")
    out = Info(dims[0], infos[0].segs)  # type: ignore[union-attr]
    an.union_infos([Info(dims[0], i.segs) for i in infos if i is not None], an.where(n))
    qm, km, vm = metas
    rows = prod(qm[:-1])
    add_layout_macs(an, n, out, rows * km[-2] * (qm[-1] + vm[-1]))
    return out


def _einsum_spec(n: fx.Node) -> tuple[list[str], str, list[Any]] | None:
    """``(operand subscripts, output subscripts, operand nodes)`` of an ``einsum`` without ellipsis."""
    eq = n.args[0] if n.args else n.kwargs.get("equation")
    ops = list(n.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or "." in eq:
        return None
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    subs = lhs.split(",")
    if not arrow:
        letters = "".join(subs)
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(subs) != len(ops) or any(not set(s) <= set(string.ascii_letters) for s in (*subs, rhs)):
        return None
    return subs, rhs, ops


def einsum(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``torch.einsum`` with two operands: MACs counted exactly; a shared output letter carrying channels passes.

    ``einsum`` of two operands runs as one batched matmul over the letters of the output and the letters of both
    operands (letters of one operand only are summed away first), so its MACs are the product of those letters'
    sizes. When every operand with a channel layout has its channel dim on the same letter, that letter is in the
    output and every operand has it (e.g. the heads ``H`` of ``"BGHID,BGHJD->BGHIJ"``), the channels are tied
    and the output keeps them, and the MACs follow their width; otherwise the channels freeze and the MACs are a
    constant. Other calls (one or three operands or more, ellipsis, repeated or broadcast letters) are measured on
    the example input (:func:`autoprune.graph.fallback.count_uncounted`) and frozen.
    """
    spec = _einsum_spec(n)
    if spec is None or len(spec[0]) != 2 or not isinstance(value, Tensor):
        return _unknown(an, n, value, f"torch.einsum {an.where(n)}")
    subs, out, ops = spec
    metas = [an.meta_of(o) for o in ops]
    sizes: dict[str, int] = {}
    for s, m in zip(subs, metas):
        if not isinstance(m, tuple) or len(m) != len(s) or len(set(s)) != len(s):
            return _unknown(an, n, value, f"torch.einsum {an.where(n)}")
        for c, size in zip(s, m):
            if sizes.setdefault(c, size) != size:
                return _unknown(an, n, value, f"torch.einsum with broadcast letters {an.where(n)}")
    macs = prod(sizes[c] for c in set(out) | (set(subs[0]) & set(subs[1])))
    infos = [an.info_of(o) for o in ops]
    letters = {s[norm_dim(i.cdim, len(s))] for s, i in zip(subs, infos) if isinstance(i, Info)}
    tracked = [(s, i) for s, i in zip(subs, infos) if isinstance(i, Info)]
    if len(letters) == 1 and len(tracked) == len(ops):
        c = letters.pop()
        if c in out and all(c in s for s in subs):
            layout = Info(out.index(c), tracked[0][1].segs)
            an.union_infos([Info(norm_dim(i.cdim, len(s)), i.segs) for s, i in tracked], an.where(n))
            add_layout_macs(an, n, layout, macs)
            return layout
    an.add_const_macs(macs)
    return _frozen(an, n, value, f"torch.einsum that contracts or mixes the channel dim {an.where(n)}")


def expand(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``x.expand(...)`` / ``x.expand_as(y)``: the channel dim keeps its size and moves right by the new dims.

    Expanding a parameter (a class token ``[1, 1, C]`` expanded over the batch) gives its channel dim (the default
    one of the output: the last of a 3-D tensor) a new atom whose use slices the parameter (member ``param``), so a
    ``cat`` with the token stream ties the parameter to the hidden width.
    """
    x = n.args[0]
    info, meta = an.info_of(x), an.meta_of(x)
    if not isinstance(value, Tensor) or not isinstance(meta, tuple):
        return _unknown(an, n, value, f"unknown use of expand {an.where(n)}")
    out = tuple(value.shape)
    extra = len(out) - len(meta)
    if isinstance(info, Info):
        c = norm_dim(info.cdim, len(meta))
        if out[c + extra] == meta[c]:
            return Info(c + extra, info.segs)
        return _unknown(an, n, value, f"expand of the channel dim {an.where(n)}")
    if isinstance(info, Const) and out:
        cd = default_cdim(len(out))
        kd = cd - extra if cd is not None else -1
        if kd >= 0 and meta[kd] == out[cd] and meta[kd] > 1:
            atom = an.new_atom(meta[kd], f"{info.target}:param")
            an.add_tensor_use(info.target, "param", [(atom, 0, 1)], [(info.target, kd)], meta[kd])
            return Info(cd, ((atom, 1),))
    return _unknown(an, n, value, f"unknown use of expand {an.where(n)}")


# ----------------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------------------------


def _weights_used(n: fx.Node) -> bool:
    """True when anything reads the attention weights (item 1 of the module's output)."""
    for user in n.users:
        if user.op == "call_function" and user.target is operator.getitem and len(user.args) > 1:
            if user.args[1] == 0:
                continue
            if user.args[1] in (1, -1) and not user.users:
                continue
        return True
    return False


def multihead_attention(an: Analysis, n: fx.Node, value: Any) -> Any:
    """``nn.MultiheadAttention`` (and :class:`PrunedMultiheadAttention`): three prunable widths.

    * the embedding width of the query (and, with packed weights, of key and value, which are tied to it): the
      columns of ``in_proj_weight`` (or of ``q/k/v_proj_weight``, one group per input);
    * the heads: ``head_dim`` rows per head of each of the q, k and v parts of the in-projection and its bias
      (member ``<name>.in_proj``), ``head_dim`` columns of ``out_proj.weight``, ``bias_k``/``bias_v``; frozen when
      the attention weights (output 1) are used or a 3-D mask gives one mask per head;
    * the output width: the rows of ``out_proj`` (a new producer, e.g. coupled to a residual stream).

    MACs: the in-projection (``(L + 2S)/3`` tokens per packed weight row, or ``L``, ``S``, ``S`` for separate q, k
    and v weights), the output projection (``L`` tokens) and the two attention matmuls (``2·L·S'·head_dim`` per
    head, ``S'`` counting ``bias_k`` and ``add_zero_attn``). Masks have their own channels frozen. A call that is
    not understood (missing tensors, non-tensor output) is an unknown op, measured.
    """
    name = str(n.target)
    mod = an.mods[name]
    where = an.where(n)

    def arg(i: int, key: str, default: Any = None) -> Any:
        return n.args[i] if len(n.args) > i else n.kwargs.get(key, default)

    q, k, v = arg(0, "query"), arg(1, "key"), arg(2, "value")
    infos = [an.tensor_info(t) for t in (q, k, v)]
    metas = [an.meta_of(t) for t in (q, k, v)]
    if not isinstance(value, tuple) or len(value) != 2 or not isinstance(value[0], Tensor) \
            or any(not isinstance(m, tuple) or len(m) not in (2, 3) for m in metas):
        return _unknown(an, n, value, f"nn.MultiheadAttention call not understood {where}")
    qm, km, _ = metas
    packed = bool(mod._qkv_same_embed_dim)
    heads, hd = int(mod.num_heads), int(mod.head_dim)
    attn = heads * hd
    e_out = int(mod.out_proj.out_features)
    tokens_q, tokens_k = prod(qm[:-1]), prod(km[:-1])
    batched = len(qm) == 3
    src_len = (km[1] if mod.batch_first else km[0]) if batched else km[0]
    src_len += int(mod.bias_k is not None) + int(bool(mod.add_zero_attn))

    # MACs: projections per weight, attention per head
    if packed:
        an.add_mac_term(f"{name}.in_proj_weight", (tokens_q + 2 * tokens_k) / 3)
    else:
        an.add_mac_term(f"{name}.q_proj_weight", tokens_q)
        an.add_mac_term(f"{name}.k_proj_weight", tokens_k)
        an.add_mac_term(f"{name}.v_proj_weight", tokens_k)
    an.add_mac_term(f"{name}.out_proj.weight", tokens_q)

    # embedding width of the inputs
    widths = (int(mod.embed_dim), int(mod.kdim), int(mod.vdim))
    weights = ("in_proj_weight",) * 3 if packed else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    seen: set[Any] = set()
    for node, info, meta, width, weight in zip((q, k, v), infos, metas, widths, weights):
        if node in seen and packed:
            continue
        seen.add(node)
        entries = an.layout_for(info, meta, len(meta) - 1, width, name, where, allow_stride=False)
        an.add_use(name, "in", entries, [(weight, 1)], width)

    # heads
    h_atom = an.new_atom(heads, f"{name}:heads")
    proj = f"{name}.in_proj"
    parts = [(h_atom, i * attn, hd) for i in range(3)]
    if packed:
        an.add_tensor_use(proj, "out", parts, [(f"{name}.in_proj_weight", 0)], 3 * attn)
    else:
        an.add_tensor_use(proj, "out", [(h_atom, 0, hd)],
                          [(f"{name}.{w}", 0) for w in ("q_proj_weight", "k_proj_weight", "v_proj_weight")], attn)
    if mod.in_proj_bias is not None:
        an.add_tensor_use(proj, "out", parts, [(f"{name}.in_proj_bias", 0)], 3 * attn)
    for extra in ("bias_k", "bias_v"):
        if getattr(mod, extra, None) is not None:
            an.add_tensor_use(f"{name}.{extra}", "param", [(h_atom, 0, hd)], [(f"{name}.{extra}", 2)], attn)
    an.add_use(f"{name}.out_proj", "in", [(h_atom, 0, hd)], [("weight", 1)], attn)
    add_layout_macs(an, n, Info(0, ((h_atom, 1),)), 2 * tokens_q * src_len * hd * heads)
    mask = arg(5, "attn_mask")
    mask_meta = an.meta_of(mask)
    if isinstance(mask_meta, tuple) and len(mask_meta) == 3:
        an.freeze_atoms([h_atom], f"attn_mask with one mask per head (3-D) {where}")
    if _weights_used(n):
        an.freeze_atoms([h_atom], f"the attention weights returned by {name} are used {where}")
    for m in (arg(3, "key_padding_mask"), mask):
        an.freeze(an.info_of(m), f"attention mask of {name} {where}")

    # output width
    o_atom = an.new_atom(e_out, f"{name}.out_proj:out")
    an.add_use(f"{name}.out_proj", "out", [(o_atom, 0, 1)], [("weight", 0), ("bias", 0)], e_out)
    out = Info(value[0].dim() - 1, ((o_atom, 1),))
    weights_info = None
    if isinstance(value[1], Tensor):
        weights_info = an.fresh(shape_meta(value[1]), f"{name}:weights", f"attention weights of {name} {where}")
    return out, weights_info


# ----------------------------------------------------------------------------------------------------------------
# torchvision's Swin: the fx-wrapped shifted_window_attention
# ----------------------------------------------------------------------------------------------------------------

#: Qualified name of torchvision's window attention (fx-wrapped; a key of ``rules.WRAPPED_FUNCTION_RULES``).
TORCHVISION_WINDOW_ATTENTION = "torchvision.models.swin_transformer.shifted_window_attention"
#: Parameters of ``shifted_window_attention`` in order (:func:`pruned_shifted_window_attention` adds ``head_dim``).
_SWA_PARAMS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
               "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training",
               "head_dim")


def _qualified(fn: Any) -> str:
    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{qual}" if isinstance(module, str) and isinstance(qual, str) else ""


def _swa_arg(n: fx.Node, key: str) -> tuple[Any, tuple[Any, ...]]:
    """Argument ``key`` of a window-attention call and its path in the node (positional or keyword)."""
    i = _SWA_PARAMS.index(key)
    if len(n.args) > i:
        return n.args[i], ("args", i)
    return n.kwargs.get(key), ("kwargs", key)


def pruned_shifted_window_attention(
    input: Tensor, qkv_weight: Tensor, proj_weight: Tensor, relative_position_bias: Tensor, window_size: list[int],
    num_heads: int, shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0,
    qkv_bias: Tensor | None = None, proj_bias: Tensor | None = None, logit_scale: Tensor | None = None,
    training: bool = True, head_dim: int | None = None,
) -> Tensor:
    """torchvision's ``shifted_window_attention`` (Swin V1 and V2) with the attention width decoupled from the input.

    torchvision's function takes ``head_dim = C // num_heads`` from its input's width ``C`` and maps the output back
    to ``C`` channels, so it only runs while ``input width == num_heads·head_dim == output width``. Here ``head_dim``
    is a parameter (default ``C // num_heads``, torchvision's), the attention width is ``num_heads·head_dim`` and the
    output width is ``proj_weight``'s rows; everything else (padding, cyclic shift and its mask, windows, scaled or
    cosine attention with ``logit_scale``, relative position bias, V2's zeroed key bias, dropout) is torchvision's
    computation, step by step. :func:`autoprune.pruning.apply` calls this function in place of torchvision's where
    pruned heads or a pruned hidden width no longer fit it (:func:`retarget_window_attention`).

    Args:
        input: ``[B, H, W, C]`` tokens.
        qkv_weight, qkv_bias: The packed q/k/v projection (``3·num_heads·head_dim`` rows, ``C`` columns).
        proj_weight, proj_bias: The output projection (``num_heads·head_dim`` columns).
        relative_position_bias: Added to the attention logits (``[1, num_heads, N, N]``, ``N`` tokens per window).
        window_size, shift_size: Window and cyclic shift, ``[h, w]`` each.
        num_heads: Number of heads.
        attention_dropout, dropout: Dropout of the attention weights and of the output.
        logit_scale: Swin V2's per-head scale of the cosine attention (``[num_heads, 1, 1]``), or None.
        training: Whether dropout is active.
        head_dim: Channels per head (default ``C // num_heads``).

    Returns:
        ``[B, H, W, proj rows]``.
    """
    b, h, w, c = input.shape
    hd = c // num_heads if head_dim is None else int(head_dim)
    wh, ww = window_size[0], window_size[1]
    pad_r = (ww - w % ww) % ww
    pad_b = (wh - h % wh) % wh
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift = list(shift_size)
    if wh >= pad_h:
        shift[0] = 0
    if ww >= pad_w:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    num_windows = (pad_h // wh) * (pad_w // ww)
    x = x.view(b, pad_h // wh, wh, pad_w // ww, ww, c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * num_windows, wh * ww, c)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length:2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * hd ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = x.new_zeros((pad_h, pad_w))
        h_slices = ((0, -wh), (-wh, -shift[0]), (-shift[0], None))
        w_slices = ((0, -ww), (-ww, -shift[1]), (-shift[1], None))
        count = 0
        for hs in h_slices:
            for ws in w_slices:
                mask[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        mask = mask.view(pad_h // wh, wh, pad_w // ww, ww).permute(0, 2, 1, 3).reshape(num_windows, wh * ww)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), num_heads * hd)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    out = x.size(-1)
    x = x.view(b, pad_h // wh, pad_w // ww, wh, ww, out)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, out)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def relative_position_bias(an: Analysis, n: fx.Node, value: Any) -> Any:
    """torchvision's ``_get_relative_position_bias(table, index, window_size)`` (fx-wrapped): ``[1, heads, N, N]``.

    It gathers rows of the ``[L, heads]`` table and moves its columns (one per head) to dim 1. A parameter table
    gets an atom of its columns (member ``param``, labelled ``<attention>:heads``); a computed one (Swin V2's
    ``cpb_mlp(...).view(-1, heads)``) passes its channel layout on. The index has no channels (one that carries
    some freezes them). Anything else is an unknown op.
    """
    table = n.args[0] if n.args else n.kwargs.get("relative_position_bias_table")
    index = n.args[1] if len(n.args) > 1 else n.kwargs.get("relative_position_index")
    info, meta = an.info_of(table), an.meta_of(table)
    where = an.where(n)
    if not isinstance(value, Tensor) or value.dim() != 4 or not isinstance(meta, tuple) or len(meta) != 2 \
            or value.shape[1] != meta[1]:
        return _unknown(an, n, value, f"torchvision _get_relative_position_bias call not understood {where}")
    an.freeze(an.info_of(index), f"relative position index with channels {where}")
    if isinstance(info, Const):
        owner = info.target.rpartition(".")[0] or info.target
        atom = an.new_atom(meta[1], f"{owner}:heads")
        an.add_tensor_use(info.target, "param", [(atom, 0, 1)], [(info.target, 1)], meta[1])
        return Info(1, ((atom, 1),))
    if isinstance(info, Info) and norm_dim(info.cdim, 2) == 1:
        return Info(1, info.segs)
    return _unknown(an, n, value, f"torchvision _get_relative_position_bias of a table without per-head columns "
                                  f"{where}")


def _tie_position_bias(an: Analysis, n: fx.Node, h_atom: int, heads: int, where: str) -> None:
    """Tie the relative position bias ``[1, heads, N, N]`` to the heads, or freeze both."""
    bias, _ = _swa_arg(n, "relative_position_bias")
    info, meta = an.info_of(bias), an.meta_of(bias)
    fits = isinstance(meta, tuple) and len(meta) == 4 and meta[1] == heads
    if fits and isinstance(info, Info) and norm_dim(info.cdim, 4) == 1 and an.width(info) == heads:
        an.union_infos([Info(1, ((h_atom, 1),)), info], where)
        return
    if fits and isinstance(info, Const):  # a bias stored whole, [1, heads, N, N]
        an.add_tensor_use(info.target, "param", [(h_atom, 0, 1)], [(info.target, 1)], heads)
        return
    reason = f"relative position bias of the window attention {where} not understood (its heads frozen)"
    an.freeze_atoms([h_atom], reason)
    an.freeze(info, reason)


def shifted_window_attention(an: Analysis, n: fx.Node, value: Any) -> Any:
    """torchvision's ``shifted_window_attention`` (fx-wrapped, Swin V1 and V2) and its pruned form.

    With the weights and biases passed as parameters (``get_attr``), a 4-D channels-last input, a literal
    ``num_heads`` and widths the function accepts, the call has three channel groups, like
    ``nn.MultiheadAttention``:

    * the hidden width of the input: the columns of ``qkv_weight`` (member ``<qkv> in``);
    * the heads: ``head_dim`` rows per head of each of the q, k and v parts of ``qkv_weight`` and ``qkv_bias``
      (``<qkv> out``), ``head_dim`` columns of ``proj_weight`` (``<proj> in``), V2's ``logit_scale`` rows
      (``param``) and the relative position bias's head dim, tied to the table's columns or to V2's ``cpb_mlp``
      output (:func:`relative_position_bias`); the ``num_heads`` literal is rewritten on apply (``head_dim`` is
      kept: torchvision's function would derive it from the input's width, so where the pruned widths no longer
      fit it, :func:`retarget_window_attention` calls :func:`pruned_shifted_window_attention` with ``head_dim``
      instead);
    * the output width: the rows of ``proj_weight`` and ``proj_bias`` (``<proj> out``).

    The same rule reads :func:`pruned_shifted_window_attention` (``head_dim`` explicit). MACs are exact: the qkv
    and output projections over the padded tokens (``B·⌈H/w₀⌉w₀·⌈W/w₁⌉w₁``) and the two
    attention matmuls (``2·tokens·w₀w₁`` per attention channel, following the heads). A call not understood has
    its MACs counted the same way as constants and freezes its hidden width and heads; a relative position bias
    that cannot be tied to the heads freezes the heads.
    """
    x, _ = _swa_arg(n, "input")
    qkv_w, _ = _swa_arg(n, "qkv_weight")
    proj_w, _ = _swa_arg(n, "proj_weight")
    window, _ = _swa_arg(n, "window_size")
    heads, heads_path = _swa_arg(n, "num_heads")
    head_dim, _ = _swa_arg(n, "head_dim")
    meta, wq, wp = an.meta_of(x), an.meta_of(qkv_w), an.meta_of(proj_w)
    where = an.where(n)
    name = "shifted_window_attention" if _qualified(n.target) == TORCHVISION_WINDOW_ATTENTION else target_name(n)
    ok = isinstance(meta, tuple) and len(meta) == 4 and isinstance(wq, tuple) and len(wq) == 2 \
        and isinstance(wp, tuple) and len(wp) == 2 and isinstance(window, (list, tuple)) and len(window) == 2 \
        and all(isinstance(w, int) for w in window) and isinstance(value, Tensor)
    if not ok:
        return _unknown(an, n, value, f"{name} call not understood {where}")
    b, h, w, c = meta
    tokens = b * math.ceil(h / window[0]) * window[0] * math.ceil(w / window[1]) * window[1]
    attn = wq[0] // 3
    attention_macs = 2 * tokens * window[0] * window[1] * attn
    refs = {key: an.info_of(_swa_arg(n, key)[0]) for key in ("qkv_weight", "proj_weight")}
    extras = {key: _swa_arg(n, key)[0] for key in ("qkv_bias", "proj_bias", "logit_scale")}
    hd = head_dim if isinstance(head_dim, int) else c // heads if isinstance(heads, int) and heads > 0 else 0
    understood = all(isinstance(r, Const) for r in refs.values()) \
        and all(e is None or isinstance(an.info_of(e), Const) for e in extras.values()) \
        and isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 and hd > 0 \
        and wq[0] == 3 * heads * hd and wq[1] == c and wp[1] == attn \
        and (head_dim is not None or c == attn == wp[0])
    if not understood:
        for node, shape in ((qkv_w, wq), (proj_w, wp)):
            ref = an.info_of(node)
            if isinstance(ref, Const):
                an.add_mac_term(ref.target, tokens)
            else:
                an.add_const_macs(tokens * prod(shape))
        an.add_const_macs(attention_macs)
        return _frozen(an, n, value, f"{name} call not understood {where}: hidden width and heads frozen")
    qkv_t, proj_t = refs["qkv_weight"].target, refs["proj_weight"].target  # type: ignore[union-attr]
    qkv = qkv_t[: -len(".weight")] if qkv_t.endswith(".weight") else qkv_t
    proj = proj_t[: -len(".weight")] if proj_t.endswith(".weight") else proj_t
    owner = qkv.rpartition(".")[0] or qkv
    bias_t = {k: an.info_of(e).target for k, e in extras.items() if e is not None}  # type: ignore[union-attr]
    an.add_mac_term(qkv_t, tokens)
    an.add_mac_term(proj_t, tokens)
    # hidden width of the input
    entries = an.layout_for(an.tensor_info(x), meta, 3, c, qkv, where, allow_stride=True)
    an.add_tensor_use(qkv, "in", entries, [(qkv_t, 1)], c)
    # heads
    h_atom = an.new_atom(heads, f"{owner}:heads")
    rows = [(qkv_t, 0)] + ([(bias_t["qkv_bias"], 0)] if "qkv_bias" in bias_t else [])
    an.add_tensor_use(qkv, "out", [(h_atom, i * attn, hd) for i in range(3)], rows, 3 * attn)
    an.add_tensor_use(proj, "in", [(h_atom, 0, hd)], [(proj_t, 1)], attn)
    if "logit_scale" in bias_t:
        scale = bias_t["logit_scale"]
        if an.meta_of(extras["logit_scale"])[:1] == (heads,):
            an.add_tensor_use(scale, "param", [(h_atom, 0, 1)], [(scale, 0)], heads)
        else:
            an.freeze_atoms([h_atom], f"logit_scale of the window attention {where} is not one value per head")
    _tie_position_bias(an, n, h_atom, heads, where)
    an.add_literal(n.name, heads_path, heads, ((h_atom, 1),))
    add_layout_macs(an, n, Info(0, ((h_atom, 1),)), attention_macs)
    # output width
    o_atom = an.new_atom(wp[0], f"{proj}:out")
    cols = [(proj_t, 0)] + ([(bias_t["proj_bias"], 0)] if "proj_bias" in bias_t else [])
    an.add_tensor_use(proj, "out", [(o_atom, 0, 1)], cols, wp[0])
    return Info(3, ((o_atom, 1),))


def retarget_window_attention(gm: fx.GraphModule) -> bool:
    """Call :func:`pruned_shifted_window_attention` where pruning made torchvision's window attention unfit.

    For every call of torchvision's ``shifted_window_attention`` in ``gm`` (after :func:`autoprune.pruning.apply`
    sliced the tensors and rewrote ``num_heads``) whose input width, attention width (``qkv_weight`` rows / 3) and
    output width (``proj_weight`` rows) are no longer equal, the node calls the decoupled function with
    ``head_dim = attention width / num_heads`` (unchanged by pruning whole heads) and is marked as wrapped, so the
    generated code and a later trace keep it one call. Returns True when a node changed (recompile ``gm``).
    """
    changed = False
    for n in gm.graph.nodes:
        if n.op != "call_function" or _qualified(n.target) != TORCHVISION_WINDOW_ATTENTION:
            continue
        qkv_w, _ = _swa_arg(n, "qkv_weight")
        proj_w, _ = _swa_arg(n, "proj_weight")
        heads, _ = _swa_arg(n, "num_heads")
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (qkv_w, proj_w)) \
                or not isinstance(heads, int) or heads < 1:
            continue  # not understood by the analysis, so not pruned
        wq, wp = _fetch(gm, str(qkv_w.target)), _fetch(gm, str(proj_w.target))
        c_in, attn, c_out = wq.shape[1], wq.shape[0] // 3, wp.shape[0]
        if c_in == attn == c_out:
            continue
        n.target = pruned_shifted_window_attention
        n.kwargs = {**n.kwargs, "head_dim": attn // heads}
        n.meta["is_wrapped"] = True
        changed = True
    return changed


def _fetch(gm: nn.Module, target: str) -> Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# The pruned nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------------------------


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose query width, attention width and output width may differ.

    PyTorch's forward requires ``query width == num_heads·head_dim == embed_dim`` (and an ``out_proj`` mapping
    back to ``embed_dim``). After pruning heads (fewer rows in the in-projection, fewer columns in ``out_proj``)
    or the embedding width of the inputs or the output, the three differ; this subclass keeps the parameters,
    their names and the attribute meanings (``embed_dim``: query width, ``kdim``/``vdim``: key/value widths,
    ``num_heads``, ``head_dim``; ``out_proj.in_features = num_heads·head_dim``) and computes attention exactly as
    PyTorch does (same masks, ``bias_k``/``bias_v``, ``add_zero_attn``, dropout, ``need_weights``,
    ``average_attn_weights``, ``batch_first``, unbatched inputs), with the softmax scale ``1/sqrt(head_dim)``.
    When the widths fit PyTorch's forward again, that forward runs (fast path included).

    Args:
        embed_dim: Query width.
        num_heads: Number of heads.
        head_dim: Channels per head.
        dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype: As for
            ``nn.MultiheadAttention``.
        out_features: Width of the output (``embed_dim`` when None).
        qkv_same_embed_dim: One packed ``in_proj_weight`` (True) or separate ``q/k/v_proj_weight`` (False);
            by default packed exactly when ``kdim == vdim == embed_dim``.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, out_features: int | None = None,
                 qkv_same_embed_dim: bool | None = None, device: Any = None, dtype: Any = None) -> None:
        nn.Module.__init__(self)
        fk = {"device": device, "dtype": dtype}
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        packed = (kdim == embed_dim and vdim == embed_dim) if qkv_same_embed_dim is None else bool(qkv_same_embed_dim)
        if packed and (kdim != embed_dim or vdim != embed_dim):
            raise ValueError("a packed in-projection needs kdim == vdim == embed_dim")
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"num_heads and head_dim must be positive, got {num_heads} and {head_dim}")
        self.embed_dim, self.kdim, self.vdim = int(embed_dim), int(kdim), int(vdim)
        self._qkv_same_embed_dim = packed
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        attn = self.num_heads * self.head_dim
        if packed:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * attn, self.embed_dim), **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((attn, self.embed_dim), **fk))
            self.k_proj_weight = nn.Parameter(torch.empty((attn, self.kdim), **fk))
            self.v_proj_weight = nn.Parameter(torch.empty((attn, self.vdim), **fk))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * attn, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        out = self.embed_dim if out_features is None else int(out_features)
        self.out_proj = NonDynamicallyQuantizableLinear(attn, out, bias=bias, **fk)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, attn), **fk))
            self.bias_v = nn.Parameter(torch.empty((1, 1, attn), **fk))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = bool(add_zero_attn)
        self._reset_parameters()

    @classmethod
    def from_module(cls, mod: nn.MultiheadAttention, *, embed_dim: int, kdim: int, vdim: int,
                    num_heads: int) -> PrunedMultiheadAttention:
        """A :class:`PrunedMultiheadAttention` holding ``mod``'s (already sliced) parameters and submodules."""
        new = cls.__new__(cls)
        new.__dict__.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in mod.__dict__.items()})
        new.embed_dim, new.kdim, new.vdim, new.num_heads = int(embed_dim), int(kdim), int(vdim), int(num_heads)
        return new

    @property
    def attn_dim(self) -> int:
        """Width of the attention (``num_heads·head_dim``): rows of each of the q, k and v projections."""
        return self.num_heads * self.head_dim

    def _fits_torch(self) -> bool:
        """True when PyTorch's own forward accepts these widths."""
        attn = self.attn_dim
        return attn == self.embed_dim == self.out_proj.out_features and \
            self._qkv_same_embed_dim == (self.kdim == self.embed_dim and self.vdim == self.embed_dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (same arguments and outputs)."""
        if self._fits_torch():
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        return self._decoupled_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)

    def _decoupled_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                           need_weights: bool, attn_mask: Tensor | None, average_attn_weights: bool,
                           is_causal: bool) -> tuple[Tensor, Tensor | None]:
        """``F.multi_head_attention_forward`` with the attention width ``num_heads·head_dim`` of its own."""
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v, attn_mask = self._heads(query, key, value, attn_mask, key_padding_mask)
        out, weights = self._attend(q, k, v, attn_mask, need_weights, average_attn_weights, is_causal,
                                    query.shape[0], query.shape[1])
        if not is_batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        if self.batch_first and is_batched:
            out = out.transpose(0, 1)
        return out, weights

    def _heads(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
               key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Project ``(L, N, E)`` inputs to per-head ``(N·h, L, d)`` q, k, v (``bias_k``/``bias_v``, zero
        attention appended) and merge the masks into one additive mask (or None)."""
        tgt_len, bsz, _ = query.shape
        h, d = self.num_heads, self.head_dim
        attn = h * d
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(attn)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(attn)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        q = q.reshape(tgt_len, bsz * h, d).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * h, d).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * h, d).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * h, 1, d), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        if key_padding_mask is not None:
            src_len = k.size(1)
            key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, h, -1, -1).reshape(
                bsz * h, 1, src_len)
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        return q, k, v, attn_mask

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, need_weights: bool,
                average_attn_weights: bool, is_causal: bool, tgt_len: int, bsz: int) -> tuple[Tensor, Tensor | None]:
        """Attention of per-head q, k, v and the output projection: ``(L, N, out)`` and the weights (or None)."""
        h, d = self.num_heads, self.head_dim
        src_len = k.size(1)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q * math.sqrt(1.0 / float(d))
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))
            else:
                scores = torch.bmm(scores, k.transpose(-2, -1))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, h * d)
            out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, h, tgt_len, src_len)
            return out, weights.mean(dim=1) if average_attn_weights else weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, h, -1, src_len)
        out = F.scaled_dot_product_attention(q.view(bsz, h, tgt_len, d), k.view(bsz, h, src_len, d),
                                             v.view(bsz, h, src_len, d), attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, h * d)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1), None


def _encode_pruned_mha(m: nn.Module) -> dict[str, Any]:
    assert isinstance(m, PrunedMultiheadAttention)
    return {
        "embed_dim": m.embed_dim, "num_heads": m.num_heads, "head_dim": m.head_dim, "dropout": float(m.dropout),
        "bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None,
        "add_zero_attn": bool(m.add_zero_attn), "kdim": m.kdim, "vdim": m.vdim, "batch_first": bool(m.batch_first),
        "out_features": int(m.out_proj.out_features), "qkv_same_embed_dim": bool(m._qkv_same_embed_dim),
    }  # fmt: skip


def _register() -> None:
    from autoprune import serialize

    serialize.register_module_type(PrunedMultiheadAttention, _encode_pruned_mha)


_register()
