"""Datasets, splits and loaders: file formats from small files written here, plus one real CIFAR-10 check."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune.data import (
    DATASETS,
    Augment,
    ImageTensorDataset,
    load_dataset,
    make_loader,
    stratified_indices,
    subset,
    train_val_split,
)
from autoprune.data.augment import crop_with_offsets
from autoprune.data.cifar import read_cifar, safe_unpickle
from autoprune.data.mnist import parse_idx, read_idx, read_mnist
from autoprune.errors import ConfigError, DataError

# ----------------------------------------------------------------------------------- file writers


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def _write_cifar_bin(path: Path, images: np.ndarray, labels: list[tuple[int, ...]]) -> None:
    """Write records byte by byte: label byte(s), then R plane, G plane, B plane, each row-major."""
    out = bytearray()
    for img, lab in zip(images, labels, strict=True):
        out += bytes(lab)
        for c in range(3):
            for i in range(32):
                for j in range(32):
                    out.append(int(img[c, i, j]))
    path.write_bytes(bytes(out))


def _write_cifar10_bin(directory: Path, per_file: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    train_x, train_y = [], []
    for k in range(1, 6):
        x = _images(per_file, k)
        y = [(k + i) % 10 for i in range(per_file)]
        _write_cifar_bin(directory / f"data_batch_{k}.bin", x, [(v,) for v in y])
        train_x.append(x)
        train_y += y
    test_x = _images(per_file, 99)
    test_y = [(3 * i) % 10 for i in range(per_file)]
    _write_cifar_bin(directory / "test_batch.bin", test_x, [(v,) for v in test_y])
    return np.concatenate(train_x), np.array(train_y), test_x, np.array(test_y)


def _write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A protocol-2 pickle as Python 2 / NumPy 1 wrote the official batches (str opcodes, numpy.core names)."""

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
             + b"(" + i(1) + i(data.shape[0]) + i(data.shape[1]) + b"\x86"
             + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
             + b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
             + b"\x89" + s(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(i(v) for v in labels) + b"e"
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"training batch") + s(b"data") + array + s(b"labels")
            + label_list + b"u.")


