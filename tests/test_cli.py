"""The command line, end to end: subprocess smoke tests of user-facing behaviour, plus in-process checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoprune import cli
from autoprune.errors import EXIT_USER_ERROR
from autoprune.models import build_model
from autoprune.models.checkpoint import read_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread() -> None:
    torch.set_num_threads(1)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m autoprune.cli ARGS`` in a subprocess (one torch thread: the models are tiny)."""
    env = {**os.environ, "AUTOPRUNE_THREADS": "1"}
    env.pop("AUTOPRUNE_DATA", None)
    return subprocess.run(
        [sys.executable, "-m", "autoprune.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=timeout,
    )


def test_help_lists_the_subcommands() -> None:
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr
    for command in ("quickstart", "train", "evaluate", "list"):
        assert command in res.stdout
    assert "--quiet" in res.stdout and "--version" in res.stdout


def test_unknown_model_exits_2_and_suggests_a_close_match(tmp_path: Path) -> None:
    res = run_cli("train", "--model", "resnet200", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path))
    assert res.returncode == EXIT_USER_ERROR
    assert "error: unknown model 'resnet200'" in res.stderr
    assert "Did you mean 'resnet20'" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["evaluate", "--model", "resnet20", "--dataset", "digits", "--checkpoint", str(tmp_path / "x.pt")])
    assert code == EXIT_USER_ERROR
    assert "does not exist" in capsys.readouterr().err


def test_missing_data_dir_exits_2_and_says_where_it_looked(tmp_path: Path) -> None:
    missing = tmp_path / "no-cifar-here"
    save_checkpoint(tmp_path / "x.pt", build_model("resnet20"), model_name="resnet20")
    res = run_cli("evaluate", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", str(missing),
                  "--checkpoint", str(tmp_path / "x.pt"))  # fmt: skip
    assert res.returncode == EXIT_USER_ERROR
    assert "error:" in res.stderr and str(missing) in res.stderr and "hint:" in res.stderr
    assert "Traceback" not in res.stderr


def test_quickstart_reaches_95_percent_and_its_checkpoint_evaluates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    out = tmp_path / "qs"
    res = run_cli("--quiet", "quickstart", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    test_line = next(line for line in res.stdout.splitlines() if line.startswith("test top-1:"))
    accuracy = float(test_line.split()[2]) / 100
    assert accuracy >= 0.95, res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["top1"] == pytest.approx(accuracy, abs=5e-5)
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 10

    # the checkpoint records its model: evaluate needs no --model and gives the same accuracy (in-process: faster)
    assert cli.main(["evaluate", "--dataset", "digits", "--checkpoint", str(out), "--json", "--per-class", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "small_cnn" and result["format"] == "autoprune"
    assert result["top1"] == pytest.approx(metrics["test"]["top1"])
    assert sorted(result["per_class"]) == [str(i) for i in range(10)]

    # ... and a different model refuses it with a clear message
    assert cli.main(["evaluate", "--model", "resnet20", "--dataset", "digits", "--checkpoint", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "does not fit model resnet20" in err and "--model small_cnn" in err


# ---------------------------------------------------------------------------------- in-process (faster)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("autoprune ")


def test_list_models_and_datasets(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "models"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet20", "resnet56_b", "vgg16_bn", "mobilenetv2", "small_cnn", "module:callable"):
        assert name in out
    assert "akamaster" in out  # one-line help is shown
    assert cli.main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "cifar10" in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == EXIT_USER_ERROR
    assert "usage:" in capsys.readouterr().out


def test_quiet_is_accepted_after_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "datasets", "--quiet"]) == 0
    with pytest.raises(SystemExit) as info:
        cli.main(["list", "datasets", "--bogus"])
    assert info.value.code == 2


def test_train_writes_checkpoint_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    out = tmp_path / "run"
    base = ["-q", "--threads", "1", "train", "--model", "small_cnn", "--dataset", "digits", "--out", str(out),
            "--batch-size", "256", "--val-size", "200", "--seed", "3"]  # fmt: skip
    assert cli.main([*base, "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "val  top-1:" in printed and "test top-1:" in printed and str(out / "checkpoint.pt") in printed
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert cli.main([*base, "--epochs", "2", "--resume"]) == 0
    capsys.readouterr()
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["model_name"] == "small_cnn"
    assert ckpt["model_kwargs"]["in_channels"] == 1 and ckpt["extra"]["dataset"] == "digits"
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["history"]["resumed_from"] == 1 and len(summary["history"]["epochs"]) == 2

    # evaluate re-creates the run's validation split (size 200, seed 3) from what the checkpoint records
    assert (
        cli.main(["-q", "evaluate", "--dataset", "digits", "--checkpoint", str(out), "--split", "val", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 200
    assert result["top1"] == pytest.approx(summary["val"]["top1"])


def test_train_initialised_from_a_wrong_checkpoint_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_checkpoint(tmp_path / "r20.pt", build_model("resnet20"), model_name="resnet20")
    code = cli.main(["-q", "train", "--model", "small_cnn", "--dataset", "digits", "--epochs", "1",
                     "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "r20.pt")])  # fmt: skip
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: autoprune checkpoint") and "hint:" in err


def test_keyboard_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import autoprune.commands.list as list_command

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(list_command, "run", interrupted)
    assert cli.main(["list"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_an_unimportable_command_does_not_break_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "no_such_command_module"])
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "no_such_command_module" in capsys.readouterr().out
    assert cli.main(["list", "datasets"]) == 0
    capsys.readouterr()
    assert cli.main(["no_such_command_module"]) == EXIT_USER_ERROR
    assert "cannot be loaded" in capsys.readouterr().err
