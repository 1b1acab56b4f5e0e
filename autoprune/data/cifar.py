"""CIFAR-10 and CIFAR-100 from the official binary or python distributions in a local directory.

Binary layout (``cifar-10-batches-bin``: ``data_batch_{1..5}.bin``, ``test_batch.bin``; ``cifar-100-binary``:
``train.bin``, ``test.bin``): fixed-size records of label byte(s) followed by 3,072 pixel bytes — the 1,024
red values, then green, then blue, each 32×32 row-major. CIFAR-100 records carry two label bytes, coarse then
fine; the fine label is used.

Python layout (``cifar-10-batches-py``: ``data_batch_{1..5}``, ``test_batch``; ``cifar-100-python``:
``train``, ``test``): pickled dicts holding a uint8 array ``data`` (N×3072, same pixel order) and
``labels`` / ``fine_labels``. They are read with :class:`RestrictedUnpickler`, which only resolves the
handful of NumPy names needed to rebuild an array, so a tampered file cannot run code.

The data directory (``data_dir``, else ``$AUTOPRUNE_DATA``, else ``./data``) may be the directory holding the
batch files or a parent of the official extracted directory. With ``download=True`` the official binary
archive is fetched into it (see :mod:`autoprune.data.download`).
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoprune.data import download as dl
from autoprune.data.augment import CIFAR_AUGMENT
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

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
    "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television",
    "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
)

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """Where and how one CIFAR distribution stores its files.

    Attributes:
        dataset: ``"cifar10"`` or ``"cifar100"``.
        kind: ``"binary"`` or ``"python"``.
        dir_name: Name of the official extracted directory.
        train_files: Training batch files.
        test_files: Test batch files.
        label_bytes: Label bytes per binary record (the last one is the label used).
        label_key: Key of the labels in a python batch.
        meta_file: File with the class names (text lines for binary, pickle for python).
        meta_key: Key of the class names in the python meta pickle.
    """

    dataset: str
    kind: str
    dir_name: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int = 1
    label_key: str = "labels"
    meta_file: str = ""
    meta_key: str = ""

    @property
    def files(self) -> tuple[str, ...]:
        """Every batch file the layout needs."""
        return self.train_files + self.test_files


LAYOUTS: dict[str, tuple[CifarLayout, ...]] = {
    "cifar10": (
        CifarLayout("cifar10", "binary", "cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                    ("test_batch.bin",), meta_file="batches.meta.txt"),
        CifarLayout("cifar10", "python", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                    ("test_batch",), label_key="labels", meta_file="batches.meta", meta_key="label_names"),
    ),
    "cifar100": (
        CifarLayout("cifar100", "binary", "cifar-100-binary", ("train.bin",), ("test.bin",), label_bytes=2,
                    meta_file="fine_label_names.txt"),
        CifarLayout("cifar100", "python", "cifar-100-python", ("train",), ("test",), label_key="fine_labels",
                    meta_file="meta", meta_key="fine_label_names"),
    ),
}

_INFO = {
    "cifar10": ("CIFAR-10", CIFAR10_MEAN, CIFAR10_STD, CIFAR10_CLASSES),
    "cifar100": ("CIFAR-100", CIFAR100_MEAN, CIFAR100_STD, CIFAR100_CLASSES),
}


# ------------------------------------------------------------------------------------ safe unpickling


def _numpy_attr(module: str, name: str) -> Any:
    """Resolve a NumPy-internal name that moved between ``numpy.core`` (1.x) and ``numpy._core`` (2.x)."""
    tail = module.split(".", 2)[-1]  # "multiarray" or "numeric"
    for candidate in (f"numpy._core.{tail}", f"numpy.core.{tail}"):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"{module}.{name} is not available in this NumPy")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds plain containers, strings, numbers and NumPy arrays.

    The official CIFAR python batches are Python-2 pickles of dicts holding lists, byte strings and one
    NumPy array; rebuilding them needs ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
    ``numpy.dtype`` (plus ``_codecs.encode`` and ``numpy.core.numeric._frombuffer`` for pickles written by
    newer Pythons / NumPys). Any other global is refused with :class:`pickle.UnpicklingError`.
    """

    _NUMPY_INTERNAL = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    })

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the allowed globals."""
        if (module, name) in self._NUMPY_INTERNAL:
            return _numpy_attr(module, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a dataset file")


def safe_unpickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a pickled dict (CIFAR python batch or meta file) with :class:`RestrictedUnpickler`.

    Byte-string keys are decoded to ``str``.

    Raises:
        DataError: The file is unreadable, refers to a disallowed global, or is not a dict.
    """
    try:
        with open(path, "rb") as fh:
            obj = RestrictedUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # a corrupt pickle can fail in many ways; all mean "not a CIFAR batch"
        raise DataError(f"cannot read {path} as a CIFAR python batch ({exc})",
                        hint="re-extract the official cifar-*-python.tar.gz, or use the binary distribution") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}",
                        hint="re-extract the official cifar-*-python.tar.gz")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


# ------------------------------------------------------------------------------------------ readers