def _write_cifar10_py(directory: Path, per_file: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Training batches in the Python-2 pickle format of the official files; the test batch from Python 3."""
    directory.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for k in range(1, 6):
        x = _images(per_file, 10 + k)
        y = [(2 * k + i) % 10 for i in range(per_file)]
        (directory / f"data_batch_{k}").write_bytes(_py2_pickle(x.reshape(per_file, -1), y))
        xs.append(x)
        ys += y
    test_x = _images(per_file, 77)
    _write_pickle(directory / "test_batch", {b"labels": [1] * per_file, b"data": test_x.reshape(per_file, -1)})
    _write_pickle(directory / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return np.concatenate(xs), np.array(ys)


def _idx_bytes(arr: np.ndarray, code: int = 0x08, dtype: str = ">u1") -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(dtype).tobytes()


# ----------------------------------------------------------------------------------------- CIFAR


def test_cifar10_binary_pixel_order_and_labels(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-bin"
    train_x, train_y, test_x, test_y = _write_cifar10_bin(d)
    # A hand-made first record in batch 1: red = row*32+col (mod 256), green = 200, blue = 100.
    red = bytes((i * 32 + j) % 256 for i in range(32) for j in range(32))
    record = bytes([7]) + red + bytes([200]) * 1024 + bytes([100]) * 1024
    raw = (d / "data_batch_1.bin").read_bytes()
    (d / "data_batch_1.bin").write_bytes(record + raw[3073:])

    tt = read_cifar("cifar10", tmp_path)  # the parent of cifar-10-batches-bin
    img = tt.train.images[0]
    assert tt.train.labels[0] == 7
    assert img[0, 0, 1] == 1 and img[0, 1, 0] == 32 and img[0, 2, 3] == 67  # row-major red plane
    assert bool((img[1] == 200).all()) and bool((img[2] == 100).all())
    assert tt.train.images.dtype == torch.uint8 and tt.train.images.shape == (20, 3, 32, 32)
    assert torch.equal(tt.train.images[1:], torch.from_numpy(train_x[1:]))
    assert tt.train.labels[1:].tolist() == train_y[1:].tolist()
    assert torch.equal(tt.test.images, torch.from_numpy(test_x))
    assert tt.test.labels.dtype == torch.int64 and tt.test.labels.tolist() == test_y.tolist()
    # The directory holding the batches works as well as its parent.
    direct = read_cifar("cifar10", d)
    assert torch.equal(direct.train.images, tt.train.images)


def test_cifar10_python_layout_matches_arrays(tmp_path: Path) -> None:
    xs, ys = _write_cifar10_py(tmp_path / "cifar-10-batches-py")
    tt = read_cifar("cifar10", tmp_path)
    assert torch.equal(tt.train.images, torch.from_numpy(xs))
    assert tt.train.labels.tolist() == ys.tolist()
    assert tt.test.labels.tolist() == [1, 1, 1, 1]
    assert tt.info.class_names == tuple(f"c{i}" for i in range(10))
    assert tt.info.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert tt.info.std == pytest.approx((0.2470, 0.2435, 0.2616))


def test_binary_and_python_layouts_agree(tmp_path: Path) -> None:
    x, y, _, _ = _write_cifar10_bin(tmp_path / "bin" / "cifar-10-batches-bin", per_file=3)
    py = tmp_path / "py" / "cifar-10-batches-py"
    py.mkdir(parents=True)
    for k in range(5):
        _write_pickle(py / f"data_batch_{k + 1}", {b"data": x[3 * k:3 * k + 3].reshape(3, -1),
                                                   b"labels": y[3 * k:3 * k + 3].tolist()})
    _write_pickle(py / "test_batch", {b"data": x[:3].reshape(3, -1), b"labels": y[:3].tolist()})
    a, b = read_cifar("cifar10", tmp_path / "bin"), read_cifar("cifar10", tmp_path / "py")
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)


def test_cifar100_binary_uses_fine_label(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-binary"
    d.mkdir()
    x = _images(6, 1)
    _write_cifar_bin(d / "train.bin", x, [(i % 20, 50 + i) for i in range(6)])  # (coarse, fine)
    _write_cifar_bin(d / "test.bin", x[:2], [(3, 99), (4, 0)])
    (d / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)) + "\n")
    tt = read_cifar("cifar100", tmp_path)
    assert tt.train.labels.tolist() == [50, 51, 52, 53, 54, 55]
    assert tt.test.labels.tolist() == [99, 0]
    assert torch.equal(tt.train.images, torch.from_numpy(x))
    assert tt.info.num_classes == 100 and tt.info.class_names[7] == "f7"
    assert tt.info.mean == pytest.approx((0.5071, 0.4865, 0.4409))


def test_cifar100_python_uses_fine_labels(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    x = _images(5, 2)
    _write_pickle(d / "train", {b"data": x.reshape(5, -1), b"fine_labels": [10, 20, 30, 40, 99],
                                b"coarse_labels": [1, 2, 3, 4, 5]})
    _write_pickle(d / "test", {b"data": x[:1].reshape(1, -1), b"fine_labels": [5], b"coarse_labels": [0]})
    tt = read_cifar("cifar100", d)
    assert tt.train.labels.tolist() == [10, 20, 30, 40, 99] and tt.test.labels.tolist() == [5]
    assert torch.equal(tt.train.images, torch.from_numpy(x))


def test_truncated_binary_batch_is_a_data_error(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-bin"
    _write_cifar10_bin(d)
    raw = (d / "data_batch_3.bin").read_bytes()
    (d / "data_batch_3.bin").write_bytes(raw[:-10])
    with pytest.raises(DataError, match=r"data_batch_3\.bin"):
        read_cifar("cifar10", tmp_path)


def test_out_of_range_label_is_a_data_error(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-bin"
    _write_cifar10_bin(d)
    raw = bytearray((d / "test_batch.bin").read_bytes())
    raw[0] = 12
    (d / "test_batch.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="labels range"):
        read_cifar("cifar10", tmp_path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (self.marker.touch, ())


def test_python_batch_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil"
    bad.write_bytes(pickle.dumps({b"data": _Exploit(marker)}, protocol=2))
    with pytest.raises(DataError, match="refusing to load global"):
        safe_unpickle(bad)
    assert not marker.exists()


def test_missing_cifar_names_every_place_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as err:
        read_cifar("cifar10", tmp_path / "nowhere")
    msg = str(err.value)
    for place in ("nowhere", "nowhere/cifar-10-batches-bin", "nowhere/cifar-10-batches-py"):
        assert str(tmp_path / place) in msg
    assert "--download" in msg and "--data-dir" in msg
    # A directory with some files missing says which.
    d = tmp_path / "cifar-10-batches-bin"
    _write_cifar10_bin(d)
    (d / "data_batch_4.bin").unlink()
    with pytest.raises(DataError, match=r"missing data_batch_4\.bin"):
        read_cifar("cifar10", tmp_path)
    # Without an explicit directory: $AUTOPRUNE_DATA, else ./data.
    monkeypatch.setenv("AUTOPRUNE_DATA", str(tmp_path / "from_env"))
    with pytest.raises(DataError, match="from_env"):
        load_dataset("cifar10")
    monkeypatch.delenv("AUTOPRUNE_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data/cifar-10-batches-bin"):
        load_dataset("cifar10")


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(ConfigError, match="cifar10"):
        load_dataset("cifar-10")
    assert set(DATASETS.names()) >= {"cifar10", "cifar100", "mnist", "fashion_mnist", "digits"}


# --------------------------------------------------------------------------------------- MNIST


def test_idx_parsing_uint8_and_wider_types() -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(_idx_bytes(a)), a)
    b = np.array([-5, 70000, 3], dtype=np.int32)
    parsed = parse_idx(_idx_bytes(b, code=0x0C, dtype=">i4"))
    assert parsed.tolist() == [-5, 70000, 3]
    with pytest.raises(DataError, match="magic"):
        parse_idx(b"\x01\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="truncated"):
        parse_idx(_idx_bytes(a)[:-1])


def _write_mnist(directory: Path, *, gz: bool, n_train: int = 30, n_test: int = 10) -> tuple[np.ndarray, ...]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), np.arange(n_train) % 10,
              rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), (np.arange(n_test) * 7) % 10)
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    for name, arr in zip(names, arrays, strict=True):
        data = _idx_bytes(arr)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize(("gz", "sub"), [(True, "mnist"), (False, "MNIST/raw"), (True, "")])
def test_mnist_idx_files_gz_or_raw(tmp_path: Path, gz: bool, sub: str) -> None:
    tx, ty, sx, sy = _write_mnist(tmp_path / sub if sub else tmp_path, gz=gz)
    tt = read_mnist("mnist", tmp_path)
    assert tt.train.images.shape == (30, 1, 28, 28) and tt.train.images.dtype == torch.uint8
    assert torch.equal(tt.train.images[:, 0], torch.from_numpy(tx))
    assert tt.train.labels.tolist() == ty.tolist() and tt.test.labels.tolist() == sy.tolist()
    assert torch.equal(tt.test.images[:, 0], torch.from_numpy(sx))
    assert tt.info.mean == (0.1307,) and tt.info.std == (0.3081,) and tt.info.input_shape == (1, 28, 28)


def test_fashion_mnist_and_corrupt_gzip(tmp_path: Path) -> None:
    d = tmp_path / "fashion_mnist"
    _write_mnist(d, gz=True)
    tt = read_mnist("fashion_mnist", tmp_path)
    assert tt.info.class_names[9] == "Ankle boot" and tt.info.mean == pytest.approx((0.2860,))
    data = (d / "train-images-idx3-ubyte.gz").read_bytes()
    (d / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="train-images"):
        read_idx(d / "train-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="Fashion-MNIST not found"):
        read_mnist("fashion_mnist", tmp_path / "empty")


def test_mnist_label_count_mismatch(tmp_path: Path) -> None:
    d = tmp_path / "mnist"
    _write_mnist(d, gz=False)
    (d / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(29, dtype=np.uint8)))
    with pytest.raises(DataError, match="30 images but"):
        read_mnist("mnist", tmp_path)


# -------------------------------------------------------------------------------------- digits


def test_digits_shapes_values_and_fixed_test_split() -> None:
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=1)
    assert a.info.input_shape == (1, 8, 8) and a.info.num_classes == 10
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert len(a.test) == round(0.2 * 1797) and len(a.val) == round(0.1 * (1797 - len(a.test)))
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(torch.unique(a.train.images).tolist()) <= allowed and int(a.train.images.max()) == 255
    assert torch.equal(a.test.images, b.test.images)  # the test split does not depend on the val seed
    assert not torch.equal(a.val.labels, b.val.labels) or not torch.equal(a.val.images, b.val.images)
    counts = a.test.class_counts(10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # 20 % of ~180 per class
    pixels = torch.cat([a.train.images, a.val.images]).double() / 255
    assert a.info.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-9)
    assert a.info.std[0] == pytest.approx(float(pixels.std(unbiased=False)), abs=1e-9)


# --------------------------------------------------------------------------------------- splits


def _tagged(n: int, num_classes: int = 10, seed: int = 0) -> ImageTensorDataset:
    """A dataset whose image i carries its index in the first two pixels (so samples can be identified)."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) // 256
    images[:, 0, 0, 1] = torch.arange(n) % 256
    labels = torch.from_numpy(np.random.default_rng(seed).integers(0, num_classes, n))
    return ImageTensorDataset(images, labels, name="tagged")


def _ids(ds: ImageTensorDataset) -> list[int]:
    return (ds.images[:, 0, 0, 0].long() * 256 + ds.images[:, 0, 0, 1].long()).tolist()


def test_split_is_deterministic_stratified_and_disjoint() -> None:
    ds = _tagged(1000)
    tr, va = train_val_split(ds, 200, seed=3)
    tr2, va2 = train_val_split(ds, 200, seed=3)
    _, va3 = train_val_split(ds, 200, seed=4)
    assert _ids(va) == _ids(va2) and _ids(tr) == _ids(tr2)
    assert _ids(va) != _ids(va3)
    assert len(va) == 200 and len(tr) == 800
    assert not set(_ids(va)) & set(_ids(tr)) and sorted(_ids(va) + _ids(tr)) == list(range(1000))
    assert _ids(tr) == sorted(_ids(tr))  # original order kept
    # Labels travel with their images.
    assert va.labels.tolist() == ds.labels[_ids(va)].tolist()
    full, part = ds.class_counts(10).double(), va.class_counts(10).double()
    assert bool(((part - full * 0.2).abs() < 1.0).all())


def test_split_sizes_fraction_zero_and_errors() -> None:
    ds = _tagged(101)
    assert len(train_val_split(ds, 0.1)[1]) == 10
    tr, va = train_val_split(ds, 0)
    assert len(va) == 0 and len(tr) == 101
    for bad in (-1, 101, 1.0, -0.1, "10", True):
        with pytest.raises(ConfigError):
            train_val_split(ds, bad)  # type: ignore[arg-type]


def test_stratified_indices_and_subset() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_indices(labels, 10, seed=0)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [5, 3, 2]
    assert idx.tolist() == sorted(set(idx.tolist()))
    ds = _tagged(500)
    sub = subset(ds, 50, seed=1)
    assert len(sub) == 50 and _ids(sub) == _ids(subset(ds, 50, seed=1))
    assert set(_ids(sub)) <= set(range(500))
    assert len(subset(ds, 10_000)) == 500


def test_dataset_rejects_wrong_tensors() -> None:
    with pytest.raises(DataError, match="uint8"):
        ImageTensorDataset(torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(DataError, match="3 labels"):
        ImageTensorDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(DataError, match="integer"):
        ImageTensorDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4))


