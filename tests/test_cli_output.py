"""What the commands print and write for a new user (#23): progress lines when the output is not a terminal,
CPU cost in the shipped configs, plain-text help, honest labels, file permissions, and Optuna parameters for
every searcher.

Everything runs offline on ``small_cnn`` (width 8) and scikit-learn's digits; CLI behaviour is checked in
subprocesses (their stdout is a pipe, as under CI, ``nohup`` or ``tee``), the rest in process.
"""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml

from autoprune import cli, utils
from autoprune.campaign import ProgressBar, open_campaign, run_search, val_caveat, val_label
from autoprune.config import config_from_dict, load_config
from autoprune.export import export_trial, select_trial
from autoprune.helptext import plain_help
from autoprune.models import build_model
from autoprune.models.checkpoint import save_checkpoint
from autoprune.types import Candidate, CostReport, EvalResult, TrialRecord

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)

TRIAL_LINE = re.compile(r"^(?P<desc>\S+ seed\d+) trial (?P<done>\d+)/(?P<total>\d+) \(#\d+\) (?P<state>\w+)"
                        r"(?: \([^)]*\))?: (?:reward -?[\d.]+, )?(?:val acc [\d.]+ %, )?MACs [\d.]+%; "
                        r"(?:best #\d+: .*|no feasible candidate yet); \d+ s$")
EPOCH_LINE = re.compile(r"^fine-tune epoch (?P<epoch>[\d.]+)/(?P<of>[\d.]+) \(step (?P<step>\d+)/(?P<steps>\d+)\): "
                        r"loss [\d.]+, train acc [\d.]+ %, lr [\d.e+-]+, [\d.]+ s")


@pytest.fixture(autouse=True)
def _one_thread_not_quiet() -> Iterator[None]:
    torch.set_num_threads(1)
    before = utils.is_quiet()
    utils.set_quiet(False)  # `cli.main(["-q", ...])` sets it for the process
    yield
    utils.set_quiet(before)


def campaign_dict(out: Path, **patch: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "outtest",
        "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "dataset": {"name": "digits", "batch_size": 32},
        "evaluator": {"name": "adaptive_bn", "kwargs": {"batches": 2}},
        "objective": {"budget": {"macs": 0.5}},
        "searcher": {"name": "random"},
        "n_trials": 3,
        "output_dir": str(out),
        "export": {"finetune": "fixed", "epochs": 1, "lr": 0.02, "formats": [], "latency": False},
    }
    data.update(patch)
    return data


