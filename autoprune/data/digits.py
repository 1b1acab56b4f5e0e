"""The scikit-learn ``digits`` dataset: 1,797 8×8 grayscale handwritten digits, available offline.

Pixel values 0..16 are rescaled to uint8 0..255 (``round(v * 255 / 16)``). scikit-learn ships no test split,
so a fixed, stratified 20 % of the images is held out as the test set (seed :data:`TEST_SEED`, independent of
the validation seed). The normalisation statistics are computed from the training images.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from autoprune.data.augment import Augment
from autoprune.data.base import DATASETS, DatasetInfo, DatasetSource, ImageTensorDataset, TrainTest, stratified_indices

TEST_FRACTION = 0.2
TEST_SEED = 0
DIGITS_AUGMENT = Augment(padding=1, hflip=False)
"""One-pixel random shifts; no flips (a mirrored digit is another symbol)."""


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as (uint8 N×1×8×8 images scaled to 0..255, int64 N labels); cached, do not modify."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return images[:, None, :, :], np.asarray(bunch.target, dtype=np.int64)


def read_digits(data_dir: str | os.PathLike[str] | None = None, download: bool = False) -> TrainTest:
    """The digits training and (fixed, stratified 20 %) test sets; ``data_dir`` and ``download`` are unused."""
    images, labels = digits_arrays()
    full = ImageTensorDataset(torch.from_numpy(images), torch.from_numpy(labels), name="digits",
                              augment=DIGITS_AUGMENT)
    test_idx = stratified_indices(full.labels, round(TEST_FRACTION * len(full)), seed=TEST_SEED)
    mask = torch.ones(len(full), dtype=torch.bool)
    mask[test_idx] = False
    train = full.take(torch.nonzero(mask).flatten())
    test = full.take(test_idx)
    pixels = train.images.double().div(255.0)
    info = DatasetInfo(name="digits", num_classes=10, input_shape=(1, 8, 8), mean=(float(pixels.mean()),),
                       std=(float(pixels.std(unbiased=False)),), class_names=tuple(str(d) for d in range(10)))
    return TrainTest(train=train, test=test, info=info)


DATASETS.register("digits", DatasetSource(read_digits, default_val_size=0.1),
                  help="scikit-learn digits: 1,797 8×8 grayscale digits, offline (fixed 20 % test split)")
