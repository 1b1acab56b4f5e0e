"""Slow: the pretrained akamaster ResNets reproduce their published CIFAR-10 test accuracy through the CLI.

Expected top-1 (weights/README.md, measured): ResNet-20 91.73 %, ResNet-56 93.39 % on the 10,000 test images.
Matching to the hundredth of a percent checks the option-A architecture, the checkpoint import (prefix strip,
ImageNet normalisation) and the CIFAR-10 reader together.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(("depth", "expected"), [(20, 91.73), (56, 93.39)])
def test_pretrained_resnet_test_accuracy(cifar10_dir: Path, weights_dir: Path, depth: int, expected: float) -> None:
    checkpoint = next(weights_dir.glob(f"resnet{depth}-*.th"))
    cmd = [sys.executable, "-m", "autoprune.cli", "--quiet", "evaluate", "--model", f"resnet{depth}",
           "--dataset", "cifar10", "--data-dir", str(cifar10_dir), "--checkpoint", str(checkpoint)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=1200)
    assert res.returncode == 0, res.stderr
    assert f"test top-1: {expected:.2f} %" in res.stdout, res.stdout
    assert "(10000 samples)" in res.stdout and "akamaster checkpoint" in res.stdout
