"""The analysis state and driver: channel atoms, union-find, layouts, freezing; :func:`analyze` and its finish.

:class:`Analysis` runs the traced graph once on the example input (an :class:`torch.fx.Interpreter`, which gives
real shapes) and hands every node to the per-op rules of :mod:`autoprune.graph.rules`. It owns the state the
rules work on, through a small API:

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

:func:`analyze` traces the model (:mod:`autoprune.graph.trace`), runs the analysis, applies ``keep_widths_of``,
unions tied tensors, resolves grouped-conv block constraints into group divisors and builds the
:class:`~autoprune.graph.GroupSet` with its cost rows (:mod:`autoprune.graph.terms`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from autoprune.errors import AutoPruneError, ConfigError
from autoprune.graph.common import close_hint, default_cdim, node_args, norm_dim, shape_meta, target_name
from autoprune.graph.groupset import GroupSet
from autoprune.graph.layout import Entries, Info, Segments, Use, iter_infos
from autoprune.graph.records import ChannelGroup, LiteralSite, Member, TensorSlice
from autoprune.graph.rules import apply_rule
from autoprune.graph.terms import annotate, build_terms
from autoprune.graph.trace import trace

__all__ = ["Analysis", "analyze"]

_MAX_REASONS = 3


class Analysis(fx.Interpreter):
    """Runs the traced graph once and applies a channel rule per node (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, leaf_reasons: Mapping[str, str]) -> None:
        super().__init__(gm)
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
        """New frozen atoms for every tensor in an output structure."""
        if isinstance(meta, tuple) and all(isinstance(x, int) for x in meta):
            cd = default_cdim(len(meta))
            if cd is None:
                return None
            return Info(cd, ((self.new_atom(meta[cd], label, reason), 1),))
        if isinstance(meta, (tuple, list)):
            return type(meta)(self.fresh(m, label, reason) for m in meta)
        if isinstance(meta, dict):
            return {k: self.fresh(m, label, reason) for k, m in meta.items()}
        return None

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
        self.uses.append(Use(module, role, list(entries), present, int(full), groups))

    def add_tensor_use(self, module: str, role: str, entries: Entries, tensors: Sequence[tuple[str, int]],
                       full: int) -> None:
        """Record a use whose tensors are given by their full names (functional layers, bare attributes)."""
        self.uses.append(Use(module, role, list(entries), list(tensors), full))

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

    def run_node(self, n: fx.Node) -> Any:
        """Run one node, then apply its channel rule (a failing rule freezes the node's channels)."""
        try:
            value = super().run_node(n)
        except Exception as exc:
            raise AutoPruneError(
                f"running the model on the example input failed at node {n.name} ({target_name(n)}): "
                f"{type(exc).__name__}: {exc}",
                hint="pass an example input of the shape and dtype the model expects") from exc
        self.meta[n] = shape_meta(value)
        try:
            self.infos[n] = apply_rule(self, n, value)
        except AutoPruneError:
            raise
        except Exception as exc:  # a rule bug must not break analysis: freeze conservatively instead
            reason = f"analysis rule failed {self.where(n)} ({type(exc).__name__}: {exc})"
            self.freeze([self.info_of(a) for a in node_args(n)], reason)
            self.infos[n] = self.fresh(self.meta[n], f"{n.name}:out", reason)
        return value


# ----------------------------------------------------------------------------------------------------------------
# analyze
# ----------------------------------------------------------------------------------------------------------------


def analyze(model: nn.Module, example_input: Any, *, keep_widths_of: Iterable[str] = (),
            opaque: Iterable[type[nn.Module] | str] = (), use_export: bool = True) -> GroupSet:
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
            ``torch.export`` (see :mod:`autoprune.graph`) before falling back to an opaque leaf.

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
    gm, leaf_reasons = trace(model, list(opaque), args if use_export else None, exported)
    flags = {m: m.training for m in gm.modules()}
    flags.update({m: m.training for m in model.modules()})
    run_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    an = Analysis(gm, leaf_reasons)
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


def _apply_keep(an: Analysis, keep: list[str]) -> None:
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
                              hint=close_hint(pat, list(producers) + list(labels)))


def _canonical_names(gm: fx.GraphModule) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Map every tensor name -> canonical name (its first name), and canonical -> aliases."""
    by_id: dict[int, str] = {}
    canon: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        c = by_id.setdefault(id(t), name)
        canon[name] = c
        aliases.setdefault(c, []).append(name)
    return canon, aliases


def _tied_unions(an: Analysis, canon: dict[str, str]) -> None:
    """Union the layouts of every tensor dim used by several calls (shared modules, tied parameters)."""
    per_dim: dict[tuple[str, int], list[Use]] = {}
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


def _effective_reasons(an: Analysis, leaf: int) -> list[str]:
    out: list[str] = []
    a: int | None = leaf
    while a is not None:
        out.extend(an.reasons.get(a, []))
        a = an.ancestor.get(a)
    return out


def _leaf_entries(an: Analysis, entries: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    return [(leaf, off + start * s, s) for a, off, s in entries for leaf, start in an.leaves(a)]


def _resolve_blocks(an: Analysis) -> dict[int, int]:
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


def _finalize(an: Analysis, gm: fx.GraphModule, example_input: Any) -> GroupSet:
    canon, aliases = _canonical_names(gm)
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
    prunable_ids = [g.id for g in groups if g.prunable]
    cost_terms = build_terms(prunable_ids, sizes, tdims, tshapes, an.mac_terms, an.macs_const / an.batch, an.batch,
                             {canon[n] for n, _ in gm.named_parameters()}, canon, grouped=grouped_dims)
    return GroupSet(annotate(groups, cost_terms), gm, example_input, output_shapes=an.output_meta,
                    tensor_dims=tdims, tensor_shapes=tshapes, module_roles=module_roles, literals=literals,
                    cost_terms=cost_terms, batch_size=an.batch, aliases=aliases, grouped_dims=grouped_dims)
