"""Reliability soak: killed and resumed campaigns, workers and a database server that go away, fuzzed input, full
and read-only disks, and the test suite on a busy machine (issue #24).

Every promise of the README's "What is guaranteed" is exercised many times, and every run checks the invariants
itself: each finished trial is kept, none is counted twice, a campaign ends with exactly ``n_trials``, the store
passes its integrity check, and a process ends with exit 0, or 2 with ``error:``/``hint:`` — never a traceback.

The work is a list of *cells* (``benchmarks/_reliability/``: ``kills``, ``fuzz``, ``disk``; the suite cells are
here). Each finished cell is written to ``results/benchmarks/reliability.json`` at once, so a run can stop at any
moment and continue with ``--resume``, and the cells can be split across processes (``--part 1/2`` and
``--part 2/2``, each with ``--resume``; the JSON is merged under a file lock). ``--minutes M`` stops starting
new cells after M minutes. The Markdown table (``reliability.md``) and the headline are rebuilt from the JSON
after every cell.

Usage::

    python -m benchmarks.bench_reliability [--quick] [--resume] [--only kill,fuzz] [--part I/N] [--minutes M]

Not part of CI's default path: the full form takes about an hour on a 2-core machine (the three test-suite runs
under load alone take ~25 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import REPO, command_line, result_path, write_result
from benchmarks._reliability import CellResult, Log

PARTS = ("kills", "fuzz", "disk")
SUITE_RUNS = 3
SIGINT_TEST = "tests/test_cli_campaign.py::test_sigkill_and_sigint_then_resume_give_the_uninterrupted_trials"
SIGINT_RUNS = 20
GOALS = {"kill_cycles": 100, "postgres_workers": 4, "server_restarts": 3, "fuzzed_inputs": 1000}
COUNTERS = ("kill_cycles", "postgres_workers", "server_restarts", "fuzzed_inputs", "lost_trials",
            "duplicate_trials", "unhandled_exceptions")


def _log(msg: str) -> None:
    print(f"[reliability {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- the cells


def suite_cells(quick: bool) -> list[str]:
    """The test-suite-under-load cells: the README's test command three times, the SIGINT test 20 times."""
    if quick:
        return ["suite|quick"]
    return [f"suite|{i}" for i in range(1, SUITE_RUNS + 1)] + [f"sigint|{SIGINT_RUNS}"]


def stress(args: Sequence[str], log: Log, timeout: float) -> tuple[int, list[str], float]:
    """Run ``scripts/stress_test_suite.sh ARGS`` (two CPU burners beside the command); its exit code, the lines
    it printed and the seconds it took."""
    start = time.perf_counter()
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "stress_test_suite.sh"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            log(line.rstrip())
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the script's trap stops its burners
            proc.wait(timeout=60)
    return rc, lines, time.perf_counter() - start


def run_suite_cell(name: str, work: Path, seed: int, log: Log, quick: bool = False) -> CellResult:
    """One run of the README's test command (or the SIGINT test N times) beside two CPU burners."""
    del work, seed
    kind, _, arg = name.partition("|")
    res = CellResult()
    py = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
    if kind == "suite" and arg == "quick":
        cmd = ["-r", "1", "-b", "2", "--", py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "tests/test_interrupts.py"]
    elif kind == "suite":
        cmd = ["-r", "1", "-b", "2"]  # the README's `make test`
    else:
        cmd = ["-r", arg, "-b", "2", "--", py, "-m", "pytest", "-q", "-p", "no:cacheprovider", SIGINT_TEST]
    rc, lines, seconds = stress(cmd, log, timeout=3 * 3600)
    runs = [ln for ln in lines if ln.startswith("run ")]
    failed = [ln for ln in runs if "FAILED" in ln]
    res.details = {"command": "scripts/stress_test_suite.sh " + " ".join(cmd), "exit": rc, "runs": len(runs),
                   "failed": len(failed), "lines": runs[-25:], "summary": lines[-1] if lines else "",
                   "seconds": seconds}
    for ln in failed:
        res.fail(ln)
    if rc != 0 and not failed:
        res.fail(f"stress script exited {rc}: {lines[-1] if lines else ''}")
    return res


def cell_table(quick: bool) -> dict[str, tuple[str, Any]]:
    """Every cell name → (part, run function), in run order."""
    table: dict[str, tuple[str, Any]] = {}
    for part in PARTS:
        mod = importlib.import_module(f"benchmarks._reliability.{part}")
        for name in mod.CELLS:
            table[name] = (part, mod.run_cell)
    for name in suite_cells(quick):
        table[name] = ("suite", run_suite_cell)
    return table


