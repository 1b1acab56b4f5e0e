"""Carry a long benchmark's unfinished work from one machine to the next.

A benchmark cell that outlives a session (a 30-epoch fine-tune, a 400-candidate search) keeps its progress in a
work directory that is not versioned: trial stores, fine-tune checkpoints. A new session may start on a new
machine, where that directory is gone and the cell would start again from nothing. :func:`pack` writes the
files a later run needs to continue into one versioned archive (``results/benchmarks/<name>_carry.tar.gz``,
committed with the partial results); :func:`restore` puts them back where they are missing before the run goes
on. The repository keeps no file over 2 MB, so an archive larger than :data:`MAX_VOLUME_BYTES` is written as
numbered volumes instead (``<name>_carry.tar.gz.001``, ``.002``, …: the bytes of one archive, split) that
:func:`restore` joins again. SQLite stores are copied through SQLite's backup API (a consistent snapshot,
write-ahead log included); their ``-wal``/``-shm``/lock companions are never carried.

Restoring never overwrites: a file that exists locally is newer than (or the same as) the carried one. The
caller decides what to carry (``select``) and what not to put back (``skip``, e.g. a checkpoint whose export has
since finished, which would otherwise make the finished run train again).
"""

from __future__ import annotations

import gzip
import io
import sqlite3
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

from autoprune.utils import atomic_open

COMPANIONS = ("-wal", "-shm", "-journal", ".lock")


def carried_files(work: Path, select: Callable[[str], bool]) -> list[Path]:
    """The regular files under ``work`` that ``select`` accepts (by POSIX path relative to ``work``), without
    SQLite companions, sorted."""
    if not work.is_dir():
        return []
    out = []
    for p in sorted(work.rglob("*")):
        rel = p.relative_to(work).as_posix()
        if p.is_file() and not p.is_symlink() and not rel.endswith(COMPANIONS) and select(rel):
            out.append(p)
    return out


def _sqlite_snapshot(path: Path) -> bytes:
    """A consistent copy of the SQLite database ``path`` (its write-ahead log folded in)."""
    with tempfile.TemporaryDirectory() as tmp:
        dst_path = Path(tmp) / "copy.db"
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(dst_path)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
        return dst_path.read_bytes()


#: The largest file :func:`pack` writes: the archives are versioned, and the repository keeps no file over 2 MB.
MAX_VOLUME_BYTES = 1_500_000

#: The most one top-level folder (one cell) may carry; a cell over it is left out whole and starts again where it
#: is restored (a guard against committing a runaway work directory, far above any checkpoint the benchmarks keep).
MAX_CELL_BYTES = 32_000_000


def volumes(archive: Path) -> list[Path]:
    """The numbered volumes of ``archive`` on disk (``archive.001``, ``archive.002``, …), in order."""
    if not archive.parent.is_dir():
        return []
    found = [p for p in archive.parent.glob(archive.name + ".*") if p.suffix[1:].isdigit() and len(p.suffix) == 4]
    return sorted(found, key=lambda p: int(p.suffix[1:]))


def archive_files(archive: Path) -> list[Path]:
    """The files that hold ``archive`` now: itself, or its volumes (empty when nothing is carried)."""
    return [archive] if archive.is_file() else volumes(archive)


def remove(archive: Path) -> None:
    """Delete ``archive`` and every volume of it (also stale ones beside a whole archive)."""
    for p in [archive, *volumes(archive)]:
        p.unlink(missing_ok=True)


def _write_split(data_path: Path, archive: Path, max_volume_bytes: int) -> None:
    """Replace ``archive`` (whole or in volumes) by the bytes of ``data_path``: one file when they fit in
    ``max_volume_bytes``, else numbered volumes of at most that size. New volumes are complete before old ones go."""
    size = data_path.stat().st_size
    old = [archive, *volumes(archive)]
    data_path.chmod(0o644)
    if size <= max_volume_bytes:
        data_path.replace(archive)
        for p in old[1:]:
            p.unlink(missing_ok=True)
        return
    written: list[Path] = []
    with data_path.open("rb") as src:
        while chunk := src.read(max_volume_bytes):
            dest = archive.with_name(f"{archive.name}.{len(written) + 1:03d}")
            with atomic_open(dest, "wb", encoding=None) as out:
                out.write(chunk)
            written.append(dest)
    data_path.unlink()
    for p in old:
        if p not in written:
            p.unlink(missing_ok=True)


