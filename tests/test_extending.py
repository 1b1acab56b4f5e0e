"""docs/EXTENDING.md is tested: its examples register their entries and pass the contract suites, its campaign
runs, and a plugin searcher and evaluator drive a search from the command line.

The Python code blocks of the page (each starts with ``# <module>.py``) are written as modules into a temporary
directory and imported. Each example's entry is then put through the checks the built-in entries of its registry
pass: the contract suites in ``tests/contracts/`` (evaluators, rewards, importance criteria, search spaces), the
searcher contract of ``tests/test_searchers.py``, the model checks of ``tests/test_models.py`` and the zoo check
of ``tests/test_pruning.py`` — their test functions take the entry's name, and are called here with it (and with
every parameter combination of their ``parametrize`` marks). The campaign YAML block of the page (``# campaign
.yaml``) is run in process with all seven examples. In subprocesses: ``autoprune search`` with ``plugins:
[my_plugin]`` (the searcher and evaluator examples, on ``PYTHONPATH``) on the offline ``small_cnn`` + ``digits``
setup, ``autoprune export`` reopening that campaign (the plugins come from ``config.resolved.yaml``), and
``autoprune list searchers`` with and without ``--plugin my_plugin``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import test_models as model_suite
import test_pruning as pruning_suite
import test_searchers as searcher_suite
import torch
import yaml
from contracts import small_cnn
from contracts import test_evaluator_contract as evaluator_suite
from contracts import test_importance_contract as importance_suite
from contracts import test_reward_contract as reward_suite
from contracts import test_search_space_contract as space_suite
from engine_cases import randomize
from test_plugins import restored_registries

from autoprune import campaign, graph, pruning
from autoprune.agents.base import make_searcher
from autoprune.commands.list import REGISTRIES, origin, rows
from autoprune.config import config_from_dict
from autoprune.data import load_dataset, make_loader
from autoprune.errors import ConfigError
from autoprune.store import TrialStore

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "EXTENDING.md"

#: The examples of the page: module file → (registry, name it registers). One per extension point.
EXAMPLES: dict[str, tuple[str, str]] = {
    "my_searcher.py": ("searchers", "shared_ratio"),
    "my_evaluator.py": ("evaluators", "quick_bn"),
    "my_reward.py": ("rewards", "mnas"),
    "my_importance.py": ("importance", "linf"),
    "my_space.py": ("spaces", "wide_only"),
    "my_model.py": ("models", "tiny_vgg"),
    "my_dataset.py": ("datasets", "stripes"),
}
MY_PLUGIN = ('"""The plugin of the command-line tests: the searcher and evaluator of docs/EXTENDING.md."""\n'
             "import my_evaluator  # noqa: F401\nimport my_searcher  # noqa: F401\n")


def code_blocks(lang: str) -> list[str]:
    """The fenced ``lang`` code blocks of docs/EXTENDING.md, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.S | re.M)


def named_blocks(lang: str) -> dict[str, str]:
    """The ``lang`` blocks whose first line is ``# <file name>``, by file name."""
    out = {}
    for block in code_blocks(lang):
        first = block.splitlines()[0]
        if first.startswith("# ") and " " not in first[2:].strip():
            out[first[2:].strip()] = block
    return out


def write_examples(where: Path) -> None:
    """The page's Python examples as modules in ``where``, plus ``my_plugin.py`` (the searcher and evaluator)."""
    for file, source in named_blocks("python").items():
        (where / file).write_text(source, encoding="utf-8")
    (where / "my_plugin.py").write_text(MY_PLUGIN, encoding="utf-8")


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModuleType]]:
    """The examples imported from a temporary directory; modules and registrations are removed afterwards."""
    where = tmp_path_factory.mktemp("extending")
    write_examples(where)
    stems = [Path(f).stem for f in EXAMPLES]
    with restored_registries(), pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(where))
        try:
            yield {stem: importlib.import_module(stem) for stem in stems}
        finally:
            for stem in stems:
                sys.modules.pop(stem, None)


