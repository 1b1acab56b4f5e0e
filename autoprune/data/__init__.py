"""Datasets, splits and loaders.

``load_dataset(name, data_dir)`` reads a registered dataset (:data:`DATASETS`: ``cifar10``, ``cifar100``,
``mnist``, ``fashion_mnist``, ``digits``) into uint8 tensors and returns train / val / test splits plus a
:class:`DatasetInfo`; ``make_loader(ds, batch_size)`` iterates a split as float32 batches in [0, 1].

Example:
    >>> splits = load_dataset("cifar10", "../shared/data", val_size=5000, seed=0)
    >>> loader = make_loader(splits.train, 128, shuffle=True, augment=True)
    >>> x, y = next(iter(loader))        # x: float32 128×3×32×32 in [0, 1], y: int64 128
"""

from autoprune.data import cifar, digits, mnist  # noqa: F401  (registers the datasets)
from autoprune.data.augment import CIFAR_AUGMENT, Augment
from autoprune.data.base import (
    DATASETS,
    DatasetInfo,
    DatasetSource,
    DataSplits,
    ImageTensorDataset,
    TrainTest,
    load_dataset,
    resolve_root,
    stratified_indices,
    subset,
    train_val_split,
)
from autoprune.data.loader import BatchLoader, make_loader

__all__ = [
    "CIFAR_AUGMENT",
    "DATASETS",
    "Augment",
    "BatchLoader",
    "DataSplits",
    "DatasetInfo",
    "DatasetSource",
    "ImageTensorDataset",
    "TrainTest",
    "load_dataset",
    "make_loader",
    "resolve_root",
    "stratified_indices",
    "subset",
    "train_val_split",
]
