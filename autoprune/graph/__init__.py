"""Channel-dependency analysis: which channels of a network must be pruned together.

This package owns :func:`analyze`, which turns a model and an example input into a :class:`GroupSet` of
:class:`ChannelGroup` records (ENGINE.md §2). The front-end is ``torch.fx.symbolic_trace``
(:mod:`~autoprune.graph.trace`); every node is then executed once on the example input (an
:class:`torch.fx.Interpreter`, which gives real shapes) and a rule per canonical op kind
(:mod:`~autoprune.graph.rules`) maps the node's *channel layout* — a list of segments ``(atom, stride)`` along the
tensor's channel dimension — from its inputs to its output. Atoms that must be pruned identically are merged with
a union-find (:mod:`~autoprune.graph.state`). An atom can be refined into sub-ranges when only part of it is
coupled to something else: a zero-pad on channels (option-A shortcuts: the pad amounts follow the widths of the
padded ranges), ``split`` with explicit sizes (rewritten on apply), literal channel slices ``x[:, a:b]`` and
``narrow`` (the bounds rewritten on apply) and ``chunk`` (the equal pieces are tied). Anything without a rule
freezes the channels it touches, so a missing rule makes pruning less aggressive but never produces a broken
model.

Grouped convolutions (``1 < groups``, not depthwise; ``groups == out_channels != in_channels`` is grouped, and a
conv with ``out_channels == 1`` has ``groups == 1``) require the same number of kept channels in each of their
``g`` input blocks and ``g`` output blocks. These constraints become group divisors (legal widths are multiples,
:meth:`ChannelGroup.legal_widths`; :func:`autoprune.pruning.plan` keeps the top ``width / divisor`` channels of
every block, and each output block of the conv keeps the columns of its own input block). When a conv's blocks
mix channel groups unevenly (e.g. a concat straddling the blocks) the channels are frozen with a reason, as is a
group whose divisor leaves no smaller width (one channel per block, e.g. the output of a conv with ``groups ==
out_channels != in_channels``). A depthwise conv with a channel multiplier (``groups == in_channels``,
``out_channels = m·in_channels``) is not grouped in this sense: input channel ``i`` feeds outputs ``i·m …
i·m + m − 1``, so its output layout is its input layout with strides times ``m`` (pruning an input channel removes
its ``m`` outputs; apply rewrites ``groups`` to the kept input width).

Strided layouts also come from a **channel shuffle** (``view(N, g, C/g, H, W)``, ``transpose(1, 2)``, ``view(N, -1,
H, W)``): the view makes *channel blocks* that only ``transpose``/``permute``, copies and a merging view
understand; the merge ties the ``g`` blocks channel by channel, and the shuffled layout is block 0's with strides
times ``g`` (literal block and merged sizes are rewritten). A channel count read with ``x.size()`` / ``x.shape``
stays free while it only sizes such views (checked to equal the sized dim's width at every group width), and
freezes the counted channels anywhere else (:class:`~autoprune.graph.rules.ChannelCount`).

**torch.export front-end** (:mod:`~autoprune.graph.export_trace`). When ``torch.fx`` fails on the model or on a
submodule (e.g. ``list(x.chunk(2, 1))`` in a YOLOv8 C2f block: "Proxy object cannot be iterated"), that module
is exported with ``torch.export.export`` (on the inputs of its first call, batch repeated twice so that the batch
size stays symbolic) and rebuilt as an fx graph: each call of a ``torch.nn`` leaf (or opaque) module, found
through ``node.meta["nn_module_stack"]``, becomes a ``call_module`` of the same submodule, and the other ATen ops
are mapped to torch functions the rules know (activations, arithmetic, cat/chunk/split, reductions,
reshape/view, permute, pooling, pad, slicing, functional conv/linear, symbolic ``size``). The rebuilt module must
reproduce the original outputs on every captured call and on the doubled batch; the model is then traced again
with it inlined, so it yields the same groups as a traceable equivalent (``a, b = x.split(c, 1)``). Not
supported, hence still opaque leaves with frozen boundaries and the failure in the reason: data-dependent
control flow (torch.export cannot guard on it either), keyword or non-tensor inputs, ATen ops outside the table
(``cumsum``, in-place writes such as ``fill_``/``copy_``, interpolation, ``batch_norm`` called functionally, …),
modules that create tensor constants, and leaf modules whose ATen ops are used outside the call.
``analyze(..., use_export=False)`` switches the front-end off.

The analysis also records, for every parameter and buffer, how each of its dimensions depends on the group
widths. :mod:`autoprune.pruning` slices tensors with it; the closed-form cost rows are built once here
(:mod:`~autoprune.graph.terms`) and :mod:`autoprune.cost` prices candidates with them.

Modules: :mod:`~autoprune.graph.records` (the frozen records), :mod:`~autoprune.graph.groupset`
(:class:`GroupSet`), :mod:`~autoprune.graph.trace` and :mod:`~autoprune.graph.export_trace` (front-ends),
:mod:`~autoprune.graph.layout` (channel layouts), :mod:`~autoprune.graph.rules` (per-op rules and their dispatch
tables), :mod:`~autoprune.graph.attention` (attention heads: ``nn.MultiheadAttention``, head-splitting reshapes,
Swin's window attention, and their MACs), :mod:`~autoprune.graph.fallback` (ops without a rule: frozen, MACs
measured), :mod:`~autoprune.graph.state` (the analysis state),
:mod:`~autoprune.graph.analysis` (the driver, :func:`analyze`), :mod:`~autoprune.graph.terms` (cost rows).
"""

from autoprune.graph.analysis import analyze
from autoprune.graph.groupset import MOSTLY_FROZEN_SHARE, GroupSet
from autoprune.graph.records import ChannelGroup, CostTerms, LiteralSite, Member, TensorSlice, nearest_width

__all__ = [
    "MOSTLY_FROZEN_SHARE",
    "ChannelGroup",
    "CostTerms",
    "GroupSet",
    "LiteralSite",
    "Member",
    "TensorSlice",
    "analyze",
    "nearest_width",
]
