"""Datasets from your own code: ``dataset: {name: "package.module:callable"}``.

The callable is imported (``importlib``; nothing is evaluated) only because the user's own campaign config or
command line names it, exactly like ``model: package.module:callable`` (:mod:`autoprune.models.external`).
The current working directory is appended to ``sys.path``, so ``mydata:load`` finds ``./mydata.py``.

The contract
------------
**Call.** ``callable(**kwargs)`` where ``kwargs`` are the campaign's ``dataset.kwargs`` (always passed), plus
``data_dir`` (``dataset.data_dir`` / ``--data-dir`` as a string, or ``None``) and ``seed`` (``dataset.seed`` /
``--seed``) when the callable's signature names them or takes ``**kwargs`` (and ``dataset.kwargs`` does not
set them already).

**Return** one of

* a mapping ``{"train": ..., "test": ..., "val": ..., "classes": [...], "num_classes": K}``: ``train`` and
  ``test`` are required; ``val`` is optional (absent or ``None``: carved from ``train`` by ``val_size`` and
  ``seed`` like the built-in datasets; given: used as is, and ``val_size`` must not be set); ``classes`` (class
  names in label order) and ``num_classes`` are optional (default: ``max label + 1`` classes named ``"0"``,
  ``"1"``, ...);
* a tuple or list ``(train, val, test)`` (``val`` may be ``None``), read like the mapping;
* a :class:`~autoprune.data.base.DataSplits` (its ``info``, including mean/std, is kept).

**Each split** is one of

* an :class:`~autoprune.data.base.ImageTensorDataset` (uint8 N×C×H×W, used as is);
* a pair ``(images, labels)`` (a ``tuple``) of a tensor or NumPy array N×C×H×W (or N×H×W for one channel)
  and a 1-D integer tensor or array;
* a map-style dataset (anything with ``len()`` and ``[i]``, e.g. a ``torch.utils.data.Dataset`` or a list)
  whose items are ``(image, label)``: the image a tensor or array C×H×W (or H×W) or a PIL image, the label
  an int.

Images are uint8 0..255, or floats in [0, 1] (converted to uint8 as ``round(255 * x)``; images normalised
with a mean/std are refused: the model's ``normalize`` layer does that), other integer types with values
0..255, channel-first; every image of every split has the same shape. Labels are integers ``0 ..
num_classes - 1``. ``train`` and ``test`` must not be empty. Unless a ``DataSplits`` is returned, the
normalisation statistics are computed from the final training split. Anything else is refused with a
:class:`~autoprune.errors.DataError` that names the split, the item and what was expected; a malformed
string, a missing module or attribute, or keyword arguments the callable does not take raise a
:class:`~autoprune.errors.ConfigError`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from autoprune.data.base import DatasetInfo, DataSplits, ImageTensorDataset, TrainTest, channel_stats
from autoprune.errors import ConfigError, DataError
from autoprune.user_code import resolve_import_string

RESULT_KEYS = ("train", "val", "test", "classes", "num_classes")
"""Keys a callable's returned mapping may have."""

OFFERED = ("data_dir", "seed")
"""Arguments passed to the callable when its signature accepts them."""

_CONTRACT_HINT = ("return {'train': ..., 'test': ..., 'val': ... (optional), 'classes': [...] (optional)}, a tuple "
                  "(train, val, test) or a DataSplits; each split an ImageTensorDataset, an (images, labels) "
                  "pair or a dataset of (image C×H×W, int label) items (see the README, 'Your own data')")


def is_import_string(name: str) -> bool:
    """True if ``name`` is a ``package.module:callable`` import string rather than a registered dataset."""
    return ":" in name


def resolve_callable(spec: str) -> Callable[..., Any]:
    """Import the callable named by ``package.module:callable`` (``module:Class.method`` works too).

    Raises:
        ConfigError: Malformed string, module missing or failing to import, attribute missing or not callable.
    """
    return resolve_import_string(spec, "dataset", "mydata:load", "point at a function that returns the splits")


