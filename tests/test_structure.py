"""Structure of the source tree, read from the source (``ast``), never by importing it.

Three rules, each a test (plus self-tests of the analyser on small synthetic packages):

* **No import cycles** between the project's modules (``autoprune/`` and the folders that ``pyproject.toml``
  installs inside it, from its ``package-dir``: ``agents/`` → ``autoprune.agents``, ``envs/`` →
  ``autoprune.envs``, ``search_spaces/`` → ``autoprune.search_spaces``). A file maps to its installed module
  name (``agents/rl.py`` → ``autoprune.agents.rl``, ``autoprune/graph/rules.py`` → ``autoprune.graph.rules``, a
  package's ``__init__.py`` → the package). What counts as an edge ``A -> B``:

  - every ``import`` / ``from ... import`` statement *anywhere* in ``A``: module level, inside functions and
    methods (a lazy import is a real runtime dependency that only fires later; lazy imports are how circles
    get hidden, not removed — they are marked ``[lazy]`` in the report), inside ``try`` blocks, and in the
    ``else`` branch of ``if TYPE_CHECKING``;
  - **not** imports in the body of ``if TYPE_CHECKING:``. They never execute (the modules use
    ``from __future__ import annotations``, so those names only live in annotations), hence they cannot cause
    a partially initialised module or an import-order failure, and type checkers resolve them lazily.
    Counting them would push people to untyped code or string annotations for a purely static relation.
    Cycles closed only by such imports are listed in the failure message as a note, never failed on;
  - ``from P import name`` is an edge to the submodule ``P.name`` when that is a module of the project,
    otherwise to ``P`` (the package's ``__init__``, which is what provides ``name``); relative imports are
    resolved against ``A``'s package;
  - importing ``P.X`` first runs ``P/__init__.py``: so ``A -> P.X`` also implies ``A -> P`` for every ancestor
    package ``P`` of ``P.X`` that does not contain ``A`` (inside ``P`` the package is always already being
    initialised, so that implicit edge starts nothing new). An *explicit* import of the parent package from
    inside it (``autoprune.graph.rules`` doing ``from autoprune.graph import X`` or ``from . import X`` with
    ``X`` not a submodule) is an ordinary edge, so ``P/__init__`` importing ``rules`` while ``rules`` reads
    names from ``P`` is reported as the cycle it is;
  - ``importlib.import_module("...")`` strings are not followed (the registries' plugin loading).

  Every strongly connected component of that graph fails the test; each of its edges is shown on one cycle
  (``a -> b -> a``), with the import lines that make each step.

* **No reads of another module's private names** (``_y``; dunders such as ``__version__`` are fine) for
  modules of this project: ``from x import _y``, and ``alias._y`` where ``alias`` is bound in that file to a
  project module (``import x`` / ``import x as alias`` / ``from p import x``). A private *submodule*
  (``autoprune._imports``) may be imported from inside its own package. TYPE_CHECKING imports count here
  (they still couple to another module's internals). Private names of third-party libraries are out of scope.

* **No top-level names** ``agents``, ``envs``, ``search_spaces`` in imports of the sources, benchmarks or tests
  (import statements and ``import_module("...")`` / ``__import__("...")`` literals): with the repository
  root on ``sys.path`` (as under pytest) they import a *second copy* of the package, with its own
  registries, beside ``autoprune.agents`` / ``autoprune.envs`` / ``autoprune.search_spaces``. Ruff's
  ``TID251`` banned-api rule (pyproject.toml) says the same at lint time.
"""

from __future__ import annotations

import ast
import itertools
import re
import textwrap
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = "autoprune"
BANNED_TOP_LEVEL = ("agents", "envs", "search_spaces")


