"""Benchmark: post-training mixed-precision quantization of the pretrained ResNet-20 on CIFAR-10.

The akamaster ResNet-20 (``../shared/weights/resnet20-12fca82f.th``) is fake-quantized with
:mod:`autoprune.quantization` (BN folded, per-channel weights, 8-bit per-tensor activations, first and last layer
at 8 bits as in HAQ) at uniform 8, 6 and 4 weight bits and at one mixed assignment produced by
:func:`~autoprune.quantization.legalize_bits` for a size budget. Activation ranges are calibrated on training
images only; accuracy is measured on the CIFAR-10 test images. Sizes are the exact stored bytes of the exported
artifact (packed codes + fp16 scales + zero points + float extras), checked against the closed form
(:func:`autoprune.cost.closed_form`). When the
``torch.ao`` FX int8 backend works, the real int8 model's accuracy and its single-thread CPU latency (batch 1
and 32) are compared with fp32.

Run as ``python -m benchmarks.bench_quantization [--quick]``; the table goes to
``results/benchmarks/quantization.md``. ``--configs`` runs a subset (e.g. on a busy machine, in several
shorter runs): rows are accumulated in ``results/benchmarks/quantization_parts.json`` as long as the settings
(test images, calibration, budget) stay the same, and the table is rebuilt from all rows after every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune import cost, graph
from autoprune import quantization as Q
from autoprune.graph import GroupSet
from autoprune.types import QuantSpec
from autoprune.utils import configure_threads
from benchmarks._common import CIFAR10_DIR, WEIGHTS_DIR, result_path, write_result

CHECKPOINT = "resnet20-12fca82f.th"
CONFIGS = ("fp32", "w8", "w6", "w4", "mixed", "int8")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _accuracy(model: nn.Module, loader: Iterable[Any]) -> float:
    correct = total = 0
    model.eval()
    with torch.inference_mode():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.shape[0])
    return correct / max(total, 1)


def _with_floors(bits: dict[str, QuantSpec], layers: Sequence[str]) -> dict[str, QuantSpec]:
    """HAQ's rule: first layer 8-bit weights with a float input, last layer w8a8."""
    bits[layers[0]] = QuantSpec(max(8, bits[layers[0]].w_bits or 8), None)
    bits[layers[-1]] = QuantSpec(8, 8)
    return bits


def _all_float(layers: Sequence[str]) -> dict[str, QuantSpec]:
    """Every layer float: the closed form then prices the BN-folded float export (an empty map would price the
    unfolded float model)."""
    return {n: QuantSpec(None, None) for n in layers}


def _assignments(model: nn.Module, groups: GroupSet, budget_ratio: float,
                 ) -> dict[str, tuple[str, dict[str, QuantSpec] | None]]:
    layers = Q.quantizable_layers(model)
    out: dict[str, tuple[str, dict[str, QuantSpec] | None]] = {
        f"w{b}": (f"uniform w{b}a8", _with_floors({n: QuantSpec(b, 8) for n in layers}, layers)) for b in (8, 6, 4)
    }

    def size(bits: dict[str, QuantSpec]) -> int:
        return cost.closed_form(groups, None, bits).bytes

    budget = size(_all_float(layers)) / budget_ratio
    mixed, feasible = Q.legalize_bits(_with_floors({n: QuantSpec(8, 8) for n in layers}, layers),
                                      size, budget, Q.default_floors(model), kinds=("w",))
    out["mixed"] = (f"mixed: legalize_bits from w8a8 to ≤ fp32/{budget_ratio:g} bytes", mixed if feasible else None)
    return out


def _quantized_row(model: nn.Module, groups: GroupSet, label: str, bits: dict[str, QuantSpec], calib: list[Any],
                   test: Iterable[Any], calib_batches: int) -> dict[str, Any]:
    qm = Q.apply(model, bits)
    Q.calibrate(qm, calib, batches=calib_batches)
    art = Q.export(qm)
    priced = cost.closed_form(groups, None, bits)
    closed = (priced.bytes, priced.payload_bits)
    if closed != (art.size_bytes, art.payload_bits):
        raise RuntimeError(f"closed-form size {closed} != exported {(art.size_bytes, art.payload_bits)}")
    layers = Q.quantizable_layers(model)
    w_bits = sorted({s.w_bits for s in bits.values() if s.w_bits is not None})
    return {"label": label, "w_bits": "/".join(map(str, w_bits)), "a_bits": "8 (first layer: fp32)",
            "top1": _accuracy(qm, test), "bytes": art.size_bytes, "payload_bits": art.payload_bits,
            "per_layer": " ".join(str(bits[n].w_bits) for n in layers), "breakdown": art.breakdown()}


