"""Plugins: the user's own searchers, evaluators, rewards, criteria, search spaces, models and datasets.

A plugin is an ordinary Python module that registers entries in autoprune's registries when it is imported
(``@SEARCHERS.register("mine")``, ``EVALUATORS.register(...)``, ...; docs/EXTENDING.md has one example per
registry). autoprune imports plugins from three places, always before a name is looked up:

* the ``plugins: [mypkg.autoprune_plugin, ...]`` key of a campaign config: :func:`load_plugins` runs while the
  config is validated (:func:`autoprune.config.config_from_dict`), so ``search``, ``worker`` and ``compare``
  import them from the YAML file, and ``report`` and ``export`` from the campaign's ``config.resolved.yaml``
  (which keeps the key);
* the global ``--plugin MODULE`` option of the command line (repeatable), e.g. for ``autoprune --plugin
  mypkg.autoprune_plugin list searchers``;
* the ``autoprune.plugins`` entry-point group (:data:`ENTRY_POINT_GROUP`) of installed distributions:
  :func:`load_entry_points` loads each entry point (imports its module) once per process.

Module names are taken only from the user's config (and ``config.resolved.yaml``, the copy of it that the
campaign directory keeps) or command line, and from the metadata of installed packages; never from a
checkpoint, a trial store, ``space.json`` or an exported model. Like model import strings, a plugin
module is imported with :func:`importlib.import_module` (nothing is evaluated), and the working directory is
appended to ``sys.path`` so that ``plugins: [my_plugin]`` finds ``./my_plugin.py`` from the console script
too. A module that cannot be imported, or raises while it is imported, is a :class:`~autoprune.errors.ConfigError`
naming the module and the error, not a traceback.

This module imports nothing heavy (no torch): importing :mod:`autoprune.config` stays light.
"""

from __future__ import annotations

import keyword
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from types import ModuleType

from autoprune.errors import ConfigError
from autoprune.user_code import import_user_module

ENTRY_POINT_GROUP = "autoprune.plugins"
"""The entry-point group of installed plugin packages (``[project.entry-points."autoprune.plugins"]``)."""

_loaded_entry_points: set[tuple[str, str]] = set()
_scanned = False


def check_module_name(name: object, where: str = "plugins") -> str:
    """Return ``name`` if it is a dotted module name (``pkg.sub.mod``), else raise.

    Args:
        name: The value given by the user.
        where: Where it was given (``plugins[0]``, ``--plugin``), for the message.

    Raises:
        ConfigError: A non-string, an empty name, a file path or a relative name.
    """
    if not isinstance(name, str):
        raise ConfigError(f"{where}: expected a module name, got {name!r} ({type(name).__name__})",
                          hint="list module names, e.g. plugins: [mypkg.autoprune_plugin]")
    parts = name.split(".")
    is_file = name.endswith(".py")  # ``my_plugin.py``: a file name, not the submodule ``py`` of ``my_plugin``
    if is_file or not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        suggestion = "e.g. mypkg.autoprune_plugin"
        if is_file:
            path = Path(name)
            where_to = (f"put {str(path.parent)!r} on PYTHONPATH" if path.parent != Path(".")
                        else "with its directory on PYTHONPATH or as the working directory")
            suggestion = f"write {path.stem!r} ({where_to})"
        raise ConfigError(f"{where}: {name!r} is not a module name",
                          hint=f"plugins are importable module names, not file paths: {suggestion}")
    return name


def import_plugin(name: str, where: str = "plugins") -> ModuleType:
    """Import the plugin module ``name`` (which registers its entries) and return it.

    Importing a module twice is a no-op (Python's module cache), so a plugin listed in a config and on the
    command line registers its entries once.

    Args:
        name: Dotted module name.
        where: Where it was given, for the message.

    Raises:
        ConfigError: The name is malformed, the module (or a module it needs) cannot be found, or the module
            raised while it was imported; the message names the module and shows the error.
    """
    check_module_name(name, where)
    return import_user_module(name, f"{where}: plugin module {name!r}")


def load_plugins(modules: Iterable[str], *, where: str = "plugins") -> list[ModuleType]:
    """Import every plugin module in ``modules``, in order (every name is checked before the first import).

    Args:
        modules: Dotted module names (a config's ``plugins`` list, or the CLI's ``--plugin`` values).
        where: Where they were given (the n-th name is reported as ``where[n]``).

    Returns:
        The imported modules.

    Raises:
        ConfigError: For the first module that cannot be imported (see :func:`import_plugin`).
    """
    names = list(modules)
    for i, name in enumerate(names):
        check_module_name(name, f"{where}[{i}]")
    return [import_plugin(name, f"{where}[{i}]") for i, name in enumerate(names)]


def load_entry_points(*, rescan: bool = False) -> list[str]:
    """Load the ``autoprune.plugins`` entry points of installed distributions (each imports its module).

    The installed distributions are scanned once per process (``rescan=True`` scans again, e.g. after
    installing a package); an entry point already loaded is not loaded again. An entry point's value is a
    module (``mypkg.autoprune_plugin``) or an object in one (``mypkg.plugin:register``): either way its
    module is imported, which registers its entries; the object is not called.

    Returns:
        ``name = value`` of the entry points loaded by this call.

    Raises:
        ConfigError: An entry point whose module cannot be imported or raises while it is imported; the
            message names the entry point and its distribution.
    """
    global _scanned
    if _scanned and not rescan:
        return []
    loaded = []
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        key = (ep.name, ep.value)
        if key in _loaded_entry_points:
            continue
        dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed package"
        try:
            ep.load()
        except Exception as exc:  # a broken installed plugin: name it and its package, no traceback
            raise ConfigError(
                f"the {ENTRY_POINT_GROUP} entry point {ep.name!r} = {ep.value!r} of {dist} cannot be loaded: "
                f"{type(exc).__name__}: {exc}",
                hint=f"fix or reinstall {dist} (or uninstall it: pip uninstall {dist})") from None
        _loaded_entry_points.add(key)
        loaded.append(f"{ep.name} = {ep.value}")
    _scanned = True  # only once every entry point loaded: a broken one is reported again on the next call
    return loaded
