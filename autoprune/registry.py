"""A small name → object registry with helpful errors.

Models, datasets, importance criteria, evaluators, rewards and searchers are all picked by name from a
:class:`Registry`. Unknown names are answered with the list of choices and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from autoprune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (usually classes or factory functions).

    Args:
        kind: What the registry holds, used in error messages (e.g. ``"model"``).

    Example:
        >>> MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
        >>> @MODELS.register("resnet20")
        ... def resnet20(num_classes: int = 10) -> nn.Module: ...
        >>> MODELS.get("resnet20")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None, *, help: str = "") -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted.

        Raises:
            ValueError: If ``name`` is already registered.
        """

        def _add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            doc = help or (getattr(item, "__doc__", None) or "").strip().split("\n")[0]
            self._help[name] = doc
            return item

        if obj is not None:
            return _add(obj)
        return _add

    def get(self, name: str) -> T:
        """Return the object registered as ``name``.

        Raises:
            ConfigError: If the name is unknown; the message lists the choices and the closest match.
        """
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        """The message used for an unknown ``name``."""
        close = difflib.get_close_matches(str(name), list(self._items), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Choices: {', '.join(sorted(self._items))}"

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def help(self, name: str) -> str:
        """One-line description of ``name`` (first docstring line unless given at registration)."""
        return self._help.get(name, "")

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Inside the block entries may be registered (a test's plugin); afterwards the registry is as before."""
        items, helps = dict(self._items), dict(self._help)
        try:
            yield
        finally:
            self._items, self._help = items, helps
