"""Killed and resumed campaigns, and workers on a PostgreSQL server that goes away (issue #24).

Cells:

* ``kill|<store>|<searcher>`` (``store``: ``sqlite`` or ``postgres``, a private server from
  :mod:`benchmarks._reliability.pg`; ``searcher``: ``random`` a baseline, ``tpe`` an Optuna sampler, ``ddpg`` an
  RL agent that checkpoints after every episode, ``dmcp`` a differentiable searcher that trains for one trial and
  keeps no mid-training checkpoint, so a kill mid-training restarts its training). ``autoprune search CONFIG``
  runs in a subprocess and is SIGKILLed at a random moment — during start-up, mid-evaluation, during the ~20
  store writes of a trial, during an agent checkpoint (``ddpg``) or mid-training (``dmcp``) — then the same
  command runs again; each kill-then-resume is one *kill cycle*. After the last cycle the command runs to the
  end of the campaign.
* ``workers|postgres``: four ``autoprune worker CONFIG`` processes share one study on the private server; every
  few seconds a random worker is SIGKILLed and replaced, and the server itself is stopped (``fast`` or
  ``immediate``) and started again several times mid-campaign. Workers that lose the server end with exit 2 and a
  clear ``error:`` and are started again once it is back. Each worker kill counts as a kill cycle.

Invariants, checked after every cycle (workers: twice a second while the server is up) and at the end:

* the store opens with the product's own :class:`~autoprune.store.TrialStore` and Optuna loads the study
  (SQLite: ``PRAGMA integrity_check`` is ``ok`` first);
* trial numbers are unique; at most the killed process's trial is left RUNNING (none at the end); every counted
  trial has its candidate key and cost; every finished trial that does not count is ``interrupted``;
* no counted trial seen earlier is missing or changed later (``lost_trials``);
* no trial number counted twice, and for the deterministic ``random`` and ``tpe`` no candidate counted more often
  than in an uninterrupted run with the same seed (``duplicate_trials``); their counted candidates, in trial
  order, are always a prefix of that run's and at the end equal it (run once per cell on SQLite);
* at the end exactly ``n_trials`` counted trials;
* ``ddpg``: the agent checkpoint the store points at exists and matches its recorded SHA-256; ``dmcp``: the
  trained network a counted trial names exists;
* every process that ended by itself exited 0, or 2 with ``error:`` and no ``Traceback`` on stderr (a documented
  storage error); anything else, and a traceback from any process, counts in ``unhandled_exceptions``.

Every random choice comes from ``random.Random(seed)``. Waits have deadlines only as failure bounds: a process
that makes no progress for :data:`HANG_SECONDS` counts as hung (a failure) and is killed. Children run in their
own process groups and are always killed, and the server always stopped, when a cell ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from autoprune.store import COUNTED_STATES, TrialStore, _postgres_driver
from autoprune.workers import HEARTBEAT_ATTR, WORKER_ATTR
from benchmarks._reliability import CellResult, Log
from benchmarks._reliability.pg import PrivateServer, private_postgres
from tests.reliability import cli_env, config_dict, sqlite_integrity

SEARCHERS = ("random", "tpe", "ddpg", "dmcp")
STORES = ("sqlite", "postgres")
CELLS = [f"kill|{store}|{s}" for store in STORES for s in SEARCHERS] + ["workers|postgres"]

#: A process that shows no progress for this long is hung (a failure); it is killed.
HANG_SECONDS = 180.0
#: Bound for a whole uninterrupted run (reference, final resume).
RUN_SECONDS = 900.0
CAMPAIGN = "rel"  # tests.reliability.config_dict's campaign name; seed 0
_BASE_ATTRS = frozenset({WORKER_ATTR, HEARTBEAT_ATTR})
_POLL = 0.003
#: Seconds between two worker kills in the workers cell (uniform in this range).
_KILL_EVERY = (2.5, 5.0)


# ------------------------------------------------------------------------------------------- searcher plans


@dataclass(frozen=True)
class Plan:
    """How one searcher is soaked.

    Attributes:
        searcher: The config's ``searcher`` section.
        n_trials: ``(full, quick)`` trials of the campaign.
        cycles: ``(full, quick)`` kill cycles.
        targets: Kill moments aimed at, with their weights (see :func:`_wait_for_target`).
        deterministic: Same seed → same candidates, also across kills (compared with an uninterrupted run).
        optuna_params: The searcher suggests Optuna parameters when the trial starts (params are no store write).
        late_window: Seconds after progress within which ``anywhere``/``training`` kills land (full, quick).
    """

    searcher: dict[str, Any]
    n_trials: tuple[int, int]
    cycles: tuple[int, int]
    targets: dict[str, float]
    deterministic: bool
    optuna_params: bool = False
    late_window: tuple[float, float] = (0.6, 0.4)


_DDPG_KW = {"warmup_episodes": 3, "buffer_episodes": 50, "net_arch": [16, 16], "batch_size": 4, "save_every": 1}
PLANS: dict[str, Plan] = {
    "random": Plan({"name": "random"}, (80, 12), (16, 2),
                   {"startup": 0.2, "evaluation": 0.25, "store_write": 0.3, "anywhere": 0.25}, True),
    "tpe": Plan({"name": "tpe"}, (80, 12), (16, 2),
                {"startup": 0.2, "evaluation": 0.25, "store_write": 0.3, "anywhere": 0.25}, True, True),
    "ddpg": Plan({"name": "ddpg", "kwargs": _DDPG_KW}, (70, 8), (16, 2),
                 {"startup": 0.15, "anywhere": 0.25, "store_write": 0.3, "checkpoint": 0.3}, False,
                 late_window=(1.0, 0.6)),
    "dmcp": Plan({"name": "dmcp", "kwargs": {"iters": 400}}, (1, 1), (16, 2),
                 {"startup": 0.2, "training": 0.8}, False, late_window=(3.5, 1.0)),
}
_QUICK_KWARGS = {"dmcp": {"iters": 150}}


# ------------------------------------------------------------------------------------------- the store probe


@dataclass
class TrialRow:
    """One trial as read from the store's tables (no Optuna involved)."""

    number: int
    state: str
    attrs: dict[str, Any]
    n_attrs: int
    n_params: int

    @property
    def counted(self) -> bool:
        """Finished and counting towards ``n_trials``."""
        return self.state not in ("RUNNING", "WAITING") and self.attrs.get("state") in COUNTED_STATES

    @property
    def pid(self) -> int | None:
        """The process that created it (the ``autoprune.worker`` attribute)."""
        w = self.attrs.get(WORKER_ATTR)
        return w.get("pid") if isinstance(w, dict) else None

    def writing(self, optuna_params: bool) -> bool:
        """A RUNNING trial whose results are being written (attributes beyond the owner/heartbeat, or the
        candidate's parameters for searchers that do not suggest them)."""
        return self.n_attrs > len(_BASE_ATTRS) or (not optuna_params and self.n_params > 0)


