"""Benchmark: which cheap score ranks pruned ResNet-20 candidates best (issue #19, part 1: "a score that ranks").

The search scores every candidate with adaptive BN (10 calibration batches) and top-1 on ~1000 images; at equal
MACs that ranks candidates only moderately (``evaluator_fidelity.md``). This study measures lower-variance cheap
signals against the accuracy after a real fine-tune, so the default score can be chosen from evidence.

Candidates. The pretrained akamaster ResNet-20 on CIFAR-10 (``../shared``); N candidates (default 48) at
``--target`` (default 50 %) ± 2 % of the dense closed-form MACs, random per-group widths, L1 channel selection
(:func:`benchmarks.bench_fidelity.sample_candidates`).

Ground truth. Every candidate gets the fine-tune the search-quality grid gives its finalists
(:func:`benchmarks._cifar.finetune_and_report` with :data:`benchmarks.bench_search_quality.FULL`'s settings:
BN re-estimated on 10×128 training images, 391 SGD steps × 128 = 1 epoch, lr 0.01 cosine, momentum 0.9, wd 5e-4,
CIFAR augmentation, the same batches for every candidate), then top-1 on all 5,000 images of test half B.

Cheap signals, scored on test half A (disjoint from B). Half A is ordered once (seeded, stratified): subset 1 =
the first ``--score-images`` (1,000), subset 2 = the next 1,000 (disjoint; the noise ceiling), then the rest up to
``--wide-images`` (5,000 = all of half A). Calibration settings: none (``plain``), adaptive BN on the first 10, 50
and 200 batches × 64 training images with test-time transforms (the product's ``adaptive_bn``: shuffled, the same
batches for every candidate), and "distill steps": ABN 10×64, then K ∈ {10, 30} SGD steps (lr 0.01, momentum 0.9,
batch 64, augmented training images) of knowledge distillation from the dense model (:mod:`autoprune.distill`:
``0.1·CE + 0.9·T²·KL`` at T = 4). From one forward pass per setting: top-1; −cross-entropy; soft accuracy (mean
softmax probability of the true class); −KL(p_dense ‖ p_candidate) at T = 1 (dense logits cached once per run);
top-1 agreement with the dense model. Seconds per candidate are wall time including calibration/distillation.

Per signal: Spearman and Kendall with the truth, 95 % bootstrap interval of Spearman, regret of the top pick,
top-5 overlap, seconds per candidate; the split-half agreement of each signal (subset 1 vs subset 2: the sampling
noise of the scoring images); and a "which to pick" paragraph computed from the data.

Run as ``python -m benchmarks.bench_ranking [--quick] [--resume] [--part I/N] [--max-minutes M]``. Every finished
candidate is merged into ``results/benchmarks/ranking.json`` at once (under a file lock, atomic replace), so a run
can stop at any moment and continue with ``--resume``, and two processes can split the candidates
(``--part 1/2 --resume`` beside ``--part 2/2 --resume``). ``ranking.md`` is rebuilt when a process ends, or with
``--summarise``. ``--quick`` (tiny sizes) writes ``ranking_quick.*`` and estimates the full run's time.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from autoprune.distill import Distillation
from autoprune.utils import configure_threads, seed_everything
from benchmarks import _cifar
from benchmarks import bench_search_quality as _sq
from benchmarks._common import RESULTS, command_line, git_commit, machine, write_result
from benchmarks.bench_fidelity import kendall, pick_regret, sample_candidates, spearman, spearman_interval
from benchmarks.bench_reliability import locked, parse_part

TITLE = "Ranking study: cheap candidate scores vs the accuracy after a real fine-tune (ResNet-20, CIFAR-10)"
FIDELITY_TITLE = "Evaluator fidelity: how the search's cheap score ranks candidates (ResNet-20, CIFAR-10, 50 % MACs)"
#: Issue #19's goal for the default evaluator: Spearman, the low end of its 95 % interval, and the cost ratio.
FIDELITY_GOALS = {"spearman": 0.8, "ci95_low": 0.6, "cost_ratio": 0.05}
#: What the product's ``adaptive_bn`` evaluator does by default, by the name this study gives its setting.
DEFAULT_EVALUATOR = "adaptive_bn (BN re-estimated on 10 batches × 64 training images, top-1 on 1,000 validation images)"
SIGNALS = ("top1", "neg_ce", "soft_acc", "neg_kl", "agreement")
SIGNAL_LABELS = {"top1": "top-1", "neg_ce": "−CE", "soft_acc": "soft accuracy", "neg_kl": "−KL(dense‖cand)",
                 "agreement": "agreement with dense"}
TOP_K = 5
Log = Callable[[str], None]


@dataclass(frozen=True)
class Sizes:
    """Everything that defines (and scales) a run; a resumed or split run must use the same sizes."""

    candidates: int
    target: float
    tolerance: float
    score_images: int  # subset 1 of half A (and the size of subset 2)
    wide_images: int  # first images of half A also scored (0: only subsets 1 and 2)
    calib_batch: int
    calib: tuple[int, ...]  # adaptive-BN batch counts
    kd_calib: int  # ABN batches before the distillation steps
    kd_steps: tuple[int, ...]
    kd_lr: float
    kd_weight: float
    kd_temperature: float
    truth_steps: int
    truth_batch: int
    truth_lr: float
    truth_calib_batches: int
    truth_calib_batch: int
    truth_images: int
    n_boot: int


_SQ = _sq.FULL
FULL = Sizes(candidates=48, target=0.5, tolerance=0.02, score_images=1000, wide_images=5000, calib_batch=64,
             calib=(10, 50, 200), kd_calib=10, kd_steps=(10, 30), kd_lr=0.01, kd_weight=0.9,
             kd_temperature=Distillation().temperature, truth_steps=_SQ.ft_steps, truth_batch=_SQ.ft_batch,
             truth_lr=_SQ.ft_lr, truth_calib_batches=_SQ.calib_batches, truth_calib_batch=_SQ.calib_batch,
             truth_images=_SQ.test_images, n_boot=2000)
QUICK = replace(FULL, candidates=6, score_images=200, wide_images=600, calib=(2, 4, 8), kd_calib=2, kd_steps=(2, 4),
                truth_steps=4, truth_calib_batches=2, truth_images=500, n_boot=200)


def _log(msg: str) -> None:
    print(f"[ranking {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _plain(sizes: Sizes | Mapping[str, Any]) -> dict[str, Any]:
    """``sizes`` as JSON would give it back (tuples as lists)."""
    return json.loads(json.dumps(asdict(sizes) if isinstance(sizes, Sizes) else dict(sizes)))


def settings_of(sizes: Sizes | Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, label)`` of every calibration setting, in run order."""
    s = _plain(sizes)
    b = s["calib_batch"]
    out = [("plain", "none (plain)")]
    out += [(f"abn{n}", f"ABN {n}×{b}") for n in s["calib"]]
    out += [(f"abn{s['kd_calib']}+kd{k}", f"ABN {s['kd_calib']}×{b} + {k} KD steps") for k in s["kd_steps"]]
    return out


