"""Published anchor results (docs/ALGORITHMS.md §7) as typed records, and their markdown rendering.

The records are the data behind ``results/benchmarks/published.md`` and the "published" block that
``bench_search_quality`` prints beside its own measurements. Every record carries its source and caveats,
and the training budget the authors spent (mostly far longer than anything run on a 2-core CPU here), so a
reader can see which numbers are comparable with ours and which are not. Nothing here is measured.

Conventions: accuracies are top-1 in percent; ``flops_reduction`` is the fraction of FLOPs (MACs) removed,
derived as ``1 − 1/speed-up`` where a source gives a speed-up; Δ = pruned − base. Compare Δ at matched
FLOPs↓, never absolute accuracy: baselines differ by about a point.

Run ``python -m benchmarks.published`` to (re)write ``results/benchmarks/published.md``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Setting keys, in rendering order, with their section titles.
SETTINGS: dict[str, str] = {
    "resnet56-cifar10": "CIFAR-10 ResNet-56 (dense ≈ 125 M MACs)",
    "resnet20-cifar10": "CIFAR-10 ResNet-20 (dense ≈ 41 M MACs)",
    "imagenet": "ImageNet",
}

TP_TABLE = "Torch-Pruning `reproduce/readme.md` (DepGraph comparison table, Fang et al., CVPR 2023)"
TP_LOG = ("Torch-Pruning run log `benchmarks/run/cifar10/prune/cifar10-global-{method}-resnet56` "
          "(batch 128, lr 0.01, ×0.1 at epochs 60 and 80)")
NOT_RECORDED = "not stated in the sources recorded here (unknown)"


@dataclass(frozen=True)
class PublishedResult:
    """One published result.

    Attributes:
        setting: Key in :data:`SETTINGS` (``resnet56-cifar10``, ``resnet20-cifar10``, ``imagenet``).
        model: Network as the source names it.
        method: Method (and paper) name.
        base_top1: Baseline (dense) top-1 %, ``None`` when not published.
        pruned_top1: Top-1 % of the compressed network, ``None`` when not published.
        flops_reduction: Fraction of FLOPs removed (0.5 = 50 %), ``None`` when the cost is stated otherwise.
        cost: The cost as the source states it (FLOPs, MACs, speed-up, size).
        training: Training budget of the compressed model (pruning + fine-tuning), as far as known.
        source: Where the numbers come from.
        caveat: What limits comparability (typos, secondary sources, selection on the test set, ...).
        printed_delta: Δ as printed by the source when it disagrees with ``pruned − base``.
    """

    setting: str
    model: str
    method: str
    base_top1: float | None
    pruned_top1: float | None
    flops_reduction: float | None
    cost: str
    training: str
    source: str
    caveat: str
    printed_delta: float | None = None

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; choose from {list(SETTINGS)}")
        if not self.source.strip() or not self.caveat.strip():
            raise ValueError(f"{self.method}: every published row needs a source and a caveat")
        if self.flops_reduction is not None and not 0.0 < self.flops_reduction < 1.0:
            raise ValueError(f"{self.method}: flops_reduction must be a fraction in (0, 1)")

    @property
    def delta(self) -> float | None:
        """``pruned_top1 − base_top1`` (``None`` if either is unknown)."""
        if self.base_top1 is None or self.pruned_top1 is None:
            return None
        return round(self.pruned_top1 - self.base_top1, 2)

    @property
    def has_result(self) -> bool:
        """True if the row carries a pruned accuracy (False for "no result published" rows)."""
        return self.pruned_top1 is not None


R56, R20, IN = "resnet56-cifar10", "resnet20-cifar10", "imagenet"

PUBLISHED: tuple[PublishedResult, ...] = (
    # ---- §7.1 CIFAR-10 ResNet-56
    PublishedResult(R56, "ResNet-56", "AMC (He et al., ECCV 2018)", 92.80, 91.90, 0.50, "50 % FLOPs",
                    NOT_RECORDED, "paper as quoted by Distiller's AMC README and the TP table",
                    "quoted, not checked against the PDF"),
    PublishedResult(R56, "ResNet-56", "HRank (Lin et al., CVPR 2020)", 93.26, 93.17, 0.50,
                    "62.72 M FLOPs (params −42.4 %)",
                    "layer-wise: one prune + fine-tune stage per conv layer, each `--epochs` epochs (README "
                    "default 30, main.py default 15), batch 128, lr 0.01",
                    "github.com/lmbxmu/HRank README",
                    "the code keeps the best *test-set* checkpoint of every stage (selection on the test set); "
                    "the TP table prints 92.17, a typo"),
    PublishedResult(R56, "ResNet-56", "HRank", 93.26, 90.72, 0.741, "74.1 % FLOPs↓",
                    NOT_RECORDED, "secondary source (Hindawi PPSM 2022, Table 2)",
                    "unverified against the HRank paper"),
    PublishedResult(R56, "ResNet-56", "ResRep (Ding et al., ICCV 2021)", 93.71, 93.71, 0.529, "2.12× speed-up",
                    "480 epochs of ResRep training (batch 64, lr 0.01 cosine) on a base model trained for "
                    "240 epochs (ALGORITHMS.md §6.2)",
                    "github.com/DingXiaoH/ResRep README", "own, stronger baseline (93.71)"),
    PublishedResult(R56, "ResNet-56", "GBN / Gate Decorator (You et al., NeurIPS 2019)", 93.10, 92.77, 0.602,
                    "2.51× speed-up", NOT_RECORDED, TP_TABLE,
                    "probably a sign flip of the paper's 'drop' column (93.43, +0.33); unverified",
                    printed_delta=-0.33),
    PublishedResult(R56, "ResNet-56", "GBN, official notebook", 92.93, 93.16, 0.70, "≈ 70 % FLOPs↓",
                    NOT_RECORDED,
                    "github.com/youzhonghui/gate-decorator-pruning `run/resnet-56` notebooks",
                    "approximate values read from the notebook output"),
    PublishedResult(R56, "ResNet-56", "GReg-1 (Wang et al., ICLR 2021)", 93.36, 93.18, 0.608, "2.55× speed-up",
                    NOT_RECORDED, TP_TABLE, "quoted from the paper by the TP table, not checked"),
    PublishedResult(R56, "ResNet-56", "GReg-2", 93.36, 93.36, 0.608, "2.55× speed-up",
                    NOT_RECORDED, TP_TABLE, "quoted from the paper by the TP table, not checked"),
    PublishedResult(R56, "ResNet-56", "DepGraph, group norm + sparse learning (Fang et al., CVPR 2023)",
                    93.53, 93.77, 0.531, "2.13× speed-up",
                    "100 epochs sparse learning + 100 epochs fine-tuning after pruning",
                    f"{TP_TABLE}; budget from the " + TP_LOG.format(method="group_sl"),
                    "printed Δ (+0.38) disagrees with its own columns", printed_delta=0.38),
    PublishedResult(R56, "ResNet-56", "DepGraph", 93.53, 93.64, 0.611, "61.1 % FLOPs↓",
                    "presumably as the 53.1 % row (not checked)", TP_TABLE, "own baseline (93.53)"),
    PublishedResult(R56, "ResNet-56", "Group-L1 (Torch-Pruning implementation)", 93.53, 92.93, 0.528,
                    "2.12× speed-up", "100 epochs fine-tuning after one-shot pruning",
                    f"{TP_TABLE}; budget from the " + TP_LOG.format(method="l1"),
                    "reproducible with the public scripts; own baseline (93.53)"),
    PublishedResult(R56, "ResNet-56", "DMCP (Guo et al., CVPR 2020)", None, None, None, "—", "—",
                    "github.com/Zx55/dmcp README and paper", "no CIFAR results published"),
    PublishedResult(R56, "ResNet-56", "EagleEye (Li et al., ECCV 2020)", None, None, None, "—", "—",
                    "github.com/anonymous47823493/EagleEye README",
                    "no ResNet-56 results; CIFAR-10 only for ResNet-50 and MobileNetV1"),
    # ---- §7.2 CIFAR-10 ResNet-20
    PublishedResult(R20, "ResNet-20", "Distiller AGP, filters + fine-grained hybrid", 91.78, 91.11, 0.249,
                    "40.81 M → 30.66 M MACs", NOT_RECORDED,
                    "github.com/IntelLabs/distiller `examples/agp-pruning/resnet20_filters.schedule_agp.yaml`",
                    "91.11 final, 91.34 best epoch (selection unclear); partly unstructured"),
    PublishedResult(R20, "Plain-20 (not ResNet-20)", "AMC", 90.5, 90.2, 0.50, "50 % FLOPs", NOT_RECORDED,
                    "paper as quoted by Distiller",
                    "Plain-20 has no shortcuts; Distiller's own run 90.55 → 90.04; its ResNet-20 row is empty"),
    PublishedResult(R20, "ResNet-20", "SFP (He et al., IJCAI 2018)", 92.20, 90.83, 0.422, "42.2 % FLOPs↓",
                    NOT_RECORDED, "FPGM paper (He et al., CVPR 2019), Table 1", "unverified"),
    PublishedResult(R20, "ResNet-20", "FPGM-only 40 %", 92.20, 91.09, 0.422, "42.2 % FLOPs↓", NOT_RECORDED,
                    "FPGM paper (He et al., CVPR 2019), Table 1", "unverified"),
    PublishedResult(R20, "ResNet-20", "HRank, ResRep, DMCP, GReg, GBN, DepGraph, EagleEye", None, None, None,
                    "—", "—", "their papers and repositories (ALGORITHMS.md §7.2)",
                    "no ResNet-20 results found; autoprune's own runs are the in-house anchors"),
    # ---- §7.3 ImageNet
    PublishedResult(IN, "ResNet-50", "ResRep", 76.15, 76.15, 0.561, "43.9 % FLOPs kept",
                    "180 epochs, batch 256 on 8 GPUs (ALGORITHMS.md §6.2)", "training log + README",
                    "README says '54.5 % pruning ratio', the abstract '45 % FLOPs'; use 43.9 % kept"),
    PublishedResult(IN, "ResNet-50", "DMCP", 76.6, 76.5, None, "2.2 G FLOPs",
                    "40-epoch search + 100 epochs retraining (ALGORITHMS.md §5.4)", "README; paper via quotes",
                    "release trained without sync-BN; paper value 76.2 and baseline unverified"),
    PublishedResult(IN, "ResNet-50", "EagleEye", None, 76.4, None, "2 G FLOPs (also 3 G: 77.1, 1 G: 74.2)",
                    "about 1 000 candidates + 120 epochs fine-tuning (ALGORITHMS.md §3.2)", "README",
                    "baseline not stated; results before 2021-03-03 used an incorrect pretrained baseline"),
    PublishedResult(IN, "ResNet-50", "HRank", 76.15, 71.98, None, "1.55 B FLOPs", "layer-wise stages (README)",
                    "HRank README", "baseline unverified"),
    PublishedResult(IN, "ResNet-50", "HAQ (quantization)", 76.15, 75.48, None, "10× smaller weights",
                    NOT_RECORDED, "HAQ README", "k-means (storage-only) quantization, not linear"),
    PublishedResult(IN, "MobileNetV1", "AMC", 70.6, 70.2, 0.50, "50 % FLOPs", NOT_RECORDED,
                    "Distiller; AMC README", "paper as quoted; released model 70.494"),
    PublishedResult(IN, "MobileNetV1", "EagleEye", None, 70.9, None, "284 M FLOPs",
                    "120 epochs fine-tuning (ALGORITHMS.md §3.2)", "README", "baseline not stated"),
    PublishedResult(IN, "MobileNetV2", "AMC", 71.8, 70.8, 0.50, "50 % FLOPs", NOT_RECORDED,
                    "Distiller; AMC README", "paper as quoted; released model 70.854 at 70 % FLOPs"),
    PublishedResult(IN, "MobileNetV2", "DMCP", None, 73.5, None, "300 M FLOPs (211 M: 71.6)",
                    "40-epoch search + 250 epochs retraining (ALGORITHMS.md §5.4)", "README",
                    "release trained without sync-BN; 'may fluctuate' versus the paper"),
    PublishedResult(IN, "MobileNetV2", "HAQ (quantization)", 72.05, 71.23, None, "0.6× latency", NOT_RECORDED,
                    "HAQ README", "latency on the authors' hardware"),
)

GENERAL_CAVEATS = (
    "Convention mismatches (MACs versus 2×MACs, with or without BN/bias), differing baselines, the TP-table typos "
    "listed above, DMCP's release trained without sync-BN, EagleEye's pre-2021-03-03 baseline warning and "
    "secondary-source rows all limit comparability. GReg, GBN and DepGraph ImageNet numbers were not collected; "
    "InfCoP has no verified number (ALGORITHMS.md §4.6)."
)


def rows_for(setting: str, rows: Iterable[PublishedResult] = PUBLISHED) -> list[PublishedResult]:
    """The records of one setting (``resnet56-cifar10``, ``resnet20-cifar10`` or ``imagenet``).

    Raises:
        ValueError: Unknown setting.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {list(SETTINGS)}")
    return [r for r in rows if r.setting == setting]