_JOIN = "JOIN trials t ON t.trial_id = x.trial_id JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :n"
_Q_TRIALS = ("SELECT t.trial_id, t.number, t.state FROM trials t JOIN studies s ON s.study_id = t.study_id "
             "WHERE s.study_name = :n")
_Q_ATTRS = (f"SELECT x.trial_id, x.\"key\", x.value_json FROM trial_user_attributes x {_JOIN} "
            "AND x.\"key\" IN ('state', 'key', 'macs', 'artifact', 'autoprune.worker')")
_Q_NATTRS = f"SELECT x.trial_id, COUNT(*) FROM trial_user_attributes x {_JOIN} GROUP BY x.trial_id"
_Q_NPARAMS = f"SELECT x.trial_id, COUNT(*) FROM trial_params x {_JOIN} GROUP BY x.trial_id"
_Q_FINISHED = ("SELECT COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :n "
               "AND t.state NOT IN ('RUNNING', 'WAITING')")


class Probe:
    """Reads one study's trials straight from the store's tables (SQLite read-only, or PostgreSQL), cheap enough
    to poll every few milliseconds while a process runs.

    Args:
        location: The SQLite file, or the PostgreSQL URL.
        study: The study name (``rel/<searcher>/seed0``).
    """

    def __init__(self, location: str, study: str) -> None:
        self.location = location
        self.study = study
        self._engine: Any = None

    @property
    def is_sqlite(self) -> bool:
        """Whether the store is a SQLite file."""
        return "://" not in self.location

    def engine(self) -> Any:
        """The SQLAlchemy engine (made on first use)."""
        if self._engine is None:
            from sqlalchemy import create_engine
            from sqlalchemy.pool import NullPool

            if self.is_sqlite:
                self._engine = create_engine(f"sqlite:///file:{self.location}?mode=ro&uri=true", poolclass=NullPool)
            else:
                self._engine = create_engine(_postgres_driver(self.location), pool_pre_ping=True, pool_size=2,
                                             connect_args={"connect_timeout": 10})
        return self._engine

    def dispose(self) -> None:
        """Close pooled connections (before the server stops, and at the end)."""
        if self._engine is not None:
            self._engine.dispose()

    def _query(self, sql: str) -> list[Any] | None:
        from sqlalchemy import exc, text

        if self.is_sqlite and not Path(self.location).exists():
            return None
        try:
            with self.engine().connect() as con:
                return list(con.execute(text(sql), {"n": self.study}).all())
        except exc.DBAPIError as e:
            msg = str(e.orig if e.orig is not None else e).lower()
            if "no such table" in msg or "does not exist" in msg or "unable to open" in msg:
                return None  # the store or its tables are not created yet
            raise

    def finished(self) -> int:
        """Finished trials of the study (0 before it exists)."""
        rows = self._query(_Q_FINISHED)
        return int(rows[0][0]) if rows else 0

    def rows(self) -> list[TrialRow] | None:
        """Every trial of the study (``None`` when the store has no tables yet)."""
        trials = self._query(_Q_TRIALS)
        if trials is None:
            return None
        attrs: dict[int, dict[str, Any]] = {}
        for tid, key, value in self._query(_Q_ATTRS) or []:
            attrs.setdefault(tid, {})[key] = json.loads(value)
        n_attrs = dict(self._query(_Q_NATTRS) or [])
        n_params = dict(self._query(_Q_NPARAMS) or [])
        return [TrialRow(int(num), str(state).split(".")[-1], attrs.get(tid, {}), int(n_attrs.get(tid, 0)),
                         int(n_params.get(tid, 0))) for tid, num, state in trials]

    def running_of(self, pid: int) -> TrialRow | None:
        """The RUNNING trial created by process ``pid``, if any."""
        for r in self.rows() or []:
            if r.state == "RUNNING" and r.pid == pid:
                return r
        return None