def pack(work: Path, archive: Path, select: Callable[[str], bool], max_volume_bytes: int = MAX_VOLUME_BYTES,
         max_cell_bytes: int = MAX_CELL_BYTES) -> list[str]:
    """Write the files of ``work`` that ``select`` accepts into ``archive`` (gzip tar, replaced atomically; split
    into numbered volumes of at most ``max_volume_bytes`` when larger, see :func:`volumes`).

    A top-level folder (one cell) whose files add up to more than ``max_cell_bytes`` is left out whole: that cell
    starts again where it is restored. With nothing to carry the archive and its volumes are removed (a finished
    run leaves none behind).

    Returns:
        The carried paths, relative to ``work``.
    """
    files = carried_files(work, select)
    per_cell: dict[str, int] = {}
    for p in files:
        top = p.relative_to(work).parts[0]
        per_cell[top] = per_cell.get(top, 0) + p.stat().st_size
    files = [p for p in files if per_cell[p.relative_to(work).parts[0]] <= max_cell_bytes]
    if not files:
        remove(archive)
        return []
    archive.parent.mkdir(parents=True, exist_ok=True)
    names = []
    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive.name}.", dir=archive.parent)
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for p in files:
                rel = p.relative_to(work).as_posix()
                data = _sqlite_snapshot(p) if p.suffix == ".db" else p.read_bytes()
                info = tarfile.TarInfo(rel)
                info.size, info.mtime, info.mode = len(data), int(p.stat().st_mtime), 0o644
                tar.addfile(info, io.BytesIO(data))
                names.append(rel)
        _write_split(tmp, archive, max_volume_bytes)
    finally:
        tmp.unlink(missing_ok=True)
    return names


class CarryError(RuntimeError):
    """A carry archive that cannot be read (damaged, or a volume missing).

    Args:
        message: What is wrong.
        archive: The archive's path (its volumes beside it).
    """

    def __init__(self, message: str, archive: Path) -> None:
        super().__init__(message)
        self.archive = archive

    @property
    def hint(self) -> str:
        """What a user does about it: take the committed version back, or drop it (the unfinished cells restart)."""
        a = self.archive
        return (f"git checkout -- {a.parent}/{a.name}* restores the committed archive; deleting {a.name} and its "
                "volumes starts the unfinished cells again (finished ones are kept)")

    def for_user(self) -> str:
        """The ``error:`` and ``hint:`` lines the benchmarks print before they exit with 2."""
        return f"error: {self}\n  hint: {self.hint}"


def restore(work: Path, archive: Path, skip: Callable[[str], bool] = lambda rel: False) -> list[str]:
    """Put the files of ``archive`` (or of its volumes, joined) back under ``work`` where they are missing (never
    over an existing file, never one that ``skip`` rejects, never outside ``work``).

    Returns:
        The restored paths, relative to ``work``.

    Raises:
        CarryError: the archive is damaged or a volume is missing; nothing under ``work`` is changed by the
            damaged part (files restored before the damage was found stay).
    """
    parts = archive_files(archive)
    if not parts:
        return []
    numbers = [int(p.suffix[1:]) for p in parts if p != archive]
    if numbers and numbers != list(range(1, len(numbers) + 1)):
        raise CarryError(f"{archive.name}: volumes {numbers} are not numbered 1..{len(numbers)} (one is missing)",
                         archive)
    try:
        return _restore_from(work, b"".join(p.read_bytes() for p in parts), skip)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        names = ", ".join(p.name for p in parts)
        raise CarryError(f"{names}: not a readable carry archive ({exc})", archive) from exc


def _restore_from(work: Path, data: bytes, skip: Callable[[str], bool]) -> list[str]:
    restored = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            if not m.isfile():
                continue
            rel = Path(m.name)
            if rel.is_absolute() or ".." in rel.parts:
                continue
            dest = work / rel
            if dest.exists() or skip(rel.as_posix()):
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            if src is None:
                continue
            with atomic_open(dest, "wb", encoding=None) as out:
                out.write(src.read())
            restored.append(rel.as_posix())
    return restored
