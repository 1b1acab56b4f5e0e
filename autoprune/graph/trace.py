"""The torch.fx front-end: trace a model, rebuild untraceable submodules through torch.export or make them leaves."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

from torch import fx, nn

from autoprune.errors import AutoPruneError, ConfigError
from autoprune.graph.common import close_hint
from autoprune.graph.export_trace import ExportFailure, export_front_end

__all__ = ["trace"]

_MAX_RETRACES = 64


class _Tracer(fx.Tracer):
    """``symbolic_trace`` with extra leaves, remembering which submodule a trace failure came from."""

    def __init__(self, leaf_names: set[str], leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_names = leaf_names
        self.leaf_types = leaf_types
        self.failed: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                try:
                    self.failed = self.path_of_module(m)
                except NameError:
                    self.failed = None
            raise


def _normalize_type() -> tuple[type, ...]:
    """The model zoo's input normalisation layer (always a leaf), if the zoo is importable."""
    try:
        from autoprune.models.layers import Normalize
    except Exception:  # the model zoo is optional for the engine
        return ()
    return (Normalize,)


def _with_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """A shallow copy of ``root`` whose submodule ``path`` is ``new`` (``root`` itself is not modified)."""
    head, _, rest = path.partition(".")
    out = copy.copy(root)
    out._modules = dict(root._modules)
    out._modules[head] = _with_submodule(root._modules[head], rest, new) if rest else new
    return out


def _drop_new_attributes(root: nn.Module, before: set[str]) -> None:
    """Remove what tracing added to ``root``: fx stows tensor constants on the traced root (``_tensor_constant0``)."""
    for key in set(root.__dict__) - before:
        del root.__dict__[key]


def trace(model: nn.Module, opaque: Sequence[type[nn.Module] | str], args: tuple[Any, ...] | None = None,
          exported: list[str] | None = None) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace ``model``; untraceable submodules go through torch.export or become leaves.

    Args:
        model: The network (a ``GraphModule`` is taken as it is).
        opaque: Module classes or name patterns analysed as leaves.
        args: Positional example inputs; without them the torch.export front-end is not tried.
        exported: The names of the modules rebuilt through ``torch.export`` are appended to it.

    Returns:
        The graph module and, per leaf module, why it is a leaf (its boundary channels get frozen). Tensors that
        are not parameters or buffers of ``model`` (constants computed while tracing) are buffers of the graph
        module only: ``model`` is left without the attributes fx stows them in.

    Raises:
        AutoPruneError: If the model's own ``forward`` cannot be traced or rebuilt.
        ConfigError: If an ``opaque`` pattern matches no submodule.
    """
    names = dict(model.named_modules())
    leaf_types = tuple(o for o in opaque if isinstance(o, type)) + _normalize_type()
    patterns = [o for o in opaque if isinstance(o, str)]
    leaf_names: set[str] = set()
    reasons: dict[str, str] = {}
    for pat in patterns:
        hits = [n for n in names if n and fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(f"opaque module {pat!r} matches no submodule of {type(model).__name__}",
                              hint=close_hint(pat, [n for n in names if n]))
        for n in hits:
            leaf_names.add(n)
            reasons[n] = f"opaque module {n} ({type(names[n]).__name__})"
    for n, m in names.items():
        if n and leaf_types and isinstance(m, leaf_types):
            reasons.setdefault(n, f"opaque module {n} ({type(m).__name__})")
    if isinstance(model, fx.GraphModule):
        return model, reasons
    exported = exported if exported is not None else []
    work = model
    last_error: Exception | None = None
    for _ in range(_MAX_RETRACES):
        tracer = _Tracer(leaf_names, leaf_types)
        before = set(work.__dict__)
        try:
            graph = tracer.trace(work)
        except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError … depending on the construct
            _drop_new_attributes(work, before)
            last_error = exc
            bad = tracer.failed
            if bad in leaf_names:
                bad = None
            why = "torch.export front-end not tried"
            if args is not None and bad not in exported:
                try:
                    rebuilt = export_front_end(model, bad or "", args, leaf_types, leaf_names)
                except ExportFailure as fail:
                    why = f"torch.export front-end: {fail}"
                else:
                    exported.append(bad or "")
                    if not bad:
                        return rebuilt, reasons
                    work = _with_submodule(work, bad, rebuilt)
                    continue
            if not bad:
                raise AutoPruneError(
                    f"torch.fx cannot trace {type(model).__name__}.forward: {type(exc).__name__}: {exc}\n({why})",
                    hint="move the data-dependent code into a submodule (it is then analysed as an opaque "
                    "leaf), or pass opaque=(...) with the offending module class or name",
                ) from exc
            leaf_names.add(bad)
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reasons[bad] = f"untraceable module {bad} ({type(names[bad]).__name__}: {type(exc).__name__}: " \
                           f"{first_line[:80]}; {why}) analysed as an opaque leaf"
            continue
        try:
            gm = fx.GraphModule(tracer.root, graph, type(model).__name__)  # copies the stowed constants
        finally:
            _drop_new_attributes(work, before)
        return gm, reasons
    raise AutoPruneError(f"tracing {type(model).__name__} failed after {_MAX_RETRACES} attempts: {last_error}")