def load_trials(location: str, study: str) -> tuple[list[optuna.trial.FrozenTrial] | None, dict[str, Any]]:
    """Open the store as the product does (:class:`TrialStore`) and load the study with Optuna.

    Returns:
        The study's trials (``None`` if the study does not exist yet) and its user attributes.
    """
    store = TrialStore(location, campaign=CAMPAIGN, timeout=30)
    try:
        try:
            st = optuna.load_study(study_name=study, storage=store.storage)
        except KeyError:
            return None, {}
        return st.get_trials(deepcopy=False), dict(st.user_attrs)
    finally:
        engine = getattr(store.storage, "engine", None)
        if engine is not None:
            engine.dispose()


# ------------------------------------------------------------------------------------------- the ledger


@dataclass
class Ledger:
    """The invariants' memory across cycles of one cell and the counters they feed.

    Args:
        res: The cell's result (counters and failure lines are added to it).
        reference: Candidate keys of the uninterrupted run, in trial order (deterministic searchers), or ``None``.
    """

    res: CellResult
    reference: list[str] | None = None
    seen: dict[int, str] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)
    checks: Counter[str] = field(default_factory=Counter)
    sequence_ok: bool = True

    def problem(self, kind: str, line: str) -> None:
        """A violation that is neither lost nor duplicated (integrity, leftovers, checkpoint)."""
        self.checks[kind] += 1
        self.res.fail(line)

    def absorb(self, counted: Mapping[int, str], where: str) -> None:
        """Check that every counted trial seen before is still there with the same candidate; remember these."""
        for num, key in self.seen.items():
            if num in self.lost:
                continue
            if counted.get(num) != key:
                self.lost.add(num)
                self.res.lost_trials += 1
                self.res.fail(f"{where}: counted trial #{num} ({key}) is missing or changed "
                              f"(now {counted.get(num)})")
        self.seen.update(counted)

    def compare(self, keys: Sequence[str], where: str, *, final: bool) -> None:
        """Deterministic searchers: the counted candidates are a prefix of (at the end: equal to) the
        uninterrupted run's; at the end, excess candidates are duplicates and missing ones lost."""
        ref = self.reference
        if ref is None:
            return
        prefix_ok = list(keys) == ref[:len(keys)] and len(keys) <= len(ref)
        if not prefix_ok and self.sequence_ok:
            self.sequence_ok = False
            at = next((i for i, (a, b) in enumerate(zip(keys, ref)) if a != b), min(len(keys), len(ref)))
            self.problem("sequence", f"{where}: counted candidates differ from the uninterrupted run's at position "
                         f"{at} ({len(keys)} counted, {len(ref)} in the reference)")
        if final:
            have, want = Counter(keys), Counter(ref)
            self.res.duplicate_trials += sum((have - want).values())
            missing = sum((want - have).values())
            if missing > len(self.lost):
                self.res.lost_trials += missing - len(self.lost)
                self.res.fail(f"{where}: {missing} candidates of the uninterrupted run never counted")


# ------------------------------------------------------------------------------------------- checks


def check_store(probe: Probe, ledger: Ledger, where: str, *, running_allowed: int, n_trials: int | None = None,
                cwd: Path | None = None) -> dict[int, str]:
    """The invariants on the store as it is now (see the module docstring); violations go to ``ledger``.

    Args:
        probe: The study's probe.
        ledger: Where violations and counted trials go.
        where: Label for failure lines (cell and cycle).
        running_allowed: RUNNING trials tolerated (1 right after a kill, 0 after a clean end).
        n_trials: When given, the exact number of counted trials required (the end of a campaign).
        cwd: The campaign commands' working directory (relative artifact paths).

    Returns:
        ``{trial number: candidate key}`` of the counted trials.
    """
    if probe.is_sqlite and Path(probe.location).exists():
        verdict = sqlite_integrity(Path(probe.location))
        if verdict != "ok":
            ledger.problem("integrity", f"{where}: SQLite integrity_check: {verdict}")
            return {}
    if probe.rows() is None:
        if n_trials is not None:
            ledger.problem("missing", f"{where}: the store holds no trial table at the end")
        return {}
    try:
        trials, study_attrs = load_trials(probe.location, probe.study)
    except Exception as exc:  # the store does not open: the worst violation
        ledger.problem("open", f"{where}: the store does not open: {type(exc).__name__}: {str(exc)[:200]}")
        return {}
    trials = trials or []
    _check_trials(trials, ledger, where, running_allowed)
    counted = {t.number: str(t.user_attrs.get("key")) for t in trials
               if t.state.is_finished() and t.user_attrs.get("state") in COUNTED_STATES}
    ledger.absorb(counted, where)
    ledger.compare([counted[k] for k in sorted(counted)], where, final=n_trials is not None)
    if n_trials is not None and len(counted) != n_trials:
        ledger.problem("n_trials", f"{where}: {len(counted)} counted trials at the end, not n_trials={n_trials}")
    _check_artifacts(trials, study_attrs, ledger, where, cwd)
    return counted


