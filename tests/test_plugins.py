"""Plugins (:mod:`autoprune.plugins`): the ``plugins:`` config key, the global ``--plugin`` option, the
``autoprune.plugins`` entry-point group, their error messages, and ``autoprune list`` over every registry.

The examples of docs/EXTENDING.md and a campaign that uses plugins end to end are in ``tests/test_extending.py``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoprune import cli, plugins
from autoprune.commands.list import KINDS, REGISTRIES, origin
from autoprune.config import config_from_dict, load_config
from autoprune.errors import EXIT_USER_ERROR, ConfigError
from autoprune.objectives import REWARDS
from autoprune.provenance import CONFIG_FILE, load_resolved

REPO = Path(__file__).resolve().parents[1]
BASE: dict[str, Any] = {"name": "plugins", "model": {"name": "small_cnn"}, "dataset": {"name": "digits"}}

REWARD_PLUGIN = '''
"""A test plugin: one reward."""
from autoprune.objectives import REWARDS, Reward


@REWARDS.register({name!r})
class PluginReward(Reward):
    """Accuracy, whatever the cost (registered by a test plugin)."""

    name = {name!r}

    def __call__(self, result, cost, dense, budget):
        return float(result.accuracy)
'''


@contextlib.contextmanager
def restored_registries() -> Iterator[None]:
    """Every registry (searchers, evaluators, rewards, spaces, importance, models, datasets) as it was before.

    Entries a test's plugin registers are removed again, so that later tests that walk a registry see only what
    they would have seen without this test.
    """
    regs = [REGISTRIES[kind]() for kind in KINDS]  # imports them (and the built-in searchers) first
    with contextlib.ExitStack() as stack:
        for reg in regs:
            stack.enter_context(reg.restored())
        yield


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on ``sys.path`` for test plugin modules; the modules and their registrations go afterwards."""
    d = tmp_path / "plugins"
    d.mkdir()
    monkeypatch.syspath_prepend(str(d))
    before = set(sys.modules)
    with restored_registries():
        yield d
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", None) and str(d) in str(sys.modules[name].__file__):
            del sys.modules[name]


