"""Your own images in class folders: ``dataset: {name: image_folder, data_dir: DIR}``.

Layout::

    DIR/train/<class>/*.png|jpg|jpeg|bmp|gif|tif|tiff|webp|ppm|pgm|pbm|pnm   (required)
    DIR/val/<class>/...                                                      (optional)
    DIR/test/<class>/...                                                     (optional)

* **Classes** are the sub-folders of ``train/`` (hidden ones, starting with ``.``, are skipped), in sorted
  order (Python string order: ``"B" < "a"``, ``"10" < "2"``): label ``i`` is the ``i``-th name. Images are
  found recursively inside a class folder, by extension (case-insensitive); other files are ignored. ``val/``
  and ``test/`` must have exactly the same class folders. Every class folder needs at least one image.
* **Splits.** ``test/`` is the test set if it exists; otherwise a fixed, class-stratified ``test_size``
  (default 20 %) of ``train/`` is held out with seed :data:`TEST_SEED` (independent of the dataset seed, as
  for ``digits``: changing the seed never moves a test image into training). ``val/`` is the validation set
  if it exists (then ``val_size`` must not be set); otherwise ``val_size`` (default 10 %) is carved from the
  rest of ``train/`` with the dataset seed, like every built-in dataset.
* **Decoding** with Pillow: EXIF orientation applied; converted to RGB (palette, grayscale and CMYK images
  too; an alpha channel is dropped, as torchvision's ``ImageFolder`` does), or to 8-bit grayscale with
  ``channels: 1`` (16-bit grayscale is scaled to 8 bits). A file that cannot be read is an error naming it.
* **Size.** ``image_size: S`` resizes each image so its shorter side is ``S`` (bilinear, antialiased) and
  crops the centre ``S×S``; ``image_size: [H, W]`` scales each image to cover ``H×W`` and crops the centre.
  Without ``image_size`` every image must already have the same size.
* **Normalisation** statistics (the model's ``normalize`` layer) are computed from the final training split
  only (after the validation split is carved; never from ``val/`` or ``test/``).
* **Augmentation** (``augment=True`` in training loaders): random crop with zero padding and a horizontal
  flip, the padding 1/8 of the shorter side (:func:`~autoprune.data.augment.augment_for_size`: 4 pixels at
  32×32) unless ``crop_padding`` says otherwise; ``hflip: false`` turns flipping off (text, digits).

Images are decoded once, by a few threads, into uint8 tensors held in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoprune.data.augment import Augment, augment_for_size
from autoprune.data.base import (
    DATASETS,
    DataNotFound,
    DatasetInfo,
    DatasetSource,
    ImageTensorDataset,
    TrainTest,
    channel_stats,
    resolve_count,
    resolve_root,
    stratified_indices,
)
from autoprune.errors import ConfigError, DataError

NAME = "image_folder"
SPLIT_DIRS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                    ".pnm")
"""File extensions read as images (case-insensitive); other files in the class folders are ignored."""
DEFAULT_TEST_SIZE = 0.2
"""Fraction of ``train/`` held out as the test set when there is no ``test/`` folder."""
TEST_SEED = 0
"""Seed of that hold-out (fixed, independent of the dataset seed)."""
OPTIONS = ("image_size", "channels", "test_size", "hflip", "crop_padding")
"""The options of ``image_folder`` (``dataset.kwargs``)."""
MAX_LISTED = 5
"""How many offending files an error message names."""

_LAYOUT_HINT = ("lay the images out as DIR/train/<class>/*.png (optional DIR/val/<class>/, DIR/test/<class>/) and "
                "set dataset.data_dir (or --data-dir) to DIR")


@dataclass(frozen=True)
class FolderOptions:
    """Checked ``image_folder`` options (see the module docstring).

    Attributes:
        image_size: ``(height, width)`` after resize and centre crop, or ``None`` to keep the files' size.
        channels: 3 (RGB) or 1 (grayscale).
        test_size: Count or fraction of ``train/`` held out as the test set when there is no ``test/``;
            ``None``: :data:`DEFAULT_TEST_SIZE`.
        hflip: Random horizontal flips in the training augmentation.
        crop_padding: Zero padding of the training augmentation's random crop; ``None``: 1/8 of the shorter side.
    """

    image_size: tuple[int, int] | None = None
    channels: int = 3
    test_size: int | float | None = None
    hflip: bool = True
    crop_padding: int | None = None

    @classmethod
    def parse(cls, image_size: Any = None, channels: Any = 3, test_size: Any = None, hflip: Any = True,
              crop_padding: Any = None) -> FolderOptions:
        """Check raw option values (from YAML or Python).

        Raises:
            ConfigError: Naming the option, the value and what is allowed.
        """
        size = None if image_size is None else _parse_size(image_size)
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ConfigError(f"{NAME} option channels={channels!r}: must be 3 (RGB) or 1 (grayscale)",
                              hint="set it in dataset.kwargs, e.g. kwargs: {channels: 1}")
        if test_size is not None and (
                isinstance(test_size, bool) or not isinstance(test_size, int | float)
                or (isinstance(test_size, int) and test_size < 1)
                or (isinstance(test_size, float) and not 0 < test_size < 1)):
            raise ConfigError(f"{NAME} option test_size={test_size!r}: must be a count ≥ 1 or a fraction in (0, 1)",
                              hint="e.g. test_size: 0.2 (the default), or put test images in DIR/test/")
        if not isinstance(hflip, bool):
            raise ConfigError(f"{NAME} option hflip={hflip!r}: must be true or false")
        if crop_padding is not None and (isinstance(crop_padding, bool) or not isinstance(crop_padding, int)
                                         or crop_padding < 0):
            raise ConfigError(f"{NAME} option crop_padding={crop_padding!r}: must be an int ≥ 0 (0: no random crop)",
                              hint="or null for 1/8 of the shorter image side")
        return cls(image_size=size, channels=int(channels), test_size=test_size, hflip=hflip,
                   crop_padding=crop_padding)

    def augment(self, height: int, width: int) -> Augment:
        """The training augmentation for images of ``height × width``."""
        if self.crop_padding is None:
            return augment_for_size(height, width, hflip=self.hflip)
        return Augment(padding=self.crop_padding, hflip=self.hflip)


def _parse_size(value: Any) -> tuple[int, int]:
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if ok(value):
        return int(value), int(value)
    if isinstance(value, list | tuple) and len(value) == 2 and all(ok(v) for v in value):
        return int(value[0]), int(value[1])
    raise ConfigError(f"{NAME} option image_size={value!r}: must be a positive int S (shorter side to S, centre "
                      "crop S×S) or a pair [height, width]", hint="e.g. kwargs: {image_size: 32}")


# ------------------------------------------------------------------------------------------------ scanning


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _walk_images(folder: Path) -> Iterator[Path]:
    """Image files under ``folder``, recursively, in sorted order, skipping hidden files and folders."""
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not _visible(entry):
            continue
        if entry.is_dir():
            yield from _walk_images(entry)
        elif entry.suffix.lower() in IMAGE_EXTENSIONS and entry.is_file():
            yield entry


def scan_split(split_dir: Path) -> tuple[list[str], list[list[Path]]]:
    """Class names (sorted sub-folders) and each class's image files of one split folder.

    Raises:
        DataError: No class folders, images lying directly in the split folder, or classes without images.
    """
    entries = sorted((p for p in split_dir.iterdir() if _visible(p)), key=lambda p: p.name)
    classes = [p.name for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise DataError(f"{NAME}: {len(loose)} image(s) lie directly in {split_dir} (e.g. {loose[0].name}), outside "
                        "any class folder", hint=f"move each image into {split_dir}/<class>/ ({_LAYOUT_HINT})")
    if not classes:
        raise DataError(f"{NAME}: {split_dir} has no class folders", hint=_LAYOUT_HINT)
    files = [list(_walk_images(split_dir / c)) for c in classes]
    empty = [str(split_dir / c) for c, f in zip(classes, files, strict=True) if not f]
    if empty:
        listed = ", ".join(empty[:MAX_LISTED]) + (f" and {len(empty) - MAX_LISTED} more" if len(empty) > MAX_LISTED
                                                  else "")
        raise DataError(f"{NAME}: {len(empty)} class folder(s) contain no images: {listed}",
                        hint=f"add images ({', '.join(IMAGE_EXTENSIONS)}) or remove the empty folder(s); "
                        "every split needs the same class folders")
    return classes, files


# ------------------------------------------------------------------------------------------------ decoding


def _to_mode(img: Any, channels: int) -> Any:
    from PIL import Image

    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale → 8 bits
        arr = np.asarray(img).astype(np.int64)
        img = Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _cover_crop(img: Any, size: tuple[int, int]) -> Any:
    """Scale ``img`` (bilinear, antialiased) to cover ``size`` = (height, width), then crop the centre."""
    from PIL import Image

    th, tw = size
    w, h = img.size
    scale = max(th / h, tw / w)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    if (nw, nh) != (tw, th):
        left, top = (nw - tw) // 2, (nh - th) // 2
        img = img.crop((left, top, left + tw, top + th))
    return img


def decode_image(path: Path, *, size: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """One image file as a uint8 array C×H×W (see the module docstring for the conversions).

    Args:
        path: The file.
        size: ``(height, width)`` to scale-and-crop to, or ``None`` for the file's size.
        channels: 3 (RGB) or 1 (grayscale).

    Raises:
        Exception: Whatever Pillow raises for an unreadable file (the caller reports it with the path).
    """
    from PIL import Image, ImageOps

    with Image.open(path) as raw:
        if size is not None and raw.format == "JPEG":
            side = max(size)
            raw.draft(None, (side, side))  # decode at a reduced scale that still covers the target
        raw.load()
        img = ImageOps.exif_transpose(raw)
        img = _to_mode(img, channels)
        if size is not None:
            img = _cover_crop(img, size)
        arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def _decode_or_error(path: Path, size: tuple[int, int] | None, channels: int) -> np.ndarray | str:
    try:
        return decode_image(path, size=size, channels=channels)
    except Exception as exc:  # any failure of the decoder is a bad file, reported with its path
        return f"{type(exc).__name__}: {exc}"


def read_split(files: Sequence[Sequence[Path]], opts: FolderOptions, split_dir: Path) -> ImageTensorDataset:
    """Decode the images of one split (``files[c]``: the files of class ``c``) into an uint8 dataset.

    Raises:
        DataError: Files that cannot be read (named, with the decoder's message), or, without ``image_size``,
            images of different sizes.
    """
    paths = [p for group in files for p in group]
    labels = torch.tensor([c for c, group in enumerate(files) for _ in group], dtype=torch.int64)
    images: np.ndarray | None = None
    bad: list[str] = []
    sizes: dict[tuple[int, ...], Path] = {}
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda p: _decode_or_error(p, opts.image_size, opts.channels), paths)
        for i, (path, arr) in enumerate(zip(paths, results, strict=True)):
            if isinstance(arr, str):
                bad.append(f"{path} ({arr})")
                continue
            sizes.setdefault(arr.shape, path)
            if images is None:
                images = np.empty((len(paths), *arr.shape), dtype=np.uint8)
            if arr.shape == images.shape[1:]:
                images[i] = arr
    if bad:
        listed = "; ".join(bad[:MAX_LISTED]) + (f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")
        raise DataError(f"{NAME}: {len(bad)} image file(s) in {split_dir} cannot be read: {listed}",
                        hint="delete or replace the corrupt file(s) (or convert them to PNG/JPEG)")
    if len(sizes) > 1:
        examples = ", ".join(f"{p} is {s[2]}×{s[1]}" for s, p in list(sizes.items())[:3])
        raise DataError(f"{NAME}: the images in {split_dir} differ in size ({examples})",
                        hint="set image_size in dataset.kwargs (e.g. kwargs: {image_size: 32}) to resize and "
                        "centre-crop them all to one size")
    if images is None:  # scan_split guarantees at least one image per class
        raise DataError(f"{NAME}: {split_dir} has no images", hint=_LAYOUT_HINT)
    return ImageTensorDataset(torch.from_numpy(images), labels, name=NAME)


# ------------------------------------------------------------------------------------------------ the reader


def _find_train(root: Path) -> Path:
    """``root/train``, or a :class:`DataNotFound` / :class:`DataError` that says what is there instead."""
    point_at = "the folder holding train/<class>/*.png (and optional val/, test/)"
    where = "" if root.is_absolute() else f" (relative to {Path.cwd()})"
    if not root.is_dir():
        raise DataNotFound(f"{NAME}: data directory {root} does not exist{where}", root=root, point_at=point_at)
    train_dir = root / "train"
    if not train_dir.is_dir():
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
        if not subdirs:
            raise DataNotFound(f"{NAME}: no training folder {train_dir}{where}", root=root, point_at=point_at)
        raise DataError(f"{NAME}: no training folder {train_dir}; it has the folder(s) {', '.join(subdirs[:8])}",
                        hint=f"if those are your classes, move them into a train/ folder: {_LAYOUT_HINT}")
    return train_dir


def _hold_out(ds: ImageTensorDataset, size: int | float) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """(rest, held-out) with a class-stratified draw of ``size`` samples (seed :data:`TEST_SEED`)."""
    n = resolve_count(size, len(ds), what=f"{NAME} option test_size")
    if n < 1 or n >= len(ds):
        raise ConfigError(f"{NAME} option test_size={size}: holds out {n} of the {len(ds)} training images",
                          hint="the test split needs at least one image and the training split too; add images or a "
                          "DIR/test/ folder")
    picked = stratified_indices(ds.labels, n, TEST_SEED)
    mask = torch.ones(len(ds), dtype=torch.bool)
    mask[picked] = False
    return ds.take(torch.nonzero(mask).flatten()), ds.take(picked)


def read_image_folder(data_dir: str | os.PathLike[str] | None = None, download: bool = False,
                      **options: Any) -> TrainTest:
    """Read ``DIR/train`` (and ``DIR/val``, ``DIR/test`` when present) into in-memory uint8 datasets.

    Args:
        data_dir: ``DIR`` (default ``$AUTOPRUNE_DATA``, else ``./data``).
        download: Unused (there is nothing to download).
        **options: ``image_size``, ``channels``, ``test_size``, ``hflip``, ``crop_padding``
            (:class:`FolderOptions`).

    Returns:
        The training set (``train/`` minus the held-out test images when there is no ``test/``), the test set,
        ``val/`` if present, and the :class:`DatasetInfo` (classes = sorted folder names; mean/std over the
        returned training set: :func:`~autoprune.data.sources.load_dataset` recomputes them after carving the
        validation split).

    Raises:
        ConfigError: An unknown or invalid option; ``test_size`` set although ``test/`` exists.
        DataError: Missing folders, empty classes, unreadable images, different class sets or image sizes.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], OPTIONS, n=1)
        raise ConfigError(f"{NAME}: unknown option(s) {', '.join(unknown)}."
                          + (f" Did you mean {close[0]!r}?" if close else ""),
                          hint=f"image_folder options (dataset.kwargs): {', '.join(OPTIONS)}")
    opts = FolderOptions.parse(**options)
    root = resolve_root(data_dir)
    train_dir = _find_train(root)
    classes, train_files = scan_split(train_dir)
    others: dict[str, list[list[Path]]] = {}
    for split in ("val", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        names, files = scan_split(split_dir)
        if names != classes:
            missing, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"extra {', '.join(extra)}"]
                                                                               if extra else [])
            raise DataError(f"{NAME}: the class folders of {split_dir} differ from {train_dir}: {'; '.join(parts)}",
                            hint="every split needs exactly the same class folders (one per class, at least one "
                            "image each)")
        others[split] = files
    if "test" in others and opts.test_size is not None:
        raise ConfigError(f"{NAME} option test_size={opts.test_size}: {root / 'test'} exists and is the test set",
                          hint="remove test_size, or remove the test/ folder to hold out part of train/ instead")

    train = read_split(train_files, opts, train_dir)
    splits = {s: read_split(f, opts, root / s) for s, f in others.items()}
    shape = train.image_shape
    for s, ds in splits.items():
        if ds.image_shape != shape:
            raise DataError(f"{NAME}: the images of {root / s} are {ds.image_shape[2]}×{ds.image_shape[1]} "
                            f"({ds.image_shape[0]} channels) but those of {train_dir} are {shape[2]}×{shape[1]}",
                            hint="set image_size in dataset.kwargs to bring every split to one size")
    if "test" in splits:
        test = splits["test"]
    else:
        train, test = _hold_out(train, DEFAULT_TEST_SIZE if opts.test_size is None else opts.test_size)
    augment = opts.augment(shape[1], shape[2])
    train, test = _with_augment(train, augment), _with_augment(test, augment)
    val = _with_augment(splits["val"], augment) if "val" in splits else None
    mean, std = channel_stats(train.images)
    info = DatasetInfo(name=NAME, num_classes=len(classes), input_shape=shape, mean=mean, std=std,
                       class_names=tuple(classes))
    return TrainTest(train=train, test=test, info=info, val=val)


def _with_augment(ds: ImageTensorDataset, augment: Augment) -> ImageTensorDataset:
    return ImageTensorDataset(ds.images, ds.labels, name=NAME, augment=augment)


DATASETS.register(NAME, DatasetSource(read_image_folder, default_val_size=0.1, options=OPTIONS,
                                      train_statistics=True),
                  help="your own images: DIR/train/<class>/*.png|jpg (optional val/, test/); kwargs image_size, "
                  "channels, test_size, hflip, crop_padding")
