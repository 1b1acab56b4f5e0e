"""Downloading the official dataset files: checksums, resumable transfers, safe archive extraction.

The table :data:`RESOURCES` lists, per dataset, the official distribution files with their published
checksums. :func:`fetch` downloads (and, for ``.tar.gz`` archives, extracts) them; every function takes the
table as an argument so tests can point it at files they serve themselves.

A transfer goes to ``<file>.part``; an interrupted transfer leaves that file behind and the next call resumes
it with an HTTP ``Range`` request when the server honours it (and restarts cleanly when it does not). Only a
file whose checksum matches is renamed (atomically) to its final name; a mismatching one is deleted.
Archives are checked member by member before anything is written: absolute paths, ``..`` components, links
that leave the target, and device files are refused. Only :mod:`urllib` is used.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from autoprune.errors import DataError
from autoprune.utils import progress

CHUNK_SIZE = 1 << 20
USER_AGENT = "autoprune-dataset-downloader"


@dataclass(frozen=True)
class Resource:
    """One file of an official dataset distribution.

    Attributes:
        filename: Name to store the file under.
        urls: Where to get it, tried in order (official location first, then mirrors).
        md5: Published MD5 of the file (hex), if any.
        sha256: Published SHA-256 of the file (hex), if any.
        extract: Whether the file is a tar archive to unpack after download.
    """

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None
    extract: bool = False


_TORONTO = "https://www.cs.toronto.edu/~kriz/"
_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz")


def _idx_resources(bases: Sequence[str], md5s: Sequence[str]) -> tuple[Resource, ...]:
    return tuple(Resource(name, tuple(base + name for base in bases), md5=md5)
                 for name, md5 in zip(_IDX_FILES, md5s, strict=True))


RESOURCES: dict[str, tuple[Resource, ...]] = {
    "cifar10": (Resource("cifar-10-binary.tar.gz", (_TORONTO + "cifar-10-binary.tar.gz",),
                         md5="c32a1d4ab5d03f1284b67883e8d87530",
                         sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                         extract=True),),
    "cifar100": (Resource("cifar-100-binary.tar.gz", (_TORONTO + "cifar-100-binary.tar.gz",),
                          md5="03b5dce01913d631647c71ecec9e9cb8", extract=True),),
    "mnist": _idx_resources(_MNIST_MIRRORS, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                             "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
    "fashion_mnist": _idx_resources(_FASHION, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                               "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")),
}
"""Official files per dataset (CIFAR: the binary archives; MNIST / Fashion-MNIST: the four gzip idx files)."""


# ------------------------------------------------------------------------------------------ checksums


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm, usedforsecurity=False) if algorithm == "md5" else hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_problems(path: str | os.PathLike[str], *, md5: str | None = None, sha256: str | None = None
                      ) -> list[str]:
    """Descriptions of every checksum of ``path`` that does not match (empty when all match)."""
    problems = []
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected:
            actual = file_digest(path, algorithm)
            if actual.lower() != expected.lower():
                problems.append(f"{algorithm} {actual} (expected {expected.lower()})")
    return problems


# ------------------------------------------------------------------------------------------- transfer


class _Interrupted(Exception):
    """A transfer stopped before the announced length (resumable)."""


def _chunks(response: Any, chunk_size: int) -> Iterator[bytes]:
    while True:
        chunk = response.read(chunk_size)
        if not chunk:
            return
        yield chunk


def _open(url: str, offset: int, timeout: float) -> tuple[Any, int]:
    """Open ``url`` asking (over HTTP) for the bytes from ``offset`` on.

    Returns the response and the offset its body starts at: ``offset`` when the server resumed, 0 when it
    sent the whole file, -1 (response closed) when it answered a range other than the one asked for.
    """
    headers = {"User-Agent": USER_AGENT}
    is_http = url.lower().startswith(("http://", "https://"))
    if offset and is_http:
        headers["Range"] = f"bytes={offset}-"
    response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    if offset and is_http and getattr(response, "status", None) == 206:
        if not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            response.close()
            return response, -1
        return response, offset
    return response, 0


def _transfer(url: str, part: Path, *, timeout: float, chunk_size: int) -> None:
    """Append the rest of ``url`` to ``part`` (or rewrite it when the server cannot resume)."""
    offset = part.stat().st_size if part.exists() else 0
    response, start = _open(url, offset, timeout)
    if start < 0:  # the server resumed from somewhere else: start over
        part.unlink()
        response, start = _open(url, 0, timeout)
    with response:
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        total_chunks = None if length is None else -(-length // chunk_size)
        with part.open("ab" if start else "wb") as fh:
            for chunk in progress(_chunks(response, chunk_size), desc=f"downloading {part.name[:-5]}",
                                  total=total_chunks):
                fh.write(chunk)
    received = part.stat().st_size - start
    if length is not None and received != length:
        raise _Interrupted(f"received {received} of {length} bytes")


def download_url(url: str, dest: str | os.PathLike[str], *, md5: str | None = None, sha256: str | None = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0, chunk_size: int = CHUNK_SIZE
                 ) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming and verifying checksums.

    An existing ``dest`` whose checksums match is kept without any network access.

    Args:
        url: ``http(s)://`` or ``file://`` URL.
        dest: Final path of the file.
        md5: Expected MD5 (hex), if known.
        sha256: Expected SHA-256 (hex), if known.
        timeout: Socket timeout in seconds.
        retries: How many times an interrupted transfer is resumed within this call.
        backoff: Seconds before the first retry (doubled each time, at most 30 s).
        chunk_size: Bytes per read.

    Returns:
        ``dest`` as a :class:`Path`.

    Raises:
        DataError: The server refused, the transfer was interrupted more than ``retries`` times (the partial
            file is kept for the next call to resume), or a checksum did not match (the file is deleted).
    """
    dest = Path(dest)
    if dest.is_file() and not checksum_problems(dest, md5=md5, sha256=sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _transfer(url, part, timeout=timeout, chunk_size=chunk_size)
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and part.exists():  # asked past the end: the partial file may be complete
                if (md5 or sha256) and not checksum_problems(part, md5=md5, sha256=sha256):
                    break
                part.unlink()
            elif exc.code < 500 or attempt >= retries:
                raise DataError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}",
                                hint="check the URL and your connection, or download the file by hand into "
                                     f"{dest.parent}") from exc
        except (_Interrupted, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            if attempt >= retries:
                have = part.stat().st_size if part.exists() else 0
                raise DataError(f"downloading {url} was interrupted ({exc}); {have} bytes kept in {part}",
                                hint="run the same command again: the download resumes where it stopped") from exc
        attempt += 1
        time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
    problems = checksum_problems(part, md5=md5, sha256=sha256)
    if problems:
        part.unlink()
        raise DataError(f"checksum mismatch for {url}: got {'; '.join(problems)}; the file was deleted",
                        hint="run the command again; if it keeps failing the mirror serves a different file — "
                             "download the official archive by hand and point --data-dir at it")
    os.replace(part, dest)
    return dest


def download_resource(resource: Resource, directory: str | os.PathLike[str], *, timeout: float = 60.0,
                      retries: int = 3, backoff: float = 1.0) -> Path:
    """Download one :class:`Resource` into ``directory``, trying its URLs in order.

    Raises:
        DataError: Every URL failed (the message lists each failure).
    """
    dest = Path(directory) / resource.filename
    failures = []
    for url in resource.urls:
        try:
            return download_url(url, dest, md5=resource.md5, sha256=resource.sha256, timeout=timeout,
                                retries=retries, backoff=backoff)
        except DataError as exc:
            failures.append(f"{url}: {exc.message}")
    raise DataError(f"could not download {resource.filename}:\n  " + "\n  ".join(failures),
                    hint=f"check your connection, or download it by hand into {Path(directory)}")


# ----------------------------------------------------------------------------------------- extraction


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_member(member: tarfile.TarInfo, root: Path) -> None:
    """Refuse members that would write outside ``root`` (absolute, ``..``, escaping links, devices)."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith(("/", "\\")) or ".." in name.parts or ":" in member.name:
        raise DataError(f"archive member {member.name!r} points outside the target directory",
                        hint="the archive is not an official distribution; delete it and download again")
    target = Path(os.path.normpath(root / name))
    if not _inside(target, root):
        raise DataError(f"archive member {member.name!r} points outside the target directory")
    if member.issym():
        link = Path(os.path.normpath(target.parent / member.linkname))
        if PurePosixPath(member.linkname).is_absolute() or not _inside(link, root):
            raise DataError(f"archive member {member.name!r} links outside the target ({member.linkname!r})",
                            hint="the archive is not an official distribution; delete it and download again")
    elif member.islnk():
        link = Path(os.path.normpath(root / member.linkname))
        if PurePosixPath(member.linkname).is_absolute() or not _inside(link, root):
            raise DataError(f"archive member {member.name!r} links outside the target ({member.linkname!r})",
                            hint="the archive is not an official distribution; delete it and download again")
    elif not (member.isfile() or member.isdir()):
        raise DataError(f"archive member {member.name!r} is a device or fifo, which a dataset never contains",
                        hint="the archive is not an official distribution; delete it and download again")


def extract_archive(archive: str | os.PathLike[str], target: str | os.PathLike[str]) -> list[Path]:
    """Safely extract a (gzip/bz2/xz-compressed) tar archive into ``target``.

    Every member is checked before anything is written; the archive is unpacked into a temporary
    directory inside ``target`` and its top-level entries are then moved into place (replacing older
    copies), so a failed extraction leaves nothing half-written behind.

    Returns:
        The top-level paths created in ``target``.

    Raises:
        DataError: The archive is corrupt or contains an unsafe member.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target)).resolve()
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member, tmp)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python < 3.11.4; members were checked above
                    tar.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise DataError(f"{archive} is not a readable tar archive ({exc})",
                            hint=f"delete {archive} and download it again") from exc
        if not members:
            raise DataError(f"{archive} is an empty archive", hint=f"delete {archive} and download it again")
        created = []
        for entry in sorted(tmp.iterdir()):
            dest = target / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            elif dest.exists() or dest.is_symlink():
                dest.unlink()
            os.replace(entry, dest)
            created.append(dest)
        return created
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(name: str, directory: str | os.PathLike[str], *,
          resources: Mapping[str, Sequence[Resource]] | None = None, timeout: float = 60.0, retries: int = 3,
          backoff: float = 1.0) -> Path:
    """Download (and extract) every official file of dataset ``name`` into ``directory``.

    Args:
        name: Dataset name, a key of ``resources``.
        directory: Where to put the files (created if needed).
        resources: The table to use; default :data:`RESOURCES`.
        timeout: Socket timeout per request, seconds.
        retries: Resumptions per file within this call.
        backoff: Seconds before the first retry.

    Returns:
        ``directory``.

    Raises:
        DataError: No download is known for ``name``, or a download / checksum / extraction failed.
    """
    table = RESOURCES if resources is None else resources
    if name not in table:
        raise DataError(f"no download is known for dataset {name!r}",
                        hint=f"downloadable: {', '.join(sorted(table))}")
    directory = Path(directory)
    for resource in table[name]:
        path = download_resource(resource, directory, timeout=timeout, retries=retries, backoff=backoff)
        if resource.extract:
            extract_archive(path, directory)
    return directory