def setting_of(model_name: str, dataset: str = "cifar10") -> str | None:
    """The setting key for one of our runs (``resnet56`` on ``cifar10`` → ``resnet56-cifar10``), or ``None``."""
    key = f"{model_name}-{dataset}"
    return key if key in SETTINGS else None


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def _esc(text: str) -> str:
    return text.replace("|", "\\|")


def _delta(r: PublishedResult) -> str:
    d = r.delta
    if d is None:
        return "—"
    out = f"{d:+.2f}"
    if r.printed_delta is not None and abs(r.printed_delta - d) > 1e-9:
        out += f" (printed {r.printed_delta:+.2f})"
    return out


def render_table(rows: Sequence[PublishedResult]) -> str:
    """One markdown table (method, model, base, pruned, Δ, FLOPs↓, cost, training budget, source, caveat)."""
    lines = ["| method | model | base | pruned | Δ | FLOPs↓ | cost as stated | training budget | source | caveat |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {_esc(r.method)} | {_esc(r.model)} | {_num(r.base_top1)} | {_num(r.pruned_top1)} | {_delta(r)} | "
            f"{_num(None if r.flops_reduction is None else 100 * r.flops_reduction, '{:.1f} %')} | "
            f"{_esc(r.cost)} | {_esc(r.training)} | {_esc(r.source)} | {_esc(r.caveat)} |")
    return "\n".join(lines)


def render_markdown(rows: Sequence[PublishedResult] = PUBLISHED) -> str:
    """The whole published-results document body (one section per setting, then the general caveats)."""
    parts = [
        "Published anchor results as recorded in benchmarks/published.py, each row with its source (nothing "
        "here was measured by autoprune). Accuracies are top-1 %; Δ = pruned − base; FLOPs↓ = fraction of FLOPs "
        "removed (1 − 1/speed-up where a source gives a speed-up). Compare Δ at matched FLOPs↓, not absolute accuracy. "
        "The training budgets are those of the authors (GPU runs of hundreds of epochs) and are far larger "
        "than the fine-tunes autoprune's CPU benchmarks can afford; \"TP table\" = " + TP_TABLE + ".",
    ]
    for key, title in SETTINGS.items():
        sel = [r for r in rows if r.setting == key]
        if sel:
            parts += [f"## {title}", render_table(sel)]
    parts += ["## Caveats", GENERAL_CAVEATS]
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``results/benchmarks/published.md``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    from benchmarks._common import write_result

    path = write_result("published", "Published anchor results (ALGORITHMS.md §7)", render_markdown())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
