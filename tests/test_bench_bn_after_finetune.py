"""The BN-statistics benchmark (issue #20): its report from planted cells and its argument checks (the fine-tunes
themselves run in ``python -m benchmarks.bench_bn_after_finetune``; the export's ``bn_after`` is tested in
tests/test_export.py)."""

from __future__ import annotations

import pytest

from benchmarks import bench_bn_after_finetune as bn


def _acc(test: float, half_b: float) -> dict[str, float]:
    return {"test_top1": test, "half_a": test, "half_b": half_b, "test_images": 10_000}


def test_the_report_says_what_re_estimation_costs_per_epoch() -> None:
    raw = {"cells": {"resnet56": {
        "macs_ratio": 0.499,
        "epochs_log": [{"epoch": 1, "running": _acc(92.9, 92.8), "recalibrated_20": _acc(90.0, 89.9),
                        "recalibrated_100": _acc(90.1, 90.0)}],
        "export": {"test_top1": 92.9, "dense_test_top1": 93.39, "macs_ratio": 0.499},
        "reload": {"test_top1": 92.9, "matches_export": True}}}}
    md = bn.summarise(raw)
    assert "| resnet56 | 0.499 | 1 | 92.90 (92.80) | 90.00 (89.90) | 90.10 (90.00) | +2.90 |" in md
    assert "- resnet56: test 92.90 % (dense 93.39 %), 0.499 of the MACs; reloaded 92.90 % (reproduced)" in md


@pytest.mark.parametrize("argv", [["--models", "vgg16"], ["--epochs", "0"]])
def test_bad_options_are_an_error_with_a_hint_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert bn.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "\nhint: " in err


def test_without_the_recovery_cells_it_says_what_to_run_first_and_exits_2(
        tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_recovery as br

    monkeypatch.setattr(br, "RESULTS", tmp_path)
    monkeypatch.setattr(br, "data_error", lambda models: None)
    assert bn.main(["--models", "resnet20"]) == 2
    err = capsys.readouterr().err
    assert "error: recovery.json has no finished search and learning-rate sweep of resnet20" in err
    assert "hint: run python -m benchmarks.bench_recovery" in err
    assert not (tmp_path / "bn_after_finetune.json").exists()
