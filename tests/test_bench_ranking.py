"""The ranking study (``benchmarks/bench_ranking.py``): its signals, its resumable/splittable orchestrator and its
summary, on tiny tensors and a fake problem (no CIFAR-10 needed; the one real-data test is slow and skips without
``../shared``)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_ranking as br

SIZES = replace(br.FULL, candidates=7, n_boot=50)


# ------------------------------------------------------------------------------------------------ signals


def test_signals_of_identical_logits() -> None:
    logits = torch.randn(16, 10)
    labels = torch.randint(0, 10, (16,))
    s = br.signals(logits, labels, logits.clone())
    assert s["neg_kl"] == pytest.approx(0.0, abs=1e-12)
    assert s["agreement"] == 1.0
    assert s["top1"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert s["neg_ce"] == pytest.approx(-float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert 0.0 <= s["soft_acc"] <= 1.0
    assert s["soft_acc"] == pytest.approx(float(logits.softmax(1)[torch.arange(16), labels].mean()), rel=1e-5)


def test_signals_bounds_and_direction() -> None:
    labels = torch.arange(10)
    sure = 50.0 * F.one_hot(labels, 10).float()  # confidently right
    wrong = 50.0 * F.one_hot((labels + 1) % 10, 10).float()  # confidently wrong
    good = br.signals(sure, labels, sure)
    bad = br.signals(wrong, labels, sure)
    assert good["top1"] == 1.0 and good["soft_acc"] == pytest.approx(1.0) and good["neg_ce"] == pytest.approx(0.0)
    assert bad["top1"] == 0.0 and bad["agreement"] == 0.0 and bad["soft_acc"] == pytest.approx(0.0, abs=1e-12)
    assert bad["neg_kl"] < -10 and bad["neg_ce"] < -10  # higher is better for every signal
    uniform = br.signals(torch.zeros(10, 10), labels, sure)
    assert uniform["soft_acc"] == pytest.approx(0.1)
    assert bad["neg_kl"] < uniform["neg_kl"] < good["neg_kl"]


def test_scoring_order_gives_disjoint_stratified_subsets() -> None:
    labels = torch.arange(100) % 10
    order = br.scoring_order(labels, 20, 70, seed=3)
    assert len(order) == 70 and len(set(order.tolist())) == 70
    s1, s2 = labels[order[:20]], labels[order[20:40]]
    assert torch.bincount(s1, minlength=10).tolist() == [2] * 10
    assert torch.bincount(s2, minlength=10).tolist() == [2] * 10
    assert torch.equal(order, br.scoring_order(labels, 20, 70, seed=3))  # seeded
    assert len(br.scoring_order(labels, 20, 0, seed=3)) == 40  # subsets 1 and 2 always


def test_top_overlap_and_paired_difference() -> None:
    truth = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2]
    assert br.top_overlap(truth, truth, 3) == 3
    assert br.top_overlap([-t for t in truth], truth, 3) == 0
    d, lo, hi, share = br.paired_difference(truth, [-t for t in truth], truth, n_boot=100)
    assert d == pytest.approx(2.0) and lo > 0 and share == 1.0 and hi <= 2.0 + 1e-9


# ------------------------------------------------------------------------------------------------ orchestrator


def fake_record(i: int, sizes: br.Sizes, planted: str | None = None) -> dict[str, Any]:
    """A record shaped like :meth:`Bench.measure`'s, deterministic in ``i`` (``planted`` signal = the truth)."""
    rng = random.Random(1000 + i)
    truth = 0.5 + 0.01 * ((7 * i) % 13) + 1e-4 * i
    settings = {}
    for key, _ in br.settings_of(sizes):
        sig = {scope: {g: rng.random() for g in br.SIGNALS} for scope in ("a1", "a2", "wide")}
        if planted and key == f"abn{sizes.calib[0]}":
            sig["a1"][planted] = truth
        settings[key] = {"prep_seconds": 0.1 * len(key), "score_seconds": 1.0, "rest_seconds": 4.0, "samples": 0,
                         "signals": sig}
    return {"index": i, "widths": {"g": i}, "macs_fraction": 0.5, "build_seconds": 0.0, "settings": settings,
            "truth": {"accuracy": truth, "before_ft": truth - 0.1, "ft_seconds": 100.0, "seconds": 110.0}}


