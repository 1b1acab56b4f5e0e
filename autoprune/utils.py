"""Small shared helpers: seeding, threads, devices, progress reporting, atomic files.

Progress: :func:`progress_mode` is the one rule deciding how long-running work reports itself — tqdm bars on a
terminal, one flushed line per trial / epoch on stdout when the output goes to a file or a pipe (CI, ``nohup``,
``tee``), nothing under ``--quiet``. :func:`progress` (bars over an iterable) and :func:`progress_line` (the
lines) follow it.

Atomic files: :func:`atomic_path`, :func:`atomic_open` and :func:`atomic_write` write through a temporary file
beside the target and a rename, so a reader never sees half a file; the file gets the permissions a plain
``open(path, "w")`` would give a new file (``0o666`` minus the umask), not ``tempfile.mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import os
import random
import secrets
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import numpy as np
import torch

from autoprune.errors import AutoPruneError

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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (``None``: :func:`default_device`), checked to exist on this machine.

    Raises:
        AutoPruneError: Not a device string, or a CUDA/MPS device this machine or torch build does not have.
    """
    if device is None:
        return default_device()
    hint = "use cpu, cuda or cuda:N (--device / a campaign's device); cuda needs a GPU and a CUDA build of torch"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:  # "Invalid device string", "Expected one of cpu, cuda..."
        raise AutoPruneError(f"device {device!r} is not a torch device ({str(exc).splitlines()[0][:120]})",
                             hint=hint) from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise AutoPruneError(f"device {device!r} cannot run autoprune's models (a {dev.type} device)", hint=hint)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise AutoPruneError(f"device {device!r} is not available here (torch {torch.__version__}, "
                             f"{torch.cuda.device_count()} CUDA device(s))", hint=hint)
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AutoPruneError(f"device {device!r} is not available here", hint=hint)
    return dev


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: all cores, or ``AUTOPRUNE_THREADS``); return the number used.

    Raises:
        AutoPruneError: A count that is not an integer in ``1..max(256, 8 × cores)`` (OpenMP cannot start tens of
            thousands of threads: it fails or crashes the process).
    """
    cap = max(256, 8 * (os.cpu_count() or 1))
    hint = f"use 1..{cap} (--threads N or AUTOPRUNE_THREADS=N); 1 gives the steadiest timings"
    if num_threads is None:
        env = os.environ.get("AUTOPRUNE_THREADS")
        try:
            num_threads = int(env) if env else (os.cpu_count() or 1)
        except ValueError:
            raise AutoPruneError(f"AUTOPRUNE_THREADS={env!r} is not a number of threads", hint=hint) from None
    if not 1 <= num_threads <= cap:
        raise AutoPruneError(f"{num_threads} torch threads is outside 1..{cap}", hint=hint)
    torch.set_num_threads(num_threads)
    return torch.get_num_threads()


_QUIET = False

ProgressMode = Literal["bar", "lines", "quiet"]
"""How progress is shown: tqdm bars (``"bar"``), one flushed stdout line per step (``"lines"``), or nothing."""


def set_quiet(quiet: bool) -> None:
    """Globally silence progress bars and progress lines (the CLI's ``--quiet``)."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    """Whether progress is globally silenced (see :func:`set_quiet`)."""
    return _QUIET


@contextmanager
def quiet() -> Iterator[None]:
    """Silence progress bars and lines inside the block; the previous setting is restored afterwards."""
    before = _QUIET
    set_quiet(True)
    try:
        yield
    finally:
        set_quiet(before)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_mode() -> ProgressMode:
    """The one rule for how long-running work (searches, training, fine-tunes) reports its progress.

    * ``"quiet"``: ``--quiet`` (:func:`set_quiet`) or inside :func:`quiet`;
    * ``"bar"``: stdout and stderr are both terminals — tqdm bars (on stderr) that redraw in place;
    * ``"lines"``: otherwise (CI logs, ``nohup``, ``| tee``, a redirected stream, a notebook) — one line per
      trial or epoch on stdout, flushed at once, so a log shows progress while the work runs.
    """
    if _QUIET:
        return "quiet"
    return "bar" if _is_terminal(sys.stdout) and _is_terminal(sys.stderr) else "lines"


def progress_line(text: str, *, with_bars: bool = False) -> None:
    """Print one progress line on stdout (flushed) when :func:`progress_mode` is ``"lines"``.

    Args:
        text: The line.
        with_bars: Print it in ``"bar"`` mode too (above any bar, through ``tqdm.write``): for lines that no
            bar replaces, such as the summary of a finished epoch. Nothing is printed in ``"quiet"`` mode.
    """
    mode = progress_mode()
    if mode == "lines":
        print(text, flush=True)
    elif mode == "bar" and with_bars:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, leave: bool = False) -> Iterator[T]:
    """A tqdm progress bar over ``iterable`` in ``"bar"`` mode (:func:`progress_mode`); a plain iteration otherwise."""
    if progress_mode() != "bar":
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------- atomic files


