"""The analysis driver: :func:`analyze` and its finish.

:func:`analyze` traces the model (:mod:`autoprune.graph.trace`), runs :class:`~autoprune.graph.state.Analysis`
with the per-op rules of :mod:`autoprune.graph.rules`, applies ``keep_widths_of``, unions tied tensors, resolves
grouped-conv block constraints into group divisors and builds the :class:`~autoprune.graph.GroupSet` with its
cost rows (:mod:`autoprune.graph.terms`).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from autoprune.errors import AutoPruneError, ConfigError
from autoprune.graph.common import close_hint
from autoprune.graph.groupset import GroupSet, mark_constants
from autoprune.graph.layout import Use
from autoprune.graph.records import ChannelGroup, LiteralSite, Member, TensorSlice
from autoprune.graph.rules import apply_rule
from autoprune.graph.state import Analysis
from autoprune.graph.terms import annotate, build_terms
from autoprune.graph.trace import trace

__all__ = ["analyze"]

_MAX_REASONS = 3
#: Reasons that freeze a group by design, not for want of a rule (left out of the mostly-frozen share).
_BY_DESIGN = ("model input", "model output", "keep_widths_of ")

log = logging.getLogger("autoprune.graph")


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
    snapshot = _Snapshot(model)
    try:
        gm, leaf_reasons = trace(model, list(opaque), args if use_export else None, exported)
        flags = {m: m.training for m in gm.modules()}
        run_args = pytree.tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, args)
        constants = _constants(model, gm)
        if gm is not model:
            mark_constants(gm, constants)
        an = Analysis(gm, leaf_reasons, apply_rule, constants=constants)
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
    finally:
        snapshot.restore()
    _apply_keep(an, list(keep_widths_of))
    gs = _finalize(an, gm, example_input)
    gs.exported_modules = exported
    warning = gs.frozen_warning()
    if warning:
        log.warning("%s: %s (GroupSet.describe() lists every group with its reason)", type(model).__name__, warning)
    return gs


def _version(t: torch.Tensor) -> int | None:
    """A tensor's in-place version counter (None where it has none, e.g. inference tensors)."""
    try:
        return int(t._version)
    except Exception:
        return None


class _Snapshot:
    """What running a model's code (tracing, torch.export capture, the analysis run) could change in it.

    Per module: the ``__dict__`` (attributes added or replaced, e.g. a value cached in ``forward`` or the
    constants fx stows on the root), the contents of its dicts, lists and sets (parameters, buffers, submodules,
    hooks), hence also the training flags; the values of buffers and plain tensor attributes (in-place updates);
    and the version counters of parameters. :meth:`restore` puts everything back; a parameter changed in place
    (only the model's own code, e.g. an opaque leaf, can do so: the analysis runs on copies of the graph's
    attributes) cannot be restored and is logged.
    """

    def __init__(self, model: nn.Module) -> None:
        self.name = type(model).__name__
        self.modules: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = []
        self.tensors: dict[int, tuple[torch.Tensor, int | None, torch.Tensor]] = {}
        self.params: dict[int, tuple[str, torch.Tensor, int | None]] = {}
        for name, m in model.named_modules():
            attrs = dict(m.__dict__)
            contents = {k: copy.copy(v) for k, v in attrs.items() if isinstance(v, (dict, list, set))}
            self.modules.append((m, attrs, contents))
            for v in attrs.values():
                if isinstance(v, torch.Tensor) and id(v) not in self.tensors:  # a plain tensor attribute
                    self.tensors[id(v)] = (v, _version(v), v.detach().clone())
            for k, p in m._parameters.items():
                if p is not None and id(p) not in self.params:
                    self.params[id(p)] = (f"{name}.{k}" if name else k, p, _version(p))
            for b in m._buffers.values():
                if b is not None and id(b) not in self.tensors:
                    self.tensors[id(b)] = (b, _version(b), b.detach().clone())

    def restore(self) -> None:
        """Put the attributes, containers and tensor values back as they were."""
        for m, attrs, contents in self.modules:
            d = m.__dict__
            for k in [k for k in d if k not in attrs]:
                del d[k]
            for k, v in attrs.items():
                if d.get(k, _MISSING) is not v:
                    d[k] = v
            for k, saved in contents.items():
                cur = d[k]
                if isinstance(cur, dict) and (cur.keys() != saved.keys() or any(cur[x] is not saved[x] for x in cur)):
                    cur.clear()
                    cur.update(saved)
                elif isinstance(cur, list) and (len(cur) != len(saved) or any(a is not b for a, b in zip(cur, saved))):
                    cur[:] = saved
                elif isinstance(cur, set) and cur != saved:
                    cur.clear()
                    cur.update(saved)
        with torch.no_grad():
            for t, version, saved in self.tensors.values():
                v = _version(t)
                try:
                    if (v is None or v != version) and not torch.equal(t, saved):
                        t.copy_(saved)
                except Exception:  # meta or exotic tensors: nothing to compare or restore
                    pass
        changed = [name for name, p, version in self.params.values() if version is not None and
                   _version(p) != version]
        if changed:
            log.warning("%s: its own forward code changed parameter(s) %s in place while it was analysed",
                        self.name, ", ".join(changed[:5]) + (" …" if len(changed) > 5 else ""))


