"""Reading and writing model checkpoints safely, with errors that say what is wrong and how to fix it.

Formats understood by :func:`load_checkpoint` (always ``torch.load(..., weights_only=True)``, so a file that
contains code or arbitrary Python objects is refused, never executed):

* **autoprune** — written by :func:`save_checkpoint`: a dict of plain types and tensors with
  ``format: "autoprune-checkpoint"``, ``version``, ``model_name``, ``model_kwargs``, ``state_dict``, ``epoch``,
  ``optimizer`` and ``extra``. It carries enough to rebuild the model (``build_model(model_name,
  **model_kwargs)``), including the input normalisation.
* **akamaster** — github.com/akamaster/pytorch_resnet_cifar10: ``{"state_dict": ..., "best_prec1": ...}`` with
  ``module.``-prefixed keys. Those networks were trained on inputs normalised with the ImageNet statistics
  (mean 0.485/0.456/0.406, std 0.229/0.224/0.225) and their files hold no normalisation, so loading one sets
  the model's :class:`~autoprune.models.layers.Normalize` buffers to those values.
* **state dict** — a plain ``{name: tensor}`` mapping (also nested under ``"state_dict"`` or ``"model"``).
  A ``module.`` prefix (DataParallel) is stripped; for an
  :class:`~autoprune.models.external.ExternalModel` the bare network's keys are accepted too. Without
  ``normalize.*`` keys the model keeps its current normalisation.

``num_batches_tracked`` entries may be absent (BatchNorm fills them in); ``normalize.*`` entries may be absent
as described above. Everything else must match exactly under ``strict=True``.
"""

from __future__ import annotations

import functools
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.errors import CheckpointError
from autoprune.models.layers import IMAGENET_MEAN, IMAGENET_STD, find_normalize
from autoprune.utils import atomic_open

FORMAT_MARKER = "autoprune-checkpoint"
FORMAT_VERSION = 1
DIR_CANDIDATES = ("checkpoint.pt", "model.pt")
_SHOW = 5  # keys listed in error messages


def _resolve_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in DIR_CANDIDATES:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(
            f"{p} is a directory without a checkpoint ({' or '.join(DIR_CANDIDATES)})",
            hint="pass the checkpoint file itself, e.g. results/train/<model>-<dataset>/checkpoint.pt",
        )
    if not p.is_file():
        raise CheckpointError(
            f"checkpoint {p} does not exist",
            hint="check the path; `autoprune train` writes <out>/checkpoint.pt",
        )
    return p


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Load a checkpoint file's raw contents on the CPU with ``weights_only=True``.

    A directory is accepted if it contains ``checkpoint.pt`` or ``model.pt``.

    Raises:
        CheckpointError: Missing file, unreadable/corrupt/truncated file, or a pickle that holds code or
            arbitrary Python objects (refused by ``weights_only``).
    """
    p = _resolve_path(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL" in text or "Unsupported class" in text:
            detail = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise CheckpointError(
                f"refusing to load {p}: it contains Python objects or code, not only tensors ({detail})",
                hint="only load files you trust; re-save just the weights with "
                "torch.save(model.state_dict(), path) where the file came from",
            ) from None
        raise CheckpointError(
            f"{p} is not a readable PyTorch checkpoint (corrupt or not a checkpoint file)",
            hint="re-download or re-create the file",
        ) from None
    except (EOFError, OSError, RuntimeError, zipfile.BadZipFile, KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(
            f"{p} could not be read: the file is truncated or corrupt ({type(exc).__name__}: {exc or 'empty'})",
            hint="re-download or re-create the file (an interrupted copy or download leaves a truncated file)",
        ) from None


def _is_tensor_map(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: Fields of an autoprune checkpoint that autoprune reads back (``extra`` holds the training run's split), and
#: what each must be when present.
_RECORDED: dict[str, Any] = {
    "epoch": lambda v: _is_int(v) and v >= 0,
    "extra.dataset": lambda v: isinstance(v, str),
    "extra.seed": lambda v: _is_int(v) and 0 <= v <= 2**32 - 1,
    "extra.val_size": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


def _check_recorded(meta: Mapping[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose recorded epoch or training split has the wrong type (a damaged or edited file)."""
    for key, ok in _RECORDED.items():
        head, _, sub = key.partition(".")
        value = meta[head].get(sub) if sub else meta[head]
        if value is not None and not ok(value):
            raise CheckpointError(f"{path} is an autoprune checkpoint with a malformed {key!r}: {value!r}",
                                  hint="re-create the file (or keep only its weights: the 'state_dict' entry)")