# ------------------------------------------------------------------------------------------------- the page


def test_every_python_block_is_one_example_module_and_every_extension_point_has_one() -> None:
    blocks = code_blocks("python")
    named = named_blocks("python")
    assert len(named) == len(blocks), "every python block starts with `# <module>.py`"
    assert set(named) == set(EXAMPLES)
    assert {kind for kind, _ in EXAMPLES.values()} == set(REGISTRIES)
    text = DOC.read_text(encoding="utf-8")
    assert "autoprune.plugins" in text and "[project.entry-points" in text and "--plugin" in text
    assert "LAYOUT.md" in text  # op rules: a pointer


@pytest.mark.parametrize("file", list(EXAMPLES))
def test_each_example_registers_its_entry_with_a_help_line(examples: dict[str, ModuleType], file: str) -> None:
    kind, name = EXAMPLES[file]
    reg = REGISTRIES[kind]()
    assert name in reg, f"{file} does not register {kind[:-1]} {name!r}"
    assert reg.help(name).strip(), f"{name!r} has no help line"
    assert origin(reg.get(name)) == Path(file).stem
    listed = dict(rows(kind))
    assert listed[name] == f"{reg.help(name)}  [plugin: {Path(file).stem}]"


# ------------------------------------------------------------------------------------------------- contracts


