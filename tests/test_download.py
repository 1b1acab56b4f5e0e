"""Downloads: files served from a loopback HTTP server (127.0.0.1) in a thread and from file:// URLs.

Nothing here touches the internet: every URL table is overridden with local URLs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune.data import download as dl
from autoprune.data import load_dataset
from autoprune.data.cifar import read_cifar
from autoprune.data.mnist import read_mnist
from autoprune.errors import DataError

# --------------------------------------------------------------------------------------- server


@dataclass
class _Site:
    """What the loopback server serves and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_first: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before dropping the 1st request
    ranges: bool = True
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    site: _Site

    def do_GET(self) -> None:
        site = self.server.site  # type: ignore[attr-defined]
        site.requests.append((self.path, self.headers.get("Range")))
        body = site.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and site.ranges and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = site.cut_first.pop(self.path, None)
        if cut is not None:
            self.wfile.write(body[start:start + cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def site() -> Iterator[tuple[_Site, str]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.site = _Site()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server.site, f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _payload(n: int = 300_000) -> bytes:
    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()


# ------------------------------------------------------------------------------------- transfers


def test_http_download_with_checksums(site: tuple[_Site, str], tmp_path: Path) -> None:
    s, base = site
    s.files["/f.bin"] = data = _payload()
    dest = dl.download_url(f"{base}/f.bin", tmp_path / "sub" / "f.bin", md5=_md5(data),
                           sha256=hashlib.sha256(data).hexdigest(), chunk_size=4096)
    assert dest.read_bytes() == data
    assert not (tmp_path / "sub" / "f.bin.part").exists()
    # A second call finds a valid file and does not go to the network.
    dl.download_url(f"{base}/f.bin", dest, md5=_md5(data))
    assert len(s.requests) == 1


def test_file_url_download(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(data := _payload(5000))
    dest = dl.download_url(src.as_uri(), tmp_path / "out" / "copy.bin", md5=_md5(data))
    assert dest.read_bytes() == data


def test_bad_checksum_leaves_no_file(site: tuple[_Site, str], tmp_path: Path) -> None:
    s, base = site
    s.files["/f.bin"] = _payload(1000)
    dest = tmp_path / "f.bin"
    with pytest.raises(DataError, match="checksum mismatch") as err:
        dl.download_url(f"{base}/f.bin", dest, md5="0" * 32, backoff=0)
    assert "md5" in str(err.value) and err.value.hint
    assert not dest.exists() and not (tmp_path / "f.bin.part").exists()
    # A stale final file with the wrong content is replaced by a verified download.
    dest.write_bytes(b"stale")
    dl.download_url(f"{base}/f.bin", dest, md5=_md5(s.files["/f.bin"]), backoff=0)
    assert dest.read_bytes() == s.files["/f.bin"]


def test_interrupted_download_resumes_on_the_next_call(site: tuple[_Site, str], tmp_path: Path) -> None:
    s, base = site
    s.files["/big.bin"] = data = _payload()
    s.cut_first["/big.bin"] = 100_000
    dest, part = tmp_path / "big.bin", tmp_path / "big.bin.part"
    with pytest.raises(DataError, match="interrupted") as err:
        dl.download_url(f"{base}/big.bin", dest, md5=_md5(data), retries=0, backoff=0, timeout=5)
    assert "again" in (err.value.hint or "")
    assert not dest.exists() and part.stat().st_size == 100_000
    dl.download_url(f"{base}/big.bin", dest, md5=_md5(data), retries=0, backoff=0, timeout=5)
    assert dest.read_bytes() == data and not part.exists()
    assert s.requests[-1] == ("/big.bin", "bytes=100000-")  # resumed, not restarted


def test_interrupted_download_retries_within_one_call(site: tuple[_Site, str], tmp_path: Path) -> None:
    s, base = site
    s.files["/big.bin"] = data = _payload()
    s.cut_first["/big.bin"] = 12_345
    dest = dl.download_url(f"{base}/big.bin", tmp_path / "big.bin", md5=_md5(data), retries=2, backoff=0,
                           timeout=5)
    assert dest.read_bytes() == data
    assert [r for _, r in s.requests] == [None, "bytes=12345-"]


def test_server_without_range_support_restarts_cleanly(site: tuple[_Site, str], tmp_path: Path) -> None:
    s, base = site
    s.ranges = False
    s.files["/big.bin"] = data = _payload()
    s.cut_first["/big.bin"] = 50_000
    dest = tmp_path / "big.bin"
    with pytest.raises(DataError):
        dl.download_url(f"{base}/big.bin", dest, md5=_md5(data), retries=0, backoff=0, timeout=5)
    dl.download_url(f"{base}/big.bin", dest, md5=_md5(data), retries=0, backoff=0, timeout=5)
    assert dest.read_bytes() == data  # the partial bytes were not appended twice


def test_complete_part_file_is_finished_not_refetched(site: tuple[_Site, str], tmp_path: Path) -> None:
    s, base = site
    s.files["/f.bin"] = data = _payload(2000)
    (tmp_path / "f.bin.part").write_bytes(data)  # e.g. killed between the last write and the rename
    dest = dl.download_url(f"{base}/f.bin", tmp_path / "f.bin", md5=_md5(data), backoff=0)
    assert dest.read_bytes() == data and s.requests == [("/f.bin", "bytes=2000-")]


def test_mirrors_are_tried_in_order(site: tuple[_Site, str], tmp_path: Path) -> None:
    s, base = site
    s.files["/mirror/f.bin"] = data = _payload(1000)
    res = dl.Resource("f.bin", (f"{base}/missing/f.bin", f"{base}/mirror/f.bin"), md5=_md5(data))
    assert dl.download_resource(res, tmp_path, backoff=0).read_bytes() == data
    bad = dl.Resource("g.bin", (f"{base}/nope/g.bin",), md5=_md5(data))
    with pytest.raises(DataError, match="HTTP 404"):
        dl.download_resource(bad, tmp_path, backoff=0)


def test_unknown_download_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no download is known"):
        dl.fetch("imagenet", tmp_path, resources={})


def test_official_table_is_complete() -> None:
    for name in ("cifar10", "cifar100", "mnist", "fashion_mnist"):
        for res in dl.RESOURCES[name]:
            assert res.md5 and len(res.md5) == 32 and all(u.startswith(("http://", "https://")) for u in res.urls)
    assert dl.RESOURCES["cifar10"][0].md5 == "c32a1d4ab5d03f1284b67883e8d87530"


# ------------------------------------------------------------------------------------ extraction


def _tar_gz(members: dict[str, bytes], *, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return buf.getvalue()


def test_extract_archive(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_tar_gz({"pkg/x.txt": b"x", "pkg/sub/y.txt": b"y"}))
    created = dl.extract_archive(archive, tmp_path / "out")
    assert created == [tmp_path / "out" / "pkg"]
    assert (tmp_path / "out" / "pkg" / "sub" / "y.txt").read_bytes() == b"y"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pkg"]  # no temporary directory left


@pytest.mark.parametrize("member", ["../evil.txt", "pkg/../../evil.txt", "/tmp/evil.txt"])
def test_path_traversal_is_rejected(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_tar_gz({"pkg/ok.txt": b"ok", member: b"evil"}))
    out = tmp_path / "deep" / "out"
    with pytest.raises(DataError, match="outside"):
        dl.extract_archive(archive, out)
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (out / "pkg").exists()


def test_links_outside_are_rejected(tmp_path: Path) -> None:
    link = tarfile.TarInfo("pkg/link")
    link.type, link.linkname = tarfile.SYMTYPE, "../../outside"
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_tar_gz({"pkg/ok.txt": b"ok"}, extra=[link]))
    with pytest.raises(DataError, match="links outside"):
        dl.extract_archive(archive, tmp_path / "out")
    hard = tarfile.TarInfo("pkg/hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/passwd"
    archive.write_bytes(_tar_gz({"pkg/ok.txt": b"ok"}, extra=[hard]))
    with pytest.raises(DataError, match="links outside"):
        dl.extract_archive(archive, tmp_path / "out")


def test_corrupt_archive_is_a_data_error(site: tuple[_Site, str], tmp_path: Path) -> None:
    s, base = site
    good = _tar_gz({"pkg/x.bin": _payload(50_000)})
    s.files["/bad.tar.gz"] = bad = good[: len(good) // 2]
    table = {"toy": (dl.Resource("bad.tar.gz", (f"{base}/bad.tar.gz",), md5=_md5(bad), extract=True),)}
    with pytest.raises(DataError, match="not a readable tar archive") as err:
        dl.fetch("toy", tmp_path, resources=table, backoff=0)
    assert "download it again" in (err.value.hint or "")
    assert not (tmp_path / "pkg").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="not a readable tar archive"):
        dl.extract_archive(tmp_path / "junk.tar.gz", tmp_path)


# ----------------------------------------------------------------------------- dataset downloads


def _cifar10_binary_archive() -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(3)
    members, first = {}, None
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, (3, 3073), dtype=np.uint8)
        records[:, 0] %= 10
        first = records if first is None else first
        members[f"cifar-10-batches-bin/{name}"] = records.tobytes()
    members["cifar-10-batches-bin/batches.meta.txt"] = "\n".join(f"k{i}" for i in range(10)).encode()
    return _tar_gz(members), first


def test_cifar_download_end_to_end(site: tuple[_Site, str], tmp_path: Path) -> None:
    s, base = site
    archive, first = _cifar10_binary_archive()
    s.files["/cifar-10-binary.tar.gz"] = archive
    table = {"cifar10": (dl.Resource("cifar-10-binary.tar.gz", (f"{base}/cifar-10-binary.tar.gz",),
                                     md5=_md5(archive), extract=True),)}
    with pytest.raises(DataError, match="not found"):
        read_cifar("cifar10", tmp_path, resources=table)  # download=False never downloads
    tt = read_cifar("cifar10", tmp_path, download=True, resources=table)
    assert (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").is_file()
    assert len(tt.train) == 15 and len(tt.test) == 3 and tt.info.class_names[0] == "k0"
    assert tt.train.labels[0] == int(first[0, 0])
    assert torch.equal(tt.train.images[0], torch.from_numpy(first[0, 1:].reshape(3, 32, 32)))
    n_requests = len(s.requests)
    read_cifar("cifar10", tmp_path, download=True, resources=table)  # already there: no new request
    assert len(s.requests) == n_requests


def test_load_dataset_download_uses_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, _ = _cifar10_binary_archive()
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "c.tar.gz").write_bytes(archive)
    res = dl.Resource("cifar-10-binary.tar.gz", ((tmp_path / "srv" / "c.tar.gz").as_uri(),), md5=_md5(archive),
                      extract=True)
    monkeypatch.setitem(dl.RESOURCES, "cifar10", (res,))
    splits = load_dataset("cifar10", tmp_path / "data", val_size=3, download=True)
    assert len(splits.train) == 12 and len(splits.val) == 3 and len(splits.test) == 3


def test_mnist_download_end_to_end(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    srv.mkdir()
    images = np.arange(5 * 28 * 28, dtype=np.int64).reshape(5, 28, 28) % 256
    labels = np.array([0, 1, 2, 3, 9])
    arrays = {"train-images-idx3-ubyte.gz": images, "train-labels-idx1-ubyte.gz": labels,
              "t10k-images-idx3-ubyte.gz": images[:2], "t10k-labels-idx1-ubyte.gz": labels[:2]}
    table = []
    for name, arr in arrays.items():
        raw = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
        (srv / name).write_bytes(gz := gzip.compress(raw))
        table.append(dl.Resource(name, ((srv / name).as_uri(),), md5=_md5(gz)))
    tt = read_mnist("mnist", tmp_path / "data", download=True, resources={"mnist": tuple(table)})
    assert (tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    assert tt.train.labels.tolist() == [0, 1, 2, 3, 9] and tt.test.images.shape == (2, 1, 28, 28)
    assert torch.equal(tt.train.images[:, 0], torch.from_numpy(images.astype(np.uint8)))
