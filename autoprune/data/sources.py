"""Where a dataset comes from, and :func:`load_dataset`, the one entry point that returns its splits.

A dataset name is either registered in :data:`~autoprune.data.base.DATASETS` (``cifar10``, ``digits``,
``image_folder``, ...; ``autoprune list datasets``) or a ``package.module:callable`` import string
(:mod:`autoprune.data.external`). Either way the result is a :class:`~autoprune.data.base.DataSplits` whose
validation split is carved from the training set with the same seeded, class-stratified rule unless the dataset
brings its own.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any

from autoprune.data.base import DATASETS, DatasetSource, DataSplits, channel_stats, train_val_split
from autoprune.data.external import is_import_string, read_import_string
from autoprune.errors import ConfigError
from autoprune.user_code import find_import_string

DEFAULT_VAL_SIZE = 0.1
"""Validation fraction of datasets from an import string when ``val_size`` is not given."""


def check_options(name: str, source: DatasetSource, options: Mapping[str, Any], where: str = "") -> None:
    """Refuse options that the registered dataset ``name`` does not take.

    Args:
        name: The registered name.
        source: Its :class:`~autoprune.data.base.DatasetSource`.
        options: The options given.
        where: The key that holds the options (e.g. ``dataset.kwargs``), prefixed to the message if given.

    Raises:
        ConfigError: Naming the unknown option(s) and the allowed ones.
    """
    unknown = sorted(k for k in options if k not in source.options)
    if not unknown:
        return
    at = f"{where}: " if where else ""
    if not source.options:
        raise ConfigError(f"{at}dataset {name!r} takes no options, got {', '.join(unknown)}",
                          hint="remove dataset.kwargs (options are for image_folder and package.module:callable "
                          "datasets)")
    close = difflib.get_close_matches(unknown[0], source.options, n=1)
    raise ConfigError(f"{at}dataset {name!r}: unknown option(s) {', '.join(unknown)}."
                      + (f" Did you mean {close[0]!r}?" if close else ""),
                      hint=f"options of {name} (dataset.kwargs): {', '.join(source.options)}")


def check_dataset_name(name: str, options: Mapping[str, Any] | None = None, where: str = "dataset.name",
                       options_where: str = "dataset.kwargs") -> None:
    """Check a dataset name (and its option names) before anything is loaded, imported or called.

    A registered name must exist and take the given options; for ``package.module:callable`` the string must
    be well formed and its module findable (``importlib.util.find_spec``: the module is not run).

    Args:
        name: Registered name or import string.
        options: The dataset options (``dataset.kwargs``); for a callable they are checked when it is called.
        where: The key that holds ``name``, for messages.
        options_where: The key that holds ``options``, for messages.

    Raises:
        ConfigError: Naming ``where``, the problem and the choices.
    """
    if is_import_string(name):
        try:
            find_import_string(name, "dataset", "mydata:load")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None
        return
    if name not in DATASETS:
        raise ConfigError(f"{where}: {DATASETS.unknown_message(name)}",
                          hint="see `autoprune list datasets`; your own data is image_folder (class folders) or "
                          "package.module:callable")
    check_options(name, DATASETS.get(name), options or {}, options_where)


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *, val_size: int | float | None = None,
                 seed: int = 0, download: bool = False, options: Mapping[str, Any] | None = None) -> DataSplits:
    """Read a dataset and split it into train / val / test.

    Args:
        name: A registered name (``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``digits``,
            ``image_folder``) or ``package.module:callable`` (your own code; see :mod:`autoprune.data.external`).
        data_dir: Where the files are (the directory holding them, or a parent of the official extracted
            directory; for ``image_folder`` the folder holding ``train/``); default ``$AUTOPRUNE_DATA``, else
            ``./data``. Passed on to a callable as ``data_dir``.
        val_size: Validation samples carved from the training set: an int count, or a float fraction in
            [0, 1). ``None`` uses the dataset's default (5000 for CIFAR, 10 % otherwise). Must stay ``None`` when
            the dataset has its own validation set (an image folder's ``val/``, a callable's ``val``).
        seed: Seed of the stratified validation draw; the same seed always gives the same split.
        download: Download the official files into the data directory when they are missing.
        options: Dataset options (a campaign's ``dataset.kwargs``): ``image_folder``'s ``image_size``,
            ``channels``, ...; a callable's keyword arguments. The other built-in datasets take none.

    Returns:
        The splits and the dataset's :class:`~autoprune.data.base.DatasetInfo`.

    Raises:
        ConfigError: Unknown name or option, invalid ``val_size``, a callable that cannot be imported or called.
        DataError: Files missing (the message lists where it looked), corrupt, or failing their checksum; a
            callable's return value that breaks the contract.
    """
    opts = dict(options or {})
    if is_import_string(name):
        full, own_info = read_import_string(name, data_dir, seed=seed, options=opts)
        default_val, recompute = DEFAULT_VAL_SIZE, not own_info
    else:
        source = DATASETS.get(name)
        check_options(name, source, opts)
        full = source.read(data_dir, download, **opts)
        default_val, recompute = source.default_val_size, source.train_statistics
    if full.val is not None:
        if val_size is not None:
            raise ConfigError(f"dataset {name!r} has its own validation split ({len(full.val)} samples), so "
                              f"val_size={val_size} cannot apply",
                              hint="remove val_size (dataset.val_size / --val-size), or remove the dataset's own "
                              "validation split (an image folder's val/) to carve one from the training set")
        train, val = full.train, full.val
    else:
        train, val = train_val_split(full.train, default_val if val_size is None else val_size, seed=seed)
    info = full.info
    if recompute:
        mean, std = channel_stats(train.images)
        info = dataclasses.replace(info, mean=mean, std=std)
    return DataSplits(train=train, val=val, test=full.test, info=info)