def _check_trials(trials: Sequence[optuna.trial.FrozenTrial], ledger: Ledger, where: str, running_allowed: int
                  ) -> None:
    """Unique numbers, no more RUNNING trials than allowed, every finished trial counted (with its record) or
    ``interrupted``."""
    numbers = [t.number for t in trials]
    if len(numbers) != len(set(numbers)):
        extra = len(numbers) - len(set(numbers))
        ledger.res.duplicate_trials += extra
        ledger.res.fail(f"{where}: {extra} trial numbers occur twice")
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    if len(running) > running_allowed:
        ledger.problem("running", f"{where}: trials left running: {running}")
    for t in trials:
        state = t.user_attrs.get("state")
        if t.state.is_finished() and state in COUNTED_STATES:
            if not t.user_attrs.get("key") or t.user_attrs.get("macs") is None:
                ledger.problem("record", f"{where}: counted trial #{t.number} lacks its key or cost")
        elif t.state.is_finished() and state != "interrupted":
            ledger.problem("record", f"{where}: finished trial #{t.number} is neither counted nor interrupted "
                           f"(state {state!r})")


def _sha256(path: Path) -> str:
    """The file's SHA-256 (hex)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _check_artifacts(trials: Sequence[optuna.trial.FrozenTrial], study_attrs: Mapping[str, Any], ledger: Ledger,
                     where: str, cwd: Path | None) -> None:
    """The RL checkpoint the store points at is complete; a differentiable searcher's network exists."""
    agent = study_attrs.get("autoprune.state.agent")
    if isinstance(agent, dict):
        for key in ("agent", "replay"):
            if not agent.get(key):
                continue
            path = Path(agent[key])
            want = agent.get(f"{key}_sha256")
            if not path.is_file():
                ledger.problem("checkpoint", f"{where}: the store points at a missing {key} checkpoint {path.name}")
            elif want is not None and _sha256(path) != want:
                ledger.problem("checkpoint", f"{where}: {key} checkpoint {path.name} does not match its SHA-256")
    for t in trials:
        art = t.user_attrs.get("artifact")
        if art and t.state.is_finished() and t.user_attrs.get("state") in COUNTED_STATES:
            path = Path(art) if Path(art).is_absolute() or cwd is None else cwd / art
            if not path.exists():
                ledger.problem("artifact", f"{where}: counted trial #{t.number} names a missing artifact {art}")


# ------------------------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A CLI subprocess with its output in files (no pipe can fill up and block it)."""

    popen: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: float

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.popen.pid

    def stderr(self) -> str:
        """Its stderr so far."""
        with contextlib.suppress(OSError):
            return self.err.read_text(errors="replace")
        return ""

    def stdout(self) -> str:
        """Its stdout so far."""
        with contextlib.suppress(OSError):
            return self.out.read_text(errors="replace")
        return ""

    def kill(self) -> None:
        """SIGKILL its process group (it runs in a session of its own) and reap it."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=60)


def spawn(args: Sequence[str], cwd: Path, logs: Path, tag: str) -> Proc:
    """``python -m autoprune.cli -q ARGS`` in its own session, stdout/stderr to ``logs/<tag>.out|err``."""
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{tag}.out", logs / f"{tag}.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        p = subprocess.Popen([sys.executable, "-m", "autoprune.cli", "-q", *args], cwd=cwd, env=cli_env(),
                             stdout=fo, stderr=fe, start_new_session=True)
    return Proc(p, out, err, time.monotonic())


@contextlib.contextmanager
def reaped(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Kill every process in ``procs`` (still running) when the block ends, however it ends."""
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()


def judge_exit(proc: Proc, res: CellResult, where: str, *, killed: bool) -> str:
    """Check how a process ended; return its exit label (``SIGKILL``, ``0``, ``2``, ...).

    A process the cell killed must have died of SIGKILL; one that ended by itself must exit 0, or 2 with
    ``error:`` and no traceback (a documented, clear error). Any traceback on stderr is a violation.
    """
    code = proc.popen.returncode
    err = proc.stderr()
    label = "SIGKILL" if code == -signal.SIGKILL else str(code)
    bad = None
    if "Traceback (most recent call last)" in err:
        bad = "a traceback"
    elif killed and code == -signal.SIGKILL:
        pass
    elif code != 0 and not (code == 2 and "error:" in err):  # ended by itself (maybe just before the kill)
        bad = f"exit {code}"
    if bad is not None:
        res.unhandled_exceptions += 1
        tail = " | ".join(err.strip().splitlines()[-3:])[-300:]
        res.fail(f"{where}: pid {proc.pid} ended with {bad}: {tail}")
    return label


# ------------------------------------------------------------------------------------------- one kill cycle


@dataclass
class Cycle:
    """What one kill cycle did."""

    target: str
    where: str
    exit: str
    seconds: float
    killed: bool


