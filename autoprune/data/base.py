"""Dataset records, in-memory image datasets, the dataset registry and seeded stratified splits.

Everything a dataset module produces ends up here: :class:`DatasetInfo` (classes, shape, normalisation
statistics), :class:`ImageTensorDataset` (uint8 images N×C×H×W and int64 labels held in memory) and, from
:func:`~autoprune.data.sources.load_dataset`, a :class:`DataSplits` of train / validation / test. Unless a
dataset brings its own validation set (:attr:`TrainTest.val`), the validation split is carved out of the
official training set with a seeded, class-stratified draw (:func:`train_val_split`); the official test set is
passed through untouched. :func:`subset` draws stratified calibration subsets.

Dataset modules register a :class:`DatasetSource` in :data:`DATASETS`; where they look for files on disk is
decided by :func:`resolve_root` (explicit directory, else ``$AUTOPRUNE_DATA``, else ``./data``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from autoprune.data.augment import Augment
from autoprune.errors import ConfigError, DataError
from autoprune.registry import Registry

ENV_DATA_DIR = "AUTOPRUNE_DATA"
"""Environment variable naming the default data directory."""

DEFAULT_DATA_DIR = Path("data")
"""Data directory used when neither an explicit one nor ``$AUTOPRUNE_DATA`` is given (relative to the cwd)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
        name: Registry name, e.g. ``"cifar10"``.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        input_shape: ``(C, H, W)`` of one image.
        mean: Per-channel mean of the training images scaled to [0, 1] (for a ``Normalize`` layer).
        std: Per-channel standard deviation of the training images scaled to [0, 1].
        class_names: One name per class, in label order.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        channels = self.input_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"{self.name}: mean/std need {channels} values, got {self.mean} / {self.std}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")