class FakeBench:
    def __init__(self, sizes: br.Sizes, calls: list[int], fail_at: int | None = None) -> None:
        self.sizes, self.calls, self.fail_at = sizes, calls, fail_at

    def candidates(self) -> list[dict[str, int]]:
        return [{"g": i} for i in range(self.sizes.candidates)]

    def dense(self) -> dict[str, Any]:
        return {"macs": 4e7, "top1_a1": 0.92, "top1_wide": 0.92, "truth_acc": 0.91, "logits_seconds": 0.0}

    def measure(self, index: int, widths: dict[str, int]) -> dict[str, Any]:
        if index == self.fail_at:
            raise KeyboardInterrupt  # the process is killed in the middle of this candidate
        self.calls.append(index)
        return fake_record(index, self.sizes)


def factory(calls: list[int], fail_at: int | None = None) -> Any:
    return lambda sizes, seed, log: FakeBench(sizes, calls, fail_at)


def records(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["records"]


def test_killed_run_resumes_without_recomputing(tmp_path: Path) -> None:
    ref, path = tmp_path / "ref.json", tmp_path / "ranking.json"
    br.run(ref, SIZES, 0, bench_factory=factory([]), log=lambda m: None)
    calls: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        br.run(path, SIZES, 0, bench_factory=factory(calls, fail_at=3), log=lambda m: None)
    assert sorted(records(path), key=int) == ["0", "1", "2"]  # finished candidates were checkpointed
    with pytest.raises(br.RunError, match="--resume"):  # a fresh full run never clobbers them
        br.run(path, SIZES, 0, bench_factory=factory([]), log=lambda m: None)
    calls.clear()
    br.run(path, SIZES, 0, bench_factory=factory(calls), resume=True, log=lambda m: None)
    assert calls == [3, 4, 5, 6]
    assert records(path) == records(ref)


def test_split_parts_merge_to_the_same_records(tmp_path: Path) -> None:
    ref, path = tmp_path / "ref.json", tmp_path / "ranking.json"
    br.run(ref, SIZES, 0, bench_factory=factory([]), log=lambda m: None)
    one: list[int] = []
    two: list[int] = []
    br.run(path, SIZES, 0, bench_factory=factory(one), part=(1, 2), resume=True, command="p1", log=lambda m: None)
    br.run(path, SIZES, 0, bench_factory=factory(two), part=(2, 2), resume=True, command="p2", log=lambda m: None)
    assert one == [0, 2, 4, 6] and two == [1, 3, 5]
    assert records(path) == records(ref)
    raw = json.loads(path.read_text())
    assert {r["command"]: r["candidates"] for r in raw["runs"]} == {"p1": 4, "p2": 3}
    again: list[int] = []
    br.run(path, SIZES, 0, bench_factory=factory(again), resume=True, log=lambda m: None)
    assert again == []  # nothing left


def test_max_minutes_and_settings_checks(tmp_path: Path) -> None:
    path = tmp_path / "ranking.json"
    calls: list[int] = []
    br.run(path, SIZES, 0, bench_factory=factory(calls), max_minutes=0.0, log=lambda m: None)
    assert calls == [] and records(path) == {}
    br.run(path, SIZES, 0, bench_factory=factory(calls), resume=True, log=lambda m: None)
    assert calls == list(range(SIZES.candidates))
    with pytest.raises(br.RunError, match="other sizes"):
        br.run(path, replace(SIZES, score_images=500), 0, bench_factory=factory([]), resume=True, log=lambda m: None)
    with pytest.raises(br.RunError, match="other sizes"):
        br.run(path, SIZES, 1, bench_factory=factory([]), resume=True, log=lambda m: None)
    fresh: list[int] = []  # a quick run without --resume starts over
    br.run(path, replace(SIZES, candidates=3), 0, bench_factory=factory(fresh), quick=True, log=lambda m: None)
    assert fresh == [0, 1, 2] and len(records(path)) == 3


# ------------------------------------------------------------------------------------------------ summary


def planted_raw(planted: str, n: int = 12, quick: bool = False) -> dict[str, Any]:
    sizes = replace(SIZES, candidates=n)
    return {"sizes": br._plain(sizes), "seed": 0, "quick": quick, "candidates": [{"g": i} for i in range(n)],
            "dense": FakeBench(sizes, []).dense(), "runs": [],
            "records": {str(i): fake_record(i, sizes, planted) for i in range(n)}}


def test_summary_picks_a_planted_signal_from_the_data() -> None:
    raw = planted_raw("soft_acc")
    rows = br.signal_rows(raw)
    planted = next(r for r in rows if (r["setting"], r["scope"], r["signal"]) == ("abn10", "a1", "soft_acc"))
    assert planted["spearman"] == pytest.approx(1.0) and planted["kendall"] == pytest.approx(1.0)
    assert planted["regret"] == 0.0 and planted["overlap"] == 5
    choice = br.choose(rows, raw["sizes"])
    assert choice["best"] is planted and choice["baseline"]["signal"] == "top1"
    text = br.summarise(raw, "python -m benchmarks.bench_ranking")
    assert "the best is **soft accuracy, ABN 10×64, 1000 images**" in text
    assert "Status: 12 of 12 candidates done (complete)." in text
    # another planted signal is picked instead: nothing is hard-coded
    other = br.choose(br.signal_rows(planted_raw("neg_kl"), intervals=False), raw["sizes"])
    assert other["best"]["signal"] == "neg_kl"


def test_summary_of_a_partial_quick_run_has_the_estimate() -> None:
    raw = planted_raw("top1", n=4, quick=True)
    raw["candidates"] = [{"g": i} for i in range(6)]
    text = br.summarise(raw, "python -m benchmarks.bench_ranking --quick")
    assert "Status: 4 of 6 candidates done; continue with `python -m benchmarks.bench_ranking --quick --resume`" in text
    assert "That is the current score itself" in text  # the planted signal is the current score's own
    assert "per candidate, **≈" in text
    assert "Too few" in br.summarise({**raw, "records": {"0": raw["records"]["0"]}})


def test_fidelity_headline_is_the_default_evaluators_and_published_only_when_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = planted_raw("top1")  # the default score (top-1 after ABN 10, subset 1) ranks perfectly here
    rows = br.signal_rows(raw)
    h = br.fidelity_headline(raw, rows)
    assert set(h) == {"default_evaluator", "spearman", "ci95_low", "ci95_high", "candidates", "cost_ratio"}
    assert h["spearman"] == pytest.approx(1.0) and h["candidates"] == 12 and h["ci95_low"] <= h["ci95_high"]
    assert h["cost_ratio"] == pytest.approx((0.1 * len("abn10") + 1.0) / 100.0)  # (prep + score) / fine-tune s
    worse = br.fidelity_headline(planted_raw("soft_acc"), br.signal_rows(planted_raw("soft_acc")))
    assert worse["spearman"] < 0.9  # computed from the data, not fixed
    monkeypatch.setattr(br, "RESULTS", tmp_path)
    monkeypatch.setattr(br, "write_result", lambda name, title, body, command=None: tmp_path / f"{name}.md")
    partial = {**raw, "records": {k: v for k, v in raw["records"].items() if int(k) < 6}}
    assert br.write_fidelity(partial, "cmd") is None and br.write_fidelity({**raw, "quick": True}, "cmd") is None
    assert br.write_fidelity(raw, "python -m benchmarks.bench_ranking") == tmp_path / "evaluator_fidelity.md"
    record = json.loads((tmp_path / "evaluator_fidelity.json").read_text())
    assert record["headline"] == pytest.approx(h) and record["command"] == "python -m benchmarks.bench_ranking"
    assert len(record["evaluators"]) == len(rows) and {"date", "commit", "machine"} <= set(record)
    text = br.fidelity_markdown(record)
    assert "| Spearman ρ with the truth | +1.000 | ≥ 0.8 | yes |" in text


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.slow
def test_real_candidate_is_measured_deterministically(cifar10_dir: Path, weights_dir: Path) -> None:
    from autoprune.utils import configure_threads

    configure_threads(1)
    sizes = replace(br.QUICK, candidates=3, score_images=50, wide_images=100, calib=(1, 2), kd_calib=1,
                    kd_steps=(1, 2), truth_steps=1, truth_calib_batches=1, truth_images=100)
    bench = br.Bench(sizes, 0, log=lambda m: None)
    cand = bench.candidates()
    assert len(cand) == 3
    a, b = bench.measure(0, cand[0]), bench.measure(0, cand[0])
    assert set(a["settings"]) == {k for k, _ in br.settings_of(sizes)}
    for key in a["settings"]:
        assert a["settings"][key]["signals"] == b["settings"][key]["signals"]
    assert a["truth"]["accuracy"] == b["truth"]["accuracy"]
    assert 0.45 <= a["macs_fraction"] <= 0.55