def call_kwargs(fn: Callable[..., Any], spec: str, options: Mapping[str, Any], offered: Mapping[str, Any]
                ) -> dict[str, Any]:
    """The keyword arguments ``fn`` is called with: ``options``, plus the ``offered`` ones its signature takes.

    Raises:
        ConfigError: If ``fn`` cannot be called with them (unknown option, missing required parameter).
    """
    kwargs = dict(options)
    try:
        sig: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: offer nothing, check nothing
        sig = None
    if sig is not None:
        params = sig.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key, value in offered.items():
            if key not in kwargs and (takes_any or key in params):
                kwargs[key] = value
        try:
            sig.bind(**kwargs)
        except TypeError as exc:
            names = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
            raise ConfigError(f"dataset {spec!r} cannot be called with {sorted(kwargs)}: {exc}",
                              hint=f"dataset.kwargs must match its keyword parameters ({', '.join(names) or 'none'}); "
                              f"{', '.join(OFFERED)} are passed when it names them") from None
    return kwargs


def read_import_string(spec: str, data_dir: str | os.PathLike[str] | None = None, *, seed: int = 0,
                       options: Mapping[str, Any] | None = None) -> tuple[TrainTest, bool]:
    """Import and call a dataset callable and convert what it returns (see the module docstring).

    Args:
        spec: ``package.module:callable``.
        data_dir: Passed on as ``data_dir`` (a string, or ``None``) if the callable takes it.
        seed: Passed on as ``seed`` if the callable takes it.
        options: Keyword arguments always passed (a campaign's ``dataset.kwargs``).

    Returns:
        The splits (``val`` ``None`` when the callable gave none) and whether ``info`` came from the callable
        (a returned ``DataSplits``) rather than being derived here (then its mean/std are provisional: computed
        from all of ``train``).

    Raises:
        ConfigError: The callable cannot be imported or called with these arguments.
        DataError: The returned value breaks the contract.
    """
    fn = resolve_callable(spec)
    offered = {"data_dir": None if data_dir is None else str(data_dir), "seed": int(seed)}
    result = fn(**call_kwargs(fn, spec, options or {}, offered))
    return convert_result(result, spec)


def convert_result(result: Any, spec: str) -> tuple[TrainTest, bool]:
    """Check and convert a dataset callable's return value (see :func:`read_import_string`).

    Raises:
        DataError: Naming what is wrong and what the contract expects.
    """
    if isinstance(result, DataSplits):
        train, val, test = (as_image_dataset(getattr(result, s), spec, s) for s in ("train", "val", "test"))
        _check_shapes(spec, {"train": train, "val": val, "test": test}, result.info.input_shape)
        _check_label_range(spec, {"train": train, "val": val, "test": test}, result.info.num_classes)
        return TrainTest(train=train, test=test, info=result.info, val=val), True
    classes: Any = None
    num_classes: Any = None
    if isinstance(result, Mapping):
        unknown = [str(k) for k in result if k not in RESULT_KEYS]
        if unknown:
            raise DataError(f"dataset {spec!r} returned a mapping with unknown key(s) {', '.join(unknown)}",
                            hint=f"allowed keys: {', '.join(RESULT_KEYS)}")
        missing = [k for k in ("train", "test") if result.get(k) is None]
        if missing:
            raise DataError(f"dataset {spec!r} returned no {' and no '.join(missing)} split", hint=_CONTRACT_HINT)
        raw = {"train": result["train"], "val": result.get("val"), "test": result["test"]}
        classes, num_classes = result.get("classes"), result.get("num_classes")
    elif isinstance(result, tuple | list) and len(result) == 3:
        raw = dict(zip(("train", "val", "test"), result, strict=True))
        if raw["train"] is None or raw["test"] is None:
            raise DataError(f"dataset {spec!r} returned (train, val, test) with no train or test split",
                            hint=_CONTRACT_HINT)
    else:
        what = f"a {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, tuple | list) else "")
        raise DataError(f"dataset {spec!r} returned {what}, not its splits", hint=_CONTRACT_HINT)
    splits = {name: as_image_dataset(ds, spec, name) for name, ds in raw.items() if ds is not None}
    shape = splits["train"].image_shape
    _check_shapes(spec, splits, shape)
    names = _class_names(spec, splits, classes, num_classes)
    _check_label_range(spec, splits, len(names))
    mean, std = channel_stats(splits["train"].images)
    info = DatasetInfo(name=spec, num_classes=len(names), input_shape=shape, mean=mean, std=std,
                       class_names=names)
    return TrainTest(train=splits["train"], test=splits["test"], info=info, val=splits.get("val")), False


