"""Checkpoints: our format round-trips, akamaster and plain state dicts load, bad files give CheckpointError."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.errors import CheckpointError
from autoprune.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from autoprune.models.checkpoint import (
    FORMAT_MARKER,
    checkpoint_metadata,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    to_plain,
)


class _RunsCode:
    """Unpickling this would call a function: weights_only must refuse it."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (os.getcwd, ())


def _small(**kw: object) -> nn.Module:
    return build_model("small_cnn", in_channels=1, width=4, **kw)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_own_format_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = _small(mean=[0.3], std=[0.4])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 1, 8, 8)).sum().backward()
    opt.step()
    kwargs = {"in_channels": 1, "width": 4, "mean": [0.3], "std": [0.4]}
    path = save_checkpoint(
        tmp_path / "sub" / "c.pt",
        model,
        model_name="small_cnn",
        model_kwargs=kwargs,
        epoch=3,
        optimizer=opt,
        extra={"note": "hi", "acc": np.float32(0.5), "version": torch.__version__},
    )
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT_MARKER and raw["version"] == 1
    assert not list(path.parent.glob("*.tmp")), "temporary file left behind"

    fresh = _small()  # default normalisation; the checkpoint's must win
    meta = load_checkpoint(fresh, path)
    assert _same_weights(model, fresh)
    assert meta["format"] == "autoprune" and meta["model_name"] == "small_cnn" and meta["epoch"] == 3
    assert meta["model_kwargs"] == kwargs and meta["normalize"] == "checkpoint"
    assert meta["extra"] == {"note": "hi", "acc": 0.5, "version": str(torch.__version__)}
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(meta["optimizer"])
    assert torch.equal(
        opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )

    rebuilt = build_model(meta["model_name"], **meta["model_kwargs"])
    load_checkpoint(rebuilt, path)
    assert _same_weights(model, rebuilt)
    info = checkpoint_metadata(path)
    assert info["model_name"] == "small_cnn" and "optimizer" not in info


def test_directory_with_checkpoint_is_accepted(tmp_path: Path) -> None:
    model = _small()
    save_checkpoint(tmp_path / "checkpoint.pt", model, model_name="small_cnn")
    assert load_checkpoint(_small(), tmp_path)["path"].endswith("checkpoint.pt")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="directory without a checkpoint"):
        load_checkpoint(_small(), empty)


def test_save_refuses_unsafe_extra(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="ndarray"):
        save_checkpoint(tmp_path / "c.pt", _small(), model_name="x", extra={"a": np.zeros(3)})
    assert not (tmp_path / "c.pt").exists()
    assert to_plain({"t": (1, 2.0, "s")}) == {"t": (1, 2.0, "s")}


def test_akamaster_format_strips_prefix_and_sets_imagenet_stats(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build_model("resnet20")
    state = {f"module.{k}": v for k, v in src.state_dict().items() if "num_batches" not in k and "normalize" not in k}
    torch.save({"state_dict": state, "best_prec1": 91.5}, tmp_path / "r20.th")
    dst = build_model("resnet20", mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5])
    meta = load_checkpoint(dst, tmp_path / "r20.th")
    assert meta["format"] == "akamaster" and meta["best_prec1"] == pytest.approx(91.5)
    assert meta["normalize"] == "imagenet" and meta["missing"] == [] and meta["unexpected"] == []
    torch.testing.assert_close(dst.normalize.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(dst.normalize.std.flatten(), torch.tensor(IMAGENET_STD))
    assert torch.equal(dst.layer3[2].conv2.weight, src.layer3[2].conv2.weight)


def test_real_akamaster_checkpoint_metadata(weights_dir: Path) -> None:
    model = build_model("resnet20")
    meta = load_checkpoint(model, weights_dir / "resnet20-12fca82f.th", model_name="resnet20")
    assert meta["format"] == "akamaster" and meta["normalize"] == "imagenet"
    assert meta["best_prec1"] == pytest.approx(91.78, abs=0.01)


def test_plain_state_dict_keeps_model_normalisation(tmp_path: Path) -> None:
    src = _small()
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("normalize.")}, tmp_path / "sd.pt")
    dst = _small(mean=[0.7], std=[0.2])
    meta = load_checkpoint(dst, tmp_path / "sd.pt")
    assert meta["format"] == "state_dict" and meta["normalize"] == "model"
    torch.testing.assert_close(dst.normalize.mean.flatten(), torch.tensor([0.7]))
    assert torch.equal(dst.classifier.weight, src.classifier.weight)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(_small(), tmp_path / "nope.pt")
    assert info.value.hint


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a checkpoint", bytes(range(256)) * 8, "truncated"],
    ids=["empty", "text", "random", "truncated"],
)
def test_corrupt_or_truncated_file(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "bad.pt"
    if content == "truncated":
        torch.save(_small().state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(path) in info.value.message
    assert "corrupt" in info.value.message or "truncated" in info.value.message


def test_pickle_with_code_is_refused_not_run(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refusing to load") as info:
        load_checkpoint(_small(), path)
    assert "getcwd" in info.value.message
    assert "state_dict" in (info.value.hint or "")


def test_unknown_layout(tmp_path: Path) -> None:
    torch.save({"weights": [1, 2, 3]}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="known layout"):
        load_checkpoint(_small(), tmp_path / "odd.pt")


def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", build_model("resnet20"), model_name="resnet20")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_model("resnet32"), tmp_path / "c.pt", model_name="resnet32")
    msg = info.value.message
    assert "missing keys: 60 (layer1.3." in msg and "and 55 more" in msg
    assert "--model resnet20" in (info.value.hint or "")


def test_wrong_architecture_of_a_plain_state_dict_suggests_the_zoo_model(tmp_path: Path) -> None:
    torch.save(build_model("resnet20_b").state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_model("resnet20"), tmp_path / "sd.pt")
    assert "unexpected keys: 10 (layer2.0.shortcut.0.weight" in info.value.message
    assert "resnet20_b" in (info.value.hint or "")


def test_shape_mismatch_is_reported_even_when_not_strict(tmp_path: Path) -> None:
    torch.save(build_model("resnet20", num_classes=100).state_dict(), tmp_path / "c100.pt")
    model = build_model("resnet20")
    before = model.conv1.weight.clone()
    for strict in (True, False):
        with pytest.raises(CheckpointError, match=r"linear.weight: checkpoint \(100, 64\) vs model \(10, 64\)"):
            load_checkpoint(model, tmp_path / "c100.pt", strict=strict)
    assert torch.equal(model.conv1.weight, before), "a failed load must not change the model"


def test_non_strict_reports_missing_keys(tmp_path: Path) -> None:
    state = build_model("resnet20").state_dict()
    del state["linear.weight"]
    state["extra.thing"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pt")
    meta = load_checkpoint(build_model("resnet20"), tmp_path / "partial.pt", strict=False)
    assert meta["missing"] == ["linear.weight"] and meta["unexpected"] == ["extra.thing"]
