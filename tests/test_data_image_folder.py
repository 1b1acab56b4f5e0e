"""Your own data: the ``image_folder`` dataset and ``package.module:callable`` datasets.

Tiny PNG folders (3 classes × 8 images of 12×12) are written with Pillow into ``tmp_path``; dataset callables
are written as a module into ``tmp_path`` and imported from there.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoprune.config import config_from_dict
from autoprune.data import (
    ImageTensorDataset,
    augment_for_size,
    channel_stats,
    check_dataset_name,
    load_dataset,
    make_loader,
)
from autoprune.data.image_folder import TEST_SEED, FolderOptions, decode_image, read_image_folder
from autoprune.errors import ConfigError, DataError

CLASSES = ("cat", "dog", "eel")


def write_folder(root: Path, split: str = "train", *, classes: Sequence[str] = CLASSES, n: int = 8,
                 size: tuple[int, int] = (12, 12), seed: int = 0, value: int | None = None) -> Path:
    """``n`` random RGB PNGs of ``size`` (width, height) per class; class ``c`` has channel ``c % 3`` at 255."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            arr[..., c % 3] = 255
            if value is not None:
                arr[:] = value
            Image.fromarray(arr).save(folder / f"img{i:02d}.png")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "data")


# ------------------------------------------------------------------------------------------------ splits


def test_train_only_folder_is_split_stratified_and_seeded(folder: Path) -> None:
    a = load_dataset("image_folder", folder, seed=0)
    b = load_dataset("image_folder", folder, seed=0)
    c = load_dataset("image_folder", folder, seed=1)
    assert a.info.class_names == CLASSES and a.info.num_classes == 3 and a.info.input_shape == (3, 12, 12)
    # 24 images: 20 % test (5) held out with a fixed seed, then 10 % of the 19 left (2) for validation
    assert (len(a.train), len(a.val), len(a.test)) == (17, 2, 5)
    assert a.test.class_counts(3).tolist() in ([2, 2, 1], [2, 1, 2], [1, 2, 2])
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert torch.equal(a.test.images, c.test.images)  # the test hold-out does not move with the seed
    assert not torch.equal(a.val.images, c.val.images)  # the validation draw does
    everything = torch.cat([a.train.images, a.val.images, a.test.images])
    assert len({bytes(img.flatten().tolist()) for img in everything}) == 24  # disjoint and complete
    assert a.train.images.dtype == torch.uint8 and a.train.labels.dtype == torch.int64
    assert TEST_SEED == 0


def test_val_size_and_test_size_are_counts_or_fractions(folder: Path) -> None:
    s = load_dataset("image_folder", folder, val_size=6, options={"test_size": 3})
    assert (len(s.train), len(s.val), len(s.test)) == (15, 6, 3)
    assert s.val.class_counts(3).tolist() == [2, 2, 2] and s.test.class_counts(3).tolist() == [1, 1, 1]
    s = load_dataset("image_folder", folder, val_size=0.5, options={"test_size": 0.25})
    assert (len(s.test), len(s.val), len(s.train)) == (6, 9, 9)


