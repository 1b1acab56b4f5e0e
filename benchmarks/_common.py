"""Shared benchmark plumbing: machine/commit/command header and writing results under results/benchmarks/."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "benchmarks"
SHARED = Path(os.environ.get("AUTOPRUNE_SHARED", REPO.parent / "shared"))
CIFAR10_DIR = SHARED / "data" / "cifar-10-batches-bin"
WEIGHTS_DIR = SHARED / "weights"


def git_commit() -> str:
    """Short commit of the working tree (``+dirty`` when it has uncommitted changes)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """One line describing the machine the benchmark ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def command_line() -> str:
    """The exact command that is running, as a user would type it."""
    return "python -m " + " ".join(shlex.quote(a) for a in [_module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None and spec.name else Path(sys.argv[0]).stem


def result_path(name: str, suffix: str = ".md") -> Path:
    """``results/benchmarks/<name><suffix>`` (folder created).

    A run with ``--quick`` gets ``<name>_quick<suffix>`` instead, so smoke runs never replace full results.
    """
    if "--quick" in sys.argv[1:] and not name.endswith("_quick"):
        name += "_quick"
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}{suffix}"


def write_json(name: str, data: Any, *, indent: int = 1) -> Path:
    """Write the raw numbers of a benchmark to :func:`result_path` ``(name, ".json")``; return the path."""
    path = result_path(name, ".json")
    path.write_text(json.dumps(data, indent=indent, default=str))
    return path


def write_result(name: str, title: str, body_md: str, *, command: str | None = None) -> Path:
    """Write ``results/benchmarks/<name>.md`` with a header (date, commit, machine, command) and ``body_md``.

    A run with ``--quick`` writes ``<name>_quick.md`` instead, so smoke runs never replace the full tables.
    """
    path = result_path(name)
    header = (
        f"# {title}\n\n"
        f"- command: `{command or command_line()}`\n"
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- commit: {git_commit()}\n"
        f"- machine: {machine()}\n\n"
    )
    path.write_text(header + body_md.rstrip() + "\n")
    return path