def combinations(fn: Callable[..., Any], given: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every argument combination of ``fn``'s ``parametrize`` marks, except the registry name.

    A mark that parametrizes ``name`` together with other arguments (``("name", "model_name")``) is replaced by
    the values in ``given`` for those other arguments.
    """
    combos: list[dict[str, Any]] = [{}]
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        argnames, values = mark.args[0], mark.args[1]
        names = [a.strip() for a in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
        if "name" in names:
            rows_ = [[{k: v} for v in given[k]] for k in names if k != "name"]
            for options in rows_:
                combos = [{**c, **o} for c in combos for o in options]
            continue
        tuples = [v if len(names) > 1 else (v,) for v in values]
        combos = [{**c, **dict(zip(names, t, strict=True))} for c in combos for t in tuples]
    return combos


def run_suite(module: ModuleType, name: str, *, fixtures: Callable[[], dict[str, Any]] = dict,
              given: Mapping[str, Sequence[Any]] | None = None, skip: Sequence[str] = ()) -> list[str]:
    """Call every test function of ``module`` that takes an entry ``name`` with ``name``, over its parameter
    combinations; arguments that are pytest fixtures come from ``fixtures()`` (fresh per call). Returns the
    functions that ran."""
    ran = []
    for fname, fn in vars(module).items():
        if not (fname.startswith("test_") and inspect.isfunction(fn)) or fname in skip:
            continue
        params = inspect.signature(fn).parameters
        if "name" not in params:
            continue
        for combo in combinations(fn, given or {}):
            kwargs: dict[str, Any] = {"name": name, **combo}
            missing = [p for p in params if p not in kwargs]
            if missing:
                made = fixtures()
                kwargs.update({p: made[p] for p in missing})
            fn(**kwargs)
        ran.append(fname)
    return ran


def test_the_searcher_example_passes_the_searcher_contract(examples: dict[str, ModuleType]) -> None:
    ran = run_suite(searcher_suite, "shared_ratio", skip=("test_rl_hyperparameter_files_load_and_unknown_keys_are_"
                                                          "rejected",))
    assert ran == ["test_contract_valid_budgeted_recorded_resumable_deterministic", "test_different_seeds_differ"]
    with pytest.raises(ConfigError, match="jitter"):
        make_searcher("shared_ratio", searcher_suite.make_problem(), store=searcher_suite.new_store(), n_trials=1,
                      budget=searcher_suite.BUDGET, jitter=2.0)


def evaluator_fixtures() -> dict[str, Any]:
    """The evaluator contract's ``dense`` and ``pruned`` fixtures."""
    torch.manual_seed(0)
    dense = randomize(small_cnn())
    gs = graph.analyze(dense, evaluator_suite.VAL[0][0][:1])
    pruned = pruning.apply(dense, gs, {g.id: pruning.legal_widths(g)[len(pruning.legal_widths(g)) // 2]
                                       for g in gs.prunable()})
    return {"dense": dense, "pruned": pruned}


def test_the_evaluator_example_passes_the_evaluator_contract(examples: dict[str, ModuleType]) -> None:
    ran = run_suite(evaluator_suite, "quick_bn", fixtures=evaluator_fixtures)
    assert len(ran) >= 8, ran


def test_the_reward_example_passes_the_reward_contract(examples: dict[str, ModuleType]) -> None:
    ran = run_suite(reward_suite, "mnas")
    assert {"test_finite_and_pure", "test_lower_cost_never_lowers_the_reward",
            "test_failure_reward_is_below_every_real_candidate"} <= set(ran)


def test_the_importance_example_passes_the_importance_contract(examples: dict[str, ModuleType]) -> None:
    ran = run_suite(importance_suite, "linf")
    assert "test_apply_keeps_the_top_channels_and_equals_the_masked_original" in ran


def test_the_search_space_example_passes_the_search_space_contract(examples: dict[str, ModuleType]) -> None:
    # a plugin family is chosen with search_space.family, never inferred from a model name: the zoo models it is
    # checked on are given here instead of the contract's "models it applies to"
    ran = run_suite(space_suite, "wide_only", given={"model_name": ["small_cnn", "resnet20"]},
                    skip=("test_help_name_and_a_model_it_applies_to",))
    assert len(ran) >= 4, ran


def test_the_model_example_passes_the_zoo_checks(examples: dict[str, ModuleType], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(model_suite.INPUTS, "tiny_vgg", (3, 32))
    ran = run_suite(model_suite, "tiny_vgg")
    assert "test_model_builds_runs_and_traces" in ran
    pruning_suite.test_zoo_half_width("tiny_vgg", tmp_path)  # analysed, pruned exactly, priced exactly


def test_the_dataset_example_loads_splits_and_batches(examples: dict[str, ModuleType]) -> None:
    splits = load_dataset("stripes", val_size=0.2, seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (800, 200, 200)
    assert splits.info.input_shape == (1, 8, 8) and splits.info.num_classes == 2
    for ds in (splits.train, splits.val, splits.test):
        assert ds.images.dtype == torch.uint8 and ds.image_shape == (1, 8, 8)
        assert set(ds.labels.tolist()) == {0, 1}
    again = load_dataset("stripes", val_size=0.2, seed=3)
    assert torch.equal(again.val.images, splits.val.images)  # seeded
    x, _ = next(iter(make_loader(splits.train, 32, shuffle=True, augment=True)))
    assert x.dtype == torch.float32 and x.shape == (32, 1, 8, 8) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0


def test_the_campaign_example_runs_with_all_seven_plugins(examples: dict[str, ModuleType], tmp_path: Path) -> None:
    (block,) = [b for b in code_blocks("yaml") if b.startswith("# campaign.yaml")]
    data = yaml.safe_load(block)
    assert sorted(data["plugins"]) == sorted(Path(f).stem for f in EXAMPLES)
    cfg = config_from_dict(data, [f"output_dir={tmp_path / 'out'}", "n_trials=3"])
    camp, store = campaign.open_campaign(cfg, argv=["search", "campaign.yaml"])
    assert [g.size for g in camp.space.groups] == [32]  # wide_only: the 32-channel group of tiny_vgg
    result = campaign.run_search(camp, store, quiet=True)
    assert result.stop_reason == "n_trials" and len(result.trials) == 3
    df = store.to_dataframe()
    assert set(df["searcher"]) == {"shared_ratio"} and set(df["state"]) == {"complete"} and bool(df["feasible"].all())
    assert {t.result.evaluator for t in store.trials() if t.result is not None} == {"quick_bn"}


# ------------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def plugin_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the examples and ``my_plugin.py`` (put on ``PYTHONPATH`` of the subprocesses)."""
    where = tmp_path_factory.mktemp("my_plugin")
    write_examples(where)
    return where


def start_cli(*args: str, pythonpath: Path | None, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "AUTOPRUNE_THREADS": "1"}
    env.pop("AUTOPRUNE_DATA", None)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.Popen([sys.executable, "-m", "autoprune.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str], timeout: float = 400) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def test_cli_search_and_export_with_a_plugin_searcher_and_evaluator(plugin_home: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"  # neither the plugin's directory nor the repository: the plugin comes from PYTHONPATH
    work.mkdir()
    out = tmp_path / "results"
    config = work / "campaign.yaml"
    config.write_text(yaml.safe_dump({
        "name": "plugin-cli",
        "plugins": ["my_plugin"],
        "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "dataset": {"name": "digits", "batch_size": 32},
        "objective": {"budget": {"macs": 0.5}},
        "evaluator": {"name": "quick_bn", "kwargs": {"batches": 2}},
        "searcher": {"name": "shared_ratio", "kwargs": {"jitter": 0.2}},
        "n_trials": 3,
        "output_dir": str(out),
    }))
    code, stdout, stderr = finish(start_cli("-q", "search", str(config), pythonpath=plugin_home, cwd=work))
    assert code == 0, stdout + stderr
    store = TrialStore(out / "trials.db", campaign="plugin-cli")
    df = store.to_dataframe()
    assert len(df) == 3
    assert set(df["searcher"]) == {"shared_ratio"}, "the trials come from the plugin searcher"
    evaluators = [t.result.evaluator if t.result is not None else None for t in store.trials()]
    assert evaluators == ["quick_bn"] * 3, "the trials were scored by the plugin evaluator"
    assert set(df["state"]) == {"complete"}
    assert yaml.safe_load((out / "config.resolved.yaml").read_text())["plugins"] == ["my_plugin"]

    # reopening the campaign imports the plugins from config.resolved.yaml: export rebuilds the plugin evaluator
    export = start_cli("-q", "export", str(out), "--finetune", "none", "--formats", "none", "--no-latency",
                       pythonpath=plugin_home, cwd=work)
    without = start_cli("-q", "export", str(out), "--finetune", "none", "--formats", "none", "--no-latency",
                        pythonpath=None, cwd=work)
    code, stdout, stderr = finish(export)
    assert code == 0, stdout + stderr
    assert "reload check passed" in stdout
    code, stdout, stderr = finish(without)
    assert code == 2 and "Traceback" not in stderr
    assert "plugins[0]: plugin module 'my_plugin' cannot be imported: No module named 'my_plugin'" in stderr


def test_cli_list_searchers_with_and_without_the_plugin(plugin_home: Path, tmp_path: Path) -> None:
    plain = start_cli("list", "searchers", pythonpath=None, cwd=tmp_path)
    plugged = start_cli("--plugin", "my_plugin", "list", "searchers", pythonpath=plugin_home, cwd=tmp_path)
    code, stdout, stderr = finish(plain)
    assert code == 0, stderr
    reg = REGISTRIES["searchers"]()
    builtin = [n for n in reg.names() if origin(reg.get(n)).startswith("autoprune.")]
    assert len(builtin) >= 15
    listed = {ln.split()[0]: ln for ln in stdout.splitlines()}
    for name in builtin:
        assert name in listed, f"searcher {name} is not listed"
        assert reg.help(name) and reg.help(name) in listed[name], f"searcher {name} without its help line"
    assert "shared_ratio" not in listed
    code, stdout, stderr = finish(plugged)
    assert code == 0, stderr
    listed_with = {ln.split()[0]: ln for ln in stdout.splitlines()}
    assert set(listed_with) == set(listed) | {"shared_ratio"}
    assert "One random keep ratio shared by every group" in listed_with["shared_ratio"]
    assert listed_with["shared_ratio"].endswith("[plugin: my_searcher]")