def test_val_and_test_folders_are_used_as_given(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d")
    write_folder(root, "val", n=2, seed=1)
    write_folder(root, "test", n=3, seed=2)
    s = load_dataset("image_folder", root, seed=5)
    assert (len(s.train), len(s.val), len(s.test)) == (24, 6, 9)
    assert s.val.class_counts(3).tolist() == [2, 2, 2] and s.test.class_counts(3).tolist() == [3, 3, 3]
    expected = np.asarray(Image.open(root / "test" / "dog" / "img00.png")).transpose(2, 0, 1)
    assert torch.equal(s.test.images[3], torch.from_numpy(np.ascontiguousarray(expected)))
    with pytest.raises(ConfigError, match=r"own validation split") as info:
        load_dataset("image_folder", root, val_size=0.1)
    assert "remove val_size" in str(info.value)
    with pytest.raises(ConfigError, match=r"test_size.*is the test set"):
        load_dataset("image_folder", root, options={"test_size": 0.2})


def test_only_a_val_folder_still_holds_out_a_test_split(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d")
    write_folder(root, "val", n=1, seed=1)
    s = load_dataset("image_folder", root)
    assert (len(s.train), len(s.val), len(s.test)) == (19, 3, 5)


def test_classes_are_sorted_folder_names_and_hidden_or_other_files_are_skipped(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d", classes=("b", "a", "C"), n=3)
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / ".hidden.png").write_bytes(b"junk")
    (root / "train" / ".git").mkdir()
    nested = root / "train" / "a" / "more"
    nested.mkdir()
    Image.new("RGB", (12, 12), (1, 2, 3)).save(nested / "deep.PNG")
    s = read_image_folder(root, test_size=1)
    assert s.info.class_names == ("C", "a", "b")
    counts = torch.cat([s.train.labels, s.test.labels]).bincount().tolist()
    assert counts == [3, 4, 3]  # "a" has its three images plus the nested one


# ------------------------------------------------------------------------------------------- size, colour


def test_image_size_resizes_the_shorter_side_and_crops_the_centre(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for c, name in enumerate(CLASSES):
        (root / "train" / name).mkdir(parents=True)
        for i in range(4):
            w, h = (24, 12) if i % 2 else (12, 20)  # landscape and portrait
            arr = np.zeros((h, w, 3), dtype=np.uint8)
            arr[..., c] = 200  # the class colour everywhere ...
            if w > h:
                arr[:, : w // 4] = 0  # ... except black borders that the centre crop removes
                arr[:, -(w // 4):] = 0
            Image.fromarray(arr).save(root / "train" / name / f"{i}.png")
    with pytest.raises(DataError, match=r"differ in size") as info:
        load_dataset("image_folder", root)
    assert "image_size" in str(info.value)
    s = load_dataset("image_folder", root, options={"image_size": 6})
    assert s.info.input_shape == (3, 6, 6)
    every = torch.cat([s.train.images, s.val.images, s.test.images])
    labels = torch.cat([s.train.labels, s.val.labels, s.test.labels])
    for img, y in zip(every, labels, strict=True):
        assert int(img[int(y)].min()) >= 150 and int(img.sum(0).max()) <= 210  # only the class colour survives
    s = load_dataset("image_folder", root, options={"image_size": [4, 8]})
    assert s.info.input_shape == (3, 4, 8)


def test_cover_crop_keeps_the_centre_exactly(tmp_path: Path) -> None:
    arr = np.arange(10 * 20, dtype=np.uint8).reshape(10, 20)
    Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
    out = decode_image(tmp_path / "g.png", size=(10, 10), channels=1)  # no scaling needed: a pure crop
    assert np.array_equal(out[0], arr[:, 5:15])
    assert decode_image(tmp_path / "g.png", channels=1).shape == (1, 10, 20)


def test_mean_and_std_come_from_the_training_split_only(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d")
    write_folder(root, "val", n=2, value=0)  # black validation and white test images
    write_folder(root, "test", n=2, value=255)
    s = load_dataset("image_folder", root)
    x = s.train.images.double() / 255
    assert s.info.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert s.info.std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)
    # carved validation split: the statistics leave its images out too
    root2 = write_folder(tmp_path / "e")
    s2 = load_dataset("image_folder", root2, val_size=0.5)
    assert s2.info.mean == pytest.approx(channel_stats(s2.train.images)[0], abs=1e-15)
    both = torch.cat([s2.train.images, s2.val.images])
    assert s2.info.mean != pytest.approx(channel_stats(both)[0], abs=1e-6)


def test_channel_stats_is_exact_and_independent_of_chunking() -> None:
    x = torch.randint(0, 256, (37, 3, 5, 4), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=5)
    ref = x.double() / 255
    assert mean == pytest.approx(ref.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(ref.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)
    assert channel_stats(x, chunk=1000) == (mean, std)


def test_grayscale_rgba_and_palette_images(tmp_path: Path) -> None:
    root = tmp_path / "d"
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(5):
            rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            kinds = [Image.fromarray(rgb), Image.fromarray(rgb[..., 0], mode="L"),
                     Image.fromarray(np.dstack([rgb, np.full((12, 12), 7, np.uint8)]), mode="RGBA"),
                     Image.fromarray(rgb).convert("P"), Image.fromarray(rgb).convert("LA")]
            kinds[i].save(root / "train" / name / f"{i}.png")
    rgb3 = load_dataset("image_folder", root, val_size=0, options={"test_size": 2})
    assert rgb3.info.input_shape == (3, 12, 12)
    gray = load_dataset("image_folder", root, val_size=0, options={"test_size": 2, "channels": 1})
    assert gray.info.input_shape == (1, 12, 12) and len(gray.info.mean) == 1
    # a grayscale file read as RGB has three equal channels; an RGBA file keeps its colours (alpha dropped)
    path_l, path_rgba = root / "train" / "a" / "1.png", root / "train" / "a" / "2.png"
    as_rgb = decode_image(path_l, channels=3)
    assert torch.equal(torch.from_numpy(as_rgb[0]), torch.from_numpy(as_rgb[2]))
    rgba = np.asarray(Image.open(path_rgba))
    assert np.array_equal(decode_image(path_rgba, channels=3), rgba[..., :3].transpose(2, 0, 1))
    assert np.array_equal(decode_image(path_rgba, channels=1)[0],
                          np.asarray(Image.open(path_rgba).convert("RGB").convert("L")))


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path: Path) -> None:
    arr = (np.arange(144, dtype=np.uint16).reshape(12, 12) * 455)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out = decode_image(tmp_path / "g16.png", channels=1)
    assert np.array_equal(out[0], (arr >> 8).astype(np.uint8))


# ------------------------------------------------------------------------------------------- augmentation


def test_augmentation_scales_with_the_image_size(folder: Path) -> None:
    assert [augment_for_size(s, s).padding for s in (32, 28, 8, 12, 224, 2)] == [4, 4, 1, 2, 28, 1]
    assert augment_for_size(20, 64).padding == 2
    s = load_dataset("image_folder", folder)
    assert s.train.augment is not None and s.train.augment.padding == 2 and s.train.augment.hflip
    s = load_dataset("image_folder", folder, options={"hflip": False, "crop_padding": 0})
    assert s.train.augment is not None and (s.train.augment.padding, s.train.augment.hflip) == (0, False)
    # a dataset without its own augmentation gets the size-scaled recipe (32×32: exactly CIFAR's)
    ds = ImageTensorDataset(torch.randint(0, 256, (6, 3, 10, 20), dtype=torch.uint8),
                            torch.zeros(6, dtype=torch.int64))
    loader = make_loader(ds, 3, shuffle=True, augment=True)
    assert loader.augment is not None and loader.augment.padding == 1
    assert all(x.shape == (3, 3, 10, 20) for x, _ in loader)


# ------------------------------------------------------------------------------------------------ errors


def test_missing_data_dir_and_missing_train_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist") as info:
        load_dataset("image_folder", tmp_path / "nowhere")
    assert "--data-dir" in str(info.value) and "train/<class>" in str(info.value)
    write_folder(tmp_path / "flat", "", n=1)  # class folders directly in DIR
    with pytest.raises(DataError, match=r"no training folder") as info:
        load_dataset("image_folder", tmp_path / "flat")
    assert "cat, dog, eel" in str(info.value) and "move them into a train/ folder" in str(info.value)


def test_empty_class_is_named(folder: Path) -> None:
    (folder / "train" / "fox").mkdir()
    (folder / "train" / "fox" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"contain no images") as info:
        load_dataset("image_folder", folder)
    assert str(folder / "train" / "fox") in str(info.value)


def test_corrupt_and_truncated_files_are_named_with_their_path(folder: Path) -> None:
    bad = folder / "train" / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    good = (folder / "train" / "eel" / "img00.png").read_bytes()
    cut = folder / "train" / "eel" / "cut.png"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"2 image file") as info:
        load_dataset("image_folder", folder)
    msg = str(info.value)
    assert str(bad) in msg and str(cut) in msg and "hint:" in msg


def test_mismatched_class_sets_between_splits(folder: Path) -> None:
    write_folder(folder, "val", classes=("cat", "dog", "fox"), n=1)
    with pytest.raises(DataError, match=r"class folders of .*val differ") as info:
        load_dataset("image_folder", folder)
    assert "missing eel" in str(info.value) and "extra fox" in str(info.value)


def test_split_sizes_must_agree_and_loose_images_are_refused(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d")
    write_folder(root, "test", n=1, size=(10, 10))
    with pytest.raises(DataError, match=r"10×10.*12×12"):
        load_dataset("image_folder", root)
    assert load_dataset("image_folder", root, options={"image_size": 8}).info.input_shape == (3, 8, 8)
    Image.new("RGB", (12, 12)).save(root / "train" / "stray.png")
    with pytest.raises(DataError, match=r"outside any class folder"):
        load_dataset("image_folder", root)


@pytest.mark.parametrize(("options", "match"), [
    ({"imagesize": 32}, "Did you mean 'image_size'"),
    ({"image_size": 0}, "image_size=0"),
    ({"image_size": [8, 8, 8]}, "image_size"),
    ({"channels": 4}, "channels=4"),
    ({"test_size": 1.5}, "test_size=1.5"),
    ({"hflip": "yes"}, "hflip"),
    ({"crop_padding": -1}, "crop_padding"),
])
def test_bad_options_are_config_errors(folder: Path, options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_dataset("image_folder", folder, options=options)


def test_test_size_too_large_and_builtin_datasets_take_no_options(folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"test_size"):
        load_dataset("image_folder", folder, options={"test_size": 24})
    with pytest.raises(ConfigError, match=r"takes no options"):
        load_dataset("digits", options={"image_size": 8})
    with pytest.raises(ConfigError, match=r"^dataset.kwargs: dataset 'digits' takes no options"):
        check_dataset_name("digits", {"image_size": 8})
    with pytest.raises(ConfigError, match=r"^dataset.kwargs: .*Did you mean 'image_size'"):
        check_dataset_name("image_folder", {"image_sise": 8})
    with pytest.raises(ConfigError, match=r"dataset.name: unknown dataset 'image_folders'.*image_folder"):
        check_dataset_name("image_folders")
    check_dataset_name("image_folder", {"image_size": 8})
    assert FolderOptions.parse(image_size=[3, 5]).image_size == (3, 5)


def test_config_accepts_dataset_kwargs() -> None:
    cfg = config_from_dict({"name": "x", "model": {"name": "small_cnn"},
                            "dataset": {"name": "image_folder", "data_dir": "photos",
                                        "kwargs": {"image_size": 32, "channels": 1}}})
    assert cfg.dataset.kwargs == {"image_size": 32, "channels": 1}
    assert config_from_dict({"name": "x", "model": {"name": "small_cnn"},
                             "dataset": {"name": "digits"}}).dataset.kwargs == {}
    with pytest.raises(ConfigError, match=r"dataset.kwargs"):
        config_from_dict({"name": "x", "model": {"name": "small_cnn"},
                          "dataset": {"name": "digits", "kwargs": [1]}})


# ------------------------------------------------------------------------------------ callable datasets

MODULE = '''
import numpy as np
import torch
from torch.utils.data import Dataset

from autoprune.data import DataSplits, DatasetInfo, ImageTensorDataset

CALLS = []


def _xy(n, seed, c=3, h=6, w=6, k=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g), torch.arange(n) % k


class Items(Dataset):
    def __init__(self, n, seed, shape=(3, 6, 6)):
        self.x, self.y = _xy(n, seed, *shape)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def as_mapping(scale=1.0, data_dir=None, seed=None):
    CALLS.append({"scale": scale, "data_dir": data_dir, "seed": seed})
    return {"train": _xy(30, 0), "test": _xy(9, 1), "classes": ["r", "g", "b"]}


def as_tuple():
    return (Items(30, 0), Items(6, 2), [(np.zeros((3, 6, 6), np.uint8) + i, i % 3) for i in range(6)])


def as_tuple_gray():
    g = [(np.full((6, 6), 25 * i, np.uint8), i % 3) for i in range(9)]
    return (g, None, g[:3])


def as_splits():
    def ds(n):
        return ImageTensorDataset(torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8), torch.arange(n) % 2)
    info = DatasetInfo("mine", 2, (1, 4, 4), (0.5,), (0.25,), ("x", "y"))
    return DataSplits(ds(10), ds(4), ds(4), info)


def takes_kwargs(**kw):
    CALLS.append(kw)
    return as_mapping()


def no_test():
    return {"train": _xy(10, 0)}


def unknown_key():
    return {"train": _xy(10, 0), "test": _xy(3, 1), "labels": [1]}


def wrong_type():
    return 42


def normalised():
    x, y = _xy(10, 0)
    return {"train": ((x - 0.5) / 0.25, y), "test": _xy(3, 1)}


def channel_last():
    return {"train": (torch.rand(10, 6, 6, 3), torch.arange(10) % 3), "test": _xy(3, 1)}


def label_out_of_range():
    x, y = _xy(10, 0)
    return {"train": (x, y), "test": _xy(3, 1), "classes": ["a", "b"]}


def shapes_differ():
    return {"train": _xy(10, 0), "test": _xy(3, 1, h=5)}


def empty_train():
    return {"train": (torch.zeros(0, 3, 6, 6), torch.zeros(0, dtype=torch.int64)), "test": _xy(3, 1)}


def bad_item():
    return (Items(6, 0), None, [torch.zeros(3, 6, 6)])


def float_label():
    return ([(torch.zeros(3, 6, 6), 0.5)], None, [(torch.zeros(3, 6, 6), 0)])


def needs_arg(required):
    return as_mapping()


def boom():
    raise RuntimeError("the user's loader failed")


not_callable = 3
'''


@pytest.fixture
def owndata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of a fresh module in ``tmp_path`` holding dataset callables (imported from the working directory)."""
    name = f"owndata_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def test_callable_returning_a_mapping(owndata: str) -> None:
    s = load_dataset(f"{owndata}:as_mapping", "some/dir", seed=4, options={"scale": 2.0})
    assert sys.modules[owndata].CALLS == [{"scale": 2.0, "data_dir": "some/dir", "seed": 4}]
    assert s.info.class_names == ("r", "g", "b") and s.info.input_shape == (3, 6, 6)
    assert s.info.name == f"{owndata}:as_mapping"
    assert (len(s.train), len(s.val), len(s.test)) == (27, 3, 9)  # 10 % validation carved, seeded
    x, _ = sys.modules[owndata]._xy(30, 0)
    assert torch.equal(torch.cat([s.train.images, s.val.images]).sort(0).values,
                       torch.round(x * 255).to(torch.uint8).sort(0).values)
    assert s.info.mean == pytest.approx(channel_stats(s.train.images)[0])
    again = load_dataset(f"{owndata}:as_mapping", seed=4, options={"scale": 2.0})
    assert torch.equal(again.val.images, s.val.images)


def test_callable_returning_a_tuple_of_datasets_and_lists(owndata: str) -> None:
    s = load_dataset(f"{owndata}:as_tuple")
    assert (len(s.train), len(s.val), len(s.test)) == (30, 6, 6)
    assert s.info.class_names == ("0", "1", "2") and s.info.input_shape == (3, 6, 6)
    g = load_dataset(f"{owndata}:as_tuple_gray", val_size=3)
    assert g.info.input_shape == (1, 6, 6) and (len(g.train), len(g.val)) == (6, 3)
    with pytest.raises(ConfigError, match=r"own validation split"):
        load_dataset(f"{owndata}:as_tuple", val_size=0.1)


def test_callable_returning_datasplits_keeps_its_info(owndata: str) -> None:
    s = load_dataset(f"{owndata}:as_splits")
    assert s.info.name == "mine" and s.info.mean == (0.5,) and s.info.class_names == ("x", "y")
    assert len(s.val) == 4


def test_callable_with_var_kwargs_gets_data_dir_and_seed(owndata: str) -> None:
    load_dataset(f"{owndata}:takes_kwargs", seed=2, options={"a": 1})
    assert sys.modules[owndata].CALLS[0] == {"a": 1, "data_dir": None, "seed": 2}


@pytest.mark.parametrize(("attr", "error", "match"), [
    ("no_test", DataError, "returned no test split"),
    ("unknown_key", DataError, "unknown key.*labels"),
    ("wrong_type", DataError, "returned a int, not its splits"),
    ("normalised", DataError, "(?s)outside \\[0, 1\\].*not normalised"),
    ("channel_last", DataError, "looks channel-last"),
    ("label_out_of_range", DataError, "label 2, but there are 2 classes"),
    ("shapes_differ", DataError, "split 'test' has images of shape"),
    ("empty_train", DataError, "split 'train'.* is empty"),
    ("bad_item", DataError, "split 'test', item 0: expected an \\(image, label\\) pair"),
    ("float_label", DataError, "item 0: the label is 0.5"),
    ("needs_arg", ConfigError, "cannot be called with.*required"),
    ("not_callable", ConfigError, "not callable"),
    ("missing", ConfigError, "has no attribute 'missing'"),
])
def test_callable_contract_errors(owndata: str, attr: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        load_dataset(f"{owndata}:{attr}")
    if error is DataError and attr not in ("unknown_key", "shapes_differ"):
        assert "hint:" in str(info.value)


def test_callable_import_errors_and_unknown_options(owndata: str) -> None:
    with pytest.raises(ConfigError, match=r"cannot be called with \['bogus'"):
        load_dataset(f"{owndata}:as_tuple", options={"bogus": 1})
    with pytest.raises(ConfigError, match=r"malformed dataset import string"):
        load_dataset(f"{owndata}:")
    with pytest.raises(ConfigError, match=r"module 'no_such_module_xyz' of dataset .* cannot be imported"):
        load_dataset("no_such_module_xyz:load")
    with pytest.raises(RuntimeError, match=r"the user's loader failed"):  # the user's own bug keeps its traceback
        load_dataset(f"{owndata}:boom")
    check_dataset_name(f"{owndata}:as_mapping")  # found, not imported
    with pytest.raises(ConfigError, match=r"dataset.name: cannot find module 'no_such_module_xyz'"):
        check_dataset_name("no_such_module_xyz:load")
    with pytest.raises(ConfigError, match=r"malformed"):
        check_dataset_name("a:b:c")
