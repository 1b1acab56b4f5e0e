"""MNIST and Fashion-MNIST from the official idx files (gzip-compressed or raw) in a local directory.

The idx format: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, each dimension as
a big-endian uint32, then the values (big-endian) in row-major order. Images are idx3 (N×28×28) and labels
idx1 (N); both the official ``*.gz`` files and their decompressed versions are read.

The data directory (``data_dir``, else ``$AUTOPRUNE_DATA``, else ``./data``) may hold the four files itself
or in a sub-directory (``mnist/``, ``MNIST/raw/``; ``fashion_mnist/``, ``fashion-mnist/``,
``FashionMNIST/raw/``). With ``download=True`` the official files are fetched into ``<data dir>/mnist`` or
``<data dir>/fashion_mnist``.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoprune.data import download as dl
from autoprune.data.augment import Augment
from autoprune.data.base import (
    DATASETS,
    DataNotFound,
    DatasetInfo,
    DatasetSource,
    ImageTensorDataset,
    TrainTest,
    check_labels,
    resolve_root,
)
from autoprune.errors import DataError

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""idx type codes and the NumPy dtypes they stand for."""

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
}

_INFO = {
    "mnist": ("MNIST", (0.1307,), (0.3081,), tuple(str(d) for d in range(10))),
    "fashion_mnist": ("Fashion-MNIST", (0.2860,), (0.3530,),
                      ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                       "Bag", "Ankle boot")),
}

MNIST_AUGMENT = Augment(padding=2, hflip=False)
"""Small random shifts only: mirrored digits (and shoes) are different objects."""


def parse_idx(data: bytes, source: str = "idx data") -> np.ndarray:
    """Parse the bytes of an idx file into an array of its declared shape and dtype.

    Raises:
        DataError: Bad magic number, unknown type code, or a size that disagrees with the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{source}: not an idx file (bad magic number)", hint="re-download the dataset")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise DataError(f"{source}: unknown idx type code 0x{code:02x}", hint="re-download the dataset")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated idx header", hint="re-download the dataset")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    count = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != count * dtype.itemsize:
        raise DataError(f"{source}: header announces shape {dims} ({count * dtype.itemsize} bytes) but "
                        f"{len(data) - header} bytes follow (truncated or corrupt)", hint="re-download the dataset")
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file, gzip-compressed (recognised by its magic bytes) or raw.

    Raises:
        DataError: The file is unreadable, a corrupt gzip stream, or not a valid idx file.
    """
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path} ({exc})", hint="delete the file and download it again") from exc
    return parse_idx(raw, str(path))


def _file_in(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_idx_files(name: str, data_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Locate the four idx files of ``name`` (``"mnist"`` or ``"fashion_mnist"``).

    Raises:
        DataError: Not found; the message lists every place looked at and what was missing there.
    """
    root = resolve_root(data_dir)
    looked = []
    for directory in (root, *(root / sub for sub in SUBDIRS[name])):
        found = {key: _file_in(directory, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return {key: path for key, path in found.items() if path is not None}
        if not directory.is_dir():
            looked.append(f"{directory} (no such directory)")
        else:
            missing = [FILES[k] + "[.gz]" for k, v in found.items() if v is None]
            looked.append(f"{directory} (missing {', '.join(missing)})")
    title = _INFO[name][0]
    raise DataNotFound(f"{title} not found. Looked in:\n  - " + "\n  - ".join(looked), root=root,
                       point_at="the directory holding the idx files", download_to=root / SUBDIRS[name][0])


def _split(images: np.ndarray, labels: np.ndarray, paths: tuple[Path, Path], name: str) -> ImageTensorDataset:
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{paths[0]}: expected uint8 images N×H×W and labels N, got {images.dtype} "
                        f"{images.shape} and {labels.shape}", hint="check that the files are the right ones")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels",
                        hint="the files come from different distributions; download them again")
    check_labels(labels, 10, paths[1])
    return ImageTensorDataset(torch.from_numpy(images.copy()).unsqueeze(1),
                              torch.from_numpy(labels.astype(np.int64)), name=name, augment=MNIST_AUGMENT)


def read_mnist(name: str, data_dir: str | os.PathLike[str] | None = None, *, download: bool = False,
               resources: Mapping[str, Sequence[dl.Resource]] | None = None) -> TrainTest:
    """Read the official MNIST / Fashion-MNIST training and test sets.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"``.
        data_dir: Directory holding the idx files (or a parent, see the module docstring).
        download: Fetch the official gzip files into ``<data dir>/<name>`` when missing.
        resources: Download table (default :data:`autoprune.data.download.RESOURCES`).

    Raises:
        DataError: Not found (and not downloaded), corrupt, or failing its checksum.
    """
    try:
        files = find_idx_files(name, data_dir)
    except DataError:
        if not download:
            raise
        dl.fetch(name, resolve_root(data_dir) / SUBDIRS[name][0], resources=resources)
        files = find_idx_files(name, data_dir)
    arrays = {key: read_idx(path) for key, path in files.items()}
    train = _split(arrays["train_images"], arrays["train_labels"], (files["train_images"], files["train_labels"]),
                   name)
    test = _split(arrays["test_images"], arrays["test_labels"], (files["test_images"], files["test_labels"]), name)
    _, mean, std, classes = _INFO[name]
    h, w = train.image_shape[1:]
    info = DatasetInfo(name=name, num_classes=10, input_shape=(1, h, w), mean=mean, std=std, class_names=classes)
    return TrainTest(train=train, test=test, info=info)


def _reader(name: str) -> Any:
    def read(data_dir: str | os.PathLike[str] | None, download: bool) -> TrainTest:
        return read_mnist(name, data_dir, download=download)

    return read


DATASETS.register("mnist", DatasetSource(_reader("mnist"), default_val_size=0.1),
                  help="MNIST: 60k/10k 28×28 grayscale handwritten digits (idx files, gz or raw)")
DATASETS.register("fashion_mnist", DatasetSource(_reader("fashion_mnist"), default_val_size=0.1),
                  help="Fashion-MNIST: 60k/10k 28×28 grayscale clothing images (idx files, gz or raw)")