def write_module(where: Path, source: str, stem: str = "ap_plugin") -> str:
    """Write ``source`` as a fresh, uniquely named module in ``where``; return its name."""
    name = f"{stem}_{uuid.uuid4().hex[:8]}"
    (where / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def reward_plugin(where: Path) -> tuple[str, str]:
    """A plugin module registering a reward; returns (module, reward name)."""
    reward = f"plugin_reward_{uuid.uuid4().hex[:8]}"
    return write_module(where, REWARD_PLUGIN.format(name=reward)), reward


def cli_run(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "AUTOPRUNE_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "autoprune.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=full, timeout=300)


# ------------------------------------------------------------------------------------------------- config key


def test_importing_the_config_and_the_plugin_loader_imports_no_torch() -> None:
    code = "import sys, autoprune.config, autoprune.plugins; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_the_plugins_key_imports_the_modules_while_the_config_is_read(plugin_dir: Path) -> None:
    module, reward = reward_plugin(plugin_dir)
    assert reward not in REWARDS
    cfg = config_from_dict({**BASE, "plugins": [module], "objective": {"reward": reward}})
    assert reward in REWARDS and REWARDS.help(reward).startswith("Accuracy, whatever the cost")
    assert cfg.plugins == [module] and cfg.to_dict()["plugins"] == [module]
    assert config_from_dict(BASE).plugins == []
    config_from_dict({**BASE, "plugins": [module, module]})  # imported once: no second registration


def test_a_reopened_campaign_imports_the_plugins_of_its_resolved_config(plugin_dir: Path, tmp_path: Path) -> None:
    marker = write_module(plugin_dir, '"""A plugin that registers nothing."""\nIMPORTED = True\n', "ap_marker")
    campaign = tmp_path / "campaign"
    campaign.mkdir()
    cfg = config_from_dict({**BASE, "output_dir": str(campaign)})
    data = {**cfg.to_dict(), "plugins": [marker]}
    (campaign / CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    assert marker not in sys.modules
    reopened = load_resolved(campaign)
    assert reopened.plugins == [marker] and sys.modules[marker].IMPORTED


@pytest.mark.parametrize(("value", "message", "hint"), [
    ("my_plugin", "plugins: expected list of str", ""),
    ([3], "plugins[0]: expected str", ""),
    (["my_plugin.py"], "plugins[0]: 'my_plugin.py' is not a module name", "write 'my_plugin' (with its"),
    (["plugins/mod.py"], "is not a module name", "write 'mod' (put 'plugins' on PYTHONPATH)"),
    (["my-plugin"], "plugins[0]: 'my-plugin' is not a module name", "not file paths"),
    ([".relative"], "is not a module name", ""),
    (["ok_name", ""], "plugins[1]: '' is not a module name", ""),
    (["class.mod"], "is not a module name", ""),
])
def test_plugin_names_are_checked(value: Any, message: str, hint: str) -> None:
    with pytest.raises(ConfigError, match="plugins") as info:
        config_from_dict({**BASE, "plugins": value})
    assert message in info.value.message
    assert hint in (info.value.hint or "")


def test_a_missing_plugin_module_is_named_with_the_import_error(plugin_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({**BASE, "plugins": ["no_such_plugin_xyz"]})
    assert info.value.message == ("plugins[0]: plugin module 'no_such_plugin_xyz' cannot be imported: "
                                  "No module named 'no_such_plugin_xyz'")
    assert "PYTHONPATH" in info.value.hint
    with pytest.raises(ConfigError) as info:
        plugins.load_plugins(["no_such_pkg_xyz.sub"])
    assert "'no_such_pkg_xyz.sub' cannot be imported: No module named 'no_such_pkg_xyz'" in info.value.message


def test_a_plugin_that_needs_a_missing_package_says_which(plugin_dir: Path) -> None:
    module = write_module(plugin_dir, "import not_installed_dependency_xyz\n")
    with pytest.raises(ConfigError) as info:
        plugins.load_plugins([module])
    assert f"plugin module {module!r} cannot be imported: No module named 'not_installed_dependency_xyz'" in (
        info.value.message)
    assert "install the package 'not_installed_dependency_xyz'" in info.value.hint


def test_a_plugin_that_raises_while_imported_is_a_config_error(plugin_dir: Path) -> None:
    module = write_module(plugin_dir, "raise RuntimeError('the plugin is broken')\n")
    with pytest.raises(ConfigError) as info:
        config_from_dict({**BASE, "plugins": [module]})
    assert info.value.message == (f"plugins[0]: plugin module {module!r} raised RuntimeError while it was "
                                  "imported: the plugin is broken")
    assert f"python -c 'import {module}'" in info.value.hint
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_plugin_registering_a_taken_name_is_a_config_error(plugin_dir: Path) -> None:
    module = write_module(plugin_dir, """
        from autoprune.objectives import REWARDS, Reward

        REWARDS.register("r_err")(type("Again", (Reward,), {"__call__": lambda self, *a: 0.0}))
    """)
    with pytest.raises(ConfigError, match="raised ValueError while it was imported: reward 'r_err' is already"):
        plugins.load_plugins([module])


# ------------------------------------------------------------------------------------------------- entry points


def fake_distribution(where: Path, module: str, dist: str) -> None:
    """An installed distribution ``dist`` (a ``.dist-info`` folder on ``sys.path``) with one plugin entry point."""
    info = where / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\nmine = {module}\n")


def test_entry_points_of_installed_packages_are_loaded_once(plugin_dir: Path) -> None:
    module, reward = reward_plugin(plugin_dir)
    fake_distribution(plugin_dir, module, f"apfake_{module}")
    assert plugins.load_entry_points(rescan=True) == [f"mine = {module}"]
    assert reward in REWARDS and origin(REWARDS.get(reward)) == module
    assert plugins.load_entry_points(rescan=True) == []  # already loaded: not again
    assert plugins.load_entry_points() == []


def test_a_broken_entry_point_names_its_package(plugin_dir: Path) -> None:
    module = write_module(plugin_dir, "raise ImportError('missing native library')\n")
    dist = f"apbroken_{module}"
    fake_distribution(plugin_dir, module, dist)
    with pytest.raises(ConfigError) as info:
        plugins.load_entry_points(rescan=True)
    assert f"entry point 'mine' = '{module}' of {dist} cannot be loaded" in info.value.message
    assert "missing native library" in info.value.message
    assert f"pip uninstall {dist}" in info.value.hint


# ------------------------------------------------------------------------------------------------- command line


def test_the_plugin_option_imports_modules_for_any_command(plugin_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    module, reward = reward_plugin(plugin_dir)
    assert cli.main(["--plugin", module, "list", "rewards"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[0] == reward)
    assert "Accuracy, whatever the cost (registered by a test plugin)." in line and f"[plugin: {module}]" in line
    assert cli.main(["--plugin", "no_such_plugin_xyz", "list", "rewards"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "error: --plugin: plugin module 'no_such_plugin_xyz' cannot be imported" in err and "hint:" in err


def test_broken_plugins_exit_2_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "ap_broken_plugin.py").write_text("raise KeyError('half-written plugin')\n")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**BASE, "plugins": ["ap_broken_plugin"], "output_dir": str(tmp_path / "out")}))
    env = {"PYTHONPATH": str(tmp_path)}
    for args in (["--plugin", "ap_broken_plugin", "list", "rewards"], ["search", str(config)]):
        res = cli_run(*args, env=env)
        assert res.returncode == EXIT_USER_ERROR, res.stdout + res.stderr
        assert "error:" in res.stderr and "ap_broken_plugin" in res.stderr and "half-written plugin" in res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_list_shows_every_entry_of_every_registry_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    for kind in KINDS:
        assert cli.main(["list", kind]) == 0
        lines = capsys.readouterr().out.splitlines()
        reg = REGISTRIES[kind]()
        assert len(reg) >= 4, kind
        for name in reg.names():
            line = next((ln for ln in lines if ln.split()[0] == name), None)
            assert line is not None, f"{kind}: {name} not listed"
            assert reg.help(name) in line, f"{kind}: {name} without its help line"
            if origin(reg.get(name)).startswith("autoprune."):
                assert reg.help(name), f"{kind}: the built-in {name} has no help line"
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(f"{kind}:" in out for kind in KINDS)
    assert cli.main(["list", "all"]) == 0
    assert capsys.readouterr().out == out


def test_load_config_reads_the_plugins_key_from_a_file(plugin_dir: Path, tmp_path: Path) -> None:
    module, reward = reward_plugin(plugin_dir)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "plugins": [module], "objective": {"reward": reward}}))
    assert load_config(path).objective.reward == reward and reward in REWARDS


def test_plugin_modules_come_only_from_the_config_the_command_line_and_installed_packages() -> None:
    """Only the config reader (``plugins:``, also of ``config.resolved.yaml``) and the CLI (``--plugin``) import
    plugins: no checkpoint, trial store, ``space.json`` or exported model can name a module to import."""
    callers = set()
    for folder in ("autoprune", "agents", "envs", "search_spaces"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if any(f"{fn}(" in text for fn in ("load_plugins", "import_plugin", "load_entry_points")):
                callers.add(path.relative_to(REPO).as_posix())
    assert callers == {"autoprune/plugins.py", "autoprune/config.py", "autoprune/cli.py"}