def write_config(path: Path, **patch: Any) -> Path:
    path.write_text(yaml.safe_dump(campaign_dict(path.parent / "results", **patch)))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTOPRUNE_THREADS": "1"}
    env.pop("AUTOPRUNE_DATA", None)
    return subprocess.run([sys.executable, "-m", "autoprune.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


# ---------------------------------------------------------------------------------------------------------
# 3. progress lines when stdout is not a terminal


def test_search_compare_and_export_print_a_line_per_trial_and_epoch(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml")
    res = run_cli("search", str(config), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [m for m in map(TRIAL_LINE.match, res.stdout.splitlines()) if m]
    assert [int(m["done"]) for m in lines] == [1, 2, 3], res.stdout
    assert all(m["desc"] == "random seed0" and m["total"] == "3" and m["state"] == "complete" for m in lines)
    assert "random seed0: 0/3 trials done" in res.stdout
    # what is searched, and how the dense accuracy was measured (item 7)
    assert re.search(r"\d+ channel groups searched, dense [\d,]+ MACs, dense val accuracy [\d.]+ % after "
                     r"batch-norm re-estimation on 2 training batches", res.stderr), res.stderr
    assert "0 layers" not in res.stderr and "bits of" not in res.stderr  # quantization is off: not mentioned
    assert "optimistic" not in res.stderr  # no checkpoint: nothing was trained on the validation images

    quiet = run_cli("--quiet", "search", str(config), "n_trials=4", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert not any(map(TRIAL_LINE.match, quiet.stdout.splitlines())) and "4 trials" in quiet.stdout

    cmp = run_cli("compare", str(config), "--agents", "random", "n_trials=2", cwd=tmp_path)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    descs = [m["desc"] for m in map(TRIAL_LINE.match, cmp.stdout.splitlines()) if m]
    assert descs.count("uniform seed0") == 1 and "random seed0" not in descs  # random: already 4 ≥ 2 trials

    results = tmp_path / "results"
    exp = run_cli("export", str(results), "--epochs", "2", "--out", str(tmp_path / "e2"), cwd=tmp_path)
    assert exp.returncode == 0, exp.stdout + exp.stderr
    epochs = [m for m in map(EPOCH_LINE.match, exp.stdout.splitlines()) if m]
    assert [(m["epoch"], m["of"]) for m in epochs] == [("1", "2"), ("2", "2")], exp.stdout
    assert "exporting random-seed0-trial" in exp.stdout and "test accuracy" in exp.stdout

    short = run_cli("export", str(results), "--epochs", "0.5", "--out", str(tmp_path / "e05"), cwd=tmp_path)
    assert short.returncode == 0, short.stdout + short.stderr
    steps = [int(m["step"]) for m in map(EPOCH_LINE.match, short.stdout.splitlines()) if m]
    assert len(steps) == 4 and steps == sorted(steps), short.stdout  # a quarter of the run each

    silent = run_cli("-q", "export", str(results), "--epochs", "2", "--out", str(tmp_path / "eq"), cwd=tmp_path)
    assert silent.returncode == 0 and not any(map(EPOCH_LINE.match, silent.stdout.splitlines()))


def test_train_prints_a_line_per_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--threads", "1", "train", "--model", "small_cnn", "--dataset", "digits", "--epochs", "2",
            "--batch-size", "256", "--out", str(tmp_path / "run")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("train small_cnn epoch")]
    assert [ln.split(":")[0] for ln in lines] == ["train small_cnn epoch 1/2", "train small_cnn epoch 2/2"]
    assert all(re.search(r"loss [\d.]+, train acc [\d.]+ %, lr [\d.e-]+, val acc .*, [\d.]+ s$", ln) for ln in lines)
    assert cli.main(["-q", *args]) == 0
    assert not [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("train small_cnn epoch")]


class _Stream(io.StringIO):
    """A stdout stand-in that records whether everything written was flushed, and can pretend to be a tty."""

    def __init__(self, tty: bool = False) -> None:
        super().__init__()
        self.tty = tty
        self.unflushed = 0

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.unflushed += len(s)
        return super().write(s)

    def flush(self) -> None:
        self.unflushed = 0
        super().flush()


def test_one_rule_decides_bar_lines_or_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", _Stream(tty=True))
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    assert utils.progress_mode() == "bar"
    with utils.quiet():
        assert utils.progress_mode() == "quiet"
    monkeypatch.setattr(sys, "stdout", _Stream(tty=False))  # | tee, nohup, CI
    assert utils.progress_mode() == "lines"
    monkeypatch.setattr(sys, "stdout", _Stream(tty=True))
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))  # 2> log: no bar into a file
    assert utils.progress_mode() == "lines"


def _record(number: int, accuracy: float, macs: int) -> TrialRecord:
    return TrialRecord(number=number, candidate=Candidate({"g": 4}), cost=CostReport(macs=macs, params=1, bytes=4),
                       result=EvalResult(accuracy=accuracy, loss=0.5), reward=accuracy, searcher="random", seed=0,
                       state="complete", reason="")


def test_progress_lines_are_flushed_and_bars_replace_them(monkeypatch: pytest.MonkeyPatch) -> None:
    class Searcher:
        n_done = 1

    out = _Stream(tty=False)
    monkeypatch.setattr(sys, "stdout", out)
    bar = ProgressBar("random seed0", 5, 0, dense_macs=100)
    with utils.quiet():  # as during run_search: the evaluators' own bars are silenced, the trial lines are not
        bar(Searcher(), _record(0, 0.5, 40))  # type: ignore[arg-type]
    assert out.unflushed == 0
    assert TRIAL_LINE.match(out.getvalue().splitlines()[-1]), out.getvalue()
    utils.progress_line("fine-tune epoch 1/2 (step 3/6): loss 1.0000, train acc 50.00 %, lr 0.1, 1.0 s")
    assert out.unflushed == 0 and out.getvalue().endswith("1.0 s\n")

    tty, err = _Stream(tty=True), _Stream(tty=True)
    monkeypatch.setattr(sys, "stdout", tty)
    monkeypatch.setattr(sys, "stderr", err)
    bar = ProgressBar("random seed0", 5, 0, dense_macs=100)
    bar(Searcher(), _record(0, 0.5, 40))  # type: ignore[arg-type]
    bar.close()
    assert tty.getvalue() == "" and "random seed0" in err.getvalue()  # the bar, on stderr, no lines
    quiet = ProgressBar("random seed0", 5, 0, dense_macs=100, quiet=True)
    quiet(Searcher(), _record(1, 0.6, 40))  # type: ignore[arg-type]
    assert tty.getvalue() == ""


def test_a_resumed_search_counts_the_earlier_trials_in_its_best_so_far(tmp_path: Path) -> None:
    def best_rewards(stdout: str) -> list[float]:
        return [float(re.search(r"best #\d+: reward (-?[\d.]+)", ln)[1])  # type: ignore[index]
                for ln in stdout.splitlines() if TRIAL_LINE.match(ln)]

    config = write_config(tmp_path / "c.yaml", seed=1)  # a seed whose resumed trials score below the best
    first = run_cli("search", str(config), cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    earlier = best_rewards(first.stdout)
    more = run_cli("search", str(config), "n_trials=5", cwd=tmp_path)
    assert more.returncode == 0, more.stdout + more.stderr
    later = best_rewards(more.stdout)
    assert len(earlier) == 3 and len(later) == 2, more.stdout
    assert min(later) >= max(earlier), more.stdout  # the best so far starts from the earlier runs' best


# ---------------------------------------------------------------------------------------------------------
# 4. CPU cost in every shipped config, fractional epochs documented


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_states_its_cpu_cost_and_a_cpu_sized_fine_tune(path: Path) -> None:
    text = path.read_text()
    comments = "\n".join(ln for ln in text.splitlines() if ln.lstrip().startswith("#") or " # " in ln)
    assert "CPU cost" in comments and "candidate" in comments and "epoch" in comments, path
    assert re.search(r"\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)? (?:s|min|h)\b", comments), "no figure with a unit"
    cfg = load_config(path)
    if cfg.export.finetune == "fixed":
        assert cfg.export.epochs <= 10, "export.epochs should be sized for a CPU"
        assert re.search(r"epochs: [\d.]+ +# .*(CPU|seconds)", text), "the epochs line should say why"
    elif cfg.export.finetune == "infcop":
        assert "CPU-sized" in text


def test_help_documents_fractional_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("export", "train"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--epochs 0.25" in text and "quarter" in text, command


# ---------------------------------------------------------------------------------------------------------
# 5. plain-text help


ROLES = ("``", ":func:", ":data:", ":class:", ":mod:", ":meth:", ":attr:", ":ref:")
OUTPUT_FILES = {"summary.md", "leaderboard.md", "MODEL_CARD.md"}  # files the commands write, not citations


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_help_is_plain_text_and_cites_only_documents_in_the_repository(
    command: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _help([command] if command else [], capsys)
    assert "usage:" in text
    for markup in ROLES:
        assert markup not in text, f"{markup!r} in `autoprune {command} --help`:\n{text}"
    for cited in re.findall(r"[\w./-]*\w\.md\b", text):
        assert cited in OUTPUT_FILES or (REPO / cited).is_file(), f"{cited} is not in the repository"


def test_plain_help_strips_rest_roles_and_literals() -> None:
    assert plain_help("``autoprune x``: below :data:`MIN` via :func:`~autoprune.imp.run_imp` and "
                      ":class:`the store <autoprune.store.TrialStore>`") == (
        "`autoprune x`: below `MIN` via `run_imp` and `the store`")
    assert plain_help(None) is None and plain_help("plain `x`") == "plain `x`"


# ---------------------------------------------------------------------------------------------------------
# 7. labels: what a validation figure is


def _checkpoint(path: Path, **extra: Any) -> Path:
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    return save_checkpoint(path, model, model_name="small_cnn", model_kwargs={"width": 8}, extra=extra)


def test_validation_figures_of_foreign_checkpoints_are_labelled_optimistic(tmp_path: Path) -> None:
    def cfg(ckpt: Path | None, **dataset: Any) -> Any:
        return config_from_dict(campaign_dict(tmp_path / "r", model={"name": "small_cnn", "checkpoint":
                                                                      None if ckpt is None else str(ckpt)},
                                              dataset={"name": "digits", **dataset}))

    assert val_caveat(cfg(None)) is None and val_label(cfg(None)) == "val accuracy"
    ours = _checkpoint(tmp_path / "ours.pt", dataset="digits", val_size=None, seed=0)
    assert val_caveat(cfg(ours)) is None  # trained by autoprune on this very split
    assert "optimistic" in (val_caveat(cfg(ours, seed=1)) or "")  # another split: some val images were trained on
    assert "optimistic" in (val_caveat(cfg(_checkpoint(tmp_path / "bare.pt"))) or "")  # split unknown
    foreign = tmp_path / "foreign.th"
    torch.save({"state_dict": build_model("small_cnn", num_classes=10, in_channels=1, width=8).state_dict()}, foreign)
    label = val_label(cfg(foreign))
    assert "training set the pretrained weights" in label and "optimistic" in label


# ---------------------------------------------------------------------------------------------------------
# 8 and 10, in process: file modes, unchanged training, Optuna parameters


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    out = tmp_path_factory.mktemp("campaign")
    cfg = config_from_dict(campaign_dict(out / "results"))
    with utils.quiet():
        camp, store = open_campaign(cfg, argv=["test"])
        run_search(camp, store, quiet=True, n_trials=2)
    yield camp, store


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_exported_files_get_the_mode_of_a_plain_open(campaign: tuple[Any, Any], tmp_path: Path,
                                                     umask_022: None) -> None:
    camp, store = campaign
    reference = tmp_path / "reference"
    with open(reference, "w") as fh:
        fh.write("x")
    expected = _mode(reference)
    assert expected == 0o644
    with utils.quiet():
        res = export_trial(camp, select_trial(store.to_dataframe(), "best"), out_dir=tmp_path / "export")
    files = [res.model_dir / "arch.json", res.model_dir / "weights.pt", res.out_dir / "export.json", res.card]
    files.append(_checkpoint(tmp_path / "ckpt" / "checkpoint.pt"))
    for f in files:
        assert _mode(f) == expected, f"{f.name}: {oct(_mode(f))}, a plain open() gives {oct(expected)}"


def test_atomic_writers_respect_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        with open(tmp_path / "plain", "w") as fh:
            fh.write("x")
        utils.atomic_write(tmp_path / "text.json", "{}")
        utils.atomic_write(tmp_path / "bytes.bin", b"\0")
        with utils.atomic_path(tmp_path / "agent.zip", fsync=True) as tmp:
            tmp.write_bytes(b"zip")  # any writer that creates the file itself (stable-baselines3's save)
        with pytest.raises(RuntimeError), utils.atomic_open(tmp_path / "text.json") as fh:
            fh.write("half")
            raise RuntimeError("killed")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "plain") == 0o640
    for name in ("text.json", "bytes.bin", "agent.zip"):
        assert _mode(tmp_path / name) == 0o640, name
    assert (tmp_path / "text.json").read_text() == "{}"  # a failed write leaves the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.zip", "bytes.bin", "plain", "text.json"]


def test_fine_tune_lines_do_not_change_the_exported_model(campaign: tuple[Any, Any], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    camp, store = campaign
    trial = select_trial(store.to_dataframe(), "best")
    shown = export_trial(camp, trial, out_dir=tmp_path / "lines", epochs=1.5)
    assert len([ln for ln in capsys.readouterr().out.splitlines() if EPOCH_LINE.match(ln)]) == 2
    with utils.quiet():
        silent = export_trial(camp, trial, out_dir=tmp_path / "quiet", epochs=1.5)
    assert capsys.readouterr().out == ""
    a = torch.load(shown.model_dir / "weights.pt", weights_only=True)
    b = torch.load(silent.model_dir / "weights.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert shown.metrics["exported"]["test_accuracy"] == silent.metrics["exported"]["test_accuracy"]


def test_every_searcher_stores_the_candidate_as_optuna_params(tmp_path: Path) -> None:
    cfg = config_from_dict(campaign_dict(tmp_path / "results", search_space={"quantize": True, "w_bits": [4, 8]},
                                         objective={"budget": {"macs": 0.6}}, n_trials=2))
    with utils.quiet():
        camp, store = open_campaign(cfg, argv=["test"])
        for name in ("uniform", "random", "tpe"):
            run_search(camp, store, searcher=name, quiet=True, n_trials=2)
    space = camp.space
    names: dict[str, set[str]] = {}
    for name in ("uniform", "random", "tpe"):
        study = optuna.load_study(study_name=f"outtest/{name}/seed0", storage=store.storage)
        for t in study.get_trials(deepcopy=False):
            assert t.params, f"{name} trial {t.number} has no params"
            names.setdefault(name, set()).update(t.params)
            if name != "tpe":  # the baselines' params are their candidate's
                cand = Candidate.from_dict({"widths": t.user_attrs["widths"], "bits": t.user_attrs["bits"]})
                for g in space.groups:
                    assert t.params[f"ratio:{g.group_id}"] == pytest.approx(cand.widths[g.group_id] / g.size)
                    dist = t.distributions[f"ratio:{g.group_id}"]
                    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.high == 1.0
                for lc in space.layers:
                    if len(lc.w_bits) > 1:
                        assert t.params[f"w_bits:{lc.layer}"] == cand.bits[lc.layer].w_bits
    assert names["uniform"] == names["random"] == names["tpe"]  # the same dashboard axes
    assert any(n.startswith("w_bits:") for n in names["tpe"]) and any(n.startswith("ratio:") for n in names["tpe"])