class ImageTensorDataset(Dataset):
    """Images and labels held in memory as tensors.

    Args:
        images: uint8 tensor of shape N×C×H×W.
        labels: integer tensor of shape N (stored as int64).
        name: Dataset name, for messages.
        augment: The augmentation that suits this data (used by ``make_loader(..., augment=True)``);
            ``None`` means the loader's default (random crop with 4-pixel padding + horizontal flip).

    Raises:
        DataError: If the tensors have the wrong dtype or shape, or their lengths differ.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, name: str = "",
                 augment: Augment | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"{name or 'dataset'}: images must be a uint8 tensor N×C×H×W, got "
                            f"{images.dtype} of shape {tuple(images.shape)}",
                            hint="store pixels as uint8 0..255 in channel-first layout")
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise DataError(f"{name or 'dataset'}: labels must be a 1-D integer tensor, got {labels.dtype} "
                            f"of shape {tuple(labels.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{name or 'dataset'}: {images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.name = name
        self.augment = augment

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """One ``(image float32 C×H×W in [0, 1], label)`` pair."""
        return self.images[index] / 255.0, int(self.labels[index])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        """Number of samples per class (int64 tensor)."""
        return torch.bincount(self.labels, minlength=num_classes or 0)

    def take(self, indices: torch.Tensor | Sequence[int]) -> ImageTensorDataset:
        """A new dataset holding copies of the samples at ``indices`` (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageTensorDataset(self.images.index_select(0, idx), self.labels.index_select(0, idx),
                                  name=self.name, augment=self.augment)

    def __repr__(self) -> str:
        return f"ImageTensorDataset(name={self.name!r}, n={len(self)}, image_shape={self.image_shape})"


@dataclass(frozen=True)
class DataSplits:
    """The three splits of a dataset and its description.

    Attributes:
        train: Training split (the official training set minus ``val``).
        val: Validation split (used by the search): carved from the official training set, or the dataset's
            own validation set where it has one.
        test: The official test set, untouched (only for final reports).
        info: Classes, shape and normalisation statistics.
    """

    train: ImageTensorDataset
    val: ImageTensorDataset
    test: ImageTensorDataset
    info: DatasetInfo


@dataclass(frozen=True)
class TrainTest:
    """The official training and test sets of a dataset, as read from disk (before the validation split).

    Attributes:
        train: The official training set.
        test: The official test set.
        info: Classes, shape and normalisation statistics.
        val: The dataset's own validation set, if it has one (e.g. an image folder's ``val/``): then no
            validation split is carved from ``train``. ``None`` for the built-in datasets.
    """

    train: ImageTensorDataset
    test: ImageTensorDataset
    info: DatasetInfo
    val: ImageTensorDataset | None = None


@dataclass(frozen=True)
class DatasetSource:
    """How to read one registered dataset.

    Attributes:
        read: ``read(data_dir, download, **options) -> TrainTest``.
        default_val_size: Validation size used when ``load_dataset`` gets ``val_size=None``.
        options: Names of the keyword options ``read`` accepts (``dataset.kwargs`` of a campaign); any other
            option is refused before ``read`` is called.
        train_statistics: Recompute ``info.mean`` / ``info.std`` from the final training split (after the
            validation split is carved), so that no validation or test image contributes to them.
    """

    read: Callable[..., TrainTest]
    default_val_size: int | float
    options: tuple[str, ...] = ()
    train_statistics: bool = False


DATASETS: Registry[DatasetSource] = Registry("dataset")
"""Registered datasets: ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``digits``, ``image_folder``."""


def resolve_root(data_dir: str | os.PathLike[str] | None) -> Path:
    """The data directory to search: ``data_dir``, else ``$AUTOPRUNE_DATA``, else ``./data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_DIR


class DataNotFound(DataError):
    """A dataset's files are not where they were looked for.

    The message lists every place searched. The hint depends on how the calling command lets its user name the
    data directory, which the dataset module does not know: by default it names the command-line flags
    (``--download``, ``--data-dir``, see :meth:`hint_for`); a command that takes the directory from elsewhere
    (a campaign's ``dataset.data_dir``) catches this error and words its own hint from :attr:`root`,
    :attr:`point_at` and :attr:`download_to`.

    Args:
        message: What is missing and where it was looked for.
        root: The data directory that was searched (see :func:`resolve_root`).
        point_at: What the data directory may be, e.g. ``"the extracted directory (e.g. .../cifar-10-batches-bin)"``.
        download_to: Where a download puts the files; ``None`` when the dataset cannot be downloaded.
        fetched: What a download fetches (``"the official archive"``, ``"the official files"``).
    """

    def __init__(self, message: str, *, root: Path, point_at: str, download_to: Path | None = None,
                 fetched: str = "the official files") -> None:
        self.root = root
        self.point_at = point_at
        self.download_to = download_to
        self.fetched = fetched
        super().__init__(message, hint=self.hint_for("--data-dir", "--download"))

    def hint_for(self, data_dir: str, download: str | None = None) -> str:
        """The hint for a command whose user names the data directory with the option ``data_dir`` and asks for a
        download with ``download`` (``None``: the command cannot download)."""
        point = f"point {data_dir} (or ${ENV_DATA_DIR}) at {self.point_at}"
        if download is None or self.download_to is None:
            return point
        return f"pass {download} to fetch {self.fetched} into {self.download_to}, or {point}"


# --------------------------------------------------------------------------------------------- splits


def resolve_count(size: int | float, total: int, what: str = "val_size") -> int:
    """Turn an int count or a float fraction of ``total`` into a count.

    Raises:
        ConfigError: If ``size`` is negative, a fraction outside [0, 1), or a count of ``total`` or more.
    """
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{what} must be an int count or a float fraction, got {size!r}",
                          hint=f"e.g. {what}=5000 or {what}=0.1")
    if isinstance(size, (float, np.floating)):
        if not 0.0 <= float(size) < 1.0:
            raise ConfigError(f"{what}={size} is not a fraction in [0, 1)",
                              hint="give a fraction such as 0.1, or an integer count")
        return round(float(size) * total)
    count = int(size)
    if count < 0 or count >= total:
        raise ConfigError(f"{what}={count} does not fit a training set of {total} samples",
                          hint=f"choose a count between 0 and {total - 1}, or a fraction such as 0.1")
    return count


def _allocate(class_sizes: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` over classes proportionally to their sizes (largest remainder, ties to lower labels).

    ``floor(exact)`` never exceeds a class size and the fractional parts sum to the shortfall, so handing one
    extra sample to each of the classes with the largest fractional parts always fits.
    """
    exact = class_sizes.astype(np.float64) * n / int(class_sizes.sum())
    alloc = np.floor(exact).astype(np.int64)
    left = n - int(alloc.sum())
    order = np.argsort(-(exact - alloc), kind="stable")
    alloc[order[:left]] += 1
    return alloc


def stratified_indices(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Pick ``n`` indices with every class represented in proportion to its frequency.

    The draw depends only on ``labels``, ``n`` and ``seed``. The result is sorted ascending.

    Args:
        labels: int64 labels, shape N.
        n: How many indices to pick (0 ≤ n ≤ N).
        seed: Seed of the draw.
    """
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if not 0 <= n <= len(y):
        raise ConfigError(f"cannot draw {n} samples from {len(y)}")
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    classes, sizes = np.unique(y, return_counts=True)
    alloc = _allocate(sizes, n)
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, alloc, strict=True)]
    return torch.from_numpy(np.sort(np.concatenate(picked)).astype(np.int64))


def train_val_split(ds: ImageTensorDataset, val_size: int | float, *, seed: int = 0
                    ) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Split ``ds`` into disjoint train and validation parts, stratified by class and seeded.

    Both parts keep the original sample order.

    Args:
        ds: The official training set.
        val_size: Int count or float fraction of ``ds`` to put in the validation part.
        seed: Seed of the draw; the same seed gives the same split.
    """
    n_val = resolve_count(val_size, len(ds))
    val_idx = stratified_indices(ds.labels, n_val, seed)
    mask = torch.ones(len(ds), dtype=torch.bool)
    mask[val_idx] = False
    train_idx = torch.nonzero(mask).flatten()
    return ds.take(train_idx), ds.take(val_idx)


def subset(ds: ImageTensorDataset, n: int | float, seed: int = 0) -> ImageTensorDataset:
    """A stratified, seeded subset of ``ds`` (for calibration batches, information-flow estimates, ...).

    Args:
        ds: Dataset to draw from.
        n: Number of samples (int), or a fraction of ``ds`` (float in [0, 1)). Counts ≥ ``len(ds)`` return a
            copy of the whole dataset.
        seed: Seed of the draw.
    """
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and int(n) >= len(ds):
        return ds.take(torch.arange(len(ds)))
    count = resolve_count(n, len(ds), what="subset size")
    return ds.take(stratified_indices(ds.labels, count, seed))


def check_labels(labels: np.ndarray, num_classes: int, source: str | os.PathLike[str]) -> None:
    """Raise :class:`DataError` if any label is outside ``0 .. num_classes - 1``."""
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"{source}: labels range {int(labels.min())}..{int(labels.max())}, expected "
                        f"0..{num_classes - 1}; the file is corrupt or belongs to another dataset",
                        hint="re-extract or re-download the dataset")


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 images N×C×H×W, scaled to [0, 1].

    Sums are accumulated exactly in integers over chunks of ``chunk`` images, so memory stays bounded and the
    result does not depend on the chunking.

    Args:
        images: uint8 tensor N×C×H×W with N ≥ 1.
        chunk: Images per chunk.

    Returns:
        ``(mean, std)``, one value per channel each.
    """
    n, c, h, w = images.shape
    if n == 0:
        raise DataError("cannot compute normalisation statistics of an empty training split",
                        hint="the training split needs at least one image")
    s1 = torch.zeros(c, dtype=torch.int64)
    s2 = torch.zeros(c, dtype=torch.int64)
    for lo in range(0, n, chunk):
        part = images[lo:lo + chunk].to(torch.int64)
        s1 += part.sum(dim=(0, 2, 3))
        s2 += part.square().sum(dim=(0, 2, 3))
    count = n * h * w
    means, stds = [], []
    for a, b in zip(s1.tolist(), s2.tolist(), strict=True):
        var = (b * count - a * a) / (count * count)  # exact integers until this division
        means.append(a / count / 255.0)
        stds.append(max(var, 0.0) ** 0.5 / 255.0)
    return tuple(means), tuple(stds)