# --------------------------------------------------------------------------------------------- conversion


def _is_array(x: Any) -> bool:
    return isinstance(x, torch.Tensor | np.ndarray)


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "getbands")


def as_image_dataset(obj: Any, spec: str, split: str) -> ImageTensorDataset:
    """Convert one returned split to an :class:`ImageTensorDataset` (see the module docstring for the forms).

    Raises:
        DataError: Unsupported form, empty split, bad image or label (naming the split and the item).
    """
    where = f"dataset {spec!r}, split {split!r}"
    if isinstance(obj, ImageTensorDataset):
        ds = obj
    elif isinstance(obj, tuple) and len(obj) == 2 and _is_array(obj[0]) and _is_array(obj[1]):
        images = _as_uint8(torch.as_tensor(obj[0]), f"{where}: images", batched=True)
        labels = torch.as_tensor(obj[1])
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise DataError(f"{where}: labels must be a 1-D integer tensor or array, got {labels.dtype} of shape "
                            f"{tuple(labels.shape)}", hint="labels are class indices 0 .. num_classes - 1")
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
        ds = ImageTensorDataset(images, labels.to(torch.int64), name=spec)
    elif hasattr(obj, "__len__") and hasattr(obj, "__getitem__") and not isinstance(obj, str | bytes | Mapping):
        ds = _from_items(obj, spec, where)
    else:
        raise DataError(f"{where}: a {type(obj).__name__} is not a split",
                        hint="give an ImageTensorDataset, an (images, labels) tuple, or a map-style dataset "
                        "(len() and [i]) of (image, label) items; iterable-only datasets are not supported")
    if len(ds) == 0 and split != "val":
        raise DataError(f"{where} is empty", hint=f"the {split} split needs at least one image")
    if ds.labels.numel() and int(ds.labels.min()) < 0:
        raise DataError(f"{where}: negative label {int(ds.labels.min())}", hint="labels are 0 .. num_classes - 1")
    return ds


