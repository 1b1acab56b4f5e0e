"""Batch iteration over in-memory image datasets, and batch-vectorised augmentation.

:func:`make_loader` returns a :class:`BatchLoader`: a re-iterable object whose ``len()`` is the number of
batches and which yields ``(x, y)`` with ``x`` float32 in [0, 1] (B×C×H×W) and ``y`` int64 (B). Batches are
sliced straight out of the uint8 tensors held by :class:`~autoprune.data.base.ImageTensorDataset` (no
per-sample Python work, no worker processes), so feeding a network costs a gather and a dtype conversion.

Shuffling is seeded: epoch ``e`` of a loader built with seed ``s`` uses a generator seeded from ``(s, e)``,
so every epoch has a different order and the whole sequence is reproducible. :class:`Augment` (random crop
with zero padding + horizontal flip, the standard CIFAR recipe) works on the whole uint8 batch at once in
plain torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from autoprune.errors import ConfigError

if TYPE_CHECKING:
    from autoprune.data.base import ImageTensorDataset


def crop_with_offsets(x: torch.Tensor, padding: int, oy: torch.Tensor, ox: torch.Tensor) -> torch.Tensor:
    """Per-image crops of a zero-padded batch.

    Output pixel ``[b, c, i, j]`` is pixel ``[b, c, i + oy[b], j + ox[b]]`` of ``x`` padded with ``padding``
    zeros on every side, i.e. the image shifted by ``(padding - oy[b], padding - ox[b])`` with zero fill.
    All crops are read in one indexing operation from a strided view of every possible window.

    Args:
        x: Batch B×C×H×W (any dtype).
        padding: Zero padding on each side.
        oy: Row offsets into the padded image, int64 shape B, each in ``[0, 2 * padding]``.
        ox: Column offsets, same conventions.

    Returns:
        A new tensor with the shape and dtype of ``x``.
    """
    b, c, h, w = x.shape
    padded = x.new_zeros((b, c, h + 2 * padding, w + 2 * padding))
    padded[:, :, padding:padding + h, padding:padding + w] = x
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # B×C×(2p+1)×(2p+1)×H×W view, no copy
    return windows[torch.arange(b), :, oy, ox]


def flip_some(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right, in place, the images of batch ``x`` where the boolean mask ``flip`` is set."""
    idx = torch.nonzero(flip).flatten()
    if idx.numel():
        x.index_copy_(0, idx, x.index_select(0, idx).flip(3))
    return x


@dataclass(frozen=True)
class Augment:
    """Random crop with zero padding and random horizontal flip, applied to a whole batch at once.

    Attributes:
        padding: Pixels of zero padding on each side before cropping back to the original size
            (0 disables cropping). CIFAR uses 4.
        hflip: Flip each image left-right with probability 1/2.
    """

    padding: int = 4
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.padding < 0:
            raise ConfigError(f"augmentation padding must be ≥ 0, got {self.padding}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch B×C×H×W (uint8 or float); returns a new tensor of the same shape and dtype."""
        b = x.shape[0]
        if self.padding > 0:
            oy = torch.randint(0, 2 * self.padding + 1, (b,), generator=generator)
            ox = torch.randint(0, 2 * self.padding + 1, (b,), generator=generator)
            x = crop_with_offsets(x, self.padding, oy, ox)
        if self.hflip:
            flip = torch.rand(b, generator=generator) < 0.5
            x = flip_some(x if self.padding > 0 else x.clone(), flip)
        return x


CIFAR_AUGMENT = Augment(padding=4, hflip=True)
"""The standard CIFAR training augmentation."""


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
            self.augment = dataset.augment or CIFAR_AUGMENT
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
        augment: ``True`` for the dataset's augmentation (CIFAR: 4-pixel zero-padded random crop +
            horizontal flip), an :class:`Augment` for a custom one, ``False`` for none.
        seed: Seed of shuffling and augmentation.
        drop_last: Drop a final incomplete batch.
        limit: At most this many batches per epoch (``None``: all).

    Returns:
        A re-iterable :class:`BatchLoader`; ``len()`` is the number of batches.
    """
    return BatchLoader(ds, batch_size, shuffle=shuffle, augment=augment, seed=seed, drop_last=drop_last,
                       limit=limit)
