"""Benchmark: every torchvision classifier through the engine at 50 % of every prunable group, beside Torch-Pruning.

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (built with ``weights=None``, eval
mode, batch 1 at 224×224, BN statistics and the weights that torchvision initialises to a constant perturbed so
that the checks test more than zeros), as a user would run the engine:

* ``graph.analyze`` (seconds, groups, prunable groups, the share of producer channels that stay frozen and the
  freezing reasons that remain, ranked by the channels they freeze);
* ``pruning.plan`` + ``pruning.apply`` with every prunable group at half its width, L1 importance (seconds);
* ``ok``: analyse, apply and a forward of the pruned model succeed with the original output shapes;
* ``equivalent``: the pruned model equals the original with the removed channels zeroed
  (``tests/engine_cases.masked_reference``, written independently of the engine) within
  ``1e-5 · max(1, max|output|)``. Where a LayerNorm normalises over pruned channels, removing a channel is not
  zeroing it (its statistics run over the kept channels only, ENGINE.md §2.4): there the masked original's
  LayerNorm also normalises over the kept channels only (:func:`masked_layer_norms`), and ``equivalence_scope``
  says so; a GroupNorm with fewer groups than channels over pruned channels is checked with only the other groups
  pruned;
* ``macs_exact``: the closed-form MACs (``cost.closed_form``) equal the counted MACs, dense and pruned. The
  counter is :func:`reference_macs`: ``FlopCounterMode`` with attention included (the MHA fast path is switched
  off and the CPU kernel of ``scaled_dot_product_attention``, which the counter counts as 0, gets its formula);
* ``macs_ratio``: pruned / dense closed-form MACs (and the counted ratio beside it);
* ``unchanged``: analyse and apply left the model passed in as it was (state dict, attributes, output);
* ``tp_macs_ratio``: Torch-Pruning 1.6.1's pruned / dense MACs with its usual recipe (``MetaPruner``, L1
  magnitude importance, ``pruning_ratio=0.5``, the classifier head ignored, ``global_pruning=False``), counted
  by the same :func:`reference_macs`; where it raises, or its pruned model fails at forward or changes the
  output shape, ``tp_status`` says so and there is no ratio. Torch-Pruning is not a dependency of autoprune:
  it is installed in the vision environment for these reference figures only.

Needs the vision environment (torch 2.14.1 + torchvision 0.29.1 + torch-pruning 1.6.1, ``make setup-vision``)::

    .venv-vision/bin/python -m benchmarks.bench_engine_zoo [--quick] [--only 'resnet*,vit_b_16'] [--skip ...]
        [--resume] [--no-torch-pruning]

Results go to ``results/benchmarks/engine_zoo.{md,json}`` (``engine_zoo_quick.*`` with ``--quick``: a handful of
small models). The JSON is rewritten after every model; ``--resume`` keeps the finished models of the previous
run and measures the rest. Single thread; times are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import fnmatch
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from benchmarks._common import REPO, command_line, git_commit, machine, result_path, write_result

NAME = "engine_zoo"
TITLE = "Engine on the torchvision classification zoo (50 % of every prunable group), beside Torch-Pruning 1.6.1"
#: Side of the square input of the full run (every torchvision classifier accepts 224×224).
SIDE = 224
#: The quick run: small models that still cover residuals, depthwise convs, SE gates, shuffle and attention.
QUICK_MODELS = ("resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "efficientnet_b0", "swin_t")
#: Relative tolerance of the equivalence check (ENGINE.md §3.4).
TOLERANCE = 1e-5
#: Pruning ratio of both engines.
RATIO = 0.5


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (tested without torchvision in tests/test_bench_engine_zoo.py)
# ----------------------------------------------------------------------------------------------------------------


def _patterns(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def select_models(names: Iterable[str], *, only: str | None = None, skip: str | None = None,
                  quick: bool = False) -> list[str]:
    """The models to measure, in the given order.

    Args:
        names: Every available model name.
        only: Comma-separated ``fnmatch`` patterns; when given, only matching models are kept.
        skip: Comma-separated ``fnmatch`` patterns of models to leave out.
        quick: Keep only :data:`QUICK_MODELS` (those that exist).

    Raises:
        ValueError: A pattern of ``only`` matches no model (a typo would otherwise measure nothing).
    """
    names = list(names)
    keep = [n for n in names if n in QUICK_MODELS] if quick else names
    wanted = _patterns(only)
    for p in wanted:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ValueError(f"--only pattern {p!r} matches no model")
    if wanted:
        keep = [n for n in keep if any(fnmatch.fnmatchcase(n, p) for p in wanted)]
    drop = _patterns(skip)
    return [n for n in keep if not any(fnmatch.fnmatchcase(n, p) for p in drop)]


_WHERE = re.compile(r" at (?:node \S+|\S+(?: \(node [^)]*\))?)")
_MODULE_NAME = re.compile(r"^(opaque module|untraceable module) \S+")


def normalize_reason(reason: str) -> str:
    """A freezing reason without its place, so that reasons can be counted across layers and models.

    ``"unknown op torch.cumsum at layer2.0 (node cumsum)"`` → ``"unknown op torch.cumsum"``;
    ``"opaque module blocks.3.attn (Attention)"`` → ``"opaque module (Attention)"``.
    """
    text = _WHERE.sub("", reason)
    text = _MODULE_NAME.sub(lambda m: m.group(1), text)
    text = re.sub(r"_tensor_constant\d+", "_tensor_constant", text)
    return re.sub(r"\s+", " ", text).strip()


def aggregate_reasons(causes: Iterable[Sequence[Any]]) -> list[tuple[str, int]]:
    """``[(reason, channels)]`` merged by :func:`normalize_reason`, most channels first (ties: first seen)."""
    total: dict[str, int] = {}
    for reason, channels in causes:
        key = normalize_reason(str(reason))
        total[key] = total.get(key, 0) + int(channels)
    return sorted(total.items(), key=lambda kv: -kv[1])


def relative_error(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor],
                   scale_of: Sequence[torch.Tensor] | None = None) -> float:
    """``max|a − b| / max(1, max|ref|)`` over matching tensors (``inf`` when shapes differ or values are not finite).

    Args:
        outputs: Tensors of the model under test.
        references: Tensors to compare with, in the same order.
        scale_of: Tensors whose largest magnitude sets the scale (default: ``references``).
    """
    if len(outputs) != len(references) or any(a.shape != b.shape for a, b in zip(outputs, references)):
        return float("inf")
    if not outputs:
        return 0.0
    scale = max(1.0, max(float(t.detach().abs().max()) if t.numel() else 0.0 for t in (scale_of or references)))
    diff = max(float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0
               for a, b in zip(outputs, references))
    return diff / scale if diff == diff else float("inf")  # NaN → inf


def head_layers(model: nn.Module, num_classes: int = 1000) -> list[nn.Module]:
    """The classifier head: the last ``Linear`` (or ``Conv2d``, SqueezeNet) with ``num_classes`` outputs.

    Torch-Pruning's recipe passes it as ``ignored_layers`` so that the class count stays.
    """
    heads = [m for m in model.modules()
             if (isinstance(m, nn.Linear) and m.out_features == num_classes)
             or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]
    return heads[-1:]


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts over the measured models and the freezing reasons that remain, summed over models.

    ``better_or_equal_than_tp`` counts the models both engines handle where autoprune's closed-form MACs ratio is
    at most Torch-Pruning's (+0.001); ``worse_than_tp`` lists the others with both ratios.
    """
    n = len(records)

    def count(key: str) -> int:
        return sum(1 for r in records if r.get(key) is True)

    both = [r for r in records if r.get("ok") and r.get("macs_ratio") is not None
            and r.get("tp_macs_ratio") is not None]
    worse = [{"model": r["model"], "macs_ratio": r["macs_ratio"], "tp_macs_ratio": r["tp_macs_ratio"]}
             for r in both if r["macs_ratio"] > r["tp_macs_ratio"] + 1e-3]
    reasons: dict[str, dict[str, int]] = {}
    for r in records:
        for reason, channels in r.get("frozen_reasons") or []:
            entry = reasons.setdefault(reason, {"models": 0, "channels": 0})
            entry["models"] += 1
            entry["channels"] += int(channels)
    ranked = sorted(reasons.items(), key=lambda kv: (-kv[1]["models"], -kv[1]["channels"], kv[0]))
    failures: dict[str, list[str]] = {}
    for r in records:
        for stage, message in (r.get("errors") or {}).items():
            if stage.startswith("tp"):
                continue
            failures.setdefault(f"{stage}: {_first_line(message)}", []).append(r["model"])
    return {
        "models": n,
        "ok": count("ok"),
        "equivalent": count("equivalent"),
        "equivalence_partial": sum(1 for r in records if r.get("ok") and _partial(r)),
        "equivalence_kept_channel_norms": sum(1 for r in records if r.get("ok") and r.get("inexact_norms")
                                              and not _partial(r)),
        "macs_exact": count("macs_exact"),
        "unchanged": count("unchanged"),
        "mostly_frozen": sum(1 for r in records if (r.get("frozen_share") or 0.0) > 0.5),
        "tp_ok": sum(1 for r in records if r.get("tp_status") == "ok"),
        "tp_measured": sum(1 for r in records if r.get("tp_status") is not None),
        "both_handle": len(both),
        "better_or_equal_than_tp": len(both) - len(worse),
        "worse_than_tp": worse,
        "frozen_reasons": [{"reason": k, **v} for k, v in ranked],
        "failures": [{"cause": k, "models": v} for k, v in sorted(failures.items())],
    }


