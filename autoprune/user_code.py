"""Importing the user's own code: plugin modules and ``package.module:callable`` import strings.

One rule for every place that names user code (``model.name``, ``dataset.name``, ``plugins:``, ``--plugin``):

* the name comes only from the user's own config or command line, never from a file autoprune wrote (a
  checkpoint, a trial store, ``space.json`` or an exported model);
* the module is imported with :func:`importlib.import_module` (nothing is evaluated), with the working
  directory appended to ``sys.path`` so ``./mymodels.py`` is found from the console script as from ``python``;
* every failure is a :class:`~autoprune.errors.ConfigError` whose message names the module and shows the error,
  and whose hint says what to fix (no traceback for a user's typo or a broken module).

This module imports only the standard library and :mod:`autoprune.errors`, so names can be checked before torch
is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from autoprune.errors import ConfigError

__all__ = ["find_import_string", "import_user_module", "resolve_import_string", "split_import_string"]


def _cwd_on_path() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)


def _not_found(name: str, exc: ModuleNotFoundError) -> bool:
    """True if ``exc`` says the module ``name`` itself (or a package above it) does not exist."""
    missing = exc.name or ""
    return bool(missing) and (name == missing or name.startswith(missing + "."))


def import_user_module(name: str, what: str) -> ModuleType:
    """Import the user's module ``name``.

    Args:
        name: Dotted module name.
        what: The module as the message names it (e.g. ``"plugins[0]: plugin module 'x'"``,
            ``"module 'x' of model 'x:build'"``).

    Raises:
        ConfigError: The module (or a package above it) cannot be found, a module it needs is missing, or it
            raised while it was imported.
    """
    _cwd_on_path()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if _not_found(name, exc):
            raise ConfigError(
                f"{what} cannot be imported: {exc}",
                hint=f"check the spelling; the directory holding {name.split('.')[0]!r} (a .py file or a package) "
                "must be on PYTHONPATH or the current directory, or its package installed") from None
        raise ConfigError(f"{what} cannot be imported: {exc}",
                          hint=f"install the package {exc.name!r} that {name!r} needs") from None
    except Exception as exc:  # the user's module failed while importing: name it, no traceback
        raise ConfigError(f"{what} raised {type(exc).__name__} while it was imported: {exc}",
                          hint=f"fix the error in that module (`python -c 'import {name}'` shows the traceback)"
                          ) from None


def split_import_string(spec: str, kind: str, example: str) -> tuple[str, str]:
    """``"package.module:callable"`` → ``("package.module", "callable")``.

    Args:
        spec: The import string.
        kind: What it names (``"model"``, ``"dataset"``), for the message.
        example: An example for the hint, e.g. ``"mymodels:build_net"``.

    Raises:
        ConfigError: Without a module, without an attribute, or with more than one ``:``.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path or ":" in attr_path:
        module_file = example.partition(":")[0]
        raise ConfigError(f"malformed {kind} import string {spec!r}",
                          hint=f"use 'package.module:callable', e.g. {example!r} for "
                          f"{example.partition(':')[2]} in ./{module_file}.py")
    return module_name, attr_path


def find_import_string(spec: str, kind: str, example: str) -> None:
    """Check that the module of ``spec`` can be found, without importing (running) it.

    Raises:
        ConfigError: Malformed string, or no such module.
    """
    module_name, _ = split_import_string(spec, kind, example)
    _cwd_on_path()
    try:
        found = importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or fails to import
        found = False
    if not found:
        raise ConfigError(f"cannot find module {module_name!r} of {kind} {spec!r}",
                          hint="check the spelling, and that the module is installed or lies in the current "
                          "directory")


def resolve_import_string(spec: str, kind: str, example: str, callable_hint: str) -> Callable[..., Any]:
    """Import the callable named by ``package.module:callable`` (``module:Class.method`` works too).

    Args:
        spec: The import string.
        kind: What it names (``"model"``, ``"dataset"``), for the messages.
        example: An example for the malformed-string hint.
        callable_hint: The hint when the attribute is not callable.

    Raises:
        ConfigError: Malformed string, module missing or failing to import, attribute missing or not callable.
    """
    module_name, attr_path = split_import_string(spec, kind, example)
    obj: Any = import_user_module(module_name, f"module {module_name!r} of {kind} {spec!r}")
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            raise ConfigError(f"module {module_name!r} has no attribute {attr_path!r} ({kind} {spec!r})",
                              hint=f"callables it defines: {', '.join(public[:20]) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{kind} {spec!r} is not callable (it is a {type(obj).__name__})", hint=callable_hint)
    return obj