# ------------------------------------------------------------------------------------------- the JSON file


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``path`` (processes of a split run merge their cells one at a time)."""
    with open(f"{path}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_raw(path: Path) -> dict[str, Any]:
    """The JSON on disk, or an empty record (a damaged file is kept aside, never silently replaced)."""
    if not path.exists():
        return {"cells": {}, "errors": {}, "runs": []}
    try:
        raw = json.loads(path.read_text())
        raw.setdefault("cells", {})
        raw.setdefault("errors", {})
        raw.setdefault("runs", [])
        return raw
    except (json.JSONDecodeError, UnicodeDecodeError):
        aside = path.with_suffix(f".damaged-{int(time.time())}.json")
        shutil.copyfile(path, aside)
        _log(f"{path.name} was not valid JSON: kept as {aside.name}, starting a new record")
        return {"cells": {}, "errors": {}, "runs": []}


def update(path: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``change`` to the JSON on disk under the lock, refresh the headline, write it atomically; return it.

    Processes of a split run each merge only their own cells, so none overwrites another's."""
    with locked(path):
        raw = read_raw(path)
        change(raw)
        raw["headline"] = headline(raw)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(raw, indent=1, default=str))
        os.replace(tmp, path)
        return raw


def save_cell(path: Path, name: str, record: Mapping[str, Any] | None, error: str | None = None) -> dict[str, Any]:
    """Merge one finished cell (``record``) or one harness crash (``error``) into the JSON on disk."""
    def change(raw: dict[str, Any]) -> None:
        if record is not None:
            raw["cells"][name] = dict(record)
            raw["errors"].pop(name, None)
        if error is not None:
            raw["errors"][name] = error
    return update(path, change)


