"""Your own data through the whole command line, in subprocesses: ``train``, ``search``, ``export`` on an image
folder (and the exported model reloaded without any model code), ``train`` and ``search`` on a
``package.module:callable`` dataset, and ``list datasets``.

The data are tiny generated PNGs (3 classes × 8 images of 12×12, each class a different saturated colour
channel) written into ``tmp_path``; the model is ``small_cnn`` at width 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from autoprune import cli
from autoprune.data import load_dataset, make_loader
from autoprune.serialize import load_module

CLASSES = ("cat", "dog", "eel")


def write_folder(root: Path, n: int = 8, size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            arr[..., c] = 255
            Image.fromarray(arr).save(folder / f"{i}.png")
    return root


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTOPRUNE_THREADS": "1"}
    env.pop("AUTOPRUNE_DATA", None)
    return subprocess.run([sys.executable, "-m", "autoprune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def campaign(tmp_path: Path, name: str, dataset: dict[str, Any], **patch: Any) -> Path:
    data: dict[str, Any] = {
        "name": name,
        "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "dataset": {"batch_size": 8, **dataset},
        "evaluator": {"name": "adaptive_bn", "kwargs": {"batches": 2}},
        "objective": {"budget": {"macs": 0.7}},
        "searcher": {"name": "random"},
        "n_trials": 3,
        "output_dir": f"results/{name}",
        "export": {"finetune": "fixed", "epochs": 1, "lr": 0.01, "formats": [], "latency": False,
                   "calibration_batches": 2},
    }
    data.update(patch)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_image_folder_train_search_export_and_reload(tmp_path: Path) -> None:
    write_folder(tmp_path / "photos")
    r = run_cli("train", "--model", "small_cnn", "--dataset", "image_folder", "--data-dir", "photos", "--epochs", "3",
                "--batch-size", "8", "--out", "dense", "--data-option", "image_size=12", "--data-option", "hflip=false",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "test top-1:" in r.stdout and (tmp_path / "dense" / "checkpoint.pt").is_file()

    options = {"image_size": 12, "hflip": False}
    cfg = campaign(tmp_path, "mine", {"name": "image_folder", "data_dir": "photos", "kwargs": options},
                   model={"name": "small_cnn", "checkpoint": "dense/checkpoint.pt"})
    r = run_cli("search", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "results" / "mine"
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["dataset"]["kwargs"] == options

    r = run_cli("export", str(out), "--trial", "best", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "reload check passed" in r.stdout
    (export_json,) = out.glob("export/*/export.json")
    metrics = json.loads(export_json.read_text())

    # the exported model loads without any model code and reproduces its test accuracy on the image folder
    model = load_module(export_json.parent / "model").eval()
    splits = load_dataset("image_folder", tmp_path / "photos", options=options)
    correct = 0
    with torch.no_grad():
        for x, y in make_loader(splits.test, 64):
            correct += int((model(x).argmax(1) == y).sum())
    assert correct / len(splits.test) == pytest.approx(metrics["exported"]["test_accuracy"], abs=1e-9)
    # the model's normalize layer holds the training split's statistics
    norm = dict(model.named_buffers())
    mean = next(v for k, v in norm.items() if k.endswith("mean"))
    assert mean.flatten().tolist() == pytest.approx(list(splits.info.mean), abs=1e-6)

    # a changed dataset option is a different campaign: refused with a clear error, nothing touched
    changed = campaign(tmp_path, "mine", {"name": "image_folder", "data_dir": "photos",
                                          "kwargs": {"image_size": 10}})
    r = run_cli("search", str(changed), cwd=tmp_path)
    assert r.returncode == 2 and "error:" in r.stderr and "dataset" in r.stderr


def test_data_options_on_the_command_line(tmp_path: Path) -> None:
    write_folder(tmp_path / "photos", size=14)
    r = run_cli("train", "--model", "small_cnn", "--dataset", "image_folder", "--data-dir", "photos", "--epochs", "1",
                "--out", "dense", "--data-option", "image_sise=10", cwd=tmp_path)
    assert r.returncode == 2 and "image_size" in r.stderr and "hint:" in r.stderr  # options reach the dataset
    r = run_cli("train", "--model", "small_cnn", "--dataset", "image_folder", "--data-dir", "photos", "--epochs", "1",
                "--out", "dense", "--data-option", "image_size", cwd=tmp_path)
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr and "Traceback" not in r.stderr


def test_callable_dataset_trains_and_searches_and_bad_input_exits_2(tmp_path: Path) -> None:
    (tmp_path / "mydata.py").write_text(textwrap.dedent('''
        import torch

        def load(n=60, seed=0):
            g = torch.Generator().manual_seed(seed)
            y = torch.arange(n) % 3
            x = torch.rand(n, 3, 8, 8, generator=g) * 0.4
            x[torch.arange(n), y] += 0.6
            return {"train": (x, y), "test": (x[:12], y[:12]), "classes": ["r", "g", "b"]}
    '''))
    r = run_cli("train", "--model", "small_cnn", "--dataset", "mydata:load", "--epochs", "1", "--batch-size", "16",
                "--out", "dense", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "test top-1:" in r.stdout

    cfg = campaign(tmp_path, "call", {"name": "mydata:load", "kwargs": {"n": 45}}, n_trials=2)
    r = run_cli("search", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    bad = campaign(tmp_path, "bad", {"name": "mydata:lod"})
    r = run_cli("search", str(bad), cwd=tmp_path)
    assert r.returncode == 2 and "error:" in r.stderr and "has no attribute 'lod'" in r.stderr and "load" in r.stderr
    missing = campaign(tmp_path, "missing", {"name": "image_folder", "data_dir": "nowhere"})
    r = run_cli("search", str(missing), cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr and "hint: set dataset.data_dir" in r.stderr


def test_list_datasets_shows_image_folder(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "image_folder" in out and "DIR/train/<class>" in out