# --------------------------------------------------------------------------------------- loader


def test_loader_shapes_dtypes_range_len_limit() -> None:
    ds = _tagged(103)
    loader = make_loader(ds, 10)
    assert len(loader) == 11
    batches = list(loader)
    assert len(batches) == 11 and batches[-1][0].shape == (3, 1, 4, 4)
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (10, 1, 4, 4)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(x, ds.images[:10].float() / 255)
    assert torch.equal(torch.cat([b[1] for b in batches]), ds.labels)
    assert len(make_loader(ds, 10, drop_last=True)) == 10 and len(list(make_loader(ds, 10, drop_last=True))) == 10
    image, label = ds[5]
    assert torch.equal(image, x[5]) and label == int(y[5])
    limited = make_loader(ds, 10, limit=3)
    assert len(limited) == 3 and len(list(limited)) == 3 and limited.num_samples == 30
    with pytest.raises(ConfigError):
        make_loader(ds, 0)


def test_shuffling_is_seeded_per_epoch() -> None:
    ds = _tagged(64)

    def epoch_ids(loader: object) -> list[int]:
        return [i for x, _ in loader for i in (x[:, 0, 0, 0] * 255 * 256 + x[:, 0, 0, 1] * 255).round().long().tolist()]

    a = make_loader(ds, 16, shuffle=True, seed=5)
    e0, e1 = epoch_ids(a), epoch_ids(a)
    assert sorted(e0) == list(range(64)) and sorted(e1) == list(range(64))
    assert e0 != e1 and e0 != list(range(64))
    b = make_loader(ds, 16, shuffle=True, seed=5)
    assert epoch_ids(b) == e0 and epoch_ids(b) == e1
    b.set_epoch(1)
    assert epoch_ids(b) == e1
    assert epoch_ids(make_loader(ds, 16, shuffle=True, seed=6)) != e0