# ------------------------------------------------------------------------------------------------ signals


def signals(logits: torch.Tensor, labels: torch.Tensor, dense_logits: torch.Tensor) -> dict[str, float]:
    """Every signal of one forward pass (higher = better for all of them).

    ``top1``: accuracy; ``neg_ce``: minus the mean cross-entropy; ``soft_acc``: mean softmax probability of the
    true class; ``neg_kl``: minus the mean KL(p_dense ‖ p_candidate) at temperature 1; ``agreement``: fraction of
    images on which the candidate's top-1 class is the dense model's.
    """
    logits, dense_logits = logits.double(), dense_logits.double()
    logp = F.log_softmax(logits, dim=1)
    dense_logp = F.log_softmax(dense_logits, dim=1)
    pred = logits.argmax(1)
    kl = (dense_logp.exp() * (dense_logp - logp)).sum(1).mean()
    return {"top1": float((pred == labels).double().mean()),
            "neg_ce": -float(F.nll_loss(logp, labels)),
            "soft_acc": float(logp.gather(1, labels[:, None]).exp().mean()),
            "neg_kl": -float(kl),
            "agreement": float((pred == dense_logits.argmax(1)).double().mean())}


def scoring_order(labels: torch.Tensor, score_images: int, total: int, seed: int) -> torch.Tensor:
    """Indices of half A in scoring order: subset 1 (``score_images``, stratified), subset 2 (the same size,
    disjoint, stratified), then stratified others up to ``total`` images."""
    from autoprune.data import stratified_indices

    picked: list[torch.Tensor] = []
    left = torch.arange(len(labels))
    for k, n in enumerate((score_images, score_images, total - 2 * score_images)):
        n = min(n, len(left))
        if n <= 0:
            break
        take = left[stratified_indices(labels[left], n, seed=seed + k)]
        picked.append(take)
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[torch.cat(picked)] = False
        left = torch.nonzero(keep).flatten()
    return torch.cat(picked)


