"""Datasets, splits and loaders.

``load_dataset(name, data_dir)`` reads a registered dataset (:data:`DATASETS`: ``cifar10``, ``cifar100``,
``mnist``, ``fashion_mnist``, ``digits``, ``image_folder`` for your own class folders) or a
``package.module:callable`` of your own (:mod:`autoprune.data.external`) into uint8 tensors and returns train /
val / test splits plus a :class:`DatasetInfo`; ``make_loader(ds, batch_size)`` iterates a split as float32
batches in [0, 1].

Example:
    >>> splits = load_dataset("cifar10", "../shared/data", val_size=5000, seed=0)
    >>> loader = make_loader(splits.train, 128, shuffle=True, augment=True)
    >>> x, y = next(iter(loader))        # x: float32 128×3×32×32 in [0, 1], y: int64 128
    >>> mine = load_dataset("image_folder", "photos", options={"image_size": 64})
"""

from autoprune.data import cifar, digits, image_folder, mnist  # noqa: F401  (registers the datasets)
from autoprune.data.augment import CIFAR_AUGMENT, Augment, augment_for_size
from autoprune.data.base import (
    DATASETS,
    DataNotFound,
    DatasetInfo,
    DatasetSource,
    DataSplits,
    ImageTensorDataset,
    TrainTest,
    channel_stats,
    resolve_root,
    stratified_indices,
    subset,
    train_val_split,
)
from autoprune.data.external import is_import_string
from autoprune.data.loader import BatchLoader, make_loader
from autoprune.data.sources import check_dataset_name, load_dataset

__all__ = [
    "CIFAR_AUGMENT",
    "DATASETS",
    "Augment",
    "BatchLoader",
    "DataNotFound",
    "DataSplits",
    "DatasetInfo",
    "DatasetSource",
    "ImageTensorDataset",
    "TrainTest",
    "augment_for_size",
    "channel_stats",
    "check_dataset_name",
    "is_import_string",
    "load_dataset",
    "make_loader",
    "resolve_root",
    "stratified_indices",
    "subset",
    "train_val_split",
]