# --------------------------------------------------------------------------------- augmentation


def test_flip_is_an_exact_mirror() -> None:
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    keep = x.clone()
    out = Augment(padding=0, hflip=True)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8 and torch.equal(x, keep)  # input untouched
    flipped = [bool(torch.equal(o, i.flip(2))) for o, i in zip(out, x, strict=True)]
    same = [bool(torch.equal(o, i)) for o, i in zip(out, x, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 10 < sum(flipped) < 54


def test_crop_is_a_shifted_window_with_zero_fill() -> None:
    x = torch.randint(1, 256, (32, 3, 12, 12), dtype=torch.uint8)  # no zeros inside the images
    out = Augment(padding=4, hflip=False)(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    shifts = set()
    for o, p in zip(out, padded, strict=True):
        matches = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(o, p[:, dy:dy + 12, dx:dx + 12])]
        assert len(matches) == 1
        shifts.add(matches[0])
        dy, dx = matches[0]
        assert int((o == 0).sum()) == 3 * (12 * 12 - (12 - abs(dy - 4)) * (12 - abs(dx - 4)))
    assert len(shifts) > 5
    oy, ox = torch.tensor([0, 8]), torch.tensor([8, 4])
    exact = crop_with_offsets(x[:2], 4, oy, ox)
    assert torch.equal(exact[0], padded[0, :, 0:12, 8:20]) and torch.equal(exact[1], padded[1, :, 8:20, 4:16])


def test_augmenting_loader_is_reproducible_and_leaves_data_alone() -> None:
    ds = _tagged(40)
    ds.images[:, 0, 1:, :] = 200
    before = ds.images.clone()
    a = [x for x, _ in make_loader(ds, 8, shuffle=True, augment=True, seed=2)]
    b = [x for x, _ in make_loader(ds, 8, shuffle=True, augment=True, seed=2)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert torch.equal(ds.images, before)
    plain = [x for x, _ in make_loader(ds, 8, shuffle=True, augment=False, seed=2)]  # same order, no augment
    assert any(not torch.equal(p, q) for p, q in zip(a, plain, strict=True))
    assert all(x.shape == (8, 1, 4, 4) and float(x.max()) <= 1.0 for x in a)


# ------------------------------------------------------------------------------------ real data


def test_real_cifar10(cifar10_dir: Path) -> None:
    splits = load_dataset("cifar10", cifar10_dir, val_size=5000, seed=0)
    labels = torch.cat([splits.train.labels, splits.val.labels])
    assert splits.train.images.shape == (45_000, 3, 32, 32) and len(splits.test) == 10_000
    assert len(splits.train) == 45_000 and len(splits.val) == 5_000
    assert torch.bincount(labels).tolist() == [5000] * 10
    assert splits.test.class_counts(10).tolist() == [1000] * 10
    assert splits.val.class_counts(10).tolist() == [500] * 10
    assert splits.test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    sums = sum(ds.images.numpy().sum(axis=(0, 2, 3), dtype=np.int64) for ds in (splits.train, splits.val))
    means = torch.from_numpy(sums / (50_000 * 32 * 32 * 255))
    assert torch.allclose(means, torch.tensor(splits.info.mean, dtype=torch.float64), atol=1e-3)
    assert splits.info.class_names[:3] == ("airplane", "automobile", "bird")
    x, y = next(iter(make_loader(splits.test, 256)))
    assert x.shape == (256, 3, 32, 32) and x.dtype == torch.float32 and y.tolist()[:3] == [3, 8, 8]
