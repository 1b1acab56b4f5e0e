"""Benchmark: what pruning buys at deployment — measured CPU latency and bytes on disk versus the MACs ratio.

For the pretrained akamaster ResNet-20 and ResNet-56 (CIFAR-10), each pruned to about 50 % of the dense
closed-form MACs with one common keep ratio (uniform widths, L1 channel selection, BN statistics re-estimated
on training batches; no fine-tuning — this is about deployment, not accuracy), the benchmark exports and times:

* **fp32, architecture as data** — :func:`autoprune.serialize.save_module` (``arch.json`` + ``weights.pt``),
  reloaded with :func:`~autoprune.serialize.load_module` (no user code); the *reloaded* module is timed and
  checked against the in-memory one (max |Δ logit|);
* **packed 8-bit weights** — :func:`autoprune.quantization.apply` at 8 weight bits (BN folded, per-channel,
  float activations) written by :func:`~autoprune.quantization.save_quantized` (a storage format: its fake-
  quantized module is not a fast kernel, so it is not timed);
* **real int8** — :func:`autoprune.quantization.to_int8` (``torch.ao`` FX, x86 engine, min–max calibration on
  training images) when the backend is available; its size is the ``torch.save`` of its state dict.

Latency: :func:`autoprune.latency.compare_latency` (every variant of a model interleaved round by round, one
thread, eval + inference mode) at batch 1 and 64. Sizes are the bytes of the files on disk. Accuracy on a
stratified test subset is printed only as a sanity check of the artifacts (pruned networks are not fine-tuned).

Run as ``python -m benchmarks.bench_deployment [--quick] [--models resnet20,resnet56]``; writes
``results/benchmarks/deployment.md`` (``deployment_quick.md`` with ``--quick``) and the raw numbers to the
matching ``.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoprune.utils import configure_threads, seed_everything
from benchmarks._cifar import CHECKPOINTS
from benchmarks._common import CIFAR10_DIR, WEIGHTS_DIR, write_json, write_result

if TYPE_CHECKING:
    from autoprune.graph import GroupSet

TARGET = 0.5


@dataclass(frozen=True)
class Sizes:
    """Everything that scales the run time."""

    models: tuple[str, ...]
    batches: tuple[int, ...]
    rounds: int
    min_run_time: float
    calib_batches: int
    calib_batch: int
    test_images: int


FULL = Sizes(models=("resnet20", "resnet56"), batches=(1, 64), rounds=3, min_run_time=0.3, calib_batches=8,
             calib_batch=128, test_images=2000)
QUICK = Sizes(models=("resnet20",), batches=(1, 64), rounds=2, min_run_time=0.1, calib_batches=2, calib_batch=64,
              test_images=200)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dir_bytes(path: Path) -> int:
    """Total size of the regular files under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _accuracy(model: nn.Module, loader: Iterable[Any]) -> float:
    from autoprune.evaluate import validate

    return float(validate(model, loader, device="cpu")[0])


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval()
    b.eval()
    with torch.inference_mode():
        return float((a(x) - b(x)).abs().max())


