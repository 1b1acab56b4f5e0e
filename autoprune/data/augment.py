"""Batch-vectorised image augmentation: random crop with zero padding and random horizontal flip.

:class:`Augment` (the standard CIFAR recipe) works on a whole uint8 (or float) batch at once in plain torch.
Datasets carry the augmentation that suits them (:attr:`~autoprune.data.base.ImageTensorDataset.augment`) and
loaders (:mod:`autoprune.data.loader`) apply it; this module depends on neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autoprune.errors import ConfigError


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


def augment_for_size(height: int, width: int, *, hflip: bool = True) -> Augment:
    """The CIFAR recipe scaled to an image size: zero padding of 1/8 of the shorter side, then a random crop.

    The padding is ``max(1, round(min(height, width) / 8))``: 4 pixels for 32×32 (exactly
    :data:`CIFAR_AUGMENT`) and for 28×28, 1 for 8×8, 2 for 12×12, 28 for 224×224; non-square images are
    padded by the same number of pixels on every side and cropped back to ``height × width``.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        hflip: Also flip each image left-right with probability 1/2.
    """
    if height < 1 or width < 1:
        raise ConfigError(f"image size must be at least 1×1, got {height}×{width}")
    return Augment(padding=max(1, round(min(height, width) / 8)), hflip=hflip)