# ------------------------------------------------------------------------------------------------------------
# Reading the source
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        """The package a relative import of this module starts from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


@dataclass(frozen=True)
class ImportStmt:
    node: ast.Import | ast.ImportFrom
    lineno: int
    text: str
    type_checking: bool  # in the body of `if TYPE_CHECKING:`
    lazy: bool  # inside a function


@dataclass(frozen=True)
class Target:
    """One module a statement imports, and the names it binds to modules (``alias -> module``)."""

    module: str
    binds: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str
    lineno: int
    text: str
    lazy: bool
    implicit: bool  # an ancestor package's __init__ run by importing one of its submodules

    def line(self) -> str:
        tags = (" [lazy]" if self.lazy else "") + (f"  (runs {self.dst}.__init__)" if self.implicit else "")
        return f"{self.where}:{self.lineno}: {self.text}{tags}"


Graph = Mapping[str, Mapping[str, list[Edge]]]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` → ``["a", "a.b"]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _package_dir(pyproject: str) -> dict[str, str]:
    """``[tool.setuptools] package-dir`` of a pyproject.toml text."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the inline table, read with a regular expression
        m = re.search(r"^package-dir\s*=\s*\{(.*?)\}", pyproject, re.M | re.S)
        return dict(re.findall(r'"([\w.]+)"\s*=\s*"([\w./-]+)"', m.group(1))) if m else {}
    return dict(tomllib.loads(pyproject).get("tool", {}).get("setuptools", {}).get("package-dir", {}))


