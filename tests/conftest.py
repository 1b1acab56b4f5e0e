"""Shared fixtures: paths to the real data in ../shared, seeding, and skips with clear reasons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AUTOPRUNE_SHARED", REPO.parent / "shared"))
CIFAR10_DIR = SHARED / "data" / "cifar-10-batches-bin"
WEIGHTS_DIR = SHARED / "weights"


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small models: 1 thread is faster and immune to oversubscription


@pytest.fixture
def cifar10_dir() -> Path:
    """Directory with the real CIFAR-10 binary batches (skips if ../shared is not beside the checkout)."""
    if not (CIFAR10_DIR / "test_batch.bin").is_file():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10_DIR} (put ../shared beside the checkout)")
    return CIFAR10_DIR


@pytest.fixture
def weights_dir() -> Path:
    """Directory with the pretrained akamaster CIFAR ResNets (skips if absent)."""
    if not (WEIGHTS_DIR / "resnet20-12fca82f.th").is_file():
        pytest.skip(f"pretrained weights not found at {WEIGHTS_DIR}")
    return WEIGHTS_DIR
