"""Batch iteration over in-memory image datasets.

:func:`make_loader` returns a :class:`BatchLoader`: a re-iterable object whose ``len()`` is the number of
batches and which yields ``(x, y)`` with ``x`` float32 in [0, 1] (B×C×H×W) and ``y`` int64 (B). Batches are
sliced straight out of the uint8 tensors held by :class:`~autoprune.data.base.ImageTensorDataset` (no
per-sample Python work, no worker processes), so feeding a network costs a gather and a dtype conversion.

Shuffling is seeded: epoch ``e`` of a loader built with seed ``s`` uses a generator seeded from ``(s, e)``,
so every epoch has a different order and the whole sequence is reproducible. Augmentation
(:class:`~autoprune.data.augment.Augment`) is applied to the whole uint8 batch at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from autoprune.data.augment import Augment, augment_for_size
from autoprune.data.base import ImageTensorDataset
from autoprune.errors import ConfigError


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed mixing the loader seed and the epoch counter."""
    state = np.random.SeedSequence([seed % 2**63, epoch]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class BatchLoader:
    """Re-iterable batches ``(x float32 in [0, 1], y int64)`` over an :class:`ImageTensorDataset`.

    Each ``iter()`` is one epoch; the epoch counter advances by one per iteration (or is set with
    :meth:`set_epoch`). See :func:`make_loader` for the arguments.
    """

    def __init__(self, dataset: ImageTensorDataset, batch_size: int, *, shuffle: bool = False,
                 augment: bool | Augment | None = False, seed: int = 0, drop_last: bool = False,
                 limit: int | None = None) -> None:
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
        if limit is not None and int(limit) < 0:
            raise ConfigError(f"limit must be ≥ 0 batches (or None for all), got {limit}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment: Augment | None
        if augment is True:
            self.augment = dataset.augment or augment_for_size(*dataset.image_shape[1:])
        elif isinstance(augment, Augment):
            self.augment = augment
        else:
            self.augment = None
        self.seed = int(seed)
        self.drop_last = drop_last
        self.limit = None if limit is None else int(limit)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (its order and augmentation are fixed by seed and epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return batches if self.limit is None else min(batches, self.limit)

    @property
    def num_samples(self) -> int:
        """Samples yielded by one full iteration."""
        return min(len(self) * self.batch_size, len(self.dataset))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return self._batches(gen)

    def _batches(self, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.dataset.images, self.dataset.labels
        n = len(self.dataset)
        order = torch.randperm(n, generator=gen) if self.shuffle else None
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n)
            if order is None:
                x, y = images[lo:hi], labels[lo:hi].clone()
            else:
                idx = order[lo:hi]
                x, y = images.index_select(0, idx), labels.index_select(0, idx)
            if self.augment is not None:
                x = self.augment(x, gen)
            yield x / 255.0, y  # uint8 → float32 in one pass

    def __repr__(self) -> str:
        return (f"BatchLoader({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"augment={self.augment}, seed={self.seed}, batches={len(self)})")


def make_loader(ds: ImageTensorDataset, batch_size: int, *, shuffle: bool = False,
                augment: bool | Augment | None = False, seed: int = 0, drop_last: bool = False,
                limit: int | None = None) -> BatchLoader:
    """Batches of an in-memory dataset.

    Args:
        ds: The dataset (uint8 images, int64 labels).
        batch_size: Samples per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: Shuffle every epoch, seeded by ``(seed, epoch)``.
        augment: ``True`` for the dataset's augmentation (``ds.augment``; if it has none, a random crop with
            zero padding of 1/8 of the shorter side + horizontal flip, :func:`~autoprune.data.augment.augment_for_size`:
            CIFAR's 4-pixel crop at 32×32), an :class:`Augment` for a custom one, ``False`` for none.
        seed: Seed of shuffling and augmentation.
        drop_last: Drop a final incomplete batch.
        limit: At most this many batches per epoch (``None``: all).

    Returns:
        A re-iterable :class:`BatchLoader`; ``len()`` is the number of batches.
    """
    return BatchLoader(ds, batch_size, shuffle=shuffle, augment=augment, seed=seed, drop_last=drop_last,
                       limit=limit)
