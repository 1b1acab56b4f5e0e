"""Carry a long benchmark's unfinished work from one machine to the next.

A benchmark cell that outlives a session (a 30-epoch fine-tune, a 400-candidate search) keeps its progress in a
work directory that is not versioned: trial stores, fine-tune checkpoints. A new session may start on a new
machine, where that directory is gone and the cell would start again from nothing. :func:`pack` writes the
files a later run needs to continue into one versioned archive (``results/benchmarks/<name>_carry.tar.gz``,
committed with the partial results); :func:`restore` puts them back where they are missing before the run goes
on. SQLite stores are copied through SQLite's backup API (a consistent snapshot, write-ahead log included);
their ``-wal``/``-shm``/lock companions are never carried.

Restoring never overwrites: a file that exists locally is newer than (or the same as) the carried one. The
caller decides what to carry (``select``) and what not to put back (``skip``, e.g. a checkpoint whose export has
since finished, which would otherwise make the finished run train again).
"""

from __future__ import annotations

import io
import sqlite3
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from autoprune.utils import atomic_open, atomic_path

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


#: The largest file an archive carries: the archives are versioned, and the repository keeps no file over 2 MB.
MAX_FILE_BYTES = 1_500_000


def pack(work: Path, archive: Path, select: Callable[[str], bool], max_file_bytes: int = MAX_FILE_BYTES
         ) -> list[str]:
    """Write the files of ``work`` that ``select`` accepts into ``archive`` (gzip tar, replaced atomically).

    A top-level folder (one cell) with a file over ``max_file_bytes`` is left out whole: that cell starts
    again where it is restored, instead of the archive growing past what the repository keeps. With nothing
    to carry the archive is removed (a finished run leaves none behind).

    Returns:
        The carried paths, relative to ``work``.
    """
    files = carried_files(work, select)
    too_big = {p.relative_to(work).parts[0] for p in files if p.stat().st_size > max_file_bytes}
    files = [p for p in files if p.relative_to(work).parts[0] not in too_big]
    if not files:
        archive.unlink(missing_ok=True)
        return []
    archive.parent.mkdir(parents=True, exist_ok=True)
    names = []
    with atomic_path(archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for p in files:
            rel = p.relative_to(work).as_posix()
            data = _sqlite_snapshot(p) if p.suffix == ".db" else p.read_bytes()
            info = tarfile.TarInfo(rel)
            info.size, info.mtime, info.mode = len(data), int(p.stat().st_mtime), 0o644
            tar.addfile(info, io.BytesIO(data))
            names.append(rel)
    return names


def restore(work: Path, archive: Path, skip: Callable[[str], bool] = lambda rel: False) -> list[str]:
    """Put the files of ``archive`` back under ``work`` where they are missing (never over an existing file, never
    one that ``skip`` rejects, never outside ``work``).

    Returns:
        The restored paths, relative to ``work``.
    """
    if not archive.is_file():
        return []
    restored = []
    with tarfile.open(archive, "r:gz") as tar:
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
