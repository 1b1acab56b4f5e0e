"""Run every benchmark (``make bench``) or their quick forms (``make bench-quick``), one subprocess each.

Each ``benchmarks/bench_<name>.py`` writes its own table under ``results/benchmarks/``; this runner only
sequences them (never in parallel: timings on a 2-core machine would interfere), draws the figures from their
JSON files (``benchmarks/figures.py``, into ``results/benchmarks/figures/``), and writes
``results/benchmarks/index.md`` listing what ran, how long it took and whether it succeeded.

Usage::

    python -m benchmarks.run [--quick] [--only engine,quantization] [--skip searchers]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import write_result

HERE = Path(__file__).resolve().parent
# Cheap, engine-level benchmarks first; search-level ones (which train and evaluate networks) last.
# The reliability soak (an hour, with the test suite under load) runs last.
ORDER = ["data_loading", "engine", "engine_zoo", "env_overhead", "quantization", "deployment", "latency",
         "search_cost", "fidelity", "ranking", "infcop_imp", "recovery", "bn_after_finetune", "searchers",
         "differentiable", "rl_center", "search_quality", "search_budget", "reliability"]
#: Benchmarks that run in another environment than this one: name → its Python, made by the named make target.
ENVIRONMENTS = {"engine_zoo": (HERE.parent / ".venv-vision" / "bin" / "python", "make setup-vision")}


def discover() -> list[str]:
    """Benchmark names in run order (known ones first, then any new ``bench_*.py`` alphabetically)."""
    found = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; return non-zero if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="run each benchmark's quick form")
    parser.add_argument("--only", default="", help="comma-separated names to run")
    parser.add_argument("--skip", default="", help="comma-separated names to skip")
    args = parser.parse_args(argv)
    names = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; choices: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    rows, failed = [], 0
    for name in names:
        if name in skip:
            continue
        source = (HERE / f"bench_{name}.py").read_text()
        python, setup = ENVIRONMENTS.get(name, (Path(sys.executable), ""))
        if not python.exists():
            print(f"== {name}: skipped, its environment is missing ({setup})", flush=True)
            rows.append(f"| {name} | `{setup}` first | 0 | skipped (no {python.parent.parent.name}) |")
            continue
        cmd = [str(python), "-m", f"benchmarks.bench_{name}"]
        if args.quick and "--quick" in source:
            cmd.append("--quick")
        print(f"== {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        seconds = time.perf_counter() - start
        failed += rc != 0
        status = "ok" if rc == 0 else f"FAILED ({rc})"
        rows.append(f"| {name} | `python {' '.join(cmd[1:])}` | {seconds:.0f} | {status} |")
    if rows and "figures" not in skip:  # the figures are drawn from the JSON files the benchmarks just wrote
        cmd = [sys.executable, "-m", "benchmarks.figures", *(["--quick"] if args.quick else [])]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        status = "ok" if rc == 0 else f"no figures ({rc})"
        rows.append(f"| figures | `python {' '.join(cmd[1:])}` | {time.perf_counter() - start:.0f} | {status} |")
    body = "| benchmark | command | seconds | status |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    write_result("index" + ("_quick" if args.quick else ""), "Benchmark runs", body)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