def headline(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's headline, summed over the finished cells."""
    cells = raw.get("cells", {})
    total = {k: 0 for k in COUNTERS}
    for rec in cells.values():
        for k in COUNTERS:
            v = int(rec.get(k, 0))
            total[k] = max(total[k], v) if k == "postgres_workers" else total[k] + v
    suite = [rec for name, rec in cells.items() if name.startswith("suite|")]
    return {**total, "suite_runs_under_load": sum(int(r["details"].get("runs", 0)) for r in suite),
            "suite_failures_under_load": sum(int(r["details"].get("failed", 0)) for r in suite)}


# ---------------------------------------------------------------------------------------------- the report


def _goal(key: str, value: int) -> str:
    if key in GOALS:
        return "met" if value >= GOALS[key] else f"goal ≥ {GOALS[key]}"
    if key == "suite_runs_under_load":
        return "met" if value >= SUITE_RUNS else f"goal {SUITE_RUNS}"
    return "met" if value == 0 else "goal 0"


def summarise(raw: Mapping[str, Any], table: Mapping[str, tuple[str, Any]], quick: bool) -> str:
    """The Markdown body: headline, one row per cell, violations, missing cells, how to continue."""
    cells = raw.get("cells", {})
    head = raw.get("headline") or headline(raw)
    done = [n for n in table if n in cells]
    lines = ["Each cell checks the invariants itself after every fault: every finished trial kept (lost_trials), "
             "none counted twice (duplicate_trials), exactly n_trials at the end, the store's integrity check, "
             "and exit 0, or 2 with `error:`/`hint:` and no traceback (unhandled_exceptions). The suite cells run "
             "`scripts/stress_test_suite.sh` (two CPU-burning processes beside the command).", "",
             f"Status: {len(done)} of {len(table)} cells done" + (" (complete)." if len(done) == len(table) else
                                                                   "; continue with `--resume`."), "",
             "## Headline", "", "| figure | value | |", "|---|---|---|"]
    for k, v in head.items():
        lines.append(f"| {k} | {v} | {'' if quick else _goal(k, int(v))} |")
    lines += ["", "## Cells", "", "| cell | seconds | kill cycles | pg workers | server restarts | fuzzed | lost | "
              "duplicate | unhandled | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in table:
        rec = cells.get(name)
        if rec is None:
            err = raw.get("errors", {}).get(name)
            lines.append(f"| {name} | | | | | | | | | {'harness error (see below)' if err else 'not run yet'} |")
            continue
        det = rec.get("details", {})
        note = str(det.get("summary") or det.get("note") or "")[:120].replace("|", "/")
        lines.append(f"| {name} | {rec.get('seconds', 0):.0f} | {rec['kill_cycles']} | {rec['postgres_workers']} | "
                     f"{rec['server_restarts']} | {rec['fuzzed_inputs']} | {rec['lost_trials']} | "
                     f"{rec['duplicate_trials']} | {rec['unhandled_exceptions']} | {note} |")
    violations = [(n, f) for n, rec in cells.items() for f in rec.get("failures", [])]
    lines += ["", "## Violations", ""]
    lines += [f"- `{n}`: {f}" for n, f in violations] or ["None."]
    if raw.get("errors"):
        lines += ["", "## Harness errors (cells to run again)", ""]
        lines += [f"- `{n}`: {e.strip().splitlines()[-1] if e.strip() else e}" for n, e in raw["errors"].items()]
    runs = [r for r in raw.get("runs", []) if r.get("cells")]
    if runs:
        lines += ["", "## Runs", ""]
        lines += [f"- `{r['command']}`: {r['cells']} cells in {r['seconds'] / 60:.1f} min (commit {r['commit']})"
                  for r in runs]
    lines += ["", "Cell details (per-cycle kill points, exit codes, per-family fuzz outcomes) are in "
              f"`{result_path('reliability', '.json').name}`."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the run


def parse_part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = 0, 0
    if not 1 <= i <= n:
        raise SystemExit(f"error: --part must be I/N with 1 <= I <= N, got {text!r}\n  hint: e.g. --part 1/2")
    return i, n


def main(argv: list[str] | None = None) -> int:
    """Run the soak's cells (resumable, splittable); return 1 if a cell found a violation or crashed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny form of every cell (seconds each)")
    parser.add_argument("--resume", action="store_true", help="skip cells already in the JSON and continue")
    parser.add_argument("--only", default="", help="comma-separated cell-name prefixes, e.g. kill,suite")
    parser.add_argument("--part", default="1/1", help="run every N-th cell: I/N (for a run split across processes)")
    parser.add_argument("--minutes", type=float, default=0.0, help="start no new cell after this many minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="only the per-cell lines")
    args = parser.parse_args(argv)
    part, parts = parse_part(args.part)
    from benchmarks._common import git_commit

    out_json = result_path("reliability", ".json")
    table = cell_table(args.quick)
    prefixes = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in prefixes if not any(n.startswith(p) for n in table)]
    if unknown:
        print(f"error: no cell starts with {', '.join(unknown)}\n  hint: cells are {', '.join(table)}",
              file=sys.stderr)
        return 2
    names = [n for n in table if not prefixes or any(n.startswith(p) for p in prefixes)]
    names = [n for i, n in enumerate(names) if i % parts == part - 1]
    raw = read_raw(out_json)
    if raw["cells"] and not args.resume and not args.quick:
        print(f"error: {out_json} already holds {len(raw['cells'])} finished cells\n  hint: add --resume to "
              "continue (finished cells are skipped), or move the file aside to start over", file=sys.stderr)
        return 2
    if args.quick and not args.resume:
        out_json.unlink(missing_ok=True)
        raw = read_raw(out_json)
    todo = [n for n in names if n not in raw["cells"]]
    _log(f"{len(names) - len(todo)} of {len(names)} cells of this part already done; {len(todo)} to run")
    started = time.perf_counter()
    run_info = {"command": command_line(), "commit": git_commit(), "started": time.time(), "cells": 0,
                "seconds": 0.0}
    bad = 0
    for name in todo:
        if args.minutes and time.perf_counter() - started > args.minutes * 60:
            _log(f"--minutes {args.minutes:g} reached: stopping before {name}")
            break
        _log(f"cell {name} ...")
        part_name, fn = table[name]
        seed = args.seed * 1000 + sum(map(ord, name))
        log: Log = (lambda _m: None) if args.quiet else (lambda m, _n=name: _log(f"  {_n}: {m}"))
        t0 = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f"soak-{part_name}-"))
        try:
            res: CellResult = fn(name, work, random.Random(seed).randrange(2**31), log, quick=args.quick)
            record = {**res.to_json(), "seconds": time.perf_counter() - t0, "part": part_name, "at": time.time()}
            raw = save_cell(out_json, name, record)
            bad += bool(res.failures) or any(record[k] for k in ("lost_trials", "duplicate_trials",
                                                                   "unhandled_exceptions"))
            _log(f"cell {name} done in {record['seconds']:.0f} s: " + ", ".join(
                f"{k}={record[k]}" for k in COUNTERS if record[k]) + (f"; {len(res.failures)} violations"
                                                                    if res.failures else ""))
        except KeyboardInterrupt:
            _log(f"interrupted in {name}: finished cells are kept; continue with --resume")
            return 130
        except Exception:  # a harness crash: recorded, the cell runs again on --resume
            raw = save_cell(out_json, name, None, traceback.format_exc())
            bad += 1
            _log(f"cell {name} crashed (recorded under errors; it runs again with --resume)")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        run_info["cells"] += 1
        run_info["seconds"] = time.perf_counter() - started
        raw = update(out_json, lambda r: r.__setitem__("runs", [x for x in r["runs"] if x.get("started") !=
                                                                 run_info["started"]] + [dict(run_info)]))
        write_result("reliability", "Reliability soak", summarise(raw, table, args.quick))
    raw = update(out_json, lambda r: None)
    write_result("reliability", "Reliability soak", summarise(raw, table, args.quick))
    _log("headline: " + json.dumps(raw["headline"]))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