def _int8_row(model: nn.Module, calib: list[Any], test: Iterable[Any], args: argparse.Namespace) -> dict[str, Any]:
    from autoprune import latency
    from autoprune.errors import AutoPruneError

    try:
        int8 = Q.to_int8(model, calib, batches=args.calib_batches)
    except AutoPruneError as exc:
        return {"error": str(exc)}
    row: dict[str, Any] = {"top1": _accuracy(int8, test), "latency": {}}
    for batch in (1, 32):
        x = calib[0][0][:batch]
        res = latency.compare_latency({"fp32": model, "int8": int8}, x, rounds=3, threads=1,
                                      min_run_time=args.latency_time / 3)
        row["latency"][str(batch)] = {k: v.to_dict() for k, v in res.items()}
    return row


def _render(parts: dict[str, Any]) -> str:
    s, rows = parts["settings"], parts["rows"]
    fp = rows.get("fp32")
    if fp is None:
        return "fp32 reference not measured yet (run with --configs fp32)."
    lines = [
        f"Pretrained ResNet-20 (`{s['weights']}`), CIFAR-10 test: {s['test_images']:,} images; calibration on "
        f"{s['calib_batches']}×128 training images (min–max ranges). BN folded; per-channel weights (symmetric "
        "≥ 4 bits, asymmetric + MSE-searched clip at 2–3 bits); per-tensor inputs; fp16 scales. Size = exact "
        "bytes stored by `quantization.export` (checked equal to the closed form `cost.closed_form`); the fp32 "
        "reference counts every float tensor of the unfolded model (BN included). Payload bits = Σ b·n over "
        "conv/linear weights (HAQ's metric).",
        "",
        "| config | weight bits | input bits | top-1 | Δ top-1 | size (bytes) | vs fp32 bytes | vs fp32 payload |",
        "|---|---|---|---|---|---|---|---|",
        f"| fp32 (pretrained) | 32 | 32 | {fp['top1']:.2%} | — | {fp['bytes']:,} | 1.00× | 1.00× |",
    ]
    for key in ("w8", "w6", "w4", "mixed"):
        r = rows.get(key)
        if r is None:
            continue
        lines.append(f"| {r['label']} | {r['w_bits']} | {r['a_bits']} | {r['top1']:.2%} | "
                     f"{r['top1'] - fp['top1']:+.2%} | {r['bytes']:,} | {fp['bytes'] / r['bytes']:.2f}× | "
                     f"{fp['payload_bits'] / r['payload_bits']:.2f}× |")
    if "mixed" in rows:
        lines += ["", f"Mixed assignment, weight bits per layer (first → last): {rows['mixed']['per_layer']}; "
                      f"bytes by kind: {rows['mixed']['breakdown']}."]
    i8 = rows.get("int8")
    if i8 is not None and "error" in i8:
        lines += ["", f"Real int8 (ao_fx backend) unavailable here: {i8['error']}"]
    elif i8 is not None:
        lines += ["", f"Real int8 CPU execution (`quantization.to_int8`, torch.ao FX, x86 engine, min–max "
                      f"calibration on the same training images): top-1 {i8['top1']:.2%} "
                      f"({i8['top1'] - fp['top1']:+.2%} vs fp32).", "",
                  "| batch | fp32 median (IQR) | int8 median (IQR) | speed-up |", "|---|---|---|---|"]
        for batch, res in i8["latency"].items():
            f, q = res["fp32"], res["int8"]
            lines.append(f"| {batch} | {f['median_ms']:.2f} ms ({f['iqr_ms']:.2f}) | {q['median_ms']:.2f} ms "
                         f"({q['iqr_ms']:.2f}) | {f['median_ms'] / q['median_ms']:.2f}× |")
        lines += ["", "Latency: `latency.compare_latency` (fp32 and int8 interleaved, 3 rounds, 1 thread, eval + "
                      "inference_mode). The machine is shared: absolute times move with background load."]
    lines += ["", "Runs: " + "; ".join(f"{k} {v}" for k, v in parts.get("runs", {}).items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 0 on success, 2 when data or weights are missing."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_quantization", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=CIFAR10_DIR)
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR / CHECKPOINT)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument("--calib-batches", type=int, default=8, help="training batches of 128 for calibration")
    parser.add_argument("--budget-ratio", type=float, default=10.0,
                        help="mixed assignment: exact size budget = fp32 bytes / ratio")
    parser.add_argument("--test-images", type=int, default=10_000, help="first N CIFAR-10 test images")
    parser.add_argument("--threads", type=int, default=None, help="threads for accuracy runs (latency uses 1)")
    parser.add_argument("--latency-time", type=float, default=1.0, help="seconds of timed runs per model and batch")
    parser.add_argument("--quick", action="store_true", help="2,000 test images, shorter timings")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown := sorted(set(configs) - set(CONFIGS)):
        parser.error(f"unknown configs {unknown}; choose from {CONFIGS}")
    if args.quick:
        args.test_images, args.latency_time = min(args.test_images, 2000), args.latency_time / 4
    if not (args.data_dir / "test_batch.bin").is_file() or not args.weights.is_file():
        print(f"need CIFAR-10 at {args.data_dir} and weights at {args.weights}", file=sys.stderr)
        return 2
    from autoprune.data import load_dataset, make_loader
    from autoprune.models import build_model
    from autoprune.models.checkpoint import load_checkpoint

    threads = configure_threads(args.threads)
    t0 = time.perf_counter()
    splits = load_dataset("cifar10", args.data_dir)
    n_test = min(args.test_images, int(splits.test.labels.shape[0]))
    test = make_loader(splits.test, 250, limit=-(-n_test // 250))
    calib = list(make_loader(splits.train, 128, shuffle=True, seed=0, limit=args.calib_batches))
    model = build_model("resnet20", num_classes=10)
    load_checkpoint(model, args.weights)
    model.eval()

    settings = {"weights": args.weights.name, "test_images": n_test, "calib_batches": args.calib_batches,
                "budget_ratio": args.budget_ratio}
    parts_path = result_path("quantization_parts", ".json")  # a quick run keeps its rows apart
    parts: dict[str, Any] = json.loads(parts_path.read_text()) if parts_path.is_file() else {}
    if parts.get("settings") != settings:
        parts = {"settings": settings, "rows": {}, "runs": {}}
    groups = graph.analyze(model, calib[0][0][:1])
    assignments = _assignments(model, groups, args.budget_ratio)
    for key in configs:
        if key == "fp32":
            row: dict[str, Any] = {"top1": _accuracy(model, test),
                                   "bytes": sum(t.nbytes for t in model.state_dict().values()
                                                if t.is_floating_point()),
                                   "payload_bits": cost.closed_form(
                                       groups, None, _all_float(Q.quantizable_layers(model))).payload_bits}
        elif key == "int8":
            row = _int8_row(model, calib, test, args)
        else:
            label, bits = assignments[key]
            if bits is None:
                _log(f"{key}: budget infeasible, skipped")
                continue
            row = _quantized_row(model, groups, label, bits, calib, test, args.calib_batches)
        parts["rows"][key] = row
        parts["runs"][key] = f"{time.strftime('%Y-%m-%d %H:%M')} ({threads} threads)"
        parts_path.parent.mkdir(parents=True, exist_ok=True)
        parts_path.write_text(json.dumps(parts, indent=1))
        _log(f"{key}: top-1 {row.get('top1', float('nan')):.2%} ({time.perf_counter() - t0:.0f} s)")

    body = _render(parts)
    path = write_result("quantization", "Post-training mixed-precision quantization (ResNet-20, CIFAR-10)", body)
    print(body)
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