def _weighted(rng: random.Random, weights: Mapping[str, float]) -> str:
    """One name of ``weights`` drawn with those weights."""
    names = sorted(weights)
    return rng.choices(names, [weights[n] for n in names])[0]


class _Watch:
    """Polls the store (and the artifact directory) for one running process, with the hang deadline."""

    def __init__(self, proc: Proc, probe: Probe, art_dir: Path | None, before: int) -> None:
        self.proc, self.probe, self.art_dir, self.before = proc, probe, art_dir, before
        self.deadline = time.monotonic() + HANG_SECONDS
        self.hung = False

    def alive(self) -> bool:
        """The process still runs and the hang deadline has not passed (else ``hung`` is set)."""
        if self.proc.popen.poll() is not None:
            return False
        if time.monotonic() > self.deadline:
            self.hung = True
            return False
        return True

    def until(self, cond: Callable[[], bool], poll: float = 0.02) -> bool:
        """Wait until ``cond()`` (True) or the process ends or hangs (False)."""
        while self.alive():
            if cond():
                return True
            time.sleep(poll)
        return False

    def progressed(self) -> bool:
        """A trial finished since the cycle started (this run made progress)."""
        return self.probe.finished() > self.before

    def checkpoint_tmp(self) -> bool:
        """A temporary checkpoint file of this process exists (an agent checkpoint is being written)."""
        if self.art_dir is None or not self.art_dir.is_dir():
            return False
        tag = f".{self.proc.pid}.tmp"
        with contextlib.suppress(OSError):
            return any(tag in e.name for e in os.scandir(self.art_dir))
        return False


def _wait_for_target(target: str, watch: _Watch, rng: random.Random, plan: Plan, quick: bool) -> None:
    """Sleep/poll until the moment ``target`` aims at (the process may end first: then it ran to the end).

    ``startup``: 0.2–4 s after the start (imports, store creation, provenance, dense evaluation).
    ``anywhere``: a random delay after the run's first finished trial. ``evaluation``: just after a new trial
    is asked. ``store_write``: as soon as the running trial's results are being written. ``checkpoint``: while an
    agent checkpoint's temporary file exists. ``training``: a random delay into the (single) trial's training.
    Watching stops after a few more finished trials without meeting the moment (the kill lands wherever).
    """
    late = plan.late_window[1 if quick else 0]
    if target == "startup":
        end = time.monotonic() + rng.uniform(0.2, 4.0)
        watch.until(lambda: time.monotonic() >= end)
        return
    if target == "training":
        if watch.until(lambda: watch.probe.running_of(watch.proc.pid) is not None):
            end = time.monotonic() + rng.uniform(0.0, late)
            watch.until(lambda: time.monotonic() >= end)
        return
    if not watch.until(watch.progressed):
        return
    if target == "anywhere":
        end = time.monotonic() + rng.uniform(0.0, late)
        watch.until(lambda: time.monotonic() >= end)
        return
    give_up = watch.probe.finished() + 4

    def met() -> bool:
        if watch.probe.finished() >= give_up:
            return True
        if target == "checkpoint":
            return watch.checkpoint_tmp()
        row = watch.probe.running_of(watch.proc.pid)
        if row is None:
            return False
        return row.writing(plan.optuna_params) if target == "store_write" else not row.writing(plan.optuna_params)

    if watch.until(met, poll=_POLL) and target == "evaluation":
        time.sleep(rng.uniform(0.0, 0.02))


def classify(probe: Probe, proc: Proc, art_dir: Path | None, before: int, plan: Plan) -> str:
    """Where a killed process was, read from what it left: its RUNNING trial (being written or not), an agent
    checkpoint's temporary file, finished trials of this run (between trials), or nothing (start-up)."""
    row = probe.running_of(proc.pid)
    if row is not None:
        if row.writing(plan.optuna_params):
            return "store_write"
        return "training" if plan.searcher["name"] == "dmcp" else "evaluation"
    if art_dir is not None and art_dir.is_dir() and any(f".{proc.pid}.tmp" in p.name for p in art_dir.iterdir()):
        return "checkpoint"
    return "between_trials" if probe.finished() > before else "startup"


def kill_cycle(args: Sequence[str], cwd: Path, probe: Probe, rng: random.Random, plan: Plan, *, art_dir: Path,
               logs: Path, tag: str, res: CellResult, quick: bool) -> Cycle:
    """Start the command, SIGKILL it at a random moment (:func:`_wait_for_target`), judge its end."""
    before = probe.finished()
    target = _weighted(rng, plan.targets)
    started = time.monotonic()
    proc = spawn(args, cwd, logs, tag)
    with reaped([proc]):
        watch = _Watch(proc, probe, art_dir, before)
        _wait_for_target(target, watch, rng, plan, quick)
        if proc.popen.poll() is None:
            proc.kill()
        killed = proc.popen.returncode == -signal.SIGKILL
        if watch.hung:
            res.unhandled_exceptions += 1
            res.fail(f"{tag}: no progress for {HANG_SECONDS:.0f} s (hung); killed")
        where = classify(probe, proc, art_dir, before, plan) if killed else "done"
        label = judge_exit(proc, res, tag, killed=killed)
    return Cycle(target, where, label, time.monotonic() - started, killed)


