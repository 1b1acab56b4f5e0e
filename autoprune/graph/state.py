"""The analysis state: channel atoms, union-find, layouts and freezing, run over the traced graph.

:class:`Analysis` runs the traced graph once on the example input (an :class:`torch.fx.Interpreter`, which gives
real shapes) and hands every node to a rule function it is given (the driver, :func:`autoprune.graph.analysis.
analyze`, passes :func:`autoprune.graph.rules.apply_rule`). It owns the state the rules work on, through a small
API:

* atoms: :meth:`~Analysis.new_atom`, :meth:`~Analysis.fresh` (new frozen atoms for an output structure);
* layouts: :meth:`~Analysis.info_of`, :meth:`~Analysis.tensor_info`, :meth:`~Analysis.meta_of`,
  :meth:`~Analysis.entries`, :meth:`~Analysis.width`, :meth:`~Analysis.layout_for`, :meth:`~Analysis.sub_layout`;
* coupling: :meth:`~Analysis.align`, :meth:`~Analysis.union_infos`, :meth:`~Analysis.freeze`,
  :meth:`~Analysis.freeze_atoms`;
* the traced modules (``mods``, name → module) and the leaf reasons of opaque modules (``leaf_reasons``), read
  only;
* records: :meth:`~Analysis.add_use`, :meth:`~Analysis.add_tensor_use`, :meth:`~Analysis.add_literal`,
  :meth:`~Analysis.add_mac_term`, :meth:`~Analysis.add_const_macs`, :meth:`~Analysis.add_blocks`,
  :meth:`~Analysis.observe_input`, :meth:`~Analysis.observe_output`.

**Tensor constants.** ``torch.fx`` stows a tensor that is not a parameter or buffer of the model (one computed
while tracing, e.g. ``self.index.view(-1)`` of a buffer, or a plain tensor attribute) as an attribute of the
traced graph module (``_tensor_constant0``, …). Such a tensor (``constants``) is not part of the model and cannot
be sliced: a use that would slice it freezes the channels it meets instead (:meth:`~Analysis.add_tensor_use`).

**Channel dim of new tensors.** The output of an op without a rule gets new frozen atoms (:meth:`~Analysis.fresh`)
on the dim where its input's channels were (same rank: the same dim; channels-last inputs: the last dim), and the
default dim (1, or the last dim of a 3-D tensor) only when no input says otherwise, so a channels-last (NHWC)
tensor does not get atoms sized by its height. Atoms along which no tensor is ever sliced do not become groups
(:func:`autoprune.graph.analysis.analyze` leaves them out).

The graph's ``get_attr`` tensors are copies during the run (:meth:`~Analysis.get_attr`), so an in-place op in the
traced code cannot change the model's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from autoprune.errors import AutoPruneError
from autoprune.graph.common import default_cdim, node_args, norm_dim, shape_meta, target_name
from autoprune.graph.layout import Entries, Info, Segments, Use, iter_infos

__all__ = ["Analysis", "Rule"]

#: A per-op rule dispatcher: ``rule(analysis, node, value)`` returns the node's channel layout.
Rule = Callable[["Analysis", fx.Node, Any], Any]


class Analysis(fx.Interpreter):
    """Runs the traced graph once and applies a channel rule per node (see the module docstring).

    Args:
        gm: The traced model.
        leaf_reasons: Opaque leaf module name → why it is opaque.
        rule: ``rule(analysis, node, value)`` → the node's layout (:func:`autoprune.graph.rules.apply_rule`).
        constants: Names of the graph module's tensors that are not parameters or buffers of the model (tensor
            constants made while tracing, plain tensor attributes): never sliced, their channels freeze.
    """

    def __init__(self, gm: fx.GraphModule, leaf_reasons: Mapping[str, str], rule: Rule, *,
                 constants: Iterable[str] = ()) -> None:
        super().__init__(gm)
        self.rule = rule
        self.constants = frozenset(constants)  # tensors of the graph module that are not the model's (see above)
        self.current: fx.Node | None = None  # the node whose rule is running
        self._attr_copies: dict[str, torch.Tensor] = {}
        self.extra_traceback = False  # fx's structured-trace logging imports inductor (seconds) on errors
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
        self.uses: list[Use] = []
        self.mac_terms: list[tuple[str, float]] = []  # (weight tensor name, multiplier over the batch)
        self.macs_const = 0.0
        self.literals: list[tuple[str, tuple[Any, ...], int, Segments]] = []
        self.output_meta: Any = None
        # grouped convs: (label, groups, layout entries, full width, side) for their input and output layouts
        self.blocks: list[tuple[str, int, Entries, int, str]] = []
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
        """A new atom of ``size`` channels named ``label`` (``#k`` appended on reuse), frozen when ``reason``."""
        k = self.labels_used.get(label, 0)
        self.labels_used[label] = k + 1
        name = label if k == 0 else f"{label}#{k + 1}"
        a = self._add(size, name, (len(self.parent),), (name, 0))
        if reason:
            self.reasons.setdefault(a, []).append(reason)
        return a

    def find(self, a: int) -> int:
        """Union-find root of a leaf atom."""
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union_leaves(self, a: int, b: int) -> None:
        """Merge the classes of two leaf atoms (the smaller root wins)."""
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
        """The segments of a layout with every atom replaced by its leaf atoms."""
        return [(leaf, s) for a, s in segs for leaf, _ in self.leaves(a)]

    def boundaries(self, segs: Sequence[tuple[int, int]]) -> set[int]:
        """Element positions where a leaf atom starts in a layout."""
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

    def sub_layout(self, info: Info, lo: int, hi: int) -> Segments | None:
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
        """Freeze atoms (and so their groups) with a reason."""
        for a in atoms:
            self.reasons.setdefault(a, []).append(reason)

    def freeze(self, obj: Any, reason: str) -> None:
        """Freeze every atom of the layouts inside an analysis value (:func:`~autoprune.graph.layout.iter_infos`)."""
        self.freeze_atoms((a for info in iter_infos(obj) for a, _ in info.segs), reason)

    def union_infos(self, infos: Sequence[Info], where: str) -> bool:
        """Union layouts channel by channel; on a layout mismatch freeze them all and return False."""
        first = infos[0]
        for other in infos[1:]:
            if self.width(other) != self.width(first) or not self.align(first.segs, other.segs):
                self.freeze(list(infos), f"tensors with different channel layouts meet {where}")
                return False
        return True

    def entries(self, info: Info) -> Entries:
        """The ``(atom, offset, stride)`` entries of a layout."""
        out, off = [], 0
        for a, s in info.segs:
            out.append((a, off, s))
            off += self.size[a] * s
        return out

    def width(self, info: Info) -> int:
        """Number of positions along a layout's channel dim."""
        return sum(self.size[a] * s for a, s in info.segs)

    # -- helpers ---------------------------------------------------------------------------------------------

    def where(self, n: fx.Node) -> str:
        """``at <module>`` / ``at node <name>``, for reasons."""
        stack = n.meta.get("nn_module_stack")
        if n.op == "call_module":
            return f"at {n.target}"
        if stack:
            path = list(stack.values())[-1][0]
            return f"at {path} (node {n.name})"
        return f"at node {n.name}"

    def fresh(self, meta: Any, label: str, reason: str) -> Any:
        """New frozen atoms for every tensor in an output structure (on the dim :meth:`channel_dim` picks)."""
        if isinstance(meta, tuple) and all(isinstance(x, int) for x in meta):
            cd = self.channel_dim(meta)
            if cd is None:
                return None
            return Info(cd, ((self.new_atom(meta[cd], label, reason), 1),))
        if isinstance(meta, (tuple, list)):
            return type(meta)(self.fresh(m, label, reason) for m in meta)
        if isinstance(meta, dict):
            return {k: self.fresh(m, label, reason) for k, m in meta.items()}
        return None

    def channel_dim(self, shape: tuple[int, ...]) -> int | None:
        """The channel dim of a new tensor of ``shape`` made by the running node, whose layout no rule knows.

        Taken from the node's tensor inputs with a known layout: an input of the same rank gives its channel dim
        (one whose size is unchanged first); when every such input is channels-last (e.g. NHWC activations), the
        last dim. Only without such inputs (model inputs, tensors computed from constants) is it the default: 1,
        or 2 for a 3-D tensor (tokens × channels). None for a 0-d tensor.
        """
        nd = len(shape)
        if nd == 0:
            return None
        hints: list[tuple[int, tuple[int, ...]]] = []
        if self.current is not None:
            for a in node_args(self.current):
                info, meta = self.infos.get(a), self.meta.get(a)
                if isinstance(info, Info) and isinstance(meta, tuple) and meta \
                        and all(isinstance(v, int) for v in meta):
                    hints.append((norm_dim(info.cdim, len(meta)), meta))
        same = [(c, m) for c, m in hints if len(m) == nd]
        for c, m in same:
            if shape[c] == m[c]:
                return c
        if same:
            return same[0][0]
        if hints and all(c == len(m) - 1 for c, m in hints):
            return nd - 1
        return default_cdim(nd)

    def info_of(self, a: Any) -> Any:
        """What the analysis knows about an argument (a layout, a nested structure, ...; None for constants)."""
        return self.infos.get(a) if isinstance(a, fx.Node) else None

    def meta_of(self, a: Any) -> Any:
        """The shape(s) an argument had on the example input (None for constants)."""
        return self.meta.get(a) if isinstance(a, fx.Node) else None

    def tensor_info(self, a: Any) -> Info | None:
        """An argument's channel layout, if it is a tracked tensor."""
        i = self.info_of(a)
        return i if isinstance(i, Info) else None

    def layout_for(self, info: Info | None, meta: Any, cdim: int, size: int, label: str, where: str,
                   allow_stride: bool) -> Entries:
        """Entries of a consumer's input along ``cdim``; an unusable layout is frozen and replaced."""
        ok = (info is not None and isinstance(meta, tuple) and norm_dim(info.cdim, len(meta)) == cdim
              and self.width(info) == size and (allow_stride or all(s == 1 for _, s in info.segs)))
        if ok:
            assert info is not None
            return self.entries(info)
        if info is not None:
            self.freeze(info, f"channel layout not understood by consumer {where}")
        return [(self.new_atom(size, f"{label}:in", f"input layout not understood {where}"), 0, 1)]

    def add_use(self, module: str, role: str, entries: Entries, tensors: Sequence[tuple[str, int]], full: int,
                groups: int = 1) -> None:
        """Record that ``module`` slices its tensors ``(attribute, dim)`` along a layout (missing ones skipped)."""
        mod = self.mods.get(module)
        present = []
        for tname, dim in tensors:
            if mod is not None and "." not in tname:
                if getattr(mod, tname, None) is None or not isinstance(getattr(mod, tname), torch.Tensor):
                    continue
                present.append((f"{module}.{tname}", dim))
            else:
                present.append((tname, dim))
        self.uses.append(Use(module, role, list(entries), self._sliceable(module, entries, present), int(full),
                             groups))

    def add_tensor_use(self, module: str, role: str, entries: Entries, tensors: Sequence[tuple[str, int]],
                       full: int) -> None:
        """Record a use whose tensors are given by their full names (functional layers, bare attributes).

        A tensor constant among them (see the module docstring) is not sliced: the channels of ``entries`` freeze.
        """
        self.uses.append(Use(module, role, list(entries), self._sliceable(module, entries, tensors), full))

    def _sliceable(self, module: str, entries: Entries, tensors: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        """``tensors`` without the tensor constants; each constant freezes the atoms of ``entries``, with a reason."""
        out = []
        for tname, dim in tensors:
            if tname not in self.constants:
                out.append((tname, dim))
                continue
            where = self.where(self.current) if self.current is not None else f"at {module}"
            self.freeze_atoms([a for a, _, _ in entries],
                              f"channels meet the tensor constant {tname} (made while tracing or a plain tensor "
                              f"attribute, not a parameter or buffer of the model, so it cannot be sliced) {where}")
        return out

    def add_literal(self, node: str, path: tuple[Any, ...], base: int, segs: Segments) -> None:
        """Record a Python integer at ``path`` in ``node``'s arguments whose value is the width of ``segs``."""
        self.literals.append((node, path, base, segs))

    def add_mac_term(self, weight: str, multiplier: float) -> None:
        """MACs of one call of a layer: ``multiplier × numel(weight)`` (over the example batch)."""
        self.mac_terms.append((weight, multiplier))

    def add_const_macs(self, macs: float) -> None:
        """MACs (over the example batch) of an op whose cost does not follow any group width."""
        self.macs_const += macs

    def add_blocks(self, label: str, groups: int, entries: Entries, full: int, side: str) -> None:
        """A grouped conv's "equal kept count per block" constraint on one of its layouts (input or output)."""
        self.blocks.append((label, groups, list(entries), full, side))

    def observe_input(self, value: Any) -> None:
        """Take the batch size from the first tensor input (MACs are reported per sample)."""
        if isinstance(value, torch.Tensor) and value.dim() > 0 and not self.batch_found:
            self.batch, self.batch_found = int(value.shape[0]), True

    def observe_output(self, meta: Any) -> None:
        """Remember the shapes of the model outputs."""
        self.output_meta = meta

    # -- interpreter hook ------------------------------------------------------------------------------------

    def get_attr(self, target: fx.node.Target, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A graph attribute; tensors are copies (one per attribute), so in-place ops leave the model unchanged."""
        value = super().get_attr(target, args, kwargs)
        if not isinstance(value, torch.Tensor):
            return value
        key = str(target)
        if key not in self._attr_copies:
            self._attr_copies[key] = value.detach().clone()
        return self._attr_copies[key]

    def run_node(self, n: fx.Node) -> Any:
        """Run one node, then apply its channel rule (a failing rule freezes the node's channels)."""
        self.current = n
        try:
            value = super().run_node(n)
        except Exception as exc:
            raise AutoPruneError(
                f"running the model on the example input failed at node {n.name} ({target_name(n)}): "
                f"{type(exc).__name__}: {exc}",
                hint="pass an example input of the shape and dtype the model expects") from exc
        self.meta[n] = shape_meta(value)
        try:
            self.infos[n] = self.rule(self, n, value)
        except AutoPruneError:
            raise
        except Exception as exc:  # a rule bug must not break analysis: freeze conservatively instead
            reason = f"analysis rule failed {self.where(n)} ({type(exc).__name__}: {exc})"
            self.freeze([self.info_of(a) for a in node_args(n)], reason)
            self.infos[n] = self.fresh(self.meta[n], f"{n.name}:out", reason)
        return value