def _split_format(raw: Any, path: Path) -> tuple[str, Mapping[str, torch.Tensor], dict[str, Any]]:
    """Return (format, state_dict, metadata) for any supported layout."""
    if isinstance(raw, Mapping) and raw.get("format") == FORMAT_MARKER:
        version = raw.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} is an autoprune checkpoint of version {version!r}; this autoprune reads ≤ {FORMAT_VERSION}",
                hint="upgrade autoprune",
            )
        state = raw.get("state_dict")
        if not _is_tensor_map(state):
            raise CheckpointError(f"{path} is an autoprune checkpoint without weights", hint="re-create the file")
        meta = {k: raw.get(k) for k in ("model_name", "model_kwargs", "epoch", "optimizer", "extra")}
        for key, kinds in (("model_name", str), ("model_kwargs", Mapping), ("extra", Mapping)):
            if meta[key] is not None and not isinstance(meta[key], kinds):
                raise CheckpointError(f"{path} is an autoprune checkpoint with a malformed {key!r} "
                                      f"({type(meta[key]).__name__})", hint="re-create the file")
        meta["extra"] = meta["extra"] or {}
        _check_recorded(meta, path)
        return "autoprune", state, meta
    if isinstance(raw, Mapping) and "state_dict" in raw and _is_tensor_map(raw["state_dict"]):
        meta = {k: v for k, v in raw.items() if k != "state_dict" and isinstance(v, (int, float, str))}
        if "best_prec1" in raw:
            meta["best_prec1"] = float(raw["best_prec1"])
            return "akamaster", raw["state_dict"], meta
        return "state_dict", raw["state_dict"], meta
    if isinstance(raw, Mapping) and "model" in raw and _is_tensor_map(raw["model"]):
        return "state_dict", raw["model"], {}
    if _is_tensor_map(raw):
        return "state_dict", raw, {}
    keys = list(raw)[:8] if isinstance(raw, Mapping) else []
    raise CheckpointError(
        f"{path} does not hold model weights in a known layout "
        f"(got {type(raw).__name__}{' with keys ' + ', '.join(map(str, keys)) if keys else ''})",
        hint="expected an autoprune checkpoint, an akamaster checkpoint or a {name: tensor} state dict",
    )