def _first_line(text: str, limit: int = 160) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _cell(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return fmt.format(v)
    return str(v)


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(raw: dict[str, Any]) -> str:
    """The Markdown body (without the header that :func:`benchmarks._common.write_result` adds)."""
    records: list[dict[str, Any]] = raw.get("models", [])
    s = raw.get("summary") or summarize(records)
    settings = raw.get("settings", {})
    side = settings.get("side", SIDE)
    expected = settings.get("selected")
    lines = [
        f"Every torchvision classifier built with `weights=None`, eval mode, batch 1 at {side}×{side}, one thread; "
        "BN statistics and constant-initialised weights perturbed. autoprune: every prunable group at 50 % of its "
        "width, L1 importance. Torch-Pruning 1.6.1: `MetaPruner`, L1 magnitude importance, `pruning_ratio=0.5`, "
        "classifier head ignored, `global_pruning=False`. MACs of both counted the same way (`FlopCounterMode` with "
        "attention included; `macs_exact` compares autoprune's closed form with it, dense and pruned).",
        "",
    ]
    if expected is not None and len(records) < expected:
        lines += [f"**Partial run: {len(records)} of {expected} models measured** (continue with `--resume`).", ""]
    notes = ([f"{s['equivalence_kept_channel_norms']} of them with LayerNorms over pruned channels, checked against "
              "a masked original whose LayerNorms normalise over the kept channels"]
             if s.get("equivalence_kept_channel_norms") else [])
    notes += ([f"{s['equivalence_partial']} checked with only the groups pruned that no LayerNorm/GroupNorm "
               "normalises over, ENGINE.md §2.4"] if s.get("equivalence_partial") else [])
    partial = f" ({'; '.join(notes)})" if notes else ""
    lines += [
        "## Summary",
        "",
        f"- models: {s['models']}; analyse + apply + forward ok: {s['ok']}; pruned == masked original: "
        f"{s['equivalent']}{partial}; closed-form MACs == counted MACs (dense and pruned): "
        f"{s['macs_exact']}; model passed "
        f"in left unchanged: {s['unchanged']}; mostly frozen (> 50 % of producer channels): {s['mostly_frozen']}",
        f"- Torch-Pruning: valid pruned model on {s['tp_ok']} of {s['tp_measured']} models tried; both handle "
        f"{s['both_handle']}: autoprune's MACs ratio ≤ Torch-Pruning's on {s['better_or_equal_than_tp']}",
    ]
    if s["worse_than_tp"]:
        worse = ", ".join(f"{w['model']} ({w['macs_ratio']:.3f} vs {w['tp_macs_ratio']:.3f})"
                          for w in s["worse_than_tp"])
        lines.append(f"- autoprune prunes less than Torch-Pruning on: {worse}")
    lines += [
        "",
        "## Per model",
        "",
        "| model | ok | E | MACs exact | unchanged | prunable / groups | frozen share | MACs ratio | TP MACs ratio "
        "| TP | analyse (s) | apply (s) | dense GMACs | top remaining frozen reasons |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        reasons = "; ".join(f"{reason} ({ch} ch)" for reason, ch in (r.get("frozen_reasons") or [])[:2])
        if not r.get("ok"):
            stage, msg = next(iter((r.get("errors") or {"?": "failed"}).items()))
            reasons = f"**{stage} failed**: {_first_line(msg, 100)}" + (f"; {reasons}" if reasons else "")
        groups = f"{r['prunable']} / {r['groups']}" if r.get("groups") is not None else "—"
        dense = r.get("macs_dense_counter")
        e_cell = _cell(r.get("equivalent")) + (" (part)" if _partial(r) else " (LN)" if r.get("inexact_norms") else "")
        lines.append(
            f"| {r['model']} | {_cell(r.get('ok'))} | {e_cell} | {_cell(r.get('macs_exact'))} "
            f"| {_cell(r.get('unchanged'))} | {groups} | {_cell(r.get('frozen_share'), '{:.2f}')} "
            f"| {_cell(r.get('macs_ratio'))} | {_cell(r.get('tp_macs_ratio'))} | {_esc(r.get('tp_status') or '—')} "
            f"| {_cell(r.get('analyse_s'), '{:.2f}')} | {_cell(r.get('apply_s'), '{:.2f}')} "
            f"| {_cell(None if dense is None else dense / 1e9, '{:.2f}')} | {_esc(reasons)} |")
    lines += ["", "Columns: E = pruned model equals the masked original within 1e-5 relative (LN: the masked "
              "original's LayerNorms over pruned channels normalise over the kept channels, since removing a "
              "channel is not zeroing it; part: checked with only the groups pruned that no LayerNorm/GroupNorm "
              "normalises over); MACs exact = "
              "closed form equals the counter before and after pruning; unchanged = `analyze` and `apply` left the "
              "model passed in as it was (state dict, attributes, output); frozen share = frozen producer channels / "
              "producer channels (`GroupSet.frozen_share()`); TP = Torch-Pruning's outcome.", ""]
    mismatch = [r for r in records if r.get("ok") and r.get("macs_exact") is False]
    if mismatch:
        lines += ["## Closed form versus counter", "", "| model | closed dense | counted dense | closed pruned | "
                  "counted pruned | counted ratio |", "|---|---|---|---|---|---|"]
        for r in mismatch:
            lines.append(f"| {r['model']} | {r.get('macs_dense'):,} | {r.get('macs_dense_counter'):,} | "
                         f"{_cell(r.get('macs_pruned'), '{:,}')} | {_cell(r.get('macs_pruned_counter'), '{:,}')} | "
                         f"{_cell(r.get('counter_macs_ratio'))} |")
        lines.append("")
    if s["failures"]:
        lines += ["## Failures by cause", "", "| stage: error | models |", "|---|---|"]
        lines += [f"| {_esc(f['cause'])} | {', '.join(f['models'])} |" for f in s["failures"]]
        lines.append("")
    if s["frozen_reasons"]:
        lines += ["## Freezing reasons that remain", "", "Summed over models (place in the network removed).", "",
                  "| reason | models | frozen producer channels |", "|---|---|---|"]
        lines += [f"| {_esc(f['reason'])} | {f['models']} | {f['channels']:,} |" for f in s["frozen_reasons"]]
        lines.append("")
    return "\n".join(lines)


def read_raw(path: Path) -> dict[str, Any]:
    """The JSON of a previous run (``{}`` when there is none or it does not parse)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def write_raw(path: Path, raw: dict[str, Any]) -> None:
    """Write the JSON atomically (temporary file, then ``os.replace``)."""
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(raw, indent=1, default=str))
    os.replace(tmp, path)


def merge_records(previous: Sequence[dict[str, Any]], new: dict[str, Any],
                  order: Sequence[str]) -> list[dict[str, Any]]:
    """Previous records with ``new`` added or replaced, ordered as ``order`` (models not in it go last)."""
    by_name = {r["model"]: r for r in previous}
    by_name[new["model"]] = new
    rank = {n: i for i, n in enumerate(order)}
    return sorted(by_name.values(), key=lambda r: (rank.get(r["model"], len(rank)), r["model"]))


# ----------------------------------------------------------------------------------------------------------------
# Measuring (torch only; the models come from the caller)
# ----------------------------------------------------------------------------------------------------------------


def _sdpa_cpu_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: Any,
                    out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def reference_macs(module: nn.Module, example_input: Any) -> int:
    """MACs of one eval forward counted by ``FlopCounterMode``, attention included (FLOPs // 2).

    ``FlopCounterMode`` has a formula for the CUDA kernels of ``scaled_dot_product_attention`` but counts its CPU
    kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) as 0, and ``nn.MultiheadAttention``'s
    inference fast path runs as one fused op it does not know. For the count, the fast path is switched off (so
    the projections run as linear layers) and the CPU kernel gets the counter's own SDPA formula (two matmuls:
    ``2·b·h·s_q·s_k·d`` FLOPs each). ``einsum`` and explicit ``matmul`` decompose into counted ``bmm``/``mm``.
    The module runs in eval mode under ``no_grad``; its training flags are restored.
    """
    from torch.utils.flop_counter import FlopCounterMode

    custom: dict[Any, Callable[..., int]] = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = _sdpa_cpu_flops
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    flags = {m: m.training for m in module.modules()}
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    try:
        module.eval()
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
            module(*args)
    finally:
        if mha is not None and fast is not None:
            mha.set_fastpath_enabled(fast)
        for m, t in flags.items():
            m.training = t
    return int(counter.get_total_flops()) // 2


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN/LN/GN statistics and affine parameters, and random values where a weight is initialised constant.

    ``tests/engine_cases.randomize`` first; then every floating-point parameter or buffer other than a running
    statistic whose entries are all equal (zero biases and heads, ViT's class token, ConvNeXt's 1e-6 layer
    scales) gets random values — positive around 1 where the constant was positive (scales), centred on 0
    otherwise — so that the equivalence check sees every channel. Returns the model in eval mode.
    """
    engine_cases().randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        tensors = [(n, t) for n, t in model.named_parameters()]
        tensors += [(n, t) for n, t in model.named_buffers() if "running_" not in n]
        for _, t in tensors:
            if not t.is_floating_point() or t.numel() < 2:
                continue
            flat = t.detach().reshape(-1)
            if not bool((flat == flat[0]).all()):
                continue
            noise = torch.rand(t.shape, generator=g, dtype=torch.float32).to(t.dtype)
            t.copy_(noise + 0.5 if float(flat[0]) > 0 else (noise - 0.5) * 0.4)
    return model.eval()


_ENGINE_CASES: ModuleType | None = None


def engine_cases() -> ModuleType:
    """``tests/engine_cases.py`` (``randomize``, ``masked_reference``, ``half_widths``, ``flat_outputs``), imported
    once.

    The benchmark shares the test suite's reference implementations instead of copying them: the masked
    reference is written independently of the engine's own ``pruning.mask``.
    """
    global _ENGINE_CASES
    if _ENGINE_CASES is None:
        mod = sys.modules.get("engine_cases")
        if mod is None:
            spec = importlib.util.spec_from_file_location("engine_cases", REPO / "tests" / "engine_cases.py")
            if spec is None or spec.loader is None:
                raise ImportError("tests/engine_cases.py not found beside benchmarks/")
            mod = importlib.util.module_from_spec(spec)
            sys.modules["engine_cases"] = mod
            spec.loader.exec_module(mod)
        _ENGINE_CASES = mod
    return _ENGINE_CASES


def _run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return engine_cases().flat_outputs(model(x))  # tuples (Inception's outputs) and dicts included


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _attributes(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Per module: its attribute names, parameters, buffers and children (to see what a call left behind)."""
    return {name: tuple(sorted(vars(m))) + tuple(sorted(m._parameters)) + tuple(sorted(m._buffers))
            + tuple(sorted(m._modules)) for name, m in model.named_modules()}


def _unchanged(model: nn.Module, x: torch.Tensor, state: dict[str, torch.Tensor],
               attrs: dict[str, tuple[str, ...]], out: list[torch.Tensor]) -> str | None:
    """None when ``model`` still has ``state``, ``attrs`` and gives ``out``; otherwise what changed."""
    now = model.state_dict()
    if set(now) != set(state):
        return f"state_dict keys changed: added {sorted(set(now) - set(state))[:5]}, " \
               f"removed {sorted(set(state) - set(now))[:5]}"
    changed = [k for k in state if now[k].shape != state[k].shape or not torch.equal(now[k], state[k])]
    if changed:
        return f"state_dict tensors changed: {changed[:5]}"
    after = _attributes(model)
    if after != attrs:
        diff = []
        for name in sorted(set(after) | set(attrs)):
            added = set(after.get(name, ())) - set(attrs.get(name, ()))
            removed = set(attrs.get(name, ())) - set(after.get(name, ()))
            if added or removed:
                diff.append(f"{name or '<root>'}: +{sorted(added)} -{sorted(removed)}")
        return f"attributes changed: {'; '.join(diff[:5])}"
    again = _run(model, x)
    if len(again) != len(out) or any(not torch.equal(a, b) for a, b in zip(again, out)):
        return "output changed"
    return None


def _prune(rec: dict[str, Any], model: nn.Module, x: torch.Tensor) -> tuple[Any, Any, Any]:
    """Analyse and apply (filling ``rec``); returns the group set, the plan and the pruned model (None on failure)."""
    from autoprune import cost, graph, pruning

    errors = rec["errors"]
    try:
        t = time.perf_counter()
        gs = graph.analyze(model, x)
        rec["analyse_s"] = round(time.perf_counter() - t, 3)
        rec.update(groups=len(gs), prunable=len(gs.prunable()), frozen_share=round(gs.frozen_share(), 4),
                   frozen_reasons=[list(r) for r in aggregate_reasons(gs.freeze_causes)],
                   warning=gs.frozen_warning(), exported_modules=list(getattr(gs, "exported_modules", []) or []))
        rec["macs_dense"] = cost.closed_form(gs).macs
    except Exception as exc:
        errors["analyze"] = _error(exc)
        return None, None, None
    try:
        widths = engine_cases().half_widths(gs, RATIO)
        t = time.perf_counter()
        plan = pruning.plan(model, gs, widths)
        pruned = pruning.apply(model, gs, plan)
        rec["apply_s"] = round(time.perf_counter() - t, 3)
        price = cost.closed_form(gs, plan.widths)
        rec["macs_pruned"] = price.macs
        rec["macs_ratio"] = round(price.macs / rec["macs_dense"], 4) if rec["macs_dense"] else None
        rec["params_ratio"] = round(sum(p.numel() for p in pruned.parameters()) / rec["params"], 4)
    except Exception as exc:
        errors["apply"] = _error(exc)
        return gs, None, None
    return gs, plan, pruned


def inexact_norms(model: nn.Module, gs: Any, plan: Any) -> dict[str, list[str]]:
    """The pruned groups that pass through a norm whose statistics run over the group's channels.

    These norms are ``LayerNorm`` (and its subclasses, e.g. ConvNeXt's ``LayerNorm2d``) and ``GroupNorm`` with
    fewer groups than channels. Pruning such a group is not zeroing its channels (the statistics of the kept
    channels change; ENGINE.md §2.4), so the pruned model is not the masked original there.

    Returns:
        Group id → the norms (``"name (Type)"``), for the groups of ``plan.pruned()`` that have any.
    """
    mods = dict(model.named_modules())
    found: dict[str, list[str]] = {}
    for gid in plan.pruned():
        names = set()
        for m in gs[gid].members:
            mod = mods.get(m.module) if m.role == "norm" else None
            if isinstance(mod, nn.LayerNorm) or (isinstance(mod, nn.GroupNorm) and mod.num_groups != mod.num_channels):
                names.add(f"{m.module} ({type(mod).__name__})")
        if names:
            found[gid] = sorted(names)
    return found


def _partial(rec: dict[str, Any]) -> bool:
    """True when the equivalence check left some pruned groups out (``equivalence_scope`` not "all …")."""
    return bool(rec.get("inexact_norms")) and not str(rec.get("equivalence_scope") or "").startswith("all ")


def masked_layer_norms(masked: nn.Module, gs: Any, plan: Any) -> nn.Module:
    """``masked`` with every LayerNorm over pruned channels normalising over the kept channels only.

    Pruning a channel out of a LayerNorm's normalised dim changes the statistics of the others, so the pruned model
    equals the masked original only when the latter's LayerNorm ignores the removed (zeroed) channels: mean and
    variance over the kept ones, output 0 at the removed ones (their weight and bias are zeroed by the mask). Works
    for ``nn.LayerNorm`` and subclasses that call ``F.layer_norm`` over the channel dim (ConvNeXt's
    ``LayerNorm2d``): during that module's forward ``F.layer_norm`` is replaced by the kept-channel version.
    """
    import types

    import torch.nn.functional as F

    mods = dict(masked.named_modules())
    keep: dict[str, torch.Tensor] = {}
    for gid in plan.pruned():
        kept = set(plan.keep[gid])
        removed = [i for i in range(gs[gid].size) if i not in kept]
        for m in gs[gid].members:
            mod = mods.get(m.module) if m.role == "norm" else None
            if not isinstance(mod, nn.LayerNorm):
                continue
            mask = keep.setdefault(m.module, torch.ones(mod.normalized_shape[-1], dtype=torch.bool))
            for i in removed:
                mask[m.offset + i * m.stride: m.offset + (i + 1) * m.stride] = False
    original = F.layer_norm

    def kept_only(mask: torch.Tensor) -> Callable[..., torch.Tensor]:
        def layer_norm(x: torch.Tensor, shape: Any, weight: Any = None, bias: Any = None,
                       eps: float = 1e-5) -> torch.Tensor:
            out = torch.zeros_like(x)
            out[..., mask] = original(x[..., mask], (int(mask.sum()),), None if weight is None else weight[mask],
                                      None if bias is None else bias[mask], eps)
            return out
        return layer_norm

    def patched(fn: Callable[..., torch.Tensor]) -> Callable[..., Any]:
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            F.layer_norm = fn
            try:
                return type(self).forward(self, *args, **kwargs)
            finally:
                F.layer_norm = original
        return forward

    for name, mask in keep.items():
        mods[name].forward = types.MethodType(patched(kept_only(mask)), mods[name])
    return masked


def _equivalence(rec: dict[str, Any], model: nn.Module, gs: Any, plan: Any, got: list[torch.Tensor],
                 x: torch.Tensor) -> None:
    """``equivalent`` / ``max_rel_err``: the pruned model against the masked original (filling ``rec``).

    Where some pruned groups pass through a LayerNorm or GroupNorm over their channels (:func:`inexact_norms`),
    the check runs on a second plan that prunes only the other groups (the same widths), and
    ``equivalence_scope`` says so; ``equivalent`` is None when no group is left to check.
    """
    from autoprune import pruning

    ec = engine_cases()
    inexact = inexact_norms(model, gs, plan)
    rec["inexact_norms"] = sorted({n for names in inexact.values() for n in names})
    pruned_groups = plan.pruned()
    mods = dict(model.named_modules())
    if inexact and all(isinstance(mods.get(n.split(" (")[0]), nn.LayerNorm) for n in rec["inexact_norms"]):
        masked = masked_layer_norms(ec.masked_reference(model, gs, plan), gs, plan)
        rec["equivalence_scope"] = (f"all {len(pruned_groups)} pruned groups (the masked original's LayerNorms over "
                                    "pruned channels normalise over the kept channels)")
        err = relative_error(got, _run(masked, x))
        rec["max_rel_err"] = err
        rec["equivalent"] = err <= TOLERANCE
        return
    if inexact:
        exact = {g: plan.widths[g] for g in pruned_groups if g not in inexact}
        rec["equivalence_scope"] = (f"{len(exact)} of {len(pruned_groups)} pruned groups (the others pass through "
                                    "a LayerNorm/GroupNorm over their channels)")
        if not exact:
            return
        plan = pruning.plan(model, gs, exact)
        got = _run(pruning.apply(model, gs, plan), x)
    else:
        rec["equivalence_scope"] = f"all {len(pruned_groups)} pruned groups"
    masked = ec.masked_reference(model, gs, plan)
    err = relative_error(got, _run(masked, x))
    rec["max_rel_err"] = err
    rec["equivalent"] = err <= TOLERANCE


def _check_pruned(rec: dict[str, Any], model: nn.Module, gs: Any, plan: Any, pruned: nn.Module, x: torch.Tensor,
                  out: list[torch.Tensor]) -> None:
    """Forward, equivalence with the masked original and counted MACs of the pruned model (filling ``rec``)."""
    errors = rec["errors"]
    try:
        got = _run(pruned, x)
        if [t.shape for t in got] != [t.shape for t in out]:
            raise RuntimeError(f"output shapes {[tuple(t.shape) for t in got]} != {[tuple(t.shape) for t in out]}")
    except Exception as exc:
        errors["forward"] = _error(exc)
        return
    rec["ok"] = True
    try:
        _equivalence(rec, model, gs, plan, got, x)
    except Exception as exc:
        errors["equivalence"] = _error(exc)
        rec["equivalent"] = False
    try:
        rec["macs_pruned_counter"] = reference_macs(pruned, x)
        if rec["macs_dense_counter"]:
            rec["counter_macs_ratio"] = round(rec["macs_pruned_counter"] / rec["macs_dense_counter"], 4)
        rec["macs_exact"] = (rec["macs_dense"] == rec["macs_dense_counter"]
                             and rec["macs_pruned"] == rec["macs_pruned_counter"])
    except Exception as exc:
        errors["counter"] = _error(exc)
        rec["macs_exact"] = False


def measure(name: str, model: nn.Module, x: torch.Tensor, *, torch_pruning: bool = False,
            num_classes: int = 1000) -> dict[str, Any]:
    """Analyse, prune at :data:`RATIO` of every prunable group and check one model; never raises for a model error.

    Args:
        name: The model's name (recorded).
        model: The model, already perturbed (:func:`perturb`) and in eval mode. It is not modified unless the
            engine modifies it (which ``unchanged`` reports).
        x: Example input (batch 1).
        torch_pruning: Also prune a copy with Torch-Pruning (:func:`tp_prune_isolated`) and record its MACs
            ratio.
        num_classes: Output count of the classifier head (Torch-Pruning keeps it).

    Returns:
        The record: ``model``, ``input``, ``params``, ``ok``, ``equivalent``, ``macs_exact``, ``unchanged``,
        ``macs_ratio``, ``counter_macs_ratio``, ``params_ratio``, closed-form and counted MACs (``macs_dense``,
        ``macs_dense_counter``, ``macs_pruned``, ``macs_pruned_counter``), ``max_rel_err``, ``groups``,
        ``prunable``, ``frozen_share``, ``frozen_reasons`` (``[reason, channels]`` merged over places),
        ``warning``, ``exported_modules``, ``inexact_norms`` and ``equivalence_scope`` (:func:`_equivalence`),
        ``analyse_s``, ``apply_s`` (plan + apply), ``seconds``, ``errors``
        (stage → message; stages ``analyze``, ``apply``, ``forward``, ``equivalence``, ``counter``,
        ``unchanged``) and, with ``torch_pruning``, ``tp_status``, ``tp_macs_ratio``, ``tp_seconds``.
    """
    start = time.perf_counter()
    rec: dict[str, Any] = {"model": name, "input": list(x.shape), "ok": False, "equivalent": None,
                           "macs_exact": None, "unchanged": None, "macs_ratio": None, "counter_macs_ratio": None,
                           "params_ratio": None, "macs_dense": None, "macs_dense_counter": None,
                           "macs_pruned": None, "macs_pruned_counter": None, "max_rel_err": None, "groups": None,
                           "prunable": None, "frozen_share": None, "frozen_reasons": None, "warning": None,
                           "exported_modules": None, "inexact_norms": None, "equivalence_scope": None,
                           "analyse_s": None, "apply_s": None, "errors": {}}
    errors: dict[str, str] = rec["errors"]
    model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    attrs = _attributes(model)
    out = _run(model, x)
    rec["params"] = sum(p.numel() for p in model.parameters())
    try:
        rec["macs_dense_counter"] = reference_macs(model, x)
    except Exception as exc:  # recorded, the run goes on
        errors["counter"] = _error(exc)
    gs, plan, pruned = _prune(rec, model, x)
    if pruned is not None:
        _check_pruned(rec, model, gs, plan, pruned, x, out)
    elif rec["macs_dense"] is not None and rec["macs_dense_counter"] is not None:
        rec["macs_exact"] = False if rec["macs_dense"] != rec["macs_dense_counter"] else None
    del pruned, plan, gs
    try:
        changed = _unchanged(model, x, state, attrs, out)
        rec["unchanged"] = changed is None
        if changed:
            errors["unchanged"] = changed
    except Exception as exc:
        errors["unchanged"] = _error(exc)
        rec["unchanged"] = False
    del state
    gc.collect()
    if torch_pruning:
        rec.update(tp_prune_isolated(model, x, rec["macs_dense_counter"], num_classes))
    rec["seconds"] = round(time.perf_counter() - start, 2)
    return rec


def _vm_bytes() -> int:
    """Virtual memory of this process (``VmSize``), 0 where ``/proc`` is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tp_child(conn: Any, model: nn.Module, x: torch.Tensor, dense_macs: int | None, num_classes: int,
              mem_bytes: int) -> None:
    import resource

    with contextlib.suppress(OSError):  # if the kernel must kill something, let it be this child
        Path("/proc/self/oom_score_adj").write_text("1000")
    if mem_bytes > 0 and _vm_bytes():
        limit = _vm_bytes() + mem_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        conn.send(tp_prune(model, x, dense_macs, num_classes))
    except BaseException as exc:  # MemoryError included: report instead of dying silently
        conn.send({"tp_status": f"error: {_first_line(_error(exc))}", "tp_macs_ratio": None, "tp_seconds": None})
    finally:
        conn.close()


def tp_prune_isolated(model: nn.Module, x: torch.Tensor, dense_macs: int | None, num_classes: int = 1000, *,
                      timeout_s: float = 300.0, mem_gb: float | None = None) -> dict[str, Any]:
    """:func:`tp_prune` in a forked child with a memory cap and a time limit.

    Torch-Pruning's dependency tracing can run away (on Swin-T it recursed for minutes and grew until the kernel
    killed the process), so it runs in a child process whose address space may grow by at most ``mem_gb``
    (default: 4 GB + 3 × the model's parameter bytes) and that is ended after ``timeout_s``. Where ``fork`` is
    not available it runs in this process.
    """
    import multiprocessing as mp

    if mem_gb is None:
        mem_gb = round(4.0 + 3 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 1)

    if "fork" not in mp.get_all_start_methods():
        return tp_prune(model, x, dense_macs, num_classes)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    proc = ctx.Process(target=_tp_child, args=(child, model, x, dense_macs, num_classes, int(mem_gb * 2**30)))
    proc.start()
    child.close()
    try:
        if parent.poll(timeout_s):
            res = parent.recv()
        else:
            res = {"tp_status": f"timed out after {timeout_s:.0f} s", "tp_macs_ratio": None}
            proc.kill()
    except EOFError:  # the child died without answering
        res = {"tp_status": None, "tp_macs_ratio": None}
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent.close()
    if res.get("tp_status") is None:
        res["tp_status"] = f"crashed (exit code {proc.exitcode}; memory cap {mem_gb:g} GB)"
    elif "MemoryError" in res["tp_status"] or "can't allocate memory" in res["tp_status"]:
        res["tp_status"] = res["tp_status"].rstrip(": ") + f" (over its memory cap of {mem_gb:g} GB)"
    res["tp_seconds"] = round(time.perf_counter() - start, 2)
    return res


def tp_prune(model: nn.Module, x: torch.Tensor, dense_macs: int | None, num_classes: int = 1000) -> dict[str, Any]:
    """Torch-Pruning 1.6.1's usual recipe on a copy of ``model``: ``tp_status``, ``tp_macs_ratio``, ``tp_seconds``.

    ``tp_status`` is ``ok`` (pruned, forward runs, output shapes kept), ``error at prune: …``, ``error at
    forward: …``, ``output shape changed …`` or ``not installed``.
    """
    try:
        import torch_pruning as tp
    except ImportError:
        return {"tp_status": "not installed", "tp_macs_ratio": None, "tp_seconds": None}
    start = time.perf_counter()
    res: dict[str, Any] = {"tp_status": None, "tp_macs_ratio": None, "tp_seconds": None}
    try:
        m = copy.deepcopy(model).eval()
        ref_shapes = [t.shape for t in _run(m, x)]
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=RATIO,
                                      ignored_layers=head_layers(m, num_classes), global_pruning=False)
        pruner.step()
    except Exception as exc:
        res["tp_status"] = f"error at prune: {_first_line(_error(exc))}"
    else:
        try:
            got = _run(m, x)
            if [t.shape for t in got] != ref_shapes:
                res["tp_status"] = f"output shape changed to {[tuple(t.shape) for t in got]}"
            elif not all(bool(torch.isfinite(t).all()) for t in got):
                res["tp_status"] = "non-finite output"
            else:
                res["tp_status"] = "ok"
                if dense_macs:
                    res["tp_macs_ratio"] = round(reference_macs(m, x) / dense_macs, 4)
        except Exception as exc:
            res["tp_status"] = f"error at forward: {_first_line(_error(exc))}"
    res["tp_seconds"] = round(time.perf_counter() - start, 2)
    return res


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def _torchvision() -> ModuleType:
    try:
        import torchvision
    except Exception as exc:  # a broken install raises more than ImportError
        raise SystemExit(f"error: torchvision cannot be imported ({type(exc).__name__}: {exc}); this benchmark runs "
                         "in the vision environment: make setup-vision, then "
                         ".venv-vision/bin/python -m benchmarks.bench_engine_zoo") from exc
    return torchvision


def build(name: str, seed: int = 0) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None)``, perturbed (:func:`perturb`), eval mode."""
    tv = _torchvision()
    torch.manual_seed(seed)
    return perturb(tv.models.get_model(name, weights=None), seed)


def _header(args: argparse.Namespace, selected: list[str], tv_version: str) -> dict[str, Any]:
    tp_version = None
    if not args.no_torch_pruning:  # the distribution's version (torch_pruning.__version__ says 1.6.0 in 1.6.1)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tp_version = importlib.metadata.version("torch-pruning")
    return {"benchmark": NAME, "command": command_line(), "commit": git_commit(), "machine": machine(),
            "torchvision": tv_version, "torch_pruning": tp_version,
            "settings": {"side": SIDE, "ratio": RATIO, "importance": "l1", "tolerance": TOLERANCE,
                         "threads": 1, "quick": args.quick, "selected": len(selected)}}


def run(args: argparse.Namespace) -> Path:
    """Measure the selected models, rewriting the JSON and Markdown after each; return the JSON path."""
    tv = _torchvision()
    names = list(tv.models.list_models(module=tv.models))
    try:
        selected = select_models(names, only=args.only, skip=args.skip, quick=args.quick)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    path = result_path(NAME, ".json")
    previous = read_raw(path).get("models", []) if args.resume else []
    done = {r["model"] for r in previous}
    raw = {**_header(args, selected, tv.__version__), "models": [r for r in previous if r["model"] in selected]}
    todo = [n for n in selected if n not in done]
    _log(f"{len(selected)} models selected, {len(selected) - len(todo)} already measured, {len(todo)} to go")
    for i, name in enumerate(todo, 1):
        _log(f"[{i}/{len(todo)}] {name} ...")
        try:
            model = build(name)
        except Exception as exc:
            rec = {"model": name, "ok": False, "errors": {"build": _error(exc)}}
        else:
            rec = measure(name, model, torch.rand(1, 3, SIDE, SIDE), torch_pruning=not args.no_torch_pruning)
            del model
        rec["finished"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        raw["models"] = merge_records(raw["models"], rec, selected)
        raw["summary"] = summarize(raw["models"])
        raw["complete"] = len(raw["models"]) == len(selected)
        write_raw(path, raw)
        write_result(NAME, TITLE, render_markdown(raw), command=raw["command"])
        _log(f"    ok={rec.get('ok')} E={rec.get('equivalent')} macs_exact={rec.get('macs_exact')} "
             f"unchanged={rec.get('unchanged')} ratio={rec.get('macs_ratio')} tp={rec.get('tp_macs_ratio')} "
             f"({rec.get('tp_status')}) {rec.get('seconds')} s; errors: {list(rec.get('errors', {}))}")
        gc.collect()
    raw["summary"] = summarize(raw["models"])
    raw["complete"] = len(raw["models"]) == len(selected)
    write_raw(path, raw)
    write_result(NAME, TITLE, render_markdown(raw), command=raw["command"])
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write ``results/benchmarks/engine_zoo.{md,json}``; return 0."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine_zoo",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_MODELS)} (engine_zoo_quick.*)")
    parser.add_argument("--only", default="", help="comma-separated fnmatch patterns of models to measure")
    parser.add_argument("--skip", default="", help="comma-separated fnmatch patterns of models to leave out")
    parser.add_argument("--resume", action="store_true", help="keep the models already in the JSON, measure the rest")
    parser.add_argument("--no-torch-pruning", action="store_true", help="skip the Torch-Pruning reference figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = run(args)
    _log(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