def read_binary_batches(paths: Sequence[Path], label_bytes: int, num_classes: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR binary batch files into (uint8 N×3×32×32 images, int64 N labels).

    Args:
        paths: Batch files, concatenated in this order.
        label_bytes: 1 for CIFAR-10, 2 for CIFAR-100 (coarse, fine: the fine label is used).
        num_classes: For the label range check.

    Raises:
        DataError: A file's size is not a whole number of records, or a label is out of range.
    """
    record = label_bytes + PIXELS
    arrays = []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records "
                            "(truncated or not a CIFAR file)", hint="re-extract or re-download the dataset")
        arrays.append(raw.reshape(-1, record))
    n = sum(a.shape[0] for a in arrays)
    images = np.empty((n, 3, 32, 32), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    start = 0
    for path, arr in zip(paths, arrays, strict=True):
        stop = start + arr.shape[0]
        check_labels(arr[:, label_bytes - 1], num_classes, path)
        labels[start:stop] = arr[:, label_bytes - 1]
        images[start:stop] = arr[:, label_bytes:].reshape(-1, 3, 32, 32)
        start = stop
    return torch.from_numpy(images), torch.from_numpy(labels)


def read_python_batches(paths: Sequence[Path], label_key: str, num_classes: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR python (pickled) batch files into (uint8 N×3×32×32 images, int64 N labels).

    Raises:
        DataError: A file is unreadable or lacks ``data`` / ``label_key`` of consistent sizes.
    """
    images, labels = [], []
    for path in paths:
        batch = safe_unpickle(path)
        data, y = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or y is None:
            raise DataError(f"{path}: missing 'data' array or {label_key!r} labels",
                            hint="re-extract the official cifar-*-python.tar.gz")
        y = np.asarray(y, dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS or data.shape[0] != y.shape[0]:
            raise DataError(f"{path}: 'data' is {data.dtype} {data.shape} with {y.shape[0]} labels, expected "
                            f"uint8 (N, {PIXELS}) with N labels", hint="re-extract the official archive")
        check_labels(y, num_classes, path)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _class_names(directory: Path, layout: CifarLayout, default: tuple[str, ...]) -> tuple[str, ...]:
    """Class names from the distribution's meta file when it is present and sensible, else ``default``."""
    path = directory / layout.meta_file
    if not path.is_file():
        return default
    names: list[str] = []
    try:
        if layout.kind == "binary":
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            raw = safe_unpickle(path).get(layout.meta_key, [])
            names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw]
    except (OSError, UnicodeDecodeError, DataError):
        return default
    return tuple(names) if len(names) == len(default) else default


# --------------------------------------------------------------------------------------- lookup


def _missing(directory: Path, layout: CifarLayout) -> list[str]:
    return [f for f in layout.files if not (directory / f).is_file()]


def find_cifar(name: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[Path, CifarLayout]:
    """Locate a CIFAR distribution: ``root`` itself or ``root/<official directory>``, binary preferred.

    Raises:
        DataError: Nothing found; the message lists every place looked at and what was missing there.
    """
    root = resolve_root(data_dir)
    looked: list[str] = []
    for layout in LAYOUTS[name]:
        for directory in (root, root / layout.dir_name):
            missing = _missing(directory, layout)
            if not missing:
                return directory, layout
            if not directory.is_dir():
                looked.append(f"{directory} ({layout.kind} layout: no such directory)")
            else:
                looked.append(f"{directory} ({layout.kind} layout: missing {', '.join(missing)})")
    title, *_ = _INFO[name]
    binary = LAYOUTS[name][0]
    raise DataNotFound(
        f"{title} not found. Looked in:\n  - " + "\n  - ".join(dict.fromkeys(looked)),
        root=root, point_at=f"the extracted directory (e.g. .../{binary.dir_name})", download_to=root,
        fetched="the official archive",
    )


def read_cifar(name: str, data_dir: str | os.PathLike[str] | None = None, *, download: bool = False,
               resources: Mapping[str, Sequence[dl.Resource]] | None = None) -> TrainTest:
    """Read the official CIFAR-10 / CIFAR-100 training and test sets.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: Directory holding the batch files, or a parent of the official extracted directory;
            default ``$AUTOPRUNE_DATA``, else ``./data``.
        download: Fetch and extract the official binary archive into the data directory when missing.
        resources: Download table (default :data:`autoprune.data.download.RESOURCES`).

    Raises:
        DataError: Not found (and not downloaded), corrupt, or failing its checksum.
    """
    try:
        directory, layout = find_cifar(name, data_dir)
    except DataError:
        if not download:
            raise
        dl.fetch(name, resolve_root(data_dir), resources=resources)
        directory, layout = find_cifar(name, data_dir)
    _, mean, std, default_names = _INFO[name]
    num_classes = len(default_names)
    reader_args: tuple[Any, ...]
    if layout.kind == "binary":
        reader, reader_args = read_binary_batches, (layout.label_bytes, num_classes)
    else:
        reader, reader_args = read_python_batches, (layout.label_key, num_classes)
    train_x, train_y = reader([directory / f for f in layout.train_files], *reader_args)
    test_x, test_y = reader([directory / f for f in layout.test_files], *reader_args)
    info = DatasetInfo(name=name, num_classes=num_classes, input_shape=(3, 32, 32), mean=mean, std=std,
                       class_names=_class_names(directory, layout, default_names))
    return TrainTest(
        train=ImageTensorDataset(train_x, train_y, name=name, augment=CIFAR_AUGMENT),
        test=ImageTensorDataset(test_x, test_y, name=name, augment=CIFAR_AUGMENT),
        info=info,
    )


def _reader(name: str) -> Any:
    def read(data_dir: str | os.PathLike[str] | None, download: bool) -> TrainTest:
        return read_cifar(name, data_dir, download=download)

    return read


DATASETS.register("cifar10", DatasetSource(_reader("cifar10"), default_val_size=5000),
                  help="CIFAR-10: 50k/10k 32×32 RGB images, 10 classes (binary or python layout)")
DATASETS.register("cifar100", DatasetSource(_reader("cifar100"), default_val_size=5000),
                  help="CIFAR-100: 50k/10k 32×32 RGB images, 100 fine classes (binary or python layout)")
