"""What a new user hits first (#23): mistakes are reported at once, with ``error:`` and ``hint:``, and leave no trace.

Every test runs the command line in a subprocess. Checks that need nothing heavy run several commands in one
interpreter (:data:`SCRIPT`: ``autoprune.cli.main`` once per command line, stderr captured, and whether torch
has been imported by then), so that the table tests stay fast. The campaign is ``small_cnn`` (width 8) on the
offline digits with the cheap ``plain`` evaluator.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoprune import provenance
from autoprune.config import config_from_dict
from autoprune.errors import EXIT_USER_ERROR
from autoprune.store import TrialStore

SCRIPT = """
import contextlib, io, json, sys
import autoprune.cli as cli
rows = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    rows.append({"argv": argv, "code": code, "stderr": err.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(rows))
"""


def env() -> dict[str, str]:
    out = {**os.environ, "AUTOPRUNE_THREADS": "1"}
    out.pop("AUTOPRUNE_DATA", None)
    return out


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m autoprune.cli ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "autoprune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env(), timeout=timeout)


def run_many(commands: list[list[str]], cwd: Path) -> list[dict[str, Any]]:
    """Run each command line with ``autoprune.cli.main`` in one fresh interpreter (see :data:`SCRIPT`)."""
    res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(commands)], capture_output=True, text=True,
                         cwd=cwd, env=env(), timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_config(root: Path, **patch: Any) -> Path:
    data: dict[str, Any] = {
        "name": "errors",
        "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "dataset": {"name": "digits", "batch_size": 64},
        "evaluator": {"name": "plain"},
        "objective": {"budget": {"macs": 0.5}},
        "searcher": {"name": "tpe", "kwargs": {"n_startup_trials": 1}},
        "n_trials": 1,
        "output_dir": str(root / "results"),
    }
    data.update(patch)
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_user_error(row: dict[str, Any], fragment: str) -> None:
    err = row["stderr"]
    assert row["code"] == EXIT_USER_ERROR, row
    assert "error:" in err and "hint:" in err and "Traceback" not in err, row
    assert fragment in err, row


def stored_trials(out: Path) -> int:
    db = out / provenance.STORE_FILE
    return len(TrialStore(db, campaign="errors").to_dataframe()) if db.exists() else 0


# ---------------------------------------------------------------------------------------------------------
# 1. Names are checked before anything heavy; a missing config fails before torch is imported


def test_a_searcher_typo_fails_at_once_with_the_close_match(tmp_path: Path) -> None:
    write_config(tmp_path)
    res = run_cli("search", "c.yaml", "searcher.name=tpee", cwd=tmp_path)
    assert res.returncode == EXIT_USER_ERROR, res.stderr
    assert "error: searcher.name: unknown searcher 'tpee'. Did you mean 'tpe'?" in res.stderr
    assert "hint: use searcher.name=tpe" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "results").exists()  # nothing was created, loaded or evaluated


NAME_TYPOS = [
    (["search", "c.yaml", "evaluator.name=adaptive"], "evaluator.name: unknown evaluator 'adaptive'. Did you mean "
     "'adaptive_bn'?"),
    (["search", "c.yaml", "objective.reward=r_er"], "objective.reward: unknown reward 'r_er'. Did you mean 'r_err'?"),
    (["search", "c.yaml", "objective.objectives=[accuracy,mac]"], "objective.objectives: unknown metric(s) ['mac']"),
    (["search", "c.yaml", "objective.kwargs.nope=1"], "objective.kwargs: bad parameters ['nope']"),
    (["search", "c.yaml", "search_space.family=vg"], "search_space.family: unknown search space 'vg'. Did you mean "
     "'vgg'?"),
    (["search", "c.yaml", "search_space.importance=l3"], "search_space.importance: unknown importance criterion 'l3'"),
    (["search", "c.yaml", "model.name=small_cn"], "model.name: unknown model 'small_cn'. Did you mean 'small_cnn'?"),
    (["search", "c.yaml", "model.name=no_such_module_xyz:build"], "cannot find module 'no_such_module_xyz'"),
    (["search", "c.yaml", "dataset.name=digit"], "dataset.name: unknown dataset 'digit'. Did you mean 'digits'?"),
    (["worker", "c.yaml", "searcher.name=randm"], "searcher.name: unknown searcher 'randm'. Did you mean 'random'?"),
    (["compare", "c.yaml", "--agents", "tpe,fooo"], "--agents: unknown searcher 'fooo'"),
    (["compare", "c.yaml", "--agents", "tpe", "--reference", "unifrm"], "--reference: unknown searcher 'unifrm'. "
     "Did you mean 'uniform'?"),
]


def test_every_name_is_checked_against_its_registry_before_anything_is_loaded(tmp_path: Path) -> None:
    write_config(tmp_path)
    rows = run_many([argv for argv, _ in NAME_TYPOS], tmp_path)
    for row, (_, fragment) in zip(rows, NAME_TYPOS, strict=True):
        assert_user_error(row, fragment)
    # the output directory is created right after the names are checked, before the data, model or dense
    # evaluation: none of the commands got that far
    assert not (tmp_path / "results").exists()


def test_a_missing_config_or_campaign_fails_before_torch_is_imported(tmp_path: Path) -> None:
    write_config(tmp_path)
    rows = run_many([["search", "missing.yaml"], ["compare", "missing.yaml", "--agents", "tpe"],
                     ["worker", "missing.yaml"], ["export", "no-campaign-here"], ["report", "no-campaign-here"],
                     ["compare", "c.yaml", "--agents", "tpe", "--seeds", "0"], ["compare", "c.yaml", "--agents", ","],
                     ["search", "."]], tmp_path)
    for row in rows[:3]:
        assert_user_error(row, "config file 'missing.yaml' does not exist")
    assert_user_error(rows[3], "campaign directory no-campaign-here does not exist")
    assert_user_error(rows[4], "no-campaign-here")
    assert_user_error(rows[5], "--seeds must be ≥ 1, got 0")
    assert_user_error(rows[6], "--agents ',' names no searcher")
    assert_user_error(rows[7], "cannot read config file '.'")
    assert not any(row["torch"] for row in rows), [row["argv"] for row in rows if row["torch"]]
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------------------
# 2. A run that failed before its first trial does not pin the campaign directory


def test_a_run_that_failed_before_its_first_trial_does_not_pin_the_directory(tmp_path: Path) -> None:
    write_config(tmp_path)
    out = tmp_path / "results"
    bad = run_cli("search", "c.yaml", "searcher.kwargs.bogus=1", cwd=tmp_path)  # fails after the provenance
    assert bad.returncode == EXIT_USER_ERROR, bad.stderr
    assert (out / provenance.CONFIG_FILE).is_file() and stored_trials(out) == 0

    # another model and objective: accepted, since nothing was computed
    fixed = run_cli("-q", "compare", "c.yaml", "--agents", "random", "model.kwargs.width=4",
                    "objective.budget.macs=0.6", cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert "note:" in fixed.stderr and "holds no trial yet" in fixed.stderr
    resolved = yaml.safe_load((out / provenance.CONFIG_FILE).read_text())
    assert resolved["model"]["kwargs"] == {"width": 4} and resolved["objective"]["budget"]["macs"] == 0.6
    assert json.loads((out / provenance.SPACE_FILE).read_text())["budget"]["macs"] == 0.6
    assert stored_trials(out) == 2  # random and the uniform baseline

    # once trials exist, the problem is fixed
    again = run_cli("-q", "search", "c.yaml", cwd=tmp_path)
    assert again.returncode == EXIT_USER_ERROR
    assert "was run with another problem" in again.stderr and "model.kwargs" in again.stderr
    assert "hint:" in again.stderr and stored_trials(out) == 2
    assert yaml.safe_load((out / provenance.CONFIG_FILE).read_text()) == resolved


# ---------------------------------------------------------------------------------------------------------
# 6. Options that are settings, value errors, the missing-data hint


def test_an_option_that_is_a_setting_gets_the_override_syntax(tmp_path: Path) -> None:
    write_config(tmp_path)
    cases = [
        (["search", "c.yaml", "--n_trials", "5"], "--n_trials", "n_trials=5"),
        (["compare", "c.yaml", "--agents", "tpe", "--n-trials=3"], "--n-trials", "n_trials=3"),
        (["worker", "c.yaml", "--searcher.name", "random"], "--searcher.name", "searcher.name=random"),
        (["export", "results", "--export.epochs", "2"], "--export.epochs", "export.epochs=2"),
    ]
    rows = run_many([argv for argv, _, _ in cases], tmp_path)
    for row, (argv, option, override) in zip(rows, cases, strict=True):
        assert_user_error(row, f"error: unrecognized option '{option}' for `autoprune {argv[0]}`")
        assert f"hint: campaign settings are overrides: {override} (KEY=VALUE" in row["stderr"], row
        assert "usage:" not in row["stderr"], row  # no top-level usage dump
    assert not any(row["torch"] for row in rows)
    report = run_many([["report", "results", "--n_trials", "5"]], tmp_path)[0]
    assert report["code"] == EXIT_USER_ERROR
    assert "usage: autoprune report" in report["stderr"] and "error: unrecognized arguments" in report["stderr"]


BAD_VALUES = [
    "n_trials=-1", "n_trials=many", "n_trials=true", "n_trials=1.5", "seed=100000000000000000000",
    "time_limit=0", "time_limit_per_trial=-1", "storage_timeout=0", "name=a/b",
    "search_space.min_ratio=0", "search_space.min_ratio=1.5", "search_space.round_to=0", "search_space.w_bits=[1,4]",
    "search_space.a_bits=[9]", "search_space.quantize=maybe", "dataset.batch_size=0", "dataset.eval_batch_size=0",
    "dataset.val_size=1.5", "dataset.val_size=abc", "objective.budget.macs=-1", "objective.budget.macs=.nan",
    "objective.budget.flops=0.5", "objective.objectives=macs", "searcher.agent_kwargs.ddpg=3", "searcher.kwargs=3",
    "export.finetune=sometimes", "export.epochs=0", "export.lr=0", "export.calibration_batches=0",
    "workers.stale_seconds=1", "workers.heartbeat_seconds=0", "model=resnet20", "model.name=", "serchr.name=tpe",
    "n_trials.x=1", "=5", "n_trials=[unclosed", "nokeyvalue",
]


def test_every_bad_value_gets_an_error_and_a_hint(tmp_path: Path) -> None:
    write_config(tmp_path)
    rows = run_many([["search", "c.yaml", override] for override in BAD_VALUES], tmp_path)
    for row, override in zip(rows, BAD_VALUES, strict=True):
        assert_user_error(row, "error:")
        key = override.split("=")[0].split(".")[0].split("[")[0]
        assert not key or key in row["stderr"] or "override" in row["stderr"], (override, row["stderr"])
    assert not (tmp_path / "results").exists()


def test_missing_data_hint_names_the_campaign_keys_not_the_flags_of_other_commands(tmp_path: Path) -> None:
    write_config(tmp_path, dataset={"name": "mnist", "data_dir": str(tmp_path / "no-data-here")})
    res = run_cli("-q", "search", "c.yaml", cwd=tmp_path)
    assert res.returncode == EXIT_USER_ERROR, res.stderr
    assert "error: MNIST not found" in res.stderr and str(tmp_path / "no-data-here") in res.stderr
    hint = res.stderr[res.stderr.index("hint:"):]
    assert "set dataset.data_dir=DIR in the config or as an override" in hint
    assert "the files are looked up in dataset.data_dir, else $AUTOPRUNE_DATA, else ./data" in hint
    assert "--download" not in hint and "--data-dir" not in hint
    assert not (tmp_path / "results" / provenance.ENVIRONMENT_FILE).exists()  # stopped before the provenance


# ---------------------------------------------------------------------------------------------------------
# 9. Switching searchers from the command line leaves the other searcher's settings behind


def test_switching_searchers_does_not_hand_over_the_configs_searcher_settings(tmp_path: Path) -> None:
    write_config(tmp_path, n_trials=2)
    res = run_cli("-q", "search", "c.yaml", "searcher.name=ddpg", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "n_startup_trials" in notes[0] and "not applied to ddpg" in notes[0], res.stderr
    assert "ddpg seed0: 2 trials" in res.stdout
    resolved = yaml.safe_load((tmp_path / "results" / provenance.CONFIG_FILE).read_text())["searcher"]
    assert resolved == {"name": "ddpg", "kwargs": {}, "agent_kwargs": {"tpe": {"n_startup_trials": 1}}}


def test_searcher_settings_stay_with_their_searcher() -> None:
    base = {"name": "c", "model": {"name": "small_cnn"}, "dataset": {"name": "digits"},
            "searcher": {"name": "tpe", "kwargs": {"n_startup_trials": 5}, "agent_kwargs": {"ddpg": {"tau": 0.1}}}}
    same = config_from_dict(base, ["searcher.kwargs.gamma=0.5"]).searcher
    assert same.kwargs_for("tpe") == {"n_startup_trials": 5, "gamma": 0.5} and same.kwargs_for("ddpg") == {"tau": 0.1}
    switched = config_from_dict(base, ["searcher.name=ddpg", "searcher.kwargs.actor_lr=0.001"]).searcher
    assert switched.kwargs_for("ddpg") == {"tau": 0.1, "actor_lr": 0.001}
    assert switched.kwargs_for("tpe") == {"n_startup_trials": 5}  # still there for `compare --agents tpe,...`
    # what config.resolved.yaml holds reads back the same (no searcher change, so nothing moves again)
    assert config_from_dict({**base, "searcher": dataclasses.asdict(switched)}).searcher == switched


@pytest.mark.parametrize("override", ["searcher.name=tpe", "n_trials=3"])
def test_no_note_when_the_searcher_stays(override: str, caplog: pytest.LogCaptureFixture) -> None:
    base = {"name": "c", "model": {"name": "small_cnn"}, "dataset": {"name": "digits"},
            "searcher": {"name": "tpe", "kwargs": {"n_startup_trials": 5}}}
    assert config_from_dict(base, [override]).searcher.kwargs == {"n_startup_trials": 5}
    assert not [r for r in caplog.records if "note:" in r.getMessage()]


def test_devices_that_this_machine_lacks_are_user_errors() -> None:
    import torch

    from autoprune.errors import AutoPruneError
    from autoprune.utils import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(AutoPruneError, match="is not a torch device"):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(AutoPruneError, match="is not available here"):
            resolve_device("cuda")
    with pytest.raises(AutoPruneError, match="is not available here"):
        resolve_device(f"cuda:{torch.cuda.device_count() + 3}")


def test_thread_counts_openmp_cannot_start_are_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from autoprune.errors import AutoPruneError
    from autoprune.utils import configure_threads

    before = torch.get_num_threads()
    try:
        for bad in (0, -2, 99999):
            with pytest.raises(AutoPruneError, match="torch threads is outside"):
                configure_threads(bad)
        monkeypatch.setenv("AUTOPRUNE_THREADS", "many")
        with pytest.raises(AutoPruneError, match="AUTOPRUNE_THREADS"):
            configure_threads(None)
        assert configure_threads(1) == 1
    finally:
        torch.set_num_threads(before)


def test_output_directories_that_cannot_exist_are_user_errors(tmp_path: Path) -> None:
    from autoprune.errors import AutoPruneError
    from autoprune.utils import prepare_out_dir

    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub", "\ud800"):
        with pytest.raises(AutoPruneError, match="output directory") as info:
            prepare_out_dir(bad, hint="pass --out DIR")
        info.value.message.encode("utf-8")  # printable