class Project:
    """The modules under some package roots (installed name → folder), analysed from their source.

    Args:
        roots: Installed package name → source folder (``{"autoprune": .../autoprune, "autoprune.agents":
            .../agents, ...}``).
        base: Paths in messages are shown relative to this folder.
        top: Only imports of this namespace are followed.
    """

    def __init__(self, roots: Mapping[str, Path], base: Path, top: str = TOP) -> None:
        self.roots = dict(roots)
        self.base = base
        self.top = top
        self._parsed: dict[Path, tuple[ast.Module, tuple[str, ...]]] = {}

    @classmethod
    def from_pyproject(cls, repo: Path = REPO) -> Project:
        """The roots from ``[tool.setuptools] package-dir`` in ``repo/pyproject.toml``."""
        mapping = _package_dir((repo / "pyproject.toml").read_text()) or {TOP: TOP}
        return cls({p: repo / d for p, d in mapping.items() if _inside(p, TOP)}, repo)

    # -- files ------------------------------------------------------------------------------------------------
    def parse(self, path: Path) -> tuple[ast.Module, tuple[str, ...]]:
        if path not in self._parsed:
            source = path.read_text(encoding="utf-8")
            self._parsed[path] = (ast.parse(source, filename=str(path)), tuple(source.splitlines()))
        return self._parsed[path]

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.base)) if path.is_relative_to(self.base) else str(path)

    @cached_property
    def modules(self) -> dict[str, Module]:
        """Every ``.py`` file under the roots, by its installed module name."""
        out: dict[str, Module] = {}
        folders = list(self.roots.values())
        for pkg, folder in self.roots.items():
            for path in sorted(folder.rglob("*.py")):
                if "__pycache__" in path.parts:
                    continue
                # a folder installed under another name is walked from its own root only
                if any(f != folder and f.is_relative_to(folder) and path.is_relative_to(f) for f in folders):
                    continue
                parts = list(path.relative_to(folder).with_suffix("").parts)
                is_package = parts[-1] == "__init__"
                if is_package:
                    parts = parts[:-1]
                name = ".".join([pkg, *parts])
                out[name] = Module(name, path, is_package)
        return out

    def import_statements(self, path: Path) -> Iterator[ImportStmt]:
        """Every import statement of a file."""
        tree, lines = self.parse(path)

        def text(node: ast.stmt) -> str:
            return " ".join(line.strip() for line in lines[node.lineno - 1: node.end_lineno or node.lineno])

        def walk(node: ast.AST, tc: bool, fn: bool) -> Iterator[ImportStmt]:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield ImportStmt(node, node.lineno, text(node), tc, fn)
                return
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.body:
                    yield from walk(child, True, fn)
                for child in node.orelse:
                    yield from walk(child, tc, fn)
                return
            in_fn = fn or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                yield from walk(child, tc, in_fn)

        yield from walk(tree, False, False)

    # -- resolution -------------------------------------------------------------------------------------------
    @staticmethod
    def resolve_from(module: Module, node: ast.ImportFrom) -> str:
        """The absolute module a ``from ... import`` reads from (relative imports resolved)."""
        if not node.level:
            return node.module or ""
        base = module.package.split(".")
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    def targets(self, module: Module, node: ast.Import | ast.ImportFrom) -> list[Target]:
        """The project modules a statement imports directly (no ancestors); unresolvable ones end in ``?``."""
        mods = self.modules
        out: list[Target] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _inside(alias.name, self.top):
                    continue
                first = alias.name.split(".")[0]
                binds = ((alias.asname, alias.name),) if alias.asname else ((first, first),)
                out.append(Target(alias.name if alias.name in mods else alias.name + "?", binds))
            return out
        base = self.resolve_from(module, node)
        if not _inside(base, self.top):
            return out
        if base not in mods:
            return [Target(base + "?")]
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if alias.name != "*" and sub in mods:
                out.append(Target(sub, ((alias.asname or alias.name, sub),)))
            else:
                out.append(Target(base))
        return out

    # -- the import graph -------------------------------------------------------------------------------------
    def graph(self, type_checking: bool = False) -> tuple[Graph, list[str]]:
        """Import edges ``src -> dst -> [Edge]`` between project modules, and unresolvable project imports.

        ``type_checking=True`` adds the ``if TYPE_CHECKING:`` imports (the static graph).
        """
        mods = self.modules
        graph: dict[str, dict[str, list[Edge]]] = {name: defaultdict(list) for name in mods}
        unresolved: list[str] = []
        for name, mod in mods.items():
            for stmt in self.import_statements(mod.path):
                for t in self.targets(mod, stmt.node):
                    if t.module.endswith("?"):
                        unresolved.append(f"{self.rel(mod.path)}:{stmt.lineno}: {stmt.text}  ({t.module[:-1]} is "
                                          "not a module of the project)")
                        continue
                    if stmt.type_checking and not type_checking:
                        continue
                    dsts = [(t.module, False)] + [(a, True) for a in _ancestors(t.module) if not _inside(name, a)]
                    for dst, implicit in dsts:
                        edges = graph[name][dst]
                        if dst != name and dst in mods and not any(e.lineno == stmt.lineno for e in edges):
                            edges.append(Edge(name, dst, self.rel(mod.path), stmt.lineno, stmt.text, stmt.lazy,
                                              implicit))
        return graph, unresolved

    def cycle_report(self) -> tuple[list[list[str]], str]:
        """The import cycles (strongly connected components) and a readable report of them."""
        graph, _ = self.graph()
        comps = strongly_connected(graph)
        report = []
        for comp in comps:
            report.append(f"import cycle among {len(comp)} modules: {', '.join(comp)}")
            report += [describe_cycle(graph, c) for c in cycles_covering(graph, comp)]
        static, _ = self.graph(type_checking=True)
        only_static = [c for c in strongly_connected(static) if not any(set(c) <= set(r) for r in comps)]
        if only_static:
            report.append("not counted (cycles closed only by `if TYPE_CHECKING:` imports): "
                          + "; ".join(" <-> ".join(c) for c in only_static))
        return comps, "\n".join(report)

    # -- private names ----------------------------------------------------------------------------------------
    def private_reads(self, mod: Module) -> list[str]:
        """``from x import _y`` and ``alias._y`` reads of other project modules' private names in one file."""
        mods = self.modules
        found: list[str] = []
        aliases: dict[str, str] = {}
        for stmt in self.import_statements(mod.path):
            for t in self.targets(mod, stmt.node):
                aliases.update(t.binds)
            if not isinstance(stmt.node, ast.ImportFrom):
                continue
            base = self.resolve_from(mod, stmt.node)
            if not _inside(base, self.top) or base == mod.name:
                continue
            for alias in stmt.node.names:
                if _private(alias.name) and not (f"{base}.{alias.name}" in mods and _inside(mod.name, base)):
                    found.append(f"{self.rel(mod.path)}:{stmt.lineno}: {mod.name} reads {base}.{alias.name}  "
                                 f"({stmt.text})")
        tree, lines = self.parse(mod.path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            chain = _dotted(node)
            if chain is None or chain[0] not in aliases:
                continue
            target = aliases[chain[0]]
            for part in chain[1:-1]:  # descend through submodules: autoprune.serialize._x
                if f"{target}.{part}" not in mods:
                    break
                target = f"{target}.{part}"
            else:
                if target in mods and target != mod.name and not (
                        f"{target}.{node.attr}" in mods and _inside(mod.name, target)):
                    found.append(f"{self.rel(mod.path)}:{node.lineno}: {mod.name} reads {target}.{node.attr}  "
                                 f"({lines[node.lineno - 1].strip()})")
        return sorted(set(found))

    def all_private_reads(self) -> list[str]:
        return [line for mod in self.modules.values() for line in self.private_reads(mod)]


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (self-imports ignored), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth ≤ number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def cycles_covering(graph: Graph, comp: list[str]) -> list[list[str]]:
    """For every edge ``u -> v`` inside ``comp``, the cycle ``u -> v ⇝ u`` (shortest way back); deduplicated."""
    members = set(comp)
    seen: set[tuple[str, ...]] = set()
    out: list[list[str]] = []
    for u in comp:
        for v in sorted(graph[u]):
            if v not in members:
                continue
            prev: dict[str, str | None] = {v: None}
            queue = deque([v])
            while queue and u not in prev:
                x = queue.popleft()
                for y in sorted(graph[x]):
                    if y in members and y not in prev:
                        prev[y] = x
                        queue.append(y)
            back: list[str] = []  # u, ..., v: the shortest way from v back to u, reversed
            node: str | None = u
            while node is not None:
                back.append(node)
                node = prev[node]
            body = (u, *reversed(back[1:]))  # u -> v -> ... (-> u)
            i = body.index(min(body))
            canon = body[i:] + body[:i]
            if canon not in seen:
                seen.add(canon)
                out.append([*canon, canon[0]])
    return out


def describe_cycle(graph: Graph, cycle: list[str]) -> str:
    lines = [" -> ".join(cycle)]
    for a, b in itertools.pairwise(cycle):
        edges = graph[a][b]
        lines.append(f"    {a} -> {b}:")
        lines += [f"        {e.line()}" for e in edges[:3]]
        if len(edges) > 3:
            lines.append(f"        ... and {len(edges) - 3} more")
    return "\n".join(lines)


def second_copy_imports(paths: list[Path], base: Path) -> list[str]:
    """Imports of ``agents`` / ``envs`` / ``search_spaces`` by their top-level name in ``paths``."""
    found = []
    for path in paths:
        source = path.read_text(encoding="utf-8")
        tree, lines = ast.parse(source, filename=str(path)), source.splitlines()
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)
                  and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                       or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
                names = [node.args[0].value]
            for name in names:
                if name.split(".")[0] in BANNED_TOP_LEVEL:
                    found.append(f"{path.relative_to(base)}:{node.lineno}: {lines[node.lineno - 1].strip()}  "
                                 f"(use autoprune.{name})")
    return found