def export_variants(name: str, dense: nn.Module, pruned: nn.Module, example: torch.Tensor, calib: list[Any],
                    out: Path, calib_batches: int, *, groups: GroupSet | None = None,
                    widths: Mapping[str, int] | None = None,
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, nn.Module], dict[str, nn.Module]]:
    """Write every artifact of one model under ``out``.

    With ``groups`` (the dense model's analysis) and ``widths`` (those of ``pruned``), the packed 8-bit records
    also carry the closed-form size (:func:`autoprune.cost.closed_form`), checked equal to the exported bytes.

    Returns:
        ``(records, timed, checked)``: per-variant records (``bytes`` on disk and, for reloaded artifacts,
        ``max_abs_diff`` against the in-memory module), the modules to time (reloaded fp32, int8) and the
        modules whose accuracy is checked (those plus the reloaded packed 8-bit ones).
    """
    from autoprune import cost, quantization, serialize
    from autoprune.errors import AutoPruneError
    from autoprune.types import QuantSpec

    records: dict[str, dict[str, Any]] = {}
    timed: dict[str, nn.Module] = {}
    checked: dict[str, nn.Module] = {}
    probe = calib[0][0][:8]
    for label, module, kept in (("dense", dense, {}), ("pruned", pruned, widths)):
        d = serialize.save_module(module, out / f"{name}-{label}-fp32", example, metadata={"variant": label})
        loaded = serialize.load_module(d).eval()
        records[f"{label} fp32"] = {"bytes": dir_bytes(d), "max_abs_diff": _max_diff(module, loaded, probe),
                                    "format": "arch.json + weights.pt"}
        timed[f"{label} fp32"] = checked[f"{label} fp32"] = loaded
        layers = quantization.quantizable_layers(module)
        bits = {n: QuantSpec(w_bits=8, a_bits=None) for n in layers}
        qm = quantization.apply(module, bits)
        qd = quantization.save_quantized(qm, out / f"{name}-{label}-w8", example, metadata={"variant": label})
        qloaded = quantization.load_quantized(qd)
        stored = quantization.export(qm).size_bytes
        records[f"{label} w8 packed"] = {"bytes": dir_bytes(qd), "max_abs_diff": _max_diff(qm, qloaded, probe),
                                         "format": "packed 8-bit weights (arch.json + weights.pt)",
                                         "size_bytes": stored}
        if groups is not None and kept is not None:
            closed = cost.closed_form(groups, kept, bits).bytes
            if closed != stored:
                raise RuntimeError(f"{name} {label}: closed-form size {closed} != exported {stored} bytes")
            records[f"{label} w8 packed"]["size_bytes_closed_form"] = closed
        checked[f"{label} w8 packed"] = qloaded
        try:
            q8 = quantization.to_int8(module, calib, batches=calib_batches)
        except AutoPruneError as exc:
            records[f"{label} int8"] = {"error": str(exc)}
            continue
        path = out / f"{name}-{label}-int8.pt"
        torch.save(q8.state_dict(), path)
        records[f"{label} int8"] = {"bytes": dir_bytes(path), "format": "torch.ao int8 state dict (torch.save)"}
        timed[f"{label} int8"] = checked[f"{label} int8"] = q8
    return records, timed, checked


def run_model(name: str, sizes: Sizes, splits: Any, out: Path, seed: int = 0) -> dict[str, Any]:
    """Prune ``name`` to ~50 % MACs, export every variant, time them interleaved, check accuracy."""
    from autoprune import cost, graph, pruning
    from autoprune.data import make_loader, stratified_indices, subset
    from autoprune.evaluate import recalibrate_bn
    from autoprune.latency import compare_latency
    from autoprune.models import build_model
    from autoprune.models.checkpoint import load_checkpoint
    from benchmarks._cifar import uniform_widths

    t0 = time.perf_counter()
    dense = build_model(name, num_classes=10, mean=splits.info.mean, std=splits.info.std)
    load_checkpoint(dense, WEIGHTS_DIR / CHECKPOINTS[name])
    dense.eval()
    example = torch.rand(1, 3, 32, 32)
    groups = graph.analyze(dense, example)
    widths, ratio = uniform_widths(groups, TARGET)
    pruned = pruning.apply(dense, groups, widths, importance="l1")
    calib = list(make_loader(subset(splits.train, sizes.calib_batches * sizes.calib_batch, seed=seed + 1),
                             sizes.calib_batch))
    recalibrate_bn(pruned, calib, len(calib), device="cpu")
    pruned.eval()
    dense_cost, pruned_cost = cost.closed_form(groups, {}), cost.closed_form(groups, widths)
    records, timed, checked = export_variants(name, dense, pruned, example, calib, out, sizes.calib_batches,
                                              groups=groups, widths=widths)
    test = make_loader(splits.test.take(stratified_indices(splits.test.labels, sizes.test_images, seed=seed)), 500)
    for label, module in checked.items():
        records[label]["top1"] = _accuracy(module, test)
    latency: dict[str, dict[str, Any]] = {}
    for batch in sizes.batches:
        x = torch.rand(batch, 3, 32, 32)
        res = compare_latency(timed, x, rounds=sizes.rounds, threads=1, min_run_time=sizes.min_run_time)
        latency[str(batch)] = {k: v.to_dict() for k, v in res.items()}
        _log(f"{name} batch {batch}: " + ", ".join(f"{k} {v.median_ms:.2f} ms" for k, v in res.items()))
    return {"model": name, "keep_ratio": ratio, "macs": {"dense": dense_cost.macs, "pruned": pruned_cost.macs},
            "params": {"dense": dense_cost.params, "pruned": pruned_cost.params}, "variants": records,
            "latency": latency, "seconds": time.perf_counter() - t0}


def run(sizes: Sizes, seed: int = 0) -> dict[str, Any]:
    """Every model of ``sizes`` (artifacts in a temporary directory, removed afterwards)."""
    from autoprune.data import load_dataset

    t0 = time.perf_counter()
    seed_everything(seed)
    splits = load_dataset("cifar10", CIFAR10_DIR, val_size=0, seed=seed)
    models = []
    with tempfile.TemporaryDirectory(prefix="bench-deployment-") as tmp:
        for name in sizes.models:
            models.append(run_model(name, sizes, splits, Path(tmp), seed))
    return {"sizes": asdict(sizes), "models": models, "threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ report


def _kb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1024:,.1f}"