def _from_items(obj: Any, spec: str, where: str) -> ImageTensorDataset:
    n = len(obj)
    images: torch.Tensor | None = None
    labels = torch.empty(n, dtype=torch.int64)
    for i in range(n):
        item = obj[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(f"{where}, item {i}: expected an (image, label) pair, got a {type(item).__name__}"
                            + (f" of length {len(item)}" if isinstance(item, tuple | list) else ""),
                            hint="each item is (image C×H×W, int label)")
        x, y = item
        img = _as_uint8(_pil_to_tensor(x) if _is_pil(x) else _image_tensor(x, f"{where}, item {i}"),
                        f"{where}, item {i}", batched=False)
        if images is None:
            images = torch.empty((n, *img.shape), dtype=torch.uint8)
        elif tuple(img.shape) != tuple(images.shape[1:]):
            raise DataError(f"{where}, item {i}: image shape {tuple(img.shape)} differs from item 0's "
                            f"{tuple(images.shape[1:])}", hint="every image must have the same size and channels")
        images[i] = img
        labels[i] = _label(y, f"{where}, item {i}")
    if images is None:
        images = torch.empty((0, 1, 1, 1), dtype=torch.uint8)
    return ImageTensorDataset(images, labels, name=spec)


def _image_tensor(x: Any, where: str) -> torch.Tensor:
    if not _is_array(x):
        raise DataError(f"{where}: the image is a {type(x).__name__}",
                        hint="images are tensors or NumPy arrays C×H×W (or H×W), or PIL images")
    return torch.as_tensor(x)


def _pil_to_tensor(img: Any) -> torch.Tensor:
    """A PIL image as a C×H×W uint8 tensor (grayscale stays one channel; everything else becomes RGB)."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("L" if img.mode in ("1", "LA", "I", "I;16", "F") else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _as_uint8(x: torch.Tensor, where: str, *, batched: bool) -> torch.Tensor:
    """uint8 images (N×)C×H×W from uint8, float in [0, 1] or integer 0..255 values; (N×)H×W gains a channel."""
    plain = 2 + int(batched)
    if x.dim() == plain:
        x = x.unsqueeze(-3)
    layout = "N×C×H×W" if batched else "C×H×W"
    if x.dim() != plain + 1:
        raise DataError(f"{where}: expected {layout} (or without C for one channel), got shape {tuple(x.shape)}",
                        hint="images are channel-first")
    c = int(x.shape[-3])
    if c > 4 and int(x.shape[-1]) in (1, 3, 4):
        raise DataError(f"{where}: shape {tuple(x.shape)} looks channel-last ({c} channels of width "
                        f"{int(x.shape[-1])})", hint="give channel-first images, e.g. x.permute(2, 0, 1) for H×W×C")
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise DataError(f"{where}: images of dtype {x.dtype} are not supported", hint="use uint8 or float in [0, 1]")
    if x.numel() == 0:
        return x.to(torch.uint8)
    lo, hi = float(x.min()), float(x.max())
    if x.dtype.is_floating_point:
        if not (lo >= -1e-6 and hi <= 1 + 1e-6):
            raise DataError(f"{where}: float pixel values range {lo:.4g}..{hi:.4g}, outside [0, 1]",
                            hint="give images scaled to [0, 1] (not normalised with a mean and std: the model's "
                            "normalize layer does that) or uint8 0..255")
        return torch.round(x.double().clamp(0, 1) * 255).to(torch.uint8)
    if lo < 0 or hi > 255:
        raise DataError(f"{where}: integer pixel values range {int(lo)}..{int(hi)}, outside 0..255",
                        hint="give uint8 0..255 or float in [0, 1]")
    return x.to(torch.uint8)


def _label(y: Any, where: str) -> int:
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not (y.dtype.is_floating_point or y.dtype == torch.bool):
        y = int(y.reshape(()).item())
    elif isinstance(y, np.ndarray) and y.size == 1 and np.issubdtype(y.dtype, np.integer):
        y = int(y.reshape(()))
    elif isinstance(y, np.integer):
        y = int(y)
    if isinstance(y, bool) or not isinstance(y, int):
        raise DataError(f"{where}: the label is {y!r} ({type(y).__name__}), not an int",
                        hint="labels are integer class indices 0 .. num_classes - 1")
    return y


def _check_shapes(spec: str, splits: Mapping[str, ImageTensorDataset], shape: Sequence[int]) -> None:
    for name, ds in splits.items():
        if len(ds) and tuple(ds.image_shape) != tuple(shape):
            raise DataError(f"dataset {spec!r}: split {name!r} has images of shape {ds.image_shape}, the training "
                            f"split {tuple(shape)}", hint="every split needs the same image size and channels")


def _class_names(spec: str, splits: Mapping[str, ImageTensorDataset], classes: Any, num_classes: Any
                 ) -> tuple[str, ...]:
    top = max(int(ds.labels.max()) for ds in splits.values() if len(ds)) + 1
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer)
                                    or int(num_classes) < 1):
        raise DataError(f"dataset {spec!r}: num_classes must be a positive int, got {num_classes!r}")
    if classes is not None:
        if isinstance(classes, str | bytes) or not isinstance(classes, Sequence) or not classes:
            raise DataError(f"dataset {spec!r}: classes must be a non-empty list of names, got {classes!r}",
                            hint="one name per class, in label order")
        names = tuple(str(c) for c in classes)
        if len(set(names)) != len(names):
            raise DataError(f"dataset {spec!r}: class names repeat: {list(names)}")
        if num_classes is not None and int(num_classes) != len(names):
            raise DataError(f"dataset {spec!r}: {len(names)} class names but num_classes={num_classes}")
        return names
    k = top if num_classes is None else int(num_classes)
    return tuple(str(i) for i in range(k))


def _check_label_range(spec: str, splits: Mapping[str, ImageTensorDataset], num_classes: int) -> None:
    for name, ds in splits.items():
        if len(ds) and int(ds.labels.max()) >= num_classes:
            raise DataError(f"dataset {spec!r}: split {name!r} has label {int(ds.labels.max())}, but there are "
                            f"{num_classes} classes (labels 0..{num_classes - 1})",
                            hint="fix the labels, or return the full 'classes' list / 'num_classes'")