_MISSING = object()


def _constants(model: nn.Module, gm: fx.GraphModule) -> set[str]:
    """Names of the graph module's tensors (and ``get_attr`` tensors) that are not parameters or buffers of ``model``.

    These are the constants fx made while tracing (``_tensor_constant0``) and plain tensor attributes.
    """
    own = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    out = {n for n, t in list(gm.named_parameters(remove_duplicate=False)) +
           list(gm.named_buffers(remove_duplicate=False)) if id(t) not in own}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = _attr(gm, str(node.target))
            if isinstance(obj, torch.Tensor) and id(obj) not in own:
                out.add(str(node.target))
    return out


def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


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


def _canonical_names(gm: fx.GraphModule, constants: Iterable[str] = ()) -> tuple[dict[str, str],
                                                                                 dict[str, list[str]]]:
    """Map every tensor name -> canonical name (its first name), and canonical -> aliases.

    Tensor constants (not the model's tensors) have canonical names but no aliases, so they are never looked up
    in a model (:meth:`GroupSet.tensors_of`).
    """
    by_id: dict[int, str] = {}
    canon: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        c = by_id.setdefault(id(t), name)
        canon[name] = c
        aliases.setdefault(c, []).append(name)
    for c in set(constants) & set(aliases):
        del aliases[c]
    return canon, aliases


def _tensor_shapes(gm: fx.GraphModule, canon: dict[str, str], constants: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> full shape, for the graph module's tensors and the constants its graph reads."""
    shapes = {canon[n]: tuple(t.shape) for n, t in list(gm.named_parameters()) + list(gm.named_buffers())}
    for name in constants:  # e.g. a plain tensor attribute read by get_attr (its MACs may be counted)
        t = _attr(gm, name)
        if isinstance(t, torch.Tensor):
            shapes.setdefault(canon.get(name, name), tuple(t.shape))
    return shapes


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
    canon, aliases = _canonical_names(gm, an.constants)
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
    # Only classes that some module or tensor uses are channel groups: an atom nothing is sliced along (e.g. new
    # frozen atoms on a dim of a tensor computed from constants) is no group of the model.
    order = [r for r in order if members[r]]
    tshapes = _tensor_shapes(gm, canon, an.constants)
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
    gs = GroupSet(annotate(groups, cost_terms), gm, example_input, output_shapes=an.output_meta,
                  tensor_dims=tdims, tensor_shapes=tshapes, module_roles=module_roles, literals=literals,
                  cost_terms=cost_terms, batch_size=an.batch, aliases=aliases, grouped_dims=grouped_dims,
                  constants=sorted(an.constants))
    gs.producer_channels, gs.frozen_producer_channels, gs.freeze_causes = _freeze_stats(
        groups, frozen_reasons, order, gid)
    return gs


def _freeze_stats(groups: list[ChannelGroup], reasons: dict[int, list[str]], order: list[int],
                  gid: dict[int, str]) -> tuple[int, int, list[tuple[str, int]]]:
    """Producer channels, frozen producer channels and the freezing reasons with the channels each freezes.

    Producer channels belong to groups with an ``out`` member (a conv/linear/embedding output), except groups
    frozen only by design (:data:`_BY_DESIGN`: model input/output, ``keep_widths_of``). Causes are sorted by
    channels, then by first appearance.
    """
    by_id = {g.id: g for g in groups}
    total = frozen = 0
    causes: dict[str, int] = {}
    for r in order:
        g = by_id[gid[r]]
        if not any(m.role == "out" for m in g.members):
            continue
        own = [x for x in reasons[r] if not x.startswith(_BY_DESIGN)]
        if reasons[r] and not own:
            continue
        total += g.size
        if own:
            frozen += g.size
            for x in own:
                causes[x] = causes.get(x, 0) + g.size
    ranked = sorted(causes.items(), key=lambda kv: -kv[1])  # stable: ties keep execution order
    return total, frozen, ranked
