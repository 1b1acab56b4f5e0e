"""Parts of the reliability soak benchmark (``python -m benchmarks.bench_reliability``).

Each part module exposes ``CELLS`` (a list of cell names it can run) and
``run_cell(name, work, seed, log, quick=False)`` returning a :class:`CellResult` (``work`` is an empty scratch
directory the cell owns; ``log`` prints one progress line; ``quick`` asks for a tiny form of the same cell, seconds
not minutes, for smoke tests). The orchestrator (``benchmarks/bench_reliability.py``) runs cells one by one,
checkpoints every finished cell to ``results/benchmarks/reliability.json`` (so a run can be stopped and resumed,
or split across processes) and sums the cells' counters into the headline.

Every cell checks the issue's invariants itself and reports violations, never raising for them: a lost trial, a
trial counted twice, a store that fails its integrity check, or a process that ended with a traceback / an exit
code other than 0, 2 or 130 (or the signal the cell sent) is a *violation* counted in the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

Log = Callable[[str], None]


@dataclass
class CellResult:
    """What one cell did and what it found.

    Attributes:
        kill_cycles: SIGKILL-then-resume cycles completed (a process killed at a random moment, then the same
            command resumed).
        postgres_workers: Concurrent worker processes the cell ran against PostgreSQL (0 if none).
        server_restarts: Times the cell stopped and restarted the (private) database server mid-campaign.
        fuzzed_inputs: Hostile inputs tried (configs, CLI argument lists, file mutations).
        lost_trials: Trials that finished (were stored as counted) and later were missing.
        duplicate_trials: Candidates/trial numbers counted twice.
        unhandled_exceptions: Runs that ended with a traceback or an unexpected exit code.
        failures: One line per violation (what, where), capped by the cell at ~50 lines.
        details: Cell-specific figures for the report (trials per searcher, exit-code histogram, ...).
    """

    kill_cycles: int = 0
    postgres_workers: int = 0
    server_restarts: int = 0
    fuzzed_inputs: int = 0
    lost_trials: int = 0
    duplicate_trials: int = 0
    unhandled_exceptions: int = 0
    failures: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def fail(self, line: str) -> None:
        """Record one violation line (kept up to 50)."""
        if len(self.failures) < 50:
            self.failures.append(line)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
