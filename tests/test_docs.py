"""The project's documentation in ``docs/`` answers every citation the code makes.

The sources cite the design pages by section: ``ENGINE.md §3.4``, ``ALGORITHMS.md §4.1–4.3`` (a range),
``ENGINE.md §6.3, §9 case 25`` (a list), ``AMC §1.1 and HAQ §2.1 of ALGORITHMS.md`` (sections before the name),
``docs/ALGORITHMS.md §5`` and plain ``ALGORITHMS.md``. These tests scan the source folders (``autoprune/``,
``agents/``, ``envs/``, ``search_spaces/``, ``benchmarks/``, ``tests/``; Python, YAML and TOML files) and check
that every cited page exists under ``docs/`` and that every cited section number is a heading of that page.

Heading format (parsed here): ``## 7. Title`` for a section, ``### 7.4 Title`` (or deeper ``#``) for a
subsection; a numbered item written ``- **5.5.5** text`` also counts, so ``§5.5.5`` may be cited.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCE_DIRS = ("autoprune", "agents", "envs", "search_spaces", "benchmarks", "tests")
SUFFIXES = frozenset({".py", ".yaml", ".yml", ".toml"})
DOC_NAMES = ("ENGINE", "ALGORITHMS", "LAYOUT", "DESIGN")
SKIP = frozenset({Path(__file__).resolve()})  # this file's examples are not citations

_NUM = r"\d+(?:\.\d+)*"
_REF = rf"{_NUM}(?:\s*[–—-]\s*{_NUM})?"
_NAME = rf"(?:docs/)?\b(?P<doc>{'|'.join(DOC_NAMES)})\.md"
_GAP = r"[\s#*]*"  # whitespace and comment/emphasis markers, also across wrapped lines
# "ENGINE.md §6.3, §9 case 25": the section list right after the page name.
_AFTER = re.compile(
    rf"{_NAME}(?P<refs>(?:{_GAP}§{_REF}(?:\s+(?:case|property|item)\s+\w+)?\s*(?:,|and)?)*)")
# "AMC §1.1 and HAQ §2.1 of ALGORITHMS.md": the section list before "of <page>".
_BEFORE = re.compile(
    rf"(?P<refs>§{_REF}(?:\s*(?:,|and)\s*(?:[A-Za-z]+\s+)?§{_REF})*)\s+of\s+{_NAME}")
_SECTION = re.compile(rf"§\s*(?P<ref>{_REF})")
_HEADING = re.compile(r"^#{2,6}\s+(?P<num>\d+(?:\.\d+)*)\.?\s+\S")
_ITEM = re.compile(r"^\s*(?:[-*]|\d+\.)\s+\*\*(?P<num>\d+(?:\.\d+)+)\*\*")
_LINK = re.compile(r"\]\((?P<target>[^)#\s]+\.md)(?:#[^)]*)?\)")


@dataclass(frozen=True)
class Citation:
    """One reference from a source file to a documentation page (and possibly sections of it)."""

    path: str
    line: int
    doc: str
    sections: tuple[str, ...]
    text: str

    def where(self) -> str:
        """``file:line`` of the citation."""
        return f"{self.path}:{self.line}"


def expand(ref: str) -> list[str]:
    """Section numbers of one reference: ``"3.4"`` → [3.4]; ``"3–4"`` → [3, 4]; ``"4.1–4.3"`` → [4.1, 4.2, 4.3].

    A range whose ends differ only in their last component lists every number in between; any other range is
    checked at its two ends.
    """
    parts = re.split(r"\s*[–—-]\s*", ref.strip())
    if len(parts) == 1:
        return [parts[0]]
    lo, hi = parts[0].split("."), parts[1].split(".")
    if len(lo) == len(hi) and lo[:-1] == hi[:-1] and int(lo[-1]) <= int(hi[-1]):
        return [".".join([*lo[:-1], str(k)]) for k in range(int(lo[-1]), int(hi[-1]) + 1)]
    return [parts[0], parts[1]]


def parse(text: str, path: str = "<text>") -> list[Citation]:
    """Every citation of a documentation page in ``text``, with the line of the page name."""
    found: list[Citation] = []
    spans: set[int] = set()
    for pattern in (_BEFORE, _AFTER):
        for m in pattern.finditer(text):
            start = m.start("doc")
            if start in spans:  # already read by the "... of PAGE.md" form
                continue
            spans.add(start)
            sections = tuple(s for r in _SECTION.finditer(m.group("refs")) for s in expand(r.group("ref")))
            line = text.count("\n", 0, start) + 1
            found.append(Citation(path, line, m.group("doc"), sections, " ".join(m.group(0).split())))
    return sorted(found, key=lambda c: (c.path, c.line, c.doc))


def source_files() -> list[Path]:
    """The scanned files, in a stable order."""
    files = []
    for folder in SOURCE_DIRS:
        for p in sorted((ROOT / folder).rglob("*")):
            if p.suffix in SUFFIXES and p.is_file() and p.resolve() not in SKIP and "__pycache__" not in p.parts:
                files.append(p)
    return files


def citations() -> list[Citation]:
    """Every citation in the scanned source files."""
    out: list[Citation] = []
    for p in source_files():
        out.extend(parse(p.read_text(encoding="utf-8", errors="replace"), str(p.relative_to(ROOT))))
    return out


def headings(doc: Path) -> list[str]:
    """Section numbers of a documentation page (numbered headings and numbered bold items), in order."""
    out = []
    fence = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        m = _HEADING.match(line) or _ITEM.match(line)
        if m:
            out.append(m.group("num"))
    return out


@pytest.fixture(scope="module")
def cited() -> list[Citation]:
    return citations()


# ----------------------------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------------------------


def test_parser_reads_single_ranges_lists_and_the_of_form() -> None:
    text = "\n".join([
        "a (ENGINE.md §3–4).",
        "b (ALGORITHMS.md §4.1–4.3).",
        "c (ENGINE.md §6.3, §9 case 25): structural",
        "d ENGINE.md §3.4 correctness criterion, not §8",
        "e (AMC §1.1 and HAQ §2.1 of ALGORITHMS.md).",
        "f Conventions (ALGORITHMS.md): error",
        "g (docs/ALGORITHMS.md §5):",
        "# h DMCP (docs/ALGORITHMS.md",
        "#   §5) wrapped",
        "i see DESIGN.md and LAYOUT.md.",
    ])
    got = [(c.line, c.doc, c.sections) for c in parse(text)]
    assert got == [
        (1, "ENGINE", ("3", "4")),
        (2, "ALGORITHMS", ("4.1", "4.2", "4.3")),
        (3, "ENGINE", ("6.3", "9")),
        (4, "ENGINE", ("3.4",)),
        (5, "ALGORITHMS", ("1.1", "2.1")),
        (6, "ALGORITHMS", ()),
        (7, "ALGORITHMS", ("5",)),
        (8, "ALGORITHMS", ("5",)),
        (10, "DESIGN", ()),
        (10, "LAYOUT", ()),
    ]


def test_expand_ranges() -> None:
    assert expand("7") == ["7"]
    assert expand("3–4") == ["3", "4"]
    assert expand("4.1–4.3") == ["4.1", "4.2", "4.3"]
    assert expand("2.4 - 3.1") == ["2.4", "3.1"]


def test_heading_format(tmp_path: Path) -> None:
    page = tmp_path / "X.md"
    page.write_text("# Title\n\n## 1. One\n### 1.2 Sub\n```\n## 9. in a code block\n```\n- **1.2.3** item\n"
                    "#### 1.2.4 Deep\n## Unnumbered\n")
    assert headings(page) == ["1", "1.2", "1.2.3", "1.2.4"]


def test_the_scan_finds_the_citations(cited: list[Citation]) -> None:
    assert len(cited) >= 30, "the citation scanner found suspiciously few citations"
    assert {c.doc for c in cited} >= {"ENGINE", "ALGORITHMS"}
    assert any(c.sections for c in cited if c.doc == "ENGINE")
    assert any(c.sections for c in cited if c.doc == "ALGORITHMS")


# ----------------------------------------------------------------------------------------------------------------
# The documentation answers the code
# ----------------------------------------------------------------------------------------------------------------


def test_every_cited_page_exists(cited: list[Citation]) -> None:
    missing = [f"{c.where()}: {c.text!r} — no docs/{c.doc}.md" for c in cited if not (DOCS / f"{c.doc}.md").is_file()]
    assert not missing, "citations of pages that are not in docs/:\n" + "\n".join(missing)


def test_no_citation_of_a_design_page_outside_docs(cited: list[Citation]) -> None:
    design = [c for c in cited if c.doc == "DESIGN"]
    if design:
        assert (DOCS / "DESIGN.md").is_file(), (
            "DESIGN.md is cited but the design content lives in docs/LAYOUT.md; repoint these:\n"
            + "\n".join(f"{c.where()}: {c.text!r}" for c in design))


def test_every_cited_section_is_a_heading(cited: list[Citation]) -> None:
    known = {p.stem: set(headings(p)) for p in DOCS.glob("*.md")}
    bad = []
    for c in cited:
        have = known.get(c.doc)
        if have is None:
            continue  # reported by test_every_cited_page_exists
        bad += [f"{c.where()}: {c.text!r} — no section {s} in docs/{c.doc}.md" for s in c.sections if s not in have]
    assert not bad, "cited sections without a heading:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", ["ENGINE", "ALGORITHMS", "LAYOUT"])
def test_pages_have_unique_section_numbers(page: str) -> None:
    path = DOCS / f"{page}.md"
    assert path.is_file(), f"docs/{page}.md is missing"
    nums = headings(path)
    assert nums, f"docs/{page}.md has no numbered headings"
    dupes = sorted({n for n in nums if nums.count(n) > 1})
    assert not dupes, f"docs/{page}.md numbers these sections twice: {dupes}"
    for n in nums:  # every subsection sits under its parent section
        parent = n.rsplit(".", 1)[0]
        assert "." not in n or parent in nums, f"docs/{page}.md: section {n} has no parent section {parent}"


def test_links_between_pages_resolve() -> None:
    broken = []
    for page in sorted(DOCS.glob("*.md")):
        for m in _LINK.finditer(page.read_text(encoding="utf-8")):
            target = m.group("target")
            if "://" not in target and not (page.parent / target).is_file():
                broken.append(f"docs/{page.name} -> {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_points_to_the_docs() -> None:
    assert "docs/" in (ROOT / "README.md").read_text(encoding="utf-8")