# ------------------------------------------------------------------------------------------------------------
# The rules, on this repository
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> Project:
    return Project.from_pyproject()


def test_the_module_map_matches_the_installed_names(project: Project) -> None:
    mods = project.modules
    assert mods["autoprune.agents.rl"].path == REPO / "agents" / "rl.py"
    assert mods["autoprune.search_spaces"].is_package and mods["autoprune.envs"].is_package
    assert "autoprune.evaluate" in mods and "autoprune.models.small_cnn" in mods
    assert not [n for n in mods if not _inside(n, TOP)]


def test_no_import_cycles(project: Project) -> None:
    comps, report = project.cycle_report()
    assert not comps, (f"{len(comps)} import cycle(s) (TYPE_CHECKING-only imports are not counted, lazy "
                       f"function-level imports are):\n{report}")


def test_project_imports_resolve(project: Project) -> None:
    _, unresolved = project.graph(type_checking=True)
    assert not unresolved, "imports of project modules that do not exist:\n" + "\n".join(unresolved)


def test_no_reads_of_other_modules_private_names(project: Project) -> None:
    found = project.all_private_reads()
    assert not found, (f"{len(found)} read(s) of another module's private names (make the name public, move "
                       "the code to where it belongs, or pass it in):\n" + "\n".join(found))


def test_no_top_level_second_copy_imports(project: Project) -> None:
    files = [m.path for m in project.modules.values()]
    for folder in ("tests", "benchmarks"):
        files += sorted(p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)
    found = second_copy_imports(files, REPO)
    assert not found, ("imports of agents / envs / search_spaces by their top-level name (a second copy of the "
                       "package, with its own registries):\n" + "\n".join(found))


