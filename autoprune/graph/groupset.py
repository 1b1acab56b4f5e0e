"""The result of the analysis: the channel groups of one model plus what slicing and pricing them needs."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from autoprune.errors import AutoPruneError, ConfigError
from autoprune.graph.common import close_hint, shape_meta
from autoprune.graph.records import ChannelGroup, CostTerms, LiteralSite

__all__ = ["MOSTLY_FROZEN_SHARE", "GroupSet", "mark_constants"]

#: Above this share of frozen producer channels, analyze warns that the model is mostly frozen (ENGINE.md §2.5).
MOSTLY_FROZEN_SHARE = 0.5


def _resolve_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def mark_constants(gm: fx.GraphModule, names: Iterable[str]) -> None:
    """Make the tensor constants ``names`` of a graph module non-persistent buffers.

    They are buffers of the graph module (fx registers the tensors a ``get_attr`` reads as buffers) but not
    tensors of the model, so the state dict keeps the model's names only.
    """
    for name in names:
        owner_path, _, field = name.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            continue
        if field in owner._buffers:
            owner._non_persistent_buffers_set.add(field)


def _clone_module(mod: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """Copy a module, taking tensors from ``memo``; plain torch.nn leaves get a fast shallow copy."""
    if mod._modules or not type(mod).__module__.startswith("torch.nn.modules"):
        return copy.deepcopy(mod, memo)
    new = copy.copy(mod)
    for key, val in list(new.__dict__.items()):
        if isinstance(val, (dict, list, set)):  # nothing done to the copy may reach the original's containers
            new.__dict__[key] = copy.copy(val)
    new._parameters = {k: (memo.get(id(v), v) if v is not None else None) for k, v in mod._parameters.items()}
    new._buffers = {k: (memo.get(id(v), v) if v is not None else None) for k, v in mod._buffers.items()}
    return new


class GroupSet:
    """The channel groups of one model, in execution order, plus everything needed to slice and price them.

    Iterating yields every :class:`ChannelGroup` (frozen ones included) in execution order. ``gs[id]`` looks a
    group up (unknown ids raise :class:`~autoprune.errors.ConfigError` with close matches). Every group has at
    least one member: channels along which no module or tensor is sliced (e.g. a dim of a tensor whose channel
    dim the analysis does not know) are not channel groups of the model, so counts of frozen groups count real
    channels only.

    Attributes:
        graph_module: The traced ``torch.fx.GraphModule`` (it shares its submodules with the analysed model).
        example_input: The example input the analysis ran on.
        output_shapes: Shapes of the model outputs (nested like the outputs).
        tensor_dims: ``tensor name -> {dim: [(group id, offset, stride), ...]}`` for every sliced tensor.
        grouped_dims: ``tensor name -> {dim: groups}`` for the input dim of grouped conv weights, whose
            ``tensor_dims`` entries count along the virtual ``C_in`` axis (see :class:`TensorSlice`).
        exported_modules: Modules rebuilt through the ``torch.export`` front-end (``""`` = the whole model).
        constants: Tensors of :attr:`graph_module` that are not parameters or buffers of the analysed model:
            constants ``torch.fx`` made while tracing (``_tensor_constant0``, e.g. ``self.index.view(-1)`` of a
            buffer) and plain tensor attributes. They are never sliced (channels they meet are frozen), never
            looked up by :meth:`tensors_of`, and :meth:`instantiate` copies them.
        module_roles: ``(module, role) -> [(group id, offset, stride), ...]`` and the full size, per role.
        literals: Literal sizes in ``view``/``reshape`` calls that depend on widths.
        cost_terms: Closed-form cost rows (see :class:`CostTerms`).
        batch_size: Batch size of the example input (MACs are reported per sample).
        cache: Derived data other modules compute on demand and keep with the analysis (the pricing forms of
            :mod:`autoprune.cost`).
    """

    def __init__(self, groups: Sequence[ChannelGroup], graph_module: fx.GraphModule, example_input: Any, *,
                 output_shapes: Any, tensor_dims: dict[str, dict[int, list[tuple[str, int, int]]]],
                 tensor_shapes: dict[str, tuple[int, ...]],
                 module_roles: dict[tuple[str, str], tuple[int, list[tuple[str, int, int]]]],
                 literals: Sequence[LiteralSite], cost_terms: CostTerms, batch_size: int,
                 aliases: dict[str, list[str]], grouped_dims: dict[str, dict[int, int]] | None = None,
                 constants: Sequence[str] = ()) -> None:
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
        self.constants: frozenset[str] = frozenset(constants)
        self.exported_modules: list[str] = []  # modules rebuilt through torch.export ("" = the whole model)
        # producer channels (groups with an ``out`` member, not frozen only by model input/output or
        # keep_widths_of), how many of them are frozen, and the reasons with the channels each freezes (set by
        # analyze; see frozen_share / frozen_warning)
        self.producer_channels = 0
        self.frozen_producer_channels = 0
        self.freeze_causes: list[tuple[str, int]] = []
        self._canon = {n: c for c, names in aliases.items() for n in names}
        self.prunable_ids = [g.id for g in self._groups if g.prunable]
        self.cache: dict[str, Any] = {}  # derived data computed on demand (autoprune.cost's pricing forms)

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
            raise ConfigError(f"unknown channel group {gid!r}", hint=close_hint(gid, list(self._by_id))) from None

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
        return shape_meta(self.example_input)

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
            raise ConfigError(f"layer {layer!r} has no {role} channel group", hint=close_hint(layer, known))
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
        (same names and shapes), e.g. a fine-tuned copy. Tensor constants (:attr:`constants`) are not among them.

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

    def instantiate(self, model: nn.Module,
                    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> fx.GraphModule:
        """A new graph module with the traced structure and (transformed) copies of ``model``'s tensors.

        Args:
            model: Source of the tensor values (see :meth:`tensors_of`). A tensor constant (:attr:`constants`)
                comes from ``model`` when it has a tensor of that name and shape (a plain tensor attribute),
                otherwise from :attr:`graph_module`.
            transform: ``f(canonical name, tensor) -> tensor`` applied to every parameter and buffer; the
                default clones. Tied tensors stay tied; nothing is shared with ``model``.
        """
        src = self.tensors_of(model)
        gm = self.graph_module
        for name in self.constants:
            if name not in src:
                src[name] = self._constant_of(model, name)
        memo: dict[int, Any] = {}
        made: dict[str, Any] = {}
        constants = [(n, _resolve_attr(gm, n)) for n in sorted(self.constants)]
        with torch.no_grad():
            for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(
                    gm.named_buffers(remove_duplicate=False)) + constants:
                if id(t) in memo:
                    continue
                c = self._canon.get(name, name)
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
        mark_constants(new, self.constants)
        flags = {n: m.training for n, m in gm.named_modules()}
        for n, m in new.named_modules():
            m.training = flags.get(n, gm.training)
        return new

    def _constant_of(self, model: nn.Module, name: str) -> torch.Tensor:
        """Tensor constant ``name``: ``model``'s attribute of that name and shape if it has one, else the graph's."""
        own = _resolve_attr(self.graph_module, name)
        if model is not self.graph_module:
            try:
                found = _resolve_attr(model, name)
            except AttributeError:
                found = None
            if isinstance(found, torch.Tensor) and found.shape == own.shape:
                return found
        return own

    # -- reports ---------------------------------------------------------------------------------------------

    def frozen_share(self) -> float:
        """Share of the producer channels that are frozen (ENGINE.md §2.5; 0.0 when there are none).

        Producer channels are the channels of groups with a conv/linear ``out`` member, except groups frozen
        only by what is frozen by design (``model input``, ``model output``, ``keep_widths_of``).
        """
        return self.frozen_producer_channels / self.producer_channels if self.producer_channels else 0.0

    def frozen_warning(self, threshold: float = MOSTLY_FROZEN_SHARE) -> str | None:
        """A one-line warning when more than ``threshold`` of the producer channels are frozen, with the top causes.

        Returns:
            ``"mostly frozen: 87 % of 120 producer channels cannot be pruned; top causes: <reason> (64 ch); ..."``
            or None when the share is at most ``threshold``.
        """
        share = self.frozen_share()
        if share <= threshold:
            return None
        causes = "; ".join(f"{reason} ({ch} ch)" for reason, ch in self.freeze_causes[:3])
        more = f" (+{len(self.freeze_causes) - 3} more)" if len(self.freeze_causes) > 3 else ""
        return (f"mostly frozen: {100 * share:.0f} % of {self.producer_channels} producer channels cannot be "
                f"pruned; top causes: {causes}{more}")

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
        warning = self.frozen_warning()
        if warning:
            lines.append(f"WARNING: {warning}")
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