def forward_logits(model: torch.nn.Module, loader: Any) -> torch.Tensor:
    """Logits of ``model`` (eval mode, no grad) over every batch of ``loader``."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in loader])


# ------------------------------------------------------------------------------------------------ the problem


class BenchLike(Protocol):
    """What the orchestrator needs (the real :class:`Bench`, or a fake in the tests)."""

    def candidates(self) -> list[dict[str, int]]: ...
    def dense(self) -> dict[str, Any]: ...
    def measure(self, index: int, widths: Mapping[str, int]) -> dict[str, Any]: ...


class Bench:
    """Model, data, cached dense logits; :meth:`measure` scores one candidate with every signal and the truth."""

    def __init__(self, sizes: Sizes, seed: int, log: Log = _log) -> None:
        from autoprune.campaign import FirstEpoch
        from autoprune.data import make_loader
        from autoprune.distill import Teacher

        t0 = time.perf_counter()
        self.sizes, self.seed = sizes, seed
        splits = _cifar.load_cifar10(seed)
        self.ctx = _cifar.context("resnet20", splits, calib_batches=sizes.truth_calib_batches,
                                  calib_batch=sizes.truth_calib_batch, select_images=sizes.score_images,
                                  report_images=sizes.truth_images, seed=seed)
        self.model, self.groups = self.ctx["model"], self.ctx["groups"]
        part_a, _ = _cifar.split_test(splits.test)
        s = sizes.score_images
        scored = part_a.take(scoring_order(part_a.labels, s, max(sizes.wide_images, 2 * s), seed))
        self.first = make_loader(scored.take(torch.arange(s)), 500)
        self.extra = make_loader(scored.take(torch.arange(s, len(scored))), 500)
        self.labels = scored.labels
        # the product's adaptive_bn: shuffled training batches without augmentation, the same ones every time
        self.calib = FirstEpoch(make_loader(splits.train, sizes.calib_batch, shuffle=True, seed=seed + 1))
        self.kd_train = FirstEpoch(make_loader(splits.train, sizes.calib_batch, shuffle=True, augment=True,
                                               seed=seed + 2))
        self.teacher = Teacher(self.model)
        t1 = time.perf_counter()
        self.dense_logits = torch.cat([forward_logits(self.model, self.first), forward_logits(self.model, self.extra)])
        self.dense_seconds = time.perf_counter() - t1
        log(f"setup {time.perf_counter() - t0:.0f} s (dense logits on {len(scored)} images: "
            f"{self.dense_seconds:.1f} s)")

    def candidates(self) -> list[dict[str, int]]:
        """The run's candidates (a function of the seed and sizes only)."""
        s = self.sizes
        return sample_candidates(self.groups, s.candidates, s.target, s.tolerance, self.seed)

    def dense(self) -> dict[str, Any]:
        """The dense model's reference numbers."""
        from autoprune import cost
        from autoprune.evaluate import validate

        s = self.sizes.score_images
        sig = signals(self.dense_logits[:s], self.labels[:s], self.dense_logits[:s])
        wide = self.sizes.wide_images
        return {"macs": cost.closed_form(self.groups, {}).macs, "top1_a1": sig["top1"],
                "top1_wide": signals(self.dense_logits[:wide], self.labels[:wide], self.dense_logits[:wide])["top1"]
                if wide else None,
                "truth_acc": float(validate(self.model, self.ctx["report"], device="cpu")[0]),
                "logits_seconds": self.dense_seconds}

    def _score(self, model: torch.nn.Module) -> dict[str, Any]:
        """Forward subset 1 (timed: the cheap score), then the rest of the scored images (timed apart)."""
        s, wide = self.sizes.score_images, self.sizes.wide_images
        t0 = time.perf_counter()
        first = forward_logits(model, self.first)
        sig = {"a1": signals(first, self.labels[:s], self.dense_logits[:s])}
        t1 = time.perf_counter()
        full = torch.cat([first, forward_logits(model, self.extra)])
        t2 = time.perf_counter()
        sig["a2"] = signals(full[s:2 * s], self.labels[s:2 * s], self.dense_logits[s:2 * s])
        if wide:
            sig["wide"] = signals(full[:wide], self.labels[:wide], self.dense_logits[:wide])
        return {"score_seconds": t1 - t0, "rest_seconds": t2 - t1, "signals": sig}

    def measure(self, index: int, widths: Mapping[str, int]) -> dict[str, Any]:
        """One candidate: every setting's signals, then the ground truth."""
        from autoprune import cost, pruning
        from autoprune.evaluate import recalibrate_bn

        sizes = self.sizes
        seed_everything(self.seed + 1000 + index)
        t0 = time.perf_counter()
        net = pruning.apply(self.model, self.groups, dict(widths), importance="l1")
        rec: dict[str, Any] = {"index": index, "widths": dict(widths), "build_seconds": time.perf_counter() - t0,
                               "macs_fraction": cost.closed_form(self.groups, dict(widths)).macs /
                               cost.closed_form(self.groups, {}).macs, "settings": {}}
        rec["settings"]["plain"] = {"prep_seconds": 0.0, "samples": 0, **self._score(copy.deepcopy(net))}
        for n in sizes.calib:
            work = copy.deepcopy(net)
            t0 = time.perf_counter()
            samples = recalibrate_bn(work, self.calib, n, device="cpu")
            prep = time.perf_counter() - t0
            rec["settings"][f"abn{n}"] = {"prep_seconds": prep, "samples": samples, **self._score(work)}
        rec["settings"].update(self._distill(net, index))
        rec["truth"] = self._truth(net)
        return rec

    def _distill(self, net: torch.nn.Module, index: int) -> dict[str, Any]:
        """ABN, then the distillation steps; scored after each K of ``kd_steps`` (one chain: K=30 continues K=10
        with a constant learning rate, which is exactly 30 steps; its seconds exclude the K=10 scoring)."""
        from autoprune.evaluate import SGDSettings, StepTrainer, recalibrate_bn

        sizes = self.sizes
        work = copy.deepcopy(net)
        torch.manual_seed(self.seed + 2000 + index)
        t0 = time.perf_counter()
        samples = recalibrate_bn(work, self.calib, sizes.kd_calib, device="cpu")
        trainer = StepTrainer(work, self.kd_train, SGDSettings(lr=sizes.kd_lr, momentum=0.9, weight_decay=5e-4),
                              device="cpu", distill=Distillation(sizes.kd_weight, sizes.kd_temperature),
                              teacher=self.teacher)
        prep, done, out = time.perf_counter() - t0, 0, {}
        for k in sorted(sizes.kd_steps):
            t0 = time.perf_counter()
            trainer.run(k - done)
            prep += time.perf_counter() - t0
            done = k
            out[f"abn{sizes.kd_calib}+kd{k}"] = {"prep_seconds": prep, "samples": samples + trainer.samples,
                                                 **self._score(work)}
        return out

    def _truth(self, net: torch.nn.Module) -> dict[str, Any]:
        """The search-quality grid's fine-tune of a finalist, reported on half B."""
        s = self.sizes
        t0 = time.perf_counter()
        out = _cifar.finetune_and_report(self.ctx, copy.deepcopy(net), steps=s.truth_steps, batch=s.truth_batch,
                                         lr=s.truth_lr, seed=1234 + self.seed)
        return {"accuracy": out["test_after_ft"], "before_ft": out["test_before_ft"], "ft_seconds": out["ft_seconds"],
                "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ the JSON file


def read_raw(path: Path) -> dict[str, Any]:
    """The results file, or ``{}`` when there is none."""
    return json.loads(path.read_text()) if path.exists() else {}


def update(path: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``change`` to the file on disk under the lock and replace it atomically; return the new content.

    Processes of a split run each add only their own candidates, so none overwrites another's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        raw = read_raw(path)
        change(raw)
        tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(raw, indent=1, default=str))
        os.replace(tmp, path)
    return raw


class RunError(Exception):
    """A run that must not start (an existing file it would clobber, other sizes); the message says why."""


def _start(path: Path, sizes: Sizes, seed: int, *, resume: bool, quick: bool) -> None:
    """Check the results file (or create it): the same sizes and seed, finished records kept only with ``resume``."""
    def change(raw: dict[str, Any]) -> None:
        if raw.get("records") and not resume:
            if not quick:
                raise RunError(f"{path} already holds {len(raw['records'])} finished candidates; add --resume to "
                               "continue it (finished candidates are skipped), or move the file aside")
            raw.clear()
        if raw and (raw.get("sizes") != _plain(sizes) or raw.get("seed") != seed):
            if raw.get("records"):
                raise RunError(f"{path} was made with other sizes or another seed; a resumed or split run must use "
                               "the same options (or move the file aside)")
            raw.clear()
        if not raw:
            raw.update({"benchmark": "ranking", "quick": quick, "sizes": _plain(sizes), "seed": seed,
                        "created": time.time(), "records": {}, "runs": []})
    update(path, change)


def _init(raw: dict[str, Any], candidates: list[dict[str, int]], dense: Mapping[str, Any]) -> None:
    if raw.get("candidates") not in (None, candidates):
        raise RunError("the candidates drawn differ from the ones in the results file (other code or data?); "
                       "move the file aside to start over")
    raw["candidates"] = candidates
    raw.setdefault("dense", dict(dense))


def run(path: Path, sizes: Sizes, seed: int, *, bench_factory: Callable[[Sizes, int, Log], BenchLike] = Bench,
        part: tuple[int, int] = (1, 1), resume: bool = False, quick: bool = False, max_minutes: float | None = None,
        command: str = "", log: Log = _log) -> dict[str, Any]:
    """Measure this part's unfinished candidates, merging each into ``path`` as soon as it is done; return the file.

    ``part = (i, n)`` takes the candidates whose index is ``i - 1`` modulo ``n``. ``max_minutes`` stops starting new
    candidates after that many minutes (counted from the call).
    """
    t0 = time.perf_counter()
    _start(path, sizes, seed, resume=resume, quick=quick)
    bench = bench_factory(sizes, seed, log)
    candidates = bench.candidates()
    dense = bench.dense()
    raw = update(path, lambda r: _init(r, candidates, dense))
    i_part, n_parts = part
    mine = [i for i in range(len(candidates)) if i % n_parts == i_part - 1]
    info = {"command": command, "commit": git_commit(), "part": f"{i_part}/{n_parts}", "started": time.time(),
            "pid": os.getpid(), "candidates": 0, "seconds": 0.0}
    log(f"{sum(str(i) in raw['records'] for i in mine)} of this part's {len(mine)} candidates already done")
    for i in mine:
        if str(i) in read_raw(path).get("records", {}):
            continue  # finished earlier (or by another process running the same part)
        if max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes:
            log(f"--max-minutes {max_minutes:g} reached: stopping before candidate {i}; continue with --resume")
            break
        rec = bench.measure(i, candidates[i])
        info["candidates"] += 1
        info["seconds"] = time.perf_counter() - t0
        raw = update(path, lambda r, rec=rec, i=i: _add(r, i, rec, info))
        log(_line(rec, raw))
    return raw


def _add(raw: dict[str, Any], index: int, rec: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    raw.setdefault("records", {})[str(index)] = dict(rec)
    raw["runs"] = [r for r in raw.get("runs", []) if (r["started"], r["pid"]) != (info["started"], info["pid"])]
    raw["runs"].append(dict(info))


def _line(rec: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    sig = rec["settings"]
    secs = sum(v["prep_seconds"] + v["score_seconds"] + v["rest_seconds"] for v in sig.values())
    return (f"candidate {rec['index']} ({len(raw['records'])}/{len(raw['candidates'])} done): MACs "
            f"{rec['macs_fraction']:.3f}, truth {rec['truth']['accuracy']:.4f} ({rec['truth']['seconds']:.0f} s), "
            f"signals {secs:.0f} s; top-1 "
            + ", ".join(f"{k} {v['signals']['a1']['top1']:.3f}" for k, v in sig.items()))


# ------------------------------------------------------------------------------------------------ statistics


def top_overlap(scores: Sequence[float], truth: Sequence[float], k: int = TOP_K) -> int:
    """How many of the ``k`` best-scored candidates are among the ``k`` truly best (ties: lower index first)."""
    def top(v: Sequence[float]) -> set[int]:
        return set(sorted(range(len(v)), key=lambda i: (-v[i], i))[:k])
    return len(top(scores) & top(truth))


def paired_difference(a: Sequence[float], b: Sequence[float], truth: Sequence[float], n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float, float]:
    """ρ(a, truth) − ρ(b, truth), its 95 % paired-bootstrap interval and the share of draws above 0."""
    rng = random.Random(seed)
    n, diffs = len(truth), []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        t, xa, xb = [truth[i] for i in idx], [a[i] for i in idx], [b[i] for i in idx]
        if len(set(t)) > 1 and len(set(xa)) > 1 and len(set(xb)) > 1:
            diffs.append(spearman(xa, t) - spearman(xb, t))
    point = spearman(a, truth) - spearman(b, truth)
    if not diffs:
        return point, float("nan"), float("nan"), float("nan")
    diffs.sort()
    return (point, diffs[int(0.025 * (len(diffs) - 1))], diffs[int(0.975 * (len(diffs) - 1))],
            sum(d > 0 for d in diffs) / len(diffs))


def done_records(raw: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Finished candidates in index order."""
    return [raw["records"][k] for k in sorted(raw.get("records", {}), key=int)]


def signal_rows(raw: Mapping[str, Any], *, intervals: bool = True) -> list[dict[str, Any]]:
    """One row per (setting, scored images, signal): its values, statistics against the truth and cost."""
    recs = done_records(raw)
    truth = [r["truth"]["accuracy"] for r in recs]
    s = raw["sizes"]
    scopes = [("a1", s["score_images"])] + ([("wide", s["wide_images"])] if s["wide_images"] else [])
    rows = []
    for scope, images in scopes:
        for key, label in settings_of(s):
            sec = statistics.fmean(r["settings"][key]["prep_seconds"] + r["settings"][key]["score_seconds"]
                                   + (r["settings"][key]["rest_seconds"] if scope == "wide" else 0.0) for r in recs)
            for sig in SIGNALS:
                vals = [r["settings"][key]["signals"][scope][sig] for r in recs]
                row = {"setting": key, "setting_label": label, "scope": scope, "images": images, "signal": sig,
                       "label": f"{SIGNAL_LABELS[sig]}, {label}, {images} images", "values": vals, "seconds": sec,
                       "spearman": spearman(vals, truth), "kendall": kendall(vals, truth),
                       "regret": pick_regret(vals, truth), "overlap": top_overlap(vals, truth, min(TOP_K, len(recs)))}
                row["ci"] = spearman_interval(vals, truth, n_boot=s["n_boot"]) if intervals else (math.nan, math.nan)
                rows.append(row)
    return rows


def baseline_key(sizes: Mapping[str, Any]) -> tuple[str, str, str]:
    """(setting, scope, signal) of the search's current score: top-1 after the smallest ABN on subset 1."""
    return f"abn{sizes['calib'][0]}", "a1", "top1"


def choose(rows: Sequence[Mapping[str, Any]], sizes: Mapping[str, Any], factor: float = 2.0) -> dict[str, Any]:
    """The best-ranking signal costing at most ``factor`` × the current score's seconds (ties: the cheaper)."""
    base = next(r for r in rows if (r["setting"], r["scope"], r["signal"]) == baseline_key(sizes))
    budget = factor * base["seconds"]
    eligible = [r for r in rows if r["seconds"] <= budget and not math.isnan(r["spearman"])]
    best = max(eligible, key=lambda r: (r["spearman"], -r["seconds"]))
    overall = max((r for r in rows if not math.isnan(r["spearman"])), key=lambda r: (r["spearman"], -r["seconds"]))
    return {"baseline": base, "budget": budget, "eligible": len(eligible), "best": best, "overall": overall}


def noise_ceiling(raw: Mapping[str, Any], setting: str, signal: str = "top1") -> float:
    """Spearman, across candidates, between ``signal`` on subset 1 and on the disjoint subset 2."""
    recs = done_records(raw)
    return spearman([r["settings"][setting]["signals"]["a1"][signal] for r in recs],
                    [r["settings"][setting]["signals"]["a2"][signal] for r in recs])


# ------------------------------------------------------------------------------------------------ report


def _ci(row: Mapping[str, Any]) -> str:
    lo, hi = row["ci"]
    return "[—]" if math.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]"


def _table(rows: Sequence[Mapping[str, Any]], truth_seconds: float, mark: Mapping[str, Any] | None) -> list[str]:
    lines = ["| signal | calibration | Spearman [95 % CI] | Kendall | regret (points) | top-5 overlap | "
             "s / candidate | % of truth's s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bold = "**" if mark is not None and r is mark else ""
        lines.append(f"| {bold}{SIGNAL_LABELS[r['signal']]}{bold} | {r['setting_label']} | {bold}{r['spearman']:+.3f}"
                     f"{bold} {_ci(r)} | {r['kendall']:+.3f} | {100 * r['regret']:.2f} | {r['overlap']} | "
                     f"{r['seconds']:.2f} | {100 * r['seconds'] / truth_seconds:.1f} % |")
    return lines


def pick_paragraph(raw: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """"Which to pick", from the numbers."""
    s = raw["sizes"]
    c = choose(rows, s)
    base, best, overall = c["baseline"], c["best"], c["overall"]
    n = len(done_records(raw))
    truth = [r["truth"]["accuracy"] for r in done_records(raw)]
    lines = ["## Which to pick", "",
             f"The search's current score, {base['label']}, costs {base['seconds']:.2f} s per candidate and ranks the "
             f"{n} candidates at Spearman {base['spearman']:+.3f} {_ci(base)}. Among the {c['eligible']} signals "
             f"costing at most twice that ({c['budget']:.2f} s), the best is **{best['label']}**: Spearman "
             f"{best['spearman']:+.3f} {_ci(best)}, Kendall {best['kendall']:+.3f}, regret "
             f"{100 * best['regret']:.2f} points, top-5 overlap {best['overlap']}, {best['seconds']:.2f} s."]
    if best is base:
        lines[-1] += " That is the current score itself: no cheap alternative ranks better here."
    else:
        d, lo, hi, share = paired_difference(best["values"], base["values"], truth, n_boot=s["n_boot"])
        verdict = ("the improvement is resolved at 95 %" if lo > 0 else
                   f"likely better, but not resolved at 95 % with {n} candidates" if share >= 0.9 else
                   f"not distinguishable from the current score with {n} candidates")
        lines[-1] += (f" Paired bootstrap of ρ(best) − ρ(current): {d:+.3f} [{lo:+.3f}, {hi:+.3f}], above 0 in "
                      f"{100 * share:.0f} % of the draws: {verdict}.")
    if overall is not best:
        lines += ["", f"Regardless of cost, the best is {overall['label']}: Spearman {overall['spearman']:+.3f} "
                  f"{_ci(overall)}, {overall['seconds']:.2f} s ({overall['seconds'] / base['seconds']:.1f}× the "
                  "current score's)."]
    return lines


def noise_paragraph(raw: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The noise ceiling of the current score and the split-half agreement of every signal."""
    s = raw["sizes"]
    key, _, _ = baseline_key(s)
    label = dict(settings_of(s))[key]
    r = noise_ceiling(raw, key)
    base = next(x for x in rows if (x["setting"], x["scope"], x["signal"]) == baseline_key(s))
    cap = math.sqrt(r) if r > 0 else float("nan")
    lines = ["## Noise ceiling", "",
             f"Top-1 after {label} on subset 1 vs the disjoint subset 2 of half A ({s['score_images']} images each) "
             f"ranks the candidates alike at Spearman **{r:+.3f}** (split-half agreement). A score that disagrees "
             "with itself that much on other images cannot agree with any criterion better than about "
             f"√{r:.3f} = {cap:.3f} (classical test theory; for Pearson, approximate for ranks)."]
    if not math.isnan(cap):
        share = base["spearman"] / cap
        lines[-1] += (f" Its Spearman with the truth is {base['spearman']:+.3f}, {100 * share:.0f} % of that cap: "
                      + ("most of its ranking error is sampling noise of the scoring images (more or lower-variance "
                         "scoring helps)." if share >= 0.85 else
                         "sampling noise explains part of its ranking error; the rest is what the signal measures "
                         "(more images alone would not close the gap)."))
    lines += ["", "Split-half agreement (Spearman, subset 1 vs subset 2) of every signal:", "",
              "| calibration | " + " | ".join(SIGNAL_LABELS[g] for g in SIGNALS) + " |",
              "|---|" + "---|" * len(SIGNALS)]
    for k, lab in settings_of(s):
        lines.append(f"| {lab} | " + " | ".join(f"{noise_ceiling(raw, k, g):+.3f}" for g in SIGNALS) + " |")
    return lines


def candidate_table(raw: Mapping[str, Any], pick: Mapping[str, Any]) -> list[str]:
    """Per candidate: MACs, truth, and top-1 on subset 1 per setting (all numbers: the JSON)."""
    s = raw["sizes"]
    sets = settings_of(s)
    lines = ["| # | MACs | truth % (after FT) | before FT % | " + " | ".join(f"top-1 % {lab}" for _, lab in sets)
             + f" | picked: {pick['label']} |", "|---|---|---|---|" + "---|" * (len(sets) + 1)]
    for r, v in zip(done_records(raw), pick["values"]):
        lines.append(f"| {r['index']} | {r['macs_fraction']:.3f} | {100 * r['truth']['accuracy']:.2f} | "
                     f"{100 * r['truth']['before_ft']:.2f} | "
                     + " | ".join(f"{100 * r['settings'][k]['signals']['a1']['top1']:.2f}" for k, _ in sets)
                     + f" | {v:.4f} |")
    return lines


def summarise(raw: Mapping[str, Any], command: str = "") -> str:
    """The markdown body."""
    s = raw["sizes"]
    recs = done_records(raw)
    n_all = len(raw.get("candidates", [])) or s["candidates"]
    status = (f"Status: {len(recs)} of {n_all} candidates done"
              + (" (complete)." if len(recs) >= n_all else f"; continue with `{resume_command(command, raw)}`."))
    if len(recs) < 3:
        return status + "\n\nToo few finished candidates for rank statistics."
    truth = [r["truth"]["accuracy"] for r in recs]
    t_sec = statistics.fmean(r["truth"]["seconds"] for r in recs)
    d = raw["dense"]
    rows = signal_rows(raw)
    pick = choose(rows, s)["best"]
    lines = [
        f"ResNet-20 (akamaster weights), CIFAR-10. {len(recs)} candidates at "
        f"{min(r['macs_fraction'] for r in recs):.3f}–{max(r['macs_fraction'] for r in recs):.3f} of the dense MACs "
        f"({d['macs'] / 1e6:.2f} M; target {100 * s['target']:.0f} % ± {100 * s['tolerance']:.0f} %), random per-group "
        f"widths, L1 channel selection; seed {raw['seed']}. Dense top-1: {100 * d['top1_a1']:.2f} % on subset 1 of "
        f"half A, {100 * d['truth_acc']:.2f} % on half B.",
        "",
        f"**Truth**: the search-quality grid's finalist fine-tune (BN re-estimated on {s['truth_calib_batches']}×"
        f"{s['truth_calib_batch']} training images, {s['truth_steps']} SGD steps × {s['truth_batch']} = "
        f"{s['truth_steps'] * s['truth_batch'] / 50000:.2f} epochs, lr {s['truth_lr']} cosine, momentum 0.9, wd 5e-4, "
        f"augmentation, the same batches for every candidate), top-1 on {s['truth_images']} images of half B: mean "
        f"{100 * statistics.fmean(truth):.2f} %, range {100 * min(truth):.2f}–{100 * max(truth):.2f} %; "
        f"{t_sec:.1f} s per candidate.",
        "",
        f"**Signals** on half A: subset 1 = {s['score_images']} images; ABN = BN statistics re-estimated on the first "
        f"N shuffled training batches of {s['calib_batch']} (test-time transforms, the same for every candidate); KD = "
        f"after ABN {s['kd_calib']}×{s['calib_batch']}, K SGD steps (lr {s['kd_lr']}, momentum 0.9, wd 5e-4, batch "
        f"{s['calib_batch']}, augmented) on {1 - s['kd_weight']:.1f}·CE + {s['kd_weight']:.1f}·T²·KL(dense ‖ "
        f"candidate) at T = {s['kd_temperature']:g}. Seconds: calibration/distillation + the forward pass + the "
        "signals (all five signals of a setting come from one forward pass and share its seconds). Regret: best "
        "truth minus the truth of the signal's top pick. Top-5 overlap: of the signal's 5 best, how many are among "
        "the truth's 5 best. Interval: percentile bootstrap over candidates.",
        "",
        *pick_paragraph(raw, rows),
        "",
        f"## Signals on subset 1 ({s['score_images']} images of half A)",
        "",
        *_table([r for r in rows if r["scope"] == "a1"], t_sec, pick),
    ]
    if s["wide_images"]:
        lines += ["", f"## The same signals on {s['wide_images']} images of half A", "",
                  *_table([r for r in rows if r["scope"] == "wide"], t_sec, pick)]
    lines += ["", *noise_paragraph(raw, rows), "", "## Per candidate", "", *candidate_table(raw, pick)]
    if raw.get("quick"):
        lines += ["", *estimate_block(raw)]
    runs = [r for r in raw.get("runs", []) if r.get("candidates")]
    lines += ["", status, "", "Runs: " + "; ".join(
        f"`{r['command']}` (part {r['part']}, commit {r['commit']}): {r['candidates']} candidates in "
        f"{r['seconds'] / 60:.1f} min" for r in runs) + "."]
    return "\n".join(lines)


def fidelity_headline(raw: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Issue #19's headline for the search's default evaluator (:func:`baseline_key`) against the truth.

    ``cost_ratio``: the evaluator's seconds per candidate (calibration + scoring pass) over the seconds of the
    ground truth's fine-tune (its SGD steps only, so the ratio is if anything too high).
    """
    base = choose(rows, raw["sizes"])["baseline"]
    ft = statistics.fmean(r["truth"]["ft_seconds"] for r in done_records(raw))
    return {"default_evaluator": DEFAULT_EVALUATOR, "spearman": base["spearman"], "ci95_low": base["ci"][0],
            "ci95_high": base["ci"][1], "candidates": len(base["values"]), "cost_ratio": base["seconds"] / ft}


def fidelity_record(raw: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], command: str) -> dict[str, Any]:
    """``evaluator_fidelity.json``: the headline, every signal's statistics and cost, and where they come from."""
    recs = done_records(raw)
    ft = statistics.fmean(r["truth"]["ft_seconds"] for r in recs)
    pick = choose(rows, raw["sizes"])
    keep = ("label", "setting", "scope", "images", "signal", "spearman", "kendall", "regret", "overlap", "seconds")
    return {
        "benchmark": "evaluator_fidelity", "command": command, "commit": git_commit(), "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "source": "results/benchmarks/ranking.json (python -m benchmarks.bench_ranking)",
        "headline": fidelity_headline(raw, rows), "goals": FIDELITY_GOALS,
        "truth": {"what": "top-1 on test half B after the search-quality grid's 1-epoch finalist fine-tune",
                  "mean_accuracy": statistics.fmean(r["truth"]["accuracy"] for r in recs),
                  "fine_tune_seconds": ft},
        "best_within_twice_the_cost": pick["best"]["label"], "best_overall": pick["overall"]["label"],
        "evaluators": [{**{k: r[k] for k in keep}, "ci95": list(r["ci"]), "cost_ratio": r["seconds"] / ft}
                       for r in rows],
    }


def fidelity_markdown(record: Mapping[str, Any]) -> str:
    """``evaluator_fidelity.md``: the headline against the goals and the signals table in short."""
    h, g = record["headline"], record["goals"]

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    lines = [
        f"Source: the ranking study ([ranking.md](ranking.md), `{record['source'].split(' (')[0]}`), "
        f"{h['candidates']} candidates; truth: {record['truth']['what']} (mean "
        f"{100 * record['truth']['mean_accuracy']:.2f} %, {record['truth']['fine_tune_seconds']:.0f} s of fine-tune "
        "per candidate).", "",
        f"Default evaluator: {h['default_evaluator']}.", "",
        "| figure | value | goal | met |", "|---|---|---|---|",
        f"| Spearman ρ with the truth | {h['spearman']:+.3f} | ≥ {g['spearman']} | "
        f"{met(h['spearman'] >= g['spearman'])} |",
        f"| 95 % interval (bootstrap over candidates) | [{h['ci95_low']:+.3f}, {h['ci95_high']:+.3f}] | low ≥ "
        f"{g['ci95_low']} | {met(h['ci95_low'] >= g['ci95_low'])} |",
        f"| cost: evaluator s / fine-tune s | {h['cost_ratio']:.3f} | ≤ {g['cost_ratio']} | "
        f"{met(h['cost_ratio'] <= g['cost_ratio'])} |", "",
        f"Best signal costing at most twice the default: {record['best_within_twice_the_cost']}; best at any cost "
        f"measured: {record['best_overall']} (details and paired comparisons in ranking.md).", "",
        "| signal | images | Spearman [95 % CI] | Kendall | s / candidate | cost ratio |", "|---|---|---|---|---|---|",
    ]
    lines += [f"| {e['label']} | {e['images']} | {e['spearman']:+.3f} [{e['ci95'][0]:+.2f}, {e['ci95'][1]:+.2f}] | "
              f"{e['kendall']:+.3f} | {e['seconds']:.2f} | {e['cost_ratio']:.3f} |"
              for e in sorted(record["evaluators"], key=lambda e: -e["spearman"])]
    return "\n".join(lines)


def write_fidelity(raw: Mapping[str, Any], command: str) -> Path | None:
    """Publish ``evaluator_fidelity.{md,json}`` from a complete full-size study at 50 % MACs (None otherwise)."""
    n_all = len(raw.get("candidates", [])) or raw["sizes"]["candidates"]
    if raw.get("quick") or abs(raw["sizes"]["target"] - 0.5) > 1e-9 or len(done_records(raw)) < n_all:
        return None
    rows = signal_rows(raw)
    record = fidelity_record(raw, rows, command)
    (RESULTS / "evaluator_fidelity.json").write_text(json.dumps(record, indent=1) + "\n")
    return write_result("evaluator_fidelity", FIDELITY_TITLE, fidelity_markdown(record), command=command)


def resume_command(command: str, raw: Mapping[str, Any]) -> str:
    """The command that continues the run."""
    if not command:
        return "python -m benchmarks.bench_ranking --resume" + (" --quick" if raw.get("quick") else "")
    return command if "--resume" in command else command + " --resume"


def estimate_full(raw: Mapping[str, Any], full: Sizes = FULL) -> dict[str, float]:
    """Seconds per candidate of the full form, extrapolated from the rates this (quick) run measured.

    Forward rate: the scoring passes (s/image); calibration: the ABN settings (s/batch); distillation: the KD
    settings (s/step beyond their calibration); the truth: its fine-tune (s/step, scaled by batch size) plus its
    calibration and two passes over half B at the forward rate.
    """
    recs = done_records(raw)
    s = raw["sizes"]
    per_image = statistics.fmean(v["score_seconds"] / s["score_images"] for r in recs for v in r["settings"].values())
    per_batch = statistics.fmean(r["settings"][f"abn{n}"]["prep_seconds"] / n for r in recs for n in s["calib"])
    kd_key = f"abn{s['kd_calib']}+kd{max(s['kd_steps'])}"
    per_step = statistics.fmean((r["settings"][kd_key]["prep_seconds"] - s["kd_calib"] * per_batch)
                                / max(s["kd_steps"]) for r in recs)
    ft_step = statistics.fmean(r["truth"]["ft_seconds"] for r in recs) / s["truth_steps"] * full.truth_batch / s[
        "truth_batch"]
    scored = max(full.wide_images, 2 * full.score_images)
    settings = 1 + len(full.calib) + len(full.kd_steps)
    signals_s = (settings * scored * per_image + sum(full.calib) * per_batch
                 + full.kd_calib * per_batch + max(full.kd_steps) * per_step)
    truth_s = (full.truth_steps * ft_step + (2 * full.truth_images) * per_image
               + full.truth_calib_batches * per_batch * full.truth_calib_batch / s["calib_batch"])
    return {"per_image": per_image, "per_calib_batch": per_batch, "per_kd_step": per_step, "per_ft_step": ft_step,
            "signals": signals_s, "truth": truth_s, "candidate": signals_s + truth_s,
            "hours": full.candidates * (signals_s + truth_s) / 3600}


def estimate_block(raw: Mapping[str, Any]) -> list[str]:
    e = estimate_full(raw)
    return [f"_Quick form: a smoke test (tiny sizes), not a measurement. Estimated full form (`python -m "
            f"benchmarks.bench_ranking --resume`, {FULL.candidates} candidates), extrapolated from this run's "
            f"single-thread rates (forward {1000 * e['per_image']:.2f} ms/image, calibration "
            f"{e['per_calib_batch']:.2f} s/batch of {FULL.calib_batch}, distillation {e['per_kd_step']:.2f} s/step, "
            f"fine-tune {e['per_ft_step']:.2f} s/step of {FULL.truth_batch}): ≈ {e['truth']:.0f} s truth + "
            f"{e['signals']:.0f} s signals = {e['candidate']:.0f} s per candidate, **≈ {e['hours']:.1f} h** in one "
            f"process (split with `--part 1/2` and `--part 2/2` on two free cores)._"]


# ------------------------------------------------------------------------------------------------ CLI


def result_name(quick: bool, target: float) -> str:
    """``ranking`` (``ranking_t30`` for another target), ``_quick`` appended for the quick form."""
    name = "ranking" if abs(target - 0.5) < 1e-9 else f"ranking_t{round(100 * target)}"
    return name + ("_quick" if quick else "")


def parse_sizes(args: argparse.Namespace) -> Sizes:
    """The preset with the options' overrides; rejects inconsistent image counts."""
    sizes = QUICK if args.quick else FULL
    over = {k: getattr(args, k) for k in ("candidates", "target", "score_images", "wide_images", "truth_steps")
            if getattr(args, k) is not None}
    sizes = replace(sizes, **over)
    if sizes.candidates < 3 or not 0.0 < sizes.target < 1.0:
        raise SystemExit("error: need --candidates >= 3 and a --target in (0, 1)")
    if not 1 <= sizes.score_images <= 2500 or (sizes.wide_images and not 2 * sizes.score_images <= sizes.wide_images
                                                <= 5000):
        raise SystemExit("error: --score-images must be in 1..2500 and --wide-images 0 or in 2×score-images..5000 "
                         "(half A holds 5,000 images; subsets 1 and 2 are disjoint)")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, minutes): ranking_quick.*")
    parser.add_argument("--resume", action="store_true", help="continue the run in the results JSON")
    parser.add_argument("--part", default="1/1", help="run every N-th candidate: I/N (split across processes)")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new candidate after this")
    parser.add_argument("--candidates", type=int, default=None, help=f"number of candidates ({FULL.candidates})")
    parser.add_argument("--target", type=float, default=None, help="MACs fraction of the candidates (0.5)")
    parser.add_argument("--score-images", type=int, default=None, help="half-A images of the cheap score (1000)")
    parser.add_argument("--wide-images", type=int, default=None,
                        help="half-A images also scored (5000 = all; 0: only subsets 1 and 2)")
    parser.add_argument("--truth-steps", type=int, default=None,
                        help=f"fine-tune steps of the truth ({FULL.truth_steps})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--summarise", action="store_true", help="only rebuild the markdown from the JSON")
    args = parser.parse_args(argv)
    sizes = parse_sizes(args)
    name = result_name(args.quick, sizes.target)
    path = RESULTS / f"{name}.json"
    command = command_line()
    if not args.summarise:
        missing = _cifar.data_error()
        if missing:
            print(missing, file=sys.stderr)
            return 2
        configure_threads(args.threads)
        try:
            run(path, sizes, args.seed, part=parse_part(args.part), resume=args.resume, quick=args.quick,
                max_minutes=args.max_minutes, command=command)
        except RunError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    raw = read_raw(path)
    if not raw.get("records"):
        print(f"error: no finished candidates in {path}", file=sys.stderr)
        return 2 if args.summarise else 0
    if args.summarise:  # the header names the last measuring command, not this one
        command = next((r["command"] for r in reversed(raw.get("runs", [])) if r.get("command")), command)
    out = write_result(name, TITLE + (" (quick)" if raw.get("quick") else ""), summarise(raw, command),
                       command=command)
    _log(f"wrote {out} and {path}")
    fid = write_fidelity(raw, command)
    if fid is not None:
        _log(f"wrote {fid} and its .json (issue #19's headline)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