# ------------------------------------------------------------------------------------------------------------
# Self-tests of the analyser on synthetic packages
# ------------------------------------------------------------------------------------------------------------


def _tree(tmp: Path, files: dict[str, str]) -> Project:
    for name, text in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return Project({"autoprune": tmp / "autoprune", "autoprune.agents": tmp / "agents"}, tmp)


def test_analyser_finds_lazy_relative_and_parent_package_cycles(tmp_path: Path) -> None:
    p = _tree(tmp_path, {
        "autoprune/__init__.py": "",
        "autoprune/a.py": "def f():\n    from autoprune import b\n",            # lazy
        "autoprune/b.py": "from .a import f\n",                                  # relative
        "autoprune/pkg/__init__.py": "from .rules import R\n",
        "autoprune/pkg/rules.py": "from autoprune.pkg import helper\nR = 1\n",  # reads the parent's namespace
        "agents/__init__.py": "",
        "agents/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from autoprune.agents.y import Y\n",
        "agents/y.py": "from .x import *\n",                                      # TYPE_CHECKING-only cycle
    })
    comps, report = p.cycle_report()
    assert comps == [["autoprune.a", "autoprune.b"], ["autoprune.pkg", "autoprune.pkg.rules"]]
    assert "autoprune.a -> autoprune.b -> autoprune.a" in report
    assert "autoprune/a.py:2: from autoprune import b [lazy]" in report
    assert "autoprune.pkg -> autoprune.pkg.rules -> autoprune.pkg" in report
    assert "autoprune.agents.x <-> autoprune.agents.y" in report  # noted, not failed on


def test_analyser_accepts_submodule_imports_inside_a_package_and_follows_init_from_outside(tmp_path: Path) -> None:
    p = _tree(tmp_path, {
        "autoprune/__init__.py": "",
        "autoprune/pkg/__init__.py": "from .rules import R\nfrom autoprune import user\n",
        "autoprune/pkg/core.py": "C = 1\n",
        "autoprune/pkg/rules.py": "from autoprune.pkg.core import C\nfrom . import core\nR = C\n",
        "autoprune/user.py": "X = 1\n",
        "autoprune/other.py": "from autoprune.pkg.core import C\n",
        "agents/__init__.py": "",
    })
    assert p.cycle_report()[0] == []
    # user.py reaching pkg.core from outside runs pkg/__init__, which imports user: a cycle
    (tmp_path / "autoprune/user.py").write_text("from autoprune.pkg.core import C\n")
    p = Project(p.roots, tmp_path)
    comps, report = p.cycle_report()
    assert comps == [["autoprune.pkg", "autoprune.user"]]
    assert "(runs autoprune.pkg.__init__)" in report


def test_analyser_finds_private_reads_and_unresolved_imports(tmp_path: Path) -> None:
    p = _tree(tmp_path, {
        "autoprune/__init__.py": "__version__ = '1'\n",
        "autoprune/_helpers.py": "def h(): ...\n",
        "autoprune/s.py": "_T = {}\ndef _u(): ...\n",
        "autoprune/q.py": textwrap.dedent("""\
            import autoprune.s
            from autoprune import s as ser
            from autoprune import _helpers, __version__
            from autoprune.s import _u
            import torch
            x = ser._T
            y = autoprune.s._u
            z = torch._C
            w = ser.__name__
            from autoprune.missing import thing
            """),
        "agents/__init__.py": "",
        "agents/z.py": "from autoprune import _helpers\n",
    })
    reads = p.all_private_reads()
    assert [r.split(": ", 1)[1].split("  ")[0] for r in reads] == [
        "autoprune.q reads autoprune.s._u", "autoprune.q reads autoprune.s._T", "autoprune.q reads autoprune.s._u"]
    _, unresolved = p.graph()
    assert len(unresolved) == 1 and "autoprune.missing" in unresolved[0]


def test_second_copy_detection(tmp_path: Path) -> None:
    f = tmp_path / "t.py"
    f.write_text("import agents.rl\nfrom search_spaces import build_space\nimport importlib\n"
                 "importlib.import_module('envs')\nfrom autoprune.envs import make_env\nfrom . import envs\n")
    found = second_copy_imports([f], tmp_path)
    assert [line.split(":")[1] for line in found] == ["1", "2", "4"]
