"""Small shared helpers: seeding, threads, devices, progress bars."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: all cores, or ``AUTOPRUNE_THREADS``); return the number used."""
    if num_threads is None:
        env = os.environ.get("AUTOPRUNE_THREADS")
        num_threads = int(env) if env else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, num_threads))
    return torch.get_num_threads()


_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Globally silence progress bars (the CLI's ``--quiet``)."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    """Whether progress bars are globally silenced (see :func:`set_quiet`)."""
    return _QUIET


@contextmanager
def quiet() -> Iterator[None]:
    """Silence progress bars inside the block; the previous setting is restored afterwards."""
    before = _QUIET
    set_quiet(True)
    try:
        yield
    finally:
        set_quiet(before)


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, leave: bool = False) -> Iterator[T]:
    """A tqdm progress bar that is silent when stderr is not a terminal or when quiet mode is on."""
    disable = _QUIET or not sys.stderr.isatty()
    if disable:
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True)