def _temporary_name(target: Path) -> Path:
    """``.<stem>.<random>.<pid>.tmp<suffix>`` beside ``target``: hidden, unique, the writer's pid third from the
    end (cleaners check whether it still runs), the suffix kept (writers that append a missing one)."""
    return target.with_name(f".{target.stem}.{secrets.token_hex(4)}.{os.getpid()}.tmp{target.suffix}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for any writer; renamed onto ``path`` when the block succeeds.

    The block must create the file at the yielded path (e.g. a library's ``save(path)``) with a plain ``open``,
    which gives it the permissions of a new file under the current umask. If the block raises, the temporary
    file is removed and ``path`` is left as it was.

    Args:
        path: The destination (its directory must exist).
        fsync: Flush the file to disk before the rename (checkpoints that must survive a power cut).
    """
    target = Path(path)
    tmp = _temporary_name(target)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: Literal["w", "wb"] = "w", *, encoding: str | None = "utf-8",
                fsync: bool = False) -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, atomically: the data appears at ``path`` only when the block succeeds.

    The file is created with the mode ``open`` gives a new file (``0o666`` minus the umask).

    Args:
        path: The destination (its directory must exist).
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        encoding: Text encoding (ignored for ``"wb"``).
        fsync: Flush the file to disk before the rename.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes files: mode 'w' or 'wb', not {mode!r}")
    text_encoding = None if mode == "wb" else encoding
    # "x": created the way open() creates a new file (0o666 minus the umask); never an existing file
    with atomic_path(path) as tmp, open(tmp, "x" + mode[1:], encoding=text_encoding) as fh:
        yield fh
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write(path: str | os.PathLike[str], data: str | bytes, *, encoding: str = "utf-8",
                 fsync: bool = False) -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically (see :func:`atomic_open`); return the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", encoding=encoding, fsync=fsync) as fh:
        fh.write(data)
    return Path(path)


def prepare_out_dir(path: str | os.PathLike[str], *, hint: str | None = None) -> Path:
    """Create an output directory (by default the campaign directory) and check that files can be written in it.

    Args:
        path: The directory.
        hint: The fix to suggest (default: the campaign's ``output_dir``).

    Raises:
        AutoPruneError: If it cannot be created or written (names the directory and the reason).
    """
    out = Path(path).expanduser()
    hint = hint or "set output_dir=<a writable directory> (or run from a directory where results/ can be written)"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:  # ValueError: a name the file system cannot encode (lone surrogates)
        shown = str(out).encode("utf-8", "backslashreplace").decode()  # printable even with undecodable names
        raise AutoPruneError(f"cannot create the output directory {shown}: {getattr(exc, 'strerror', None) or exc}",
                             hint=hint) from None
    probe = out / f".autoprune-write-test-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise AutoPruneError(f"the output directory {out} is not writable: {exc.strerror or exc}", hint=hint) from None
    return out