def model_table(m: Mapping[str, Any], batches: Sequence[int]) -> list[str]:
    """Rows of one model: bytes, size ratio, MACs ratio, latency and speed-up per batch, sanity accuracy."""
    macs_ratio = m["macs"]["pruned"] / m["macs"]["dense"]
    dense_bytes = m["variants"]["dense fp32"]["bytes"]
    head = "| variant | MACs ratio | bytes on disk (KiB) | size reduction vs dense fp32 |"
    sep = "|---|---|---|---|"
    for b in batches:
        head += f" batch {b}: median ms (IQR) | batch {b}: speed-up |"
        sep += "---|---|"
    head += " top-1 (sanity) | max abs Δ after reload |"
    sep += "---|---|"
    lines = [head, sep]
    for label, rec in m["variants"].items():
        if "error" in rec:
            lines.append(f"| {label} | — | — | — |" + " — | — |" * len(batches) + f" {rec['error']} | — |")
            continue
        ratio = 1.0 if label.startswith("dense") else macs_ratio
        row = f"| {label} | {ratio:.3f} | {_kb(rec['bytes'])} | {dense_bytes / rec['bytes']:.2f}× |"
        for b in batches:
            lat = m["latency"][str(b)]
            if label in lat:
                ms, ref = lat[label]["median_ms"], lat["dense fp32"]["median_ms"]
                row += f" {ms:.2f} ({lat[label]['iqr_ms']:.2f}) | {ref / ms:.2f}× |"
            else:
                row += " not timed | — |"
        top1 = rec.get("top1")
        diff = rec.get("max_abs_diff")
        row += f" {'—' if top1 is None else f'{100 * top1:.2f} %'} | {'—' if diff is None else f'{diff:.1e}'} |"
        lines.append(row)
    return lines


def summarise(raw: Mapping[str, Any]) -> str:
    """The markdown body."""
    s = raw["sizes"]
    lines = [
        f"Pretrained akamaster ResNets (CIFAR-10), pruned with one common keep ratio to ≤ {int(100 * TARGET)} % of "
        "the dense closed-form MACs (L1 channel selection, BN re-estimated on "
        f"{s['calib_batches']} × {s['calib_batch']} training images, **no fine-tuning**). Latency: "
        f"`latency.compare_latency`, all timed variants of a model interleaved, {s['rounds']} rounds × "
        f"{s['min_run_time']} s, 1 thread, eval + inference mode, random input; speed-up = dense fp32 median / "
        f"variant median. Bytes: files on disk. top-1: {s['test_images']} stratified test images, a sanity check "
        "of the artifacts only (int8: min–max calibration on the same training images).",
        "",
    ]
    for m in raw["models"]:
        macs_ratio = m["macs"]["pruned"] / m["macs"]["dense"]
        lines += [
            f"## {m['model']}",
            "",
            f"Keep ratio {m['keep_ratio']:.3f}: MACs {m['macs']['dense'] / 1e6:.2f} M → "
            f"{m['macs']['pruned'] / 1e6:.2f} M "
            f"(ratio {macs_ratio:.3f}, ideal speed-up {1 / macs_ratio:.2f}×); params {m['params']['dense']:,} → "
            f"{m['params']['pruned']:,}.",
            "",
            *model_table(m, s["batches"]),
            "",
        ]
    lines += [
        "Formats: *fp32* = `serialize.save_module` (architecture as JSON + weights; the reloaded module is what is "
        "timed); *w8 packed* = `quantization.save_quantized` at 8 weight bits (BN folded, per-channel, fp16 "
        "scales; a storage format whose fake-quantized module is not a fast kernel, hence not timed); *int8* = "
        "`quantization.to_int8` (torch.ao FX, x86 engine), size = `torch.save` of its state dict.",
        "",
        f"Total run time: {raw['seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only, short timings")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(CHECKPOINTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads outside the timings (default 1)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.models:
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        unknown = sorted(set(models) - set(CHECKPOINTS))
        if unknown:
            parser.error(f"unknown model(s) {unknown}; choose from {', '.join(CHECKPOINTS)}")
        sizes = replace(sizes, models=models)
    configure_threads(args.threads)
    raw = run(sizes)
    write_json("deployment", raw)
    path = write_result("deployment", "Deployment: measured CPU latency and bytes on disk of pruned ResNets"
                        + (" (quick)" if args.quick else ""), summarise(raw))
    _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