def _fit_prefixes(state: Mapping[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strip a DataParallel ``module.`` prefix, or add ``net.`` for a wrapped external model, when that fits."""
    out = dict(state)
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}

    def overlap(keys: set[str]) -> int:
        return len(keys & model_keys)

    if any(k.startswith("net.") for k in model_keys):
        prefixed = {f"net.{k}": v for k, v in out.items()}
        if overlap(set(prefixed)) > overlap(set(out)):
            out = prefixed
    return out


def _describe(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    more = f" … and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return f"{len(keys)} ({shown}{more})"


def _optional_key(key: str) -> bool:
    return key.endswith("num_batches_tracked") or key in ("normalize.mean", "normalize.std")


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True, model_name: str | None = None
) -> dict[str, Any]:
    """Load weights from ``path`` into ``model`` (in place) and return the checkpoint's metadata.

    Args:
        model: The model to fill; it must have the checkpoint's architecture.
        path: Checkpoint file (or a directory containing ``checkpoint.pt``/``model.pt``).
        strict: Refuse missing or unexpected keys (shape mismatches are always refused).
        model_name: Name the caller built ``model`` as; only used to make mismatch messages more helpful.

    Returns:
        ``format`` (``"autoprune"``, ``"akamaster"`` or ``"state_dict"``), ``path``, ``normalize`` (where the
        input statistics came from: ``"checkpoint"``, ``"imagenet"`` or ``"model"``), ``missing`` and
        ``unexpected`` key lists (empty under ``strict``), and the file's own metadata: ``model_name``,
        ``model_kwargs``, ``epoch``, ``optimizer``, ``extra`` for our format, ``best_prec1`` for akamaster.

    Raises:
        CheckpointError: The file cannot be read safely, or does not fit the model (names the missing and
            unexpected keys or the mismatched shapes).
    """
    p = _resolve_path(path)
    raw = read_checkpoint(p)
    fmt, state, meta = _split_format(raw, p)
    model_state = model.state_dict()
    model_keys = set(model_state)
    state = _fit_prefixes(state, model_keys)

    missing = sorted(k for k in model_keys - set(state) if not _optional_key(k))
    unexpected = sorted(k for k in set(state) - model_keys if not _optional_key(k))
    shapes = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
        for k, v in state.items()
        if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)
    )
    if shapes or (strict and (missing or unexpected)):
        _raise_mismatch(p, fmt, meta, model, model_name, set(state), missing, unexpected, shapes)

    model.load_state_dict(state, strict=False)
    normalize = find_normalize(model)
    has_norm = any(k.endswith("normalize.mean") for k in state)
    if has_norm:
        meta["normalize"] = "checkpoint"
    elif fmt == "akamaster" and normalize is not None and normalize.mean.shape[0] == 3:
        normalize.set_stats(IMAGENET_MEAN, IMAGENET_STD)
        meta["normalize"] = "imagenet"
    else:
        meta["normalize"] = "model"
    meta.update(format=fmt, path=str(p), missing=missing, unexpected=unexpected)
    return meta


def zoo_models_matching(state_keys: set[str]) -> list[str]:
    """Zoo models whose state-dict key names equal ``state_keys`` (ignoring optional keys).

    The models are built on the ``meta`` device, so this costs no memory and little time.
    """
    from autoprune.models import MODELS  # local: avoids an import cycle with the package

    wanted = frozenset(k for k in state_keys if not _optional_key(k))
    return [name for name in MODELS.names() if _zoo_keys(name) == wanted]


@functools.cache
def _zoo_keys(name: str) -> frozenset[str]:
    from autoprune.models import build_model

    with torch.device("meta"):
        keys = build_model(name).state_dict()
    return frozenset(k for k in keys if not _optional_key(k))


def _raise_mismatch(
    path: Path,
    fmt: str,
    meta: Mapping[str, Any],
    model: nn.Module,
    model_name: str | None,
    state_keys: set[str],
    missing: list[str],
    unexpected: list[str],
    shapes: list[str],
) -> None:
    parts = []
    if missing:
        parts.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_describe(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {_describe(shapes)}")
    built = model_name or type(model).__name__
    saved = meta.get("model_name")
    if saved and saved != model_name:
        hint = f"the checkpoint was saved from model {saved!r}; build that model (--model {saved})"
    elif shapes and not (missing or unexpected):
        hint = "same architecture with other sizes: check the number of classes and input channels (the dataset)"
    else:
        fits = zoo_models_matching(state_keys)
        hint = (
            f"the checkpoint's tensor names fit {', '.join(fits)}; use that model"
            if fits
            else "this checkpoint belongs to a different architecture; pick the model it was trained as"
        )
    raise CheckpointError(f"{fmt} checkpoint {path} does not fit model {built}: " + "; ".join(parts), hint=hint)


def to_plain(obj: Any, where: str = "value") -> Any:
    """A copy of ``obj`` made only of types that ``torch.load(weights_only=True)`` reads back.

    Subclasses of ``str``/``int``/``float`` (e.g. ``torch.__version__``, NumPy scalars) become the base type,
    mappings become ``dict``, tuples stay tuples, tensors are detached onto the CPU.

    Raises:
        TypeError: Something else (an arbitrary object, a NumPy array, ...), naming where it is.
    """
    if obj is None or type(obj) in (bool, int, float, str, torch.dtype, torch.device):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if type(obj).__module__ == "numpy" and getattr(obj, "ndim", None) == 0:  # NumPy scalar
        return obj.item()
    for base in (int, float, str):
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}, expected str or int")
            out[k] = to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold only plain types and tensors")


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace`` it (no half-written files)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(p, "wb", fsync=True) as fh:  # the permissions of a plain open() (umask), not mkstemp's
        torch.save(obj, fh)
    return p


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    model_name: str | None,
    model_kwargs: Mapping[str, Any] | None = None,
    epoch: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write an autoprune checkpoint atomically (temporary file + ``os.replace``).

    Args:
        path: Destination file (parent directories are created).
        model: The model; its state dict is saved on the CPU.
        model_name: Name for ``build_model`` (``None`` if the model is not buildable by name).
        model_kwargs: Keyword arguments for ``build_model`` (plain types only).
        epoch: Completed epochs, if any.
        optimizer: Saved as its ``state_dict()`` for resuming.
        extra: Anything else (plain types and tensors only), e.g. metrics or training state.

    Returns:
        The path written.

    Raises:
        TypeError: ``model_kwargs`` or ``extra`` hold objects that ``weights_only`` loading would refuse.
    """
    kwargs = to_plain(dict(model_kwargs or {}), "model_kwargs")
    extra_d = to_plain(dict(extra or {}), "extra")
    payload = {
        "format": FORMAT_MARKER,
        "version": FORMAT_VERSION,
        "model_name": model_name,
        "model_kwargs": kwargs,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "epoch": epoch,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra_d,
        "torch_version": str(torch.__version__),
    }
    return atomic_save(payload, path)


def checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a checkpoint without loading it into a model (``format``, ``model_name``, ...).

    Raises:
        CheckpointError: As :func:`read_checkpoint`, or the layout is unknown.
    """
    p = _resolve_path(path)
    fmt, state, meta = _split_format(read_checkpoint(p), p)
    meta.pop("optimizer", None)
    meta.update(format=fmt, path=str(p), num_tensors=len(state))
    return meta