def run_to_end(args: Sequence[str], cwd: Path, logs: Path, tag: str, res: CellResult) -> tuple[str, float]:
    """Run the command uninterrupted (bounded by :data:`RUN_SECONDS`); return its exit label and seconds."""
    proc = spawn(args, cwd, logs, tag)
    with reaped([proc]):
        try:
            proc.popen.wait(timeout=RUN_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            res.unhandled_exceptions += 1
            res.fail(f"{tag}: did not finish within {RUN_SECONDS:.0f} s (hung); killed")
            return "hung", time.monotonic() - proc.started
        return judge_exit(proc, res, tag, killed=False), time.monotonic() - proc.started


# ------------------------------------------------------------------------------------------- kill cells


def write_campaign(path: Path, out: Path, *, n_trials: int, searcher: Mapping[str, Any],
                   storage: str | None = None) -> Path:
    """The test suite's small campaign (``tests.reliability.config_dict``) as YAML, optionally on ``storage``."""
    data = config_dict(out, n_trials=n_trials, searcher=dict(searcher))
    if storage is not None:
        data["storage"] = storage
    path.write_text(yaml.safe_dump(data))
    return path


def reference_keys(work: Path, plan: Plan, n_trials: int, searcher: Mapping[str, Any], res: CellResult
                   ) -> tuple[list[str] | None, float]:
    """The uninterrupted run (SQLite, same seed): its counted candidate keys in trial order, and its seconds."""
    ref = work / "reference"
    ref.mkdir()
    write_campaign(ref / "c.yaml", ref / "out", n_trials=n_trials, searcher=searcher)
    label, seconds = run_to_end(("search", "c.yaml"), ref, work / "logs", "reference", res)
    rows = Probe(str(ref / "out" / "trials.db"), f"{CAMPAIGN}/{plan.searcher['name']}/seed0").rows() or []
    keys = [str(r.attrs.get("key")) for r in sorted(rows, key=lambda r: r.number) if r.counted]
    if label != "0" or len(keys) != n_trials:
        res.fail(f"reference run: exit {label}, {len(keys)} of {n_trials} trials; sequence not compared")
        return None, seconds
    return keys, seconds


def run_kill_cell(store: str, searcher: str, work: Path, seed: int, log: Log, quick: bool) -> CellResult:
    """One ``kill|<store>|<searcher>`` cell (module docstring)."""
    plan = PLANS[searcher]
    n_trials, cycles = plan.n_trials[1 if quick else 0], plan.cycles[1 if quick else 0]
    spec = dict(plan.searcher)
    if quick and searcher in _QUICK_KWARGS:
        spec["kwargs"] = {**spec.get("kwargs", {}), **_QUICK_KWARGS[searcher]}
    rng = random.Random(seed)
    res = CellResult()
    name = f"kill|{store}|{searcher}"
    t0 = time.monotonic()
    ledger = Ledger(res)
    history: list[Cycle] = []
    details: dict[str, Any] = {"store": store, "searcher": searcher, "n_trials": n_trials, "cycles_target": cycles,
                               "searcher_config": spec}
    with contextlib.ExitStack() as stack:
        storage = None
        if store == "postgres":
            pg = stack.enter_context(private_postgres(work))
            storage = pg.url
            details["server"] = pg.url
        if plan.deterministic:
            ledger.reference, details["reference_seconds"] = reference_keys(work, plan, n_trials, spec, res)
        out = work / "out"
        write_campaign(work / "c.yaml", out, n_trials=n_trials, searcher=spec, storage=storage)
        study = f"{CAMPAIGN}/{searcher}/seed0"
        probe = Probe(storage or str(out / "trials.db"), study)
        stack.callback(probe.dispose)
        art_dir = out / "artifacts" / searcher / "seed0"
        for i in range(1, cycles + 1):
            tag = f"cycle{i:02d}"
            cyc = kill_cycle(("search", "c.yaml"), work, probe, rng, plan, art_dir=art_dir, logs=work / "logs",
                             tag=tag, res=res, quick=quick)
            history.append(cyc)
            counted = check_store(probe, ledger, f"{name} {tag}", running_allowed=int(cyc.killed), cwd=work)
            res.kill_cycles += int(cyc.killed)
            log(f"{name} {tag}/{cycles}: aimed {cyc.target}, killed in {cyc.where}, exit {cyc.exit}, "
                f"{len(counted)}/{n_trials} counted, {cyc.seconds:.1f} s")
            if not cyc.killed:
                break  # the campaign ran to its end before the kill
        label, seconds = run_to_end(("search", "c.yaml"), work, work / "logs", "final", res)
        counted = check_store(probe, ledger, f"{name} final", running_allowed=0, n_trials=n_trials, cwd=work)
        log(f"{name} final resume: exit {label}, {len(counted)}/{n_trials} counted, {seconds:.1f} s")
        details["final"] = {"exit": label, "seconds": round(seconds, 2), "counted": len(counted)}
        details["leftover_files"] = _leftovers(art_dir)
        _check_leftovers(probe, art_dir, ledger, f"{name} final")
        rows = probe.rows() or []
        details["interrupted_trials"] = sum(1 for r in rows if r.attrs.get("state") == "interrupted")
    details.update(_summary(history, ledger, time.monotonic() - t0))
    res.details = details
    return res


def _leftovers(art_dir: Path) -> list[str]:
    """Files in the searcher's artifact directory (an RL searcher keeps its current agent and replay buffer)."""
    if not art_dir.is_dir():
        return []
    return sorted(p.name for p in art_dir.iterdir())


def _check_leftovers(probe: Probe, art_dir: Path, ledger: Ledger, where: str) -> None:
    """An RL searcher's artifact directory holds only the checkpoint the store points at (older checkpoints and
    the temporary files of killed writers are removed by the next checkpoint)."""
    _, attrs = load_trials(probe.location, probe.study)
    agent = attrs.get("autoprune.state.agent")
    if not isinstance(agent, dict):
        return
    want = {Path(agent[k]).name for k in ("agent", "replay") if agent.get(k)}
    extra = sorted(set(_leftovers(art_dir)) - want)
    if extra:
        ledger.problem("leftover", f"{where}: files left beside the current checkpoint: {extra[:5]}")


def _summary(history: Sequence[Cycle], ledger: Ledger, seconds: float) -> dict[str, Any]:
    """The per-cycle figures of a kill cell for ``details``."""
    return {
        "aimed": dict(Counter(c.target for c in history)),
        "where_killed": dict(Counter(c.where for c in history)),
        "exit_codes": dict(Counter(c.exit for c in history)),
        "cycles": [{"target": c.target, "where": c.where, "exit": c.exit, "seconds": round(c.seconds, 2)}
                   for c in history],
        "check_failures": dict(ledger.checks),
        "sequence_equal_to_uninterrupted": ledger.sequence_ok if ledger.reference is not None else None,
        "seconds": round(seconds, 1),
    }


# ------------------------------------------------------------------------------------------- workers cell


@dataclass
class _Pool:
    """The worker processes of the workers cell and what happened to them."""

    cwd: Path
    logs: Path
    res: CellResult
    size: int = 4
    slots: list[Proc | None] = field(default_factory=list)
    started: list[Proc] = field(default_factory=list)
    exits: Counter[str] = field(default_factory=Counter)
    kills: int = 0

    def __post_init__(self) -> None:
        self.slots = [None] * self.size

    def live(self) -> list[int]:
        """Slots whose process runs."""
        return [i for i, p in enumerate(self.slots) if p is not None and p.popen.poll() is None]

    def reap(self) -> None:
        """Judge and empty the slots whose process ended by itself."""
        for i, p in enumerate(self.slots):
            if p is not None and p.popen.poll() is not None:
                self.exits[judge_exit(p, self.res, p.out.stem, killed=False)] += 1
                self.slots[i] = None

    def refill(self) -> None:
        """Start a worker in every empty slot."""
        for i, p in enumerate(self.slots):
            if p is None:
                proc = spawn(("worker", "c.yaml"), self.cwd, self.logs, f"worker{len(self.started):03d}")
                self.started.append(proc)
                self.slots[i] = proc

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a random live worker (it is replaced by the next :meth:`refill`)."""
        live = self.live()
        if not live:
            return
        i = rng.choice(live)
        proc = self.slots[i]
        assert proc is not None
        proc.kill()
        self.exits[judge_exit(proc, self.res, proc.out.stem, killed=True)] += 1
        self.slots[i] = None
        self.kills += 1


def _worker_rows(probe: Probe, ledger: Ledger, where: str) -> list[TrialRow]:
    """Read the shared study (server up); check unique numbers and that no counted trial disappeared."""
    rows = probe.rows() or []
    numbers = [r.number for r in rows]
    if len(numbers) != len(set(numbers)):
        ledger.res.duplicate_trials += len(numbers) - len(set(numbers))
        ledger.res.fail(f"{where}: trial numbers occur twice")
    ledger.absorb({r.number: str(r.attrs.get("key")) for r in rows if r.counted}, where)
    return rows


def run_workers_cell(work: Path, seed: int, log: Log, quick: bool) -> CellResult:
    """The ``workers|postgres`` cell (module docstring)."""
    rng = random.Random(seed)
    res = CellResult(postgres_workers=4)
    n_trials = 30 if quick else 150
    restart_at = [0.4] if quick else [0.15, 0.35, 0.55, 0.75]
    ledger = Ledger(res)
    t0 = time.monotonic()
    details: dict[str, Any] = {"n_trials": n_trials, "workers": 4, "searcher": "random"}
    with private_postgres(work) as pg:
        write_campaign(work / "c.yaml", work / "out", n_trials=n_trials, searcher={"name": "random"},
                       storage=pg.url)
        probe = Probe(pg.url, f"{CAMPAIGN}/random/seed0")
        pool = _Pool(work, work / "logs", res)
        try:
            _drive_workers(pool, pg, probe, ledger, rng, n_trials, restart_at, log, details)
        finally:
            for p in pool.slots:
                if p is not None:
                    p.kill()
            probe.dispose()
        label, seconds = run_to_end(("worker", "c.yaml"), work, work / "logs", "final", res)
        counted = check_store(probe, ledger, "workers final", running_allowed=0, n_trials=n_trials, cwd=work)
        rows = probe.rows() or []
        probe.dispose()
    owners = {r.pid for r in rows if r.counted}
    ours = {p.pid for p in pool.started}
    if not owners <= ours:
        ledger.problem("owner", f"workers final: counted trials owned by processes the cell did not start: "
                       f"{sorted(owners - ours)[:5]}")
    keys = Counter(r.attrs.get("key") for r in rows if r.counted)
    details.update({
        "kill_cycles_are": "SIGKILLed workers (each replaced by a new `autoprune worker`)",
        "workers_started": len(pool.started), "worker_kills": pool.kills, "worker_exits": dict(pool.exits),
        "workers_that_counted_trials": len(owners), "final": {"exit": label, "seconds": round(seconds, 2),
                                                              "counted": len(counted)},
        "interrupted_trials": sum(1 for r in rows if r.attrs.get("state") == "interrupted"),
        "repeated_candidates": sum(v - 1 for v in keys.values() if v > 1),
        "repeated_candidates_note": "the same random candidate counted by two workers (both proposed index k "
        "before either trial existed); the worker protocol promises unique trials and exactly n_trials, not "
        "unique candidates, so these are reported, not counted as duplicates",
        "check_failures": dict(ledger.checks), "seconds": round(time.monotonic() - t0, 1),
    })
    res.kill_cycles = pool.kills
    res.details = details
    log(f"workers|postgres: {len(counted)}/{n_trials} counted, {pool.kills} worker kills, "
        f"{res.server_restarts} server restarts, final exit {label}")
    return res


def _drive_workers(pool: _Pool, pg: PrivateServer, probe: Probe, ledger: Ledger, rng: random.Random,
                   n_trials: int, restart_at: list[float], log: Log, details: dict[str, Any]) -> None:
    """Keep four workers on the study, kill one every :data:`_KILL_EVERY` seconds, restart the server at the
    ``restart_at`` fractions of the campaign, until the study holds ``n_trials`` counted trials and every worker
    ended."""
    res = pool.res
    pending = list(restart_at)
    restarts: list[dict[str, Any]] = []
    next_kill = time.monotonic() + rng.uniform(*_KILL_EVERY)
    last_count, last_progress = -1, time.monotonic()
    pool.refill()
    while True:
        pool.reap()
        rows = _worker_rows(probe, ledger, "workers")
        counted = sum(r.counted for r in rows)
        if counted != last_count:
            last_count, last_progress = counted, time.monotonic()
        if counted >= n_trials and not pool.live():
            break
        if time.monotonic() - last_progress > HANG_SECONDS:
            res.unhandled_exceptions += 1
            res.fail(f"workers: nothing counted for {HANG_SECONDS:.0f} s at {counted}/{n_trials} with "
                     f"{len(pool.live())} workers alive (hung); stopped")
            break
        if pending and counted >= pending[0] * n_trials:
            pending.pop(0)
            restarts.append(_restart_server(pool, pg, probe, rng, counted, n_trials, log))
            continue
        if counted < n_trials:
            if time.monotonic() >= next_kill:
                pool.kill_one(rng)
                next_kill = time.monotonic() + rng.uniform(*_KILL_EVERY)
            pool.refill()
        time.sleep(0.1)
    details["server_restarts"] = restarts


def _restart_server(pool: _Pool, pg: PrivateServer, probe: Probe, rng: random.Random, counted: int, n_trials: int,
                    log: Log) -> dict[str, Any]:
    """Stop the server (``fast`` or ``immediate``) under the running workers, wait 0.5–3 s, start it again."""
    mode = rng.choice(("fast", "immediate"))
    down = rng.uniform(0.5, 3.0)
    probe.dispose()
    t = time.monotonic()
    pg.stop(mode)
    end = time.monotonic() + down
    while time.monotonic() < end:
        pool.reap()  # workers that lost the server end with exit 2 and a clear error
        time.sleep(0.1)
    pg.start()
    pool.res.server_restarts += 1
    log(f"workers|postgres: server stopped ({mode}) at {counted}/{n_trials} counted, down {down:.1f} s, "
        f"{len(pool.live())} workers still alive")
    return {"mode": mode, "at_counted": counted, "down_seconds": round(time.monotonic() - t, 2)}


# ------------------------------------------------------------------------------------------- entry point


def run_cell(name: str, work: Path, seed: int, log: Log, quick: bool = False) -> CellResult:
    """Run one cell of :data:`CELLS` in the empty scratch directory ``work``.

    Raises:
        benchmarks._reliability.pg.PostgresUnavailable: A PostgreSQL cell where no server can run
            (``skipped: no initdb ...``).
        ValueError: An unknown cell name.
    """
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; cells: {', '.join(CELLS)}")
    work = Path(work).resolve()
    if name == "workers|postgres":
        return run_workers_cell(work, seed, log, quick)
    _, store, searcher = name.split("|")
    return run_kill_cell(store, searcher, work, seed, log, quick)
